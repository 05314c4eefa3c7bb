"""Animated WebP previews of a hit's moment, decoded from the ingested shard's video and cached on disk.

The mp4 is read from its shard tar (any store), frames between ``start_s`` and ``end_s`` are decoded by
seeking (:func:`pipeline.decode.decode_frames`, as every stage decodes) and written as one animated WebP
to a :class:`PreviewCache`: a folder with a byte cap, least recently used files evicted first. The service
asks only for the windows its catalog lists for a video (``Catalog.preview_windows``), so the number of
distinct previews is bounded by the index, not by the clients. Requests for the same window wait on that
window's lock and then read the file one decode made; different windows decode side by side, at most
``max_decodes`` at once (each decode is a core). A video whose mp4 is over ``max_member_bytes`` is refused
before any of it is read.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.decode import decode_frames
from pipeline.shard_tar import MemberTooLarge, MissingMember, read_tar_member

MAX_MOMENT_S = 60.0  # a longer window is no "moment": refused
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_MEMBER_BYTES = 256 * 1024 * 1024  # an mp4 over this is refused (a decode reads it whole)
DECODE_WAIT_S = 30.0  # a preview that cannot start decoding within this is a 503


class PreviewError(ValueError):
    """A preview that cannot be made (unknown video, no shard for it, a bad time window)."""

    def __init__(self, message: str, status: int = 404):
        super().__init__(message)
        self.status = status


class PreviewCache:
    """WebP files in ``folder``, at most ``max_bytes`` in all (counted by this process); the least recently
    used are deleted first. Files already there (an earlier run) are adopted, oldest first out."""

    def __init__(self, folder: str | os.PathLike, max_bytes: int = DEFAULT_CACHE_BYTES):
        if max_bytes < 1:
            raise ValueError(f"preview cache max_bytes must be >= 1, got {max_bytes}")
        self.folder, self.max_bytes = Path(folder), int(max_bytes)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._sizes: collections.OrderedDict[str, int] = collections.OrderedDict()  # name → bytes, LRU first
        self.bytes = self.evicted = 0
        found = sorted(self.folder.glob("*.webp"), key=lambda f: f.stat().st_mtime)
        with self._lock:
            for path in found:
                self._add(path.name, path.stat().st_size)

    def get(self, name: str) -> bytes | None:
        with self._lock:
            if name not in self._sizes:
                return None
            self._sizes.move_to_end(name)
        try:
            return (self.folder / name).read_bytes()
        except FileNotFoundError:  # evicted (or removed by hand) since: a miss
            return None

    def put(self, name: str, data: bytes) -> None:
        """Store ``data`` as ``name`` (atomically: readers see a whole file or none) and evict down to the
        cap; a file bigger than the whole cap is not kept."""
        if len(data) > self.max_bytes:
            return
        target = self.folder / name
        tmp = target.with_name(f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        with self._lock:
            self._add(name, len(data))

    def _add(self, name: str, size: int) -> None:
        self.bytes += size - self._sizes.pop(name, 0)
        self._sizes[name] = size
        while self.bytes > self.max_bytes:
            oldest, freed = self._sizes.popitem(last=False)
            self.bytes -= freed
            self.evicted += 1
            with contextlib.suppress(FileNotFoundError):
                (self.folder / oldest).unlink()

    def status(self) -> dict[str, int]:
        with self._lock:
            return {"files": len(self._sizes), "bytes": self.bytes, "max_bytes": self.max_bytes,
                    "evicted": self.evicted}


class PreviewMaker:
    """``render(source, start_s, end_s)`` → the bytes of an animated WebP of that window, cached."""

    def __init__(self, cache_dir: str | os.PathLike, size: int = 160, frames: int = 10, fps: float = 5.0,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
                 max_decodes: int = 1):
        self.cache = PreviewCache(cache_dir, cache_bytes)
        self.size, self.frames, self.frame_ms = int(size), int(frames), int(1000 / fps)
        self.max_member_bytes = int(max_member_bytes)
        self._decodes = threading.BoundedSemaphore(max(1, int(max_decodes)))
        self._guard = threading.Lock()
        self._key_locks: dict[str, list] = {}  # name → [Lock, holders]; dropped when nobody holds it

    def render(self, source: tuple[str, str], start_s: float, end_s: float) -> bytes:
        if not (np.isfinite(start_s) and np.isfinite(end_s)) or start_s < 0 or end_s <= start_s:
            raise PreviewError(f"preview window start={start_s} end={end_s} is not a time range", 400)
        if end_s - start_s > MAX_MOMENT_S:
            raise PreviewError(f"preview window is {end_s - start_s:.1f} s; the limit is {MAX_MOMENT_S} s",
                               400)
        tar, key = source
        digest = hashlib.sha256(f"{tar}|{key}|{start_s:.3f}|{end_s:.3f}|{self.size}|{self.frames}".encode())
        name = f"{digest.hexdigest()[:32]}.webp"
        cached = self.cache.get(name)
        if cached is not None:
            return cached
        with self._locked(name):
            cached = self.cache.get(name)  # made while this request waited for the window's lock
            if cached is not None:
                return cached
            if not self._decodes.acquire(timeout=DECODE_WAIT_S):
                raise PreviewError("the service is busy making other previews; retry in a moment", 503)
            try:
                data = self._make(tar, key, start_s, end_s)
            finally:
                self._decodes.release()
            self.cache.put(name, data)
            return data

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        with self._guard:
            entry = self._key_locks.setdefault(name, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._guard:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._key_locks[name]

    def _make(self, tar: str, key: str, start_s: float, end_s: float) -> bytes:
        try:
            data = read_tar_member(tar, f"{key}.mp4", max_bytes=self.max_member_bytes)
        except MemberTooLarge as exc:
            raise PreviewError(f"{exc}: previews are made only of videos up to {self.max_member_bytes:,} "
                               "bytes", 413) from None
        except MissingMember as exc:
            raise PreviewError(str(exc)) from None
        step = (end_s - start_s) / self.frames
        times = start_s + step * (np.arange(self.frames) + 0.5)
        frames = decode_frames(data, times, size=self.size)
        images = [Image.fromarray(f) for f in frames]
        buf = io.BytesIO()
        images[0].save(buf, "WEBP", save_all=True, append_images=images[1:], duration=self.frame_ms,
                       loop=0, quality=70, method=2)
        return buf.getvalue()

    def status(self) -> dict[str, int]:
        return self.cache.status()

"""Animated WebP previews of a hit's moment, decoded from the ingested shard's video and cached on disk.

The mp4 is read from its shard tar (any store), frames between ``start_s`` and ``end_s`` are decoded by
seeking (:func:`pipeline.decode.decode_frames`, as every stage decodes) and written as one animated WebP
under ``cache_dir``; later requests for the same moment read the file. One preview is made at a time so
previews never take both cores from searches.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.decode import decode_frames
from pipeline.shard_tar import MissingMember, read_tar_member

MAX_MOMENT_S = 60.0  # a longer window is no "moment": refused


class PreviewError(ValueError):
    """A preview that cannot be made (unknown video, no shard for it, a bad time window)."""

    def __init__(self, message: str, status: int = 404):
        super().__init__(message)
        self.status = status


class PreviewMaker:
    """``path(source, start_s, end_s)`` → a cached animated WebP of that window."""

    def __init__(self, cache_dir: str | os.PathLike, size: int = 160, frames: int = 10, fps: float = 5.0):
        self.cache_dir = Path(cache_dir)
        self.size, self.frames, self.frame_ms = int(size), int(frames), int(1000 / fps)
        self._one_at_a_time = threading.Lock()

    def path(self, source: tuple[str, str], start_s: float, end_s: float) -> Path:
        if not (np.isfinite(start_s) and np.isfinite(end_s)) or start_s < 0 or end_s <= start_s:
            raise PreviewError(f"preview window start={start_s} end={end_s} is not a time range", 400)
        if end_s - start_s > MAX_MOMENT_S:
            raise PreviewError(f"preview window is {end_s - start_s:.1f} s; the limit is {MAX_MOMENT_S} s",
                               400)
        tar, key = source
        digest = hashlib.sha256(f"{tar}|{key}|{start_s:.3f}|{end_s:.3f}|{self.size}|{self.frames}".encode())
        target = self.cache_dir / f"{digest.hexdigest()[:32]}.webp"
        if target.exists():
            return target
        with self._one_at_a_time:
            if not target.exists():
                self._make(tar, key, start_s, end_s, target)
        return target

    def _make(self, tar: str, key: str, start_s: float, end_s: float, target: Path) -> None:
        try:
            data = read_tar_member(tar, f"{key}.mp4")
        except MissingMember as exc:
            raise PreviewError(str(exc)) from None
        step = (end_s - start_s) / self.frames
        times = start_s + step * (np.arange(self.frames) + 0.5)
        frames = decode_frames(data, times, size=self.size)
        images = [Image.fromarray(f) for f in frames]
        buf = io.BytesIO()
        images[0].save(buf, "WEBP", save_all=True, append_images=images[1:], duration=self.frame_ms,
                       loop=0, quality=70, method=2)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, target)  # readers see a whole file or none

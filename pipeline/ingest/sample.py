"""One sample of an ingest: read the source bytes, hash, probe, optionally transcode, build its json."""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from pipeline.ingest.layout import IngestConfig
from pipeline.probe import ProbeError, probe_record, transcode_video
from runtime import storage


def read_source(source: str, max_bytes: int | None) -> bytes:
    """Bytes of ``source`` (any store); ProbeError(missing/unreadable/too_large/bad_uri) on failure.

    One request per input on an object store: a ranged GET of at most ``max_bytes + 1`` bytes (one more
    than allowed tells "too large" apart), instead of a size probe (HEAD), an open (HEAD) and a GET.
    """
    try:
        storage.filesystem(source)
    except (ValueError, ImportError) as exc:
        raise ProbeError("bad_uri", f"cannot open URI {source!r}: {exc}") from exc
    try:
        data = storage.read_bytes(source, limit=None if max_bytes is None else max_bytes + 1)
    except FileNotFoundError as exc:
        raise ProbeError("missing", f"file not found: {source}") from exc
    except (IsADirectoryError, PermissionError, OSError) as exc:
        raise ProbeError("unreadable", f"cannot read {source}: {type(exc).__name__}: {exc}") from exc
    if max_bytes is not None and len(data) > max_bytes:
        raise ProbeError("too_large", f"more than max_bytes={max_bytes} bytes")
    return data


def process_sample(row: dict[str, Any], config: IngestConfig,
                   data: bytes | None = None) -> tuple[bytes, dict[str, Any]]:
    """(mp4 bytes, json metadata) for one input row (its bytes already read, or read here); raises
    ProbeError with the reason class."""
    data = read_source(row["source"], config.max_bytes) if data is None else data
    source_sha = hashlib.sha256(data).hexdigest()
    meta = probe_record(data, max_pixels=config.max_pixels, decode_check=config.decode_check)
    video, transcoded = data, False
    if config.transcode:
        video = transcode_video(
            data, short_side=config.short_side, fps=config.fps, keyframe_interval=config.keyframe_interval
        )
        meta = probe_record(video)
        transcoded = True
    record = {
        "video_id": row["video_id"],
        "key": row["key"],
        "source": row["source"],
        "sha256": hashlib.sha256(video).hexdigest() if transcoded else source_sha,
        "bytes": len(video),
        **meta,
        "captions": list(row.get("captions") or []),
        "split": row.get("split"),
        "transcoded": transcoded,
        "source_sha256": source_sha,
        "source_bytes": len(data),
    }
    for column in ("caption_class", "hard_group"):
        if column in row:
            record[column] = row[column]
    return video, record


def read_ahead(rows: list[dict[str, Any]], config: IngestConfig,
               depth: int) -> Iterator[tuple[dict[str, Any], Future | None]]:
    """Each row with a future of its input bytes, read by ``depth`` threads ahead of the caller, in row
    order (``None``: read it yourself). At most ``depth`` inputs wait in memory beside the one in hand;
    a read error surfaces from ``future.result()``, for that row."""
    if depth <= 0:
        yield from ((row, None) for row in rows)
        return
    with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="ingest-read") as pool:
        queue: collections.deque = collections.deque()
        for row in rows:
            queue.append((row, pool.submit(read_source, row["source"], config.max_bytes)))
            if len(queue) > depth:
                yield queue.popleft()
        while queue:
            yield queue.popleft()

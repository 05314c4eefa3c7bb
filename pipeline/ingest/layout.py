"""What an ingest writes and where: format version, reason classes, Parquet schemas, the shard-shaping config,
shard names and URIs, deterministic JSON, folder listings and the error row.

Every output location is a URI (a local path, ``file://``, ``s3://``, ``gs://``); all reads and writes go
through :mod:`runtime.storage`, which makes each file/object appear complete or not at all."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from pipeline.ingest.segments import SEGMENT_REASONS
from runtime import storage

FORMAT_VERSION = "vidsift-ingest-1"
REASONS = (
    "missing",
    "unreadable",
    "not_a_video",
    "no_video_stream",
    "zero_duration",
    "decode_error",
    "too_large",
    "duplicate_id",
    "bad_uri",
    "invalid_metadata",
    *SEGMENT_REASONS,  # one bad timed caption: the video itself is still ingested
)
CRASH_ENV = "VIDSIFT_INGEST_CRASH_ONCE"  # test hook: "<shard>:<marker file>" -> os._exit mid-shard, once
SHARD_DIGITS = 6
SHARD_FOLDERS = ("shards", "shard_errors")

SAMPLE_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("key", pa.string()),
        ("source", pa.string()),
        ("sha256", pa.string()),
        ("bytes", pa.int64()),
        ("duration", pa.float64()),
        ("fps", pa.float64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("codec", pa.string()),
        ("num_frames", pa.int64()),
        ("num_keyframes", pa.int64()),
        ("captions", pa.list_(pa.string())),
        ("split", pa.string()),
        ("caption_class", pa.string()),
        ("hard_group", pa.string()),
        ("transcoded", pa.bool_()),
        ("source_sha256", pa.string()),
        ("source_bytes", pa.int64()),
        ("shard", pa.int64()),
    ]
)
ERROR_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("video_id", pa.string()),
        ("reason", pa.string()),
        ("message", pa.string()),
        ("input_index", pa.int64()),
        ("shard", pa.int64()),
    ]
)


class IngestIncompleteError(RuntimeError):
    """Some shard tasks died (worker killed, out of memory); rerun the same command to finish the job."""


@dataclass(frozen=True)
class IngestConfig:
    """Everything that changes shard bytes (workers do not, so they are not here)."""

    samples_per_shard: int = 64
    max_shard_bytes: int | None = 1 << 30
    transcode: bool = False
    short_side: int | None = None
    fps: float | None = None
    keyframe_interval: float = 1.0
    max_bytes: int | None = 2 << 30
    max_pixels: int | None = None
    decode_check: bool = False

    def fingerprint(self) -> str:
        """sha256 of the config + format version: a change invalidates every shard."""
        payload = json.dumps({"format": FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


def shard_name(index: int) -> str:
    return f"{index:0{SHARD_DIGITS}d}"


def dumps_json(obj: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, no whitespace, UTF-8)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def shard_uri(output: str | os.PathLike, folder: str, shard: int, suffix: str) -> str:
    """``OUTPUT/<folder>/NNNNNN<suffix>``, e.g. ``s3://b/ingest/shards/000003.tar``."""
    return storage.join(output, folder, f"{shard_name(shard)}{suffix}")


def folder_sizes(uri: str | os.PathLike) -> dict[str, int]:
    """``{file name: size}`` of the files directly under ``uri`` (one listing; ``{}`` when absent)."""
    fs, path = storage.filesystem(uri)
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return {storage.name(e["name"]): int(e.get("size") or 0) for e in entries if e["type"] == "file"}


def is_temp_name(name: str) -> bool:
    """A temp file a killed writer left behind (local stores only: objects are never half written)."""
    return ".tmp-" in name or name.endswith(".tmp")


def error_row(row: dict[str, Any], reason: str, message: str, shard: int = -1) -> dict[str, Any]:
    assert reason in REASONS, reason
    return {
        "source": row.get("source", ""),
        "video_id": row.get("video_id"),
        "reason": reason,
        "message": str(message)[:2000],
        "input_index": row.get("input_index"),
        "shard": shard,
    }

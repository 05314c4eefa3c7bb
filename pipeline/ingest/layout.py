"""What an ingest writes and how: format version, reason classes, Parquet schemas, the shard-shaping config,
shard names, deterministic JSON, atomic writes and the error row."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

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
)
CRASH_ENV = "VIDSIFT_INGEST_CRASH_ONCE"  # test hook: "<shard>:<marker file>" -> os._exit mid-shard, once
SHARD_DIGITS = 6

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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_parquet(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


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

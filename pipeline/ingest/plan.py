"""Planning an ingest on the driver, deterministically: input rows -> candidates with keys + driver-level
error rows -> shards cut by count and declared bytes -> one fingerprint per shard."""

from __future__ import annotations

import hashlib
from typing import Any

from pipeline.ingest.layout import dumps_json, error_row
from pipeline.keys import assign_keys
from runtime.errors import ErrorPolicy, InvalidMetadata, check_policy, should_record


class DuplicateId(InvalidMetadata, ValueError):
    """Two input rows carry the same ``video_id`` (reason ``duplicate_id`` in the error table)."""


def plan_inputs(
    rows: list[dict[str, Any]], on_error: ErrorPolicy = "record"
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split input rows into (candidates sorted by id with keys assigned, driver-level error rows).

    Rows flagged by :func:`pipeline.inputs.read_inputs` (bad URI, malformed row) are errors; of several rows
    with the same id the first in input order is kept, the others are ``duplicate_id`` errors
    (:class:`DuplicateId` raises instead under ``on_error="raise"``).
    """
    check_policy(on_error)
    errors, candidates, seen = [], [], {}
    for row in rows:
        if "error" in row:
            errors.append(error_row(row, *row["error"]))
            continue
        first = seen.get(row["video_id"])
        if first is not None:
            message = (
                f"video_id {row['video_id']!r} already used by input "
                f"row {first['input_index']} ({first['source']})"
            )
            duplicate = DuplicateId(f"input row {row['input_index']}: {message}")
            if not should_record(duplicate, on_error):
                raise duplicate
            errors.append(error_row(row, "duplicate_id", message))
            continue
        seen[row["video_id"]] = row
        candidates.append(row)
    keys = assign_keys([r["video_id"] for r in candidates])
    candidates = sorted(candidates, key=lambda r: r["video_id"])
    for row in candidates:
        row["key"] = keys[row["video_id"]]
    return candidates, errors


def plan_shards(
    rows: list[dict[str, Any]], samples_per_shard: int, max_shard_bytes: int | None = None
) -> list[list[dict[str, Any]]]:
    """Cut sorted rows into shards of <= ``samples_per_shard`` rows and <= ``max_shard_bytes`` bytes."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    shards: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    current_bytes = 0
    for row in rows:
        size = row.get("declared_bytes") or 0
        full = len(current) >= samples_per_shard
        too_big = max_shard_bytes is not None and current and current_bytes + size > max_shard_bytes
        if current and (full or too_big):
            shards.append(current)
            current, current_bytes = [], 0
        current.append(row)
        current_bytes += size
    if current:
        shards.append(current)
    return shards


def shard_fingerprint(config_fingerprint: str, rows: list[dict[str, Any]]) -> str:
    """sha256 over the config and this shard's input rows (ids, keys, sources, captions, passthrough)."""
    fields = ("video_id", "key", "source", "captions", "split", "caption_class", "hard_group", "input_index")
    # segments count only where the manifest had the column: older fingerprints stay valid
    payload = dumps_json({"config": config_fingerprint, "rows": [
        {**{f: r.get(f) for f in fields}, **({"segments": r["segments"]} if "segments" in r else {})}
        for r in rows
    ]})
    return hashlib.sha256(payload).hexdigest()

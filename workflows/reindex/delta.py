"""What changed in the source since the last successful run, and the ingest manifest of that delta."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from runtime import storage


@dataclass
class Delta:
    """What changed in the source since the last successful run."""

    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    unavailable: list[str] = field(default_factory=list)  # known videos whose source cannot be read now

    @property
    def to_ingest(self) -> list[str]:
        return sorted(self.new + self.changed)

    def counts(self) -> dict[str, int]:
        return {k: len(getattr(self, k)) for k in ("new", "changed", "deleted", "unchanged", "unavailable")}


def compute_delta(
    videos: dict[str, dict[str, Any]],
    problems: list[dict[str, Any]],
    state: dict[str, Any],
    retry_failed: bool = False,
) -> Delta:
    """New / changed (different content hash) / deleted videos vs the state of the last successful run.

    Videos that failed before (ingest or embed error) are only retried when their content changed or
    with ``retry_failed``. Known videos whose source is listed but unreadable now keep their indexed rows."""
    known = {vid: rec["source_sha256"] for vid, rec in state.get("videos", {}).items()}
    failed = {vid: rec["source_sha256"] for vid, rec in state.get("failed", {}).items()}
    problem_ids = {p["video_id"] for p in problems}
    delta = Delta()
    for vid in sorted(videos):
        sha = videos[vid]["source_sha256"]
        if vid in known:
            (delta.unchanged if known[vid] == sha else delta.changed).append(vid)
        elif vid in failed:
            if failed[vid] != sha:
                delta.changed.append(vid)
            elif retry_failed:
                delta.new.append(vid)
        else:
            delta.new.append(vid)
    for vid in sorted(set(known) | set(failed)):
        if vid in videos:
            continue
        if vid in problem_ids and vid in known:
            delta.unavailable.append(vid)
        else:
            delta.deleted.append(vid)
    return delta


def delta_manifest(videos: dict[str, dict[str, Any]], ids: list[str], path: str) -> str:
    """Write the ingest manifest of the delta (absolute sources) to ``path`` (any store); returns its
    content fingerprint."""
    columns = ["video_id", "path", "captions", "split", "caption_class", "hard_group"]
    rows = [
        {
            "video_id": vid,
            "path": videos[vid]["source"],
            "captions": list(videos[vid].get("captions") or []),
            **{c: videos[vid].get(c) for c in columns[3:]},
        }
        for vid in ids
    ]
    present = [c for c in columns[3:] if any(c in videos[v] for v in ids)]
    table = pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [
                ("video_id", pa.string()),
                ("path", pa.string()),
                ("captions", pa.list_(pa.string())),
                *[(c, pa.string()) for c in present],
            ]
        ),
    )
    fingerprint = hashlib.sha256(
        json.dumps(
            [[r["video_id"], r["path"], videos[r["video_id"]]["source_sha256"]] for r in rows]
        ).encode()
    ).hexdigest()
    storage.write_parquet(table, path)
    return fingerprint

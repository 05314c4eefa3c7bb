"""Validation of a scratch index version against the live rows before it may be published."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from index import VideoIndex, store
from runtime import storage
from workflows.reindex.config import ReindexError


def index_contents(root: Path) -> dict[str, Any]:
    """(ids, video ids, count, recall) of the CURRENT version of ``root`` for validation."""
    vdir, meta, _indexes, ids = store.load_version(root)
    return {
        "version": storage.name(vdir),
        "meta": meta,
        "ids": ids.column("id").to_numpy(),
        "video_ids": set(ids.column("video_id").to_pylist()),
    }


def validate_index(root: Path, live: pa.Table, min_recall: float, known_queries: int = 5) -> dict[str, Any]:
    """Check the CURRENT version of ``root`` against the live rows; raise :class:`ReindexError` if wrong.

    Counts and the exact id set equal the live set, recall on the index's probe set is >= ``min_recall``,
    and each of up to ``known_queries`` live videos' own video embedding finds that video at rank 1."""
    got = index_contents(root)
    problems = []
    want_ids = np.sort(live.column("id").to_numpy())
    have_ids = np.sort(got["ids"])
    if len(have_ids) != len(want_ids) or not np.array_equal(have_ids, want_ids):
        missing = np.setdiff1d(want_ids, have_ids)
        extra = np.setdiff1d(have_ids, want_ids)
        problems.append(
            f"index holds {len(have_ids)} rows, live set has {len(want_ids)} "
            f"({len(missing)} missing, {len(extra)} unexpected)"
        )
    live_videos = set(live.column("video_id").to_pylist())
    if got["video_ids"] != live_videos:
        problems.append(
            f"video sets differ: {len(live_videos - got['video_ids'])} missing, "
            f"{len(got['video_ids'] - live_videos)} unexpected"
        )
    recall = float(got["meta"].get("recall", float("nan")))
    if not recall >= min_recall:
        problems.append(
            f"recall@{got['meta'].get('recall_k')} on the probe set is {recall:.4f} < {min_recall}"
        )
    video_rows = live.filter(pc.equal(live.column("clip_index"), -1)).sort_by("video_id")
    n = video_rows.num_rows
    picks = sorted({int(i) for i in np.linspace(0, n - 1, num=min(known_queries, n))}) if n else []
    checked = []
    if picks:
        vx = VideoIndex.open(root)
        vectors = np.stack([np.asarray(video_rows.column("embedding")[i].as_py(), np.float32) for i in picks])
        results = vx.search(vectors, k=5)
        for i, hits in zip(picks, results):
            vid = video_rows.column("video_id")[i].as_py()
            top = hits[0].score if hits else float("-inf")
            # Exact duplicates (same content under two ids) tie at the top: any tied rank-1 hit counts.
            ok = any(h.video_id == vid and h.score >= top - 1e-4 for h in hits)
            checked.append({"video_id": vid, "ok": ok, "top": hits[0].video_id if hits else None})
            if not ok:
                problems.append(
                    f"known query for {vid!r} returned {hits[0].video_id if hits else None!r} at rank 1"
                )
    if problems:
        raise ReindexError(f"validation of index version {got['version']} failed: " + "; ".join(problems))
    return {
        "version": got["version"],
        "rows": int(len(have_ids)),
        "videos": len(live_videos),
        "recall": recall,
        "known_queries": checked,
    }

"""The incremental plan: which shards, and which keys of them, still need embedding."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.embedding.layout import VIDEO_ROW, list_parts, part_uri, shard_label
from pipeline.shard_tar import tar_member_names
from runtime import storage


@dataclasses.dataclass
class ShardWork:
    """One input shard: where it is, which keys it holds, and which of them still need embedding."""

    path: str
    label: str
    keys: list[str]
    todo_keys: list[str]


def shard_index_uri(tar_path: str | os.PathLike) -> str:
    """Ingest's per-shard Parquet index beside a shard tar (``NNNNNN.tar`` → ``NNNNNN.parquet``)."""
    text = os.fspath(tar_path)
    return (text[: -len(".tar")] if text.endswith(".tar") else text) + ".parquet"


def shard_keys(tar_path: str | os.PathLike) -> list[str]:
    """Keys of a shard, from ingest's per-shard Parquet index when present, else from the tar itself."""
    index = shard_index_uri(tar_path)
    if storage.exists(index):
        return [str(k) for k in storage.read_parquet(index, columns=["key"]).column("key").to_pylist()]
    keys: list[str] = []
    for name in tar_member_names(tar_path):
        stem, _, ext = name.partition(".")
        if ext == "mp4":
            keys.append(stem)
    return keys


def shard_durations(tar_path: str | os.PathLike, keys: Sequence[str]) -> float | None:
    """Seconds of video of ``keys`` in a shard, from ingest's per-shard index (None when it has none)."""
    index = shard_index_uri(tar_path)
    if not storage.exists(index):
        return None
    table = storage.read_parquet(index, columns=["key", "duration"]).to_pylist()
    wanted = set(keys)
    return float(sum(r["duration"] or 0.0 for r in table if r["key"] in wanted))


def existing_video_ids(partition: str | os.PathLike) -> set[tuple[str, str]]:
    """(video_id, sha256) pairs already embedded in a model partition (video-level rows)."""
    done: set[tuple[str, str]] = set()
    for part in list_parts(partition):
        table = storage.read_parquet(part, columns=["video_id", "sha256", "clip_index"])
        columns = (table.column(c).to_pylist() for c in ("video_id", "sha256", "clip_index"))
        for vid, sha, clip in zip(*columns):
            if clip == VIDEO_ROW:
                done.add((vid, sha))
    return done


def plan_shards(tar_paths: Sequence[str], partition: str | os.PathLike) -> list[ShardWork]:
    """Which shards still need work: a shard with a finished part file is done; in a new shard, videos
    already embedded from another shard (same video id and content hash) are skipped."""
    labels = [shard_label(p) for p in tar_paths]
    if len(set(labels)) != len(labels):
        raise ValueError("two input shards map to the same label; give shard dirs with distinct names")
    finished = {storage.name(u) for u in list_parts(partition)}  # one listing, not a HEAD per shard
    done_ids = existing_video_ids(partition) if finished else set()
    work = []
    for path, label in zip(tar_paths, labels):
        if storage.name(part_uri(partition, label)) in finished:
            continue
        keys = shard_keys(path)
        todo = keys
        index = shard_index_uri(path)
        if done_ids and storage.exists(index):
            meta = storage.read_parquet(index, columns=["key", "video_id", "sha256"]).to_pylist()
            todo = [m["key"] for m in meta if (m["video_id"], m["sha256"]) not in done_ids]
        work.append(ShardWork(path=str(path), label=label, keys=keys, todo_keys=list(todo)))
    return work


def add_shard_and_skip_done(batch: dict[str, Any], labels: dict[str, str],
                            todo: set[tuple[str, str]]) -> dict[str, Any]:
    """Adds the shard label (from the tar path, as the reader reports it) and drops samples that are
    already embedded: the embed pipeline's first map, a light Ray Data task (this module imports no torch)."""
    shards = [labels[str(p)] for p in batch["path"]]
    keys = batch["__key__"] if "__key__" in batch else batch["key"]
    keep = np.array([(s, str(k)) in todo for s, k in zip(shards, keys)], dtype=bool)
    out = {("key" if k == "__key__" else k): np.asarray(v, dtype=object)[keep]
           for k, v in batch.items() if k != "path"}
    out["shard"] = np.array(shards, dtype=object)[keep]
    return out

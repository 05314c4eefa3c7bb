"""Sharded indexes: N shards (rows split by crc32(video_id) % N) built in parallel as Ray tasks, searched
together and merged by score (see :class:`index.query.VideoIndex`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import ray

from index import store
from index.embeddings import EmbeddingSource
from index.factory import parse_memory
from index.part import DEFAULT_MEMORY, build_part
from index.rows import ParquetColumns
from runtime import storage
from runtime.ray_connect import connect_ray
from runtime.storage import storage_env

# versions/<version>/_parts/: each shard task's ids table, read by the driver a column at a time
# (index.rows.ColumnParts) and removed before the version is published.
PARTS_DIR = "_parts"


def _build_shard_task(
    source: EmbeddingSource, shard: tuple[int, int], target: tuple[str, str], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Build one shard; its ids go to ``_parts/`` (the part's ``"ids"`` is that file), not back through Ray:
    the driver then reads one column of every shard at a time, never every shard's whole table."""
    part = build_part(source, shard, write_to=target, **kwargs)
    uri = storage.join(parts_uri(*target), f"ids-{shard[0]:05d}.parquet")
    storage.write_parquet(part["ids"], uri)
    part["ids"] = ParquetColumns(uri, part["ids"].schema)
    return part


def parts_uri(root: str, version: str) -> str:
    """Where a sharded build's tasks put their ids tables (removed before the version is published)."""
    return storage.join(store.version_uri(root, version), PARTS_DIR)


def build_parts_with_ray(
    source: EmbeddingSource, num_shards: int, target: tuple[str, str], num_cpus: float = 1, **kwargs: Any
) -> list[dict[str, Any]]:
    """Build ``num_shards`` shards as parallel Ray tasks; each puts its ``shard-NNNNN.faiss`` under
    ``target`` = ``(index root URI, version)`` itself and returns its probes / info / file record, and its
    ids as a file under ``_parts/`` (:func:`parts_uri`: the caller removes it once the ids are staged).
    The tasks get this process's store configuration (:func:`runtime.storage.storage_env`).

    Ray comes from :func:`runtime.ray_connect.connect_ray`: the running Ray, the cluster of ``RAY_ADDRESS``
    (``ray job submit`` sets it), or a private local Ray that is shut down again afterwards."""
    started_here, _ = connect_ray()
    try:
        kwargs = dict(kwargs)
        # Each shard gets its share of the memory budget.
        budget = parse_memory(kwargs.get("memory_budget", DEFAULT_MEMORY))
        kwargs["memory_budget"] = max(1, budget // num_shards)
        task = ray.remote(num_cpus=num_cpus)(_build_shard_task).options(
            runtime_env={"env_vars": storage_env()}
        )
        refs = [task.remote(source, (i, num_shards), target, kwargs) for i in range(num_shards)]
        parts = ray.get(refs)
    finally:
        if started_here:
            ray.shutdown()
    return sorted(parts, key=lambda p: p["info"]["shard"])


def merge_shard_results(
    scores: list[np.ndarray], ids: list[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard ``[Q, k]`` (scores, ids) into the global top ``k`` by score (ids -1 = empty)."""
    d = np.concatenate(scores, axis=1)
    i = np.concatenate(ids, axis=1)
    d = np.where(i < 0, -np.inf, d)
    order = np.argsort(-d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, axis=1), np.take_along_axis(i, order, axis=1)

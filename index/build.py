"""Build, extend and shrink versioned FAISS indexes from embeddings Parquet, streamed in batches.

Build = pass 1 (sample training + held-out probe vectors) → train → pass 2 (add in chunks while computing
exact top-k of the probes) → tune nprobe/efSearch → publish. Add / delete / upsert copy the current
version, change it without retraining and publish a new version.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from index import store
from index.embeddings import (
    IDS_SCHEMA,
    EmbeddingSource,
    errors_table,
    iter_batches,
    resolve_embeddings,
    shard_of,
)
from index.factory import (
    METRIC,
    choose_factory,
    make_index,
    parse_memory,
    supports_remove,
    to_cpu,
    to_gpu_if_available,
    training_size,
)
from index.tuning import (
    ExactTopK,
    apply_search_params,
    measure_recall,
    merge_topk,
    tune,
)

DEFAULT_MEMORY = "4GB"
DEFAULT_RECALL = 0.95
DEFAULT_K = 10
PROBE_DEPTH = 50  # exact neighbours kept per probe, so deletes still leave >= k of them
DEFAULT_PROBES = 256
DEFAULT_GROWTH_FACTOR = 2.0


class Progress:
    """Prints rows/s and ETA at most every ``every`` seconds, and a final line."""

    def __init__(self, label: str, total: int, enabled: bool = True, every: float = 5.0):
        self.label, self.total, self.enabled, self.every = label, max(total, 1), enabled, every
        self.start = self.last = time.perf_counter()
        self.done = 0

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            print(
                f"[index] {self.label}: {self.done}/{self.total} rows, {rate:,.0f} rows/s, ETA {eta:.0f}s",
                file=sys.stderr,
                flush=True,
            )

    def finish(self) -> float:
        elapsed = time.perf_counter() - self.start
        if self.enabled:
            print(f"[index] {self.label}: {self.done} rows in {elapsed:.1f}s", file=sys.stderr, flush=True)
        return elapsed


def build_part(
    source: EmbeddingSource,
    shard: tuple[int, int] = (0, 1),
    factory: str | None = None,
    memory_budget: int | str = DEFAULT_MEMORY,
    recall_target: float = DEFAULT_RECALL,
    k: int = DEFAULT_K,
    num_probes: int = DEFAULT_PROBES,
    batch_size: int = 65536,
    seed: int = 0,
    progress: bool = True,
    write_to: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Build the index of one shard of ``source`` (no publishing).

    Returns ``{"index", "ids" (pa.Table), "errors" (list), "probe" (dict of arrays), "info" (dict)}``;
    with ``write_to`` (a staging dir) the index is written there and ``"index"`` is None.
    """
    t0 = time.perf_counter()
    shard_index, num_shards = shard
    budget = parse_memory(memory_budget)
    n_est = max(1, int(np.ceil(source.num_rows / num_shards)))
    factory = factory or choose_factory(n_est, source.dim, budget, recall_target)
    index = make_index(factory, source.dim)
    n_train = training_size(index, n_est)
    rng = np.random.default_rng(seed + shard_index)
    # Sample positions over the whole stream; a shard keeps ~1/num_shards of them, so oversample.
    want = min(source.num_rows, (n_train + num_probes) * num_shards)
    sampled = np.sort(rng.choice(source.num_rows, size=want, replace=False)) if want else np.zeros(0, int)
    train_vecs, probe_vecs = _sample(source, shard, sampled, n_train, num_probes, rng, batch_size)
    t_train = time.perf_counter()
    on_gpu = False
    if not index.is_trained:
        if len(train_vecs) == 0:
            raise ValueError(f"shard {shard_index}: no valid vectors to train {factory!r} on")
        index, on_gpu = to_gpu_if_available(index)
        index.train(train_vecs)
    else:
        index, on_gpu = to_gpu_if_available(index)
    train_s = time.perf_counter() - t_train
    exact = ExactTopK(probe_vecs, PROBE_DEPTH)
    seen: set[int] = set()
    metas, errors = [], []
    bar = Progress(f"add shard {shard_index}/{num_shards}", n_est, enabled=progress)
    for batch in iter_batches(source, batch_size=batch_size, shard=shard, seen_ids=seen):
        errors.extend(batch.errors)
        if len(batch.ids):
            index.add_with_ids(batch.vectors, batch.ids)
            exact.add(batch.vectors, batch.ids)
            metas.append(batch.meta)
        bar.update(len(batch.ids) + len(batch.errors))
    add_s = bar.finish()
    index = to_cpu(index, on_gpu)
    if index.ntotal == 0:
        raise ValueError(
            f"shard {shard_index}: no valid embeddings in {source.root} ({len(errors)} rows rejected)"
        )
    gt_d, gt_i = exact.result()
    params, recall, met, curve = tune(index, probe_vecs, gt_i, k, recall_target)
    if progress:
        print(
            f"[index] shard {shard_index}: {factory} n={index.ntotal} params={params} "
            f"recall@{k}={recall:.4f} (target {recall_target}, met={met})",
            file=sys.stderr,
            flush=True,
        )
    ids_table = pa.concat_tables(metas) if metas else IDS_SCHEMA.empty_table()
    info = {
        "file": store.shard_file(shard_index, num_shards),
        "shard": shard_index,
        "factory": factory,
        "count": int(index.ntotal),
        "trained_on_count": int(index.ntotal),
        "training_size": int(len(train_vecs)),
        "search_params": params,
        "recall": recall,
        "recall_target_met": bool(met),
        "tuning_curve": curve,
        "train_s": round(train_s, 3),
        "add_s": round(add_s, 3),
        "build_s": round(time.perf_counter() - t0, 3),
        "gpu": bool(on_gpu),
        "num_probes": int(len(probe_vecs)),
        "errors": len(errors),
    }
    probe = {"queries": probe_vecs, "gt_d": gt_d.astype(np.float32), "gt_i": gt_i.astype(np.int64)}
    if write_to is not None:
        faiss.write_index(index, str(Path(write_to) / info["file"]))
        index = None
    return {"index": index, "ids": ids_table, "errors": errors, "probe": probe, "info": info}


def _sample(
    source: EmbeddingSource,
    shard: tuple[int, int],
    positions: np.ndarray,
    n_train: int,
    num_probes: int,
    rng: np.random.Generator,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Pass 1: vectors at ``positions`` (valid rows of this shard), split into train / held-out probes."""
    if len(positions) == 0:
        return np.zeros((0, source.dim), np.float32), np.zeros((0, source.dim), np.float32)
    picked = []
    for batch in iter_batches(source, batch_size=batch_size, shard=shard):
        sel = np.isin(batch.positions, positions, assume_unique=True)
        if sel.any():
            picked.append(batch.vectors[sel])
    vecs = np.concatenate(picked) if picked else np.zeros((0, source.dim), np.float32)
    vecs = vecs[rng.permutation(len(vecs))]
    probes = vecs[:num_probes]
    if len(vecs) >= n_train + num_probes:
        train = vecs[num_probes : num_probes + n_train]
    else:  # tiny data: the probes may also be training vectors
        train = vecs[len(vecs) - min(n_train, len(vecs)) :] if n_train else vecs[:0]
    return np.ascontiguousarray(train), np.ascontiguousarray(probes)


def _combine_meta(
    source: EmbeddingSource,
    parts: list[dict[str, Any]],
    factory_override: str | None,
    recall_target: float,
    k: int,
    memory_budget: int | str,
    elapsed: float,
) -> dict[str, Any]:
    shards = [p["info"] for p in parts]
    return {
        "factory": shards[0]["factory"] if len({s["factory"] for s in shards}) == 1 else "mixed",
        "factory_override": factory_override,
        "metric": METRIC,
        "dim": source.dim,
        "model_id": source.model.get("model_id"),
        "model_name": source.model.get("model_name"),
        "pretrained": source.model.get("pretrained"),
        "count": sum(s["count"] for s in shards),
        "trained_on_count": sum(s["trained_on_count"] for s in shards),
        "training_size": sum(s["training_size"] for s in shards),
        "search_params": shards[0]["search_params"],
        "recall": min(s["recall"] for s in shards),
        "recall_k": k,
        "recall_target": recall_target,
        "memory_budget_bytes": parse_memory(memory_budget),
        "build_time_s": round(elapsed, 3),
        "sources": list(source.files),
        "num_shards": len(shards),
        "shards": shards,
        "errors": sum(s["errors"] for s in shards),
        "created_unix": time.time(),
        "operation": "build",
    }


def build_index(
    embeddings: str | os.PathLike,
    output: str | os.PathLike,
    factory: str | None = None,
    memory_budget: int | str = DEFAULT_MEMORY,
    recall_target: float = DEFAULT_RECALL,
    k: int = DEFAULT_K,
    shards: int = 1,
    num_probes: int = DEFAULT_PROBES,
    batch_size: int = 65536,
    keep: int = 3,
    version: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Full (re)build of ``output`` from ``embeddings``; publishes a new version and returns its index.json.

    ``shards > 1`` builds the shards in parallel as Ray tasks (see :mod:`index.sharded`).
    """
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    t0 = time.perf_counter()
    source = resolve_embeddings(embeddings)
    kwargs = dict(
        factory=factory,
        memory_budget=memory_budget,
        recall_target=recall_target,
        k=k,
        num_probes=num_probes,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    output = Path(output)
    (output / store.VERSIONS_DIR).mkdir(parents=True, exist_ok=True)
    stage = store.staging_dir(output)
    try:
        if shards == 1:
            parts = [build_part(source, (0, 1), **kwargs)]
        else:
            from index.sharded import build_parts_with_ray

            parts = build_parts_with_ray(source, shards, stage=stage, **kwargs)
        meta = _combine_meta(
            source, parts, factory, recall_target, k, memory_budget, time.perf_counter() - t0
        )
        ids = pa.concat_tables([p["ids"] for p in parts])
        probe = _stack_probes([p["probe"] for p in parts])
        errors = errors_table([e for p in parts for e in p["errors"]])
        store.write_version_files(stage, [p["index"] for p in parts], ids, meta, probe=probe, errors=errors)
        meta["version"] = store.publish(output, stage, version=version, keep=keep)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if progress:
        print(
            f"[index] published {output}/versions/{meta['version']}: {meta['count']} vectors, "
            f"{meta['factory']}, recall@{k}={meta['recall']:.4f}, {meta['build_time_s']:.1f}s",
            file=sys.stderr,
            flush=True,
        )
    return meta


def _stack_probes(probes: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One probe file for all shards: a ``shard`` array says which shard each probe belongs to."""
    out = {key: np.concatenate([p[key] for p in probes]) for key in ("queries", "gt_d", "gt_i")}
    out["shard"] = np.concatenate([np.full(len(p["queries"]), i, np.int32) for i, p in enumerate(probes)])
    return out


def _open_writable(root: str | os.PathLike):
    vdir, meta, indexes, ids = store.load_version(root, mmap=False)
    probe = store.read_probe(vdir)
    for info, ix in zip(meta["shards"], indexes):
        apply_search_params(ix, info["search_params"])
    return vdir, meta, indexes, ids, probe


def _remove_ids(index: faiss.Index, factory: str, remove: np.ndarray) -> faiss.Index:
    """Remove external ids; structures without ``remove_ids`` (HNSW) are rebuilt from their own vectors."""
    remove = np.asarray(remove, dtype=np.int64)
    if len(remove) == 0:
        return index
    if supports_remove(index):
        index.remove_ids(remove)
        return index
    external = faiss.vector_to_array(index.id_map).astype(np.int64)
    keep = ~np.isin(external, remove)
    vectors = index.index.reconstruct_n(0, index.ntotal)[keep] if index.ntotal else None
    rebuilt = make_index(factory, index.d)
    if vectors is not None and len(vectors):
        rebuilt.add_with_ids(np.ascontiguousarray(vectors), external[keep])
    return rebuilt


def _video_mask(ids: pa.Table, video_ids: set[str]) -> np.ndarray:
    """Rows of ``ids`` whose video_id is in ``video_ids`` (hash lookup: object-array isin is slow)."""
    mask = pc.is_in(ids.column("video_id"), value_set=pa.array(sorted(video_ids), pa.string()))
    return np.asarray(mask.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)


def _drop_from_probe(probe: dict[str, np.ndarray] | None, removed: np.ndarray) -> None:
    if probe is None or len(removed) == 0:
        return
    gone = np.isin(probe["gt_i"], removed)
    probe["gt_i"] = np.where(gone, -1, probe["gt_i"])
    probe["gt_d"] = np.where(gone, -np.inf, probe["gt_d"]).astype(np.float32)
    order = np.argsort(-probe["gt_d"], axis=1, kind="stable")
    probe["gt_i"] = np.take_along_axis(probe["gt_i"], order, axis=1)
    probe["gt_d"] = np.take_along_axis(probe["gt_d"], order, axis=1)


def _remeasure(meta: dict[str, Any], indexes: list[faiss.Index], probe: dict[str, np.ndarray] | None) -> None:
    """Recall of each shard on its stored probes against their (maintained) exact neighbours."""
    if probe is None:
        return
    k = int(meta.get("recall_k", DEFAULT_K))
    for i, (info, ix) in enumerate(zip(meta["shards"], indexes)):
        sel = probe["shard"] == i
        info["recall"] = (
            measure_recall(ix, probe["queries"][sel], probe["gt_i"][sel], k) if sel.any() else float("nan")
        )
        info["count"] = int(ix.ntotal)
    meta["count"] = sum(int(ix.ntotal) for ix in indexes)
    meta["recall"] = min(s["recall"] for s in meta["shards"])


def _new_version_meta(meta: dict[str, Any], operation: str, parent: str) -> dict[str, Any]:
    new = dict(meta)
    new.pop("version", None)
    new["shards"] = [dict(s) for s in meta["shards"]]
    new.update(operation=operation, parent_version=parent, created_unix=time.time())
    return new


def add_embeddings(
    root: str | os.PathLike,
    embeddings: str | os.PathLike,
    batch_size: int = 65536,
    keep: int = 3,
    upsert: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Add new embeddings to the CURRENT version without retraining; publish the result as a new version.

    With ``upsert`` (default) every video already in the index that appears in ``embeddings`` first
    loses its old rows (re-embedded videos replace their vectors). Ids already present otherwise are
    rejected as ``duplicate_id`` error records (``errors.parquet`` of the new version).
    """
    t0 = time.perf_counter()
    vdir, meta, indexes, ids, probe = _open_writable(root)
    source = resolve_embeddings(embeddings)
    if source.dim != int(meta["dim"]):
        raise ValueError(
            f"embeddings {str(embeddings)!r} have dim {source.dim}, index {str(root)!r} has dim {meta['dim']}"
        )
    if meta.get("model_id") and source.model_id and source.model_id != meta["model_id"]:
        raise ValueError(
            f"embeddings {str(embeddings)!r} come from model {source.model_id!r}; index "
            f"{str(root)!r} holds {meta['model_id']!r} vectors — rebuild instead"
        )
    if not source.model_id and meta.get("model_id"):
        source.model["model_id"] = meta["model_id"]  # rows are still checked against the index's model
    num_shards = len(indexes)
    new_videos: set[str] = set()
    for batch in iter_batches(source, batch_size=batch_size, columns_only_meta=True):
        new_videos.update(batch.meta.column("video_id").to_pylist())
    old_ids = ids.column("id").to_numpy()
    replaced = _video_mask(ids, new_videos) if upsert and new_videos else np.zeros(len(ids), bool)
    removed_ids = old_ids[replaced]
    for i in range(num_shards):
        shard_rm = removed_ids[ids.column("shard").to_numpy()[replaced] == i]
        indexes[i] = _remove_ids(indexes[i], meta["shards"][i]["factory"], shard_rm)
        apply_search_params(indexes[i], meta["shards"][i]["search_params"])
    _drop_from_probe(probe, removed_ids)
    kept = ids.filter(pa.array(~replaced))
    seen = set(kept.column("id").to_pylist())
    exact = ExactTopK(probe["queries"], probe["gt_i"].shape[1]) if probe is not None else None
    metas, errors, added = [kept], [], 0
    bar = Progress("add", source.num_rows, enabled=progress)
    for batch in iter_batches(source, batch_size=batch_size, seen_ids=seen):
        errors.extend(batch.errors)
        if len(batch.ids):
            shards = shard_of(np.asarray(batch.meta.column("video_id").to_pylist(), dtype=object), num_shards)
            for i in range(num_shards):
                sel = shards == i
                if sel.any():
                    indexes[i].add_with_ids(batch.vectors[sel], batch.ids[sel])
            if exact is not None:
                exact.add(batch.vectors, batch.ids)
            meta_cols = batch.meta.set_column(
                batch.meta.schema.get_field_index("shard"), "shard", pa.array(shards, pa.int32())
            )
            metas.append(meta_cols)
            added += len(batch.ids)
        bar.update(len(batch.ids) + len(batch.errors))
    bar.finish()
    if probe is not None and exact is not None:
        # New vectors can only enter a probe's exact top list of its own shard; merge per shard.
        new_d, new_i = exact.result()
        new_shard = _shard_of_ids(new_i, metas[1:], num_shards)
        same = new_shard == probe["shard"][:, None]
        new_d = np.where(same, new_d, -np.inf).astype(np.float32)
        new_i = np.where(same, new_i, -1)
        probe["gt_d"], probe["gt_i"] = merge_topk(
            probe["gt_d"], probe["gt_i"], new_d, new_i, probe["gt_i"].shape[1]
        )
    new_meta = _new_version_meta(meta, "add", vdir.name)
    _remeasure(new_meta, indexes, probe)
    new_meta["sources"] = list(meta.get("sources", [])) + list(source.files)
    new_meta["last_operation"] = {
        "added": added,
        "replaced": int(replaced.sum()),
        "errors": len(errors),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    ids_table = pa.concat_tables(metas)
    return _publish_version(root, indexes, ids_table, new_meta, probe, errors, keep)


def _shard_of_ids(id_matrix: np.ndarray, metas: list[pa.Table], num_shards: int) -> np.ndarray:
    if num_shards == 1 or not metas:
        return np.zeros_like(id_matrix, dtype=np.int32)
    table = pa.concat_tables(metas)
    order = np.argsort(table.column("id").to_numpy())
    sorted_ids = table.column("id").to_numpy()[order]
    sorted_shard = table.column("shard").to_numpy()[order]
    pos = np.clip(np.searchsorted(sorted_ids, id_matrix), 0, len(sorted_ids) - 1)
    return np.where(sorted_ids[pos] == id_matrix, sorted_shard[pos], -1)


def _publish_version(root, indexes, ids_table, meta, probe, errors, keep) -> dict[str, Any]:
    stage = store.staging_dir(root)
    try:
        store.write_version_files(stage, indexes, ids_table, meta, probe=probe, errors=errors_table(errors))
        meta["version"] = store.publish(root, stage, keep=keep)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return meta


def delete_videos(root: str | os.PathLike, video_ids: list[str], keep: int = 3) -> dict[str, Any]:
    """Remove every row of ``video_ids`` (``remove_ids``), publish a new version.

    The summary's ``last_operation.not_found`` lists requested videos the index did not hold.
    """
    t0 = time.perf_counter()
    if not video_ids:
        raise ValueError("delete needs at least one video id")
    vdir, meta, indexes, ids, probe = _open_writable(root)
    hit = _video_mask(ids, set(video_ids))
    removed = ids.column("id").to_numpy()[hit]
    shard_col = ids.column("shard").to_numpy()
    for i in range(len(indexes)):
        indexes[i] = _remove_ids(indexes[i], meta["shards"][i]["factory"], removed[shard_col[hit] == i])
        apply_search_params(indexes[i], meta["shards"][i]["search_params"])
    _drop_from_probe(probe, removed)
    new_meta = _new_version_meta(meta, "delete", vdir.name)
    _remeasure(new_meta, indexes, probe)
    found = set(ids.filter(pa.array(hit)).column("video_id").to_pylist())
    new_meta["last_operation"] = {
        "deleted_rows": int(hit.sum()),
        "deleted_videos": sorted(found),
        "not_found": sorted(set(video_ids) - found),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return _publish_version(root, indexes, ids.filter(pa.array(~hit)), new_meta, probe, [], keep)


def needs_retrain(
    root: str | os.PathLike, growth_factor: float = DEFAULT_GROWTH_FACTOR, recall_target: float | None = None
) -> tuple[bool, list[str]]:
    """Whether the CURRENT version should be rebuilt from scratch, and why.

    True when the index holds more than ``growth_factor`` × the vectors it was trained/built with, or
    when recall@k on the stored probe set (vs maintained exact neighbours) is below the target.
    """
    vdir, meta, indexes, _ids = store.load_version(root)
    probe = store.read_probe(vdir)
    target = float(recall_target if recall_target is not None else meta.get("recall_target", DEFAULT_RECALL))
    reasons = []
    if meta["count"] > growth_factor * max(1, int(meta.get("trained_on_count", meta["count"]))):
        reasons.append(
            f"grew to {meta['count']} vectors, > {growth_factor}x the {meta['trained_on_count']} "
            "it was built with"
        )
    if probe is not None:
        for info, ix in zip(meta["shards"], indexes):
            apply_search_params(ix, info["search_params"])
        measured = dict(meta)
        measured["shards"] = [dict(s) for s in meta["shards"]]
        _remeasure(measured, indexes, probe)
        if measured["recall"] < target:
            reasons.append(
                f"recall@{meta.get('recall_k', DEFAULT_K)} on the probe set is "
                f"{measured['recall']:.4f} < target {target}"
            )
    return bool(reasons), reasons

"""Build the FAISS index of one shard of an embeddings source (no publishing): the unit of work of a
single-shard build (:mod:`index.build`) and of each Ray task of a sharded one (:mod:`index.sharded`).

Pass 1 samples training + held-out probe vectors, the index is trained on the sample, pass 2 adds every row
in chunks while the exact top-``PROBE_DEPTH`` neighbours of each probe are accumulated, then the search
parameters are tuned to the recall target.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from index import store
from index.embeddings import IDS_SCHEMA, EmbeddingSource, iter_batches
from index.factory import (
    choose_factory,
    make_index,
    parse_memory,
    to_cpu,
    to_gpu_if_available,
    training_size,
)
from index.tuning import ExactTopK, measure_recall, tune
from runtime.progress import Progress

DEFAULT_MEMORY = "4GB"
DEFAULT_RECALL = 0.95
DEFAULT_K = 10
PROBE_DEPTH = 50  # exact neighbours kept per probe, so deletes still leave >= k of them
DEFAULT_PROBES = 256
DEFAULT_GROWTH_FACTOR = 2.0


def row_progress(label: str, total: int, enabled: bool) -> Progress:
    """A rows/s + ETA reporter on stderr (stdout carries the jobs' JSON output)."""
    return Progress(f"index {label}", max(total, 1), unit="rows", enabled=enabled, stream=sys.stderr)


def finish_progress(bar: Progress) -> float:
    """Print the final ``N rows in S s`` line; returns the elapsed seconds."""
    elapsed = bar.elapsed()
    if bar.enabled:
        print(f"[{bar.label}] {bar.done} rows in {elapsed:.1f}s", file=sys.stderr, flush=True)
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
    write_to: tuple[str, str] | None = None,
    text_queries: np.ndarray | None = None,
) -> dict[str, Any]:
    """Build the index of one shard of ``source`` (no publishing).

    ``text_queries`` (normalised ``[n, D]`` text vectors: caption embeddings, a service's query log) are what
    nprobe / efSearch are tuned on when given (users send text, which lies elsewhere in the space than the
    videos); the held-out video probes are then only measured. The stored probe set is the tuning set.

    Returns ``{"index", "ids" (pa.Table), "errors" (list), "probe" (dict of arrays), "info" (dict),
    "record"}``; with ``write_to`` = ``(root, version)`` the index is put straight into that version's folder
    (any store: a Ray task on any node writes its own shard), ``"index"`` is None and ``"record"`` holds the
    file's sha256/size.
    """
    t0 = time.perf_counter()
    shard_index, num_shards = shard
    n_est = max(1, int(np.ceil(source.num_rows / num_shards)))
    factory = factory or choose_factory(n_est, source.dim, parse_memory(memory_budget), recall_target)
    index = make_index(factory, source.dim)
    n_train = training_size(index, n_est)
    rng = np.random.default_rng(seed + shard_index)
    # Sample positions over the whole stream; a shard keeps ~1/num_shards of them, so oversample.
    want = min(source.num_rows, (n_train + num_probes) * num_shards)
    sampled = np.sort(rng.choice(source.num_rows, size=want, replace=False)) if want else np.zeros(0, int)
    train_vecs, probe_vecs = _sample(source, shard, sampled, n_train, num_probes, rng, batch_size)
    t_train = time.perf_counter()
    index, on_gpu = train_index(index, train_vecs, factory, shard_index)
    train_s = time.perf_counter() - t_train
    bar = row_progress(f"add shard {shard_index}/{num_shards}", n_est, progress)
    text = np.zeros((0, source.dim), np.float32) if text_queries is None else text_queries
    queries = np.concatenate([probe_vecs, np.asarray(text, np.float32)])
    index, ids_table, errors, exact = add_stream(index, source, shard, queries, batch_size, bar)
    add_s = finish_progress(bar)
    index = to_cpu(index, on_gpu)
    if index.ntotal == 0:
        raise ValueError(
            f"shard {shard_index}: no valid embeddings in {source.root} ({len(errors)} rows rejected)"
        )
    params, recall, met, curve, probe, tuned = tune_on_queries(index, queries, len(probe_vecs),
                                                               exact.result(), k, recall_target)
    if progress:
        print(f"[index] shard {shard_index}: {factory} n={index.ntotal} params={params} "
              f"recall@{k}={recall:.4f} on {tuned['tuned_on']} queries (target {recall_target}, met={met})",
              file=sys.stderr, flush=True)
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
        **tuned,
    }
    record = None
    if write_to is not None:
        record = _upload_index(index, write_to, info["file"])
        index = None
    return {"index": index, "ids": ids_table, "errors": errors, "probe": probe, "info": info,
            "record": record}


def tune_on_queries(
    index: faiss.Index,
    queries: np.ndarray,
    num_video: int,
    truth: tuple[np.ndarray, np.ndarray],
    k: int,
    recall_target: float,
) -> tuple[dict[str, int], float, bool, list, dict[str, np.ndarray], dict[str, Any]]:
    """Tune on the text queries (``queries[num_video:]``) when there are any, else on the video probes.

    Returns ``(params, recall, met, curve, probe, info)``: ``probe`` is the tuning set with its exact
    neighbours (``probe.npz``: re-measured on every add/delete), ``info`` says which set it was and the video
    probes' recall at the chosen setting. ``truth`` = the queries' exact ``(scores, ids)``, ``PROBE_DEPTH``
    deep."""
    gt_d, gt_i = truth
    gt_d, gt_i = gt_d.astype(np.float32), gt_i.astype(np.int64)
    on_text = len(queries) > num_video
    use = slice(num_video, None) if on_text else slice(0, num_video)
    params, recall, met, curve = tune(index, queries[use], gt_i[use], k, recall_target)
    info: dict[str, Any] = {"tuned_on": "text" if on_text else "video",
                            "num_text_queries": int(len(queries) - num_video)}
    if on_text:
        info["video_probe_recall"] = measure_recall(index, queries[:num_video], gt_i[:num_video], k)
    probe = {"queries": np.ascontiguousarray(queries[use]), "gt_d": gt_d[use], "gt_i": gt_i[use]}
    return params, recall, met, curve, probe, info


def _upload_index(index: faiss.Index, target: tuple[str, str], name: str) -> dict[str, Any]:
    """Write ``index`` to a local temp file (FAISS writes files) and put it under ``root/versions/VERSION``
    as one complete object; returns its sha256/size record for index.json."""
    root, version = target
    with tempfile.TemporaryDirectory(prefix="vidsift-shard-") as tmp:
        local = Path(tmp) / name
        faiss.write_index(index, str(local))
        return store.upload_file(local, root, version, name)


def train_index(
    index: faiss.Index, train_vecs: np.ndarray, factory: str, shard_index: int
) -> tuple[faiss.Index, bool]:
    """Move ``index`` to the GPUs when there are any and train it (when its structure needs training)."""
    if not index.is_trained:
        if len(train_vecs) == 0:
            raise ValueError(f"shard {shard_index}: no valid vectors to train {factory!r} on")
        index, on_gpu = to_gpu_if_available(index)
        index.train(train_vecs)
        return index, on_gpu
    return to_gpu_if_available(index)


def add_stream(
    index: faiss.Index,
    source: EmbeddingSource,
    shard: tuple[int, int],
    queries: np.ndarray,
    batch_size: int,
    bar: Progress,
    seen: set[int] | None = None,
) -> tuple[faiss.Index, pa.Table, list[dict[str, Any]], ExactTopK]:
    """Pass 2: add every valid row of ``shard`` while accumulating the queries' exact neighbours.

    ``seen``: ids already taken (by earlier slices of a distributed build); rows with them are
    ``duplicate_id`` errors, as are repeats within the stream."""
    exact = ExactTopK(queries, PROBE_DEPTH)
    seen = set() if seen is None else seen
    metas, errors = [], []
    for batch in iter_batches(source, batch_size=batch_size, shard=shard, seen_ids=seen):
        errors.extend(batch.errors)
        if len(batch.ids):
            index.add_with_ids(batch.vectors, batch.ids)
            exact.add(batch.vectors, batch.ids)
            metas.append(batch.meta)
        bar.update(len(batch.ids) + len(batch.errors))
    ids_table = pa.concat_tables(metas) if metas else IDS_SCHEMA.empty_table()
    return index, ids_table, errors, exact


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
    return split_sample(vecs, n_train, num_probes, rng)


def split_sample(
    vecs: np.ndarray, n_train: int, num_probes: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Sampled vectors → (training vectors, held-out probes), shuffled with ``rng``."""
    vecs = vecs[rng.permutation(len(vecs))]
    probes = vecs[:num_probes]
    if len(vecs) >= n_train + num_probes:
        train = vecs[num_probes : num_probes + n_train]
    else:  # tiny data: the probes may also be training vectors
        train = vecs[len(vecs) - min(n_train, len(vecs)) :] if n_train else vecs[:0]
    return np.ascontiguousarray(train), np.ascontiguousarray(probes)

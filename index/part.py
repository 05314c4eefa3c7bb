"""Build the FAISS index of one shard of an embeddings source (no publishing): the unit of work of a
single-shard build (:mod:`index.build`) and of each Ray task of a sharded one (:mod:`index.sharded`).

Pass 1 samples training + held-out probe vectors, the index is trained on the sample, pass 2 adds every row
in chunks while the exact top-``PROBE_DEPTH`` neighbours of each probe are accumulated, then the search
parameters are tuned to the recall target.
"""

from __future__ import annotations

import shutil
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
    needs_rerank,
    parse_memory,
    to_cpu,
    to_gpu_if_available,
    training_size,
)
from index.rerank import RefineVectors, RefineWriter
from index.tuning import ExactTopK, measure_recall, offdata_probes, tune, tune_rerank
from runtime.progress import Progress

DEFAULT_MEMORY = "4GB"
DEFAULT_RECALL = 0.95
DEFAULT_K = 10
PROBE_DEPTH = 50  # exact neighbours kept per probe, so deletes still leave >= k of them
DEFAULT_PROBES = 256
DEFAULT_GROWTH_FACTOR = 2.0
NO_TEXT_RULES = ("video", "offdata")  # what a build without text queries tunes on (tuning.offdata_probes)
# Without text, tune on off-data probes: held-out video probes find their own clip and overstate the recall
# text queries get (bench.text_recall --no-captions, docs/index.md: video probes 0.930 on held-out text at
# a 0.95 target, off-data probes 0.955).
DEFAULT_NO_TEXT_RULE = "offdata"


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
    no_text_rule: str = DEFAULT_NO_TEXT_RULE,
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
    rng = np.random.default_rng(seed + shard_index)
    index, on_gpu, train_vecs, probe_vecs, train_s = _sample_and_train(
        source, shard, factory, n_est, num_probes, rng, batch_size)
    bar = row_progress(f"add shard {shard_index}/{num_shards}", n_est, progress)
    queries, text_kind = tuning_queries(probe_vecs, train_vecs, text_queries, no_text_rule, rng)
    training_count = len(train_vecs)
    del train_vecs  # trained on (40 vectors a list): its memory is the add pass's now
    file = store.shard_file(shard_index, num_shards)
    refine_dir = tempfile.TemporaryDirectory(prefix="vidsift-refine-")
    try:
        writer = RefineWriter(refine_dir.name, file, source.dim) if needs_rerank(factory) else None
        index, ids_table, errors, exact = add_stream(index, source, shard, queries, batch_size, bar,
                                                     refine=writer)
        add_s = finish_progress(bar)
        index = to_cpu(index, on_gpu)
        if index.ntotal == 0:
            raise ValueError(
                f"shard {shard_index}: no valid embeddings in {source.root} ({len(errors)} rows rejected)"
            )
        params, recall, met, curve, probe, tuned, records, local_files = _tune_and_place(
            index, writer, queries, len(probe_vecs), exact, (k, recall_target, text_kind), write_to, file)
    finally:
        refine_dir.cleanup()
    if progress:
        print(f"[index] shard {shard_index}: {factory} n={index.ntotal} params={params} "
              f"recall@{k}={recall:.4f} on {tuned['tuned_on']} queries (target {recall_target}, met={met})",
              file=sys.stderr, flush=True)
    info = {
        "file": file,
        "shard": shard_index,
        "factory": factory,
        "count": int(index.ntotal),
        "trained_on_count": int(index.ntotal),
        "training_size": int(training_count),
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
    if write_to is not None:
        index = None
    return {"index": index, "ids": ids_table, "errors": errors, "probe": probe, "info": info,
            "record": records.get(file), "records": records, "local_files": local_files}


def tuning_queries(probe_vecs: np.ndarray, train_vecs: np.ndarray, text_queries: np.ndarray | None,
                   no_text_rule: str, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """The held-out video probes followed by the queries the shard is tuned on, and what those are:
    ``text_queries`` ("text"); without them off-data probes ("offdata": :func:`index.tuning.offdata_probes`)
    or none ("video": the video probes themselves are tuned on)."""
    if text_queries is not None:
        text, kind = np.asarray(text_queries, np.float32), "text"
    elif no_text_rule == "offdata":
        text, kind = offdata_probes(probe_vecs, train_vecs, rng), "offdata"
    else:
        text, kind = np.zeros((0, probe_vecs.shape[1]), np.float32), "video"
    return np.concatenate([probe_vecs, text]), kind


def _sample_and_train(source: EmbeddingSource, shard: tuple[int, int], factory: str, n_est: int,
                      num_probes: int, rng: np.random.Generator, batch_size: int):
    """Pass 1 + training: ``(trained index, on_gpu, training vectors, held-out probes, train seconds)``."""
    index = make_index(factory, source.dim)
    n_train = training_size(index, n_est)
    # Sample positions over the whole stream; a shard keeps ~1/num_shards of them, so oversample.
    want = min(source.num_rows, (n_train + num_probes) * shard[1])
    sampled = np.sort(rng.choice(source.num_rows, size=want, replace=False)) if want else np.zeros(0, int)
    train_vecs, probe_vecs = _sample(source, shard, sampled, n_train, num_probes, rng, batch_size)
    t_train = time.perf_counter()
    index, on_gpu = train_index(index, train_vecs, factory, shard[0])
    return index, on_gpu, train_vecs, probe_vecs, time.perf_counter() - t_train


def _tune_and_place(index: faiss.Index, writer: RefineWriter | None, queries: np.ndarray, num_video: int,
                    exact: ExactTopK, target: tuple[int, float, str], write_to: tuple[str, str] | None,
                    file: str):
    """Finish the shard's float16 copy (when its codes need one), tune on ``queries`` (re-ranked against
    the copy), then put the files in place (:func:`_place_files`). Returns ``tune_on_queries``'s tuple
    (``info["rerank"]`` describes the copy) + ``(records, local_files)``."""
    refine_files = writer.finish() if writer is not None else {}
    refine = RefineVectors(*refine_files.values()) if refine_files else None
    params, recall, met, curve, probe, tuned = tune_on_queries(index, queries, num_video, exact.result(),
                                                               target[0], target[1], refine, target[2])
    del refine  # its memory maps: the files move or upload next
    if refine_files:
        names = list(refine_files)
        depth = tuned.pop("depth")
        tuned["rerank"] = {"vectors": names[0], "ids": names[1], "dtype": "float16", "depth": depth}
    records, local_files = _place_files(index, refine_files, write_to, file)
    return params, recall, met, curve, probe, tuned, records, local_files


def _place_files(index: faiss.Index, refine_files: dict[str, Path], write_to: tuple[str, str] | None,
                 file: str) -> tuple[dict[str, dict[str, Any]], dict[str, Path]]:
    """Put the shard's files where the version is staged. With ``write_to`` the FAISS file and the float16
    copy are uploaded under ``root/versions/VERSION``: returns their records. Else the copy moves to a
    local temp folder the caller moves into its stage (:func:`index.build.build_index`): returns its paths."""
    if write_to is None:
        if not refine_files:  # no copy: no folder for the caller to clean up
            return {}, {}
        keep = Path(tempfile.mkdtemp(prefix="vidsift-refine-part-"))
        return {}, {name: Path(shutil.move(str(path), keep / name)) for name, path in refine_files.items()}
    records = {file: _upload_index(index, write_to, file)}
    for name, path in refine_files.items():
        records[name] = store.upload_file(path, write_to[0], write_to[1], name)
    return records, {}


def tune_on_queries(
    index: faiss.Index,
    queries: np.ndarray,
    num_video: int,
    truth: tuple[np.ndarray, np.ndarray],
    k: int,
    recall_target: float,
    refine: RefineVectors | None = None,
    text_kind: str = "text",
) -> tuple[dict[str, int], float, bool, list, dict[str, np.ndarray], dict[str, Any]]:
    """Tune on the text queries (``queries[num_video:]``) when there are any, else on the video probes.
    With ``refine`` (the shard's float16 copy) nprobe and the re-rank depth are tuned together
    (:func:`index.tuning.tune_rerank`; ``info["depth"]``).

    Returns ``(params, recall, met, curve, probe, info)``: ``probe`` is the tuning set with its exact
    neighbours (``probe.npz``: re-measured on every add/delete), ``info`` says which set it was and the video
    probes' recall at the chosen setting. ``truth`` = the queries' exact ``(scores, ids)``, ``PROBE_DEPTH``
    deep."""
    gt_d, gt_i = truth
    gt_d, gt_i = gt_d.astype(np.float32), gt_i.astype(np.int64)
    on_text = len(queries) > num_video
    use = slice(num_video, None) if on_text else slice(0, num_video)
    info: dict[str, Any] = {"tuned_on": text_kind if on_text else "video",
                            "num_text_queries": int(len(queries) - num_video)}
    if refine is None:
        params, recall, met, curve = tune(index, queries[use], gt_i[use], k, recall_target)
    else:
        params, info["depth"], recall, met, curve = tune_rerank(index, refine, queries[use], gt_i[use], k,
                                                                recall_target)
    if on_text:
        info["video_probe_recall"] = measure_recall(index, queries[:num_video], gt_i[:num_video], k,
                                                    refine, info.get("depth", 0))
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
    refine: RefineWriter | None = None,
) -> tuple[faiss.Index, pa.Table, list[dict[str, Any]], ExactTopK]:
    """Pass 2: add every valid row of ``shard`` while accumulating the queries' exact neighbours (and,
    with ``refine``, writing the float16 copy the search re-ranks against).

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
            if refine is not None:
                refine.add(batch.vectors, batch.ids)
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

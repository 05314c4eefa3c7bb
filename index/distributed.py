"""Distributed build for corpora larger than one process's memory (autofaiss / ``faiss.contrib.ondisk``
style): train once, add in slices as Ray tasks, merge the slices' inverted lists into one on-disk index.

1. **Plan**: the embeddings' Parquet row groups, in read order, grouped into slices of about ``slice_rows``.
2. **Scan** (a Ray task per slice): the valid ids of the slice and the vectors at the sampled positions.
   The driver keeps only the sample (training vectors + held-out probes) and the ids (8 bytes a row), from
   which it finds the ids a single pass would reject as ``duplicate_id`` in each slice.
3. **Train** the coarse quantizer (and the PQ/SQ codec) once on the sample; ``faiss.serialize_index`` bytes of
   the trained, empty index go to the add tasks through the object store.
4. **Add** (a Ray task per slice): ``add_with_ids`` of the slice's rows (the embeddings' ``id`` column: no
   id is ever shifted) into a copy of the trained index while the exact neighbours of the tuning queries
   are accumulated; the populated index and the slice's ids table go to ``versions/<version>/_slices/``,
   with, for lossy codes (PQ, SQ), the slice's float16 copy of its vectors (:mod:`index.rerank`).
5. **Merge** (:func:`index.ondisk.merge_to_ondisk`) the slices' lists, in slice order, into the version's
   ``index.faiss`` + ``index.ivfdata``, and the slices' float16 copies into one (:func:`merge_refines`);
   tune nprobe (and the re-rank depth) on the merged index; the caller publishes.

No process holds all vectors: a task holds one slice, the driver the sample, the ids and one slice at a time
while merging. The result equals an in-process build's (same ids, same lists, entries in the same order)
given the same trained index. Each task reports its peak RSS and the RSS it started from.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import ray

from index import ondisk, store
from index.embeddings import EmbeddingSource, iter_batches
from index.factory import (
    choose_factory,
    choose_nlist,
    is_fast_scan,
    is_ivf,
    make_index,
    needs_rerank,
    parse_memory,
    to_cpu,
    training_size,
)
from index.part import (
    DEFAULT_K,
    DEFAULT_MEMORY,
    DEFAULT_PROBES,
    DEFAULT_RECALL,
    PROBE_DEPTH,
    add_stream,
    row_progress,
    split_sample,
    train_index,
    tune_on_queries,
)
from index.rerank import (
    REFINE_DTYPE,
    RefineVectors,
    RefineWriter,
    refine_names,
    rows_in_order,
    write_npy,
)
from index.tuning import merge_topk
from runtime import storage
from runtime.ray_connect import connect_ray

DEFAULT_SLICE_ROWS = 262_144  # ~256 MiB of float32 at dim 256 per add task
TASK_BATCH_ROWS = 16_384  # rows a task validates at once: a batch costs ~6 copies of its vectors in flight
TRAIN_PER_LIST = 64  # k-means points per inverted list (FAISS warns below 39; 50-256 is the usual range)
SLICES_DIR = "_slices"  # versions/<version>/_slices/: the add tasks' outputs, removed after the merge


@dataclasses.dataclass
class SliceSource(EmbeddingSource):
    """Some row groups of an embeddings source: ``parts`` = ``[(path in the store's filesystem, [row
    group numbers])]``. :func:`index.embeddings.iter_batches` reads it like any source."""

    parts: list[tuple[str, list[int]]] = dataclasses.field(default_factory=list)
    schema: pa.Schema | None = None
    offset: int = 0  # position of the slice's first row in the whole source

    def dataset(self) -> ds.Dataset:
        fs, _base = storage.arrow_filesystem(self.root)
        fmt = ds.ParquetFileFormat()
        fragments = [fmt.make_fragment(path, filesystem=fs, row_groups=groups) for path, groups in self.parts]
        return ds.FileSystemDataset(fragments, self.schema, fmt, fs)


def plan_slices(source: EmbeddingSource, slice_rows: int) -> list[SliceSource]:
    """Consecutive row groups (in the order a single pass reads them) packed into slices of at most
    ``slice_rows`` rows; a row group larger than that is a slice of its own."""
    if slice_rows < 1:
        raise ValueError(f"slice_rows must be >= 1, got {slice_rows}")
    dataset = source.dataset()
    slices: list[SliceSource] = []
    parts: list[tuple[str, list[int]]] = []
    rows = offset = 0

    def close() -> None:
        nonlocal parts, rows, offset
        if rows:
            slices.append(dataclasses.replace(_base_slice(source, dataset.schema), parts=parts, num_rows=rows,
                                              offset=offset))
        offset, parts, rows = offset + rows, [], 0

    for fragment in dataset.get_fragments():
        meta = fragment.metadata
        for group in range(meta.num_row_groups):
            n = meta.row_group(group).num_rows
            if rows and rows + n > slice_rows:
                close()
            if parts and parts[-1][0] == fragment.path:
                parts[-1][1].append(group)
            else:
                parts.append((fragment.path, [group]))
            rows += n
    close()
    return slices


def _base_slice(source: EmbeddingSource, schema: pa.Schema) -> SliceSource:
    return SliceSource(root=source.root, files=list(source.files), model=dict(source.model), dim=source.dim,
                       num_rows=0, schema=schema)


def distributed_factory(n: int, dim: int, memory_budget: int | str, recall_target: float) -> str:
    """The chooser's factory when it is an IVF one; else (small corpora: Flat / HNSW) a flat IVF, the
    smallest structure whose inverted lists can be built apart and merged. Never fast-scan codes (the
    chooser's ``rerank=False``): their lists are packed SIMD blocks that a list-by-list merge into on-disk
    lists would scramble. Lossy codes (SQ8, PQ) still get the float16 re-rank copy (:func:`merge_refines`)."""
    factory = choose_factory(n, dim, parse_memory(memory_budget), recall_target, rerank=False)
    return factory if is_ivf(make_index(factory, dim)) else f"IVF{choose_nlist(n)},Flat"


def training_count(index: faiss.Index, n: int) -> int:
    nlist = faiss.extract_index_ivf(index).nlist
    return int(min(n, max(training_size(index, n), TRAIN_PER_LIST * nlist)))


def build_distributed(
    source: EmbeddingSource,
    target: tuple[str, str],
    stage: Path,
    factory: str | None = None,
    memory_budget: int | str = DEFAULT_MEMORY,
    recall_target: float = DEFAULT_RECALL,
    k: int = DEFAULT_K,
    num_probes: int = DEFAULT_PROBES,
    batch_size: int = 65536,
    seed: int = 0,
    progress: bool = True,
    text_queries: np.ndarray | None = None,
    slice_rows: int = DEFAULT_SLICE_ROWS,
    trained: faiss.Index | None = None,
) -> dict[str, Any]:
    """Build one on-disk IVF index of ``source`` with Ray tasks; its ``index.faiss`` + ``index.ivfdata`` are
    written into the local ``stage`` of ``target`` = ``(index root URI, version)`` (the caller publishes).

    Returns what :func:`index.part.build_part` returns (``"index"`` None: the files are in ``stage``), its
    ``info`` with ``ivfdata`` and a ``distributed`` report (slices, every task's peak RSS, the driver's).
    ``trained`` (an empty trained IVF index) skips training: tests compare builds over one quantizer."""
    t0 = time.perf_counter()
    started_here, _ = connect_ray()
    try:
        slices = plan_slices(source, slice_rows)
        batch_size = min(batch_size, TASK_BATCH_ROWS)  # a task's memory: its slice plus a few batches
        if not slices:
            raise ValueError(f"embeddings {source.root!r} hold no rows")
        factory = _check_factory(factory, trained, source, memory_budget, recall_target)
        index = trained if trained is not None else make_index(factory, source.dim)
        n_train = training_count(index, source.num_rows) if trained is None else 0
        rng = np.random.default_rng(seed)
        want = min(source.num_rows, n_train + num_probes)
        positions = np.sort(rng.choice(source.num_rows, size=want, replace=False))
        scans = _run_tasks(_scan_slice, slices, "scan", progress,
                           lambda i, piece: (_local(positions, piece), batch_size))
        sample = np.concatenate([s["sample"] for s in scans])
        train_vecs, probe_vecs = split_sample(sample, n_train, num_probes, rng)
        t_train = time.perf_counter()
        if trained is None:
            index, on_gpu = train_index(index, train_vecs, factory, 0)
            index = to_cpu(index, on_gpu)
        train_s = time.perf_counter() - t_train
        text = np.zeros((0, source.dim), np.float32) if text_queries is None else text_queries
        queries = np.ascontiguousarray(np.concatenate([probe_vecs, np.asarray(text, np.float32)]))
        trained_ref, queries_ref = ray.put(faiss.serialize_index(index)), ray.put(queries)
        claimed = claimed_ids([s["ids"] for s in scans])
        scan_memory = [{"slice": i, **s["memory"]} for i, s in enumerate(scans)]
        del scans
        rerank = needs_rerank(factory)  # lossy codes: each task also writes its slice's float16 copy
        adds = _run_tasks(_add_slice, slices, "add", progress, lambda i, piece: (
            i, trained_ref, claimed[i], queries_ref, target, batch_size, rerank))
    finally:
        if started_here:
            ray.shutdown()
    part = _merge_and_tune(index, adds, target, stage, queries, len(probe_vecs), k, recall_target, progress)
    part["info"].update(factory=factory, training_size=int(len(train_vecs)), train_s=round(train_s, 3),
                        build_s=round(time.perf_counter() - t0, 3))
    part["info"]["distributed"].update(slice_rows=int(slice_rows), scan_tasks=scan_memory, driver=_memory())
    return part


def _check_factory(factory, trained, source, memory_budget, recall_target) -> str:
    if trained is not None:
        if not is_ivf(trained) or not trained.is_trained or trained.ntotal or not factory:
            raise ValueError("trained must be an empty, trained IVF index, passed with its factory string")
        return factory
    factory = factory or distributed_factory(source.num_rows, source.dim, memory_budget, recall_target)
    index = make_index(factory, source.dim)
    if not is_ivf(index):
        raise ValueError(f"a distributed build needs an IVF factory (inverted lists to merge), "
                         f"got {factory!r}")
    if is_fast_scan(index):
        raise ValueError(f"a distributed build merges into on-disk lists, which cannot hold fast-scan codes: "
                         f"{factory!r} (use PQ{{m}} without x4fs, SQ8 or Flat codes)")
    return factory


def _local(positions: np.ndarray, piece: SliceSource) -> np.ndarray:
    """The sampled global positions that fall in ``piece``, as positions within it."""
    lo, hi = np.searchsorted(positions, [piece.offset, piece.offset + piece.num_rows])
    return positions[lo:hi] - piece.offset


def claimed_ids(slice_ids: list[np.ndarray]) -> list[np.ndarray]:
    """For each slice, its valid ids that an earlier slice already holds: a single pass keeps the first
    valid occurrence of an id and rejects the later ones as ``duplicate_id``, so the slice must too."""
    if not slice_ids:
        return []
    owner = np.repeat(np.arange(len(slice_ids)), [len(x) for x in slice_ids])
    ids = np.concatenate(slice_ids)
    _unique, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    taken = owner[first][inverse] < owner
    return [np.unique(ids[taken & (owner == i)]) for i in range(len(slice_ids))]


def _run_tasks(fn, slices: list[SliceSource], label: str, progress: bool, args_of) -> list[dict[str, Any]]:
    """One Ray task per slice; results in slice order, progress (rows/s, ETA) as slices finish."""
    task = ray.remote(num_cpus=1)(fn).options(runtime_env={"env_vars": storage.storage_env()})
    refs = {task.remote(piece, *args_of(i, piece)): i for i, piece in enumerate(slices)}
    bar = row_progress(f"{label} slices", sum(p.num_rows for p in slices), progress)
    results: list[Any] = [None] * len(slices)
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        i = refs[done[0]]
        results[i] = ray.get(done[0])
        bar.update(slices[i].num_rows)
    return results


def _reset_peak() -> int:
    """Start this task's peak RSS from the current RSS (a Ray worker runs many tasks: its lifetime peak is
    not this task's; Linux ``clear_refs`` 5 resets the high-water mark). Returns the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:  # not Linux: the peak stays the worker's lifetime peak (an upper bound)
        pass
    return _memory().get("rss_bytes", 0)


def _memory() -> dict[str, int]:
    """This process's peak and current RSS (and anonymous RSS: memory-mapped files are page cache)."""
    fields = {"VmHWM": "peak_rss_bytes", "VmRSS": "rss_bytes", "RssAnon": "anon_rss_bytes"}
    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in fields:
                    out[fields[key]] = int(value.split()[0]) * 1024
    except OSError:  # not Linux: getrusage only
        pass
    return out


def _scan_slice(piece: SliceSource, sample_at: np.ndarray, batch_size: int) -> dict[str, Any]:
    """Ray task: the slice's valid ids (in order) and its valid vectors at ``sample_at``."""
    rss_start = _reset_peak()
    ids, picked = [], [np.zeros((0, piece.dim), np.float32)]
    for batch in iter_batches(piece, batch_size=batch_size):
        ids.append(batch.ids)
        chosen = np.isin(batch.positions, sample_at, assume_unique=True)
        if chosen.any():
            picked.append(batch.vectors[chosen])
    return {"ids": np.concatenate(ids) if ids else np.zeros(0, np.int64), "sample": np.concatenate(picked),
            "memory": {**_memory(), "rss_start_bytes": rss_start}}


def _add_slice(
    piece: SliceSource,
    number: int,
    trained: np.ndarray,
    claimed: np.ndarray,
    queries: np.ndarray,
    target: tuple[str, str],
    batch_size: int,
    rerank: bool = False,
) -> dict[str, Any]:
    """Ray task: add the slice's rows to a copy of the trained index (and, with ``rerank``, to the slice's
    float16 copy, rows in id order); put the populated index, its ids table and the copy under ``_slices/``;
    return their URIs, list sizes, errors and the queries' exact neighbours within the slice."""
    t0, rss_start = time.perf_counter(), _reset_peak()
    index = faiss.deserialize_index(trained)
    bar = row_progress(f"add slice {number}", piece.num_rows, False)
    folder = storage.join(store.version_uri(*target), SLICES_DIR)
    faiss_uri = storage.join(folder, f"slice-{number:05d}.faiss")
    ids_uri = storage.join(folder, f"ids-{number:05d}.parquet")
    with tempfile.TemporaryDirectory(prefix="vidsift-slice-") as tmp:
        writer = RefineWriter(tmp, storage.name(faiss_uri), piece.dim) if rerank else None
        index, ids, errors, exact = add_stream(index, piece, (0, 1), queries, batch_size, bar,
                                               seen=set(claimed.tolist()), refine=writer)
        refine = []
        for name, path in (writer.finish() if writer is not None else {}).items():
            refine.append(storage.upload(path, storage.join(folder, name)))
        faiss.write_index(index, os.path.join(tmp, "slice.faiss"))
        storage.upload(os.path.join(tmp, "slice.faiss"), faiss_uri)
    gt_d, gt_i = exact.result()
    storage.write_parquet(ids, ids_uri)
    return {"slice": number, "faiss": faiss_uri, "ids": ids_uri, "refine": refine,
            "sizes": ondisk.list_sizes(index),
            "count": int(index.ntotal), "rows": piece.num_rows, "errors": errors,
            "gt_d": gt_d.astype(np.float32), "gt_i": gt_i.astype(np.int64),
            "seconds": round(time.perf_counter() - t0, 3), "node": ray.get_runtime_context().get_node_id(),
            "memory": {**_memory(), "rss_start_bytes": rss_start}}


def _local_slices(adds: list[dict[str, Any]]) -> Iterator[Path]:
    """Each slice file as a local path, one at a time (a remote one is downloaded, then deleted)."""
    for add in adds:
        with tempfile.TemporaryDirectory(prefix="vidsift-merge-") as tmp:
            yield _local_file(add["faiss"], Path(tmp))


def _local_file(uri: str, folder: Path) -> Path:
    """``uri`` as a local path: itself when local, else downloaded into ``folder``."""
    if storage.is_local(uri):
        return Path(storage.local_path(uri))
    fs, path = storage.filesystem(uri)
    fs.get_file(path, str(folder / storage.name(uri)))
    return folder / storage.name(uri)


def merge_refines(adds: list[dict[str, Any]], stage: Path, shard_file: str, dim: int) -> dict[str, Path]:
    """The slices' float16 copies (each in id order) as the merged index's one copy in ``stage``, rows in
    ascending id order (:class:`index.rerank.RefineVectors`); returns ``{name: path}``. The driver holds
    the ids and their order (16 bytes a row) and ``SORT_CHUNK_ROWS`` rows at a time; remote slices are
    fetched to local disk first (their bytes again, until the merge ends)."""
    with tempfile.TemporaryDirectory(prefix="vidsift-refine-merge-") as tmp:
        pieces = [RefineVectors(*(_local_file(uri, Path(tmp)) for uri in add["refine"])) for add in adds]
        ids = np.concatenate([p.ids for p in pieces]) if pieces else np.zeros(0, np.int64)
        order = np.argsort(ids, kind="stable")
        starts = np.cumsum([0] + [len(p) for p in pieces])
        vectors_name, ids_name = refine_names(shard_file)
        # The pieces' rows are read with pread (index.rerank.read_rows): through their memory maps, the pass
        # held every piece in the driver's RSS.
        fds = [os.open(p.vectors.filename, os.O_RDONLY) if len(p) else -1 for p in pieces]
        try:
            sources = [(fd, p.vectors.offset if len(p) else 0) for fd, p in zip(fds, pieces)]
            write_npy(stage / vectors_name, (len(ids), dim), REFINE_DTYPE,
                      rows_in_order(sources, starts, order, dim))
        finally:
            for fd in fds:
                if fd >= 0:
                    os.close(fd)
        del pieces
        np.save(stage / ids_name, ids[order])
    return {vectors_name: stage / vectors_name, ids_name: stage / ids_name}


def _merge_and_tune(
    trained: faiss.Index,
    adds: list[dict[str, Any]],
    target: tuple[str, str],
    stage: Path,
    queries: np.ndarray,
    num_video: int,
    k: int,
    recall_target: float,
    progress: bool,
) -> dict[str, Any]:
    """Merge the slices into ``stage/index.faiss`` + ``.ivfdata``, tune it, collect ids / errors / probes."""
    t0 = time.perf_counter()
    name = store.shard_file(0, 1)
    sizes = np.sum([a["sizes"] for a in adds], axis=0).astype(np.uint64)
    merged = ondisk.merge_to_ondisk(trained, _local_slices(adds), sizes, Path(stage) / name)
    refine_files = merge_refines(adds, Path(stage), name, trained.d) if adds[0]["refine"] else {}
    merge_s = time.perf_counter() - t0
    truth = (adds[0]["gt_d"], adds[0]["gt_i"])
    for add in adds[1:]:
        truth = merge_topk(*truth, add["gt_d"], add["gt_i"], PROBE_DEPTH)
    refine = RefineVectors(*refine_files.values()) if refine_files else None
    params, recall, met, curve, probe, tuned = tune_on_queries(merged, queries, num_video, truth, k,
                                                               recall_target, refine)
    del refine  # its memory maps: the stage is published next
    if refine_files:
        vectors_name, ids_name = refine_files
        tuned["rerank"] = {"vectors": vectors_name, "ids": ids_name, "dtype": "float16",
                           "depth": tuned.pop("depth")}
    ids = pa.concat_tables([storage.read_parquet(a["ids"]) for a in adds])
    errors = [e for a in adds for e in a["errors"]]
    count = int(merged.ntotal)
    del merged
    storage.remove(storage.join(store.version_uri(*target), SLICES_DIR), recursive=True)
    if count == 0:
        raise ValueError(f"no valid embeddings in {target[0]!r}'s source ({len(errors)} rows rejected)")
    if progress:
        print(f"[index] distributed: {len(adds)} slices merged in {merge_s:.1f}s, n={count} params={params} "
              f"recall@{k}={recall:.4f} on {tuned['tuned_on']} queries (target {recall_target}, met={met})",
              file=sys.stderr, flush=True)
    tasks = [{key: a[key] for key in ("slice", "rows", "seconds", "node")} | a["memory"] for a in adds]
    info = {"file": name, "ivfdata": ondisk.ivfdata_name(name), "shard": 0, "count": count,
            "trained_on_count": count, "search_params": params, "recall": recall,
            "recall_target_met": bool(met),
            "tuning_curve": curve, "add_s": round(max(a["seconds"] for a in adds), 3), "gpu": False,
            "num_probes": int(num_video), "errors": len(errors), **tuned,
            "distributed": {"slices": len(adds), "merge_s": round(merge_s, 3), "tasks": tasks}}
    return {"index": None, "ids": ids, "errors": errors, "probe": probe, "info": info, "record": None}

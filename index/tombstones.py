"""Deletes without a copy, and the compaction that later drops the deleted rows for real.

A delete publishes a version made of the previous version's unchanged FAISS and ids files (referenced in its
index.json by ``"version"``, :func:`index.store.file_dir`) plus a ``tombstones.parquet`` of every id deleted
so far, carried forward and extended by later deletes, and the probe set with the deleted ids dropped from its
exact neighbours. Its new bytes grow with the deleted count, not the corpus; search filters the tombstoned ids
inside FAISS (:meth:`index.query.VideoIndex.search`).

:func:`compact_index` rewrites the shards without the tombstoned rows once they pass ``threshold`` of the
stored rows: IVF shards copy the kept codes list by list from the memory-mapped file (no decoding, the
trained quantizer / codec reused, so the kept rows rank exactly as before); other shards re-add their kept
vectors, reconstructed slice by slice. It is called by the nightly reindex (workflows/reindex/run.py).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index import store
from index.factory import make_index
from index.part import DEFAULT_K
from index.query import open_refine, rerank_depth, search_shard
from index.rerank import RefineVectors
from index.rows import TOMBSTONES_FILE, RowTable, write_tombstones
from index.tuning import apply_search_params, recall_at_k
from runtime import storage

DEFAULT_COMPACT_THRESHOLD = 0.2  # tombstoned share of the stored rows past which compaction pays
RECONSTRUCT_SLICE = 65536  # vectors a non-IVF shard reconstructs at a time while compacting


def video_rows(rows: RowTable, video_ids: Sequence[str]) -> np.ndarray:
    """Rows of ``video_ids`` in a table sorted by video_id (binary search per video: O(videos · log n))."""
    column = rows.table.column("video_id")
    out = []
    for vid in sorted(set(video_ids)):
        lo, hi = 0, len(rows)
        while lo < hi:
            mid = (lo + hi) // 2
            if column[mid].as_py() < vid:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(rows) and column[lo].as_py() == vid:
            out.append(rows.video_rows(lo))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def _shared_files(vdir: str, meta: dict[str, Any], parent: str, own: set[str]) -> dict[str, dict[str, Any]]:
    """The parent's files a new version reuses (all but ``own``), each recorded with the version that holds
    it: the parent, or the older version the parent itself referred to (references never chain)."""
    records = meta.get("files")
    if records is None:  # a version published before index.json recorded its files
        names = store.version_files(vdir, meta)
        records = {n: store.file_record(store.local_file(vdir, meta, n)) for n in names}
    return {name: {**rec, "version": rec.get("version") or parent}
            for name, rec in records.items() if name not in own}


def delete_videos(root: str | os.PathLike, video_ids: list[str], keep: int = 3) -> dict[str, Any]:
    """Tombstone every row of ``video_ids`` and publish a new version that shares the previous one's FAISS
    and ids files (new bytes: the tombstones and the probe set). Returns the new index.json.

    The summary's ``last_operation.not_found`` lists requested videos the index did not hold (or already
    deleted)."""
    t0 = time.perf_counter()
    if not video_ids:
        raise ValueError("delete needs at least one video id")
    root = storage.normalize(root)
    parent = store.read_current(root)
    vdir = store.version_dir(root, parent)
    meta = store.read_meta(vdir)
    rows = store.read_row_table(vdir, meta)
    dead = store.read_dead_ids(vdir, meta)
    hit = video_rows(rows, video_ids)
    hit_ids = np.asarray(rows.column("id", hit), dtype=np.int64)
    fresh = ~np.isin(hit_ids, dead)
    removed = hit_ids[fresh]
    found = set(rows.column("video_id", hit[fresh]))
    probe = store.read_probe(vdir, meta)
    drop_from_probe(probe, removed)
    new_meta = new_version_meta(meta, "delete", parent)
    stored = int(meta.get("stored_count", meta["count"]))
    version = store.new_version_name(root)
    stage = store.staging_dir(root, version)
    try:
        all_dead = write_tombstones(np.concatenate([dead, removed]), stage / TOMBSTONES_FILE)
        own = {TOMBSTONES_FILE, store.ERRORS_FILE}
        if probe is not None:
            with open(stage / store.PROBE_FILE, "wb") as fh:
                np.savez(fh, **probe)
            own.add(store.PROBE_FILE)
        new_meta["stored_count"] = stored
        new_meta["tombstones"] = {"file": TOMBSTONES_FILE, "count": int(len(all_dead))}
        remeasure(new_meta, _open_shards(vdir, meta), probe, all_dead, open_refines(vdir, meta))
        new_meta["last_operation"] = {
            "deleted_rows": int(len(removed)),
            "deleted_videos": sorted(found),
            "not_found": sorted(set(video_ids) - found),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        shared = _shared_files(vdir, meta, parent, own)
        new_meta["version"] = store.publish(root, stage, new_meta, version, keep=keep, uploaded=shared,
                                            expected_current=parent)
    except BaseException:
        store.discard_stage(root, stage, version)
        raise
    return new_meta


def open_refines(vdir: str, meta: dict[str, Any]) -> list[RefineVectors | None]:
    """Each shard's float16 re-rank copy, memory-mapped (None for a shard without one)."""
    return [open_refine(vdir, meta, info) for info in meta["shards"]]


def _refine_files(meta: dict[str, Any]) -> set[str]:
    return {s["rerank"][key] for s in meta["shards"] if s.get("rerank") for key in ("vectors", "ids")}


def _open_shards(vdir: str, meta: dict[str, Any]) -> list[faiss.Index]:
    """The version's shards, memory-mapped, with their tuned search parameters."""
    indexes = [store.read_shard(vdir, meta, s, mmap=True) for s in meta["shards"]]
    for info, ix in zip(meta["shards"], indexes):
        apply_search_params(ix, info.get("search_params", {}))
    return indexes


def tombstone_share(meta: dict[str, Any]) -> float:
    """Tombstoned rows / stored rows of a version (0 without tombstones)."""
    dead = int((meta.get("tombstones") or {}).get("count", 0))
    return dead / max(1, int(meta.get("stored_count", meta["count"])))


def compact_index(root: str | os.PathLike, threshold: float = DEFAULT_COMPACT_THRESHOLD, keep: int = 3,
                  progress: bool = True) -> dict[str, Any] | None:
    """When the CURRENT version's tombstoned share is at least ``threshold``, publish a version whose shards
    and ids hold only the live rows (same trained structures, so no retraining); returns its index.json, or
    None when there was nothing to do."""
    t0 = time.perf_counter()
    root = storage.normalize(root)
    parent = store.read_current(root)
    vdir = store.version_dir(root, parent)
    meta = store.read_meta(vdir)
    share = tombstone_share(meta)
    if share == 0 or share < threshold:
        return None
    dead = store.read_dead_ids(vdir, meta)
    version = store.new_version_name(root)
    stage = store.staging_dir(root, version)
    try:
        indexes = []
        for i, info in enumerate(meta["shards"]):
            open_shard = functools.partial(store.read_shard, vdir, meta, info, mmap=True)
            indexes.append(_compact_shard(open_shard, info["factory"], dead, stage / info["file"]))
            apply_search_params(indexes[-1], info.get("search_params", {}))
            if progress:
                print(f"[compact] shard {i + 1}/{len(meta['shards'])}: {indexes[-1].ntotal} rows kept",
                      flush=True)
        new_meta = new_version_meta(meta, "compact", parent, rewritten=True)
        new_meta.pop("tombstones", None)
        new_meta.pop("stored_count", None)
        probe = store.read_probe(vdir, meta)
        remeasure(new_meta, indexes, probe, refines=open_refines(vdir, meta))
        new_meta["last_operation"] = {"dropped_rows": int(len(dead)), "tombstone_share": round(share, 4),
                                      "seconds": round(time.perf_counter() - t0, 3)}
        store.write_version_files(stage, [None] * len(indexes), store.read_ids(vdir, meta), new_meta,
                                  probe=probe)
        # The float16 copies are shared as they are: their dead rows are never a candidate to re-rank.
        refine_names = _refine_files(meta)
        shared = {n: r for n, r in _shared_files(vdir, meta, parent, set()).items() if n in refine_names}
        new_meta["version"] = store.publish(root, stage, new_meta, version, keep=keep, uploaded=shared,
                                            expected_current=parent)
    except BaseException:
        store.discard_stage(root, stage, version)
        raise
    return new_meta


def _compact_shard(open_shard: Callable[..., faiss.Index], factory: str, dead: np.ndarray,
                   target: Path) -> faiss.Index:
    """Write the shard ``open_shard()`` opens (memory-mapped; ``open_shard(mmap=False)``: a copy in RAM)
    without the ``dead`` ids to ``target``; returns the new index (memory-mapped)."""
    reader = open_shard()
    ivf = faiss.try_extract_index_ivf(reader)
    if ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFastScan):
        # Fast-scan lists hold codes packed in SIMD blocks, which a list-by-list copy would scramble; their
        # codes are small (m/2 bytes a vector), so an in-RAM copy drops the dead ids.
        writable = open_shard(mmap=False)
        writable.remove_ids(faiss.IDSelectorBatch(np.asarray(dead, np.int64)))
        faiss.write_index(writable, str(target))
    elif ivf is not None:
        _compact_ivf(open_shard, reader, dead, target)
    else:
        faiss.write_index(_compact_flat(reader, factory, dead), str(target))
    return store.read_faiss(target, mmap=True)


def _compact_ivf(open_shard: Callable[[], faiss.Index], reader: faiss.Index, dead: np.ndarray,
                 target: Path) -> None:
    """Copy the kept codes of every inverted list (one list at a time) into a second opening of the shard
    whose lists were replaced by empty in-RAM ones, and write it as a plain index file."""
    src = faiss.try_extract_index_ivf(reader).invlists
    writer = open_shard()
    ivf = faiss.try_extract_index_ivf(writer)
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # the index owns it now
    kept_total = 0
    for no in range(ivf.nlist):
        n = src.list_size(no)
        if not n:
            continue
        ids = faiss.rev_swig_ptr(src.get_ids(no), n).copy()
        codes = faiss.rev_swig_ptr(src.get_codes(no), n * ivf.code_size).reshape(n, ivf.code_size)
        keep = ~np.isin(ids, dead)
        if keep.any():
            kept_ids = np.ascontiguousarray(ids[keep])
            kept_codes = np.ascontiguousarray(codes[keep])
            lists.add_entries(no, int(keep.sum()), faiss.swig_ptr(kept_ids), faiss.swig_ptr(kept_codes))
            kept_total += int(keep.sum())
    ivf.ntotal = kept_total
    writer.ntotal = kept_total
    if ivf.direct_map.type != faiss.DirectMap.NoMap:
        ivf.make_direct_map(True)
    faiss.write_index(writer, str(target))


def _compact_flat(reader: faiss.Index, factory: str, dead: np.ndarray) -> faiss.Index:
    """A fresh ``factory`` index of the kept vectors of an id-mapped flat / HNSW shard (read in slices)."""
    external = faiss.vector_to_array(reader.id_map).astype(np.int64)
    inner = faiss.downcast_index(reader.index)
    rebuilt = make_index(factory, reader.d)
    for start in range(0, int(reader.ntotal), RECONSTRUCT_SLICE):
        n = min(RECONSTRUCT_SLICE, int(reader.ntotal) - start)
        keep = ~np.isin(external[start:start + n], dead)
        if keep.any():
            vectors = inner.reconstruct_n(start, n)[keep]
            rebuilt.add_with_ids(np.ascontiguousarray(vectors), external[start:start + n][keep])
    return rebuilt


# ------------------------------------------------------------------------ version upkeep (shared with build)
def new_version_meta(meta: dict[str, Any], operation: str, parent: str,
                     rewritten: bool = False) -> dict[str, Any]:
    """index.json of a version derived from ``meta`` by ``operation`` (its files are recorded at publish).
    ``rewritten``: the operation writes its shards anew from an in-RAM copy, as plain index files, so they
    lose any on-disk lists file (:mod:`index.ondisk`); a delete shares the parent's files as they are."""
    new = dict(meta)
    new.pop("version", None)
    new.pop("files", None)
    dropped = {"ivfdata"} if rewritten else set()
    new["shards"] = [{k: v for k, v in s.items() if k not in dropped} for s in meta["shards"]]
    new.update(operation=operation, parent_version=parent, created_unix=time.time())
    return new


def drop_from_probe(probe: dict[str, np.ndarray] | None, removed: np.ndarray) -> None:
    """Remove ``removed`` ids from the probes' exact neighbour lists (in place)."""
    if probe is None or len(removed) == 0:
        return
    gone = np.isin(probe["gt_i"], removed)
    probe["gt_i"] = np.where(gone, -1, probe["gt_i"])
    probe["gt_d"] = np.where(gone, -np.inf, probe["gt_d"]).astype(np.float32)
    order = np.argsort(-probe["gt_d"], axis=1, kind="stable")
    probe["gt_i"] = np.take_along_axis(probe["gt_i"], order, axis=1)
    probe["gt_d"] = np.take_along_axis(probe["gt_d"], order, axis=1)


def remeasure(meta: dict[str, Any], indexes: list[faiss.Index], probe: dict[str, np.ndarray] | None,
              dead: np.ndarray | None = None, refines: list[RefineVectors | None] | None = None) -> None:
    """Recall of each shard on its stored probes against their (maintained) exact neighbours, the ``dead``
    (tombstoned) ids filtered out and the candidates re-ranked (``refines``) as a search does; ``count`` =
    the rows FAISS holds less ``dead``."""
    dead = np.zeros(0, np.int64) if dead is None else np.asarray(dead, np.int64)
    refines = refines if refines is not None else [None] * len(indexes)
    if probe is not None:
        k = int(meta.get("recall_k", DEFAULT_K))
        for i, (info, ix) in enumerate(zip(meta["shards"], indexes)):
            sel = probe["shard"] == i
            info["recall"] = (_probe_recall(ix, probe["queries"][sel], probe["gt_i"][sel], k, dead,
                                            refines[i], rerank_depth(info))
                              if sel.any() else float("nan"))
        meta["recall"] = min(s["recall"] for s in meta["shards"])
    for info, ix in zip(meta["shards"], indexes):
        info["count"] = int(ix.ntotal)
    meta["count"] = sum(int(ix.ntotal) for ix in indexes) - len(dead)


def _probe_recall(ix: faiss.Index, queries: np.ndarray, truth: np.ndarray, k: int, dead: np.ndarray,
                  refine: RefineVectors | None = None, depth: int = 0) -> float:
    k = int(min(k, truth.shape[1]))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    selector = None
    if len(dead):
        negated = faiss.IDSelectorBatch(dead)
        selector = faiss.IDSelectorNot(negated)
        selector.keep_alive = negated  # IDSelectorNot does not own the selector it negates
    _, found = search_shard(ix, queries, k, selector, False, refine, depth)
    return recall_at_k(found, truth, k)

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
import pyarrow as pa

from index import store
from index.factory import is_fast_scan, make_index
from index.part import DEFAULT_K
from index.query import open_refine, rerank_depth, search_parameters, search_shard, selector_excluding
from index.rerank import SORT_CHUNK_ROWS, RefineVectors, RefineWriter, drop_mapped_pages
from index.rows import TOMBSTONES_FILE, RowTable, hidden_in_shard, write_tombstones
from index.tuning import apply_search_params, merge_topk, recall_at_k
from runtime import storage

DEFAULT_COMPACT_THRESHOLD = 0.2  # tombstoned share of the stored rows past which compaction pays
DEFAULT_MAX_DELTAS = 8  # upsert delta shards (each searched on its own) past which compaction folds them in
RECONSTRUCT_SLICE = 65536  # vectors a non-IVF shard reconstructs at a time while compacting


def video_rows(rows: RowTable, video_ids: Sequence[str]) -> np.ndarray:
    """Rows of ``video_ids`` (every part's: :meth:`index.rows.RowTable.rows_of_videos`)."""
    return rows.rows_of_videos(video_ids)


def shared_files(vdir: str, meta: dict[str, Any], parent: str, own: set[str]) -> dict[str, dict[str, Any]]:
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
    # The delete reads its parent's files until it publishes: when other writers supersede the parent and
    # prune it meanwhile, the delete is applied again to the new CURRENT (it was lost as an error before).
    return store.read_stable(root, lambda parent: _delete_from(root, parent, video_ids, keep, t0))


def _delete_from(root: str, parent: str, video_ids: list[str], keep: int, t0: float) -> dict[str, Any]:
    """:func:`delete_videos` applied to the version ``parent``."""
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
    with store.staged_version(root) as (version, stage):
        all_dead = write_tombstones(np.concatenate([dead, removed]), stage / TOMBSTONES_FILE)
        own = {TOMBSTONES_FILE, store.ERRORS_FILE}
        if probe is not None:
            with open(stage / store.PROBE_FILE, "wb") as fh:
                np.savez(fh, **probe)
            own.add(store.PROBE_FILE)
        new_meta["stored_count"] = stored
        new_meta["tombstones"] = {"file": TOMBSTONES_FILE, "count": int(len(all_dead))}
        superseded = store.read_superseded(vdir, meta)
        hidden = [hidden_in_shard(all_dead, superseded, i) for i in range(len(meta["shards"]))]
        remeasure(new_meta, _open_shards(vdir, meta), probe, all_dead, hidden, open_refines(vdir, meta))
        new_meta["last_operation"] = {
            "deleted_rows": int(len(removed)),
            "deleted_videos": sorted(found),
            "not_found": sorted(set(video_ids) - found),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        shared = shared_files(vdir, meta, parent, own)
        new_meta["version"] = store.publish(root, stage, new_meta, version, keep=keep, uploaded=shared,
                                            expected_current=parent)
    return new_meta


def open_refines(vdir: str, meta: dict[str, Any]) -> list[RefineVectors | None]:
    """Each shard's float16 re-rank copy, memory-mapped (None for a shard without one)."""
    return [open_refine(vdir, meta, info) for info in meta["shards"]]


def _open_shards(vdir: str, meta: dict[str, Any]) -> list[faiss.Index]:
    """The version's shards, memory-mapped, with their tuned search parameters."""
    indexes = [store.read_shard(vdir, meta, s, mmap=True) for s in meta["shards"]]
    for info, ix in zip(meta["shards"], indexes):
        apply_search_params(ix, info.get("search_params", {}))
    return indexes


def tombstone_share(meta: dict[str, Any]) -> float:
    """Rows no search returns (tombstoned, or superseded by an upsert delta) / stored rows of a version."""
    dead = int((meta.get("tombstones") or {}).get("count", 0))
    dead += int((meta.get("superseded") or {}).get("count", 0))
    return dead / max(1, int(meta.get("stored_count", meta["count"])))


def delta_shards(meta: dict[str, Any]) -> list[int]:
    """Positions of the version's upsert delta shards (folded into their base shard by compaction)."""
    return [i for i, s in enumerate(meta["shards"]) if s.get("delta_of") is not None]


def compact_index(root: str | os.PathLike, threshold: float = DEFAULT_COMPACT_THRESHOLD, keep: int = 3,
                  progress: bool = True, max_deltas: int = DEFAULT_MAX_DELTAS) -> dict[str, Any] | None:
    """When the CURRENT version's share of rows no search returns (tombstoned or superseded) is at least
    ``threshold``, or it has ``max_deltas`` upsert delta shards, publish a version whose shards and ids hold
    only the live rows, each delta folded into its base shard (same trained structures, so no retraining);
    returns its index.json, or None when there was nothing to do."""
    t0 = time.perf_counter()
    root = storage.normalize(root)
    # Read until the publish: applied again to the new CURRENT if the parent is pruned meanwhile.
    return store.read_stable(root, lambda parent: _compact_from(root, parent, threshold, keep, progress,
                                                                max_deltas, t0))


def _compact_from(root: str, parent: str, threshold: float, keep: int, progress: bool, max_deltas: int,
                  t0: float) -> dict[str, Any] | None:
    """:func:`compact_index` applied to the version ``parent``."""
    vdir = store.version_dir(root, parent)
    meta = store.read_meta(vdir)
    share, deltas = tombstone_share(meta), delta_shards(meta)
    if (share == 0 or share < threshold) and len(deltas) < max(1, int(max_deltas)):
        return None
    bases = len(meta["shards"]) - len(deltas)
    if deltas != list(range(bases, len(meta["shards"]))):
        raise store.CorruptIndexError(f"index version {vdir!r}: delta shards {deltas} are not the last ones")
    dead, superseded = store.read_dead_ids(vdir, meta), store.read_superseded(vdir, meta)
    with store.staged_version(root) as (version, stage):
        indexes = []
        for i, info in enumerate(meta["shards"][:bases]):
            members = [i] + [j for j in deltas if meta["shards"][j]["delta_of"] == i]
            if info.get("rerank"):
                indexes.append(_compact_reranked(vdir, meta, members, dead, superseded, stage))
            else:
                sources = [(functools.partial(store.read_shard, vdir, meta, meta["shards"][j], mmap=True),
                            hidden_in_shard(dead, superseded, j)) for j in members]
                indexes.append(_compact_shard(sources, info["factory"], stage / info["file"]))
            apply_search_params(indexes[-1], info.get("search_params", {}))
            if progress:
                print(f"[compact] shard {i + 1}/{bases} (+{len(members) - 1} deltas folded): "
                      f"{indexes[-1].ntotal} rows kept", flush=True)
        new_meta = new_version_meta(meta, "compact", parent, rewritten=True)
        new_meta["shards"] = new_meta["shards"][:bases]
        for key in ("tombstones", "stored_count", "superseded", "row_parts"):
            new_meta.pop(key, None)
        probe = fold_probes(store.read_probe(vdir, meta), meta, bases)
        refines = [RefineVectors(stage / info["rerank"]["vectors"], stage / info["rerank"]["ids"])
                   if info.get("rerank") else None for info in new_meta["shards"]]
        remeasure(new_meta, indexes, probe, refines=refines)
        dropped = int(meta.get("stored_count", meta["count"])) - int(meta["count"])
        new_meta["last_operation"] = {"dropped_rows": dropped, "tombstone_share": round(share, 4),
                                      "folded_deltas": len(deltas),
                                      "seconds": round(time.perf_counter() - t0, 3)}
        ids = store.read_ids(vdir, meta)  # the live rows; a delta's rows move to its base shard
        base_of = np.array([s.get("delta_of", i) for i, s in enumerate(meta["shards"])], np.int32)
        ids = ids.set_column(ids.schema.get_field_index("shard"), "shard",
                             pa.array(base_of[ids.column("shard").to_numpy()], pa.int32()))
        store.write_version_files(stage, [None] * len(indexes), ids, new_meta, probe=probe)
        new_meta["version"] = store.publish(root, stage, new_meta, version, keep=keep,
                                            expected_current=parent)
    return new_meta


def fold_probes(probe: dict[str, np.ndarray] | None, meta: dict[str, Any],
                bases: int) -> dict[str, np.ndarray] | None:
    """The probe set of the compacted version: a delta shard's probes are its base shard's queries (same
    order) with exact neighbours among the delta's rows, merged here into the base's neighbour lists."""
    if probe is None:
        return None
    depth = probe["gt_i"].shape[1]
    for j in range(bases, len(meta["shards"])):
        base, delta = probe["shard"] == meta["shards"][j]["delta_of"], probe["shard"] == j
        if base.sum() != delta.sum():
            raise store.CorruptIndexError(f"probe set: delta shard {j} has {int(delta.sum())} probes, "
                                          f"its base {int(base.sum())}")
        merged = merge_topk(probe["gt_d"][base], probe["gt_i"][base], probe["gt_d"][delta],
                            probe["gt_i"][delta], depth)
        probe["gt_d"][base], probe["gt_i"][base] = merged
    keep = probe["shard"] < bases
    return {key: value[keep] for key, value in probe.items()}


def empty_like(vdir: str, meta: dict[str, Any], shard: int) -> faiss.Index:
    """An index with ``shard``'s trained structure and no rows: an IVF shard opened memory-mapped with its
    lists replaced by empty in-RAM ones (the quantizer and codec are kept: the codes stay compatible);
    other shards are made anew from their factory (flat / HNSW need no training)."""
    info = meta["shards"][shard]
    opened = store.read_shard(vdir, meta, info, mmap=True)
    ivf = faiss.try_extract_index_ivf(opened)
    if ivf is None:
        return make_index(info["factory"], int(meta["dim"]))
    if is_fast_scan(ivf):
        # Fast-scan lists hold codes packed in SIMD blocks: empty lists of that layout, not plain arrays.
        packer = ivf.get_CodePacker()
        packer.this.disown()  # the block lists own (and delete) their packer
        lists = faiss.BlockInvertedLists(ivf.nlist, packer)
    else:
        lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # the index owns it now
    ivf.ntotal = 0
    opened.ntotal = 0
    if ivf.direct_map.type != faiss.DirectMap.NoMap:
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # a Hashtable map takes add_with_ids
    return opened


def _compact_reranked(vdir: str, meta: dict[str, Any], members: Sequence[int], dead: np.ndarray,
                      superseded: tuple[np.ndarray, np.ndarray], stage: Path) -> faiss.Index:
    """A shard with a float16 re-rank copy (fast-scan codes, whose SIMD-packed lists a list-by-list copy
    would scramble) and its upsert deltas: every live row is re-encoded from the float16 copies, a chunk at a
    time, into the base's trained structure with empty lists, and written to the new float16 copy too (the
    re-rank scores those vectors anyway); returns the new shard, memory-mapped."""
    info = meta["shards"][members[0]]
    index = empty_like(vdir, meta, members[0])
    writer = RefineWriter(stage, info["file"], int(meta["dim"]))
    try:
        for j in members:
            refine = open_refine(vdir, meta, meta["shards"][j])
            if refine is None:
                raise store.CorruptIndexError(f"index version {vdir!r}: shard {j} of re-ranked shard "
                                              f"{info['file']!r} has no float16 copy")
            hidden = hidden_in_shard(dead, superseded, j)
            for start in range(0, len(refine), SORT_CHUNK_ROWS):
                ids = np.asarray(refine.ids[start:start + SORT_CHUNK_ROWS], dtype=np.int64)
                keep = ~np.isin(ids, hidden)
                vectors = np.asarray(refine.vectors[start:start + SORT_CHUNK_ROWS][keep], dtype=np.float32)
                index.add_with_ids(vectors, ids[keep])
                writer.add(vectors, ids[keep])
                drop_mapped_pages(refine.vectors)  # a pass over the copy would add its size to the RSS
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    faiss.write_index(index, str(stage / info["file"]))
    return store.read_faiss(stage / info["file"], mmap=True)


Source = tuple[Callable[[], faiss.Index], np.ndarray]  # (open the shard memory-mapped, ids it hides)


def _compact_shard(sources: Sequence[Source], factory: str, target: Path) -> faiss.Index:
    """Write the rows of the shards ``sources`` open (memory-mapped; the first is the base, the others its
    upsert deltas), less the ids each hides, as one shard at ``target``; returns it (memory-mapped)."""
    reader = sources[0][0]()
    if faiss.try_extract_index_ivf(reader) is not None:
        _compact_ivf(sources, target)
    else:
        faiss.write_index(_compact_flat(sources, factory, reader.d), str(target))
    return store.read_faiss(target, mmap=True)


def _compact_ivf(sources: Sequence[Source], target: Path) -> None:
    """Copy the kept codes of every inverted list of every source (one list at a time) into a second opening
    of the base shard whose lists were replaced by empty in-RAM ones, and write it as a plain index file.
    A delta's codes are the base's (its trained quantizer and codec are a copy of the base's)."""
    writer = sources[0][0]()
    ivf = faiss.try_extract_index_ivf(writer)
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # the index owns it now
    kept_total = 0
    for open_shard, hidden in sources:
        reader = open_shard()  # held: its lists are read below
        src_ivf = faiss.try_extract_index_ivf(reader)
        if (src_ivf.nlist, src_ivf.code_size) != (ivf.nlist, ivf.code_size):
            raise store.CorruptIndexError("a delta shard's lists do not match its base shard's")
        src = src_ivf.invlists
        for no in range(ivf.nlist):
            n = src.list_size(no)
            if not n:
                continue
            ids = faiss.rev_swig_ptr(src.get_ids(no), n).copy()
            codes = faiss.rev_swig_ptr(src.get_codes(no), n * ivf.code_size).reshape(n, ivf.code_size)
            keep = ~np.isin(ids, hidden)
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


def _compact_flat(sources: Sequence[Source], factory: str, dim: int) -> faiss.Index:
    """A fresh ``factory`` index of the kept vectors of id-mapped flat / HNSW shards (read in slices)."""
    rebuilt = make_index(factory, dim)
    for open_shard, hidden in sources:
        reader = open_shard()
        external = faiss.vector_to_array(reader.id_map).astype(np.int64)
        inner = faiss.downcast_index(reader.index)
        for start in range(0, int(reader.ntotal), RECONSTRUCT_SLICE):
            n = min(RECONSTRUCT_SLICE, int(reader.ntotal) - start)
            keep = ~np.isin(external[start:start + n], hidden)
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
              dead: np.ndarray | None = None, shard_hidden: Sequence[np.ndarray] | None = None,
              refines: list[RefineVectors | None] | None = None) -> None:
    """Recall of each shard on its stored probes against their (maintained) exact neighbours, the ``dead``
    (tombstoned) ids filtered out as a search does (``shard_hidden``: per shard, when upsert deltas
    supersede rows) and the candidates re-ranked (``refines``) as a search does; ``count`` = the rows FAISS
    holds less ``dead`` and the superseded rows."""
    dead = np.zeros(0, np.int64) if dead is None else np.asarray(dead, np.int64)
    refines = refines if refines is not None else [None] * len(indexes)
    if probe is not None:
        k = int(meta.get("recall_k", DEFAULT_K))
        for i, (info, ix) in enumerate(zip(meta["shards"], indexes)):
            sel = probe["shard"] == i
            hidden = dead if shard_hidden is None else shard_hidden[i]
            if info.get("delta_of") is not None and sel.any():
                info["recall"] = delta_recall(ix, probe, i, info["delta_of"], k, hidden)
            else:
                info["recall"] = (_probe_recall(ix, probe["queries"][sel], probe["gt_i"][sel], k, hidden,
                                                refines[i], rerank_depth(info))
                                  if sel.any() else float("nan"))
        meta["recall"] = version_recall(meta["shards"])
    for info, ix in zip(meta["shards"], indexes):
        info["count"] = int(ix.ntotal)
    superseded = int((meta.get("superseded") or {}).get("count", 0))
    meta["count"] = sum(int(ix.ntotal) for ix in indexes) - len(dead) - superseded


def delta_recall(index: faiss.Index, probe: dict[str, np.ndarray], delta: int, base_shard: int, k: int,
                 hidden: np.ndarray) -> float:
    """Share of the delta rows that belong in a probe's merged top ``k`` (an exact neighbour among the delta
    rows scoring at least the base shard's k-th exact neighbour) that a search of the delta finds. A small
    delta's own top k is mostly rows far from the probe, which no search needs: they do not count. NaN
    when no delta row enters any probe's top k."""
    base, sel = probe["shard"] == base_shard, probe["shard"] == delta
    k = int(min(k, probe["gt_i"].shape[1]))
    bar = probe["gt_d"][base][:, k - 1]
    truth_d, truth_i = probe["gt_d"][sel][:, :k], probe["gt_i"][sel][:, :k]
    relevant = (truth_i >= 0) & (truth_d >= bar[:, None])
    if not relevant.any():
        return float("nan")
    queries = np.ascontiguousarray(probe["queries"][sel], dtype=np.float32)
    params, keep_alive = search_parameters(index, selector_excluding(hidden), exhaustive=False)
    _, found = index.search(queries, int(min(k, max(index.ntotal, 1))), params=params)
    del keep_alive
    hits = sum(int(np.isin(truth_i[q][relevant[q]], found[q]).sum()) for q in range(len(queries)))
    return hits / int(relevant.sum())


def version_recall(shards: list[dict[str, Any]]) -> float:
    """The version's recall: its worst shard's (a delta no probe's top k reaches, NaN, is left out)."""
    recalls = [float(s.get("recall", float("nan"))) for s in shards]
    measured = [r for r in recalls if r == r]
    return min(measured) if measured else float("nan")


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

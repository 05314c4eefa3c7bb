"""Upserts without a copy: new rows go into a delta shard, the rows they replace are superseded.

:func:`upsert_embeddings` publishes a version made of the previous version's files, shared as they are
(referenced in its index.json by ``"version"``, as a delete shares them: :mod:`index.tombstones`), plus:

- a **delta shard** (``delta-<version>.faiss``, appended to ``shards`` with ``delta_of``: the base shard whose
  trained quantizer / codec it copies, so compaction can fold its codes into that shard's lists) holding the
  embeddings' rows, and its rows ``ids-<version>.arrow`` (appended to ``row_parts``);
- ``superseded.parquet``: ``(id, before_shard)``, the ids whose rows in every shard below ``before_shard``
  a later shard replaces. A re-embedded video keeps its ids (``stable_id(video_id, clip)``), so its old rows
  cannot be tombstoned by id: each shard's search skips the ids a later shard supersedes
  (:func:`index.store.shard_hidden_ids`); an old row whose id the new embeddings no longer have is tombstoned;
- the probe set: the replaced ids leave the exact neighbour lists, and the delta gets a copy of its base
  shard's probe queries with their exact neighbours among the delta's rows (its recall is measured on them;
  the other shards keep the recall they were last measured at).

Nothing of the previous version is read into memory: its ids table and FAISS files are memory-mapped, the
delta starts from an empty copy of the base shard's trained structure, and the new rows are streamed. The new
bytes, time and memory grow with the upserted rows, not the corpus. :func:`index.tombstones.compact_index`
folds the deltas into their base shards (the nightly reindex runs it).
"""

from __future__ import annotations

import os
import time
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from index import store
from index.build import check_compatible, video_ids_of
from index.embeddings import EmbeddingSource, errors_table, iter_batches, resolve_embeddings
from index.part import finish_progress, row_progress
from index.rerank import RefineWriter
from index.rows import (
    SUPERSEDED_FILE,
    TOMBSTONES_FILE,
    hidden_in_shard,
    write_rows,
    write_superseded,
    write_tombstones,
)
from index.tombstones import (
    delta_recall,
    drop_from_probe,
    empty_like,
    new_version_meta,
    shared_files,
    version_recall,
)
from index.tuning import ExactTopK, apply_search_params
from runtime import storage

BASE_SHARD = 0  # the shard whose trained structure every delta copies (and is folded into)


def upsert_embeddings(root: str | os.PathLike, embeddings: str | os.PathLike, batch_size: int = 65536,
                      keep: int = 3, progress: bool = True, upsert: bool = True) -> dict[str, Any]:
    """Upsert ``embeddings`` into the CURRENT version without a copy (see the module docstring): every video
    they hold loses its old rows, their rows are added as a delta shard. Ids the index holds for another
    video (every id it holds, without ``upsert``) and repeated ids become ``duplicate_id`` error records
    (``errors.parquet`` of the new version). Returns the new index.json."""
    t0 = time.perf_counter()
    root = storage.normalize(root)
    # The parent's files are read until the publish: when other writers supersede and prune it meanwhile,
    # the upsert is applied again to the new CURRENT (as a delete is).
    return store.read_stable(root, lambda parent: _upsert_onto(root, parent, embeddings, batch_size, keep,
                                                               progress, upsert, t0))


def _upsert_onto(root: str, parent: str, embeddings: str | os.PathLike, batch_size: int, keep: int,
                 progress: bool, upsert: bool, t0: float) -> dict[str, Any]:
    """:func:`upsert_embeddings` applied to the version ``parent``."""
    vdir = store.version_dir(root, parent)
    meta = store.read_meta(vdir)
    source = check_compatible(resolve_embeddings(embeddings), meta, embeddings, root)
    with store.staged_version(root) as (version, stage):
        new_meta = _stage_delta(vdir, meta, parent, source, stage, version, batch_size, progress, upsert)
        new_meta["last_operation"]["seconds"] = round(time.perf_counter() - t0, 3)
        own = set(os.listdir(stage)) | {store.ERRORS_FILE}  # the parent's errors are not this upsert's
        shared = shared_files(vdir, meta, parent, own)
        new_meta["version"] = store.publish(root, stage, new_meta, version, keep=keep, uploaded=shared,
                                            expected_current=parent)
    return new_meta


def _stage_delta(vdir: str, meta: dict[str, Any], parent: str, source: EmbeddingSource, stage, version: str,
                 batch_size: int, progress: bool, upsert: bool) -> dict[str, Any]:
    """Write the delta shard, its rows, the superseded / tombstone sets and the probes into ``stage``;
    returns the new version's index.json (files recorded at publish)."""
    rows = store.read_row_table(vdir, meta)
    dead = store.read_dead_ids(vdir, meta)
    sup_ids, sup_before = store.read_superseded(vdir, meta)
    delta = len(meta["shards"])
    old_rows = rows.rows_of_videos(video_ids_of(source, batch_size)) if upsert else np.zeros(0, np.int64)
    old_ids = np.unique(np.asarray(rows.column("id", old_rows), dtype=np.int64))
    index = empty_like(vdir, meta, BASE_SHARD)
    probe = store.read_probe(vdir, meta)
    base_probes = probe["queries"][probe["shard"] == BASE_SHARD] if probe is not None else None
    depth = probe["gt_i"].shape[1] if probe is not None else 0
    exact = ExactTopK(base_probes, depth) if base_probes is not None and len(base_probes) else None
    base = meta["shards"][BASE_SHARD]
    info = {**base, "file": f"delta-{version}.faiss", "delta_of": BASE_SHARD}
    info.pop("ivfdata", None)
    # A re-ranked base (compressed codes) gets a delta with its own float16 copy of the new rows: the re-rank
    # must score a delta's candidates against their new vectors, never the base's copy.
    refine = RefineWriter(stage, info["file"], int(meta["dim"])) if base.get("rerank") else None
    try:
        tables, errors = _add_delta_rows(index, rows, old_ids, dead, source, exact, delta, batch_size,
                                         progress, refine)
        if refine is not None:
            refine.finish()
            info["rerank"] = {**base["rerank"], "vectors": refine.names[0], "ids": refine.names[1]}
    except BaseException:
        if refine is not None:
            refine.abort()
        raise
    added = [t.column("id").to_numpy() for t in tables]
    new_ids = np.unique(np.concatenate(added)) if added else np.zeros(0, np.int64)
    stale = old_ids[~np.isin(old_ids, dead)]  # the upserted videos' rows a search returns today
    replaced = np.union1d(np.intersect1d(stale, new_ids), np.intersect1d(dead, new_ids))
    gone = np.setdiff1d(stale, new_ids)  # old rows the new embeddings have no id for: tombstoned
    all_dead = np.union1d(np.setdiff1d(dead, new_ids), gone)  # a re-added deleted id lives again
    superseded = (np.concatenate([sup_ids, replaced]),
                  np.concatenate([sup_before, np.full(len(replaced), delta, np.int32)]))
    write_superseded(*superseded, stage / SUPERSEDED_FILE)
    write_tombstones(all_dead, stage / TOMBSTONES_FILE)
    row_part = f"ids-{version}.arrow"
    write_rows(pa.concat_tables(tables) if tables else _empty_rows(rows), stage / row_part)
    faiss.write_index(index, str(stage / info["file"]))
    apply_search_params(index, info.get("search_params", {}))
    new_meta = new_version_meta(meta, "upsert", parent)
    new_meta["shards"].append(info)
    new_meta["row_parts"] = list(meta.get("row_parts") or [store.ROWS_FILE]) + [row_part]
    stored = int(meta.get("stored_count", meta["count"])) + int(index.ntotal)
    prior = int((meta.get("superseded") or {}).get("count", 0))
    new_meta.update(stored_count=stored, tombstones={"file": TOMBSTONES_FILE, "count": int(len(all_dead))},
                    superseded={"file": SUPERSEDED_FILE, "count": prior + int(len(replaced))})
    _delta_probes(probe, exact, np.union1d(replaced, gone), delta, stage)
    counts = [int(s["count"]) for s in meta["shards"]] + [int(index.ntotal)]
    _measure(new_meta, index, probe, hidden_in_shard(all_dead, superseded, delta), counts)
    if errors:
        pq.write_table(errors_table(errors), stage / store.ERRORS_FILE)
    new_meta["last_operation"] = {"upserted_rows": int(index.ntotal), "replaced": int(len(replaced)),
                                  "tombstoned": int(len(gone)), "errors": len(errors)}
    return new_meta


def _add_delta_rows(index: faiss.Index, rows, old_ids: np.ndarray, dead: np.ndarray, source: EmbeddingSource,
                    exact: ExactTopK | None, delta: int, batch_size: int, progress: bool,
                    refine: RefineWriter | None = None) -> tuple[list[pa.Table], list[dict[str, Any]]]:
    """Stream ``source`` into the delta ``index``; returns (ids tables of the added rows, error records). An
    id the parent holds live for a video not being upserted is a ``duplicate_id`` error (looked up in the
    memory-mapped ids, never a set of every id)."""
    tables, errors = [], []
    bar = row_progress("upsert", source.num_rows, progress)
    for batch in iter_batches(source, batch_size=batch_size, seen_ids=set()):  # repeats within the delta
        errors.extend(batch.errors)
        taken = (rows.rows_of(batch.ids) >= 0) & ~np.isin(batch.ids, old_ids) & ~np.isin(batch.ids, dead)
        for i in np.flatnonzero(taken):
            errors.append({"id": int(batch.ids[i]), "video_id": batch.meta.column("video_id")[i].as_py(),
                           "key": batch.meta.column("key")[i].as_py(), "reason": "duplicate_id",
                           "message": f"id {int(batch.ids[i])} is already indexed for another video"})
        ok = ~taken
        if ok.any():
            index.add_with_ids(np.ascontiguousarray(batch.vectors[ok]), np.ascontiguousarray(batch.ids[ok]))
            if exact is not None:
                exact.add(batch.vectors[ok], batch.ids[ok])
            if refine is not None:
                refine.add(batch.vectors[ok], batch.ids[ok])
            meta = batch.meta.filter(pa.array(ok))
            tables.append(meta.set_column(meta.schema.get_field_index("shard"), "shard",
                                          pa.array(np.full(meta.num_rows, delta, np.int32))))
        bar.update(len(batch.ids) + len(batch.errors))
    finish_progress(bar)
    return tables, errors


def _empty_rows(rows) -> pa.Table:
    """A delta with no valid row still records its (empty) rows part, in the parent's columns."""
    public = [c for c in rows.table.column_names if not c.startswith("_")]
    return rows.table.select(public).slice(0, 0)


def _delta_probes(probe: dict[str, np.ndarray] | None, exact: ExactTopK | None, hidden: np.ndarray,
                  delta: int, stage) -> None:
    """Drop the superseded / tombstoned ids from every probe's neighbours, append the delta's probes (the
    base shard's queries, exact neighbours among the delta rows) and write the probe file into ``stage``."""
    if probe is None:
        return
    drop_from_probe(probe, hidden)
    if exact is not None:
        gt_d, gt_i = exact.result()
        base = probe["shard"] == BASE_SHARD
        probe["queries"] = np.concatenate([probe["queries"], probe["queries"][base]])
        probe["gt_d"] = np.concatenate([probe["gt_d"], gt_d.astype(np.float32)])
        probe["gt_i"] = np.concatenate([probe["gt_i"], gt_i.astype(probe["gt_i"].dtype)])
        copies = np.full(int(base.sum()), delta, probe["shard"].dtype)
        probe["shard"] = np.concatenate([probe["shard"], copies])
    with open(stage / store.PROBE_FILE, "wb") as fh:
        np.savez(fh, **probe)


def _measure(meta: dict[str, Any], index: faiss.Index, probe: dict[str, np.ndarray] | None,
             hidden: np.ndarray, counts: list[int]) -> None:
    """The delta shard's recall (:func:`delta_recall`; the other shards keep the recall last measured:
    measuring them would read their lists), every shard's count and the version's live count."""
    info = meta["shards"][-1]
    info["recall"] = float("nan")
    if probe is not None:
        k = int(meta.get("recall_k", 10))
        info["recall"] = delta_recall(index, probe, len(counts) - 1, BASE_SHARD, k, hidden)
    for shard, count in zip(meta["shards"], counts):
        shard["count"] = count
    meta["recall"] = version_recall(meta["shards"])
    dead = int(meta["tombstones"]["count"])
    meta["count"] = int(meta["stored_count"]) - dead - int(meta["superseded"]["count"])

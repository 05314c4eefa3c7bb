"""Build, extend and shrink versioned FAISS indexes from embeddings Parquet, streamed in batches.

Build = one :func:`index.part.build_part` per shard (pass 1: sample training + held-out probe vectors →
train → pass 2: add in chunks while computing exact top-k of the probes → tune nprobe/efSearch), in this
process or as Ray tasks (:mod:`index.sharded`) → publish. Add / upsert copy the current version,
change it without retraining and publish a new version; a delete publishes tombstones only
(:mod:`index.tombstones`, re-exported here as :func:`delete_videos`).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from index import store
from index.distributed import DEFAULT_SLICE_ROWS, build_distributed
from index.embeddings import (
    EmbeddingSource,
    errors_table,
    iter_batches,
    resolve_embeddings,
    shard_of,
)
from index.factory import METRIC, make_index, parse_memory, supports_remove
from index.part import (
    DEFAULT_GROWTH_FACTOR,
    DEFAULT_K,
    DEFAULT_MEMORY,
    DEFAULT_NO_TEXT_RULE,
    DEFAULT_PROBES,
    DEFAULT_RECALL,
    NO_TEXT_RULES,
    build_part,
    finish_progress,
    row_progress,
)
from index.query import open_refine
from index.rerank import SORT_CHUNK_ROWS, RefineVectors, RefineWriter, drop_mapped_pages
from index.rows import ColumnParts
from index.sharded import build_parts_with_ray, parts_uri
from index.tombstones import delete_videos as delete_videos  # re-exported: jobs.index calls build's
from index.tombstones import drop_from_probe, new_version_meta, open_refines, remeasure
from index.tuning import (
    ExactTopK,
    apply_search_params,
    merge_topk,
    normalize_queries,
    pick_queries,
    read_caption_vectors,
    read_query_log,
)
from runtime import storage
from runtime.progress import Progress

AUTO = "auto"  # text_queries: the caption embeddings beside the embeddings, when there are any
DEFAULT_TEXT_QUERIES = 1000  # text queries a build tunes on, at most
TEXT_EMBEDDINGS_DIR = "_text"  # OUT/_text/model_id=<id>/ = pipeline.embedding.TEXT_ROOT (not imported)


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
        "lineage": build_lineage(source),
        "num_shards": len(shards),
        "shards": shards,
        "errors": sum(s["errors"] for s in shards),
        "created_unix": time.time(),
        "operation": "build",
    }


def build_lineage(source: EmbeddingSource) -> dict[str, Any]:
    """index.json's ``lineage``: the embeddings a version was built from, the shard tars their rows record
    (where the service finds previews and metadata), the part files that record none, and the model."""
    card = source.model
    model = {"model_id": card.get("model_id"), "model_name": card.get("model_name"),
             "checkpoint": card.get("pretrained"), "random_init": card.get("random_init")}
    return {**source.lineage(), "model": model}


def merge_lineage(before: dict[str, Any], source: EmbeddingSource) -> dict[str, Any]:
    """The lineage of a version that adds ``source`` to one recorded in ``before`` (index.json); rows of a
    version built before index.json recorded lineage count as unrecorded (its embedding files are named)."""
    unknown = list(before.get("sources", []))
    old = before.get("lineage") or {"embeddings": [], "shards": [], "unrecorded": unknown}
    new = build_lineage(source)
    return {"embeddings": list(dict.fromkeys(old["embeddings"] + new["embeddings"])),
            "shards": sorted(set(old["shards"]) | set(new["shards"])),
            "unrecorded": list(dict.fromkeys(old["unrecorded"] + new["unrecorded"])),
            "model": old.get("model") or new["model"]}


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
    text_queries: str | Sequence[str] | None = AUTO,
    query_log: str | Sequence[str] | None = None,
    max_text_queries: int = DEFAULT_TEXT_QUERIES,
    encoder=None,
    allow_random_init: bool = False,
    distributed: bool = False,
    slice_rows: int = DEFAULT_SLICE_ROWS,
    no_text_rule: str = DEFAULT_NO_TEXT_RULE,
) -> dict[str, Any]:
    """Full (re)build of ``output`` from ``embeddings``; publishes a new version and returns its index.json.

    ``shards > 1`` builds the shards in parallel as Ray tasks (see :mod:`index.sharded`). ``distributed``
    builds one on-disk IVF index with Ray tasks over slices of ``slice_rows`` rows, none of which holds the
    corpus (see :mod:`index.distributed`; docs/index.md says when to choose which).

    nprobe / efSearch are tuned on *text* queries when there are any (:func:`text_tuning_set`): caption
    embeddings (``text_queries``: Parquet files/folders; ``"auto"`` = the ``jobs.embed --with-text`` folder
    beside the embeddings when it exists; None = none) and a service query log (``query_log``: JSONL
    files/folders, encoded with the index's text encoder, or ``encoder``); else on held-out video vectors.
    index.json's ``tuning_queries`` records which set it was and ``recall`` the recall@k reached on it.
    """
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if distributed and shards > 1:
        raise ValueError(f"a distributed build makes one on-disk index: pass shards=1, not {shards}")
    t0 = time.perf_counter()
    expected_current = store.read_current(output, missing_ok=True)  # the version this build replaces
    source = resolve_embeddings(embeddings)
    no_text_rule = "video" if distributed else no_text_rule  # a distributed build tunes on its video probes
    text_vecs, tuning = text_tuning_set(source, text_queries, query_log, max_text_queries, seed, encoder,
                                        allow_random_init, no_text_rule)
    kwargs = dict(
        text_queries=text_vecs,
        factory=factory,
        memory_budget=memory_budget,
        recall_target=recall_target,
        k=k,
        num_probes=num_probes,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    if text_vecs is None and not distributed:
        kwargs["no_text_rule"] = no_text_rule
    with store.staged_version(output, version) as (version, stage):
        parts = _build_parts(source, (output, version), stage, shards, distributed, slice_rows, kwargs)
        meta = _combine_meta(
            source, parts, factory, recall_target, k, memory_budget, time.perf_counter() - t0
        )
        meta["tuning_queries"] = dict(tuning, video_probes=sum(p["info"]["num_probes"] for p in parts))
        if tuning["kind"] != "video":
            meta["video_probe_recall"] = min(p["info"]["video_probe_recall"] for p in parts)
        uploaded = _stage_parts(parts, stage, meta)
        if shards > 1:
            storage.remove(parts_uri(output, version), recursive=True)  # the shard tasks' ids: staged now
        meta["version"] = store.publish(output, stage, meta, version, keep=keep, uploaded=uploaded,
                                        expected_current=expected_current)
    if progress:
        _print_published(output, meta, k, tuning["kind"])
    return meta


def _stage_parts(parts: list[dict[str, Any]], stage, meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Write the built parts' files into the local ``stage`` (their indexes, ids, probes, errors; an
    in-process build's float16 re-rank copies move there); returns the records of the files the parts'
    Ray tasks uploaded themselves."""
    ids = ColumnParts([p["ids"] for p in parts])  # each column read once, when it is sorted
    probe = _stack_probes([p["probe"] for p in parts])
    errors = errors_table([e for p in parts for e in p["errors"]])
    store.write_version_files(stage, [p["index"] for p in parts], ids, meta, probe=probe, errors=errors)
    for part in parts:
        local = part.get("local_files") or {}
        for name, path in local.items():
            shutil.move(str(path), str(Path(stage) / name))
        for folder in {Path(path).parent for path in local.values()}:
            shutil.rmtree(folder, ignore_errors=True)
    uploaded = {name: rec for p in parts for name, rec in (p.get("records") or {}).items()}
    uploaded.update({p["info"]["file"]: p["record"] for p in parts if p.get("record")})
    return uploaded


def _print_published(output: str, meta: dict[str, Any], k: int, tuned_on: str) -> None:
    print(
        f"[index] published {storage.join(output, store.VERSIONS_DIR, meta['version'])}: "
        f"{meta['count']} vectors, "
        f"{meta['factory']}, recall@{k}={meta['recall']:.4f} on {tuned_on} queries, "
        f"{meta['build_time_s']:.1f}s",
        file=sys.stderr,
        flush=True,
    )


def _build_parts(
    source: EmbeddingSource,
    target: tuple[str, str],
    stage,
    shards: int,
    distributed: bool,
    slice_rows: int,
    kwargs: dict[str, Any],
) -> list[dict[str, Any]]:
    """The built parts of a version: one in this process, ``shards`` Ray tasks, or a distributed build."""
    if distributed:
        return [build_distributed(source, target, stage, slice_rows=slice_rows, **kwargs)]
    if shards == 1:
        return [build_part(source, (0, 1), **kwargs)]
    return build_parts_with_ray(source, shards, target=target, **kwargs)


def text_tuning_set(
    source: EmbeddingSource,
    text_queries: str | Sequence[str] | None = AUTO,
    query_log: str | Sequence[str] | None = None,
    limit: int = DEFAULT_TEXT_QUERIES,
    seed: int = 0,
    encoder=None,
    allow_random_init: bool = False,
    no_text_rule: str = DEFAULT_NO_TEXT_RULE,
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """The text queries a build tunes on (None when there are none) and their description for index.json:
    at most ``limit`` of them, the query log's first, then caption embeddings at random. Without any, the
    ``kind`` is ``no_text_rule`` (:data:`index.part.NO_TEXT_RULES`: what each shard then tunes on)."""
    if no_text_rule not in NO_TEXT_RULES:
        raise ValueError(f"no_text_rule must be one of {NO_TEXT_RULES}, got {no_text_rule!r}")
    if text_queries == AUTO:
        beside = caption_embeddings_beside(source)
        text_queries = beside if beside is not None and storage.list_files(beside, ".parquet") else None
    captions = np.zeros((0, source.dim), np.float32)
    info: dict[str, Any] = {"kind": no_text_rule}
    if text_queries:
        _check_caption_model(text_queries, source)
        captions, _texts = read_caption_vectors(text_queries, source.dim)
        info["captions"] = {"sources": _as_list(text_queries), "distinct": len(captions)}
    logged = np.zeros((0, source.dim), np.float32)
    if query_log:
        texts = read_query_log(query_log)
        logged = _encode_texts(texts, source, encoder, allow_random_init) if texts else logged
        info["query_log"] = {"sources": _as_list(query_log), "distinct": len(logged)}
    vectors = pick_queries(logged, captions, int(limit), seed)
    if not len(vectors):
        return None, info
    info.update(kind="text", count=len(vectors), from_query_log=min(len(logged), int(limit)))
    return vectors, info


def caption_embeddings_beside(source: EmbeddingSource) -> str | None:
    """Where ``jobs.embed --with-text`` puts the caption embeddings of the partition ``OUT/model_id=X``:
    ``OUT/_text/model_id=X`` (:func:`pipeline.embedding.text_dir`); None for a source that is not a
    partition folder."""
    root = storage.normalize(source.root)
    if not storage.name(root).startswith("model_id="):
        return None
    return storage.join(storage.parent(root), TEXT_EMBEDDINGS_DIR, storage.name(root))


def _check_caption_model(text_queries: str | Sequence[str], source: EmbeddingSource) -> None:
    """A ``model_id=X`` caption folder must be the embeddings' model: vectors of two models never compare."""
    partition = storage.name(storage.normalize(source.root))
    for uri in _as_list(text_queries):
        folder = storage.name(storage.normalize(uri))
        if folder.startswith("model_id=") and partition.startswith("model_id=") and folder != partition:
            raise ValueError(f"caption embeddings {uri!r} come from {folder}, the embeddings from "
                             f"{partition}: text queries must be encoded by the index's model")


def _encode_texts(texts: list[str], source: EmbeddingSource, encoder, allow_random_init: bool) -> np.ndarray:
    """Query-log texts encoded by the embeddings' model (``_model.json``: model_name + pretrained)."""
    # Lazy: torch and models (which pulls in torch) are optional heavy dependencies only a query log needs.
    import torch

    import models  # lazy: see above

    if encoder is None:
        name = source.model.get("model_name")
        if not name:
            raise ValueError(f"embeddings {source.root!r} record no model_name: cannot encode the query log")
        encoder, _transform, _tokenizer = models.create_inference_model(
            name, pretrained=source.model.get("pretrained"), allow_random_init=allow_random_init, seed=0)
        encoder.eval()
    if source.model_id and getattr(encoder, "model_id", None) != source.model_id:
        raise ValueError(f"query-log encoder {getattr(encoder, 'model_id', None)!r} is not the embeddings' "
                         f"model {source.model_id!r}")
    with torch.no_grad():
        out = [encoder.encode_text(texts[i:i + 256]).float().cpu().numpy() for i in range(0, len(texts), 256)]
    return normalize_queries(np.concatenate(out), "query log vectors")


def _as_list(uris: str | Sequence[str]) -> list[str]:
    return [str(uris)] if isinstance(uris, (str, os.PathLike)) else [str(u) for u in uris]


def _stack_probes(probes: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One probe file for all shards: a ``shard`` array says which shard each probe belongs to."""
    out = {key: np.concatenate([p[key] for p in probes]) for key in ("queries", "gt_d", "gt_i")}
    out["shard"] = np.concatenate([np.full(len(p["queries"]), i, np.int32) for i, p in enumerate(probes)])
    return out


def _open_writable(root: str | os.PathLike):
    """The CURRENT version read into memory to be changed (again on the new CURRENT if it is pruned
    meanwhile), its tombstoned rows removed for real: the new version it becomes holds only live rows."""
    return store.read_stable(root, lambda version: _load_writable(root, version))


def _load_writable(root: str | os.PathLike, version: str):
    vdir, meta, indexes, ids = store.load_version(root, version, mmap=False)
    probe = store.read_probe(vdir, meta)
    hidden = store.shard_hidden_ids(vdir, meta)  # tombstoned, or superseded by an upsert delta
    for i, (info, ix) in enumerate(zip(meta["shards"], indexes)):
        indexes[i] = _remove_ids(ix, info["factory"], hidden[i])
        apply_search_params(indexes[i], info["search_params"])
    gone = ("tombstones", "stored_count", "superseded", "row_parts")
    meta = {k: v for k, v in meta.items() if k not in gone}
    # every shard is written anew under its position's name (a delta shard's own name included)
    n = len(indexes)
    meta["shards"] = [{**info, "file": store.shard_file(i, n)} for i, info in enumerate(meta["shards"])]
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
    source = check_compatible(resolve_embeddings(embeddings), meta, embeddings, root)
    replaced = np.zeros(len(ids), bool)
    if upsert:
        replaced = _remove_videos(meta, indexes, ids, probe, video_ids_of(source, batch_size))
    kept = ids.filter(pa.array(~replaced))
    exact = ExactTopK(probe["queries"], probe["gt_i"].shape[1]) if probe is not None else None
    bar = row_progress("add", source.num_rows, progress)
    with tempfile.TemporaryDirectory(prefix="vidsift-refine-add-") as tmp:
        writers = _carry_refines(vdir, meta, kept, tmp)
        metas, errors = _add_rows(indexes, source, set(kept.column("id").to_pylist()), exact, batch_size, bar,
                                  writers)
        finish_progress(bar)
        refine_files = {n: p for w in writers if w is not None for n, p in w.finish().items()}
        if probe is not None and exact is not None:
            _merge_new_truth(probe, exact, metas, len(indexes))
        new_meta = new_version_meta(meta, "add", storage.name(vdir), rewritten=True)
        remeasure(new_meta, indexes, probe, refines=_local_refines(new_meta, refine_files))
        new_meta["sources"] = list(meta.get("sources", [])) + list(source.files)
        new_meta["lineage"] = merge_lineage(meta, source)
        new_meta["last_operation"] = {
            "added": sum(m.num_rows for m in metas),
            "replaced": int(replaced.sum()),
            "errors": len(errors),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        ids_table = pa.concat_tables([kept, *metas])
        return _publish_version(root, indexes, ids_table, new_meta, probe, errors, keep, refine_files)


def _local_refines(meta: dict[str, Any], files: dict[str, Path]) -> list[RefineVectors | None]:
    """Each shard's new float16 copy (local files not yet published), memory-mapped; None without one."""
    return [RefineVectors(files[s["rerank"]["vectors"]], files[s["rerank"]["ids"]])
            if s.get("rerank") else None for s in meta["shards"]]


def _carry_refines(vdir: str, meta: dict[str, Any], kept: pa.Table, folder: str) -> list[RefineWriter | None]:
    """For each shard with a float16 re-rank copy, a writer of its new copy that already holds the kept
    rows' vectors (read from the current copy in chunks); None for shards without one."""
    writers: list[RefineWriter | None] = []
    kept_ids, kept_shard = kept.column("id").to_numpy(), kept.column("shard").to_numpy()
    for i, info in enumerate(meta["shards"]):
        old = open_refine(vdir, meta, info)
        if old is None:
            writers.append(None)
            continue
        writer = RefineWriter(folder, info["file"], int(meta["dim"]))
        ids = np.sort(kept_ids[kept_shard == i])
        for start in range(0, len(ids), SORT_CHUNK_ROWS):
            chunk = ids[start:start + SORT_CHUNK_ROWS]
            writer.add(np.asarray(old.vectors[old.rows_of(chunk)]), chunk)
            drop_mapped_pages(old.vectors)  # a pass over the copy would add its size to the RSS
        writers.append(writer)
    return writers


def check_compatible(source: EmbeddingSource, meta: dict[str, Any], embeddings, root) -> EmbeddingSource:
    """Refuse embeddings of another dim or model; rows without a model id are checked against the index's."""
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
    return source


def video_ids_of(source: EmbeddingSource, batch_size: int) -> set[str]:
    videos: set[str] = set()
    for batch in iter_batches(source, batch_size=batch_size, columns_only_meta=True):
        videos.update(batch.meta.column("video_id").to_pylist())
    return videos


def _remove_videos(
    meta: dict[str, Any],
    indexes: list[faiss.Index],
    ids: pa.Table,
    probe: dict[str, np.ndarray] | None,
    video_ids: set[str],
) -> np.ndarray:
    """Remove every row of ``video_ids`` from the shard indexes and the probes; returns the row mask."""
    hit = _video_mask(ids, video_ids) if video_ids else np.zeros(len(ids), bool)
    removed = ids.column("id").to_numpy()[hit]
    shard_col = ids.column("shard").to_numpy()[hit]
    for i in range(len(indexes)):
        indexes[i] = _remove_ids(indexes[i], meta["shards"][i]["factory"], removed[shard_col == i])
        apply_search_params(indexes[i], meta["shards"][i]["search_params"])
    drop_from_probe(probe, removed)
    return hit


def _add_rows(
    indexes: list[faiss.Index],
    source: EmbeddingSource,
    seen: set[int],
    exact: ExactTopK | None,
    batch_size: int,
    bar: Progress,
    writers: list[RefineWriter | None] | None = None,
) -> tuple[list[pa.Table], list[dict[str, Any]]]:
    """Stream ``source`` into the shard of each row's video (and its float16 re-rank copy's writer, if it
    has one); returns (ids tables of added rows, errors)."""
    writers = writers if writers is not None else [None] * len(indexes)
    num_shards = len(indexes)
    metas, errors = [], []
    for batch in iter_batches(source, batch_size=batch_size, seen_ids=seen):
        errors.extend(batch.errors)
        if len(batch.ids):
            shards = shard_of(np.asarray(batch.meta.column("video_id").to_pylist(), dtype=object), num_shards)
            for i in range(num_shards):
                sel = shards == i
                if sel.any():
                    indexes[i].add_with_ids(batch.vectors[sel], batch.ids[sel])
                    if writers[i] is not None:
                        writers[i].add(batch.vectors[sel], batch.ids[sel])
            if exact is not None:
                exact.add(batch.vectors, batch.ids)
            metas.append(
                batch.meta.set_column(
                    batch.meta.schema.get_field_index("shard"), "shard", pa.array(shards, pa.int32())
                )
            )
        bar.update(len(batch.ids) + len(batch.errors))
    return metas, errors


def _merge_new_truth(
    probe: dict[str, np.ndarray], exact: ExactTopK, metas: list[pa.Table], num_shards: int
) -> None:
    """New vectors can only enter a probe's exact top list of its own shard; merge per shard."""
    new_d, new_i = exact.result()
    new_shard = _shard_of_ids(new_i, metas, num_shards)
    same = new_shard == probe["shard"][:, None]
    new_d = np.where(same, new_d, -np.inf).astype(np.float32)
    new_i = np.where(same, new_i, -1)
    depth = probe["gt_i"].shape[1]
    probe["gt_d"], probe["gt_i"] = merge_topk(probe["gt_d"], probe["gt_i"], new_d, new_i, depth)


def _shard_of_ids(id_matrix: np.ndarray, metas: list[pa.Table], num_shards: int) -> np.ndarray:
    if num_shards == 1 or not metas:
        return np.zeros_like(id_matrix, dtype=np.int32)
    table = pa.concat_tables(metas)
    order = np.argsort(table.column("id").to_numpy())
    sorted_ids = table.column("id").to_numpy()[order]
    sorted_shard = table.column("shard").to_numpy()[order]
    pos = np.clip(np.searchsorted(sorted_ids, id_matrix), 0, len(sorted_ids) - 1)
    return np.where(sorted_ids[pos] == id_matrix, sorted_shard[pos], -1)


def _publish_version(root, indexes, ids_table, meta, probe, errors, keep, local_files=None) -> dict[str, Any]:
    root = storage.normalize(root)
    with store.staged_version(root) as (version, stage):
        store.write_version_files(stage, indexes, ids_table, meta, probe=probe, errors=errors_table(errors))
        for name, path in (local_files or {}).items():
            shutil.move(str(path), str(Path(stage) / name))
        # parent_version: the CURRENT version the change was applied to (_new_version_meta)
        meta["version"] = store.publish(root, stage, meta, version, keep=keep,
                                        expected_current=meta["parent_version"])
    return meta


def needs_retrain(
    root: str | os.PathLike, growth_factor: float = DEFAULT_GROWTH_FACTOR, recall_target: float | None = None
) -> tuple[bool, list[str]]:
    """Whether the CURRENT version should be rebuilt from scratch, and why.

    True when the index holds more than ``growth_factor`` × the vectors it was trained/built with, or
    when recall@k on the stored probe set (vs maintained exact neighbours) is below the target.
    """
    vdir, meta, indexes, _ids = store.load_version(root)
    probe = store.read_probe(vdir, meta)
    dead = store.read_dead_ids(vdir, meta)
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
        hidden = store.shard_hidden_ids(vdir, meta)
        remeasure(measured, indexes, probe, dead, hidden, open_refines(vdir, meta))
        if measured["recall"] < target:
            reasons.append(
                f"recall@{meta.get('recall_k', DEFAULT_K)} on the probe set is "
                f"{measured['recall']:.4f} < target {target}"
            )
    return bool(reasons), reasons

"""Writing and reading a partition: fragments staged by the workers, a shard's part (errors first, part
last), the readers of parts and error tables, and removal of a shard's outputs."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.embedding.layout import (
    EMBEDDING_COLUMNS,
    ERROR_SCHEMA,
    LINEAGE_COLUMNS,
    PART_PREFIX,
    VIDEO_ROW,
    embedding_schema,
    errors_dir,
    list_parts,
    part_uri,
    staging_dir,
    text_dir,
)
from runtime import storage

BOOKKEEPING_COLUMNS = ("shard", "key", "rows", "error", "fragment")
# --windows runs add: decoded rows of the key in all / in this fragment (a windowed video is several decoded
# rows that may reach the writers in different batches: the driver waits for all of them)
PARTS_COLUMNS = ("parts", "parts_done")


def fragment_schema(dim: int, dtype: str = "float32") -> pa.Schema:
    """A staged fragment: the embedding schema (but the lineage columns, which :func:`finalize_shard` adds)
    plus the input failure (``error``, ``error_message``)."""
    schema = embedding_schema(dim, dtype)
    for name in LINEAGE_COLUMNS:
        schema = schema.remove(schema.get_field_index(name))
    return schema.append(pa.field("error", pa.string())).append(pa.field("error_message", pa.string()))


def encoded_table(batch: Mapping[str, Any], dim: int, dtype: str = "float32") -> pa.Table:
    """One :class:`EncodeClipsStage` output batch as an Arrow table of :func:`fragment_schema`."""
    schema = fragment_schema(dim, dtype)
    n = len(batch["key"])
    errors = [str(e) for e in batch["error"]]
    emb = np.asarray(batch["embedding"])
    if emb.ndim != 2 or emb.shape[1] != dim:
        if not all(errors):  # an actor that has seen only failed inputs emits zero-width vectors for them
            raise ValueError(f"encoded batch has vectors of shape {emb.shape}, expected [{n}, {dim}]")
        emb = np.zeros((n, dim), np.float32)
    value_type = schema.field("embedding").type.value_type
    flat = pa.array(emb.astype(value_type.to_pandas_dtype()).reshape(-1), type=value_type)
    columns = {
        "id": pa.array(np.asarray(batch["id"], dtype=np.int64)),
        "clip_index": pa.array(np.asarray(batch["clip_index"], dtype=np.int64)),
        "start_s": pa.array(np.asarray(batch["start_s"], dtype=np.float64)),
        "end_s": pa.array(np.asarray(batch["end_s"], dtype=np.float64)),
        "captions": pa.array([list(json.loads(c or "[]")) for c in batch["captions"]], pa.list_(pa.string())),
        "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
        "error": pa.array(errors, pa.string()),
    }
    for name in ("video_id", "key", "shard", "model_id", "sha256", "error_message"):
        columns[name] = pa.array([str(v) for v in batch[name]], pa.string())
    return pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)


def write_shard_fragments(batch: Mapping[str, Any], partition: str, dim: int,
                          dtype: str = "float32") -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function (runs on the workers): write one encoded batch to storage as one
    fragment object per shard it holds, and return only bookkeeping — one row per input key with its
    ``shard``, ``key``, ``rows`` (embedding rows written), ``error`` (reason, "" when fine), the
    ``fragment`` URI (+ ``parts`` / ``parts_done`` on --windows runs: the key's decoded rows in all / here,
    :data:`PARTS_COLUMNS`). Fragment names are a digest of their (key, clip) rows: a retried task rewrites
    the same object, and :func:`finalize_shard` drops duplicate ids in any case."""
    table = encoded_table(batch, dim, dtype)
    columns = BOOKKEEPING_COLUMNS + (PARTS_COLUMNS if "parts" in batch else ())
    out: dict[str, list] = {c: [] for c in columns}
    for shard in sorted(set(table.column("shard").to_pylist())):
        sub = table.filter(pc.equal(table.column("shard"), shard))
        keys, clips, errors = (sub.column(c).to_pylist() for c in ("key", "clip_index", "error"))
        rows_id = "\n".join(sorted(f"{k}\x00{c}" for k, c in zip(keys, clips)))
        digest = hashlib.blake2b(rows_id.encode(), digest_size=10).hexdigest()
        uri = storage.join(staging_dir(partition, shard), f"frag-{digest}.parquet")
        storage.write_parquet(sub, uri)
        in_shard = [str(s) == shard for s in batch["shard"]]
        parts, done = (np.asarray(batch[c] if c in batch else np.ones(len(in_shard)), np.int64)[in_shard]
                       for c in ("parts", "part_done"))
        per_key: dict[str, list] = {}
        for key, error, total, first in zip(keys, errors, parts, done):
            entry = per_key.setdefault(key, [0, "", int(total), 0])
            entry[3] += int(first)
            if error:
                entry[1] = error
            else:
                entry[0] += 1
        for key, values in per_key.items():
            for column, value in zip(columns, (shard, key, *values[:2], uri, *values[2:])):
                out[column].append(value)
    result = {c: np.array(out[c], dtype=object) for c in columns}
    for column in ("rows", *PARTS_COLUMNS[: len(columns) - len(BOOKKEEPING_COLUMNS)]):
        result[column] = np.array(out[column], dtype=np.int64)
    return result


def merge_fragments(partition: str | os.PathLike, label: str, dim: int, dtype: str = "float32") -> pa.Table:
    """A shard's staged fragments as one table, sorted by (video, clip), each ``id`` once (a retried task
    may have left a second copy of a fragment)."""
    schema = fragment_schema(dim, dtype)
    fragments = storage.list_files(staging_dir(partition, label), ".parquet")
    tables = [storage.read_parquet(f).cast(schema) for f in fragments] or [schema.empty_table()]
    table = pa.concat_tables(tables).sort_by([("video_id", "ascending"), ("clip_index", "ascending")])
    _, first = np.unique(table.column("id").to_numpy(), return_index=True)
    return table.take(pa.array(np.sort(first)))


def _shard_summary(label: str, clip_index: pa.ChunkedArray, errors: int, part: str) -> dict[str, Any]:
    videos = int(pc.sum(pc.equal(clip_index, VIDEO_ROW)).as_py() or 0)
    return {"shard": label, "videos": videos, "clips": len(clip_index) - videos, "errors": int(errors),
            "path": part}


def finalize_shard(partition: str, label: str, dim: int, dtype: str = "float32",
                   expected_keys: Sequence[str] = (), shard_uri: str | None = None) -> dict[str, Any]:
    """Write a shard's outputs from its fragments (a Ray task; idempotent): its error table, then
    ``part-<shard>.parquet`` — each one complete object, the part last because it marks the shard done —
    then drop the fragments. Returns bookkeeping: ``shard``, ``videos``, ``clips``, ``errors``, ``path``.

    Every key in ``expected_keys`` must have a row (an embedding or an error): a shard is never marked
    done with rows missing. ``shard_uri`` (the shard tar's absolute path / URI) is the rows' lineage."""
    part = part_uri(partition, label)
    error_part = storage.join(errors_dir(partition), f"{PART_PREFIX}{label}.parquet")
    if storage.exists(part):  # a retry of a task that got as far as the part: the shard is done
        errors = storage.read_parquet(error_part).num_rows if storage.exists(error_part) else 0
        clip_index = storage.read_parquet(part, columns=["clip_index"]).column(0)
        return _shard_summary(label, clip_index, errors, part)
    table = merge_fragments(partition, label, dim, dtype)
    missing = set(expected_keys) - set(table.column("key").to_pylist())
    if missing:
        raise RuntimeError(f"shard {label}: no rows for {len(missing)} keys (e.g. {sorted(missing)[:3]}); "
                           f"fragments under {staging_dir(partition, label)} are missing")
    failed = pc.not_equal(table.column("error"), "")
    bad = table.filter(failed)
    sources = ("key", "shard", "video_id", "error", "error_message")  # → ERROR_COLUMNS
    errors = pa.Table.from_arrays([bad.column(c) for c in sources], schema=ERROR_SCHEMA)
    data = with_lineage(table.filter(pc.invert(failed)), shard_uri).select(list(EMBEDDING_COLUMNS))
    storage.write_parquet(errors, error_part)  # errors first: the part marks the shard done
    storage.write_parquet(data, part)
    storage.remove(staging_dir(partition, label), recursive=True)
    return _shard_summary(label, data.column("clip_index"), errors.num_rows, part)


def with_lineage(table: pa.Table, shard_uri: str | None) -> pa.Table:
    """``table`` with the :data:`LINEAGE_COLUMNS`: every row's ``shard_uri`` (null when not known)."""
    return table.append_column(pa.field("shard_uri", pa.string()),
                               pa.array([shard_uri] * table.num_rows, pa.string()))


def clear_staging(partition: str | os.PathLike) -> None:
    """Drop fragments an interrupted run left behind (its unfinished shards are redone whole)."""
    storage.remove(staging_dir(partition), recursive=True)


def read_embeddings(partition: str | os.PathLike, video_level: bool | None = None) -> pa.Table:
    """All embedding rows of a model partition (optionally only video-level or only clip rows)."""
    parts = list_parts(partition)
    if not parts:
        raise FileNotFoundError(f"no embedding parts under {os.fspath(partition)!r}")
    # parts written before the lineage columns lack them: they read as nulls
    table = pa.concat_tables([storage.read_parquet(p) for p in parts], promote_options="default")
    if video_level is None:
        return table
    is_video = pc.equal(table.column("clip_index"), VIDEO_ROW)
    return table.filter(is_video if video_level else pc.invert(is_video))


def read_embed_errors(partition: str | os.PathLike, label_prefix: str = "") -> pa.Table:
    """The embed error rows (:data:`ERROR_SCHEMA`) of a partition, or of its shards whose label starts
    with ``label_prefix``; an empty table when there are none."""
    prefix = f"{PART_PREFIX}{label_prefix}"
    parts = [u for u in storage.list_files(errors_dir(partition), ".parquet")
             if storage.name(u).startswith(prefix)]
    tables = [storage.read_parquet(u).cast(ERROR_SCHEMA) for u in parts]
    return pa.concat_tables(tables) if tables else ERROR_SCHEMA.empty_table()


def remove_shard_outputs(partition: str | os.PathLike, label_prefix: str) -> None:
    """Delete every output of the shards whose label starts with ``label_prefix`` (parts, error and text
    tables, fragments), so the next run redoes them."""
    prefix = f"{PART_PREFIX}{label_prefix}"
    for folder in (partition, errors_dir(partition), text_dir(partition)):
        for uri in storage.list_files(folder, ".parquet"):
            if storage.name(uri).startswith(prefix):
                storage.remove(uri)
    for folder in storage.list_dirs(staging_dir(partition)):
        if storage.name(folder).startswith(label_prefix):
            storage.remove(folder, recursive=True)

"""Streaming reader of the embeddings Parquet (docs/interfaces.md, "Embeddings"): batches of validated,
L2-normalised vectors plus their id metadata, and error records for rows that cannot be indexed."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from runtime import storage

META_COLUMNS = ("id", "video_id", "key", "clip_index", "start_s", "end_s", "captions")
ERROR_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("video_id", pa.string()),
        ("key", pa.string()),
        ("reason", pa.string()),
        ("message", pa.string()),
    ]
)
IDS_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("video_id", pa.string()),
        ("key", pa.string()),
        ("clip_index", pa.int64()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("captions", pa.list_(pa.string())),
        ("shard", pa.int32()),
    ]
)
NON_DATA_FILES = {"errors.parquet"}
MODEL_CARD = "_model.json"
# the embeddings' lineage column (pipeline.embedding.LINEAGE_COLUMNS; index/ does not import pipeline/,
# tests/test_lineage.py checks that the names agree): the shard tar each row was embedded from
SHARD_URI_COLUMN = "shard_uri"


@dataclasses.dataclass
class EmbeddingSource:
    """A resolved embeddings folder (any store): its part files (URIs), ``_model.json`` and vector dim."""

    root: str
    files: list[str]
    model: dict[str, Any]
    dim: int
    num_rows: int

    @property
    def model_id(self) -> str | None:
        return self.model.get("model_id")

    def lineage(self) -> dict[str, Any]:
        """Where these embeddings came from: ``embeddings`` (this folder / file), ``shards`` (the shard tar
        URIs their rows record, sorted) and ``unrecorded`` (part files that record none: written before
        embeddings carried lineage, or by another writer), so a reader knows when ``shards`` is partial."""
        shards: set[str] = set()
        unrecorded: list[str] = []
        for uri, fragment in zip(self.files, self.dataset().get_fragments()):
            if SHARD_URI_COLUMN not in fragment.physical_schema.names:
                unrecorded.append(uri)
                continue
            column = fragment.to_table(columns=[SHARD_URI_COLUMN]).column(0)
            found = {u for u in pc.unique(column).to_pylist() if u}
            if column.null_count or not found and len(column):
                unrecorded.append(uri)
            shards |= found
        return {"embeddings": [self.root], "shards": sorted(shards), "unrecorded": unrecorded}

    def dataset(self) -> ds.Dataset:
        """The part files as one pyarrow dataset, read through the store's pyarrow filesystem."""
        fs, base = storage.arrow_filesystem(self.root)
        if len(self.files) == 1 and self.files[0] == self.root:  # a single file was given
            return ds.dataset([base], format="parquet", filesystem=fs)
        paths = [f"{base.rstrip('/')}/{storage.name(f)}" for f in self.files]
        return ds.dataset(paths, format="parquet", filesystem=fs)


def resolve_embeddings(path: str | os.PathLike) -> EmbeddingSource:
    """Find the part files of an embeddings output (``OUT`` with one ``model_id=*`` folder, or that folder,
    or one Parquet file) on any store."""
    root = storage.normalize(path)
    if storage.is_file(root):
        data_dir, files = storage.parent(root), [root]
    else:
        data_dir = root
        if not storage.exists(root):
            raise FileNotFoundError(f"embeddings path {root!r} does not exist")
        files = _part_files(root)
        if not files and not storage.exists(storage.join(root, MODEL_CARD)):
            data_dir = _model_dir(root)
            files = _part_files(data_dir)
    if not files:
        raise FileNotFoundError(f"embeddings dir {data_dir!r} has no Parquet part files")
    try:
        model = storage.read_json(storage.join(data_dir, MODEL_CARD), default={}) or {}
    except ValueError as exc:
        raise ValueError(f"{storage.join(data_dir, MODEL_CARD)!r} is not valid JSON: {exc}") from exc
    source = EmbeddingSource(root=files[0] if files == [root] else data_dir, files=files, model=model, dim=0,
                             num_rows=0)
    dataset = source.dataset()
    schema = dataset.schema
    for col in ("id", "video_id", "embedding"):
        if col not in schema.names:
            raise ValueError(
                f"embeddings file {files[0]!r} lacks the required column {col!r} (has {schema.names})"
            )
    emb_type = schema.field("embedding").type
    if pa.types.is_fixed_size_list(emb_type):
        dim = emb_type.list_size
    elif model.get("dim"):
        dim = int(model["dim"])
    else:
        first = dataset.head(1, columns=["embedding"]).column(0)
        dim = len(first[0].as_py())
    if model.get("dim") and int(model["dim"]) != dim:
        raise ValueError(f"_model.json says dim {model['dim']} but {files[0]!r} holds vectors of dim {dim}")
    source.dim, source.num_rows = int(dim), int(dataset.count_rows())
    return source


def _model_dir(root: str) -> str:
    """The single ``model_id=*`` folder under an embeddings output ``root``."""
    subdirs = [d for d in storage.list_dirs(root) if storage.name(d).startswith("model_id=")]
    if len(subdirs) > 1:
        raise ValueError(
            f"embeddings dir {root!r} holds several models "
            f"({', '.join(storage.name(d) for d in subdirs)}); pass one model_id=... dir"
        )
    if not subdirs:
        raise FileNotFoundError(
            f"embeddings dir {root!r} has no part-*.parquet files and no model_id=* subdirectory"
        )
    return subdirs[0]


def _part_files(directory: str) -> list[str]:
    """The data files of an embeddings folder: ``part-*.parquet`` (jobs.embed; ``text-*.parquet`` caption
    embeddings are not video rows). Other writers may use any ``*.parquet`` name; names starting with
    ``_`` or ``.`` (``_errors.parquet``, temp files) and the legacy ``errors.parquet`` are never data."""
    names = [storage.name(f) for f in storage.list_files(directory, ".parquet")]
    names = [n for n in names if not n.startswith(("_", "."))]
    parts = [n for n in names if n.startswith("part-")]
    chosen = parts or [n for n in names if n not in NON_DATA_FILES]
    return [storage.join(directory, n) for n in sorted(chosen)]


def shard_of(video_ids: np.ndarray, num_shards: int) -> np.ndarray:
    """Stable shard of each video (crc32 of the id), so all clips of a video live in one shard."""
    if num_shards <= 1:
        return np.zeros(len(video_ids), dtype=np.int32)
    return np.fromiter(
        (zlib.crc32(str(v).encode()) % num_shards for v in video_ids), dtype=np.int32, count=len(video_ids)
    )


@dataclasses.dataclass
class Batch:
    """Valid rows of one record batch: ``vectors`` [n, D] normalised float32, ``ids`` int64, ``meta``
    (ids.parquet columns), ``positions`` (global row numbers) and ``errors`` (ERROR_SCHEMA rows)."""

    vectors: np.ndarray
    ids: np.ndarray
    meta: pa.Table
    positions: np.ndarray
    errors: list[dict[str, Any]]


# Batches of at most READ_ROWS rows. Parquet's reader holds several times a batch of a list column while it
# decodes one (the values, their definition and repetition levels, the array it builds), and Arrow's
# allocator (mimalloc) purges freed pages late: reading the 256-dim embeddings of a 100k-row row group, the
# pool peaked at 91 MiB with 16,384-row batches and 30 MiB with 4,096-row ones (the process +134 vs +62
# MiB); 65,536-row batches had peaked ~0.3 GB above 16,384-row ones (1M x 256, measured).
READ_ROWS = 4096
# Bytes the Parquet reader buffers per column stream: bounds its memory, and is one ranged read on S3.
STREAM_BUFFER_BYTES = 8 << 20


def iter_batches(
    source: EmbeddingSource,
    batch_size: int = 65536,
    shard: tuple[int, int] = (0, 1),
    seen_ids: set[int] | None = None,
    columns_only_meta: bool = False,
) -> Iterator[Batch]:
    """Stream validated batches of ``source``, only rows of ``shard`` = (index, count).

    Rows with a null id, a bad embedding (null, wrong length, NaN/inf, zero norm), a foreign model_id or
    a duplicate id (tracked in ``seen_ids``) become error records, so every input row is accounted for.
    """
    dataset = source.dataset()
    wanted = [c for c in (*META_COLUMNS, "model_id", "embedding") if c in dataset.schema.names]
    if columns_only_meta:
        wanted = [c for c in wanted if c != "embedding"]
    try:
        yield from _stream(dataset, wanted, source, batch_size, shard, seen_ids, columns_only_meta)
    finally:
        release_unused_memory()


def release_unused_memory() -> None:
    """Give freed memory back to the system after a pass over the embeddings: Arrow's pool (mimalloc) and
    glibc's heap keep what a pass's decoded batches freed (measured: a task's RSS stayed ~0.8 GB above its
    live data after streaming 1M x 256 vectors), and the next pass's peak then adds on top of it."""
    pa.default_memory_pool().release_unused()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


_LIBC = _glibc()


def _stream(dataset, wanted, source, batch_size, shard, seen_ids, columns_only_meta) -> Iterator[Batch]:
    shard_index, num_shards = shard
    offset = 0
    expected_model = source.model_id
    for record_batch in read_record_batches(dataset, wanted, min(batch_size, READ_ROWS)):
        n = record_batch.num_rows
        positions = np.arange(offset, offset + n, dtype=np.int64)
        offset += n
        if n == 0:
            continue
        table = pa.Table.from_batches([record_batch])
        video_ids = np.asarray(table.column("video_id").to_pylist(), dtype=object)
        keep = shard_of(video_ids, num_shards) == shard_index
        if not keep.any():
            continue
        table = table.filter(pa.array(keep))
        positions = positions[keep]
        yield _validate(
            table,
            positions,
            source.dim,
            expected_model,
            seen_ids,
            shard_index,
            with_vectors=not columns_only_meta,
        )


def read_record_batches(dataset: ds.FileSystemDataset, columns: list[str], batch_size: int
                        ) -> Iterator[pa.RecordBatch]:
    """The dataset's rows in order (fragment by fragment, each fragment's row groups), as batches of at most
    ``batch_size`` rows with ``columns`` typed as the dataset's schema (a file without a column gives nulls).

    Parquet's own streaming reader, not the dataset scanner: the scanner decodes a whole row group before it
    cuts batches from it, and reading 1M x 256 vectors in 100k-row row groups grew a process by ~0.9 GB
    (read-ahead of one batch and one file, no threads) against ~0.17 GB through a buffered stream."""
    schema = pa.schema([dataset.schema.field(c) for c in columns])
    for fragment in dataset.get_fragments():
        groups = [g.id for g in fragment.row_groups]
        with dataset.filesystem.open_input_file(fragment.path) as fh:
            # the footer the dataset already read (a second read is one more request per file on S3)
            parquet = pq.ParquetFile(fh, metadata=fragment.metadata, buffer_size=STREAM_BUFFER_BYTES,
                                     pre_buffer=False)
            present = [c for c in columns if c in parquet.schema_arrow.names]
            for batch in parquet.iter_batches(batch_size=batch_size, row_groups=groups, columns=present,
                                              use_threads=False):
                yield pa.RecordBatch.from_arrays(
                    [_typed(batch, field, fragment.path) for field in schema], schema=schema)


def _typed(batch: pa.RecordBatch, field: pa.Field, path: str) -> pa.Array:
    """``field``'s column of ``batch`` as the dataset's type (nulls when the file lacks it)."""
    if field.name not in batch.schema.names:
        return pa.nulls(batch.num_rows, field.type)
    column = batch.column(field.name)
    if column.type == field.type:
        return column
    try:
        return column.cast(field.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"embeddings file {path!r}: column {field.name!r} is {column.type}, which cannot be "
                         f"read as the {field.type} of the first part file: {exc}") from exc


def _validate(
    table: pa.Table,
    positions: np.ndarray,
    dim: int,
    expected_model: str | None,
    seen_ids: set[int] | None,
    shard_index: int,
    with_vectors: bool = True,
) -> Batch:
    n = table.num_rows
    ids_col = table.column("id").combine_chunks()
    ok = np.asarray(ids_col.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    reasons: list[tuple[int, str, str]] = [(i, "null_id", "id is null") for i in np.flatnonzero(~ok)]
    ids = np.asarray(ids_col.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)
    if expected_model and "model_id" in table.column_names:
        _check_model(table.column("model_id"), expected_model, ok, reasons)
    vectors = np.zeros((n, dim), dtype=np.float32)
    if with_vectors:
        _check_vectors(table.column("embedding").combine_chunks(), dim, vectors, ok, reasons)
    if seen_ids is not None:
        for i in np.flatnonzero(ok):
            value = int(ids[i])
            if value in seen_ids:
                ok[i] = False
                reasons.append((i, "duplicate_id", f"id {value} occurs more than once"))
            else:
                seen_ids.add(value)
    meta = _meta_table(table.filter(pa.array(ok)), shard_index)
    return Batch(
        vectors=np.ascontiguousarray(vectors[ok]),
        ids=ids[ok],
        meta=meta,
        positions=positions[ok],
        errors=_error_records(table, ids, reasons),
    )


def _check_model(
    model_col: pa.ChunkedArray, expected_model: str, ok: np.ndarray, reasons: list[tuple[int, str, str]]
) -> None:
    """Rows whose ``model_id`` differs from the source's become ``model_mismatch`` errors (in place)."""
    same = pc.fill_null(pc.equal(model_col, pa.scalar(expected_model)), False)
    foreign = ok & ~np.asarray(same.to_numpy(zero_copy_only=False), dtype=bool)
    if foreign.any():
        models = model_col.to_pylist()
        for i in np.flatnonzero(foreign):
            ok[i] = False
            reasons.append((i, "model_mismatch", f"model_id {models[i]!r} != {expected_model!r}"))


def _check_vectors(
    emb: pa.Array, dim: int, vectors: np.ndarray, ok: np.ndarray, reasons: list[tuple[int, str, str]]
) -> None:
    """Fill ``vectors`` with the L2-normalised embeddings; bad ones become ``bad_embedding`` errors."""
    valid = np.asarray(emb.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    lengths = np.asarray(pc.list_value_length(emb).fill_null(0).to_numpy(zero_copy_only=False))
    good_shape = valid & (lengths == dim)
    if good_shape.any():
        flat = pc.list_flatten(emb.filter(pa.array(good_shape)))
        values = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float32)
        vectors[good_shape] = values.reshape(-1, dim)
    norms = np.linalg.norm(vectors, axis=1)
    finite = np.isfinite(vectors).all(axis=1)
    bad = ok & ~(good_shape & finite & (norms > 1e-12))
    for i in np.flatnonzero(bad):
        if not valid[i]:
            why = "embedding is null"
        elif lengths[i] != dim:
            why = f"embedding has {lengths[i]} values, expected {dim}"
        elif not finite[i]:
            why = "embedding has NaN/inf values"
        else:
            why = "embedding is all zeros"
        ok[i] = False
        reasons.append((i, "bad_embedding", why))
    with np.errstate(invalid="ignore", divide="ignore"):
        vectors /= np.where(norms > 0, norms, 1.0)[:, None]


def _error_records(
    table: pa.Table, ids: np.ndarray, reasons: list[tuple[int, str, str]]
) -> list[dict[str, Any]]:
    if not reasons:
        return []
    vids = table.column("video_id").to_pylist()
    keys = table.column("key").to_pylist() if "key" in table.column_names else [None] * table.num_rows
    return [
        {
            "id": int(ids[i]) if ids[i] >= 0 else None,
            "video_id": vids[i],
            "key": keys[i],
            "reason": reason,
            "message": message,
        }
        for i, reason, message in reasons
    ]


def _meta_table(table: pa.Table, shard_index: int) -> pa.Table:
    n = table.num_rows
    cols = {}
    for field in IDS_SCHEMA:
        if field.name == "shard":
            cols["shard"] = pa.array(np.full(n, shard_index, dtype=np.int32))
        elif field.name in table.column_names:
            cols[field.name] = table.column(field.name).cast(field.type)
        else:
            cols[field.name] = pa.nulls(n, field.type)
    return pa.table(cols, schema=IDS_SCHEMA)


def errors_table(errors: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(errors, schema=ERROR_SCHEMA)

"""The rows of an index version (one per FAISS id: ``video_id``, ``clip_index``, ``start_s`` / ``end_s``,
``captions``...) as Arrow columns, looked up a few rows at a time.

A version publishes them as ``ids.arrow``: an Arrow IPC file, one record batch, its rows sorted by
``(video_id, id)``, with four helper columns (:data:`HELPER_COLUMNS`) that answer every lookup the search
needs with numpy on the memory-mapped file:

- ``_id_sorted`` / ``_row_of_id``: every id in ascending order and the row holding it (id → row by
  ``searchsorted``);
- ``_video_first`` / ``_video_rows``: the first row of the row's video and how many rows it has (a video's
  rows are contiguous, so "every window of this video" is a slice).

Opening one maps the file: nothing is read into the process until a query touches it, so the serving
process's own memory does not grow with the corpus (tests/test_index_rows.py measures it). Older versions'
``ids.parquet`` is read into Arrow and given the same helper columns in memory (numpy / Arrow compute, never
Python objects per row).

Tombstones (``tombstones.parquet``: the ids a delete removed, :mod:`index.tombstones`) are plain sorted id
arrays; :func:`read_tombstones` / :func:`write_tombstones` are their codec.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from index.moments import WINDOW_CLIP_BASE
from runtime import storage

ROWS_FILE = "ids.arrow"
HELPER_COLUMNS = ("_id_sorted", "_row_of_id", "_video_first", "_video_rows")


class ColumnParts:
    """An ids table made of parts, read a column at a time: ``column(name)`` joins that column of every part
    (a part is anything with ``.schema`` and ``.column(name)``: a ``pa.Table``, or the Parquet file a shard
    task wrote, :class:`ParquetColumns`, read only then). :func:`prepare_rows` takes each column once, so a
    build's driver holds one input column beside the sorted table it writes, not every part's whole table
    (at 1M rows, the parts as Ray objects were ~0.1 GB of the driver's ~0.5 GB peak)."""

    def __init__(self, parts: Sequence):
        self.parts = list(parts)
        if not self.parts:
            raise ValueError("an ids table needs at least one part")
        self.schema = self.parts[0].schema
        for part in self.parts[1:]:
            if not part.schema.equals(self.schema):
                raise ValueError(f"ids parts differ in schema: {self.schema} vs {part.schema}")
        self.column_names = self.schema.names

    def column(self, name: str) -> pa.ChunkedArray:
        chunks = []
        for part in self.parts:
            column = part.column(name)
            chunks.extend(column.chunks if isinstance(column, pa.ChunkedArray) else [column])
        return pa.chunked_array(chunks, type=self.schema.field(name).type)


class ParquetColumns:
    """An ids part a build task wrote as a Parquet file (any store), read a column at a time."""

    def __init__(self, uri: str, schema: pa.Schema):
        self.uri, self.schema = uri, schema

    def column(self, name: str) -> pa.ChunkedArray:
        return storage.read_parquet(self.uri, columns=[name]).column(name)


def prepare_rows(table: pa.Table | ColumnParts) -> pa.Table:
    """``table`` (an ids table, or its :class:`ColumnParts`) sorted by ``(video_id, id)`` in one chunk, with
    the helper columns added. Each column is read from ``table`` once, sorted, and let go."""
    names = [name for name in table.column_names if name not in HELPER_COLUMNS]
    keys = pa.table({name: table.column(name) for name in ("video_id", "id")})
    order = pc.sort_indices(keys, sort_keys=[("video_id", "ascending"), ("id", "ascending")])
    columns = {name: _sorted_column(keys.column(name), order) for name in keys.column_names}
    del keys
    for name in names:
        if name not in columns:
            columns[name] = _sorted_column(table.column(name), order)
    del order
    ids = columns["id"].to_numpy()
    by_id = np.argsort(ids, kind="stable")
    first, counts = _video_runs(pa.chunked_array([columns["video_id"]]))
    helpers = {
        "_id_sorted": ids[by_id].astype(np.int64),
        "_row_of_id": by_id.astype(np.int64),
        "_video_first": np.repeat(first, counts).astype(np.int64),
        "_video_rows": np.repeat(counts, counts).astype(np.int64),
    }
    fields = [table.schema.field(name) for name in names] + [pa.field(name, pa.int64()) for name in helpers]
    arrays = [columns[name] for name in names] + [pa.array(values, pa.int64()) for values in helpers.values()]
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=table.schema.metadata))


def _sorted_column(column: pa.ChunkedArray, order: pa.Array) -> pa.Array:
    """``column``'s values in ``order``, as one array. Taking from several chunks first joins them into a
    copy, which Arrow's allocator keeps after it is freed: it is handed back before the next column (a
    build's driver kept ~50 MB more at 1M rows, measured)."""
    taken = column.take(order)
    taken = taken.combine_chunks() if isinstance(taken, pa.ChunkedArray) else taken
    pa.default_memory_pool().release_unused()
    return taken


def _video_runs(video_ids: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """First row and length of each run of equal video_ids (the column is sorted)."""
    n = len(video_ids)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ends = pc.run_end_encode(video_ids.combine_chunks()).run_ends.to_numpy().astype(np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    return starts, ends - starts


def write_rows(table: pa.Table | ColumnParts, path: str | os.PathLike) -> pa.Table:
    """Write ``table`` (or its :class:`ColumnParts`) as an ``ids.arrow`` file (:func:`prepare_rows`, one
    record batch); returns the prepared table."""
    prepared = prepare_rows(table)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, prepared.schema) as writer:
        writer.write_table(prepared, max_chunksize=max(prepared.num_rows, 1))
    return prepared


def public_columns(table: pa.Table) -> pa.Table:
    """``table`` without the helper columns (what readers of the ids table see)."""
    return table.drop_columns([c for c in HELPER_COLUMNS if c in table.column_names])


def read_rows_table(path: str | os.PathLike) -> pa.Table:
    """The table of an ``ids.arrow`` (memory-mapped: zero-copy) or ``ids.parquet`` (read, then prepared)."""
    path = Path(path)
    if path.suffix == ".arrow":
        source = pa.memory_map(str(path), "r")
        return pa.ipc.open_file(source).read_all()
    return prepare_rows(pq.read_table(path))


class RowTable:
    """Row lookups on an ids table with helper columns (:func:`prepare_rows`); memory-mapped when opened
    from an ``ids.arrow`` file. Python objects are made only for the rows asked for."""

    def __init__(self, table: pa.Table):
        missing = [c for c in HELPER_COLUMNS if c not in table.column_names]
        if missing:
            table = prepare_rows(table)
        self.table = table
        self._id_sorted = _numpy(table, "_id_sorted")
        self._row_of_id = _numpy(table, "_row_of_id")
        self._video_first = _numpy(table, "_video_first")
        self._video_rows = _numpy(table, "_video_rows")

    @classmethod
    def open(cls, path: str | os.PathLike) -> RowTable:
        return cls(read_rows_table(path))

    def __len__(self) -> int:
        return int(self.table.num_rows)

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id (-1 where the table has no such id)."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(self._id_sorted):
            return np.full(len(ids), -1, np.int64)
        pos = np.clip(np.searchsorted(self._id_sorted, ids), 0, len(self._id_sorted) - 1)
        return np.where(self._id_sorted[pos] == ids, self._row_of_id[pos], -1)

    def video_keys(self, rows: np.ndarray) -> np.ndarray:
        """An integer per row that is equal exactly for rows of the same video (its first row)."""
        return self._video_first[np.asarray(rows, dtype=np.int64)]

    def column(self, name: str, rows: np.ndarray) -> list:
        """Python values of column ``name`` at ``rows`` (None where the column is absent or null)."""
        if name not in self.table.column_names:
            return [None] * len(rows)
        return self.table.column(name).take(pa.array(np.asarray(rows, dtype=np.int64))).to_pylist()

    def numbers(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Float values of a numeric column at ``rows`` (NaN for nulls / an absent column), in Arrow and
        numpy: a page of thousands of hits makes no Python object per value."""
        if name not in self.table.column_names:
            return np.full(len(rows), np.nan, dtype=np.float64)
        taken = self.table.column(name).take(pa.array(np.asarray(rows, dtype=np.int64)))
        return pc.fill_null(taken.cast(pa.float64()), np.nan).to_numpy()

    def integers(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Values of an integer column without nulls (``id``) at ``rows``, as int64."""
        taken = self.table.column(name).take(pa.array(np.asarray(rows, dtype=np.int64)))
        return taken.to_numpy().astype(np.int64, copy=False)

    def video_rows(self, row: int) -> np.ndarray:
        """Every row of the video of ``row`` (contiguous)."""
        first = int(self._video_first[row])
        return np.arange(first, first + int(self._video_rows[row]), dtype=np.int64)

    def window_rows(self, row: int) -> np.ndarray:
        """The window rows (``clip_index >= WINDOW_CLIP_BASE``) of the video of ``row``."""
        rows = self.video_rows(row)
        clips = self.numbers("clip_index", rows)
        return rows[np.nan_to_num(clips, nan=-1.0) >= WINDOW_CLIP_BASE]

    def window_rows_of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The window rows of the videos of many ``rows`` at once: ``(owner, window)``, where ``owner[j]`` is
        the position in ``rows`` whose video has window row ``window[j]``; grouped by owner, in order."""
        rows = np.asarray(rows, dtype=np.int64)
        counts = self._video_rows[rows]
        owner = np.repeat(np.arange(len(rows), dtype=np.int64), counts)
        within = np.arange(len(owner), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        every = np.repeat(self._video_first[rows], counts) + within  # each video's rows are contiguous
        windows = np.nan_to_num(self.numbers("clip_index", every), nan=-1.0) >= WINDOW_CLIP_BASE
        return owner[windows], every[windows]

    def rows_of_videos(self, video_ids: Sequence[str]) -> np.ndarray:
        """Every row of ``video_ids`` (binary search per video in the sorted column: O(videos · log n))."""
        column = self.table.column("video_id")
        out = []
        for vid in sorted(set(video_ids)):
            lo, hi = 0, len(self)
            while lo < hi:
                mid = (lo + hi) // 2
                if column[mid].as_py() < vid:
                    lo = mid + 1
                else:
                    hi = mid
            if lo < len(self) and column[lo].as_py() == vid:
                out.append(self.video_rows(lo))
        return np.concatenate(out) if out else np.zeros(0, np.int64)


class RowParts(RowTable):
    """The rows of a version made of several ``ids`` files: its parent's ``ids.arrow`` (shared, memory-mapped)
    and one part per upsert delta after it (:func:`index.build.upsert_embeddings`). Rows are numbered part
    after part; an id held by several parts is the newest part's row (the older rows are superseded)."""

    def __init__(self, parts: Sequence[RowTable]):
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts]).astype(np.int64)
        tables = [public_columns(p.table) for p in self.parts]
        self.table = pa.concat_tables(tables, promote_options="default")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _split(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(rows, dtype=np.int64)
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        return part, rows - self.offsets[part]

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        out = np.full(len(np.asarray(ids)), -1, np.int64)
        for part, offset in zip(self.parts, self.offsets):  # oldest first: a newer part's row wins
            local = part.rows_of(ids)
            out = np.where(local >= 0, local + offset, out)
        return out

    def video_keys(self, rows: np.ndarray) -> np.ndarray:
        part, local = self._split(rows)
        out = np.zeros(len(local), np.int64)
        for p in np.unique(part):
            sel = part == p
            out[sel] = self.parts[p].video_keys(local[sel]) + self.offsets[p]
        return out

    def video_rows(self, row: int) -> np.ndarray:
        part, local = self._split(np.array([row]))
        return self.parts[int(part[0])].video_rows(int(local[0])) + self.offsets[int(part[0])]

    def rows_of_videos(self, video_ids: Sequence[str]) -> np.ndarray:
        found = [p.rows_of_videos(video_ids) + off for p, off in zip(self.parts, self.offsets)]
        return np.concatenate(found)

    def window_rows_of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Each part answers for its own rows (a video's rows are contiguous within one part); the owners are
        # then put back in order, each owner's windows in their part's order.
        part, local = self._split(rows)
        owners, windows = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for p in np.unique(part):
            positions = np.flatnonzero(part == p)
            owner, window = self.parts[int(p)].window_rows_of(local[positions])
            owners.append(positions[owner])
            windows.append(window + self.offsets[int(p)])
        owner, window = np.concatenate(owners), np.concatenate(windows)
        order = np.argsort(owner, kind="stable")
        return owner[order], window[order]


def _numpy(table: pa.Table, name: str) -> np.ndarray:
    """A helper column as numpy: a view of the (memory-mapped) buffer when the table has one chunk."""
    column = table.column(name)
    if column.num_chunks == 1:
        return column.chunk(0).to_numpy(zero_copy_only=True)
    return column.to_numpy()


# ------------------------------------------------------------------------------------------- tombstones
TOMBSTONES_FILE = "tombstones.parquet"


def write_tombstones(ids: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    """Write the sorted unique ``ids`` to ``path`` (one int64 column ``id``); returns them."""
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    pq.write_table(pa.table({"id": pa.array(ids, pa.int64())}), str(path))
    return ids


def read_tombstones(path: str | os.PathLike) -> np.ndarray:
    """Sorted unique ids of a tombstones file."""
    table = pq.read_table(str(path), columns=["id"])
    return np.unique(table.column("id").to_numpy().astype(np.int64))


# ------------------------------------------------------------------------------------------- superseded
SUPERSEDED_FILE = "superseded.parquet"


def write_superseded(ids: np.ndarray, before_shard: np.ndarray, path: str | os.PathLike) -> int:
    """Write the superseded ids of a version: the row of ``ids[i]`` in every shard below ``before_shard[i]``
    is replaced by the row of a later (delta) shard. One row per id (the highest bound); returns the count."""
    ids = np.asarray(ids, dtype=np.int64)
    before = np.asarray(before_shard, dtype=np.int32)
    order = np.lexsort((-before, ids))
    ids, before = ids[order], before[order]
    first = np.concatenate([[True], ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, bool)
    table = pa.table({"id": pa.array(ids[first], pa.int64()),
                      "before_shard": pa.array(before[first], pa.int32())})
    pq.write_table(table, str(path))
    return int(first.sum())


def read_superseded(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(ids sorted, before_shard)`` of a superseded file."""
    table = pq.read_table(str(path), columns=["id", "before_shard"]).sort_by("id")
    return table.column("id").to_numpy().astype(np.int64), table.column("before_shard").to_numpy()


def superseded_mask(ids: np.ndarray, shards: np.ndarray,
                    superseded: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Which rows (``ids`` with their ``shards``) are superseded by a row of a later shard."""
    sup_ids, before = superseded
    ids = np.asarray(ids, dtype=np.int64)
    if not len(sup_ids) or not len(ids):
        return np.zeros(len(ids), bool)
    pos = np.clip(np.searchsorted(sup_ids, ids), 0, len(sup_ids) - 1)
    return (sup_ids[pos] == ids) & (np.asarray(shards) < before[pos])


def hidden_in_shard(dead: np.ndarray, superseded: tuple[np.ndarray, np.ndarray], shard: int) -> np.ndarray:
    """Sorted ids a search of ``shard`` must skip: the tombstoned ones and those a later shard supersedes."""
    sup_ids, before = superseded
    return np.union1d(dead, sup_ids[before > shard]).astype(np.int64)

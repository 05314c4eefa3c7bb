"""Exact re-rank of compressed-code candidates against a memory-mapped float16 copy of the vectors.

A shard whose codes are lossy (PQ, fast-scan PQ, SQ8: :func:`index.factory.needs_rerank`) gets, beside its
FAISS file, the float16 copy of its vectors written by the build (the pattern of Vespa's billion-scale setup
and of SPANN): ``shard-NNNNN.refine.npy`` (``[n, dim]`` float16, rows in ascending id order) and
``shard-NNNNN.refine-ids.npy`` (those ids, int64, ascending). Both are opened with
``np.load(mmap_mode="r")``: a query touches only its R candidates' rows (R x 2 x dim bytes of page cache),
and nothing of the copy is in the serving process's own (anonymous) memory. FAISS's own ``IndexRefineFlat``
would do the same arithmetic but holds the refine vectors in RAM (4 x dim bytes a vector, read whole at
open), which is what the serving-memory floor forbids; float16 halves the disk and page cache it needs and
moves an inner product of unit vectors by < 1e-3.

:func:`rerank` is the one re-rank: :func:`index.query.search_shard` calls it for the one-process index and
for every shard replica of the Ray Serve fan-out.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

REFINE_DTYPE = np.float16
VECTORS_SUFFIX = ".refine.npy"
IDS_SUFFIX = ".refine-ids.npy"
SORT_CHUNK_ROWS = 65536  # rows gathered at a time when the build reorders the copy by id


def refine_names(shard_file: str) -> tuple[str, str]:
    """The vectors / ids file names of the float16 copy of the shard stored in ``shard_file``."""
    stem = shard_file.rsplit(".", 1)[0]
    return stem + VECTORS_SUFFIX, stem + IDS_SUFFIX


class RefineWriter:
    """Collects one shard's vectors as float16 while the build adds them (appended to a local file, never
    held in RAM), then writes the two files, rows sorted by id, into ``folder`` (:meth:`finish`)."""

    def __init__(self, folder: str | os.PathLike, shard_file: str, dim: int):
        self.folder, self.dim = Path(folder), int(dim)
        self.names = refine_names(shard_file)
        self._raw = tempfile.NamedTemporaryFile(dir=self.folder, prefix=".refine-", suffix=".raw",
                                                delete=False)
        self._ids: list[np.ndarray] = []

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        if vectors.shape[1:] != (self.dim,) or len(vectors) != len(ids):
            raise ValueError(f"refine rows must be [n, {self.dim}] with n ids, got {vectors.shape} and "
                             f"{len(ids)} ids")
        self._raw.write(np.ascontiguousarray(vectors, dtype=REFINE_DTYPE).tobytes())
        self._ids.append(np.asarray(ids, dtype=np.int64))

    def finish(self) -> dict[str, Path]:
        """Write the two files (rows in ascending id order), drop the raw one; returns ``{name: path}``."""
        self._raw.close()
        ids = np.concatenate(self._ids) if self._ids else np.zeros(0, np.int64)
        order = np.argsort(ids, kind="stable")
        if len(ids) > 1 and (np.diff(ids[order]) == 0).any():
            raise ValueError(f"refine copy {self.names[0]!r}: duplicate ids (the build rejects them first)")
        vectors_path, ids_path = self.folder / self.names[0], self.folder / self.names[1]
        if not len(ids):  # an upsert delta with no valid row: empty files (an empty file cannot be mapped)
            np.save(vectors_path, np.zeros((0, self.dim), REFINE_DTYPE))
            np.save(ids_path, ids)
            os.unlink(self._raw.name)
            return {self.names[0]: vectors_path, self.names[1]: ids_path}
        fd = os.open(self._raw.name, os.O_RDONLY)
        try:
            rows = rows_in_order([(fd, 0)], np.array([0, len(ids)]), order, self.dim)
            write_npy(vectors_path, (len(ids), self.dim), REFINE_DTYPE, rows)
        finally:
            os.close(fd)
        np.save(ids_path, ids[order])
        os.unlink(self._raw.name)
        return {self.names[0]: vectors_path, self.names[1]: ids_path}

    def abort(self) -> None:
        self._raw.close()
        Path(self._raw.name).unlink(missing_ok=True)


def rows_in_order(sources: list[tuple[int, int]], starts: np.ndarray, order: np.ndarray, dim: int
                  ) -> Iterator[np.ndarray]:
    """Rows ``order`` of the float16 files ``sources`` taken as one (``(fd, byte offset of its first row)``
    each; source ``i`` holds rows ``starts[i]:starts[i + 1]``), ``SORT_CHUNK_ROWS`` rows at a time."""
    for start in range(0, len(order), SORT_CHUNK_ROWS):
        rows = order[start:start + SORT_CHUNK_ROWS]
        source_of = np.searchsorted(starts, rows, side="right") - 1
        chunk = np.empty((len(rows), dim), REFINE_DTYPE)
        present = np.unique(source_of)
        if len(present) == 1:  # straight into the chunk (no second chunk-sized buffer)
            i = int(present[0])
            read_rows(sources[i][0], sources[i][1], rows - starts[i], chunk)
        else:
            for i in present:
                mine = source_of == i
                part = np.empty((int(mine.sum()), dim), REFINE_DTYPE)
                read_rows(sources[i][0], sources[i][1], rows[mine] - starts[i], part)
                chunk[mine] = part
        yield chunk


def read_rows(fd: int, offset: int, rows: np.ndarray, out: np.ndarray) -> None:
    """``out[j]`` = row ``rows[j]`` of the file ``fd`` (rows shaped like ``out``'s, from byte ``offset``),
    read with ``pread``. Not through a memory map: each row touched there maps the page-cache folio
    around it into this process (256 random rows of a 128 MiB file mapped 124 MiB, measured here), so
    gathering in a random order held the whole file in the RSS."""
    row_bytes = out.shape[1] * out.itemsize
    view = memoryview(out).cast("B")
    for j in np.argsort(rows, kind="stable").tolist():  # ascending file offsets
        at = offset + int(rows[j]) * row_bytes
        if os.preadv(fd, [view[j * row_bytes:(j + 1) * row_bytes]], at) != row_bytes:
            raise OSError(f"short read of row {int(rows[j])} at byte {at}")


def write_npy(path: str | os.PathLike, shape: tuple[int, int], dtype, blocks: Iterable[np.ndarray]) -> None:
    """An ``.npy`` file of ``shape`` from consecutive row ``blocks``, with plain writes: the pages of a
    memory-mapped output stay in the writer's RSS until it is unmapped (the copy written through two maps,
    the raw rows' and the output's, was most of a 10M build task's peak)."""
    rows = 0
    with open(path, "wb") as fh:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                  "shape": tuple(shape)}
        np.lib.format.write_array_header_1_0(fh, header)
        for block in blocks:
            fh.write(memoryview(np.ascontiguousarray(block, dtype=dtype)).cast("B"))  # no bytes copy
            rows += len(block)
            del block  # before the next block is made: one block alive at a time
    if rows != shape[0]:
        raise RuntimeError(f"{str(path)!r}: wrote {rows} rows, its header says {shape[0]}")


def drop_mapped_pages(array: np.ndarray) -> None:
    """Unmap the pages of a memory-mapped ``array`` this process touched (they stay in the page cache, so a
    later read is a minor fault): a pass over a whole map otherwise adds the file's size to the RSS."""
    mapping = getattr(array, "_mmap", None)  # np.memmap's own mmap (np.load(mmap_mode=...) returns one)
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


class RefineVectors:
    """The memory-mapped float16 copy of one shard: ``vectors_of(ids)`` for the re-rank."""

    def __init__(self, vectors_path: str | os.PathLike, ids_path: str | os.PathLike):
        # An empty copy (an upsert delta with no valid row) has no bytes to map: numpy reads it instead.
        self.vectors = _load(vectors_path)
        self.ids = _load(ids_path)
        if self.vectors.ndim != 2 or self.ids.ndim != 1 or len(self.vectors) != len(self.ids):
            raise ValueError(f"refine copy {str(vectors_path)!r} has shape {self.vectors.shape}, its ids "
                             f"{str(ids_path)!r} shape {self.ids.shape}: one id a row is needed")

    def __len__(self) -> int:
        return len(self.ids)

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id in the copy, -1 where it has none."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(self.ids):
            return np.full(ids.shape, -1, np.int64)
        pos = np.clip(np.searchsorted(self.ids, ids), 0, len(self.ids) - 1)
        return np.where(self.ids[pos] == ids, pos, -1)


def _load(path: str | os.PathLike) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:  # "cannot mmap an empty file": a zero-row array
        array = np.load(path)
        if array.size:
            raise
        return array


SCORE_BLOCK_ROWS = 8192  # candidate rows gathered at a time (4 MiB of float16, 8 MiB as float32, at 256 dims)


def candidate_scores(queries: np.ndarray, cand_ids: np.ndarray, refine: RefineVectors,
                     release_pages: bool = False) -> np.ndarray:
    """Exact inner products ``[Q, R]`` of each query (``[Q, D]``, normalised) with its candidates (``[Q, R]``
    ids, -1 = none: -inf) from the float16 copy. A candidate missing from the copy is a corrupt version, not
    a data error: it raises.

    Every query's candidates are gathered together in ascending row order (sequential reads of the memory
    map), ``SCORE_BLOCK_ROWS`` at a time. ``release_pages`` (a build's tuning, which re-ranks every row of
    the copy at each setting it tries) drops this process's mapping of the pages a block read before the
    next: they stay in the page cache, but a pass over the whole copy would otherwise add its size to the
    build task's RSS (:func:`drop_mapped_pages`)."""
    cand_ids = np.asarray(cand_ids, dtype=np.int64)
    queries = np.asarray(queries, np.float32)
    scores = np.full(cand_ids.shape, -np.inf, np.float32)
    width = cand_ids.shape[1] if cand_ids.ndim == 2 else 0
    flat_ids, flat_scores = cand_ids.reshape(-1), scores.reshape(-1)  # views: a score lands in ``scores``
    pairs = np.flatnonzero(flat_ids >= 0)
    rows = refine.rows_of(flat_ids[pairs])
    if (rows < 0).any():
        missing = flat_ids[pairs][rows < 0][:5].tolist()
        raise ValueError(f"ids {missing} are in the index but not in its float16 refine copy")
    order = np.argsort(rows, kind="stable")
    pairs, rows = pairs[order], rows[order]
    for start in range(0, len(rows), SCORE_BLOCK_ROWS):
        block = slice(start, start + SCORE_BLOCK_ROWS)
        gathered = refine.vectors[rows[block]].astype(np.float32)
        flat_scores[pairs[block]] = np.einsum("ij,ij->i", gathered, queries[pairs[block] // width])
        if release_pages:
            drop_mapped_pages(refine.vectors)
    return scores


def top_of(scores: np.ndarray, cand_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` ``(scores, ids)`` of scored candidates, best first (-1 / -inf padding)."""
    kk = min(int(k), scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
    top_scores = np.take_along_axis(scores, top, axis=1)
    top_ids = np.where(np.isfinite(top_scores), np.take_along_axis(np.asarray(cand_ids), top, axis=1), -1)
    return top_scores, top_ids


def rerank(queries: np.ndarray, cand_ids: np.ndarray, refine: RefineVectors, k: int,
           release_pages: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` ``(scores, ids)`` ``[Q, k]`` of each query's candidates (``[Q, R]`` ids, -1 = none) by
    their exact inner products from the float16 copy (:func:`candidate_scores`), best first."""
    return top_of(candidate_scores(queries, cand_ids, refine, release_pages), cand_ids, k)

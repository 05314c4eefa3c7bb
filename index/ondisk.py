"""On-disk IVF indexes: one small ``.faiss`` file (quantizer, codec, list offsets) plus an ``.ivfdata`` file
holding every inverted list (FAISS ``OnDiskInvertedLists``), opened memory-mapped.

:func:`merge_to_ondisk` is ``faiss.contrib.ondisk.merge_ondisk`` with bounded memory: FAISS's merge writes
the lists through a shared mapping of the whole output (its pages then count in the process's RSS, up to the
corpus size); here the layout is allocated by FAISS and the bytes are written with ``pwrite``, one slice at a
time, so the merging process holds one slice. :func:`read_ondisk` opens such a pair from any folder.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import faiss
import numpy as np

IVFDATA_SUFFIX = ".ivfdata"
ID_BYTES = 8  # faiss.idx_t


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """FAISS's on-disk lists printf progress notes ("resizing ...", "updating ondisk filename ...") to the C
    stdout, which carries the jobs' JSON output: send them to stderr while FAISS runs."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def ivfdata_name(faiss_name: str) -> str:
    """``index.faiss`` → ``index.ivfdata``: the lists file published beside the index file."""
    return Path(faiss_name).with_suffix(IVFDATA_SUFFIX).name


def list_sizes(index: faiss.Index) -> np.ndarray:
    invlists = faiss.extract_index_ivf(index).invlists
    return np.array([invlists.list_size(i) for i in range(invlists.nlist)], dtype=np.uint64)


def merge_to_ondisk(
    trained: faiss.Index, slice_files: Iterable[Path], sizes: np.ndarray, faiss_path: Path
) -> faiss.Index:
    """Concatenate the inverted lists of ``slice_files`` (populated copies of ``trained``, in order; each
    path is read when the iteration reaches it) into ``faiss_path`` + its ``.ivfdata``; ``sizes`` = the
    summed list sizes of the slices (:func:`list_sizes`), which lay out the file. Returns the merged index
    (lists memory-mapped).

    Ids are copied as stored (``add_with_ids`` ids: nothing is shifted) and list entries keep slice order,
    so the result equals adding the slices' rows one after another to ``trained``."""
    ivf = faiss.extract_index_ivf(trained)
    if trained.ntotal or ivf.ntotal:
        raise ValueError(f"merge_to_ondisk needs an empty trained index, this one holds {trained.ntotal}")
    sizes = np.ascontiguousarray(sizes, dtype=np.uint64)
    if sizes.shape != (ivf.nlist,):
        raise ValueError(f"sizes has shape {sizes.shape}, the index has {ivf.nlist} lists")
    data_path = faiss_path.with_suffix(IVFDATA_SUFFIX)
    data_path.unlink(missing_ok=True)
    invlists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(data_path))
    with _stdout_to_stderr():
        invlists.update_totsize(int((sizes * (ivf.code_size + ID_BYTES)).sum()))
    invlists.set_all_lists_sizes(faiss.swig_ptr(sizes))
    offsets = np.array([invlists.lists.at(i).offset for i in range(ivf.nlist)], dtype=np.int64)
    filled = np.zeros(ivf.nlist, dtype=np.int64)
    fd = os.open(data_path, os.O_WRONLY)
    try:
        for path in slice_files:
            index = faiss.read_index(str(path))  # one slice in RAM at a time
            _write_slice(index, fd, offsets, sizes.astype(np.int64), filled, ivf.code_size)
            del index
        os.fsync(fd)
    finally:
        os.close(fd)
    if not np.array_equal(filled, sizes.astype(np.int64)):
        wrong = int(np.flatnonzero(filled != sizes.astype(np.int64))[0])
        raise ValueError(f"slices hold {filled[wrong]} entries in list {wrong}, their sizes said "
                         f"{sizes[wrong]}")
    merged = faiss.clone_index(trained)
    merged_ivf = faiss.extract_index_ivf(merged)
    merged_ivf.replace_invlists(invlists, True)
    invlists.this.disown()
    merged.ntotal = merged_ivf.ntotal = int(sizes.sum())
    faiss.write_index(merged, str(faiss_path))
    return merged


def _write_slice(
    index: faiss.Index, fd: int, offsets: np.ndarray, capacity: np.ndarray, filled: np.ndarray, code_size: int
) -> None:
    """Append each list of one slice (read into RAM) at its list's cursor: codes, then ids at the list's
    ids area (``offset + capacity · code_size``: the OnDiskInvertedLists layout)."""
    invlists = faiss.extract_index_ivf(index).invlists
    for i in range(invlists.nlist):
        n = invlists.list_size(i)
        if not n:
            continue
        codes = faiss.rev_swig_ptr(invlists.get_codes(i), n * code_size)
        ids = faiss.rev_swig_ptr(invlists.get_ids(i), n)
        if filled[i] + n > capacity[i]:
            raise ValueError(f"list {i}: slices hold more entries than their sizes said ({capacity[i]})")
        os.pwrite(fd, memoryview(codes), int(offsets[i] + filled[i] * code_size))
        ids_area = offsets[i] + capacity[i] * code_size
        os.pwrite(fd, memoryview(ids.view(np.uint8)), int(ids_area + filled[i] * ID_BYTES))
        filled[i] += n


def read_ondisk(faiss_path: Path, data_path: Path, writable: bool = False) -> faiss.Index:
    """Open an on-disk index whose two files may sit in different folders (a store's cache keeps each
    object in its own): the lists are memory-mapped read-only, or copied into RAM when ``writable`` (a
    delete / upsert changes a copy, never the published ``.ivfdata``)."""
    beside = faiss_path.with_name(data_path.name)
    if beside.resolve() != data_path.resolve():
        link = beside.with_name(f".{beside.name}.{os.getpid()}.link")
        link.unlink(missing_ok=True)
        link.symlink_to(data_path.resolve())
        os.replace(link, beside)  # FAISS finds the lists file beside the index file (IO_FLAG_ONDISK_SAME_DIR)
    # OnDiskInvertedLists always maps its file (read-only here); IO_FLAG_MMAP would skip the lists instead.
    flags = faiss.IO_FLAG_READ_ONLY | faiss.IO_FLAG_ONDISK_SAME_DIR
    with _stdout_to_stderr():
        index = faiss.read_index(str(faiss_path), flags)
    return to_memory(index) if writable else index


def is_ondisk(index: faiss.Index) -> bool:
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return False
    return isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)


def to_memory(index: faiss.Index) -> faiss.Index:
    """``index`` with its on-disk lists copied into RAM (``ArrayInvertedLists``), in place; returned."""
    ivf = faiss.extract_index_ivf(index)
    source = ivf.invlists
    arrays = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    for i in range(ivf.nlist):
        n = source.list_size(i)
        if n:
            arrays.add_entries(i, n, source.get_ids(i), source.get_codes(i))
    ivf.replace_invlists(arrays, True)
    arrays.this.disown()
    return index

"""Index selection and construction.

:func:`choose_factory` is the one pure policy function (autofaiss-like: the most accurate structure that
fits the memory budget); :func:`make_index` is the one place a FAISS factory string is parsed and
instantiated. Everything else in ``index/`` talks to the objects these two return.
"""

from __future__ import annotations

import math
import re

import faiss
import numpy as np

METRIC = "inner_product"  # vectors are L2-normalised, so inner product == cosine similarity
ID_BYTES = 8  # int64 id kept per vector by IVF lists / IndexIDMap2
FLAT_MAX_N = 20_000  # below this an exact scan is fast enough and needs no tuning
HNSW_MAX_N = 100_000  # HNSW graph construction beyond this is slow on CPU; IVF trains faster
PQ_M_CANDIDATES = (256, 128, 96, 64, 48, 32, 16, 8)
# Fast-scan PQ (4-bit codes, SIMD-scanned from registers): dims per sub-quantizer, best first. 4 dims a
# sub-quantizer = half a byte per 4 dims (32 B for 256 dims): the float16 re-rank restores recall.
FASTSCAN_DIMS_PER_SUB = (4, 8, 16)
_LOSSY_CODES_RE = re.compile(r"(^|,)(PQ\d+(x\d+)?(fs|np)?|SQ[468])(,|$)")  # the codes part of a factory

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "kib": 2**10,
    "m": 1e6,
    "mb": 1e6,
    "mib": 2**20,
    "g": 1e9,
    "gb": 1e9,
    "gib": 2**30,
    "t": 1e12,
    "tb": 1e12,
    "tib": 2**40,
}


def parse_memory(value: str | int | float) -> int:
    """``"4GB"`` / ``"512MiB"`` / ``1e9`` → bytes; a clear error for anything else."""
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"memory budget must be positive, got {value!r}")
        return int(value)
    match = _SIZE_RE.match(str(value))
    if not match or (match.group(2) or "").lower() not in _SIZE_UNITS:
        raise ValueError(f"memory budget {value!r} is not a size like '4GB', '512MiB' or a byte count")
    size = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()])
    if size <= 0:
        raise ValueError(f"memory budget must be positive, got {value!r}")
    return size


def choose_nlist(n: int) -> int:
    """IVF list count: a power of two near 2·sqrt(n), with >= 39 training points per list."""
    target = 2.0 * math.sqrt(max(n, 1))
    nlist = 2 ** int(round(math.log2(max(target, 16))))
    while nlist > 16 and n < 39 * nlist:
        nlist //= 2
    return int(min(max(nlist, 16), 65536))


def estimate_memory(n: int, dim: int, kind: str, nlist: int = 0, pq_m: int = 0, hnsw_m: int = 32) -> int:
    """Approximate RAM in bytes of an index of ``kind`` (flat/hnsw/ivf_flat/ivf_sq16/ivf_sq8/ivf_pq)."""
    coarse = nlist * dim * 4 + (nlist * hnsw_m * 2 * 4 if nlist > 4096 else 0)
    per_vector = {
        "flat": 4 * dim + ID_BYTES,
        "hnsw": 4 * dim + ID_BYTES + hnsw_m * 2 * 4 * 1.1,
        "ivf_flat": 4 * dim + ID_BYTES,
        "ivf_sq16": 2 * dim + ID_BYTES,
        "ivf_sq8": dim + ID_BYTES,
        "ivf_pq": pq_m + ID_BYTES,
        "ivf_pq_fs": pq_m / 2 + ID_BYTES,
    }[kind]
    extra = coarse if kind.startswith("ivf") else 0
    if kind == "ivf_pq":
        extra += dim * dim * 4 + 256 * dim * 4  # OPQ rotation + PQ codebooks
    return int(n * per_vector + extra)


def _ivf_coarse(nlist: int) -> str:
    # A flat coarse quantizer costs nlist·dim per query; past 4096 lists an HNSW over the centroids wins.
    return f"IVF{nlist}_HNSW32" if nlist > 4096 else f"IVF{nlist}"


def choose_factory(
    n: int, dim: int, memory_budget_bytes: int, recall_target: float = 0.95, rerank: bool = True
) -> str:
    """Pick a FAISS factory string for ``n`` vectors of ``dim`` within ``memory_budget_bytes``.

    Pure function. Order of preference (most accurate first, autofaiss-like): ``Flat`` for small n,
    ``HNSW{M},Flat`` for medium n, then ``IVF{nlist}[_HNSW32],Flat``. When Flat codes do not fit and
    ``rerank`` (the build writes a memory-mapped float16 copy of the vectors, :mod:`index.rerank`):
    fast-scan PQ ``IVF{nlist}[_HNSW32],PQ{m}x4fs`` with the largest code that fits (4-bit codes scanned with
    SIMD: the fastest CPU IVF scan; the exact re-rank of its top candidates restores recall). Without
    re-rank (a distributed build's on-disk lists hold no fast-scan blocks): SQfp16 / SQ8 codes, then
    ``OPQ{m}_{d},IVF{nlist}[_HNSW32],PQ{m}``. A higher recall target gets a denser HNSW graph and keeps exact
    codes longer. The budget counts what the index holds per vector in RAM / page cache while scanning;
    the float16 copy is read R rows a query and stays on disk.
    """
    if n <= 0 or dim <= 0:
        raise ValueError(f"need n > 0 and dim > 0 to choose an index, got n={n}, dim={dim}")
    if not 0.0 < recall_target <= 1.0:
        raise ValueError(f"recall_target must be in (0, 1], got {recall_target}")
    budget = int(memory_budget_bytes)
    flat_max = FLAT_MAX_N * (2 if recall_target >= 0.999 else 1)
    if n <= flat_max and estimate_memory(n, dim, "flat") <= budget:
        return "Flat"
    hnsw_m = 32 if recall_target >= 0.9 else 16
    if n <= HNSW_MAX_N and estimate_memory(n, dim, "hnsw", hnsw_m=hnsw_m) <= budget:
        return f"HNSW{hnsw_m},Flat"
    nlist = choose_nlist(n)
    coarse = _ivf_coarse(nlist)
    if estimate_memory(n, dim, "ivf_flat", nlist) <= budget:
        return f"{coarse},Flat"
    if rerank:
        for per_sub in FASTSCAN_DIMS_PER_SUB:
            m = dim // per_sub
            if dim % per_sub == 0 and m >= 2 and m % 2 == 0 and (
                    estimate_memory(n, dim, "ivf_pq_fs", nlist, pq_m=m) <= budget):
                return f"{coarse},PQ{m}x4fs"
    if recall_target >= 0.9 and estimate_memory(n, dim, "ivf_sq16", nlist) <= budget:
        return f"{coarse},SQfp16"
    if estimate_memory(n, dim, "ivf_sq8", nlist) <= budget:
        return f"{coarse},SQ8"
    for m in PQ_M_CANDIDATES:
        d_opq = min(dim, 4 * m) // m * m  # OPQ output dim must be a multiple of m, ≥ 4 dims per sub-vector
        if m > dim or d_opq < m:
            continue
        if estimate_memory(n, dim, "ivf_pq", nlist, pq_m=m) <= budget:
            return f"OPQ{m}_{d_opq},{coarse},PQ{m}"
    smallest = estimate_memory(n, dim, "ivf_pq", nlist, pq_m=PQ_M_CANDIDATES[-1])
    raise ValueError(
        f"memory budget {budget} bytes is too small for {n} vectors of dim {dim} "
        f"(the smallest index, PQ{PQ_M_CANDIDATES[-1]}, needs ~{smallest} bytes)"
    )


def needs_rerank(factory: str) -> bool:
    """Whether ``factory``'s codes are lossy (PQ of any kind, SQ4/6/8): the build then writes the float16
    copy the search re-ranks its candidates against (:mod:`index.rerank`)."""
    spec = factory.strip()
    refined_in_faiss = "RFlat" in spec or "Refine(" in spec  # FAISS's own in-RAM refine: nothing to add
    return bool(_LOSSY_CODES_RE.search(spec)) and not refined_in_faiss


def make_index(factory: str, dim: int) -> faiss.Index:
    """Instantiate ``factory`` (inner product) so that ``add_with_ids`` works: non-IVF indexes get IDMap2.

    The only place a factory string is parsed. A bad string raises ``ValueError`` naming it.
    """
    if not isinstance(factory, str) or not factory.strip():
        raise ValueError(f"factory string must be a non-empty string, got {factory!r}")
    spec = factory.strip()
    try:
        index = faiss.index_factory(int(dim), spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"invalid FAISS factory string {factory!r} for dim {dim}: {exc}") from exc
    if not is_ivf(index) and not isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        index = faiss.IndexIDMap2(index)
    return index


def is_fast_scan(index: faiss.Index) -> bool:
    """Whether ``index``'s (or its IVF part's) inverted lists hold fast-scan codes (``PQ{m}x4fs``), packed in
    SIMD blocks: what a list-by-list copy or merge must not treat as one code after another."""
    ivf = faiss.try_extract_index_ivf(index)
    return ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFastScan)


def is_ivf(index: faiss.Index) -> bool:
    """True when ``index`` (possibly behind a pre-transform) is an IVF index."""
    try:
        faiss.extract_index_ivf(index)
        return True
    except RuntimeError:
        return False


def needs_training(index: faiss.Index) -> bool:
    return not index.is_trained


def training_size(factory_index: faiss.Index, n: int) -> int:
    """How many vectors to train ``factory_index`` on: enough for k-means / PQ codebooks, capped."""
    if not needs_training(factory_index):
        return 0
    want = 20_000
    if is_ivf(factory_index):
        want = max(want, 40 * faiss.extract_index_ivf(factory_index).nlist)
    return int(min(n, want, 250_000))


def supports_remove(index: faiss.Index) -> bool:
    """IVF and flat storage support ``remove_ids``; HNSW graphs do not (they are rebuilt instead)."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    return not isinstance(inner, faiss.IndexHNSW)


def to_gpu_if_available(index: faiss.Index) -> tuple[faiss.Index, bool]:
    """Move ``index`` to all GPUs for training/adding when FAISS sees one; returns (index, on_gpu)."""
    if faiss.get_num_gpus() <= 0 or not hasattr(faiss, "index_cpu_to_all_gpus"):
        return index, False
    try:
        return faiss.index_cpu_to_all_gpus(index), True
    except (RuntimeError, AttributeError):
        # Not every structure has a GPU twin (HNSW, IDMap2 over HNSW): stay on CPU.
        return index, False


def to_cpu(index: faiss.Index, on_gpu: bool) -> faiss.Index:
    return faiss.index_gpu_to_cpu(index) if on_gpu else index


def normalise(vectors: np.ndarray) -> np.ndarray:
    """float32, C-contiguous, L2-normalised copy (inner product then equals cosine similarity)."""
    out = np.ascontiguousarray(vectors, dtype=np.float32).copy()
    faiss.normalize_L2(out)
    return out

"""Search-parameter tuning: recall@k against exact inner-product search, smallest nprobe / efSearch that
meets the recall target."""

from __future__ import annotations

from collections.abc import Iterable

import faiss
import numpy as np

from index.factory import is_ivf

NPROBE_CANDIDATES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048)
EF_CANDIDATES = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)


class ExactTopK:
    """Streaming exact top-k (inner product) of fixed queries over database blocks added one at a time."""

    def __init__(self, queries: np.ndarray, k: int):
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.k = int(k)
        self.heap = faiss.ResultHeap(len(self.queries), self.k, keep_max=True)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        if len(vectors) == 0 or len(self.queries) == 0:
            return
        scores = self.queries @ np.ascontiguousarray(vectors, dtype=np.float32).T
        kk = min(self.k, scores.shape[1])
        top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        d = np.take_along_axis(scores, top, axis=1)
        self.heap.add_result(
            np.ascontiguousarray(d), np.ascontiguousarray(np.asarray(ids)[top], dtype=np.int64)
        )

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        self.heap.finalize()
        return self.heap.D, self.heap.I


def merge_topk(d_a: np.ndarray, i_a: np.ndarray, d_b: np.ndarray, i_b: np.ndarray, k: int):
    """Merge two per-query top lists (descending scores, -1 ids are empty) into the top ``k``."""
    d = np.concatenate([d_a, d_b], axis=1)
    i = np.concatenate([i_a, i_b], axis=1)
    d = np.where(i < 0, -np.inf, d)
    order = np.argsort(-d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, axis=1), np.take_along_axis(i, order, axis=1)


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean over queries of |found[:k] ∩ truth[:k]| / |truth[:k]| (ids; -1 padding ignored)."""
    hits, total = 0, 0
    for f, t in zip(np.asarray(found)[:, :k], np.asarray(truth)[:, :k]):
        t_set = {int(x) for x in t if x >= 0}
        if not t_set:
            continue
        hits += len(t_set.intersection(int(x) for x in f if x >= 0))
        total += len(t_set)
    return hits / total if total else 1.0


def tunable_parameter(index: faiss.Index) -> str | None:
    """``nprobe`` for IVF, ``efSearch`` for HNSW, None for exact indexes."""
    if is_ivf(index):
        return "nprobe"
    inner = index
    if isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexHNSW):
        return "efSearch"
    return None


def candidates(index: faiss.Index, name: str | None) -> Iterable[int]:
    if name == "nprobe":
        nlist = faiss.extract_index_ivf(index).nlist
        return [c for c in NPROBE_CANDIDATES if c <= nlist] or [nlist]
    if name == "efSearch":
        return EF_CANDIDATES
    return []


def apply_search_params(index: faiss.Index, params: dict[str, int]) -> None:
    """Set stored search parameters (nprobe, efSearch, quantizer_efSearch) on ``index``."""
    space = faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, float(value))


def params_for(index: faiss.Index, name: str | None, value: int) -> dict[str, int]:
    if name is None:
        return {}
    params = {name: int(value)}
    if name == "nprobe":
        quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            # The coarse HNSW must return at least nprobe good lists.
            params["quantizer_efSearch"] = max(64, 2 * int(value))
    return params


def tune(index: faiss.Index, queries: np.ndarray, truth_ids: np.ndarray, k: int, recall_target: float):
    """Smallest search setting whose recall@k reaches ``recall_target``.

    Returns ``(params, recall, target_met, curve)``; ``curve`` lists (value, recall) tried. When no
    candidate reaches the target the most accurate one is kept and ``target_met`` is False.
    """
    name = tunable_parameter(index)
    k = int(min(k, truth_ids.shape[1])) if truth_ids.size else int(k)
    if len(queries) == 0:
        return {}, float("nan"), False, []
    if name is None:
        _, found = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        recall = recall_at_k(found, truth_ids, k)
        return {}, recall, recall >= recall_target, []
    curve = []
    best = None
    for value in candidates(index, name):
        params = params_for(index, name, value)
        apply_search_params(index, params)
        _, found = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        recall = recall_at_k(found, truth_ids, k)
        curve.append((int(value), float(recall)))
        best = (params, recall)
        if recall >= recall_target:
            return params, float(recall), True, curve
    params, recall = best
    apply_search_params(index, params)
    return params, float(recall), False, curve


def measure_recall(index: faiss.Index, queries: np.ndarray, truth_ids: np.ndarray, k: int) -> float:
    """recall@k of ``index`` as currently configured."""
    if len(queries) == 0:
        return float("nan")
    k = int(min(k, truth_ids.shape[1]))
    _, found = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return recall_at_k(found, truth_ids, k)

"""Search-parameter tuning: recall@k against exact inner-product search, smallest nprobe / efSearch that
meets the recall target; and the text query sets it is tuned on (caption embeddings, a service query log)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import faiss
import numpy as np
import pyarrow as pa

from index.factory import is_ivf
from index.rerank import RefineVectors, candidate_scores, rerank, top_of
from runtime import storage

NPROBE_CANDIDATES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048)
EF_CANDIDATES = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)
# Exact top-k: at most this many query x row scores at a time (16 MiB of float32; with argpartition's int64
# indices ~5x that is transient: 1 << 24 made it the largest allocation of a build task, ~390 MB).
SCORE_BLOCK = 1 << 22
QUERY_LOG_SUFFIX = ".jsonl"  # a service query log: one {"q": TEXT, ...} a line (workflows.serve.querylog)


class ExactTopK:
    """Streaming exact top-k (inner product) of fixed queries over database blocks added one at a time."""

    def __init__(self, queries: np.ndarray, k: int):
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.k = int(k)
        self.heap = faiss.ResultHeap(len(self.queries), self.k, keep_max=True)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        if len(vectors) == 0 or len(self.queries) == 0:
            return
        vectors, ids = np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids)
        step = max(1024, SCORE_BLOCK // len(self.queries))  # bounds the [queries, rows] score matrix
        for start in range(0, len(vectors), step):
            scores = self.queries @ vectors[start:start + step].T
            kk = min(self.k, scores.shape[1])
            top = np.argpartition(scores, scores.shape[1] - kk, axis=1)[:, -kk:]  # no negated copy
            d = np.take_along_axis(scores, top, axis=1)
            self.heap.add_result(
                np.ascontiguousarray(d), np.ascontiguousarray(ids[start:start + step][top], dtype=np.int64)
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


def measure_recall(index: faiss.Index, queries: np.ndarray, truth_ids: np.ndarray, k: int,
                   refine: RefineVectors | None = None, depth: int = 0) -> float:
    """recall@k of ``index`` as currently configured (its top ``depth`` re-ranked against ``refine``)."""
    if len(queries) == 0:
        return float("nan")
    k = int(min(k, truth_ids.shape[1]))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if refine is None:
        _, found = index.search(queries, k)
    else:
        candidates_found = index.search(queries, max(k, int(depth)))[1]
        found = rerank(queries, candidates_found, refine, k, release_pages=True)[1]
    return recall_at_k(found, truth_ids, k)


def _files(uri: str, suffix: str, what: str) -> list[str]:
    """``uri`` when it is a file, else its ``*suffix`` files (names starting ``_`` or ``.`` skipped)."""
    if storage.is_file(uri):
        return [uri]
    if not storage.exists(uri):
        raise FileNotFoundError(f"{what} {uri!r} does not exist")
    files = [f for f in storage.list_files(uri, suffix) if not storage.name(f).startswith(("_", "."))]
    if not files:
        raise FileNotFoundError(f"{what} {uri!r} holds no *{suffix} files")
    return files


def read_query_log(uris: str | Sequence[str]) -> list[str]:
    """The distinct query texts (first-seen order) of service query logs: JSONL files or folders of them.

    A line is ``{"q": TEXT, ...}``; a malformed line raises ``ValueError`` naming the file and line, except a
    torn last line (no newline after it: a write cut short), which is skipped."""
    texts: dict[str, None] = {}
    for uri in [uris] if isinstance(uris, str) else uris:
        for path in _files(storage.normalize(uri), QUERY_LOG_SUFFIX, "query log"):
            lines = storage.read_text(path).split("\n")
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    if number == len(lines):
                        continue
                    raise ValueError(f"query log {path!r} line {number}: not JSON ({exc})") from None
                text = record.get("q") if isinstance(record, dict) else None
                if not isinstance(text, str) or not text.strip():
                    raise ValueError(f"query log {path!r} line {number}: needs a non-empty string field 'q'")
                texts.setdefault(text.strip(), None)
    return list(texts)


def read_caption_vectors(uris: str | Sequence[str], dim: int) -> tuple[np.ndarray, list[str]]:
    """Caption text embeddings (``jobs.embed --with-text``: ``part-*.parquet`` with ``caption`` and
    ``embedding`` columns) as L2-normalised ``[n, dim]`` float32, one row per distinct caption; returns
    ``(vectors, captions)``. Wrong dims, NaN or all-zero vectors raise ``ValueError`` naming the file."""
    vectors, captions, seen = [], [], set()
    for uri in [uris] if isinstance(uris, str) else uris:
        for path in _files(storage.normalize(uri), ".parquet", "caption embeddings"):
            table = storage.read_parquet(path)
            if not {"caption", "embedding"} <= set(table.column_names):
                raise ValueError(f"caption embeddings {path!r} need 'caption' and 'embedding' columns, "
                                 f"have {table.column_names}")
            if not table.num_rows:
                continue
            emb = _matrix(table.column("embedding"), path, dim)
            for text, vec in zip(table.column("caption").to_pylist(), emb):
                if text is not None and text not in seen:
                    seen.add(text)
                    captions.append(text)
                    vectors.append(vec)
    out = np.asarray(vectors, np.float32).reshape(-1, dim)
    return normalize_queries(out, "caption embeddings"), captions


def _matrix(column: pa.ChunkedArray, path: str, dim: int) -> np.ndarray:
    """``[n, dim]`` float32 of a list / fixed-size-list embedding column; refuses nulls and other lengths."""
    values = column.combine_chunks()
    if values.null_count:
        raise ValueError(f"caption embeddings {path!r}: {values.null_count} null embedding(s)")
    if pa.types.is_fixed_size_list(values.type):
        lengths = np.full(len(values), values.type.list_size)
    else:
        lengths = np.asarray(values.value_lengths().to_numpy(zero_copy_only=False))
    if (lengths != dim).any():
        raise ValueError(f"caption embeddings {path!r} have dim {int(lengths[lengths != dim][0])}, "
                         f"the index has dim {dim}")
    return np.asarray(values.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(len(values), dim)


def normalize_queries(vectors: np.ndarray, what: str) -> np.ndarray:
    """L2-normalised float32 copies; NaN/inf or zero-norm rows raise ``ValueError`` naming ``what``."""
    vectors = np.asarray(vectors, np.float32)
    if not np.isfinite(vectors).all():
        raise ValueError(f"{what}: NaN/inf in {int((~np.isfinite(vectors)).any(axis=1).sum())} vector(s)")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if (norms <= 1e-12).any():
        raise ValueError(f"{what}: {int((norms <= 1e-12).sum())} all-zero vector(s)")
    return np.ascontiguousarray(vectors / norms) if len(vectors) else vectors


OFFDATA_NOISE = 0.5  # isotropic noise added to a centred probe (length relative to the unit probe)


def offdata_probes(probes: np.ndarray, sample: np.ndarray, rng: np.random.Generator,
                   noise: float = OFFDATA_NOISE) -> np.ndarray:
    """Text-like tuning queries for a corpus without captions: held-out video vectors moved off the data the
    way text lies off it. Contrastive encoders put one shared offset between the modalities (the "modality
    gap", Liang et al. 2022), which the corpus mean carries: each probe loses it (``probe - mean(sample)``)
    and gets isotropic noise (what a text query does not say), so a probe neither matches its own vector nor
    sits on the data's manifold."""
    if not len(probes):
        return np.zeros_like(probes, dtype=np.float32)
    centre = np.asarray(sample if len(sample) else probes, np.float32).mean(axis=0)
    moved = probes - centre
    moved /= np.maximum(np.linalg.norm(moved, axis=1, keepdims=True), 1e-12)
    jitter = rng.normal(size=moved.shape).astype(np.float32)
    jitter *= noise / np.maximum(np.linalg.norm(jitter, axis=1, keepdims=True), 1e-12)
    return normalize_queries(moved + jitter, "off-data probes")


def pick_queries(logged: np.ndarray, captions: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    """At most ``limit`` tuning queries: the query log's first (what users send), then captions at random."""
    rng = np.random.default_rng(seed)
    if len(logged) > limit:
        logged = logged[np.sort(rng.choice(len(logged), limit, replace=False))]
    room = limit - len(logged)
    if len(captions) > room:
        captions = captions[np.sort(rng.choice(len(captions), room, replace=False))]
    return np.ascontiguousarray(np.concatenate([logged, captions]).astype(np.float32))


RERANK_DEPTHS = (20, 40, 80, 160, 320, 640)  # candidates re-ranked exactly (R), smallest first
# Cost of one query in "code bytes scanned": a re-ranked candidate is a random float16 row read from the
# page cache plus a dot product, about this many scanned code bytes' time (fast-scan reads codes from SIMD
# registers; one gathered row costs ~0.1 us).
RERANK_ROW_COST = 2048


def tune_rerank(index: faiss.Index, refine: RefineVectors, queries: np.ndarray, truth_ids: np.ndarray, k: int,
                recall_target: float) -> tuple[dict[str, int], int, float, bool, list]:
    """Tune nprobe and the re-rank depth R together (:mod:`index.rerank`): for each nprobe (ascending) the
    index's top ``max(RERANK_DEPTHS)`` candidates are re-ranked exactly at every R (a shorter list is a
    prefix of the longer one); of the (nprobe, R) pairs reaching ``recall_target`` the cheapest by
    :func:`query_cost` wins. Returns ``(params, R, recall, met, curve)``; ``curve`` lists
    ``(nprobe, R, recall)``. When no pair reaches the target the most accurate one is kept, met False."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = int(min(k, truth_ids.shape[1]))
    if len(queries) == 0:
        return {}, 0, float("nan"), False, []
    depths = [r for r in RERANK_DEPTHS if r >= k] or [k]
    curve, best_met, best_any = [], None, None
    for value in candidates(index, "nprobe"):
        if best_met is not None and query_cost(index, value, depths[0]) >= best_met[3]:
            break  # this nprobe and every larger one cost more than the best pair found
        params = params_for(index, "nprobe", value)
        apply_search_params(index, params)
        _, found = index.search(queries, max(depths))
        # once: every depth re-ranks a prefix of it
        scores = candidate_scores(queries, found, refine, release_pages=True)
        for depth in depths:
            ids = top_of(scores[:, :depth], found[:, :depth], k)[1]
            recall = float(recall_at_k(ids, truth_ids, k))
            curve.append((int(value), int(depth), recall))
            cost = query_cost(index, int(value), depth)
            if best_any is None or recall > best_any[2]:
                best_any = (params, depth, recall, cost)
            if recall >= recall_target and (best_met is None or cost < best_met[3]):
                best_met = (params, depth, recall, cost)
    params, depth, recall, _ = best_met or best_any
    apply_search_params(index, params)
    return params, int(depth), float(recall), best_met is not None, curve


def query_cost(index: faiss.Index, nprobe: int, depth: int) -> float:
    """Modelled cost of one query: code bytes scanned in ``nprobe`` average lists + ``depth`` rows
    re-ranked."""
    ivf = faiss.extract_index_ivf(index)
    per_list = max(index.ntotal, 1) / max(ivf.nlist, 1)
    return nprobe * per_list * max(int(ivf.code_size), 1) + depth * RERANK_ROW_COST

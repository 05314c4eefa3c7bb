"""Python query API: ``VideoIndex.open(path).search("a red ball", k=10)``."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from index import store
from index.moments import DEFAULT_MAX_GAP_S, DEFAULT_REL_THRESHOLD, Moment, merge_windows
from index.rerank import RefineVectors, rerank
from index.rows import RowTable
from index.searcher import RankedResult
from index.sharded import merge_shard_results
from index.tuning import apply_search_params
from runtime import storage
from runtime.values import finite_float

Reranker = Callable[[str | None, list["Hit"]], list["Hit"]]


@dataclasses.dataclass
class Hit:
    """One retrieved video: its aggregated ``score`` and best-scoring clip.

    For a video embedded with sliding windows, ``start_s`` / ``end_s`` name its best *moment* (merged run of
    high-scoring windows, :mod:`index.moments`) and ``moments`` lists up to ``moments_per_video`` of them,
    best first; ``moments`` is None for videos without window rows.
    """

    video_id: str
    score: float
    start_s: float | None = None
    end_s: float | None = None
    clip_index: int | None = None
    caption: str | None = None
    num_clips: int = 1
    id: int | None = None
    moments: list[Moment] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class VideoIndex:
    """A published index version opened for search (all its shards), optionally with a text encoder.

    Use :meth:`open`. The FAISS files and the rows (``ids.arrow``) are memory-mapped: the process's own memory
    does not grow with the corpus, and Python objects are made only for the hits returned. Rows a delete
    tombstoned (``dead_ids``) are filtered inside FAISS and never ranked.

    Query vectors are L2-normalised; text is encoded with the model named by the
    index's ``model_id``: built from index.json's ``model_name`` and trained weights (``pretrained``, else
    the checkpoint index.json records) on the first text query, or the ``encoder`` passed in, whose
    ``model_id`` must match. Without weights a text query refuses (:class:`models.MissingWeightsError`)
    unless ``allow_random_init`` (a seeded random encoder, as tests use).
    """

    def __init__(
        self,
        root: str,
        version_dir: str,
        meta: dict[str, Any],
        indexes: list,
        ids: RowTable | pa.Table,
        encoder=None,
        tokenizer=None,
        pretrained: str | None = None,
        allow_random_init: bool = False,
        dead_ids: np.ndarray | None = None,
        shard_hidden: Sequence[np.ndarray] | None = None,
        refines: list[RefineVectors | None] | None = None,
    ):
        self.root, self.version_dir, self.meta, self.indexes = root, version_dir, meta, indexes
        self.refines = list(refines) if refines is not None else [None] * len(indexes)
        self.dim = int(meta["dim"])
        self.model_id = meta.get("model_id")
        self.pretrained = pretrained
        self.allow_random_init = bool(allow_random_init)
        self.rows = ids if isinstance(ids, RowTable) else RowTable(ids)
        self.dead_ids = np.unique(np.asarray(dead_ids if dead_ids is not None else [], dtype=np.int64))
        self._live_selector = None  # "not tombstoned", built once: an IDSelectorBatch costs O(dead) to make
        if len(self.dead_ids):
            dead = faiss.IDSelectorBatch(self.dead_ids)
            self._live_selector = faiss.IDSelectorNot(dead)
            self._live_selector.keep_alive = dead  # IDSelectorNot does not own the selector it negates
        # After an upsert delta (index.build.upsert_embeddings) a shard also skips the ids a later shard
        # supersedes: one "live here" selector per shard instead of the version's "not tombstoned".
        self._shard_live = None
        self._shard_hidden = list(shard_hidden) if shard_hidden is not None else None
        if shard_hidden is not None and any(len(h) > len(self.dead_ids) for h in shard_hidden):
            self._shard_live = [selector_excluding(h) for h in shard_hidden]
        for info, ix in zip(meta["shards"], indexes):
            apply_search_params(ix, info.get("search_params", {}))
        self._encoder = None
        self._tokenizer = tokenizer
        if encoder is not None:
            self.set_encoder(encoder, tokenizer)

    # ----------------------------------------------------------------------------------------- open
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        encoder=None,
        tokenizer=None,
        version: str | None = None,
        mmap: bool | None = None,
        pretrained: str | None = None,
        allow_random_init: bool = False,
        verify: bool | None = None,
    ) -> VideoIndex:
        """Open the CURRENT (or given) version of the index at ``path`` (a folder or ``s3://``/``gs://``...).

        The version's files are read from local copies (remote ones cached under ``$VIDSIFT_CACHE`` and
        verified against the sha256 in index.json; ``verify`` forces / skips that check), so queries run at
        local speed. FAISS files are memory-mapped unless ``mmap=False`` (then read into memory).
        ``pretrained`` overrides the text encoder's checkpoint recorded in index.json;
        ``allow_random_init`` permits a seeded random text encoder when there is none. Missing or corrupt
        indexes raise :class:`store.IndexNotFoundError` / :class:`store.CorruptIndexError`.
        """
        root = storage.normalize(path)
        if version is None:  # CURRENT's, opened again on the new CURRENT if it is pruned under the read
            return store.read_stable(root, lambda current: cls.open(
                root, encoder, tokenizer, current, mmap, pretrained, allow_random_init, verify))
        vdir = store.version_dir(root, version)
        meta = store.read_meta(vdir)
        indexes = [store.read_shard(vdir, meta, info, mmap=mmap, verify=verify) for info in meta["shards"]]
        rows = store.read_row_table(vdir, meta, verify)
        dead = store.read_dead_ids(vdir, meta, verify)
        refines = [open_refine(vdir, meta, info, verify) for info in meta["shards"]]
        store.check_counts(vdir, meta, sum(int(ix.ntotal) for ix in indexes), len(rows))
        for ix in indexes:
            if ix.d != int(meta["dim"]):
                raise store.CorruptIndexError(
                    f"index version {vdir!r}: faiss dim {ix.d} != index.json dim {meta['dim']}")
        hidden = store.shard_hidden_ids(vdir, meta, verify) if meta.get("superseded") else None
        return cls(root, vdir, meta, indexes, rows, encoder=encoder, tokenizer=tokenizer,
                   pretrained=pretrained, allow_random_init=allow_random_init, dead_ids=dead,
                   shard_hidden=hidden, refines=refines)

    @property
    def version(self) -> str:
        return storage.name(self.version_dir)

    def __len__(self) -> int:
        return int(self.meta["count"])

    def info(self) -> dict[str, Any]:
        return dict(self.meta, version=self.version)

    # -------------------------------------------------------------------------------------- encoder
    def set_encoder(self, encoder, tokenizer=None) -> None:
        """Use ``encoder`` (a model with ``encode_text``) for text queries; its model_id must match."""
        enc_id = getattr(encoder, "model_id", None)
        if self.model_id and enc_id != self.model_id:
            raise ValueError(
                f"encoder model_id {enc_id!r} does not match the index's model_id "
                f"{self.model_id!r}: text and video vectors would live in different spaces"
            )
        if not hasattr(encoder, "encode_text"):
            raise TypeError(f"encoder {type(encoder).__name__} has no encode_text method")
        self._encoder = encoder
        self._tokenizer = tokenizer

    def _ensure_encoder(self):
        if self._encoder is None:
            name = self.meta.get("model_name")
            if not name:
                raise ValueError(
                    f"index {str(self.root)!r} records no model_name; pass encoder=... to "
                    "VideoIndex.open to run text queries, or query with vectors"
                )
            # Lazy: models pulls in torch, an optional heavy dependency FAISS-only (vector query) users skip.
            import models

            # Same construction as the embedding job (trained weights; a seeded random init only when
            # allowed), so the model_id check below compares like with like.
            model, _transform, tokenizer = models.create_inference_model(
                name, pretrained=self.pretrained or self.meta.get("pretrained"),
                allow_random_init=self.allow_random_init, seed=0,
            )
            model.eval()
            self.set_encoder(model, tokenizer)
        return self._encoder

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        import torch  # optional heavy dependency: only text queries need it

        encoder = self._ensure_encoder()
        with torch.no_grad():
            out = encoder.encode_text(list(texts))
        return np.asarray(out.detach().cpu().float().numpy() if hasattr(out, "detach") else out, np.float32)

    # --------------------------------------------------------------------------------------- search
    def _query_vectors(self, query) -> tuple[np.ndarray, list[str | None], bool]:
        if isinstance(query, str):
            query = [query]
            single = True
        else:
            single = False
        if isinstance(query, (list, tuple)) and query and all(isinstance(q, str) for q in query):
            bad = [i for i, q in enumerate(query) if not q.strip()]
            if bad:
                raise ValueError(f"empty text query at position(s) {bad}")
            return self.encode_text(query), list(query), single
        if isinstance(query, (list, tuple)) and not query:
            raise ValueError("empty query list")
        try:
            vectors = np.asarray(query, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"query must be a str, a list of str or a [D]/[Q, D] array, got {type(query).__name__}"
            ) from exc
        if vectors.ndim == 1:
            vectors, single = vectors[None, :], True
        if vectors.ndim != 2:
            raise ValueError(f"query vectors must be [D] or [Q, D], got shape {vectors.shape}")
        if vectors.shape[0] == 0:
            raise ValueError("empty query: no vectors")
        if vectors.shape[1] != self.dim:
            raise ValueError(
                f"query vectors have dim {vectors.shape[1]}, index {str(self.root)!r} has dim {self.dim}"
            )
        if not np.isfinite(vectors).all():
            raise ValueError("query vectors contain NaN/inf")
        return vectors, [None] * len(vectors), single

    def search_vectors(
        self, vectors: np.ndarray, k: int, allowed: faiss.IDSelector | None = None, exhaustive: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raw clip-level search over all shards: ``(scores [Q, k], ids [Q, k])`` merged by score.

        ``allowed`` restricts the search to those ids inside FAISS (rows it rejects are never ranked; None:
        every row a delete did not tombstone);
        ``exhaustive`` scans every IVF list (``nprobe = nlist``) / lets HNSW visit the whole graph, so a
        filtered search finds every allowed row however few the probed lists hold."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).copy()
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        if (norms <= 1e-12).any():
            raise ValueError("query vector has zero norm")
        vectors /= norms
        if allowed is None:
            allowed = self._live_selector
        shards = zip(self.meta["shards"], self.indexes, self.refines)
        calls = [(ix, vectors, int(min(k, max(ix.ntotal, 1))), self._for_shard(i, allowed), exhaustive,
                  refine, rerank_depth(info)) for i, (info, ix, refine) in enumerate(shards)]
        if len(calls) == 1:
            return search_shard(*calls[0])
        results = search_shards_in_parallel(calls)
        return merge_shard_results([r[0] for r in results], [r[1] for r in results], int(k))

    def search(
        self, query, k: int = 10, aggregate: str = "max", overfetch: int = 4, rerank: Reranker | None = None,
        moments_per_video: int = 1, rel_threshold: float = DEFAULT_REL_THRESHOLD,
        max_gap_s: float = DEFAULT_MAX_GAP_S, allowed_ids: np.ndarray | None = None,
    ) -> list[Hit] | list[list[Hit]]:
        """Top-``k`` videos for ``query`` (str, list of str, ``[D]`` or ``[Q, D]`` vectors).

        Clip hits are collapsed per video (``aggregate`` = ``"max"`` or ``"mean"`` over the retrieved
        clips); clips are over-fetched (``overfetch`` × k, doubled until k videos or the whole index)
        so k distinct videos come back. ``rerank(query_text, hits) -> hits`` may rescore each list.
        A single query (str or ``[D]``) returns one list, otherwise one list per query.

        ``allowed_ids`` (FAISS ids, the ``id`` column) filters *before* ranking: FAISS scores only those rows
        (an ``IDSelector``), so k videos come back whenever k allowed videos exist; when the probed IVF
        lists hold too few allowed rows the search is redone over every list (``exhaustive``).

        Videos with window rows get moments (``moments_per_video`` > 0; 0 turns them off): every window of
        the hit video is scored against the query and merged by :func:`index.moments.merge_windows`
        (``rel_threshold``, ``max_gap_s``); the hit's ``start_s`` / ``end_s`` become its best moment.
        """
        if aggregate not in ("max", "mean"):
            raise ValueError(f"aggregate must be 'max' or 'mean', got {aggregate!r}")
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        vectors, texts, single = self._query_vectors(query)
        selector, total = self._selector(allowed_ids)
        if total == 0:
            return [] if single else [[] for _ in vectors]
        fetch = min(total, max(int(k) * max(1, int(overfetch)), int(k)))
        exhaustive = False
        while True:
            scores, ids = self.search_vectors(vectors, fetch, selector, exhaustive)
            limit = None if rerank is not None else int(k)  # a reranker may promote any fetched video
            per_query = [self._collapse(s, i, aggregate, limit) for s, i in zip(scores, ids)]
            if all(len(h) >= k for h in per_query):
                break
            filtered = selector is not None or self._shard_live is not None
            if filtered and not exhaustive and ((ids >= 0).sum(axis=1) < fetch).any():
                exhaustive = True  # the probed lists held fewer allowed rows than asked for: scan them all
                continue
            if fetch >= total:
                break
            fetch = min(total, fetch * 2)
        out = []
        for vector, text, hits in zip(vectors, texts, per_query):
            hits = hits[: int(k)] if rerank is None else _apply_rerank(rerank, text, hits)[: int(k)]
            if moments_per_video > 0:
                self._attach_moments(vector, hits, int(moments_per_video), rel_threshold, max_gap_s)
            out.append(hits)
        return out[0] if single else out

    def _selector(self, allowed_ids: np.ndarray | None) -> tuple[faiss.IDSelector | None, int]:
        """The FAISS id filter of a search (the allowed ids less the tombstoned ones, or "not tombstoned")
        and how many rows can pass it."""
        if allowed_ids is not None:
            allowed = np.unique(np.asarray(allowed_ids, dtype=np.int64))
            if len(self.dead_ids):
                allowed = allowed[~_sorted_contains(self.dead_ids, allowed)]
            return (faiss.IDSelectorBatch(allowed) if len(allowed) else None), len(allowed)
        return self._live_selector, len(self)

    def _for_shard(self, shard: int, selector: faiss.IDSelector | None) -> faiss.IDSelector | None:
        """``selector`` narrowed to the rows live in ``shard`` (not superseded by a later delta shard)."""
        live = self._shard_live[shard] if self._shard_live is not None else None
        if live is None:
            return selector
        if selector is None or selector is self._live_selector:
            return live
        both = faiss.IDSelectorAnd(selector, live)
        both.keep_alive = (selector, live)  # IDSelectorAnd does not own its operands
        return both

    def rank(self, vectors: np.ndarray, k: int, allowed_ids: np.ndarray | None = None,
             timeout_s: float | None = None) -> RankedResult:
        """:class:`index.searcher.Searcher`: :meth:`search` of ``[Q, D]`` vectors. One process searches every
        shard itself, so its result is never partial; ``timeout_s`` is the caller's to enforce (the service
        runs searches in a bounded pool with a deadline)."""
        return RankedResult(hits=self.search(np.atleast_2d(vectors), k=k, allowed_ids=allowed_ids))

    def _attach_moments(self, vector: np.ndarray, hits: list[Hit], limit: int, rel_threshold: float,
                        max_gap_s: float) -> None:
        """Score every window of the hits' videos (one filtered search per shard) and set their moments.

        The windows of every hit are looked up together (a few numpy / Arrow calls per page, not per hit):
        a page of thousands of hits is Python work that holds the GIL, next to every other request."""
        hit_rows = self.rows.rows_of(np.array([-1 if h.id is None else h.id for h in hits], dtype=np.int64))
        found = np.flatnonzero(hit_rows >= 0)
        owner, windows = self.rows.window_rows_of(hit_rows[found])
        ids = self.rows.integers("id", windows)
        live = ~_sorted_contains(self.dead_ids, ids)
        owner, windows, ids = found[owner[live]], windows[live], ids[live]
        if not len(ids):
            return
        scores = self._score_ids(vector, ids)
        starts, ends = self.rows.numbers("start_s", windows), self.rows.numbers("end_s", windows)
        bounds = np.flatnonzero(np.diff(owner)) + 1  # owner is grouped: one run of windows per hit
        for run in np.split(np.arange(len(owner)), bounds):
            hit = hits[int(owner[run[0]])]
            window_scores = [scores.get(int(i), np.nan) for i in ids[run]]
            moments = merge_windows(starts[run], ends[run], window_scores, rel_threshold, max_gap_s,
                                    limit=limit)
            if moments:
                hit.moments = moments
                hit.start_s, hit.end_s = moments[0].start_s, moments[0].end_s

    def _score_ids(self, vector: np.ndarray, ids: np.ndarray) -> dict[int, float]:
        """``{id: score}`` of the query against the rows ``ids`` (FAISS search restricted to them; an
        approximate index may leave some unscored: IVF scores only the probed lists)."""
        q = np.ascontiguousarray(vector[None, :], dtype=np.float32)
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        selector = faiss.IDSelectorBatch(ids)
        out: dict[int, float] = {}
        for i, (ix, refine) in enumerate(zip(self.indexes, self.refines)):
            if refine is not None:  # exact scores from the float16 copy, not the codes' approximations
                own = ids if self._shard_hidden is None else ids[~np.isin(ids, self._shard_hidden[i])]
                rows = refine.rows_of(own)
                found = rows >= 0
                scores = np.asarray(refine.vectors[np.sort(rows[found])], np.float32) @ q[0]
                out.update(zip(np.sort(own[found]).tolist(), scores.tolist()))
                continue
            ivf = faiss.try_extract_index_ivf(ix)
            sel = self._for_shard(i, selector)
            params = (faiss.SearchParametersIVF(sel=sel, nprobe=ivf.nprobe) if ivf is not None
                      else faiss.SearchParameters(sel=sel))
            d, found_ids = ix.search(q, int(min(len(ids), max(ix.ntotal, 1))), params=params)
            out.update((int(a), float(b)) for a, b in zip(found_ids[0], d[0]) if a >= 0)
        return out

    def _collapse(self, scores: np.ndarray, ids: np.ndarray, aggregate: str,
                  limit: int | None = None) -> list[Hit]:
        """Clip hits → one :class:`Hit` per video, best first (grouped by the video's first row); only the
        best ``limit`` videos (all when None) become Python objects, which hold the GIL to make."""
        valid = ids >= 0
        scores, ids = scores[valid].astype(np.float64), ids[valid]
        rows = self.rows.rows_of(ids)
        found = rows >= 0
        scores, rows = scores[found], rows[found]
        if not len(rows):
            return []
        order = np.argsort(-scores, kind="stable")  # best first, so a video's first occurrence is its best
        scores, rows = scores[order], rows[order]
        keys = self.rows.video_keys(rows)
        groups, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        counts = np.bincount(inverse, minlength=len(groups))
        value = scores[first] if aggregate == "max" else np.bincount(inverse, scores) / counts
        by_rank = np.argsort(first, kind="stable")  # ties keep the order FAISS ranked them in
        chosen = by_rank[np.argsort(-value[by_rank], kind="stable")][:limit]
        best = rows[first[chosen]]
        video_ids = self.rows.column("video_id", best)
        captions = self.rows.column("captions", best)
        starts, ends = self.rows.numbers("start_s", best), self.rows.numbers("end_s", best)
        clips, row_ids = self.rows.numbers("clip_index", best), self.rows.integers("id", best)
        return [
            Hit(video_id=str(video_ids[j]), score=float(value[g]), start_s=finite_float(starts[j]),
                end_s=finite_float(ends[j]),
                clip_index=None if finite_float(clips[j]) is None else int(clips[j]),
                caption=captions[j][0] if captions[j] else None, num_clips=int(counts[g]), id=int(row_ids[j]))
            for j, g in enumerate(chosen)
        ]


def shard_threads() -> int:
    """Threads that search one query's shards side by side: ``VIDSIFT_SHARD_THREADS``, else this machine's
    cores (1: one after another)."""
    value = os.environ.get("VIDSIFT_SHARD_THREADS", "")
    try:
        return max(1, int(value)) if value else max(1, os.cpu_count() or 1)
    except ValueError:
        raise ValueError(f"VIDSIFT_SHARD_THREADS={value!r}: not a whole number of threads") from None


_SHARD_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_SHARD_POOL_LOCK = threading.Lock()


def _forget_shard_pool() -> None:
    """In a forked child: the parent's pool threads do not exist there, and an executor that counts them as
    idle would queue searches no thread runs. The child makes its own pool on first use."""
    global _SHARD_POOL, _SHARD_POOL_LOCK
    _SHARD_POOL, _SHARD_POOL_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_shard_pool)


def _shard_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _SHARD_POOL
    with _SHARD_POOL_LOCK:
        if _SHARD_POOL is None:
            _SHARD_POOL = concurrent.futures.ThreadPoolExecutor(shard_threads(),
                                                                thread_name_prefix="vidsift-shard-search")
        return _SHARD_POOL


def search_shards_in_parallel(calls: list[tuple]) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`search_shard` of each call's arguments, the shards side by side on a process-wide pool of
    :func:`shard_threads` threads (FAISS and the float16 re-rank release the GIL, so one query's shards use
    every core: a single query's latency falls by up to min(shards, cores)); results in the calls' order,
    so the merge is the sequential one's. Only shard searches run on the pool, never a caller of this, so
    it cannot wait on itself."""
    if shard_threads() == 1:
        return [search_shard(*call) for call in calls]
    futures = [_shard_pool().submit(search_shard, *call) for call in calls]
    return [future.result() for future in futures]


def search_shard(ix: faiss.Index, vectors: np.ndarray, kk: int, allowed: faiss.IDSelector | None,
                 exhaustive: bool, refine: RefineVectors | None = None, depth: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One shard's top ``kk`` ``(scores, ids)`` for normalised ``vectors``: FAISS's top ``max(kk, depth)``
    re-ranked exactly against the shard's float16 copy when it has one (:func:`index.rerank.rerank`), else
    FAISS's top ``kk``. ``allowed`` / ``exhaustive`` as :func:`search_parameters`. The one search of a shard:
    :class:`VideoIndex` and the fan-out's shard replicas (``workflows/serve/fanout.py``) both call it."""
    fetch = max(kk, int(depth)) if refine is not None else kk
    if allowed is None and not exhaustive:
        scores, ids = ix.search(vectors, fetch)
    else:
        params, keep_alive = search_parameters(ix, allowed, exhaustive)
        scores, ids = ix.search(vectors, fetch, params=params)
        del keep_alive  # the SWIG params point at these; they lived until the search returned
    if refine is None:
        return scores, ids
    return rerank(vectors, ids, refine, kk)


def rerank_depth(info: dict[str, Any]) -> int:
    """The re-rank depth R the build tuned for a shard (0: no float16 copy)."""
    return int((info.get("rerank") or {}).get("depth", 0))


def open_refine(vdir: str, meta: dict[str, Any], info: dict[str, Any], verify: bool | None = None
                ) -> RefineVectors | None:
    """The shard's float16 re-rank copy, memory-mapped (None when its codes need none)."""
    spec = info.get("rerank")
    if not spec:
        return None
    try:
        return RefineVectors(store.local_file(vdir, meta, spec["vectors"], verify),
                             store.local_file(vdir, meta, spec["ids"], verify))
    except (OSError, ValueError) as exc:
        raise store.CorruptIndexError(f"index version {vdir!r}: re-rank copy of shard {info['file']!r} "
                                      f"could not be read: {exc}") from exc


def search_parameters(ix: faiss.Index, allowed: faiss.IDSelector | None, exhaustive: bool):
    """FAISS search parameters for one shard: the id filter plus its stored nprobe / efSearch, or every list
    (IVF) / the whole graph (HNSW) when ``exhaustive``. Returns ``(params, objects to keep alive)``."""
    ivf = faiss.try_extract_index_ivf(ix)
    if ivf is not None:
        params = faiss.SearchParametersIVF(sel=allowed, nprobe=ivf.nlist if exhaustive else ivf.nprobe)
        quantizer = faiss.downcast_index(ivf.quantizer)
        keep = [allowed]
        if isinstance(quantizer, faiss.IndexHNSW):  # the coarse HNSW must return nprobe lists
            qp = faiss.SearchParametersHNSW(efSearch=max(quantizer.hnsw.efSearch, params.nprobe))
            params.quantizer_params = qp
            keep.append(qp)
        return params, keep
    inner = faiss.downcast_index(ix.index) if isinstance(ix, (faiss.IndexIDMap, faiss.IndexIDMap2)) else ix
    if isinstance(inner, faiss.IndexHNSW):
        ef = max(inner.hnsw.efSearch, int(ix.ntotal)) if exhaustive else inner.hnsw.efSearch
        return faiss.SearchParametersHNSW(sel=allowed, efSearch=ef), [allowed]
    return faiss.SearchParameters(sel=allowed), [allowed]


def selector_excluding(ids: np.ndarray) -> faiss.IDSelector | None:
    """A selector of every id not in ``ids`` (None when ``ids`` is empty)."""
    if not len(ids):
        return None
    batch = faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))
    selector = faiss.IDSelectorNot(batch)
    selector.keep_alive = batch  # IDSelectorNot does not own the selector it negates
    return selector


def _sorted_contains(sorted_values: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Which ``values`` are in the sorted array ``sorted_values``."""
    if not len(sorted_values):
        return np.zeros(len(values), bool)
    pos = np.clip(np.searchsorted(sorted_values, values), 0, len(sorted_values) - 1)
    return sorted_values[pos] == values


def _apply_rerank(rerank: Reranker, text: str | None, hits: list[Hit]) -> list[Hit]:
    new = rerank(text, list(hits))
    if not isinstance(new, list) or not all(isinstance(h, Hit) for h in new):
        raise TypeError("rerank must return a list of Hit")
    return sorted(new, key=lambda h: -h.score)

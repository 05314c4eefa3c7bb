"""Fan-out search on Ray Serve: shard deployments hold an index version's shards; the ingress merges their
answers.

``python -m jobs.serve --ray-serve --fanout-shards-per-deployment N`` deploys ``ceil(shards / N)`` shard
deployments (:func:`deploy_shards`, ``--shard-replicas`` replicas each) before the service's own deployment,
whose snapshots then hold a :class:`FanoutSearcher` instead of a one-process ``VideoIndex``:

* the ingress encodes a query's text once and runs ``VideoIndex``'s own ranking over the version's
  memory-mapped rows (:class:`FanoutSearcher` is a ``VideoIndex`` whose FAISS searches go to the shard
  deployments): over-fetch and doubling, the exhaustive retry of a filtered search, collapse per video, the
  fields of the final hits, moments of windowed videos;
* a shard replica (:class:`ShardReplica`) searches its shards (FAISS files memory-mapped, opened from the
  published version's files) and answers compact arrays: each shard's top ``fetch`` scores and ids, and for
  moments the scores of the window ids it is asked for;
* the ingress merges the shards' answers by score in shard order, as ``VideoIndex`` merges its own shards, so
  its answer is the top k of one process searching every shard, fields and moments included;
* a shard deployment that fails or has not answered by the deadline is left out: the result is
  ``RankedResult(partial=True, missing_shards=...)``; when no shard answers :class:`FanoutError` is raised.

Replicas are version-agnostic: a request names the version and the shard positions it wants, and a replica
opens (and keeps the two most recent of) the versions it is asked for, so a live swap in the ingress moves
every shard to the new version with the request that first names it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import copy
import dataclasses
import math
import threading
import time
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np

from index import store
from index.query import VideoIndex, open_refine, rerank_depth, search_shard, selector_excluding
from index.rows import hidden_in_shard
from index.searcher import RankedResult
from index.sharded import merge_shard_results
from index.tuning import apply_search_params
from runtime import storage
from runtime.threads import set_faiss_threads
from workflows.serve.live import SnapshotLoader

APP_PREFIX = "vidsift-shards"
DEFAULT_TIMEOUT_S = 30.0  # a request without a deadline still never waits on a shard for longer
VERSIONS_KEPT = 2  # per replica: the serving version and the one a swap is moving to
_WAITERS = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="vidsift-fanout-wait")


class FanoutError(RuntimeError):
    """No shard deployment answered a search (all failed or timed out)."""


@dataclasses.dataclass(frozen=True)
class FanoutPlan:
    """Where the shard deployments run: one Serve application per deployment, named in order."""

    apps: tuple[str, ...]
    deployment: str = "shard"

    def handles(self) -> list:
        from ray import serve

        return [serve.get_deployment_handle(self.deployment, app_name=app) for app in self.apps]


# --------------------------------------------------------------------------------------- shard replica
class ShardSet:
    """Some shards of one published version, opened for search: FAISS files memory-mapped (on-disk lists
    too: ``store.read_shard``) and the ids its deletes tombstoned (never returned). No rows: replicas answer
    ids and scores, and the ingress attaches fields (memory-mapped ids.arrow) to the final hits only."""

    def __init__(self, root: str, version: str, positions: Sequence[int], mmap: bool | None = None):
        vdir = store.version_dir(root, version)
        meta = store.read_meta(vdir)
        self.positions = tuple(int(p) for p in positions)
        bad = [p for p in self.positions if not 0 <= p < len(meta["shards"])]
        if bad:
            raise ValueError(f"index version {version!r} has {len(meta['shards'])} shards, not {bad}")
        self.indexes, self.refines, self.depths = {}, {}, {}
        for p in self.positions:
            info = meta["shards"][p]
            ix = store.read_shard(vdir, meta, info, mmap=mmap)
            if ix.d != int(meta["dim"]):
                raise store.CorruptIndexError(
                    f"index version {version!r}: shard {p} has dim {ix.d}, index.json says {meta['dim']}")
            apply_search_params(ix, info.get("search_params", {}))
            self.indexes[p] = ix
            self.refines[p], self.depths[p] = open_refine(vdir, meta, info), rerank_depth(info)
        dead = store.read_dead_ids(vdir, meta)
        superseded = store.read_superseded(vdir, meta)
        # Per shard: the ids its search skips, the tombstoned ones and those a later (upsert delta) shard
        # supersedes (same ids, so the ingress's allowed ids cannot exclude them); built once, O(hidden).
        self._hidden = {p: hidden_in_shard(dead, superseded, p) for p in self.positions}
        self._live = {p: selector_excluding(hidden) for p, hidden in self._hidden.items()}

    def _selector(self, allowed_ids: np.ndarray | None, position: int):
        """The FAISS id filter of shard ``position``: the allowed ids less the hidden ones, or "not hidden"
        (None when nothing is hidden and no filter is asked for)."""
        if allowed_ids is None:
            return self._live[position]
        hidden = self._hidden[position]
        return faiss.IDSelectorBatch(np.setdiff1d(allowed_ids, hidden) if len(hidden) else allowed_ids)

    def search(self, vectors: np.ndarray, fetch: int, allowed_ids: np.ndarray | None,
               exhaustive: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each shard's top ``fetch`` ``(scores, ids)`` ``[Q, kk]``, in position order: what
        ``VideoIndex.search_vectors`` asks of each of its shards. ``allowed_ids`` are live ids (the ingress
        removed the tombstoned ones)."""
        out = []
        for p, ix in self.indexes.items():
            selector = self._selector(allowed_ids, p)
            kk = int(min(fetch, max(ix.ntotal, 1)))
            out.append(search_shard(ix, vectors, kk, selector, exhaustive, self.refines[p], self.depths[p]))
        return out

    def score_ids(self, vector: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, scores)`` of the query against the rows ``ids`` that these shards hold and the query's
        probed lists reach: ``VideoIndex._score_ids`` on these shards (the same search, the same ``k``)."""
        q = np.ascontiguousarray(vector[None, :], dtype=np.float32)
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        found, scores = [], []
        for p, ix in self.indexes.items():
            refine = self.refines[p]
            if refine is not None:  # exact scores from the float16 copy, as VideoIndex._score_ids
                own = ids[~np.isin(ids, self._hidden[p])]
                rows = refine.rows_of(own)
                hit = rows >= 0
                found.append(np.sort(own[hit]))
                scores.append(np.asarray(refine.vectors[np.sort(rows[hit])], np.float32) @ q[0])
                continue
            selector = self._selector(ids, p)
            ivf = faiss.try_extract_index_ivf(ix)
            params = (faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe) if ivf is not None
                      else faiss.SearchParameters(sel=selector))
            d, i = ix.search(q, int(min(len(ids), max(ix.ntotal, 1))), params=params)
            found.append(i[0][i[0] >= 0])
            scores.append(d[0][i[0] >= 0])
        return np.concatenate(found), np.concatenate(scores)


class ShardReplica:
    """The body of a shard deployment (one per replica): opens the versions and shards it is asked for.

    Answers are compact (numpy ids and scores, with the replica's id and its receive / reply
    ``time.perf_counter`` stamps: the ingress's hop timings, :attr:`FanoutSearcher.trace`)."""

    def __init__(self, root: str, mmap: bool | None = None, omp_threads: int | None = None):
        self.root, self.mmap = storage.normalize(root), mmap
        if omp_threads:
            set_faiss_threads(omp_threads)
        self._open: collections.OrderedDict[tuple, ShardSet] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.searches = 0
        self.replica = _replica_id()

    def _shards(self, version: str, positions: Sequence[int]) -> ShardSet:
        key = (version, tuple(positions))
        with self._lock:  # one open per version, however many requests ask for it at once
            if key not in self._open:
                self._open[key] = ShardSet(self.root, version, positions, self.mmap)
                while len(self._open) > VERSIONS_KEPT:
                    self._open.popitem(last=False)
            self._open.move_to_end(key)
            return self._open[key]

    def search(self, version: str, positions: Sequence[int], vectors: np.ndarray, fetch: int,
               allowed_ids: np.ndarray | None = None, exhaustive: bool = False) -> dict[str, Any]:
        received = time.perf_counter()
        answer = self._shards(version, positions).search(vectors, fetch, allowed_ids, exhaustive)
        self.searches += 1
        return {"answer": dict(zip(positions, answer)), "replica": self.replica,
                "t": (received, time.perf_counter())}

    def score_ids(self, version: str, positions: Sequence[int], vector: np.ndarray,
                  ids: np.ndarray) -> dict[str, Any]:
        received = time.perf_counter()
        answer = self._shards(version, positions).score_ids(vector, ids)
        return {"answer": answer, "replica": self.replica, "t": (received, time.perf_counter())}

    def health(self) -> dict[str, Any]:
        return {"replica": self.replica, "open": [[v, list(p)] for v, p in self._open],
                "searches": self.searches, "thread": threading.current_thread().name}


class ShardDeployment(ShardReplica):
    """:class:`ShardReplica` as a Serve deployment runs it: every method a coroutine that searches on the
    replica's own event loop. Serve runs a sync method on a thread pool of a second event loop's thread, two
    thread hops a request; a shard's search is a millisecond of FAISS, and on a node with fewer cores than
    replicas each hop waits for the kernel to run another thread (bench/scale_hops.py: the hops, measured).
    :func:`deploy_shards` also starts the replicas with ``REPLICA_ENV`` (user code on Serve's main loop)
    and no per-request access log line. Requests to one replica run one at a time, as they would on the
    one core a replica is given."""

    async def search(self, *args, **kwargs) -> dict[str, Any]:
        return ShardReplica.search(self, *args, **kwargs)

    async def score_ids(self, *args, **kwargs) -> dict[str, Any]:
        return ShardReplica.score_ids(self, *args, **kwargs)

    async def health(self) -> dict[str, Any]:
        return ShardReplica.health(self)


# Serve's own switch (ray.serve._private.constants): run the replica's methods on its main event loop, not
# on a second loop in another thread. Read when the replica's process imports Serve: set through its
# runtime environment, so it reaches only the shard replicas.
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


def _replica_id() -> str:
    from ray import serve

    try:
        return serve.get_replica_context().replica_id.unique_id
    except RuntimeError:  # called outside Serve (a ShardReplica used in-process)
        return "local"


def deploy_shards(root: str, num_deployments: int, replicas: int = 1, num_cpus: float = 1.0,
                  mmap: bool | None = None, prefix: str = APP_PREFIX, omp_threads: int | None = None,
                  reserve_cpus: float = 0.0, serve_defaults: bool = False) -> FanoutPlan:
    """Run ``num_deployments`` shard deployments (``replicas`` replicas of ``num_cpus`` each, fractions
    allowed) as Serve applications ``{prefix}-{i}`` (no HTTP route); returns the plan the ingress reaches
    them by. ``omp_threads`` caps each replica's FAISS (OpenMP) threads: 1 when requests, not one query's
    scan, are what run in parallel. Refuses, before deploying anything, a plan that asks for more CPUs than
    the cluster has, less ``reserve_cpus`` (what deployments started after these need: the service's
    ingress): Serve would wait for them forever. ``serve_defaults`` deploys the replicas as Serve runs any
    class (:class:`ShardReplica`: its sync methods on a thread pool, an access log line a request): the
    baseline bench/scale_hops.py measures :class:`ShardDeployment` against."""
    import ray
    from ray import serve

    if num_deployments < 1 or replicas < 1:
        raise ValueError(f"shard deployments and replicas must be >= 1, got {num_deployments}, {replicas}")
    if num_cpus < 0:
        raise ValueError(f"CPUs per shard replica must be >= 0, got {num_cpus}")
    wanted = num_deployments * replicas * float(num_cpus)
    free = ray.cluster_resources().get("CPU", 0.0) - float(reserve_cpus)
    if wanted > free:
        kept = f" ({reserve_cpus:g} kept for the service's ingress)" if reserve_cpus else ""
        raise ValueError(
            f"{num_deployments} shard deployments x {replicas} replicas x {num_cpus:g} CPUs = {wanted:g} "
            f"CPUs, the Ray cluster has {free:g}{kept}: pass --shard-cpus "
            f"{max(free, 0.0) / (num_deployments * replicas):.2g} or less (fractions share a core), fewer "
            "replicas, or more shards per deployment")
    body, actor_options, options = ShardReplica, {}, {}
    if not serve_defaults:
        body, actor_options = ShardDeployment, {"runtime_env": {"env_vars": REPLICA_ENV}}
        # a line per request in the replica's log costs more than the search
        options["logging_config"] = {"enable_access_log": False}
    deployment = serve.deployment(body, name="shard", num_replicas=int(replicas), max_ongoing_requests=8,
                                  ray_actor_options={"num_cpus": float(num_cpus), **actor_options}, **options)
    apps = tuple(f"{prefix}-{i}" for i in range(num_deployments))
    # All at once: the controller starts every replica in parallel (one by one took ~30 s each on 2 cores).
    serve.run_many([serve.RunTarget(deployment.bind(storage.normalize(root), mmap, omp_threads), name=app,
                                    route_prefix=None) for app in apps])
    return FanoutPlan(apps)


def remove_shards(plan: FanoutPlan, timeout_s: float = 120.0) -> None:
    """Delete the plan's shard deployments, all at once, and wait until Serve no longer lists them (a
    blocking ``serve.delete`` waits ~3 s per application, one after the other)."""
    from ray import serve

    for app in plan.apps:
        serve.delete(app, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while set(plan.apps) & set(serve.status().applications):
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serve still lists shard deployments {sorted(plan.apps)} after "
                               f"{timeout_s:g} s")
        time.sleep(0.2)


def deployments_for(root: str, shards_per_deployment: int) -> int:
    """How many shard deployments the CURRENT version of ``root`` needs at ``shards_per_deployment``."""
    if shards_per_deployment < 1:
        raise ValueError(f"shards per deployment must be >= 1, got {shards_per_deployment}")
    meta = store.read_meta(store.version_dir(storage.normalize(root)))
    return math.ceil(len(meta["shards"]) / shards_per_deployment)


# --------------------------------------------------------------------------------------------- ingress
@dataclasses.dataclass
class _Request:
    """One ranking's state (a searcher is shared by the service's pool threads): its deadline, the shard
    deployments that failed or were late (skipped by its later rounds) and its hop timings."""

    deadline: float
    missing: set[str] = dataclasses.field(default_factory=set)
    hops: list[dict[str, float]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class _ShardFilter:
    """What the ranking passes to :meth:`FanoutSearcher.search_vectors` where ``VideoIndex`` passes a FAISS
    selector: the allowed live ids (None: every live row), sent to the shard replicas."""

    ids: np.ndarray | None


class FanoutSearcher(VideoIndex):
    """:class:`index.searcher.Searcher` over shard deployments: one published version, its shards dealt
    round-robin over ``handles`` (shard ``i`` → deployment ``i % len(handles)``).

    The ranking is ``VideoIndex``'s own, run in the ingress over the version's memory-mapped rows (collapse
    per video, over-fetch and doubling, the exhaustive retry of a filtered search, moments of windowed
    videos); only its FAISS searches go to the shard deployments, all at once, merged in shard order as
    ``VideoIndex`` merges its shards. So the answer is the one-process answer, fields and moments included.
    """

    def __init__(self, root: str, version: str | None, handles: Sequence, encoder=None,
                 names: Sequence[str] | None = None, by_reference: bool = False):
        root = storage.normalize(root)
        vdir = store.version_dir(root, version)
        meta = store.read_meta(vdir)
        super().__init__(root, vdir, meta, [], store.read_row_table(vdir, meta), encoder=encoder,
                         dead_ids=store.read_dead_ids(vdir, meta))
        self.handles = list(handles)
        if not self.handles:
            raise ValueError("a fan-out searcher needs at least one shard deployment")
        self.names = list(names or [f"shard-deployment-{i}" for i in range(len(self.handles))])
        n = len(meta["shards"])
        self.positions = [list(range(d, n, len(self.handles))) for d in range(len(self.handles))]
        # Handles made once (``handle.method`` makes a new one per call); by value (``by_reference=False``):
        # the reply comes straight back over the replica's gRPC connection, not through the object store
        # (Serve's default, ~2x the round trip for these small replies: bench/scale_hops.py).
        self._methods = {m: [h.options(method_name=m, _by_reference=bool(by_reference)) for h in self.handles]
                         for m in ("search", "score_ids")}
        self.served_by: collections.Counter[str] = collections.Counter()  # replica id → searches answered
        self.last_failure: dict[str, str] = {}  # deployment → why it last failed or was late
        self.trace: collections.deque | None = None  # when a deque: every request's hops (bench/scale_hops)
        self._request: _Request | None = None  # set on a per-request copy (:meth:`_for_request`)

    def _ensure_encoder(self):
        if self._encoder is None:
            raise ValueError(f"the fan-out searcher of {self.root!r} has no text encoder: query with vectors")
        return self._encoder

    def _for_request(self, timeout_s: float | None) -> FanoutSearcher:
        """A shallow copy carrying one request's state; everything else is shared."""
        call = copy.copy(self)
        budget = DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s)
        call._request = _Request(time.monotonic() + budget)
        return call

    def rank(self, vectors: np.ndarray, k: int, allowed_ids: np.ndarray | None = None,
             timeout_s: float | None = None) -> RankedResult:
        """``VideoIndex.rank`` through the shard deployments; those that failed or missed the deadline
        (``timeout_s``, 30 s when None) are left out and reported (``partial``, ``missing_shards``).

        Called on a thread that runs an asyncio loop (an async request handler), the wait happens on a helper
        thread: Serve refuses blocking waits on a loop's thread. The loop is still held for the search, as a
        one-process search holds it; the service's bounded pool calls from worker threads instead."""
        if _loop_running():
            return _WAITERS.submit(self.rank, vectors, k, allowed_ids, timeout_s).result()
        call = self._for_request(timeout_s)
        hits = VideoIndex.rank(call, vectors, k, allowed_ids).hits
        if self.trace is not None:
            self.trace.append(call._request.hops)
        missing = call._request.missing
        return RankedResult(hits=hits, partial=bool(missing), missing_shards=tuple(sorted(missing)))

    def search(self, query, k: int = 10, **kwargs):
        """``VideoIndex.search`` through the shard deployments (what the service's snapshot loader probes a
        new version with); a partial answer is not flagged here: :meth:`rank` reports it."""
        if self._request is None:
            if _loop_running():
                return _WAITERS.submit(self.search, query, k, **kwargs).result()
            return self._for_request(None).search(query, k, **kwargs)
        return super().search(query, k, **kwargs)

    def _selector(self, allowed_ids: np.ndarray | None) -> tuple[_ShardFilter | None, int]:
        """``VideoIndex._selector`` as ids for the replicas: the allowed ids less the tombstoned ones, or
        "every live row" (None when there is neither a filter nor a delete), and how many rows pass."""
        if allowed_ids is not None:
            allowed = np.unique(np.asarray(allowed_ids, dtype=np.int64))
            if len(self.dead_ids):
                allowed = allowed[~np.isin(allowed, self.dead_ids)]
            return (_ShardFilter(allowed) if len(allowed) else None), len(allowed)
        return (_ShardFilter(None) if len(self.dead_ids) else None), len(self)

    def search_vectors(self, vectors: np.ndarray, k: int, allowed: _ShardFilter | None = None,
                       exhaustive: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``VideoIndex.search_vectors`` with every shard deployment searching its shards at once; the
        shards' answers are merged in shard order (ties keep it), as one process merges its shards."""
        if allowed is not None and not isinstance(allowed, _ShardFilter):
            raise TypeError("a fan-out search filters by ids (rank/search allowed_ids), not a FAISS selector")
        if self._request is None:
            return self._for_request(None).search_vectors(vectors, k, allowed, exhaustive)
        vectors = _normalised(vectors, self.dim)
        ids = None if allowed is None else allowed.ids
        answers = self._ask("search", range(len(self.handles)),
                            lambda d: (self.version, self.positions[d], vectors, int(k), ids, exhaustive))
        if not answers:
            raise FanoutError(f"no shard deployment of {self.root!r} answered: " + "; ".join(
                f"{n}: {self.last_failure.get(n)}" for n in sorted(self._request.missing)))
        per_shard = {p: result for answer in answers.values() for p, result in answer.items()}
        shards = sorted(per_shard)
        return merge_shard_results([per_shard[p][0] for p in shards], [per_shard[p][1] for p in shards],
                                   int(k))

    def _score_ids(self, vector: np.ndarray, ids: np.ndarray) -> dict[int, float]:
        """``VideoIndex._score_ids`` (a moment's window scores), asked of the deployments that hold those
        rows' shards; each searches its shards with the same ids and ``k`` as one process would."""
        rows = self.rows.rows_of(ids)
        shards = (set(np.asarray(self.rows.column("shard", rows[rows >= 0]), dtype=np.int64).tolist())
                  if len(self.meta["shards"]) > 1 else {0})
        targets = [d for d, positions in enumerate(self.positions) if shards & set(positions)]
        answers = self._ask("score_ids", targets, lambda d: (self.version, self.positions[d], vector, ids))
        out: dict[int, float] = {}
        for d in sorted(answers):
            found, scores = answers[d]
            out.update(zip(found.tolist(), scores.tolist()))
        return out

    def _ask(self, method: str, targets, args) -> dict[int, Any]:
        """Call ``method`` on the ``targets`` deployments at once (``args(d)``: deployment ``d``'s arguments)
        and wait for each until the request's deadline: ``{d: answer}`` of those that answered. Deployments
        that fail or are late (now or in an earlier round of the request) are added to its ``missing``."""
        request = self._request
        pending = {}
        for d in targets:
            if self.positions[d] and not {self.names[d], self.names[d] + " (moments)"} & request.missing:
                pending[d] = (self._methods[method][d].remote(*args(d)), time.perf_counter())
        answers = {}
        for d, (response, sent) in pending.items():
            try:
                reply = response.result(timeout_s=max(0.0, request.deadline - time.monotonic()))
            except Exception as exc:  # noqa: BLE001 — a dead, failing or late shard is reported, never raised
                response.cancel()
                # A deployment that ranked but missed the moments round is named as such: its hits are in the
                # ranking with their best clip's span, not their moments.
                request.missing.add(self.names[d] + ("" if method == "search" else " (moments)"))
                self.last_failure[self.names[d]] = f"{type(exc).__name__}: {exc}"[:500]
                continue
            answers[d] = reply["answer"]
            if method == "search":
                self.served_by[reply["replica"]] += 1
            request.hops.append({"method": method, "deployment": d, "sent": sent, "received": reply["t"][0],
                                 "replied": reply["t"][1], "back": time.perf_counter()})
        return answers

    def health(self, timeout_s: float = 2.0) -> list[dict[str, Any]]:
        """One entry per shard deployment: its shard positions of this version and whether a replica
        answered a ping within ``timeout_s`` (with its id, the versions it holds open, its search count)."""
        pings = {name: handle.health.remote() for name, handle in zip(self.names, self.handles)}
        deadline = time.monotonic() + float(timeout_s)
        out = []
        for (name, response), positions in zip(pings.items(), self.positions):
            entry: dict[str, Any] = {"deployment": name, "shards": positions}
            try:
                entry.update(ok=True, **response.result(timeout_s=max(0.0, deadline - time.monotonic())))
            except Exception as exc:  # noqa: BLE001 — health reports the failure, whatever it is
                response.cancel()
                entry.update(ok=False, error=f"{type(exc).__name__}: {exc}")
            out.append(entry)
        return out


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _normalised(vectors: np.ndarray, dim: int) -> np.ndarray:
    vectors = np.array(np.atleast_2d(vectors), dtype=np.float32, order="C")
    if vectors.ndim != 2 or vectors.shape[1] != dim or not len(vectors):
        raise ValueError(f"query vectors must be [Q, {dim}] with Q >= 1, got shape {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise ValueError("query vectors contain NaN/inf")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if (norms <= 1e-12).any():
        raise ValueError("query vector has zero norm")
    return vectors / norms


# ------------------------------------------------------------------------------------- service snapshots
class FanoutSnapshotLoader(SnapshotLoader):
    """The service's snapshot loader with a :class:`FanoutSearcher` (the plan's shard deployments) in place
    of a one-process ``VideoIndex``; checks, catalog and encoder reuse are the base loader's."""

    def __init__(self, plan: FanoutPlan, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.plan = plan

    def open_index(self, version: str | None, encoder) -> FanoutSearcher:
        return FanoutSearcher(self.root, version or store.read_current(self.root), self.plan.handles(),
                              encoder=encoder, names=self.plan.apps)

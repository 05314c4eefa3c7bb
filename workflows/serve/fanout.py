"""Fan-out search on Ray Serve: shard deployments hold an index version's shards; the ingress merges their
answers.

``python -m jobs.serve --ray-serve --fanout-shards-per-deployment N`` deploys ``ceil(shards / N)`` shard
deployments (:func:`deploy_shards`, ``--shard-replicas`` replicas each) before the service's own deployment,
whose snapshots then hold a :class:`FanoutSearcher` instead of a one-process ``VideoIndex``:

* the ingress encodes a query's text once and sends the normalised vectors to every shard deployment;
* a shard replica (:class:`ShardReplica`) searches its shards (FAISS files memory-mapped, opened from the
  published version's files, only its shards' rows of ids.parquet, kept as arrays) and returns its top
  ``fetch`` clips per shard with their rows' fields;
* the ingress merges the clips of all shards by score, in shard order, and collapses them per video exactly as
  :class:`index.query.VideoIndex` does (same over-fetch, same doubling, same exhaustive retry of a filtered
  search), so its answer is the top k of one process searching every shard;
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
import dataclasses
import math
import threading
import time
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np
import pyarrow.compute as pc

from index import store
from index.query import Hit, open_refine, rerank_depth, search_shard
from index.searcher import RankedResult
from index.tuning import apply_search_params
from runtime import storage
from workflows.serve.live import SnapshotLoader

APP_PREFIX = "vidsift-shards"
DEFAULT_TIMEOUT_S = 30.0  # a request without a deadline still never waits on a shard for longer
VERSIONS_KEPT = 2  # per replica: the serving version and the one a swap is moving to
_ROW_FIELDS = ("video_id", "start_s", "end_s", "clip_index")
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
    too: ``store.read_shard``), those shards' rows of the version's ids table as Arrow columns, and the ids
    its deletes tombstoned (never returned)."""

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
            apply_search_params(ix, info.get("search_params", {}))
            self.indexes[p] = ix
            self.refines[p], self.depths[p] = open_refine(vdir, meta, info), rerank_depth(info)
        table = store.read_row_table(vdir, meta).table  # every stored row, tombstoned ones too
        columns = ["id", "shard", *_ROW_FIELDS] + (["captions"] if "captions" in table.column_names else [])
        table = table.select(columns)
        if len(meta["shards"]) > 1:
            table = table.filter(pc.is_in(table["shard"], value_set=pa_int32(self.positions)))
        expected = sum(int(ix.ntotal) for ix in self.indexes.values())
        if table.num_rows != expected:
            raise store.CorruptIndexError(
                f"index version {version!r}: shards {list(self.positions)} hold {expected} vectors, "
                f"its ids table has {table.num_rows} rows for them")
        ids = table["id"].to_numpy()
        self._order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[self._order]
        self._rows = table.drop_columns(["shard", "id"])
        self._dead = store.read_dead_ids(vdir, meta)

    def _selector(self, allowed_ids: np.ndarray | None):
        """The FAISS id filter: the allowed ids less the tombstoned ones, or "not tombstoned" (None when the
        version has no deletes and no filter is asked for)."""
        if allowed_ids is not None:
            return faiss.IDSelectorBatch(np.setdiff1d(allowed_ids, self._dead) if len(self._dead)
                                         else allowed_ids)
        if not len(self._dead):
            return None
        dead = faiss.IDSelectorBatch(self._dead)
        live = faiss.IDSelectorNot(dead)
        live.keep_alive = dead  # IDSelectorNot does not own the selector it negates
        return live

    def search(self, vectors: np.ndarray, fetch: int, allowed_ids: np.ndarray | None,
               exhaustive: bool) -> dict[int, dict[str, Any]]:
        """Per shard position: its top ``fetch`` ``scores`` / ``ids`` ``[Q, kk]`` and the ``rows`` (fields of
        each distinct hit id: ``id``, video_id, start_s, end_s, clip_index, caption)."""
        selector = self._selector(allowed_ids)
        out = {}
        for p, ix in self.indexes.items():
            kk = int(min(fetch, max(ix.ntotal, 1)))
            scores, ids = search_shard(ix, vectors, kk, selector, exhaustive, self.refines[p], self.depths[p])
            out[p] = {"scores": scores, "ids": ids, "rows": self._fields(np.unique(ids[ids >= 0]))}
        return out

    def _fields(self, ids: np.ndarray) -> dict[str, Any]:
        pos = np.clip(np.searchsorted(self._sorted_ids, ids), 0, max(len(self._sorted_ids) - 1, 0))
        found = self._sorted_ids[pos] == ids if len(self._sorted_ids) else np.zeros(len(ids), bool)
        taken = self._rows.take(self._order[pos[found]])
        rows = {"id": ids[found]}
        for name in _ROW_FIELDS:
            rows[name] = taken[name].to_pylist()
        caps = taken["captions"].to_pylist() if "captions" in taken.column_names else [None] * len(taken)
        rows["caption"] = [c[0] if c else None for c in caps]
        return rows


def pa_int32(values: Sequence[int]):
    import pyarrow as pa

    return pa.array(list(values), pa.int32())


class ShardReplica:
    """The body of a shard deployment (one per replica): opens the versions and shards it is asked for."""

    def __init__(self, root: str, mmap: bool | None = None, omp_threads: int | None = None):
        self.root, self.mmap = storage.normalize(root), mmap
        if omp_threads:
            faiss.omp_set_num_threads(int(omp_threads))
        self._open: collections.OrderedDict[tuple, ShardSet] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.searches = 0

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
        shards = self._shards(version, positions)
        self.searches += 1
        return {"shards": shards.search(vectors, fetch, allowed_ids, exhaustive), "replica": _replica_id()}

    def health(self) -> dict[str, Any]:
        return {"replica": _replica_id(), "open": [[v, list(p)] for v, p in self._open],
                "searches": self.searches}


def _replica_id() -> str:
    from ray import serve

    try:
        return serve.get_replica_context().replica_id.unique_id
    except RuntimeError:  # called outside Serve (a ShardReplica used in-process)
        return "local"


def deploy_shards(root: str, num_deployments: int, replicas: int = 1, num_cpus: float = 1.0,
                  mmap: bool | None = None, prefix: str = APP_PREFIX, omp_threads: int | None = None
                  ) -> FanoutPlan:
    """Run ``num_deployments`` shard deployments (``replicas`` replicas of ``num_cpus`` each) as Serve
    applications ``{prefix}-{i}`` (no HTTP route); returns the plan the ingress reaches them by.
    ``omp_threads`` caps each replica's FAISS (OpenMP) threads: 1 when requests, not one query's scan, are
    what run in parallel."""
    from ray import serve

    if num_deployments < 1 or replicas < 1:
        raise ValueError(f"shard deployments and replicas must be >= 1, got {num_deployments}, {replicas}")
    deployment = serve.deployment(ShardReplica, name="shard", num_replicas=int(replicas),
                                  ray_actor_options={"num_cpus": float(num_cpus)},
                                  max_ongoing_requests=8)
    apps = tuple(f"{prefix}-{i}" for i in range(num_deployments))
    # All at once: the controller starts every replica in parallel (one by one took ~30 s each on 2 cores).
    serve.run_many([serve.RunTarget(deployment.bind(storage.normalize(root), mmap, omp_threads), name=app,
                                    route_prefix=None) for app in apps])
    return FanoutPlan(apps)


def deployments_for(root: str, shards_per_deployment: int) -> int:
    """How many shard deployments the CURRENT version of ``root`` needs at ``shards_per_deployment``."""
    if shards_per_deployment < 1:
        raise ValueError(f"shards per deployment must be >= 1, got {shards_per_deployment}")
    meta = store.read_meta(store.version_dir(storage.normalize(root)))
    return math.ceil(len(meta["shards"]) / shards_per_deployment)


# --------------------------------------------------------------------------------------------- ingress
class FanoutSearcher:
    """:class:`index.searcher.Searcher` over shard deployments: one published version, its shards dealt
    round-robin over ``handles`` (shard ``i`` → deployment ``i % len(handles)``)."""

    def __init__(self, root: str, version: str | None, handles: Sequence, encoder=None,
                 names: Sequence[str] | None = None, overfetch: int = 4):
        self.root = storage.normalize(root)
        self.version_dir = store.version_dir(self.root, version)
        self.meta = store.read_meta(self.version_dir)
        self.dim, self.model_id = int(self.meta["dim"]), self.meta.get("model_id")
        self.handles = list(handles)
        if not self.handles:
            raise ValueError("a fan-out searcher needs at least one shard deployment")
        self.names = list(names or [f"shard-deployment-{i}" for i in range(len(self.handles))])
        n = len(self.meta["shards"])
        self.positions = [list(range(d, n, len(self.handles))) for d in range(len(self.handles))]
        self._encoder, self.overfetch = encoder, int(overfetch)
        self.served_by: collections.Counter[str] = collections.Counter()  # replica id → searches answered
        self.last_failure: dict[str, str] = {}  # deployment → why it last failed or was late

    @property
    def version(self) -> str:
        return storage.name(self.version_dir)

    def __len__(self) -> int:
        return int(self.meta["count"])

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        import torch  # optional heavy dependency: only text queries need it

        if self._encoder is None:
            raise ValueError(f"the fan-out searcher of {self.root!r} has no text encoder: query with vectors")
        with torch.no_grad():
            out = self._encoder.encode_text(list(texts))
        return np.asarray(out.detach().cpu().float().numpy() if hasattr(out, "detach") else out, np.float32)

    def search(self, vectors: np.ndarray, k: int = 10, allowed_ids: np.ndarray | None = None):
        """``VideoIndex.search`` of vectors (one list for a ``[D]`` vector): what the service's snapshot
        loader probes a new version with."""
        single = np.asarray(vectors).ndim == 1
        hits = self.rank(np.atleast_2d(vectors), k, allowed_ids).hits
        return hits[0] if single else hits

    def rank(self, vectors: np.ndarray, k: int, allowed_ids: np.ndarray | None = None,
             timeout_s: float | None = None) -> RankedResult:
        """The merged top ``k`` videos per row of ``vectors``; shards missing at the deadline are reported.

        Called on a thread that runs an asyncio loop (an async request handler), the wait happens on a helper
        thread: Serve refuses blocking waits on a loop's thread. The loop is still held for the search, as a
        one-process search holds it; the service's bounded pool calls from worker threads instead."""
        if _loop_running():
            return _WAITERS.submit(self._rank, vectors, k, allowed_ids, timeout_s).result()
        return self._rank(vectors, k, allowed_ids, timeout_s)

    def _rank(self, vectors: np.ndarray, k: int, allowed_ids: np.ndarray | None,
              timeout_s: float | None) -> RankedResult:
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        vectors = _normalised(vectors, self.dim)
        deadline = time.monotonic() + (DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s))
        total = len(self)
        if allowed_ids is not None:
            allowed_ids = np.unique(np.asarray(allowed_ids, dtype=np.int64))
            if not len(allowed_ids):
                return RankedResult(hits=[[] for _ in vectors])
            total = len(allowed_ids)
        fetch = min(total, max(int(k) * max(1, self.overfetch), int(k)))
        exhaustive, missing = False, set()
        while True:
            merged = self._gather(vectors, fetch, allowed_ids, exhaustive, deadline, missing)
            per_query = [_collapse(s, i, merged["rows"]) for s, i in zip(merged["scores"], merged["ids"])]
            if all(len(h) >= k for h in per_query):
                break
            short = ((merged["ids"] >= 0).sum(axis=1) < fetch).any()
            if allowed_ids is not None and not exhaustive and short:
                exhaustive = True  # the probed lists held fewer allowed rows than asked for: scan them all
                continue
            if fetch >= total:
                break
            fetch = min(total, fetch * 2)
        hits = [h[: int(k)] for h in per_query]
        return RankedResult(hits=hits, partial=bool(missing), missing_shards=tuple(sorted(missing)))

    def _gather(self, vectors: np.ndarray, fetch: int, allowed_ids: np.ndarray | None, exhaustive: bool,
                deadline: float, missing: set[str]) -> dict[str, Any]:
        """Ask every shard deployment at once; merge the answers that came by ``deadline``, in shard order.
        Deployments that failed or were late (now or in an earlier round) are added to ``missing``."""
        pending = {}
        for name, handle, positions in zip(self.names, self.handles, self.positions):
            if positions and name not in missing:
                pending[name] = handle.search.remote(self.version, positions, vectors, fetch, allowed_ids,
                                                     exhaustive)
        answers: dict[int, dict[str, Any]] = {}
        for name, response in pending.items():
            try:
                reply = response.result(timeout_s=max(0.0, deadline - time.monotonic()))
            except Exception as exc:  # noqa: BLE001 — a dead, failing or late shard is reported, never raised
                response.cancel()
                missing.add(name)
                self.last_failure[name] = f"{type(exc).__name__}: {exc}"[:500]
                continue
            answers.update(reply["shards"])
            self.served_by[reply["replica"]] += 1
        if not answers:
            raise FanoutError(f"no shard deployment of {self.root!r} answered: "
                              + "; ".join(f"{n}: {self.last_failure.get(n)}" for n in sorted(missing)))
        return _merge([answers[p] for p in sorted(answers)], fetch)

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


def _merge(answers: list[dict[str, Any]], fetch: int) -> dict[str, Any]:
    """The global top ``fetch`` clips of the shards' answers (in shard order; ties keep it, as
    ``index.sharded.merge_shard_results`` does) and the fields of every row they name."""
    d = np.concatenate([a["scores"] for a in answers], axis=1)
    i = np.concatenate([a["ids"] for a in answers], axis=1)
    d = np.where(i < 0, -np.inf, d)
    order = np.argsort(-d, axis=1, kind="stable")[:, :fetch]
    rows: dict[int, tuple] = {}
    for a in answers:
        r = a["rows"]
        rows.update(zip(r["id"].tolist(), zip(*(r[f] for f in (*_ROW_FIELDS, "caption")))))
    return {"scores": np.take_along_axis(d, order, axis=1), "ids": np.take_along_axis(i, order, axis=1),
            "rows": rows}


def _collapse(scores: np.ndarray, ids: np.ndarray, rows: dict[int, tuple]) -> list[Hit]:
    """Clip hits → one :class:`Hit` per video, the best clip's score and fields (``VideoIndex._collapse``
    with ``aggregate="max"``, the service's)."""
    best: dict[str, list] = {}
    for score, id_ in zip(scores.tolist(), ids.tolist()):
        row = rows.get(id_) if id_ >= 0 else None
        if row is None:
            continue
        entry = best.get(row[0])
        if entry is None:
            best[row[0]] = [float(score), id_, row, 1]
        else:
            entry[3] += 1
    hits = [Hit(video_id=str(vid), score=s, start_s=_num(row[1]), end_s=_num(row[2]),
                clip_index=None if _num(row[3]) is None else int(row[3]), caption=row[4], num_clips=n, id=id_)
            for vid, (s, id_, row, n) in best.items()]
    hits.sort(key=lambda h: -h.score)
    return hits


def _num(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


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

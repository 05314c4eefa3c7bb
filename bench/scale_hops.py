"""Fan-out search, hop by hop (issue #26 item 5): what a query pays for going through Ray Serve shard
deployments instead of one process, where it goes, and what replicas of a shard deployment add.

One 4-shard vidsift index of ``--vectors`` clip vectors (bench/scale_corpus.py's clustered corpus, text-like
queries), searched in this process (``VideoIndex.rank``, the baseline) and through 2 and 4 shard deployments
(1 replica each, the cluster's CPUs shared by every replica of both plans, one OpenMP thread), the same
queries interleaved (one process, fan-out by value, fan-out by reference, a bare ping) so the machine's load
drifts over all of them alike. The largest plan runs twice: with the shard replicas' own settings
(``ShardDeployment``: each request on the replica's event loop, no access log) and as Serve runs any class
("Serve's thread pool": ``deploy_shards(serve_defaults=True)``), the baseline of those settings. Per mode: p50
/ p99 and the p50 added over one process, and the medians of each hop from the searcher's trace
(``FanoutSearcher.trace``: perf_counter stamps, one clock for every process of the machine): ``request``
(ingress submit → replica starts), ``replica`` (its FAISS searches), ``reply`` (replica returns → ingress has
the answer) and ``ingress`` (the rest: normalise, merge, collapse per video, fields from the memory-mapped
ids.arrow, moments). ``ping``: a bare Serve round trip to every deployment (``health``), the floor under any
fan-out. Replicas: q/s from ``--client-threads`` threads with one deployment of all shards at 1 and 2 replicas
(``cluster CPUs / replicas`` CPUs each), against one process.

    python -m bench.scale_hops                                    # 100k x 256: docs/data/scale_hops.json
    python -m bench.scale_hops --dry-run --json /tmp/hops.json    # 4,000 vectors, 40 queries (the test)
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss  # noqa: E402

from bench.record import BenchRecord, add_record_args, col  # noqa: E402
from bench.scale_corpus import write_corpus  # noqa: E402
from index import VideoIndex, build_index, store  # noqa: E402
from runtime.progress import Progress  # noqa: E402
from runtime.ray_connect import connect_ray  # noqa: E402
from workflows.serve.fanout import FanoutSearcher, deploy_shards, remove_shards  # noqa: E402

K = 10
HOPS = ("request", "replica", "reply", "ingress")


def build(work: Path, n: int, dim: int, queries: int, shards: int) -> tuple[str, np.ndarray]:
    """The corpus (bench/scale.py's: 1,000 held-out queries when it has the videos) and its ``shards``-shard
    vidsift index, both reused when already there; (index root, the first ``queries`` held-out queries)."""
    corpus = write_corpus(work / f"n{n}", n, dim, 4, max(queries, min(1000, n // 8)), seed=0)
    root = work / f"n{n}" / f"vidsift-{shards}"
    current = store.read_current(str(root), missing_ok=True)
    if current is None or len(store.read_meta(store.version_dir(str(root)))["shards"]) != shards:
        build_index(corpus["spec"]["emb"], str(root), shards=shards, progress=False)
    return str(root), np.load(corpus["spec"]["queries"])[:queries]


def _hops(trace: list[dict], total_s: float) -> dict[str, float]:
    """One request's hops, seconds: the slowest deployment's request / replica / reply, the ingress rest."""
    search = [h for h in trace if h["method"] == "search"]
    hops = {"request": max(h["received"] - h["sent"] for h in search),
            "replica": max(h["replied"] - h["received"] for h in search),
            "reply": max(h["back"] - h["replied"] for h in search)}
    hops["ingress"] = total_s - (max(h["back"] for h in trace) - min(h["sent"] for h in trace))
    return hops


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def hop_rows(root: str, queries: np.ndarray, deployments: list[int], cpus: float) -> list[dict]:
    """One process vs fan-out by value / by reference over each deployment count, interleaved per query."""
    one = VideoIndex.open(root)
    samples: dict[str, list[float]] = collections.defaultdict(list)
    hops: dict[str, list[dict]] = collections.defaultdict(list)
    searchers = {}
    largest = max(deployments)
    share = cpus / (sum(deployments) + largest)
    for n in deployments:  # every plan at once (interleaved), so they share the cluster's CPUs
        plan = deploy_shards(root, n, replicas=1, num_cpus=share, prefix=f"hops-{n}", omp_threads=1)
        for by_ref in (False, True):
            mode = f"{n} deployments, " + ("by reference (Serve's default)" if by_ref else "by value")
            searchers[mode] = _traced(FanoutSearcher(root, None, plan.handles(), names=plan.apps,
                                                     by_reference=by_ref))
        searchers[f"{n} deployments, bare ping"] = plan
    # The baseline of the replicas' own settings: the largest plan again, as Serve runs any class.
    plain = deploy_shards(root, largest, replicas=1, num_cpus=share, prefix=f"hops-{largest}-plain",
                          omp_threads=1, serve_defaults=True)
    searchers[f"{largest} deployments, by value, Serve's thread pool"] = _traced(
        FanoutSearcher(root, None, plain.handles(), names=plain.apps))
    searchers[f"{largest} deployments, bare ping, Serve's thread pool"] = plain
    for q in queries[:20]:  # warm: files opened, routers' replica lists and connections made
        for s in searchers.values():
            if isinstance(s, FanoutSearcher):
                s.rank(q[None], K)
    progress = Progress("hops", total=len(queries))
    for q in queries:
        samples["1 process"].append(timed(one.rank, q[None], K))
        for mode, s in searchers.items():
            if isinstance(s, FanoutSearcher):
                samples[mode].append(timed(s.rank, q[None], K, None, 30.0))
                hops[mode].append(_hops(s.trace.pop(), samples[mode][-1]))
            else:
                samples[mode].append(timed(_ping, s.handles()))
        progress.update(1)
    for plan in [s for s in searchers.values() if not isinstance(s, FanoutSearcher)]:
        remove_shards(plan)
    base = float(np.median(samples["1 process"]))
    return [_hop_row(mode, lat, base, hops.get(mode)) for mode, lat in samples.items()]


def _traced(searcher: FanoutSearcher) -> FanoutSearcher:
    searcher.trace = collections.deque()
    return searcher


def _ping(handles) -> None:
    for response in [h.health.remote() for h in handles]:
        response.result(timeout_s=30)


def _hop_row(mode: str, lat: list[float], base: float, hops: list[dict] | None) -> dict:
    ms = np.asarray(lat) * 1000
    row = {"mode": mode, "p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
           "added_p50_ms": None if mode == "1 process" else float(np.median(ms)) - base * 1000}
    for hop in HOPS:
        row[f"{hop}_ms"] = float(np.median([h[hop] for h in hops])) * 1000 if hops else None
    return row


def replica_rows(root: str, queries: np.ndarray, threads: int, cpus: float) -> list[dict]:
    """q/s from ``threads`` client threads: one process, then one deployment of every shard at 1 and 2
    replicas."""
    one = VideoIndex.open(root)
    rows = [{"mode": "1 process", "replicas": None, "cpus": None, "qps": _qps(one, queries, threads)}]
    for replicas in (1, 2):
        plan = deploy_shards(root, 1, replicas=replicas, num_cpus=cpus / replicas, prefix=f"rep-{replicas}",
                             omp_threads=1)
        searcher = FanoutSearcher(root, None, plan.handles(), names=plan.apps)
        _qps(searcher, queries[:50], threads)  # warm every replica
        rows.append({"mode": "1 deployment, all shards", "replicas": replicas, "cpus": cpus / replicas,
                     "qps": _qps(searcher, queries, threads), "served_by": len(searcher.served_by)})
        remove_shards(plan)
    for row in rows:
        row["x_one_process"] = row["qps"] / rows[0]["qps"]
    return rows


def _qps(searcher, queries: np.ndarray, threads: int) -> float:
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda q: searcher.rank(q[None], K, None, 30.0), queries))
    return len(queries) / (time.perf_counter() - t0)


def record(rec: BenchRecord, hops: list[dict], replicas: list[dict], args, cpus: float) -> None:
    hop_cols = [col(f"{h}_ms", f"{h} ms", "{:.2f}") for h in HOPS]
    rec.table("hops", title="Fan-out vs one process, and where the added time goes (medians)",
              columns=[col("mode", "mode"), col("p50_ms", "p50 ms", "{:.2f}"),
                       col("added_p50_ms", "p50 added ms", "{:+.2f}"), col("p99_ms", "p99 ms", "{:.2f}"),
                       *hop_cols],
              rows=hops, sample_size=f"{args.queries} text-like queries, k=10, sequential, interleaved",
              baseline="the same 4-shard index searched in this process (VideoIndex.rank), same run",
              filtering=f"{args.vectors:,} x {args.dim} vectors; replicas 1 each, {cpus:g} CPUs split "
                        "over the deployments, 1 OpenMP thread")
    rec.table("replicas", title="Replicas of one shard deployment: q/s",
              columns=[col("mode", "mode"), col("replicas", "replicas"), col("cpus", "CPUs each", "{:.2g}"),
                       col("qps", f"q/s ({args.client_threads} threads)", "{:.0f}"),
                       col("x_one_process", "x one process", "{:.2f}"),
                       col("served_by", "replicas that answered")],
              rows=replicas, sample_size=f"{args.queries} queries from {args.client_threads} client threads",
              baseline="one process, same queries and threads, same run", filtering="none")
    four = next((r for r in hops if r["mode"] == f"{max(args.deployments)} deployments, by value"), None)
    if four is not None:
        rec.add_headline(f"fan-out over {max(args.deployments)} shard deployments, p50 added",
                         "<= 3 ms", f"{four['added_p50_ms']:+.2f} ms",
                         "yes" if four["added_p50_ms"] <= 3.0 else "no")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vectors", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--deployments", default="2,4", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--client-threads", type=int, default=8)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/vidsift_bench_scale_hops"))
    p.add_argument("--dry-run", action="store_true", help="4,000 vectors, 40 queries: a smoke run")
    add_record_args(p, "scale_hops")
    args = p.parse_args(argv)
    if args.dry_run:
        args.vectors, args.queries = 4000, 40
    rec = BenchRecord.start("scale_hops", sys.argv[1:] if argv is None else argv)
    connect_ray()  # first: the sharded build runs on this Ray too, rather than starting and stopping its own
    root, queries = build(args.workdir, args.vectors, args.dim, args.queries, args.shards)
    faiss.omp_set_num_threads(1)  # one thread per search everywhere: queries, not one scan, run in parallel
    import ray
    from ray import serve

    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    serve.start(http_options={"host": "127.0.0.1", "port": 0})
    try:
        hops = hop_rows(root, queries, args.deployments, cpus)
        replicas = replica_rows(root, queries, args.client_threads, cpus)
    finally:
        serve.shutdown()
    for row in hops + replicas:
        print("[hops] " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in row.items()), flush=True)
    record(rec, hops, replicas, args, cpus)
    rec.write(args.json, note=args.note + (" (dry run)" if args.dry_run else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

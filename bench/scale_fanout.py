"""bench/scale.py's fan-out run: one vidsift index searched in this process, then behind 2 and 4 shard
deployments on Ray Serve (a private local Ray), the same queries each time."""

from __future__ import annotations

import sys
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.scale_systems import K, run_queries  # noqa: E402
from index import VideoIndex  # noqa: E402
from runtime.ray_connect import connect_ray  # noqa: E402
from workflows.serve.fanout import FanoutSearcher, deploy_shards, remove_shards  # noqa: E402


def fanout(spec: dict) -> dict:
    """Rows per mode: p50 / p99 / q/s, p50 added over one process, identical top 10 (video ids and order)."""
    from ray import serve

    queries, truth = np.load(spec["queries"]), np.load(spec["truth"])
    faiss.omp_set_num_threads(1)  # queries run in parallel (client threads), not one query's scan
    one = VideoIndex.open(spec["index"])
    base = run_queries(lambda q: _videos(one.rank(q[None], K)), queries, truth, int(spec["threads"]))
    rows = [_row("1 process", base, base)]
    connect_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": 0})
    try:
        for n in spec["deployments"]:
            plan = deploy_shards(spec["index"], n, replicas=1, num_cpus=0, prefix=f"scale-{n}", omp_threads=1)
            searcher = FanoutSearcher(spec["index"], None, plan.handles(), names=plan.apps)
            partial = []

            def search(q, searcher=searcher, partial=partial):
                result = searcher.rank(q[None], K, timeout_s=30)
                partial.append(result.partial)
                return _videos(result)

            measured = run_queries(search, queries, truth, int(spec["threads"]))
            rows.append(_row(f"{n} shard deployments", measured, base, partial=any(partial)))
            print(f"[fanout] {rows[-1]}", flush=True)
            remove_shards(plan)
    finally:
        serve.shutdown()
    return {"rows": rows, "shards": len(one.meta["shards"])}


def _videos(result) -> list[int]:
    return [int(h.video_id[4:]) for h in result.hits[0]]


def _row(mode: str, m: dict, base: dict, partial: bool = False) -> dict:
    return {
        "mode": mode,
        "p50_ms": m["p50_ms"],
        "p99_ms": m["p99_ms"],
        "qps": m["qps"],
        "recall": m["recall"],
        "added_p50_ms": m["p50_ms"] - base["p50_ms"],
        "partial": partial,
        "identical": "yes" if m["hits"] == base["hits"] and not partial else "no",
    }

"""Compressed codes + exact float16 re-rank (issue #26 item 3) against the old ``IVF{nlist},Flat`` choice, on
bench/scale_corpus.py's clustered clip vectors and off-distribution text-like queries, in one run.

Arms (same vectors, same shards, same tuning queries: the corpus's 1,000 "captions"):
- ``flat``: ``IVF{nlist},Flat``, what the chooser picks when Flat codes fit the memory budget (before);
- ``codes``: the chooser under a budget Flat codes do not fit (``--codes-memory``): fast-scan PQ
  ``IVF{nlist},PQ{m}x4fs`` + the float16 copy its top R candidates are re-ranked against, (nprobe, R) tuned
  together on the text queries.

Each build runs in a child process whose tree's peak RSS is sampled (``bench.scale.TreeSampler``); each index
is then opened in a fresh child with one OpenMP thread (``faiss.omp_set_num_threads(1)``, as a serving
process runs a query), which reports open time, its anonymous RSS after open + every query, single-query
p50 / p99, q/s from ``--threads`` client threads and video recall@10 on ``--queries`` held-out text-like
queries at the tuned setting (``bench.scale_systems.run_queries``), and a profile of one query's path: the
coarse quantizer, the shards' FAISS searches, the re-rank, and ``VideoIndex.search`` end to end (collapse per
video, over-fetch, Python objects). ``uptime`` is recorded with the figures: the machine may be shared.

    python -m bench.codes                    # 1M x 256; writes docs/data/codes.json
    python -m bench.codes --n 40000 --queries 100 --json /tmp/codes.json     # small, minutes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss  # noqa: E402

from bench.record import BenchRecord, add_record_args, col  # noqa: E402
from bench.scale import run_child as scale_child  # noqa: E402
from bench.scale_corpus import write_corpus  # noqa: E402
from bench.scale_systems import anon_rss, open_system, run_queries  # noqa: E402
from index import VideoIndex, build_index, store  # noqa: E402
from index.factory import choose_nlist  # noqa: E402
from index.query import rerank_depth  # noqa: E402
from index.rerank import rerank  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
K = 10


# ------------------------------------------------------------------------------------ child processes
def build_task(spec: dict) -> dict:
    out = Path(spec["work"]) / f"idx-{spec['arm']}"
    meta = build_index(spec["emb"], str(out), factory=spec.get("factory"), memory_budget=spec["memory"],
                       shards=int(spec["shards"]), progress=True)
    vdir = Path(store.version_dir(str(out)))
    files = {f.name: f.stat().st_size for f in vdir.iterdir() if f.is_file()}
    refine = sum(size for name, size in files.items() if ".refine" in name)
    faiss_bytes = sum(size for name, size in files.items() if name.endswith((".faiss", ".ivfdata")))
    return {"index": str(out), "factory": meta["factory"], "search_params": meta["search_params"],
            "rerank_depth": rerank_depth(meta["shards"][0]), "build_recall": meta["recall"],
            "faiss_bytes": faiss_bytes, "refine_bytes": refine, "version_bytes": sum(files.values())}


def serve_task(spec: dict) -> dict:
    """Open in this fresh process (one OpenMP thread), profile one query's path, then latency / q/s / recall
    at the tuned setting."""
    queries, truth = np.load(spec["queries"])[: spec["num_queries"]], np.load(spec["truth"])
    faiss.omp_set_num_threads(1)
    before = anon_rss()
    t0 = time.perf_counter()
    search, _settings, _tuned = open_system({**spec, "system": "vidsift"})
    open_s = time.perf_counter() - t0
    measured = run_queries(search, queries, truth[: len(queries)], int(spec["threads"]))
    measured.pop("hits")
    profile = profile_query(VideoIndex.open(spec["index"]), queries[: spec["profile_queries"]])
    return {"open_s": open_s, "anon_rss_before": before, "anon_rss_after": anon_rss(), **measured,
            "profile_ms": profile}


def profile_query(vi: VideoIndex, queries: np.ndarray) -> dict:
    """Median ms of each step of one query: the coarse quantizer (every shard), the shards' FAISS searches
    (quantizer included), the re-rank, ``search_vectors`` (FAISS + re-rank + merge) and ``search`` (all of
    it: over-fetch, collapse per video, Hit objects)."""
    fetch = K * 4  # VideoIndex.search's first over-fetch
    steps: dict[str, list[float]] = {k: [] for k in PROFILE_STEPS}
    for q in queries:
        q = q[None, :].astype(np.float32)
        t = time.perf_counter()
        for ix in vi.indexes:
            ivf = faiss.extract_index_ivf(ix)
            ivf.quantizer.search(q, ivf.nprobe)
        steps["quantizer"].append(time.perf_counter() - t)
        found, t = [], time.perf_counter()
        for info, ix in zip(vi.meta["shards"], vi.indexes):
            found.append(ix.search(q, max(fetch, rerank_depth(info)))[1])
        steps["faiss"].append(time.perf_counter() - t)
        t = time.perf_counter()
        for refine, ids in zip(vi.refines, found):
            if refine is not None:
                rerank(q, ids, refine, fetch)
        steps["rerank"].append(time.perf_counter() - t)
        t = time.perf_counter()
        vi.search_vectors(q, fetch)
        steps["search_vectors"].append(time.perf_counter() - t)
        t = time.perf_counter()
        vi.search(q, k=K)
        steps["search"].append(time.perf_counter() - t)
    return {name: round(float(np.median(v)) * 1000, 3) for name, v in steps.items()}


TASKS = {"build": build_task, "serve": serve_task}
PROFILE_STEPS = ("quantizer", "faiss", "rerank", "search_vectors", "search")


def run_child(task: str, spec: dict, log: Path) -> tuple[dict, dict, float]:
    """``task`` in a fresh process (``python -m bench.codes --task``); returns (result, RSS peaks, wall s)."""
    return scale_child(task, spec, log, entry=("bench.codes", "--task"), label=f"codes {spec.get('arm')}")


# ------------------------------------------------------------------------------------------ the run
def uptime() -> str:
    """The 1/5/15-minute load averages (the machine may be shared: figures carry the load they ran under)."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def measure(args) -> dict:
    work = Path(args.workdir) / f"n{args.n}"
    corpus = write_corpus(work, args.n, args.dim, args.clips, 1000, args.seed)
    nlist = choose_nlist(args.n // args.shards)
    arms = {"flat": {"factory": f"IVF{nlist},Flat", "memory": "64GB"},
            "codes": {"factory": None, "memory": args.codes_memory}}
    results = {}
    for arm, how in arms.items():
        if arm not in args.arms.split(","):
            continue
        spec = {**corpus["spec"], **how, "arm": arm, "shards": args.shards}
        load_build = uptime()
        built, peaks, wall = run_child("build", spec, work / f"build-{arm}.log")
        serve_spec = {**spec, **built, "threads": args.threads, "num_queries": args.queries,
                      "profile_queries": args.profile_queries}
        load_serve = uptime()
        served, _, _ = run_child("serve", serve_spec, work / f"serve-{arm}.log")
        raw = args.n * args.dim * 4
        results[arm] = {**built, **served, "build_s": wall, "build_peak_rss": peaks["driver_peak_rss"],
                        "bytes_per_vector": built["faiss_bytes"] / args.n,
                        "refine_bytes_per_vector": built["refine_bytes"] / args.n,
                        "anon_rss_growth": served["anon_rss_after"] - served["anon_rss_before"],
                        "anon_rss_over_raw": served["anon_rss_after"] / raw,
                        "loadavg_build": load_build, "loadavg_serve": load_serve, "loadavg_end": uptime()}
        print(f"[codes] {arm}: " + json.dumps({k: v for k, v in results[arm].items()
                                                if not isinstance(v, dict)}, default=str), flush=True)
    return {"corpus": corpus["stats"], "arms": results}


def record_results(record: BenchRecord, results: dict, args) -> None:
    arms = results["arms"]
    flat = arms.get("flat")
    rows = [{**a, "arm": name, "setting": f"{json.dumps(a['search_params'])}, R={a['rerank_depth']}",
             "p50_ratio": a["p50_ms"] / flat["p50_ms"] if flat else None,
             "qps_ratio": a["qps"] / flat["qps"] if flat else None,
             "anon_rss_mb": a["anon_rss_after"] / 2**20, "build_peak_gb": a["build_peak_rss"] / 1e9}
            for name, a in arms.items()]
    sample = (f"{args.n:,} x {args.dim} clip vectors ({args.clips} clips a video, bench/scale_corpus.py), "
              f"{args.shards} shards; {args.queries} held-out text-like queries, video recall@10 vs brute "
              f"force; one OpenMP thread per query, q/s from {args.threads} client threads")
    record.table("arms", columns=[
        col("arm", "arm"), col("factory", "factory"), col("setting", "tuned setting"),
        col("recall", "recall@10 (held-out text)", "{:.3f}"), col("p50_ms", "p50 ms", "{:.2f}"),
        col("p99_ms", "p99 ms", "{:.2f}"), col("p50_ratio", "p50 / flat's", "{:.2f}"),
        col("qps", "q/s", "{:.0f}"), col("qps_ratio", "q/s / flat's", "{:.2f}"),
        col("bytes_per_vector", "index bytes / vector", "{:.0f}"),
        col("refine_bytes_per_vector", "float16 copy bytes / vector", "{:.0f}"),
        col("anon_rss_mb", "serving anon RSS MB", "{:.0f}"), col("build_s", "build s", "{:.0f}"),
        col("build_peak_gb", "build peak RSS GB", "{:.2f}"), col("loadavg_serve", "load avg (serve)")],
        rows=rows, sample_size=sample, baseline="the flat arm (IVF,Flat: the chooser's pick when Flat fits)",
        filtering="none")
    record.table("profile", columns=[col("arm", "arm")] + [
        col(k, f"{k} ms (median)", "{:.3f}") for k in PROFILE_STEPS],
        rows=[{"arm": name, **a["profile_ms"]} for name, a in arms.items()], sample_size=sample,
        baseline="steps of one query of the same index", filtering="none")
    codes = arms.get("codes")
    record.extra.update(results=results)
    if codes is None or flat is None:
        return
    record.add_headline(
        "FAISS index, compressed codes", "recall@10 >= 0.95 at single-query p50 <= 10 ms (float16 re-rank)",
        f"{codes['recall']:.3f} at p50 {codes['p50_ms']:.2f} ms "
        f"({codes['p50_ms'] / flat['p50_ms']:.2f}x flat's), {codes['bytes_per_vector']:.0f} B/vector",
        "yes" if codes["recall"] >= 0.95 and codes["p50_ms"] <= 10 else "no")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", nargs=3, metavar=("TASK", "SPEC_JSON", "OUT_JSON"), help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--queries", type=int, default=1000, help="held-out text-like queries measured")
    p.add_argument("--profile-queries", type=int, default=100)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--codes-memory", default="100MB",
                   help="the codes arm's memory budget (Flat codes must not fit it)")
    p.add_argument("--arms", default="flat,codes", help="which arms to run (comma-separated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="/tmp/sc_codes")
    add_record_args(p, "codes")
    args = p.parse_args(argv)
    if args.task:
        task, spec, out = args.task
        Path(out).write_text(json.dumps(TASKS[task](json.loads(spec)), default=float))
        return 0
    record = BenchRecord.start("codes", sys.argv[1:] if argv is None else argv)
    results = measure(args)
    record_results(record, results, args)
    record.write(args.json, note=args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Index benchmark: N × D clustered vectors (Gaussian mixture with low-rank within-cluster structure),
held-out queries from the same mixture. Reports build time, memory, q/s and recall@k of vidsift's
auto-selected index against exact search (IndexFlatIP, same run) and against autofaiss at the same
memory budget, plus the cost of an incremental add of 1 % new vectors vs the full build.

    python bench/index.py                      # N = 1,000,000 × 512
    python bench/index.py --n 200000 --memory 1.5GB --workdir /tmp/bench_index
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import BenchRecord, add_record_args, col  # noqa: E402
from index import VideoIndex, add_embeddings, build_index  # noqa: E402
from index.factory import parse_memory  # noqa: E402
from index.tuning import ExactTopK, recall_at_k  # noqa: E402

MODEL_ID = "bench@000000000000"


class Mixture:
    """Gaussian mixture: ``clusters`` centres + low-rank (rank ``rank``) noise + small isotropic noise."""

    def __init__(self, dim: int, clusters: int, rank: int = 48, spread: float = 0.5, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.dim, self.spread = dim, spread
        self.centers = rng.normal(size=(clusters, dim)).astype(np.float32)
        self.basis = (rng.normal(size=(rank, dim)) / np.sqrt(rank)).astype(np.float32)

    def sample(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, len(self.centers), size=n)
        low_rank = rng.standard_normal((n, self.basis.shape[0]), dtype=np.float32) @ self.basis
        iso = rng.standard_normal((n, self.dim), dtype=np.float32)
        # spread = within-cluster std relative to the centres' per-coordinate std (1.0 = clusters overlap).
        x = self.centers[labels] + self.spread * low_rank + 0.2 * self.spread * iso
        faiss.normalize_L2(x)
        return x


def write_chunks(mix: Mixture, out: Path, n: int, chunk: int, start_id: int, seed: int) -> list[Path]:
    """Write ``n`` vectors as embeddings Parquet (docs/interfaces.md schema) in chunks of ``chunk`` rows."""
    sub = out / "model_id=bench_000000000000"
    sub.mkdir(parents=True, exist_ok=True)
    (sub / "_model.json").write_text(json.dumps({"model_id": MODEL_ID, "model_name": None, "pretrained": None,
                                                 "dim": mix.dim}))
    files = []
    for c, start in enumerate(range(0, n, chunk)):
        m = min(chunk, n - start)
        x = mix.sample(m, seed=seed * 100_003 + c)
        ids = np.arange(start_id + start, start_id + start + m, dtype=np.int64)
        vids = pa.array([f"v{i}" for i in ids])
        table = pa.table({
            "id": ids, "video_id": vids, "key": vids, "shard": pa.array(["000000"] * m),
            "clip_index": np.full(m, -1, np.int64), "start_s": np.zeros(m), "end_s": np.ones(m),
            "model_id": pa.array([MODEL_ID] * m),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), mix.dim),
        })
        path = sub / f"part-{start_id + start:09d}.parquet"
        pq.write_table(table, path)
        files.append(path)
    return files


def iter_parquet_vectors(files: list[Path]):
    for f in files:
        t = pq.read_table(f, columns=["id", "embedding"])
        emb = t.column("embedding").combine_chunks()
        x = np.asarray(emb.values.to_numpy(), np.float32).reshape(-1, emb.type.list_size)
        yield x, t.column("id").to_numpy()


def exact_search(files: list[Path], queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Exact top-k over all files; returns (ids, seconds spent searching, excluding file reads)."""
    heap = ExactTopK(queries, k)
    search_s = 0.0
    for x, ids in iter_parquet_vectors(files):
        flat = faiss.IndexFlatIP(x.shape[1])
        flat.add(x)
        t = time.perf_counter()
        d, i = flat.search(queries, k)
        search_s += time.perf_counter() - t
        heap.heap.add_result(d, ids[i])
    return heap.result()[1], search_s


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def time_search(search, queries: np.ndarray, k: int, repeats: int = 2) -> tuple[np.ndarray, float]:
    best = float("inf")
    found = None
    for _ in range(repeats):
        t = time.perf_counter()
        found = search(queries, k)
        best = min(best, time.perf_counter() - t)
    return found, len(queries) / best


def _faiss_opq_compat() -> None:
    """autofaiss 2.18 calls ``faiss.OPQMatrix(d, M=..., d2=...)``; faiss 1.15 names that argument ``M_in``
    (TypeError on every OPQ index autofaiss picks). Accept both spellings, nothing else changes."""
    import inspect

    params = inspect.signature(faiss.OPQMatrix.__init__).parameters
    if "M" in params or "M_in" not in params or getattr(faiss.OPQMatrix, "_vidsift_compat", False):
        return
    base = faiss.OPQMatrix

    class OPQMatrix(base):
        _vidsift_compat = True

        def __init__(self, d=0, M=1, d2=-1, **kwargs):
            super().__init__(d, kwargs.pop("M_in", M), d2)

    faiss.OPQMatrix = OPQMatrix


def run_autofaiss(emb_dir: Path, workdir: Path, memory: str, queries: np.ndarray, k: int, truth: np.ndarray,
                  nb_cores: int) -> dict:
    try:  # optional bench dependency (pip install .[bench])
        from autofaiss import build_index as autofaiss_build
    except ImportError as exc:
        return {"error": f"autofaiss cannot be imported: {exc}"}
    _faiss_opq_compat()
    sub = next(emb_dir.iterdir())
    t = time.perf_counter()
    try:
        index, infos = autofaiss_build(
            embeddings=str(sub), file_format="parquet", embedding_column_name="embedding",
            # save_on_disk=False: autofaiss 2.18 json.dumps numpy float32 metrics and crashes on numpy 2.
            save_on_disk=False, index_path=None, index_infos_path=None,
            max_index_memory_usage=memory.replace("GB", "G").replace("MB", "M"),
            current_memory_available="8G", metric_type="ip", min_nearest_neighbors_to_retrieve=k,
            nb_cores=nb_cores, verbose=30)
    except Exception as exc:  # report exactly why autofaiss could not run
        return {"error": f"{type(exc).__name__}: {exc}"}
    build_s = time.perf_counter() - t
    # autofaiss numbers vectors 0..N-1 in file order; our ids are the same order starting at 0.
    found, qps = time_search(lambda q, kk: index.search(q, kk)[1], queries, k)
    return {"factory": infos.get("index_key"), "params": infos.get("index_param"), "build_s": build_s,
            "qps": qps, "recall": recall_at_k(found, truth, k),
            "size_bytes": int(faiss.serialize_index(index).size)}


def measure(args, work: Path) -> dict:
    """Exact search, the vidsift build + queries, a 1 % incremental add and (optionally) autofaiss."""
    mix = Mixture(args.dim, args.clusters, spread=args.spread)
    t = time.perf_counter()
    files = write_chunks(mix, work / "emb", args.n, args.chunk, start_id=0, seed=1)
    print(f"wrote {args.n} x {args.dim} vectors in {time.perf_counter() - t:.1f}s", flush=True)
    queries = mix.sample(args.queries, seed=999_999)
    truth, exact_s = exact_search(files, queries, args.k)
    exact_qps = args.queries / exact_s
    print(f"exact search: {exact_qps:,.1f} q/s", flush=True)

    t = time.perf_counter()
    meta = build_index(work / "emb", work / "idx", memory_budget=args.memory, recall_target=args.recall,
                       k=args.k)
    build_s = time.perf_counter() - t
    vindex = VideoIndex.open(work / "idx")
    found, qps = time_search(lambda q, kk: vindex.search_vectors(q, kk)[1], queries, args.k)
    recall = recall_at_k(found, truth, args.k)
    index_bytes = os.path.getsize(work / "idx" / "versions" / meta["version"] / "index.faiss")
    rss_after_build = peak_rss_gb()
    print(f"vidsift {meta['factory']} {meta['search_params']}: recall@{args.k}={recall:.4f}, {qps:,.0f} q/s "
          f"({qps / exact_qps:.1f}x exact), build {build_s:.1f}s", flush=True)
    vindex = None  # release the mapped index before the add copies it

    n_add = max(1, int(args.n * args.add_fraction))
    write_chunks(mix, work / "add", n_add, args.chunk, start_id=10**12, seed=2)
    t = time.perf_counter()
    added = add_embeddings(work / "idx", work / "add")
    add_s = time.perf_counter() - t

    auto = {"error": "skipped (--skip-autofaiss)"} if args.skip_autofaiss else run_autofaiss(
        work / "emb", work, args.memory, queries, args.k, truth, nb_cores=os.cpu_count() or 1)
    if "qps" in auto:
        auto["speedup_vs_exact"] = auto["qps"] / exact_qps
    return {
        "n": args.n, "dim": args.dim, "clusters": args.clusters, "spread": args.spread,
        "queries": args.queries, "k": args.k, "memory_budget": args.memory,
        "memory_budget_bytes": parse_memory(args.memory), "exact_qps": exact_qps,
        "vidsift": {"factory": meta["factory"], "params": meta["search_params"], "build_s": build_s,
                    "train_s": meta["shards"][0]["train_s"], "add_s": meta["shards"][0]["add_s"],
                    "qps": qps, "speedup_vs_exact": qps / exact_qps, "recall": recall,
                    "tuned_recall_on_probes": meta["recall"], "index_bytes": index_bytes,
                    "peak_rss_gb_after_build": rss_after_build},
        "incremental": {"added": n_add, "add_s": add_s, "ratio_to_build": add_s / build_s,
                        "recall_after_add_probes": added["recall"]},
        "autofaiss": auto, "peak_rss_gb": peak_rss_gb(), "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


INDEX_COLUMNS = [col("index", "index"), col("params", "search params"),
                 col("recall", "recall@k vs exact", "{:.4f}"),
                 col("qps", "q/s", "{:,.0f}"), col("speedup", "x exact q/s", "{:.1f}x"),
                 col("build_s", "build s", "{:.1f}"), col("size_mb", "index MB", "{:,.0f}")]


def index_rows(results: dict) -> list[dict]:
    v, auto = results["vidsift"], results["autofaiss"]
    rows = [{"index": f"vidsift {v['factory']}", "params": json.dumps(v["params"]), "recall": v["recall"],
             "qps": v["qps"], "speedup": v["speedup_vs_exact"], "build_s": v["build_s"],
             "size_mb": v["index_bytes"] / 1e6},
            {"index": "exact IndexFlatIP", "params": "–", "recall": 1.0, "qps": results["exact_qps"],
             "speedup": 1.0, "build_s": None, "size_mb": None}]
    if "qps" in auto:
        rows.append({"index": f"autofaiss {auto['factory']}", "params": str(auto["params"]),
                     "recall": auto["recall"], "qps": auto["qps"], "speedup": auto["speedup_vs_exact"],
                     "build_s": auto["build_s"], "size_mb": auto["size_bytes"] / 1e6})
    return rows


def record_results(record: BenchRecord, results: dict, args) -> None:
    v, inc = results["vidsift"], results["incremental"]
    sample = (f"{args.n:,} x {args.dim} Gaussian-mixture vectors ({args.clusters} centres, "
              f"spread {args.spread}), "
              f"{args.queries:,} held-out queries, k={args.k}, memory budget {args.memory}, recall target "
              f"{args.recall}; q/s = best of 2 passes over all queries")
    record.table("index", columns=INDEX_COLUMNS, rows=index_rows(results), sample_size=sample,
                 baseline="exact IndexFlatIP over the same vectors (search time only), same run"
                          + ("" if args.skip_autofaiss else "; autofaiss at the same memory budget"),
                 filtering="none" + (" (autofaiss skipped: --skip-autofaiss)" if args.skip_autofaiss else ""))
    record.table("incremental", columns=[col("added", "vectors added"), col("add_s", "add s", "{:.2f}"),
                                         col("build_s", "full build s", "{:.1f}"),
                                         col("ratio", "add / build", "{:.1%}"),
                                         col("recall", "tuned recall after the add", "{:.4f}")],
                 rows=[{"added": inc["added"], "add_s": inc["add_s"], "build_s": v["build_s"],
                        "ratio": inc["ratio_to_build"], "recall": inc["recall_after_add_probes"]}],
                 sample_size=f"{args.add_fraction:.0%} new vectors added to the {args.n:,}-vector index once",
                 baseline="the full build of the same run", filtering="none")
    record.extra["results"] = results
    met = v["recall"] >= 0.95 and v["speedup_vs_exact"] >= 20
    record.add_headline("FAISS index",
                        f"recall@{args.k} >= 0.95 at >= 20x exact q/s ({args.n:,} x {args.dim})",
                        f"{v['recall']:.4f} at {v['speedup_vs_exact']:.0f}x ({v['factory']})",
                        "yes" if met else "no")
    record.add_headline("FAISS index", "incremental add of 1 % <= 5 % of a full rebuild",
                        f"{inc['ratio_to_build']:.1%} ({inc['add_s']:.2f} s vs {v['build_s']:.1f} s)",
                        "yes" if inc["ratio_to_build"] <= 0.05 else "no")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=0.5, help="within-cluster spread (1.2 = overlapping)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--memory", default="1.5GB", help="memory budget for both vidsift and autofaiss")
    p.add_argument("--recall", type=float, default=0.95)
    p.add_argument("--add-fraction", type=float, default=0.01)
    p.add_argument("--chunk", type=int, default=50_000)
    p.add_argument("--workdir", default="/tmp/vidsift_bench_index")
    p.add_argument("--skip-autofaiss", action="store_true")
    add_record_args(p, "index")
    args = p.parse_args(argv)
    record = BenchRecord.start("index", sys.argv[1:] if argv is None else argv)

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results = measure(args, work)
    print(json.dumps(results, indent=2, default=float))
    v, auto = results["vidsift"], results["autofaiss"]
    print(f"\nvidsift  {v['factory']} {v['params']}: recall@{args.k}={v['recall']:.4f}, "
          f"{v['qps']:,.0f} q/s = {v['speedup_vs_exact']:.1f}x exact, build {v['build_s']:.1f}s")
    inc = results["incremental"]
    print(f"incremental add of {inc['added']}: {inc['add_s']:.1f}s = {100 * inc['ratio_to_build']:.1f}% "
          "of the full build")
    if "qps" in auto:
        print(f"autofaiss {auto['factory']} {auto['params']}: recall@{args.k}={auto['recall']:.4f}, "
              f"{auto['qps']:,.0f} q/s = {auto['speedup_vs_exact']:.1f}x exact, build {auto['build_s']:.1f}s")
    else:
        print(f"autofaiss: {auto['error']}")
    record_results(record, results, args)
    record.write(args.json, note=args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())

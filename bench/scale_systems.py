"""bench/scale.py's measured processes (run by ``python -m bench.scale_tasks TASK SPEC_JSON OUT_JSON``).

Tasks: ``build_vidsift`` / ``build_hnsw`` / ``build_lancedb`` (one index on the corpus's vectors; the parent
samples this process tree's RSS), ``serve`` (open one index in this fresh process, then latency, q/s, recall
along a sweep of its search setting) and ``fanout`` (the vidsift index behind shard deployments on Ray Serve
against the same index in this process).
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss  # noqa: E402

from index import VideoIndex, build_index, store  # noqa: E402
from index.query import rerank_depth  # noqa: E402

K, OVERFETCH = 10, 4
# Each peer's sweep goes far enough to reach vidsift's recall if it can (at 1M, efSearch 256 reached 0.938 and
# LanceDB's nprobes 100 + refine 10 0.960, against vidsift's 0.977): it is compared at its fastest setting
# that does.
HNSW_EF = (16, 32, 64, 128, 256, 512, 1024)
LANCE_SETTINGS = ((10, None), (20, None), (50, None), (20, 10), (50, 10), (100, 10), (100, 20), (200, 20))


# ------------------------------------------------------------------------------------------------- builds
def vidsift_build(emb: str, out: str, shards: int, memory_budget: int | str) -> dict:
    """vidsift's own build path: the auto-chooser under ``memory_budget`` (compressed codes + the float16
    re-rank copy when Flat codes do not fit it)."""
    return build_index(emb, out, shards=shards, memory_budget=memory_budget, progress=True)


def build_vidsift(spec: dict) -> dict:
    out = Path(spec["work"]) / "vidsift"
    meta = vidsift_build(spec["emb"], str(out), int(spec["shards"]), spec.get("memory_budget", "4GB"))
    vdir = Path(store.version_dir(str(out)))
    return {"index": str(out), "index_bytes": _dir_bytes(vdir), "factory": meta["factory"],
            "search_params": meta["search_params"], "build_recall": meta["recall"],
            "memory_budget": meta.get("memory_budget_bytes")}


def build_hnsw(spec: dict) -> dict:
    raw = np.load(spec["vectors"], mmap_mode="r")
    index = faiss.IndexHNSWFlat(raw.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    for start in range(0, len(raw), 100_000):
        index.add(np.ascontiguousarray(raw[start:start + 100_000]))
        print(f"[hnsw] added {min(len(raw), start + 100_000):,}/{len(raw):,}", flush=True)
    path = Path(spec["work"]) / "hnsw.faiss"
    faiss.write_index(index, str(path))
    return {"index": str(path), "index_bytes": path.stat().st_size, "factory": "HNSW32,Flat"}


def build_lancedb(spec: dict) -> dict:
    import lancedb

    raw = np.load(spec["vectors"], mmap_mode="r")
    dim = raw.shape[1]
    schema = pa.schema([("id", pa.int64()), ("vector", pa.list_(pa.float32(), dim))])

    def batches():
        for start in range(0, len(raw), 100_000):
            block = np.ascontiguousarray(raw[start:start + 100_000])
            yield pa.record_batch([pa.array(np.arange(start, start + len(block)), pa.int64()),
                                   pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), dim)],
                                  schema=schema)

    path = Path(spec["work"]) / "lancedb"
    db = lancedb.connect(str(path))
    table = db.create_table("clips", data=batches(), schema=schema, mode="overwrite")
    partitions = max(4, int(math.sqrt(len(raw))))
    table.create_index(metric="dot", vector_column_name="vector", num_partitions=partitions,
                       num_sub_vectors=32, index_type="IVF_PQ")
    return {"index": str(path), "index_bytes": _dir_bytes(path),
            "factory": f"IVF_PQ {partitions} lists, PQ32"}


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ------------------------------------------------------------------------------------------------ serving
def anon_rss() -> int:
    """This process's anonymous resident memory (heap, not the page cache of memory-mapped files)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def open_system(spec: dict) -> tuple[Callable, list[tuple[str, Callable]], str]:
    """``(search(q [D]) -> video numbers, [(setting label, apply)], tuned label)`` of one built system."""
    system, clips = spec["system"], int(spec["clips"])
    if system == "vidsift":
        index = VideoIndex.open(spec["index"])
        ivfs = [faiss.try_extract_index_ivf(ix) for ix in index.indexes]

        def search(q):
            return [int(h.video_id[4:]) for h in index.rank(q[None], K).hits[0]]

        if ivfs[0] is None:
            return search, [(index.meta["factory"], lambda: None)], index.meta["factory"]
        tuned, nlist = ivfs[0].nprobe, ivfs[0].nlist
        depth = max(rerank_depth(info) for info in index.meta["shards"])
        rerank = f", re-rank {depth}" if depth else ""  # the depth stays the build's along the sweep
        probes = sorted({max(1, tuned // 4), max(1, tuned // 2), tuned, min(nlist, tuned * 2)})
        settings = [(f"nprobe {p}{rerank}", _setter(ivfs, "nprobe", p)) for p in probes]
        return search, settings, f"nprobe {tuned}{rerank}"
    if system == "hnsw":
        index = faiss.read_index(spec["index"])

        def search(q):
            return _collapse(index.search(q[None], K * OVERFETCH)[1][0], clips)

        settings = [(f"efSearch {ef}", _setter([index.hnsw], "efSearch", ef)) for ef in HNSW_EF]
        return search, settings, ""
    import lancedb

    table = lancedb.connect(spec["index"]).open_table("clips")
    current = {"nprobes": 20, "refine": None}

    def search(q):
        query = table.search(q, vector_column_name="vector").distance_type("dot").nprobes(current["nprobes"])
        if current["refine"]:
            query = query.refine_factor(current["refine"])
        return _collapse(query.limit(K * OVERFETCH).select(["id"]).to_arrow()["id"].to_numpy(), clips)

    settings = [(f"nprobes {p}" + (f", refine {r}" if r else ""), _lance_setter(current, p, r))
                for p, r in LANCE_SETTINGS]
    return search, settings, ""


def _setter(objs, attr: str, value: int) -> Callable:
    def apply():
        for obj in objs:
            setattr(obj, attr, value)
    return apply


def _lance_setter(current: dict, nprobes: int, refine: int | None) -> Callable:
    def apply():
        current.update(nprobes=nprobes, refine=refine)
    return apply


def _collapse(ids: np.ndarray, clips: int) -> list[int]:
    """Clip ids (best first) → the first ``K`` distinct videos (a video's best clip ranks it)."""
    out: list[int] = []
    for i in ids:
        v = int(i) // clips
        if i >= 0 and v not in out:
            out.append(v)
            if len(out) == K:
                break
    return out


def run_queries(search: Callable, queries: np.ndarray, truth: np.ndarray, threads: int) -> dict:
    """Single-query latency (sequential), recall@10 of the videos, and q/s from ``threads`` client threads."""
    search(queries[0])  # warm caches / lazily opened files
    lat, hits = [], []
    for q in queries:
        t0 = time.perf_counter()
        hits.append(search(q))
        lat.append(time.perf_counter() - t0)
    recall = float(np.mean([len(set(h) & set(t.tolist())) / K for h, t in zip(hits, truth)]))
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(search, queries))
    qps = len(queries) / (time.perf_counter() - t0)
    ms = np.asarray(lat) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "qps": qps,
            "recall": recall, "hits": hits}


def serve(spec: dict) -> dict:
    queries, truth = np.load(spec["queries"]), np.load(spec["truth"])
    faiss.omp_set_num_threads(1)  # queries run in parallel (client threads), not one query's scan
    before = anon_rss()
    t0 = time.perf_counter()
    search, settings, tuned_label = open_system(spec)
    open_s = time.perf_counter() - t0
    sweep = []
    for label, apply in settings:
        apply()
        m = run_queries(search, queries, truth, int(spec["threads"]))
        m.pop("hits")
        sweep.append({"setting": label, **m})
        print(f"[serve] {spec['system']} {label}: " + json.dumps(sweep[-1]), flush=True)
    tuned = _pick(sweep, tuned_label, spec.get("target_recall"))
    return {"open_s": open_s, "anon_rss_before": before, "anon_rss_after": anon_rss(), "sweep": sweep,
            "tuned": tuned}


def _pick(sweep: list[dict], label: str, target: float | None) -> dict:
    """The system's own setting when it has one (vidsift's tuned nprobe); else the fastest setting that
    reaches ``target`` recall (vidsift's), else the most accurate."""
    for s in sweep:
        if s["setting"] == label:
            return s
    reaching = [s for s in sweep if target is not None and s["recall"] >= target]
    return min(reaching, key=lambda s: s["p50_ms"]) if reaching else max(sweep, key=lambda s: s["recall"])


"""Distributed index build vs the in-process build on the same embeddings: wall time and peak RSS of every
process (the in-process build's one process; the distributed build's driver and each Ray scan / add task).

    python -m bench.build_distributed --rows 1000000 --dim 256 --slice-rows 131072

Each build runs in its own Python process (its peak RSS is its own); the distributed build's tasks report
theirs in index.json (``shards[0].distributed``). Ratios are to the corpus's raw float32 bytes (the floor:
every build process ≤ 0.5 × raw) and to the in-process build (the baseline, measured in the same run).
:func:`measure_builds` is what bench/scale.py can call.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import BenchRecord, add_record_args, col  # noqa: E402
from index.testing import clustered_vectors, embedding_schema  # noqa: E402

# The peak is VmHWM (this process's own mm), not getrusage's ru_maxrss: Linux folds the parent's high-water
# mark into a forked child's ru_maxrss, so it would report the bench process's corpus generation instead.
CHILD = """
import json, sys, time
from index import build_index
t0 = time.perf_counter()
meta = build_index(sys.argv[1], sys.argv[2], distributed=sys.argv[3] == "1", slice_rows=int(sys.argv[4]),
                   text_queries=None)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print("RESULT " + json.dumps({"wall_s": time.perf_counter() - t0, "meta": meta,
                              "peak_rss_bytes": int(status["VmHWM"].split()[0]) * 1024}))
"""


def write_corpus(
    out: Path, n: int, dim: int, clusters: int, rows_per_file: int, row_group: int, seed: int = 0
) -> int:
    """``n`` clustered vectors as embeddings Parquet (row groups of ``row_group`` rows: a slice is whole row
    groups); returns their raw float32 bytes."""
    vectors = clustered_vectors(n, dim, seed=seed, clusters=clusters)
    sub = out / "model_id=bench_000000"
    sub.mkdir(parents=True, exist_ok=True)
    for f, start in enumerate(range(0, n, rows_per_file)):
        stop = min(n, start + rows_per_file)
        rows = np.arange(start, stop)
        videos = pa.array([f"vid-{i // 4:08d}" for i in rows])
        table = pa.table({
            "id": pa.array(rows, pa.int64()), "video_id": videos, "key": videos,
            "shard": pa.array(["000000"] * len(rows)), "clip_index": pa.array(rows % 4, pa.int64()),
            "start_s": pa.array(rows % 4, pa.float64()), "end_s": pa.array(rows % 4 + 1, pa.float64()),
            "model_id": pa.array(["bench@000000"] * len(rows)),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors[start:stop].reshape(-1)), dim),
            "captions": pa.array([None] * len(rows), pa.list_(pa.string())),
        }, schema=embedding_schema(dim))
        pq.write_table(table, sub / f"part-{f:05d}.parquet", row_group_size=row_group)
    (sub / "_model.json").write_text(json.dumps({"model_id": "bench@000000", "dim": dim}))
    return int(vectors.nbytes)


def run_build(emb: Path, out: Path, distributed: bool, slice_rows: int) -> dict:
    """One build in a fresh Python process (progress on this process's stderr); its result line."""
    cmd = [sys.executable, "-c", CHILD, str(emb), str(out), "1" if distributed else "0", str(slice_rows)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, cwd=Path(__file__).parents[1])
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def measure_builds(work: Path, rows: int, dim: int, slice_rows: int, clusters: int = 1024) -> dict:
    """Write the corpus, build it in-process and distributed; times, peak RSS and ratios."""
    t0 = time.perf_counter()
    raw = write_corpus(work / "emb", rows, dim, clusters, rows_per_file=4 * 65536,
                       row_group=min(65536, slice_rows))
    print(f"[bench] wrote {rows} x {dim} ({raw / 1e9:.2f} GB raw) in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr, flush=True)
    single = run_build(work / "emb", work / "single", False, slice_rows)
    dist = run_build(work / "emb", work / "dist", True, slice_rows)
    report = dist["meta"]["shards"][0]["distributed"]
    tasks = report["tasks"]
    out = {"rows": rows, "dim": dim, "raw_bytes": raw, "slice_rows": slice_rows, "slices": report["slices"],
           "in_process": {"wall_s": single["wall_s"], "peak_rss_bytes": single["peak_rss_bytes"],
                          "factory": single["meta"]["factory"], "recall": single["meta"]["recall"]},
           "distributed": {"wall_s": dist["wall_s"], "driver_peak_rss_bytes": dist["peak_rss_bytes"],
                           "driver": report["driver"], "merge_s": report["merge_s"],
                           "add_task_peak_rss_bytes": [t["peak_rss_bytes"] for t in tasks],
                           "add_task_growth_bytes": [t["peak_rss_bytes"] - t["rss_start_bytes"]
                                                     for t in tasks],
                           "scan_task_peak_rss_bytes": [t["peak_rss_bytes"] for t in report["scan_tasks"]],
                           "factory": dist["meta"]["factory"], "recall": dist["meta"]["recall"],
                           "search_params": dist["meta"]["search_params"]}}
    d = out["distributed"]
    worst = max(d["driver_peak_rss_bytes"], *d["add_task_peak_rss_bytes"], *d["scan_task_peak_rss_bytes"])
    out["ratios"] = {"in_process_peak_over_raw": single["peak_rss_bytes"] / raw,
                     "distributed_worst_process_peak_over_raw": worst / raw,
                     "distributed_driver_anon_over_raw": d["driver"].get("anon_rss_bytes", 0) / raw,
                     "wall_distributed_over_in_process": d["wall_s"] / single["wall_s"]}
    return out


def record_results(record: BenchRecord, res: dict) -> None:
    d, s = res["distributed"], res["in_process"]
    raw = res["raw_bytes"]
    rows = [{"build": "in-process", "wall_s": s["wall_s"], "peak_gb": s["peak_rss_bytes"] / 1e9,
             "over_raw": s["peak_rss_bytes"] / raw, "factory": s["factory"], "recall": s["recall"]},
            {"build": "distributed driver", "wall_s": d["wall_s"],
             "peak_gb": d["driver_peak_rss_bytes"] / 1e9,
             "over_raw": d["driver_peak_rss_bytes"] / raw, "factory": d["factory"], "recall": d["recall"]},
            {"build": f"distributed add task (max of {res['slices']})", "wall_s": None,
             "peak_gb": max(d["add_task_peak_rss_bytes"]) / 1e9,
             "over_raw": max(d["add_task_peak_rss_bytes"]) / raw, "factory": None, "recall": None}]
    columns = [col("build", "process"), col("wall_s", "wall s", "{:.1f}"),
               col("peak_gb", "peak RSS GB", "{:.2f}"), col("over_raw", "peak / raw", "{:.2f}"),
               col("factory", "factory"), col("recall", "recall@10 (tuning set)", "{:.3f}")]
    record.table("build", columns=columns,
                 rows=rows, sample_size=f"{res['rows']} x {res['dim']} clustered vectors, one build each",
                 baseline="in-process build_index of the same embeddings, same run",
                 filtering="none")
    record.extra["results"] = res


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--slice-rows", type=int, default=131072)
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed)")
    add_record_args(parser, "build_distributed")
    args = parser.parse_args(argv)
    record = BenchRecord.start("build_distributed", sys.argv[1:] if argv is None else argv)
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vidsift-bench-build-", dir=args.workdir) as tmp:
        res = measure_builds(Path(tmp), args.rows, args.dim, args.slice_rows)
    print(json.dumps(res, indent=2))
    record_results(record, res)
    record.write(args.json, note=args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())

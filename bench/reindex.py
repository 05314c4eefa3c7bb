"""Nightly reindex cost: an incremental run (small delta) and a no-op run against a full build, same run.

Builds a synthetic source of N videos, runs a first (full) reindex, then changes the source (+2 new,
1 re-encoded, 1 deleted) and runs again, then runs once more with nothing changed. Prints wall seconds per
run and per step, and the ratios incremental / full and no-op / full. Then the scan step on larger files
(``--scan-files`` x ``--scan-mb`` MB of random bytes): with the (path, size, mtime) hash cache against a cold
scan that re-hashes every file (median of 3 each).

    python bench/reindex.py --n 24 --workdir /tmp/bench_reindex
    python bench/reindex.py --scan-only --scan-files 20 --scan-mb 8
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import ray  # noqa: E402

from bench.record import BenchRecord, add_record_args, col  # noqa: E402
from runtime.ray_connect import connect_ray  # noqa: E402
from synthetic import generate_corpus  # noqa: E402
from workflows.reindex import run_reindex, scan_source  # noqa: E402

COLUMNS = ["video_id", "path", "captions", "split", "caption_class", "hard_group"]


def write_source(src: Path, corpus: Path, ids: list[str]) -> str:
    manifest = pd.read_parquet(corpus / "manifest.parquet")
    (src / "videos").mkdir(parents=True, exist_ok=True)
    rows = manifest[manifest.video_id.isin(ids)][COLUMNS]
    for path in rows.path:
        if not (src / path).exists():
            shutil.copy(corpus / path, src / path)
    rows.to_parquet(src / "manifest.parquet")
    return str(src / "manifest.parquet")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=24, help="videos in the first night's source")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--workdir", default="/tmp/bench_reindex")
    p.add_argument("--scan-files", type=int, default=20)
    p.add_argument("--scan-mb", type=int, default=8)
    p.add_argument("--scan-only", action="store_true", help="only the hash-cache scan benchmark")
    add_record_args(p, "reindex")
    args = p.parse_args(argv)
    record = BenchRecord.start("reindex", sys.argv[1:] if argv is None else argv)
    base = Path(args.workdir)
    shutil.rmtree(base, ignore_errors=True)
    print(f"machine: {platform.node()} {os.cpu_count()} CPUs, python {platform.python_version()}; "
          f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load avg {os.getloadavg()[0]:.1f}")
    if not args.scan_only:
        record_runs(record, pipeline_bench(args, base), args)
    cold, warm = scan_bench(base / "scan", args.scan_files, args.scan_mb)
    record.table("scan", columns=[col("cold_ms", "cold scan ms (sha256 of every file)", "{:.1f}"),
                                  col("cached_ms", "cached scan ms (path, size, mtime)", "{:.1f}"),
                                  col("ratio", "cached / cold", "{:.3f}x")],
                 rows=[{"cold_ms": cold * 1000, "cached_ms": warm * 1000, "ratio": warm / cold}],
                 sample_size=f"{args.scan_files} files x {args.scan_mb} MB of random bytes, median of 3 "
                             "scans each",
                 baseline="the cold scan of the same files, same run", filtering="none")
    record.write(args.json, note=args.note)
    shutil.rmtree(base, ignore_errors=True)
    return 0


def scan_bench(folder: Path, n_files: int, mb: int) -> tuple[float, float]:
    """Median seconds of a cold and a cached scan of ``n_files`` files of ``mb`` MB."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        (folder / f"v{i:04d}.mp4").write_bytes(os.urandom(mb << 20))
    pattern = str(folder / "*.mp4")
    _, _, cache = scan_source(pattern, {}, progress=False)  # warm-up (page cache, imports) + the cache

    def timed(c):
        t0 = time.perf_counter()
        scan_source(pattern, c, progress=False)
        return time.perf_counter() - t0

    cold = statistics.median(timed({}) for _ in range(3))
    warm = statistics.median(timed(cache) for _ in range(3))
    print(f"scan of {n_files} files x {mb} MB: cold (sha256 of every file) {cold * 1000:.1f} ms, "
          f"cached {warm * 1000:.1f} ms, cached/cold {warm / cold:.3f}x")
    return cold, warm


def pipeline_bench(args, base: Path) -> dict:
    """A full, an incremental (+2 new, 1 changed, 1 deleted) and a no-op run; returns {name: (summary, s)}."""
    corpus, other = base / "corpus", base / "other"
    generate_corpus(corpus, n=args.n + 2, seed=5, min_duration=2.0, max_duration=4.0, size=args.size, fps=10)
    generate_corpus(other, n=1, seed=17, min_duration=2.0, max_duration=2.0, size=args.size, fps=10)
    ids = sorted(pd.read_parquet(corpus / "manifest.parquet").video_id)
    src, wd = base / "src", base / "wd"
    cfg = {"model": "clip4clip-meanP-tiny", "ingest": {"samples_per_shard": 8},
           "embed": {"batch_size": 8, "sampling": {"num_clips": 2, "frames_per_clip": 2}}}
    os.environ.pop("RAY_ADDRESS", None)  # a private local Ray, started once before the first run
    started_here, _ = connect_ray()
    runs = {}

    def timed_run(name: str, source: str) -> None:
        # a seeded random encoder on purpose: this measures the run's cost, not retrieval quality
        t0 = time.perf_counter()
        summary = run_reindex(source, wd, config=cfg, progress=False, allow_random_init=True)
        runs[name] = (summary, time.perf_counter() - t0)

    timed_run("full", write_source(src, corpus, ids[: args.n]))
    (src / "videos" / f"{ids[1]}.mp4").unlink()
    shutil.copy(other / "videos" / "synth-000000.mp4", src / "videos" / f"{ids[0]}.mp4")
    source = write_source(src, corpus, [ids[0]] + ids[2:])
    timed_run("incremental", source)
    timed_run("no-op", source)
    if started_here:
        ray.shutdown()
    return runs


def record_runs(record: BenchRecord, runs: dict, args) -> None:
    full_s = runs["full"][1]
    rows = []
    for name, (summary, wall) in runs.items():
        steps = " ".join(f"{k}={v:.1f}" for k, v in summary["timings_s"].items() if k != "total")
        rows.append({"run": name, "delta": f"{summary['new']}/{summary['changed']}/{summary['deleted']}",
                     "index_mode": summary["index_mode"],
                     "rows": f"+{summary.get('rows_added', 0)}/-{summary.get('rows_removed', 0)}",
                     "wall_s": wall, "vs_full": wall / full_s,
                     "steps": steps})
        print(" | ".join(str(v) for v in rows[-1].values()))
    columns = [col("run", "run"), col("delta", "new/changed/deleted"), col("index_mode", "index mode"),
               col("rows", "rows +/-"), col("wall_s", "wall s", "{:.1f}"),
               col("vs_full", "vs full", "{:.2f}x"), col("steps", "steps (s)")]
    record.table("runs", columns=columns, rows=rows,
                 sample_size=f"a source of {args.n} synthetic videos at {args.size} px, 2-4 s; model "
                             "clip4clip-meanP-tiny (random init), 2 clips x 2 frames; one run each",
                 baseline="the full run of the same bench", filtering="none")


if __name__ == "__main__":
    sys.exit(main())

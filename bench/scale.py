"""The index past one process (issue #26): vidsift vs FAISS HNSW32,Flat vs LanceDB IVF_PQ on the same clip
vectors, and fan-out search over 2 and 4 shard deployments on Ray Serve against one process.

Corpus per size (``--sizes``): ``N`` clip vectors of ``--dim`` dims, ``--clips`` per video, clustered: a
video's *semantic* vector is a cluster centre plus noise; its clips are that vector plus one offset shared by
every clip (the text/video modality gap) plus per-video and per-clip noise. Text-like queries are a video's
semantic vector plus noise and no gap: they lie off the clips' distribution, as users' text queries do
(bench/text_recall.py). 1,000 queries of the first half of the videos are the build's tuning set (written
where ``jobs.embed --with-text`` writes caption embeddings); ``--queries`` held-out ones of the second half
are scored. Ground truth: the exact top 10 videos by best clip (brute force over every vector).

Each build runs in its own process, sampled every 0.2 s with its whole process tree (Ray workers included):
build wall time and every process's peak RSS. Each system is then opened in a fresh process, which reports its
open time, its anonymous RSS after open + every query, single-query p50 / p99, q/s from 8 client threads and
video-level recall@10, at its tuned setting and along a sweep (the curves in docs/scale.md). Fan-out: the
vidsift index (4 shards) behind 2 and 4 shard deployments against the same index in one process, same run.

    python -m bench.scale --sizes 1000000            # writes docs/data/scale.json (+ docs/scale.png)
    python -m bench.scale --dry-run --json /tmp/scale.json --plot /tmp/scale.png   # tiny: the test's run
    python -m bench.scale --replot docs/data/scale.json docs/data/scale_10m.json   # one plot of several runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import BenchRecord, add_record_args, col  # noqa: E402
from bench.scale_corpus import write_corpus  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ("vidsift", "lancedb", "hnsw")


class TreeSampler:
    """Peak RSS of a process and every descendant (Ray's raylet, GCS, workers), sampled every ``every_s``."""

    def __init__(self, pid: int, every_s: float = 0.2):
        self.root, self.every_s, self.peaks = psutil.Process(pid), every_s, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            for p in procs:
                try:
                    rss, name = p.memory_info().rss, _role(p)
                except psutil.Error:
                    continue
                key = (p.pid, name)
                self.peaks[key] = max(self.peaks.get(key, 0), rss)
            self._stop.wait(self.every_s)

    def summary(self) -> dict:
        """Driver peak, the largest worker peak (``ray::`` processes) and Ray's own processes' peak, bytes."""
        driver = max((v for (pid, _), v in self.peaks.items() if pid == self.root.pid), default=0)
        workers = [v for (_, name), v in self.peaks.items() if name == "worker"]
        infra = [v for (_, name), v in self.peaks.items() if name == "ray"]
        return {
            "driver_peak_rss": driver,
            "worker_peak_rss": max(workers, default=0),
            "workers": len(workers),
            "ray_infra_peak_rss": max(infra, default=0),
        }


def _role(p: psutil.Process) -> str:
    name = " ".join(p.cmdline()[:2])
    if "ray::" in name or "default_worker" in name:
        return "worker"
    return "ray" if ("raylet" in name or "gcs_server" in name or "ray/" in name) else "other"


def run_child(task: str, spec: dict, log: Path, entry: tuple[str, ...] = ("bench.scale_tasks",),
              label: str = "scale") -> tuple[dict, dict, float]:
    """Run ``python -m <entry> task <spec as JSON> <out>`` in a fresh process (``bench.scale_tasks`` unless
    ``entry`` names another task runner); returns (its JSON result, RSS peaks of its process tree, wall s)."""
    out = log.with_suffix(".json")
    cmd = [sys.executable, "-m", *entry, task, json.dumps(spec), str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        with TreeSampler(proc.pid) as sampler:
            rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"{task} failed (exit {rc}); its log {log}:\n{log.read_text()[-3000:]}")
    print(f"[{label}] {task}: {wall:.1f} s", flush=True)
    return json.loads(out.read_text()), sampler.summary(), wall


def measure_size(n: int, args, work: Path) -> dict:
    """Corpus, three builds, three serving runs and the fan-out run for ``n`` vectors."""
    corpus = write_corpus(work / f"n{n}", n, args.dim, args.clips, args.queries, args.seed)
    raw = n * args.dim * 4
    result = {"n": n, "raw_bytes": raw, "corpus": corpus["stats"], "systems": {}}
    target = None  # vidsift's recall: the others are measured at their fastest setting reaching it
    for system in args.systems.split(","):
        spec = {
            **corpus["spec"],
            "system": system,
            "shards": args.shards,
            "threads": args.client_threads,
            "target_recall": target,
            # The floors are ratios: the chooser gets the same share of the raw vectors at every size.
            "memory_budget": int(args.memory_share * raw),
        }
        built, peaks, wall = run_child(f"build_{system}", spec, work / f"n{n}-build-{system}.log")
        served, serve_peaks, _ = run_child("serve", {**spec, **built}, work / f"n{n}-serve-{system}.log")
        result["systems"][system] = {
            "build_s": wall,
            **peaks,
            **built,
            **served,
            "serve_driver_peak_rss": serve_peaks["driver_peak_rss"],
        }
        print(f"[scale] n={n:,} {system}: " + json.dumps(_brief(result["systems"][system], raw)), flush=True)
        target = result["systems"]["vidsift"]["tuned"]["recall"]
    if "vidsift" in result["systems"]:
        fan_spec = {**corpus["spec"], "index": result["systems"]["vidsift"]["index"], "deployments": [2, 4],
                    "threads": args.client_threads}
        result["fanout"], _, _ = run_child("fanout", fan_spec, work / f"n{n}-fanout.log")
    return result


def _brief(s: dict, raw: int) -> dict:
    return {
        "build_s": round(s["build_s"], 1),
        "peak_worker/raw": round(s["worker_peak_rss"] / raw, 3),
        "peak_driver/raw": round(s["driver_peak_rss"] / raw, 3),
        "recall@10": s["tuned"]["recall"],
        "p50_ms": s["tuned"]["p50_ms"],
        "qps": s["tuned"]["qps"],
    }


def record_results(record: BenchRecord, results: list[dict], args) -> None:
    rows = []
    for r in results:
        for system, s in r["systems"].items():
            t = s["tuned"]
            rows.append(
                {
                    "n": r["n"],
                    "system": system,
                    "setting": t["setting"],
                    "build_s": s["build_s"],
                    "driver_peak_x": s["driver_peak_rss"] / r["raw_bytes"],
                    "worker_peak_x": s["worker_peak_rss"] / r["raw_bytes"],
                    "bytes_per_vector": s["index_bytes"] / r["n"],
                    "open_s": s["open_s"],
                    "anon_x": s["anon_rss_after"] / r["raw_bytes"],
                    "anon_grown_x": (s["anon_rss_after"] - s["anon_rss_before"]) / r["raw_bytes"],
                    "p50_ms": t["p50_ms"],
                    "p99_ms": t["p99_ms"],
                    "qps": t["qps"],
                    "recall": t["recall"],
                }
            )
    record.table(
        "systems",
        title="Build, open and search, same vectors and queries",
        columns=[
            col("n", "vectors", "{:,}"),
            col("system", "system"),
            col("setting", "setting"),
            col("build_s", "build s", "{:.1f}"),
            col("driver_peak_x", "driver peak / raw", "{:.2f}"),
            col("worker_peak_x", "worker peak / raw", "{:.2f}"),
            col("bytes_per_vector", "bytes/vector", "{:.0f}"),
            col("open_s", "open s", "{:.2f}"),
            col("anon_x", "serving anon RSS / raw", "{:.3f}"),
            col("anon_grown_x", "grown by open + queries / raw", "{:+.3f}"),
            col("p50_ms", "p50 ms", "{:.2f}"),
            col("p99_ms", "p99 ms", "{:.2f}"),
            col("qps", f"q/s ({args.client_threads} threads)", "{:.0f}"),
            col("recall", "video recall@10", "{:.3f}"),
        ],
        rows=rows,
        sample_size=f"{args.queries} held-out text-like queries per size, k=10",
        baseline="exact top 10 videos by best clip (brute force), same run",
        filtering=f"none; peak RSS sampled every 0.2 s over the build's process tree; vidsift's memory "
        f"budget {args.memory_share:g} x the raw vectors",
    )
    fan_rows = [{"n": r["n"], **row} for r in results for row in r["fanout"]["rows"]]
    record.table(
        "fanout",
        title="Fan-out over shard deployments (Ray Serve) vs one process, same index",
        columns=[
            col("n", "vectors", "{:,}"),
            col("mode", "mode"),
            col("p50_ms", "p50 ms", "{:.2f}"),
            col("added_p50_ms", "p50 added ms", "{:+.2f}"),
            col("p99_ms", "p99 ms", "{:.2f}"),
            col("qps", f"q/s ({args.client_threads} threads)", "{:.0f}"),
            col("identical", "same top 10 as one process"),
        ],
        rows=fan_rows,
        sample_size=f"{args.queries} held-out queries, k=10",
        baseline="the same 4-shard index searched in one process (VideoIndex.rank), same run",
    )
    record.extra["results"] = results


def add_headlines(record: BenchRecord, results: list[dict]) -> None:
    """The issue's floors, one overview row each (docs/benchmarks.md), every measured size in its figure."""
    runs = sorted((r for r in results if "vidsift" in r["systems"]), key=lambda r: r["n"])
    if not runs:
        return

    def each(fmt) -> str:
        return "; ".join(f"{r['n']:,}: {fmt(r, r['systems']['vidsift'])}" for r in runs)

    def build_x(r, v):
        return max(v["driver_peak_rss"], v["worker_peak_rss"]) / r["raw_bytes"]

    record.add_headline("index at scale: build", "every build process's peak RSS <= 0.5 x raw vectors",
                        each(lambda r, v: f"{build_x(r, v):.2f}x in {v['build_s']:.0f} s"),
                        _met(all(build_x(r, r["systems"]["vidsift"]) <= 0.5 for r in runs)))
    big = [r for r in runs if r["n"] >= 10_000_000]
    largest = runs[-1]
    record.add_headline(
        "index at scale: build", "10M x 256 in <= 45 min",
        each(lambda r, v: f"{v['build_s'] / 60:.1f} min") if big
        else f"not run (largest {largest['n']:,}: {largest['systems']['vidsift']['build_s'] / 60:.1f} min)",
        _met(bool(big) and all(r["systems"]["vidsift"]["build_s"] <= 45 * 60 for r in big)))

    def grown(r, v):  # what open + queries added to the process (the baseline measured the same)
        return (v["anon_rss_after"] - v["anon_rss_before"]) / r["raw_bytes"]

    def serving_ok(r, v):
        return grown(r, v) <= 0.25 and v["open_s"] <= 2

    record.add_headline(
        "index at scale: serving", "anonymous RSS grown by open + queries <= 0.25 x raw; open <= 2 s",
        each(lambda r, v: f"+{grown(r, v):.3f}x (process total {v['anon_rss_after'] / r['raw_bytes']:.2f}x), "
             f"open {v['open_s']:.2f} s"),
        _met(all(serving_ok(r, r["systems"]["vidsift"]) for r in runs)))
    record.add_headline(
        "index at scale: search", "recall@10 >= 0.95 (text-like queries) at single-query p50 <= 10 ms",
        each(lambda r, v: f"{v['tuned']['recall']:.3f} at {v['tuned']['p50_ms']:.2f} ms"),
        _met(all(r["systems"]["vidsift"]["tuned"]["recall"] >= 0.95
                 and r["systems"]["vidsift"]["tuned"]["p50_ms"] <= 10 for r in runs)))
    if all("lancedb" in r["systems"] for r in runs):
        record.add_headline(
            "index at scale: vs LanceDB", "q/s (8 threads) >= LanceDB's at equal recall",
            each(lambda r, v: _versus(_matching(v, r["systems"]["lancedb"]["tuned"]),
                                      r["systems"]["lancedb"]["tuned"])),
            _met(all(_faster(_matching(r["systems"]["vidsift"], r["systems"]["lancedb"]["tuned"]),
                             r["systems"]["lancedb"]["tuned"]) for r in runs)))
    four = [(r["n"], row) for r in runs for row in r.get("fanout", {}).get("rows", [])
            if row["mode"] == "4 shard deployments"]
    if four:
        record.add_headline(
            "index at scale: fan-out", "4 shard deployments: the same top 10, <= 3 ms added to p50",
            "; ".join(f"{n:,}: {row['added_p50_ms']:+.2f} ms, same top 10: {row['identical']}"
                      for n, row in four),
            _met(all(row["added_p50_ms"] <= 3 and row["identical"] == "yes" for _, row in four)))


def _versus(ours: dict | None, peer: dict) -> str:
    if ours is None:
        return f"no vidsift setting reaches LanceDB's recall {peer['recall']:.3f} ({peer['qps']:.0f} q/s)"
    return (f"{ours['qps']:.0f} q/s at {ours['setting']} vs {peer['qps']:.0f} "
            f"(recall {ours['recall']:.3f} vs {peer['recall']:.3f})")


def _matching(ours: dict, peer: dict) -> dict | None:
    """Our fastest setting at least as accurate as the peer's compared setting (the peer's fastest reaching
    our tuned recall, which its coarse sweep may overshoot, else its most accurate); None when none is."""
    reaching = [s for s in ours["sweep"] if s["recall"] >= peer["recall"]]
    return max(reaching, key=lambda s: s["qps"]) if reaching else None


def _faster(ours: dict | None, peer: dict) -> bool:
    return ours is not None and ours["qps"] >= peer["qps"]


def _met(ok: bool) -> str:
    return "yes" if ok else "no"


# --------------------------------------------------------------------------------- cost model, 100M videos
VIDEOS = 100_000_000
ASSUME = {
    "mb_per_video": 10.0,
    "clips_per_video": 4,
    "gpu_videos_per_s": 1500.0,
    "gpu_node_cores": 16,
    "peak_qps": 1000.0,
    "serve_node_cores": 16,
}


def cost_model(results: list[dict], data_dir: Path) -> list[dict]:
    """Node-hours per stage for 100M videos from this machine's measured rates (per core: this machine has 2)
    and the stated assumptions (``ASSUME``: video size, clips, an H100's embed rate, the query load)."""
    ingest = json.loads((data_dir / "ingest.json").read_text())["tables"]["runs"]["rows"]
    mb_s = max(r["mb_per_s"] for r in ingest if r["corpus"] == "large" and r["runner"] == "ray 2 workers")
    decode = json.loads((data_dir / "decode.json").read_text())["tables"]["timings"]["rows"]
    decode_ms = min(
        r["ms"] for r in decode if r["method"].startswith("vidsift keyframe") and r["plan"] == "4x2"
    )
    big = max(results, key=lambda r: r["n"])
    vid = big["systems"]["vidsift"]
    build_core_s_per_vector = vid["build_s"] * 2 / big["n"]
    qps_per_core = big["fanout"]["rows"][0]["qps"] / 2
    vectors = VIDEOS * ASSUME["clips_per_video"]
    decode_per_node = ASSUME["gpu_node_cores"] * 1000 / decode_ms  # videos/s the node's CPUs can decode
    embed_rate = min(ASSUME["gpu_videos_per_s"], decode_per_node)
    rows = [
        {
            "stage": "ingest (copy + probe + tar)",
            "rate": f"{mb_s / 2:.0f} MB/s per core (ingest.json)",
            "node": "16-core CPU",
            "node_hours": VIDEOS * ASSUME["mb_per_video"] / (mb_s / 2 * 16) / 3600,
        },
        {
            "stage": "embed (decode on CPU, encode on GPU)",
            "rate": f"decode {1000 / decode_ms:.0f} videos/s per core (decode.json), GPU "
            f"{ASSUME['gpu_videos_per_s']:.0f} videos/s assumed",
            "node": "1x H100 + 16 cores",
            "node_hours": VIDEOS / embed_rate / 3600,
        },
        {
            "stage": "index build",
            "rate": f"{1 / build_core_s_per_vector:,.0f} vectors/s per core (this run, {big['n']:,} vectors)",
            "node": "16-core CPU",
            "node_hours": vectors * build_core_s_per_vector / 16 / 3600,
        },
        {
            "stage": "serve (per hour at peak)",
            "rate": f"{qps_per_core:.0f} q/s per core at {big['n']:,} vectors (this run; scales ~1/size)",
            "node": "16-core CPU",
            "node_hours": ASSUME["peak_qps"]
            / (qps_per_core * big["n"] / vectors)
            / ASSUME["serve_node_cores"],
        },
    ]
    return rows


CURVES = (  # (title, y label, value of one system at one size, log y)
    ("Build time", "build wall s", lambda s, raw: s["build_s"], True),
    ("Memory", "RSS / raw vectors (squares: build peak, circles: serving anon)",
     lambda s, raw: max(s["driver_peak_rss"], s["worker_peak_rss"]) / raw, False),
    ("Latency", "single-query p50 ms (tuned)", lambda s, raw: s["tuned"]["p50_ms"], True),
    ("Recall", "video recall@10 (tuned)", lambda s, raw: s["tuned"]["recall"], False),
)


def plot(results: list[dict], path: Path) -> None:
    """One panel each of build time, memory, latency and recall against corpus size (per system), and
    recall@10 against single-query p50 along each system's sweep of its search setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 8))
    results = sorted(results, key=lambda r: r["n"])
    systems = sorted({system for r in results for system in r["systems"]})
    for ax, (title, label, value, log) in zip(axes.flat, CURVES):
        for i, system in enumerate(systems):
            pts = [(r["n"], value(r["systems"][system], r["raw_bytes"])) for r in results
                   if system in r["systems"]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="s", color=f"C{i}", label=system)
            if title == "Memory":
                anon = [(r["n"], r["systems"][system]["anon_rss_after"] / r["raw_bytes"]) for r in results
                        if system in r["systems"]]
                ax.plot([p[0] for p in anon], [p[1] for p in anon], "o--", color=f"C{i}", alpha=0.6)
        ax.set(title=title, xlabel="clip vectors", ylabel=label, xscale="log")
        ax.set_yscale("log" if log else "linear")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes.flat[len(CURVES)]
    for r in results:
        for system, s in sorted(r["systems"].items()):
            pts = sorted((p["p50_ms"], p["recall"]) for p in s["sweep"])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{systems.index(system)}",
                    alpha=0.4 + 0.6 * (r["n"] == results[-1]["n"]), label=f"{system}, {r['n']:,}")
    ax.set(title="Recall vs latency (each system's sweep)", xlabel="single-query p50 ms (log)",
           ylabel="video recall@10", xscale="log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    axes.flat[-1].axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def replot(records: list[Path], path: Path) -> None:
    """``plot`` of the sizes of several records (runs of this script), e.g. a 10M run beside a 1M + 3M one;
    a size measured by more than one record is taken from the last."""
    by_size: dict[int, dict] = {}
    for record in records:
        results = json.loads(record.read_text()).get("extra", {}).get("results")
        if not results:
            raise ValueError(f"--replot {record}: no extra.results (not a bench.scale record)")
        by_size.update({r["n"]: r for r in results})
    plot(list(by_size.values()), path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000000", help="comma-separated corpus sizes (clip vectors)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--clips", type=int, default=4, help="clips per video")
    p.add_argument("--queries", type=int, default=1000, help="held-out text-like queries")
    p.add_argument("--shards", type=int, default=4, help="shards of the vidsift index (fan-out uses them)")
    p.add_argument("--client-threads", type=int, default=8)
    p.add_argument("--memory-share", type=float, default=0.25,
                   help="vidsift's memory budget as a share of the raw float32 vectors (the serving floor)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--systems", default=",".join(SYSTEMS), help="vidsift first: the others aim at its recall")
    p.add_argument("--workdir", default="/tmp/vidsift_bench_scale")
    p.add_argument("--plot", type=Path, default=REPO / "docs" / "scale.png")
    p.add_argument(
        "--dry-run", action="store_true", help="tiny sizes (4,000 vectors, 50 queries): a smoke run"
    )
    p.add_argument("--replot", type=Path, nargs="+", metavar="RECORD",
                   help="measure nothing: draw --plot from these records' results (later records win a size)")
    add_record_args(p, "scale")
    args = p.parse_args(argv)
    if args.replot:
        try:
            replot(args.replot, args.plot)
        except (OSError, ValueError) as e:
            print(f"bench.scale: {e}", file=sys.stderr)
            return 2
        return 0
    if args.dry_run:
        args.sizes, args.queries = "4000", 50
    record = BenchRecord.start("scale", sys.argv[1:] if argv is None else argv)
    work = Path(args.workdir)  # a corpus already written there for the same size is reused
    results = [measure_size(int(n), args, work) for n in args.sizes.split(",")]
    record_results(record, results, args)
    add_headlines(record, results)
    record.table(
        "cost",
        title="Cost model: 100M videos",
        rows=cost_model(results, REPO / "docs" / "data"),
        columns=[
            col("stage", "stage"),
            col("rate", "measured / assumed rate"),
            col("node", "node"),
            col("node_hours", "node-hours", "{:,.0f}"),
        ],
        sample_size="rates from docs/data/ingest.json, decode.json and this run",
        baseline="none: an estimate",
        filtering=json.dumps(ASSUME),
    )
    plot(results, args.plot)
    record.write(args.json, note=args.note + (" (dry run)" if args.dry_run else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

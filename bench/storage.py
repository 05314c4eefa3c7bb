"""Storage: ingest and embed throughput on local disk vs an S3 server, and the ingest driver's peak RSS.

    python -m bench.storage                   # small + large corpus, 3 rounds; RSS at 1,000 and 20,000 inputs
    python -m bench.storage --quick           # 16 small videos x 1 round; RSS at 200 and 1,000 inputs
    python -m bench.storage --rss-sizes 1000 5000 20000

**Throughput** (same corpus, same run, one private local Ray), for two corpora (``CORPORA``: tiny 64 px
clips, where per-request latency dominates, and 256 px x 8-10 s ones): each corpus is ingested from a local
folder into a local folder, and from ``s3://`` into ``s3://``, once per ``INGEST_MODES`` entry (packed as is;
transcoded); then the packed output is embedded into the same store. Each S3 run also records the server's
requests (by HTTP method, from its access log) and its CPU seconds.
The store is moto's S3 server (the real S3 HTTP API), which the bench starts on 127.0.0.1 and stops at the
end. It runs on the same cores as the pipeline, so its CPU cost counts against S3. The two stores alternate
over the rounds, and the medians are reported; the ratio is s3 / local (floor: >= 0.8x).

**Driver peak RSS** (``ru_maxrss`` of the driver process alone): ``run_ingest`` in a fresh process, with its
own local Ray, on a cheap corpus of N inputs. The inputs are hard links to a few tiny videos, so each is a
distinct file that costs nothing to make. The driver keeps only bookkeeping, so its peak should stay flat
from 1k to 20k inputs.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import ray

from bench.record import BenchRecord, add_record_args, col
from models import create_model, save_checkpoint
from pipeline.ingest import run_ingest
from runtime import storage
from runtime.ray_connect import connect_ray
from synthetic import generate_corpus
from workflows.embed import run_embed

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = "clip4clip-meanP-tiny"
FLOOR = 0.8
SAMPLES_PER_SHARD = 16
ACCESS_LINE = re.compile(r'"(GET|HEAD|PUT|POST|DELETE) ')  # werkzeug's access log
# Two corpora: tiny clips (a few tens of kB: per-request latency dominates) and camera-like ones (256 px,
# 8-10 s: a few hundred kB each, where the work per byte dominates).
CORPORA = {"small": {"n": 48, "size": 64, "min_duration": 2.0, "max_duration": 3.0},
           "large": {"n": 16, "size": 256, "min_duration": 8.0, "max_duration": 10.0}}
# Ingest modes: "pack" stores each input as it is (probe, hash, tar: a few ms per video, so the store's
# per-request cost shows), "transcode" re-encodes to a 224 px short side at 8 fps first (what a corpus of
# mixed camera videos gets). Embed reads the "pack" output.
INGEST_MODES = {"pack": {}, "transcode": {"transcode": True, "short_side": 224, "fps": 8.0}}
RSS_SCRIPT = """
import resource, sys, time
from pipeline.ingest import run_ingest
imports_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
s = run_ingest(sys.argv[1], sys.argv[2], samples_per_shard=64, fsync=False, progress=False)
print("RESULT", s["inputs"], s["samples"], s["errors"], s["shards"], round(time.perf_counter() - t0, 2),
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, imports_kib)
"""


class ServerMeter:
    """What the S3 server did between two readings: requests by HTTP method (its access log) and its CPU
    seconds. The server runs on the pipeline's cores, so its CPU is part of what S3 costs here."""

    def __init__(self, proc: subprocess.Popen, log: Path):
        self.process, self.log = psutil.Process(proc.pid), log

    def reading(self) -> tuple[int, float]:
        cpu = self.process.cpu_times()
        return self.log.stat().st_size, cpu.user + cpu.system

    def since(self, start: tuple[int, float]) -> dict:
        time.sleep(0.2)  # the log line of the last response is written after it is sent
        offset, cpu = self.reading()
        with self.log.open("rb") as f:
            f.seek(start[0])
            text = f.read(offset - start[0]).decode("utf-8", "replace")
        methods = collections.Counter(m.group(1) for m in ACCESS_LINE.finditer(text))
        return {"requests": sum(methods.values()), "methods": dict(methods), "server_cpu_s": cpu - start[1]}


@contextlib.contextmanager
def s3_server(log: Path):
    """moto's S3 server on a free 127.0.0.1 port, its access log in ``log``; this process's AWS_* variables
    point at it meanwhile. Yields a :class:`ServerMeter`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_file = log.open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            start_new_session=True, stdout=log_file, stderr=log_file)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(env["AWS_ENDPOINT_URL"], timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("moto S3 server did not start") from None
                time.sleep(0.5)
        yield ServerMeter(proc, log)
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        log_file.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_bucket(name: str) -> str:
    import boto3  # bench-only: a bucket on the local test server (vidsift writes via runtime.storage)

    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


def prepare(work: Path, name: str, spec: dict, bucket: str) -> dict[str, dict[str, str]]:
    """Corpus ``name`` locally and in the bucket, and a seeded checkpoint on both stores."""
    corpus = work / f"corpus-{name}"
    generate_corpus(corpus, n=spec["n"], seed=5, min_duration=spec["min_duration"],
                    max_duration=spec["max_duration"], size=spec["size"], fps=10, keyframe_interval=1.0)
    remote = storage.join(bucket, f"corpus-{name}")
    for path in sorted((corpus / "videos").glob("*.mp4")):
        storage.upload(path, storage.join(remote, "videos", path.name))
    storage.upload(corpus / "manifest.parquet", storage.join(remote, "manifest.parquet"))
    model, _, _ = create_model(MODEL, seed=0)
    bases = {"local": str(work / f"out-{name}"), "s3": storage.join(bucket, f"out-{name}")}
    out = {}
    for store, base in bases.items():
        ckpt = storage.join(base, "model.pt")
        save_checkpoint(model, ckpt)
        manifest = str(corpus / "manifest.parquet") if store == "local" else storage.join(remote,
                                                                                           "manifest.parquet")
        out[store] = {"manifest": manifest, "base": base, "checkpoint": ckpt, "corpus": name}
    return out


def one_round(stores: dict[str, dict[str, str]], r: int | str, order: list[str],
              meter: ServerMeter) -> list[dict]:
    rows = []
    for store in order:
        s = stores[store]
        ingest_out, emb_out = storage.join(s["base"], f"ingest-{r}"), storage.join(s["base"], f"emb-{r}")
        for mode, options in INGEST_MODES.items():
            out = ingest_out if mode == "pack" else f"{ingest_out}-{mode}"
            t0, server = time.perf_counter(), meter.reading()
            summary = run_ingest(s["manifest"], out, samples_per_shard=SAMPLES_PER_SHARD, progress=False,
                                 **options)
            rows.append({"corpus": s["corpus"], "stage": f"ingest ({mode})", "store": store, "round": r,
                         "videos": summary["samples"], "shards": summary["shards"],
                         "seconds": time.perf_counter() - t0, **meter.since(server)})
        t0, server = time.perf_counter(), meter.reading()
        summary = run_embed(ingest_out, MODEL, emb_out, pretrained=s["checkpoint"], batch_size=8,
                            progress_every=1e9)
        rows.append({"corpus": s["corpus"], "stage": "embed", "store": store, "round": r,
                     "videos": summary["videos"], "seconds": time.perf_counter() - t0, **meter.since(server)})
        print(f"[bench] {s['corpus']} round {r} {store}: "
              + ", ".join(f"{x['stage']} {x['seconds']:.1f} s" for x in rows[-len(INGEST_MODES) - 1:]),
              flush=True)
    return rows


def throughput_rows(raw: list[dict]) -> list[dict]:
    rows = []
    for corpus in dict.fromkeys(r["corpus"] for r in raw):
        for stage in [f"ingest ({mode})" for mode in INGEST_MODES] + ["embed"]:
            med = {}
            for store in ("local", "s3"):
                runs = [r for r in raw if (r["corpus"], r["stage"], r["store"]) == (corpus, stage, store)]
                med[store] = statistics.median(r["seconds"] for r in runs)
                rows.append({"corpus": corpus, "stage": stage, "store": store, "videos": runs[0]["videos"],
                             "runs": len(runs), "seconds": med[store],
                             "videos_per_s": runs[0]["videos"] / med[store]})
                if store == "s3":  # the server's share: its requests and CPU seconds (median over runs)
                    rows[-1]["requests"] = statistics.median(r["requests"] for r in runs)
                    rows[-1]["server_cpu_s"] = statistics.median(r["server_cpu_s"] for r in runs)
            rows[-1]["ratio"] = med["local"] / med["s3"]  # throughput s3 / local
            rows[-2]["ratio"] = 1.0
    return rows


def link_corpus(source: Path, target: Path, n: int) -> Path:
    """``n`` inputs that are hard links to the few videos of ``source`` (a manifest.csv of distinct ids)."""
    videos = sorted((source / "videos").glob("*.mp4"))
    (target / "videos").mkdir(parents=True, exist_ok=True)
    lines = ["video_id,path,caption"]
    for i in range(n):
        link = target / "videos" / f"v{i:06d}.mp4"
        if not link.exists():
            os.link(videos[i % len(videos)], link)
        lines.append(f"v{i:06d},videos/{link.name},a copy")
    (target / "manifest.csv").write_text("\n".join(lines) + "\n")
    return target / "manifest.csv"


def driver_rss(work: Path, n: int) -> dict:
    manifest = link_corpus(work / "corpus-small", work / f"rss-{n}", n)
    out = work / f"rss-{n}-out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(manifest), str(out)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or not line:
        raise RuntimeError(f"ingest of {n} inputs failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    inputs, samples, errors, shards, seconds, kib, imports_kib = (float(x) for x in line.split()[1:])
    row = {"inputs": int(inputs), "samples": int(samples), "errors": int(errors), "shards": int(shards),
           "seconds": seconds, "videos_per_s": samples / seconds, "peak_rss_mib": kib / 1024,
           "imports_rss_mib": imports_kib / 1024}
    print(f"[bench] driver RSS at {n} inputs: {row['peak_rss_mib']:.0f} MiB ({seconds:.0f} s)", flush=True)
    return row


THROUGHPUT_COLUMNS = [col("corpus", "corpus"), col("stage", "stage"), col("store", "store"),
                      col("videos", "videos"),
                      col("runs", "runs"), col("seconds", "median s", "{:.2f}"),
                      col("videos_per_s", "videos/s", "{:.2f}"), col("ratio", "s3 / local", "{:.2f}x"),
                      col("requests", "S3 requests"), col("server_cpu_s", "S3 server CPU s", "{:.2f}")]
RSS_COLUMNS = [col("inputs", "inputs"), col("samples", "samples"), col("errors", "errors"),
               col("shards", "shards"), col("seconds", "wall s", "{:.0f}"),
               col("videos_per_s", "videos/s", "{:.1f}"),
               col("imports_rss_mib", "RSS after imports MiB", "{:.0f}"),
               col("peak_rss_mib", "driver peak RSS MiB", "{:.0f}"),
               col("vs_smallest", "vs smallest", "{:.2f}x")]


def record_results(record: BenchRecord, args, rows: list[dict], rss: list[dict]) -> None:
    corpora = "; ".join(
        f"{name}: {c['n']} videos, {c['min_duration']:g}-{c['max_duration']:g} s, {c['size']} px"
        for name, c in CORPORA.items() if name in args.corpora)
    record.table("throughput", columns=THROUGHPUT_COLUMNS, rows=rows,
                 sample_size=f"{corpora}; {args.rounds} round(s) per store after one warm-up round "
                             "(not counted), median",
                 baseline="local disk, same corpus, same run (stores alternate over the rounds)",
                 filtering="none; the S3 server (moto) shares the machine's cores with the pipeline")
    for row in rows:
        if row["store"] == "s3":
            record.add_headline(f"{row['stage']} on S3 (moto), {row['corpus']} corpus",
                                f">= {FLOOR}x local disk", f"{row['ratio']:.2f}x",
                                "yes" if row["ratio"] >= FLOOR else "no")
    if rss:
        for r in rss:
            r["vs_smallest"] = r["peak_rss_mib"] / rss[0]["peak_rss_mib"]
        record.table("rss", columns=RSS_COLUMNS, rows=rss,
                     sample_size="one run per size (fresh process + local Ray each)",
                     baseline=f"the smallest size ({rss[0]['inputs']} inputs)",
                     filtering="none; inputs are hard links to the corpus' videos, 64 a shard, no fsync")
        growth = rss[-1]["vs_smallest"]
        record.add_headline("ingest driver peak RSS", f"flat from {rss[0]['inputs']} to {rss[-1]['inputs']} "
                            "inputs (<= 1.25x)", f"{growth:.2f}x", "yes" if growth <= 1.25 else "no")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.storage", description=__doc__.splitlines()[0])
    p.add_argument("--corpora", nargs="*", default=list(CORPORA), choices=list(CORPORA))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rss-sizes", type=int, nargs="*", default=[1000, 20000])
    p.add_argument("--quick", action="store_true",
                   help="16 small videos, 1 round, RSS at 200 and 1000 inputs")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed)")
    add_record_args(p, "storage")
    args = p.parse_args(argv)
    if args.quick:
        CORPORA["small"]["n"], args.corpora, args.rounds, args.rss_sizes = 16, ["small"], 1, [200, 1000]
    record = BenchRecord.start("storage", argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="vs_bench_storage_", dir=args.workdir) as tmp:
        work = Path(tmp)
        with s3_server(work / "moto.log") as meter:
            bucket = make_bucket(f"vs-bench-{os.getpid()}")
            connect_ray(num_cpus=os.cpu_count(), object_store_memory=256 * 1024**2)
            raw = []
            for name in args.corpora:
                stores = prepare(work, name, CORPORA[name], bucket)
                # Warm-up, not counted: the first round pays for Ray worker start-up, imports, the model
                # load and the S3 clients' first connections (measured: 11-25 s against 0.2-2 s warm).
                one_round(stores, "warmup", ["local", "s3"], meter)
                for r in range(args.rounds):  # alternate which store goes first
                    raw += one_round(stores, r, ["local", "s3"] if r % 2 == 0 else ["s3", "local"], meter)
            ray.shutdown()  # the RSS runs start their own Ray, one at a time
        rows = throughput_rows(raw)
        for row in rows:
            print(f"[bench] {row['corpus']:5s} {row['stage']:6s} {row['store']:5s} "
                  f"{row['videos_per_s']:.2f} videos/s"
                  + (f"  s3/local {row['ratio']:.2f}x" if row["store"] == "s3" else ""), flush=True)
        rss = [driver_rss(work, n) for n in args.rss_sizes]
    record.extra["raw"] = raw
    record_results(record, args, rows, rss)
    record.write(args.json, note=args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())

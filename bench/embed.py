"""Embedding throughput: the Ray Data pipeline vs model-only forward vs sequential loops, in one run.

    python bench/embed.py                       # ViT-B-32 meanP, 96 videos (10 s, 320x240, 1 s keyframes)
    python bench/embed.py --n 384 --no-naive    # the same with start-up amortised over 4x the videos
    python bench/embed.py --quick               # tiny model, smaller corpus (smoke run)
    python bench/embed.py --rss 1000,10000      # peak RSS (driver + workers) at two corpus sizes

Figures (all measured here, same videos, same sampling, same weights):
- model-only: the encoder's forward on pre-decoded, pre-transformed batches (upper bound for the encoder);
- pipeline: ``workflows.embed.run_embed`` end to end (read shards → decode tasks → encoder actor → Parquet);
- sequential (sparse): for each video, decode the sampled frames with vidsift's decoder, then encode;
- sequential (full decode): the naive loop, decode every frame with PyAV, pick the sampled ones, encode.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import BenchRecord, add_record_args, col, default_json, format_cell  # noqa: E402
from models import create_model  # noqa: E402
from pipeline.clips import sample_clips  # noqa: E402
from pipeline.decode import crop_resize, decode_all_frames  # noqa: E402
from pipeline.ingest import run_ingest  # noqa: E402
from pipeline.sampling import SamplingConfig  # noqa: E402
from runtime.ray_connect import connect_ray  # noqa: E402
from runtime.threads import set_torch_threads  # noqa: E402
from synthetic import generate_corpus  # noqa: E402
from workflows.embed import run_embed  # noqa: E402


def make_corpus(root: Path, n: int, duration: float, size: int, fps: int, keyint: float) -> Path:
    """Synthetic corpus + ingest (Ray) into shards; returns the ingest dir."""
    synth = root / "synth"
    generate_corpus(synth, n=n, seed=3, min_duration=duration, max_duration=duration, size=size, fps=fps,
                    keyframe_interval=keyint, workers=os.cpu_count() or 1)
    ingest = root / "ingest"
    run_ingest(input=str(synth / "manifest.parquet"), output=str(ingest), samples_per_shard=16)
    return ingest


def iter_samples(ingest: Path):
    for tar_path in sorted((ingest / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for name in sorted(members):
            if name.endswith(".mp4"):
                key = name[:-4]
                yield key, members[name], json.loads(members[key + ".json"])


def bench_model_only(model, transform, decoded, batch_size: int) -> float:
    """Videos/s of the encoder alone on pre-decoded frames."""
    starts = range(0, len(decoded), batch_size)
    batches = [np.stack([d[0] for d in decoded[i:i + batch_size]]) for i in starts]
    masks = [np.stack([d[1] for d in decoded[i:i + batch_size]]) for i in starts]
    prepared = [(transform(b), torch.as_tensor(m)) for b, m in zip(batches, masks)]
    with torch.inference_mode():
        model.encode_clips(*prepared[0])  # warm-up
        start = time.perf_counter()
        for x, m in prepared:
            model.video_from_clips(model.encode_clips(x, m), m)
    return len(decoded) / (time.perf_counter() - start)


def bench_sequential(model, transform, samples, sampling, full_decode: bool) -> float:
    """Videos/s of decode-then-encode, one video at a time."""
    cfg = SamplingConfig(**sampling)
    start = time.perf_counter()
    for _key, mp4, meta in samples:
        clip = sample_clips(mp4, cfg, size=transform.image_size, meta=meta)
        if full_decode:
            # The naive loop: decode the whole video, then index the sampled frames out of it.
            frames = decode_all_frames(mp4, backend="pyav")
            idx = np.clip(np.round(clip.times * meta["fps"]).astype(int), 0, len(frames) - 1)
            picked = crop_resize(frames[idx.reshape(-1)], transform.image_size)
            clip_frames = picked.reshape(*idx.shape, *picked.shape[1:])
        else:
            clip_frames = clip.frames
        with torch.inference_mode():
            x = transform(clip_frames[None])
            m = torch.as_tensor(clip.mask[None])
            model.video_from_clips(model.encode_clips(x, m), m)
    return len(samples) / (time.perf_counter() - start)


class PeakRSS:
    """Peak resident memory of this process and all its children (Ray workers), sampled every 0.2 s."""

    def __init__(self):
        self.psutil = psutil
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = self.psutil.Process()
        while not self.stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except self.psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.2)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def sampling_for(args) -> dict:
    if args.sampling == "clip4clip":  # the ViT-B-32 meanP recipe's sampling: <= 12 frames at <= 1 fps
        return {"num_clips": 1, "frames_per_clip": args.frames_per_clip, "mode": "clip4clip",
                "max_frames": args.frames_per_clip, "max_fps": 1.0}
    return {"num_clips": args.num_clips, "frames_per_clip": args.frames_per_clip, "mode": "eval"}


def measure_rss(root: Path, sizes: list[int]) -> list[dict]:
    """Peak RSS (driver + Ray workers) of the embed pipeline at each corpus size (tiny model, 2 s videos)."""
    rows = []
    for n in sizes:
        ingest = make_corpus(root / f"rss{n}", n, 2.0, 64, 10, 1.0)
        with PeakRSS() as rss:
            summary = run_embed(str(ingest), "clip4clip-meanP-tiny", str(root / f"emb{n}"),
                                sampling={"num_clips": 2, "frames_per_clip": 2}, batch_size=32,
                                progress_every=30, allow_random_init=True)
        rows.append({"videos": n, "peak_rss_mb": rss.peak / 2**20, "videos_per_s": summary["videos_per_s"]})
        print(f"| {n} | {rss.peak / 2**20:.0f} | {summary['videos_per_s']:.1f} |", flush=True)
    return rows


def measure_paths(args, root: Path, sampling: dict) -> tuple[list[dict], dict, float]:
    """videos/s of model-only, the sequential loops and the pipeline on one corpus; (rows, summary, wall)."""
    ingest = make_corpus(root / "corpus", args.n, args.duration, args.size, args.fps, 1.0)
    samples = list(iter_samples(ingest))
    model, transform, _ = create_model(args.model, pretrained=None, seed=0)
    model.eval()
    set_torch_threads(os.cpu_count())
    cfg = SamplingConfig(**sampling)
    decoded = []
    for _k, mp4, meta in samples:
        clip = sample_clips(mp4, cfg, size=transform.image_size, meta=meta)
        decoded.append((clip.frames, clip.mask))
    rates = {"model-only (pre-decoded)": bench_model_only(model, transform, decoded, args.batch_size),
             "sequential, sparse decode": bench_sequential(model, transform, samples, sampling, False)}
    if not args.no_naive:
        rates["sequential, full decode (naive)"] = bench_sequential(model, transform, samples, sampling, True)
    start = time.perf_counter()
    # random seeded weights on purpose, the same in every path: the bench measures speed, not retrieval
    summary = run_embed(str(ingest), args.model, str(root / "emb"), sampling=sampling,
                        batch_size=args.batch_size, progress_every=30, allow_random_init=True)
    wall = time.perf_counter() - start
    rates["pipeline (workflows.embed), wall"] = summary["videos"] / wall
    pipeline = rates["pipeline (workflows.embed), wall"]
    rows = [{"path": name, "videos_per_s": rate, "pipeline_over_this": pipeline / rate}
            for name, rate in rates.items()]
    return rows, summary, wall


def record_paths(record: BenchRecord, args, sampling: dict, rows: list[dict], summary: dict, wall: float):
    sample = (f"{args.n} synthetic videos ({args.duration:g} s, {args.size} px, {args.fps} fps, "
              "1 s keyframes), "
              f"model {args.model} (random seeded weights), sampling {json.dumps(sampling)}, batch "
              f"{args.batch_size}; one pass per path. Pipeline wall {wall:.1f} s, of which "
              f"{summary['startup_s']:.1f} s passed before the first embeddings reached the writer")
    record.table("paths", columns=[col("path", "path"), col("videos_per_s", "videos/s", "{:.2f}"),
                                   col("pipeline_over_this", "pipeline (wall) ÷ this", "{:.2f}x")],
                 rows=rows, sample_size=sample, baseline="model-only forward on pre-decoded batches and the "
                 "sequential decode-then-encode loops, same videos, weights and sampling, same run",
                 filtering="none")
    record.extra.update(summary={k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
    by = {r["path"]: r["pipeline_over_this"] for r in rows}
    model_only, seq = by["model-only (pre-decoded)"], by["sequential, sparse decode"]
    record.add_headline("embedding pipeline", f">= 0.8x model-only ({args.n} videos, {args.model})",
                        f"{model_only:.2f}x", "yes" if model_only >= 0.8 else "no")
    record.add_headline("embedding pipeline", ">= 1.3x the sequential (sparse decode) loop",
                        f"{seq:.2f}x", "yes" if seq >= 1.3 else "no")


def record_rss(record: BenchRecord, rows: list[dict]) -> None:
    columns = [col("videos", "videos"), col("peak_rss_mb", "pipeline peak RSS (MB)", "{:,.0f}"),
               col("videos_per_s", "videos/s", "{:.1f}")]
    record.table("rss", columns=columns,
                 rows=rows, sample_size="tiny synthetic videos (2 s, 64 px, 10 fps), 16 per shard, "
                 "clip4clip-meanP-tiny, 2 clips x 2 frames, batch 32; RSS of the bench process and all its "
                 "children sampled every 0.2 s", baseline="the smallest corpus of the same run",
                 filtering="none")
    growth = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"] - 1
    record.add_headline("embedding pipeline", "flat peak RSS as the corpus grows",
                        f"{rows[0]['peak_rss_mb']:,.0f} MB at {rows[0]['videos']:,} videos, "
                        f"{rows[-1]['peak_rss_mb']:,.0f} MB at {rows[-1]['videos']:,} ({growth:+.0%})",
                        "yes" if growth <= 0.1 else "no")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="clip4clip-meanP-ViT-B-32")
    p.add_argument("--n", type=int, default=96)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--size", type=int, default=240)
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-clips", type=int, default=1)
    p.add_argument("--frames-per-clip", type=int, default=12)
    p.add_argument("--sampling", choices=["clip4clip", "eval"], default="clip4clip",
                   help="clip4clip: the recipe's <= 12 frames at <= 1 fps; eval: centred clips")
    p.add_argument("--quick", action="store_true", help="tiny model, 24 short videos")
    p.add_argument("--rss", default=None, help="comma-separated corpus sizes for the peak-RSS comparison")
    p.add_argument("--workdir", default=None)
    p.add_argument("--no-naive", action="store_true",
                   help="skip the full-decode sequential loop (the slowest path; saves time on big corpora)")
    add_record_args(p, "embed")
    args = p.parse_args(argv)
    record = BenchRecord.start("embed", sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.model, args.n, args.duration, args.size, args.fps = "clip4clip-meanP-tiny", 24, 4.0, 96, 15
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_embed_"))
    connect_ray(num_cpus=os.cpu_count())
    if args.rss:
        print("| videos | pipeline peak RSS (MB) | videos/s |\n|---|---|---|")
        record_rss(record, measure_rss(root, [int(s) for s in args.rss.split(",")]))
        if args.json == default_json("embed"):
            args.json = default_json("embed-rss")
        record.write(args.json, note=args.note)
        return 0
    sampling = sampling_for(args)
    rows, summary, wall = measure_paths(args, root, sampling)
    print(f"\nmodel {args.model}, {args.n} videos ({args.duration:.0f} s, {args.size}px, "
          f"{args.fps} fps), sampling {sampling}, batch {args.batch_size}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    for r in rows:
        print(f"| {r['path']} | {format_cell(r['videos_per_s'], '{:.2f}')} | "
              f"{r['pipeline_over_this']:.2f}x |")
    # Output reaches the driver in blocks, so a rate "after the first output" is not a steady state on a
    # short run; the fixed start-up is reported instead.
    print(f"(pipeline wall {wall:.1f} s includes planning, the model build on the driver, actor start-up "
          f"and model load: {summary['startup_s']:.1f} s until the first embeddings reached the writer)")
    record_paths(record, args, sampling, rows, summary, wall)
    record.write(args.json, note=args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())

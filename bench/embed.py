"""Embedding throughput: the Ray Data pipeline vs model-only forward vs sequential loops, in one run.

    python bench/embed.py                       # ViT-B-32 meanP, 96 videos (10 s, 320x240, 1 s keyframes)
    python bench/embed.py --n 384 --no-naive    # the same with start-up amortised over 4x the videos
    python bench/embed.py --quick               # tiny model, smaller corpus (smoke run)
    python bench/embed.py --rss 1000,10000      # peak RSS (driver + workers) at two corpus sizes

Figures (all measured here, same videos, same sampling, same weights):
- model-only: the encoder's forward on pre-decoded, pre-transformed batches (upper bound for the encoder);
- pipeline: ``jobs.embed.run_embed`` end to end (read shards → decode tasks → encoder actor → Parquet);
- sequential (sparse): for each video, decode the sampled frames with vidsift's decoder, then encode;
- sequential (full decode): the naive loop, decode every frame with PyAV, pick the sampled ones, encode.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_corpus(root: Path, n: int, duration: float, size: int, fps: int, keyint: float) -> Path:
    """Synthetic corpus + ingest (Ray) into shards; returns the ingest dir."""
    from pipeline.ingest import run_ingest
    from pipeline.synthetic import generate_corpus

    synth = root / "synth"
    generate_corpus(synth, n=n, seed=3, min_duration=duration, max_duration=duration, size=size, fps=fps,
                    keyframe_interval=keyint, workers=os.cpu_count() or 1)
    ingest = root / "ingest"
    run_ingest(input=str(synth / "manifest.parquet"), output=str(ingest), samples_per_shard=16)
    return ingest


def iter_samples(ingest: Path):
    import tarfile

    for tar_path in sorted((ingest / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for name in sorted(members):
            if name.endswith(".mp4"):
                key = name[:-4]
                yield key, members[name], json.loads(members[key + ".json"])


def bench_model_only(model, transform, decoded, batch_size: int) -> float:
    """Videos/s of the encoder alone on pre-decoded frames."""
    import torch

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
    import torch

    from pipeline.clips import sample_clips
    from pipeline.decode import decode_all_frames
    from pipeline.sampling import SamplingConfig

    cfg = SamplingConfig(**sampling)
    start = time.perf_counter()
    for _key, mp4, meta in samples:
        clip = sample_clips(mp4, cfg, size=transform.image_size, meta=meta)
        if full_decode:
            # The naive loop: decode the whole video, then index the sampled frames out of it.
            frames = decode_all_frames(mp4, backend="pyav")
            idx = np.clip(np.round(clip.times * meta["fps"]).astype(int), 0, len(frames) - 1)
            from pipeline.decode import crop_resize

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
        import psutil

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
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.n, args.duration, args.size, args.fps = "clip4clip-meanP-tiny", 24, 4.0, 96, 15

    import ray
    import torch

    from jobs.embed import run_embed
    from pipeline.clips import sample_clips
    from pipeline.embedding import build_encoder
    from pipeline.sampling import SamplingConfig

    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_embed_"))
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    if args.sampling == "clip4clip":  # the ViT-B-32 meanP recipe's sampling: <= 12 frames at <= 1 fps
        sampling = {"num_clips": 1, "frames_per_clip": args.frames_per_clip, "mode": "clip4clip",
                    "max_frames": args.frames_per_clip, "max_fps": 1.0}
    else:
        sampling = {"num_clips": args.num_clips, "frames_per_clip": args.frames_per_clip, "mode": "eval"}
    if args.rss:
        sizes = [int(s) for s in args.rss.split(",")]
        print("| videos | pipeline peak RSS (MB) | videos/s |\n|---|---|---|")
        for n in sizes:
            ingest = make_corpus(root / f"rss{n}", n, 2.0, 64, 10, 1.0)
            with PeakRSS() as rss:
                summary = run_embed(str(ingest), "clip4clip-meanP-tiny", str(root / f"emb{n}"),
                                    sampling={"num_clips": 2, "frames_per_clip": 2}, batch_size=32,
                                    progress_every=30)
            print(f"| {n} | {rss.peak / 2**20:.0f} | {summary['videos_per_s']:.1f} |", flush=True)
        return 0

    ingest = make_corpus(root / "corpus", args.n, args.duration, args.size, args.fps, 1.0)
    samples = list(iter_samples(ingest))
    model, transform, _ = build_encoder(args.model)
    model.eval()
    torch.set_num_threads(os.cpu_count())
    cfg = SamplingConfig(**sampling)
    decoded = []
    for _k, mp4, meta in samples:
        clip = sample_clips(mp4, cfg, size=transform.image_size, meta=meta)
        decoded.append((clip.frames, clip.mask))
    model_only = bench_model_only(model, transform, decoded, args.batch_size)
    seq_sparse = bench_sequential(model, transform, samples, sampling, full_decode=False)
    seq_full = None
    if not args.no_naive:
        seq_full = bench_sequential(model, transform, samples, sampling, full_decode=True)
    start = time.perf_counter()
    summary = run_embed(str(ingest), args.model, str(root / "emb"), sampling=sampling,
                        batch_size=args.batch_size, progress_every=30)
    wall = time.perf_counter() - start
    pipeline = summary["videos"] / wall
    print(f"\nmodel {args.model}, {len(samples)} videos ({args.duration:.0f} s, {args.size}px, "
          f"{args.fps} fps), sampling {sampling}, batch {args.batch_size}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    print("| path | videos/s | pipeline ÷ this |\n|---|---|---|")
    paths = [("model-only (pre-decoded)", model_only), ("sequential, sparse decode", seq_sparse),
             ("sequential, full decode (naive)", seq_full), ("pipeline (jobs.embed)", pipeline)]
    for name, rate in paths:
        if rate is None:
            continue
        print(f"| {name} | {rate:.2f} | {pipeline / rate:.2f}× |")
    # Output reaches the driver in blocks, so a rate "after the first output" is not a steady state on a
    # short run; the fixed start-up is reported instead.
    print(f"(pipeline wall {wall:.1f} s includes planning, the model build on the driver, actor start-up "
          f"and model load: {summary['startup_s']:.1f} s until the first embeddings reached the writer)")
    steady = summary.get("steady_videos_per_s") or 0.0
    print(f"(after the first output: {steady:.2f} videos/s = {steady / model_only:.2f}x model-only; output "
          "arrives in blocks, so this is only a steady state on corpora of several hundred videos)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

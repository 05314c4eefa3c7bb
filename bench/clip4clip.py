"""Throughput of the tiny retrieval configs on CPU (what the synthetic-corpus trainers and embedders run).

For each tiny model: embedding videos/s (eval, no grad) and training steps/s (loss + backward + AdamW), with
ratios against a baseline measured in the same run: open_clip's own ``CLIP.encode_image`` over the same
frames (the cost floor of any per-frame CLIP model) for embedding, and a meanP training step for training.

    python bench/clip4clip.py --threads 2 --batch 16 --frames 8 --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import BenchRecord, add_record_args, col, format_cell  # noqa: E402
from models import create_model  # noqa: E402
from runtime.threads import set_torch_threads  # noqa: E402

MODELS = [
    "clip4clip-meanP-tiny",
    "clip4clip-seqLSTM-tiny",
    "clip4clip-seqTransf-tiny",
    "clip4clip-tightTransf-tiny",
    "clip4clip-meanP-3d-tiny",
    "vidswin-tiny-cliptext",
]


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step_fn(model, x, captions):
    """One training step (loss + backward + AdamW) of ``model`` on ``x``, as a closure for :func:`timed`."""
    opt = torch.optim.AdamW(model.param_groups(1e-4))
    model.train()

    def step():
        opt.zero_grad()
        model.loss(x, None, captions).backward()
        opt.step()

    return step


def random_frames(transform, image_size: int, b: int, t: int) -> torch.Tensor:
    return transform(torch.randint(0, 256, (b, t, image_size + 8, image_size + 8, 3), dtype=torch.uint8))


def measure(args) -> tuple[dict, list[dict]]:
    """Baselines (open_clip encode_image, a meanP train step) and one row per model, same batch shape."""
    b, t = args.batch, args.frames
    captions = [f"a shape number {i} moves left" for i in range(b)]
    baseline_model, transform, _ = create_model("clip4clip-meanP-tiny")
    frames = random_frames(transform, baseline_model.image_size, b, t)
    with torch.no_grad():
        base_embed = timed(lambda: baseline_model.clip.encode_image(frames.flatten(0, 1)), args.repeats)
    base_train = timed(train_step_fn(baseline_model, frames, captions), args.repeats)
    base = {"encode_image_frames_per_s": b * t / base_embed, "meanP_train_step_ms": base_train * 1000}
    rows = []
    for name in args.models:
        model, tf, _ = create_model(name)
        x = random_frames(tf, model.image_size, b, t)
        model.eval()
        with torch.no_grad():
            embed = timed(lambda m=model, x=x: m.encode_video(x), args.repeats)
        train = timed(train_step_fn(model, x, captions), args.repeats)
        rows.append({"model": name, "embed_videos_per_s": b / embed,
                     "embed_vs_encode_image": embed / base_embed, "train_steps_per_s": 1 / train,
                     "train_step_vs_meanP": train / base_train})
    return base, rows


COLUMNS = [col("model", "model"), col("embed_videos_per_s", "embed videos/s", "{:.0f}"),
           col("embed_vs_encode_image", "embed time / encode_image", "{:.2f}"),
           col("train_steps_per_s", "train steps/s", "{:.2f}"),
           col("train_step_vs_meanP", "train step / meanP", "{:.2f}")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="*", default=MODELS)
    add_record_args(parser, "clip4clip")
    args = parser.parse_args(argv)
    record = BenchRecord.start("clip4clip", sys.argv[1:] if argv is None else argv)
    set_torch_threads(args.threads)
    torch.manual_seed(0)
    base, rows = measure(args)
    machine = platform.processor() or platform.machine()
    print(f"# machine: {machine}, torch {torch.__version__}, threads={args.threads}")
    print(f"# batch={args.batch} videos x {args.frames} frames; open_clip encode_image "
          f"{base['encode_image_frames_per_s']:.0f} frames/s, "
          f"meanP train step {base['meanP_train_step_ms']:.0f} ms")
    for r in rows:
        print(" | ".join(format_cell(r[c["key"]], c["fmt"]) for c in COLUMNS))
    record.extra.update(base, torch=torch.__version__, threads=args.threads)
    record.table(
        "models", columns=COLUMNS, rows=rows,
        sample_size=f"batch of {args.batch} random videos x {args.frames} frames, median of {args.repeats} "
                    f"timed runs after one warm-up, {args.threads} torch threads, random init",
        baseline=f"open_clip CLIP.encode_image over the same {args.batch * args.frames} frames "
                 f"({base['encode_image_frames_per_s']:.0f} frames/s) and one clip4clip-meanP-tiny training "
                 f"step ({base['meanP_train_step_ms']:.0f} ms), same run",
        filtering="none")
    record.write(args.json, note=args.note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

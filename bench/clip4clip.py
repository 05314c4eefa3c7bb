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

from models import create_model  # noqa: E402

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="*", default=MODELS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, t = args.batch, args.frames
    captions = [f"a shape number {i} moves left" for i in range(b)]

    baseline_model, transform, _ = create_model("clip4clip-meanP-tiny")
    s = baseline_model.image_size
    frames = transform(torch.randint(0, 256, (b, t, s + 8, s + 8, 3), dtype=torch.uint8))
    with torch.no_grad():
        base_embed = timed(lambda: baseline_model.clip.encode_image(frames.flatten(0, 1)), args.repeats)

    def train_step_fn(model, x):
        opt = torch.optim.AdamW(model.param_groups(1e-4))
        model.train()

        def step():
            opt.zero_grad()
            model.loss(x, None, captions).backward()
            opt.step()

        return step

    base_train = timed(train_step_fn(baseline_model, frames), args.repeats)
    machine = platform.processor() or platform.machine()
    print(f"# machine: {machine}, torch {torch.__version__}, threads={args.threads}")
    print(
        f"# batch={b} videos x {t} frames; open_clip encode_image {b * t / base_embed:.0f} frames/s, "
        f"meanP train step {base_train * 1000:.0f} ms"
    )
    print("| model | embed videos/s | embed time / encode_image | train steps/s | train step / meanP |")
    print("|---|---|---|---|---|")
    for name in args.models:
        model, tf, _ = create_model(name)
        x = tf(
            torch.randint(0, 256, (b, t, model.image_size + 8, model.image_size + 8, 3), dtype=torch.uint8)
        )
        model.eval()
        with torch.no_grad():
            embed = timed(lambda m=model, x=x: m.encode_video(x), args.repeats)
        train = timed(train_step_fn(model, x), args.repeats)
        ratios = f"{embed / base_embed:.2f} | {1 / train:.2f} | {train / base_train:.2f}"
        print(f"| {name} | {b / embed:.0f} | {ratios} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

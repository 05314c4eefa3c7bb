"""Generate the synthetic captioned-shapes corpus: ``python -m jobs.synth --output DIR --n N``."""

from __future__ import annotations

import argparse
import sys
import time

from pipeline.synthetic import PROFILES, generate_corpus


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.synth", description=__doc__)
    parser.add_argument("--output", required=True, help="output folder (videos/ + manifest.parquet/.csv)")
    parser.add_argument("--n", type=int, required=True, help="number of videos")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="frame side in px (odd sizes round up to even)")
    parser.add_argument("--fps", type=float, default=25.0)
    parser.add_argument("--keyframe-interval", type=float, default=1.0, help="seconds between keyframes")
    parser.add_argument("--min-duration", type=float, default=2.0, help="seconds")
    parser.add_argument("--max-duration", type=float, default=10.0, help="seconds")
    parser.add_argument("--profile", choices=PROFILES, default="full")
    parser.add_argument("--workers", type=int, default=1, help="parallel encoder processes")
    return parser


class ProgressPrinter:
    """Prints videos/s and ETA at most every ``interval_s`` seconds (and at the end)."""

    def __init__(self, interval_s: float = 2.0):
        self.interval_s = interval_s
        self.last = 0.0

    def __call__(self, stats: dict) -> None:
        now = time.perf_counter()
        if stats["done"] < stats["total"] and now - self.last < self.interval_s:
            return
        self.last = now
        rate = stats["done"] / max(stats["elapsed_s"], 1e-9)
        eta = (stats["total"] - stats["done"]) / rate if rate > 0 else float("inf")
        print(
            f"[synth] {stats['done']}/{stats['total']} videos "
            f"({stats['generated']} new, {stats['skipped']} kept)"
            f"  {rate:.1f} videos/s  ETA {eta:.0f}s",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        manifest = generate_corpus(
            args.output,
            n=args.n,
            seed=args.seed,
            min_duration=args.min_duration,
            max_duration=args.max_duration,
            size=args.size,
            fps=args.fps,
            keyframe_interval=args.keyframe_interval,
            profile=args.profile,
            workers=args.workers,
            progress=ProgressPrinter(),
        )
    except ValueError as exc:
        print(f"[synth] error: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    stats = manifest.attrs["generation_stats"]
    splits = manifest["split"].value_counts().to_dict()
    print(
        f"[synth] done: {len(manifest)} videos in {elapsed:.1f}s ({stats['generated']} generated, "
        f"{stats['skipped']} already present); {manifest['caption_class'].nunique()} caption classes; "
        f"splits {splits}; {manifest['duration'].sum():.0f}s of video at {manifest['width'].iloc[0]}px "
        f"-> {args.output}/manifest.parquet",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

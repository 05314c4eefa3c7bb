"""Generate the synthetic captioned-shapes corpus: ``python -m jobs.synth --output DIR --n N``."""

from __future__ import annotations

import argparse
import sys
import time

from runtime.progress import Progress, print_summary
from synthetic import LONG_DEFAULT_DURATION, PROFILES, corpus_summary, generate_corpus


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.synth", description=__doc__)
    parser.add_argument("--output", required=True, help="output folder (videos/ + manifest.parquet/.csv)")
    parser.add_argument("--n", type=int, required=True, help="number of videos")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="frame side in px (odd sizes round up to even)")
    parser.add_argument("--fps", type=float, default=25.0)
    parser.add_argument("--keyframe-interval", type=float, default=1.0, help="seconds between keyframes")
    parser.add_argument("--min-duration", type=float, default=None, help="seconds (2; profile long: 20)")
    parser.add_argument("--max-duration", type=float, default=None, help="seconds (10; profile long: 30)")
    parser.add_argument("--profile", choices=PROFILES, default="full",
                        help="long: 20-30 s videos with 2-3 timed events and a segments column")
    parser.add_argument("--workers", type=int, default=1, help="parallel encoder processes")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    low, high = LONG_DEFAULT_DURATION if args.profile == "long" else (2.0, 10.0)
    progress = Progress("synth", args.n, unit="videos", every_s=2.0)
    start = time.perf_counter()
    try:
        manifest = generate_corpus(
            args.output,
            n=args.n,
            seed=args.seed,
            min_duration=low if args.min_duration is None else args.min_duration,
            max_duration=high if args.max_duration is None else args.max_duration,
            size=args.size,
            fps=args.fps,
            keyframe_interval=args.keyframe_interval,
            profile=args.profile,
            workers=args.workers,
            progress=lambda s: progress.set_done(s["done"], f"({s['generated']} new, {s['skipped']} kept)"),
        )
    except ValueError as exc:
        print(f"[synth] error: {exc}", file=sys.stderr)
        return 2
    summary = corpus_summary(manifest, args.output, time.perf_counter() - start)
    print(
        f"[synth] done: {summary['videos']} videos in {summary['seconds']:.1f}s ({summary['generated']} "
        f"generated, {summary['skipped']} already present); {summary['caption_classes']} caption classes; "
        f"splits {summary['splits']}; {summary['video_seconds']:.0f}s of video at {summary['size']}px "
        f"-> {args.output}/manifest.parquet",
        flush=True,
    )
    print_summary("synth", summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

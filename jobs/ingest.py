"""`python -m jobs.ingest --input MANIFEST_OR_GLOB --output DIR_OR_URI ...`: raw videos -> WebDataset shards.

Thin wrapper over ``pipeline.ingest.run_ingest``; input and output are paths or URIs (``s3://bucket/prefix``;
endpoint and credentials from the standard ``AWS_*`` configuration). Exit 0 when the job finished (bad
inputs are recorded in ``OUT/errors.parquet``), 2 when the input cannot be read (or, with ``--on-error
raise``, at the first bad input), 1 when shard tasks died (rerun to finish).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.ingest import IngestIncompleteError, run_ingest
from runtime.errors import ERROR_POLICIES, InputError
from runtime.progress import print_summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.ingest", description=__doc__.splitlines()[0])
    p.add_argument(
        "--input", required=True, help="manifest (csv/tsv/jsonl/parquet), directory or glob; fsspec URI"
    )
    p.add_argument(
        "--output", required=True,
        help="output folder or URI, e.g. s3://bucket/vidsift/ingest (shards/, errors.parquet, manifest.json)",
    )
    p.add_argument("--workers", type=int, default=None, help="concurrent shard tasks (default: cluster CPUs)")
    p.add_argument("--samples-per-shard", type=int, default=64)
    p.add_argument(
        "--max-shard-bytes", type=int, default=1 << 30, help="cut shards by declared input bytes too"
    )
    p.add_argument(
        "--transcode",
        action="store_true",
        default=None,
        help="re-encode to H.264 (implied by --short-side/--fps/--keyframe-interval)",
    )
    p.add_argument("--short-side", type=int, default=None, help="transcode: shorter side in pixels")
    p.add_argument("--fps", type=float, default=None, help="transcode: output frame rate")
    p.add_argument(
        "--keyframe-interval", type=float, default=None, help="transcode: seconds between keyframes"
    )
    p.add_argument("--max-bytes", type=int, default=2 << 30, help="larger inputs are errors (too_large)")
    p.add_argument(
        "--max-pixels", type=int, default=None, help="width*height above this is an error (too_large)"
    )
    p.add_argument("--decode-check", action="store_true", help="also decode each video's first keyframe")
    p.add_argument(
        "--task-retries", type=int, default=2, help="Ray retries of a shard task whose worker died"
    )
    p.add_argument("--no-fsync", action="store_true", help="skip fsync of local files before their rename")
    p.add_argument(
        "--on-error", choices=ERROR_POLICIES, default="record",
        help="bad inputs: record them in errors.parquet and go on (default), or stop at the first",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = run_ingest(
            args.input,
            args.output,
            samples_per_shard=args.samples_per_shard,
            workers=args.workers,
            transcode=args.transcode,
            max_shard_bytes=args.max_shard_bytes,
            short_side=args.short_side,
            fps=args.fps,
            keyframe_interval=args.keyframe_interval,
            max_bytes=args.max_bytes,
            max_pixels=args.max_pixels,
            decode_check=args.decode_check,
            task_retries=args.task_retries,
            fsync=not args.no_fsync,
            progress=not args.quiet,
            on_error=args.on_error,
        )
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except IngestIncompleteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_summary("ingest", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

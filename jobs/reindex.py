"""Nightly incremental reindex: ingest + embed only what changed in a source, update the index, publish.

    python -m jobs.reindex --source MANIFEST_OR_GLOB --workdir DIR_OR_URI [--config YAML] [--model NAME]
                           [--pretrained CKPT_URI | --allow-random-init] [--retry-failed] [--dry-run]

Exit codes: 0 published (or nothing to do), 1 failed (validation, a step died), 2 bad input,
3 another run holds the lock. See docs/ops.md.
"""

from __future__ import annotations

import argparse
import json
import sys

from models import PretrainedWeightsError
from runtime.errors import InputError
from runtime.progress import print_summary
from workflows.reindex import LockHeldError, ReindexError, ReindexInputError, load_config, run_reindex


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vidsift reindex", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--source", required=True, help="manifest (csv/tsv/jsonl/parquet), directory or glob of videos"
    )
    p.add_argument(
        "--workdir",
        required=True,
        help="working dir (path or s3://, gs:// URI) holding state/, ingest/, embeddings/, index/, the lock",
    )
    p.add_argument("--config", default=None, help="YAML config (see configs/reindex.yaml)")
    p.add_argument("--model", default=None, help="registered model name (overrides the config)")
    p.add_argument("--pretrained", default=None, help="trained checkpoint URI (overrides the config's)")
    p.add_argument("--allow-random-init", action="store_true",
                   help="build with a seeded random model when no checkpoint is set (tests only)")
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="retry videos that failed ingest/embed before even though their content is unchanged",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="only print the delta (no lock is kept, nothing written)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines, only the summary")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
        summary = run_reindex(
            args.source,
            args.workdir,
            config=config,
            model=args.model,
            pretrained=args.pretrained,
            allow_random_init=args.allow_random_init,
            retry_failed=args.retry_failed,
            dry_run=args.dry_run,
            crash_mode="exit",
            progress=not args.quiet,
        )
    except LockHeldError as exc:
        print(f"vidsift reindex: {exc}", file=sys.stderr)
        return 3
    except (InputError, ReindexInputError, PretrainedWeightsError, FileNotFoundError, KeyError,
            ValueError) as exc:
        print(f"vidsift reindex: error: {exc}", file=sys.stderr)
        return 2
    except ReindexError as exc:
        print(f"vidsift reindex: FAILED: {exc}", file=sys.stderr)
        return 1
    if args.dry_run:
        print(json.dumps(summary, indent=1, default=str))
    else:
        print_summary("reindex", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

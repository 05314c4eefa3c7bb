"""The `vidsift` console script: `vidsift <stage> [args]` runs `python -m jobs.<stage> [args]`.

Every stage is a thin module in `jobs/` exposing ``main(argv=None) -> int``; this dispatcher only maps names,
so `vidsift ingest ...`, `python -m jobs.ingest ...` and `ray job submit -- python -m jobs.ingest ...` run the
same code.
"""

from __future__ import annotations

import importlib
import sys

STAGES = {
    "synth": "generate the synthetic motion corpus (mp4 + manifest)",
    "ingest": "shard raw videos into WebDataset tars with Ray",
    "train": "fine-tune an encoder end to end with Ray Train",
    "embed": "batch-embed shards into Parquet with Ray Data",
    "index": "build / update / query FAISS indexes",
    "caption": "caption shards and score captions with SwinBERT",
    "reindex": "nightly incremental reindex of a video source",
    "serve": "HTTP search service + page over an index (hot-swaps new versions)",
    "demo": "run the whole pipeline on a synthetic corpus with local Ray",
}


def usage() -> str:
    """The top-level help text listing every stage."""
    lines = ["usage: vidsift <stage> [--help] [args...]", "", "stages:"]
    lines += [f"  {name:<8} {text}" for name, text in STAGES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to ``jobs.<stage>.main``; unknown stages are a usage error (exit 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"vidsift: unknown stage {stage!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"jobs.{stage}")
    result = module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

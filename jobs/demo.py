"""The main job: the whole vidsift pipeline on Ray over a synthetic corpus, with an HTML report.

    python -m jobs.demo [--workdir runs/demo] [--config configs/demo.yaml] [--n 600]

synth → ingest → train the retrieval encoder (Ray Train; configs/demo.yaml trains CLIP4Clip meanP with 3-D
tube patches, ``configs/train/tiny-meanP-3d.yaml``) → embed (Ray Data) → index (FAISS) → caption (SwinBERT,
trained with the same trainer) → query. Prints example queries with their top hits, the retrieval and
caption metrics, and writes ``WORKDIR/report.html`` (queries, hit thumbnails, timestamps, generated
captions). Every stage is idempotent, so a rerun over the same workdir only redoes what is missing. The run
is ``workflows.demo.run_demo``; this module only parses flags and prints the summary.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime.progress import print_summary
from workflows.demo import DEFAULT_CONFIG, REPO, load_demo_config, run_demo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vidsift demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="runs/demo", help="everything the demo writes goes here")
    p.add_argument("--config", default=None, help=f"demo recipe (default {DEFAULT_CONFIG.relative_to(REPO)})")
    p.add_argument("--n", type=int, default=None, help="number of synthetic videos")
    p.add_argument("--queries", type=int, default=None, help="example queries to show")
    args = p.parse_args(argv)
    cfg = load_demo_config(args.config, {"n": args.n, "queries": args.queries})
    metrics = run_demo(args.workdir, cfg)
    workdir = Path(args.workdir).resolve()
    print_summary("demo", {"workdir": str(workdir), "report": str(workdir / "report.html"),
                           "query_hit@1": metrics["query_hit@1"], "vectors": metrics["index"]["count"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())

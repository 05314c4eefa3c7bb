"""The main job: the whole vidsift pipeline on Ray over a synthetic corpus, with an HTML report.

    python -m jobs.demo [--workdir runs/demo] [--config configs/demo.yaml] [--n 2400] [--port 8000]
    python -m jobs.demo --no-serve ...        # CI and tests: end after the report instead of serving

synth → ingest → train the retrieval encoder (Ray Train; configs/demo.yaml trains CLIP4Clip meanP with 4 px
3-D tube patches, ``configs/train/tiny-meanP-3d-p4.yaml``) → embed (Ray Data) → index (FAISS) → caption
(SwinBERT, trained with the same trainer) → query. Prints example queries with their top hits and a table of
the retrieval and caption metrics, writes ``WORKDIR/report.html`` (queries, hit thumbnails, timestamps,
generated captions) and ``WORKDIR/metrics.json``, then serves the search page over the index it built and
prints its URL (Ctrl-C stops it). Every stage is idempotent, so a rerun over the same workdir only redoes
what is missing. The run is ``workflows.demo.run_demo``; this module only parses flags and prints the
summary.
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
    p.add_argument("--no-serve", action="store_true", help="end after the report (CI, tests)")
    p.add_argument("--host", default=None, help="where the search page listens (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="the search page's port (default 8000)")
    args = p.parse_args(argv)
    cfg = load_demo_config(args.config, {"n": args.n, "queries": args.queries, "host": args.host,
                                         "port": args.port, "serve": False if args.no_serve else None})
    metrics = run_demo(args.workdir, cfg)
    workdir = Path(args.workdir).resolve()
    test = metrics.get("retrieval_test") or {}
    print_summary("demo", {"workdir": str(workdir), "report": str(workdir / "report.html"),
                           "test t2v R@1": test.get("t2v_R@1"), "query_hit@1": metrics["query_hit@1"],
                           "vectors": metrics["index"]["count"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())

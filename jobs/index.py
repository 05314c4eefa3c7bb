"""``python -m jobs.index {build,add,delete,query,info,check}``: build and maintain vidsift FAISS indexes.

Every path may be a URI (s3://, gs://, file://); each command and its flags: docs/index.md ("Commands")."""

from __future__ import annotations

import argparse
import json
import os
import sys

from index import build as index_build
from index import store, upsert
from index.query import VideoIndex


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.index", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="full (re)build from an embeddings directory")
    b.add_argument("--embeddings", required=True, help="embeddings OUT dir (or its model_id=... dir)")
    b.add_argument("--output", required=True, help="index directory (NAME)")
    b.add_argument("--factory", default=None, help="FAISS factory string (default: chosen automatically)")
    b.add_argument("--memory", dest="memory_budget", default=index_build.DEFAULT_MEMORY, help="e.g. 4GB")
    b.add_argument("--recall", dest="recall_target", type=float, default=index_build.DEFAULT_RECALL)
    b.add_argument("-k", type=int, default=index_build.DEFAULT_K, help="k of the recall target")
    b.add_argument("--shards", type=int, default=1, help="build N shards in parallel as Ray tasks")
    b.add_argument("--distributed", action="store_true", help="one on-disk index built by Ray tasks")
    b.add_argument("--slice-rows", type=int, default=index_build.DEFAULT_SLICE_ROWS, help="rows per Ray task")
    b.add_argument("--probes", dest="num_probes", type=int, default=index_build.DEFAULT_PROBES)
    b.add_argument("--ray-address", default=None, help="Ray of --shards / --distributed ($RAY_ADDRESS/local)")
    b.add_argument("--text-queries", action="append", help="caption embeddings to tune on (or 'none')")
    b.add_argument("--query-log", action="append", help="a service's query log (JSONL) to tune on")
    b.add_argument("--no-text-rule", choices=index_build.NO_TEXT_RULES,
                   default=index_build.DEFAULT_NO_TEXT_RULE,
                   help="without text queries: tune on off-data probes or held-out video vectors")
    a = sub.add_parser("add", help="add (upsert) embeddings as a delta shard: no copy, no retraining")
    a.add_argument("--embeddings", required=True)
    a.add_argument("--output", "--index", dest="output", required=True)
    a.add_argument("--no-upsert", action="store_true", help="reject rows of videos already indexed")
    d = sub.add_parser("delete", help="remove videos from the CURRENT version")
    d.add_argument("--output", "--index", dest="output", required=True)
    d.add_argument("--video-ids", nargs="+", required=True)
    for sub_parser in (b, a, d):
        sub_parser.add_argument("--keep", type=int, default=3, help="versions to retain")
        sub_parser.add_argument("--retries", type=int, default=2, help="redo after a PublishConflict")
    for sub_parser in (b, a):
        sub_parser.add_argument("--batch-size", type=int, default=65536)
    q = sub.add_parser("query", help="text query against the CURRENT version")
    q.add_argument("--index", required=True)
    q.add_argument("--text", action="append", required=True, help="query text (repeatable)")
    q.add_argument("-k", type=int, default=10)
    q.add_argument("--aggregate", choices=("max", "mean"), default="max")
    q.add_argument("--pretrained", default=None, help="text encoder checkpoint URI (default: index.json's)")
    q.add_argument("--allow-random-init", action="store_true", help="permit a seeded random text encoder")
    i = sub.add_parser("info", help="print the CURRENT version's index.json and the version list")
    i.add_argument("--index", "--output", dest="index", required=True)
    c = sub.add_parser("check", help="exit 3 when the index needs a full rebuild (needs_retrain)")
    c.add_argument("--index", "--output", dest="index", required=True)
    c.add_argument("--growth-factor", type=float, default=index_build.DEFAULT_GROWTH_FACTOR)
    c.add_argument("--recall", type=float, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "build" and args.ray_address:
        os.environ["RAY_ADDRESS"] = args.ray_address  # connect_ray (index.sharded / distributed) joins it
    try:
        if args.command == "build":
            texts = None if args.text_queries == ["none"] else args.text_queries or index_build.AUTO
            names = ("factory", "memory_budget", "recall_target", "k", "shards", "num_probes", "query_log",
                     "distributed", "slice_rows", "batch_size", "keep", "no_text_rule")
            opts = {name: getattr(args, name) for name in names}
            _print(store.retry_on_conflict(args.retries, index_build.build_index, args.embeddings,
                                           args.output, text_queries=texts, **opts))
        elif args.command == "add":
            _print(store.retry_on_conflict(args.retries, upsert.upsert_embeddings, args.output,
                                           args.embeddings, batch_size=args.batch_size, keep=args.keep,
                                           upsert=not args.no_upsert))
        elif args.command == "delete":
            _print(store.retry_on_conflict(args.retries, index_build.delete_videos, args.output,
                                           args.video_ids, keep=args.keep))
        elif args.command == "query":
            return _query(args)
        elif args.command == "info":
            print(json.dumps(store.describe(args.index), indent=2, default=str))
        elif args.command == "check":
            needed, reasons = index_build.needs_retrain(args.index, growth_factor=args.growth_factor,
                                                        recall_target=args.recall)
            print(json.dumps({"needs_retrain": needed, "reasons": reasons}))
            return 3 if needed else 0
    except (FileNotFoundError, ValueError, TypeError, KeyError, *store.PUBLISH_REFUSALS) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4 if isinstance(exc, store.PublishConflict) else 2  # 4: another writer published first
    return 0


def _query(args: argparse.Namespace) -> int:
    from models import PretrainedWeightsError  # lazy: only text queries need torch (build/info do not)

    try:
        vi = VideoIndex.open(args.index, pretrained=args.pretrained, allow_random_init=args.allow_random_init)
        for text, hits in zip(args.text, vi.search(list(args.text), k=args.k, aggregate=args.aggregate)):
            print(json.dumps({"query": text, "hits": [h.to_dict() for h in hits]}))
    except PretrainedWeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _print(meta: dict) -> None:
    print(json.dumps(store.summary(meta), indent=2))


if __name__ == "__main__":
    sys.exit(main())

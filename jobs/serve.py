"""``python -m jobs.serve --index URI``: the text-to-video search service (HTTP API + page) over an index.

Examples (the index and shards may be URIs: s3://, gs://, file://; previews and metadata come from the shard
tars the index's lineage records, generated captions from the caption runs recorded under it (``jobs.caption
--index``); ``--shards`` and ``--captions`` override them)::
    python -m jobs.serve --index runs/demo/index
    python -m jobs.serve --index s3://bucket/index --pretrained s3://bucket/train/model.pt --host 0.0.0.0 \
        --auth-token-file /etc/vidsift/token --allowed-host search.example.org
    python -m jobs.serve --index OUT/index --allow-random-init --ray-serve   # same app behind Ray Serve
    python -m jobs.serve --index OUT/index --ray-serve --fanout-shards-per-deployment 1 --shard-replicas 2
Then open http://HOST:PORT/ or ``curl 'http://HOST:PORT/search?q=a+red+circle&k=5'`` (docs/serve.md)."""

from __future__ import annotations

import argparse
import sys

from models import PretrainedWeightsError
from workflows.serve import serve_index
from workflows.serve.pool import PoolConfig
from workflows.serve.queries import Limits

LIMITS, POOL = Limits(), PoolConfig()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.serve", description=__doc__.splitlines()[0])
    p.add_argument("--index", required=True, help="index directory or URI (its CURRENT version is served)")
    p.add_argument("--pretrained", default=None, help="text encoder checkpoint URI (default: index.json's)")
    p.add_argument("--allow-random-init", action="store_true", help="permit a seeded random text encoder")
    p.add_argument("--shards", action="append", default=[],
                   help="ingested shards folder/URI (repeatable): video metadata filters and previews; "
                        "default: the shard tars index.json's lineage records (this overrides them)")
    p.add_argument("--captions", action="append", default=[],
                   help="jobs.caption output folder/URI (repeatable): each hit carries its generated "
                        "caption; default: the caption runs recorded under the index (jobs.caption --index)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-k", type=int, default=LIMITS.max_k, help="largest k a request may ask for")
    p.add_argument("--max-depth", type=int, default=LIMITS.max_depth, help="largest offset + k")
    p.add_argument("--max-ranked", type=int, default=LIMITS.max_ranked,
                   help="largest queries x (offset + k) of one request")
    p.add_argument("--max-where", type=int, default=LIMITS.max_where, help="most where= conditions")
    p.add_argument("--search-threads", type=int, default=POOL.light_workers,
                   help="threads searching requests of a small ranking (a heavy request gets 1 more)")
    p.add_argument("--search-queue", type=int, default=POOL.light_queue,
                   help="requests that may wait for those threads; one more is a 503 with Retry-After")
    p.add_argument("--deadline-s", type=float, default=POOL.deadline_s,
                   help="seconds a search may take (queued or running); later it is a 503")
    p.add_argument("--heavy-share", type=float, default=POOL.heavy_share,
                   help="the most of its time heavy searches may take; later ones are a 503 (1: no limit)")
    p.add_argument("--heavy-burst-s", type=float, default=POOL.heavy_burst_s,
                   help="seconds of heavy searches an idle service runs back to back")
    p.add_argument("--auth-token-file", default=None,
                   help="file holding a bearer token every API request must send (Authorization: Bearer)")
    p.add_argument("--allowed-host", action="append", default=[],
                   help="Host header name answered (repeatable; default: the --host name, loopback aliases)")
    p.add_argument("--insecure-open", action="store_true",
                   help="serve a non-loopback --host without --auth-token-file (anyone who reaches it)")
    p.add_argument("--expose-sources", action="store_true", help="show the ingest source URIs of videos")
    p.add_argument("--preview-cache-mb", type=int, default=256, help="size cap of the preview cache")
    p.add_argument("--poll-s", type=float, default=5.0, help="seconds between CURRENT checks (0: never)")
    p.add_argument("--preview-cache", default=None, help="folder for cached previews (default: $TMPDIR)")
    p.add_argument("--torch-threads", type=int, default=1, help="intra-op threads of the text encoder")
    p.add_argument("--ray-serve", action="store_true", help="run the app as a Ray Serve deployment")
    p.add_argument("--fanout-shards-per-deployment", type=int, default=0,
                   help="with --ray-serve: index shards per shard deployment, searched by fan-out (0: off)")
    p.add_argument("--shard-replicas", type=int, default=1, help="replicas of each shard deployment")
    p.add_argument("--shard-cpus", type=float, default=1.0,
                   help="CPUs each shard replica reserves (fractions share a core: 0.25 fits 4 on 2 cores "
                        "beside the ingress's 1)")
    p.add_argument("--query-log", default=None,
                   help="folder/URI to log query texts to (JSONL; jobs.index build --query-log reads it)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        limits = Limits(args.max_k, args.max_depth, args.max_ranked, args.max_where)
        pool = PoolConfig(light_workers=args.search_threads, light_queue=args.search_queue,
                          deadline_s=args.deadline_s, heavy_share=args.heavy_share,
                          heavy_burst_s=args.heavy_burst_s)
        return serve_index(args.index, host=args.host, port=args.port, ray_serve=args.ray_serve,
                           allowed_hosts=args.allowed_host, auth_token_file=args.auth_token_file,
                           insecure_open=args.insecure_open, limits=limits, pool=pool,
                           shards_per_deployment=args.fanout_shards_per_deployment,
                           shard_replicas=args.shard_replicas, shard_cpus=args.shard_cpus,
                           pretrained=args.pretrained, allow_random_init=args.allow_random_init,
                           shards=args.shards, poll_s=args.poll_s, expose_sources=args.expose_sources,
                           cache_dir=args.preview_cache, preview_cache_bytes=args.preview_cache_mb << 20,
                           torch_threads=args.torch_threads, query_log=args.query_log, captions=args.captions)
    # A missing index, missing weights or a bad flag value: one clear line, not a traceback.
    except (FileNotFoundError, ValueError, PretrainedWeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

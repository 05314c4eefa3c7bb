"""Batch-embed a shard corpus into Parquet with Ray Data (incremental, idempotent).

    python -m jobs.embed --shards DIR|URI --model NAME --pretrained CKPT_URI --output DIR|URI

read shards → skip already-embedded keys → decode + sparse sample (CPU actors) → encoder actor pool
(``num_gpus=1`` per actor when the cluster has GPUs) → the workers write one ``part-<shard>.parquet`` per
shard under ``OUTPUT/model_id=<id>/`` (any store: a path, ``s3://``, ``gs://``). Rerunning with the same
shards and model embeds nothing. Trained weights are required (``--pretrained``, a checkpoint on any store);
``--allow-random-init`` embeds with a seeded random init on purpose (tests, benchmarks). Exit 2 on a usage
error (no weights, no shards). The run itself is ``workflows.embed.run_embed``; this module only parses
flags and prints the summary.
"""

from __future__ import annotations

import argparse
import sys

from models import PretrainedWeightsError
from runtime.progress import print_summary
from workflows.embed import run_embed


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vidsift embed", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, help="shard dir (or its shards/ folder), glob or brace pattern")
    p.add_argument("--model", required=True, help="registered model name (see models.list_models())")
    p.add_argument("--pretrained", default=None,
                   help="trained checkpoint (path or URI on any store) / weights tag; required unless "
                        "--allow-random-init")
    p.add_argument("--allow-random-init", action="store_true",
                   help="without --pretrained, embed with a seeded random init (tests, benchmarks)")
    p.add_argument("--output", required=True, help="embeddings output folder (path or s3:// / gs:// URI)")
    p.add_argument("--batch-size", type=int, default=16, help="videos per encoder batch")
    p.add_argument("--encoders", type=int, default=1, help="encoder actors (one GPU each when GPUs exist)")
    p.add_argument("--decoders", type=int, default=None, help="decode actors (CPU)")
    p.add_argument("--num-clips", type=int, default=None)
    p.add_argument("--frames-per-clip", type=int, default=None)
    p.add_argument("--stride", type=int, default=None)
    p.add_argument("--fps", type=float, default=None)
    p.add_argument("--backend", choices=["torchcodec", "pyav"], default=None)
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--encoder-threads", type=int, default=None,
                   help="torch threads per CPU encoder actor (default: all cores of the node)")
    p.add_argument("--with-text", action="store_true", help="also embed the ingest captions (evaluation)")
    p.add_argument("--windows", action="store_true",
                   help="clip rows over dense sliding windows (moments; docs/moments.md)")
    p.add_argument("--window-s", type=float, default=None, help="window seconds (implies --windows)")
    p.add_argument("--stride-s", type=float, default=None, help="window stride seconds (implies --windows)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {"num_clips": args.num_clips, "frames_per_clip": args.frames_per_clip, "stride": args.stride,
                 "fps": args.fps}
    try:
        summary = run_embed(args.shards, args.model, args.output, pretrained=args.pretrained,
                            sampling=overrides, batch_size=args.batch_size, encoders=args.encoders,
                            decoders=args.decoders, backend=args.backend, dtype=args.dtype,
                            with_text=args.with_text, encoder_threads=args.encoder_threads,
                            allow_random_init=args.allow_random_init, windows=args.windows,
                            window_s=args.window_s, stride_s=args.stride_s)
    except (FileNotFoundError, KeyError, ValueError, PretrainedWeightsError) as exc:
        print(f"vidsift embed: error: {exc}", file=sys.stderr)
        return 2
    print_summary("embed", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

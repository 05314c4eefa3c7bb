"""Caption a shard corpus with a SwinBERT checkpoint (Ray Data), optionally scoring the ingest captions.

    python -m jobs.caption --shards DIR|URI --pretrained CKPT --output DIR|URI [--score-captions] [--beam N]
        [--index INDEX]   # record the output under that index: its search service shows the captions

read shards → decode + sparse sample (``DecodeClipsStage``, CPU) → ``CaptionStage`` (an actor holding the
model) → ``OUTPUT/captions.parquet`` (``video_id``, ``key``, ``caption``, ``score``, ``model_id``) and, with
``--score-captions``, ``OUTPUT/caption_scores.parquet`` (``video_id``, ``caption``, ``score``, ``model_id``;
one row per ingest caption). Samples that cannot be decoded go to ``OUTPUT/errors.parquet`` (``key``,
``video_id``, ``reason``, ``message``): every input sample ends in exactly one of the two; a failure of
the model itself is a bug and stops the run.
Outputs are written atomically (each one complete object, on any store: a path, ``s3://``, ``gs://``) and
rewritten whole, so reruns give the same files. Trained weights are required: without ``--pretrained`` the
job exits 2 naming it, unless ``--allow-random-init`` (``--model``, default ``swinbert-tiny``, from a seeded
random init: tests, benchmarks).

The run is ``workflows.caption.run_caption`` (stages in ``pipeline.captioning``); ``workflows.rerank``
turns the captioner into a ``VideoIndex.search(..., rerank=...)`` hook.
"""

from __future__ import annotations

import argparse
import sys

from models import PretrainedWeightsError
from runtime.progress import print_summary
from workflows.caption import run_caption


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vidsift caption", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, help="shard dir (or its shards/ folder), glob or brace pattern")
    p.add_argument("--pretrained", default=None,
                   help="SwinBERT vidsift checkpoint (models.save_checkpoint), path or URI on any store; "
                        "required unless --allow-random-init")
    p.add_argument("--allow-random-init", action="store_true",
                   help="without --pretrained, caption with a seeded random --model (tests, benchmarks)")
    p.add_argument("--model", default=None, help="captioner to build without a checkpoint (swinbert-tiny)")
    p.add_argument("--output", required=True,
                   help="output folder (path or URI) for captions.parquet / errors.parquet")
    p.add_argument(
        "--score-captions",
        action="store_true",
        help="also score every ingest caption → caption_scores.parquet",
    )
    p.add_argument("--beam", type=int, default=1, help="beam size (1 = greedy)")
    p.add_argument("--max-length", type=int, default=None, help="max generated tokens (default: model's)")
    p.add_argument("--min-length", type=int, default=3, help="no end-of-caption before this many tokens")
    p.add_argument("--split", default=None, help="only samples of this split (train/val/test)")
    p.add_argument("--batch-size", type=int, default=8, help="videos per decode/caption batch")
    p.add_argument("--num-clips", type=int, default=1, help="clips the model's frames are spread over")
    p.add_argument("--decoders", type=int, default=1, help="decode actors (CPU)")
    p.add_argument("--backend", choices=["torchcodec", "pyav"], default=None)
    p.add_argument("--index", default=None,
                   help="an index (jobs.index output) to record these captions under: its search service "
                        "(jobs.serve --index) then shows them without --captions")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = run_caption(
            args.shards,
            args.pretrained,
            args.output,
            score_captions=args.score_captions,
            beam_size=args.beam,
            max_length=args.max_length,
            min_length=args.min_length,
            split=args.split,
            batch_size=args.batch_size,
            num_clips=args.num_clips,
            decoders=args.decoders,
            backend=args.backend,
            model_name=args.model,
            allow_random_init=args.allow_random_init,
            index=args.index,
        )
    except (FileNotFoundError, KeyError, ValueError, PretrainedWeightsError) as exc:
        print(f"vidsift caption: error: {exc}", file=sys.stderr)
        return 2
    print_summary("caption", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

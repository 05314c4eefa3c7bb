"""Fine-tune an encoder end to end with Ray Train.

``python -m jobs.train --shards DIR --model NAME --output DIR [--config YAML] [--workers N] [--resume]``.

The recipe comes from ``--config YAML`` (see ``configs/train/``); flags given on the command line override it.
Writes ``OUTPUT/model.pt`` (load with ``models.create_model(NAME, pretrained="OUTPUT/model.pt")``),
``OUTPUT/metrics.jsonl``, ``OUTPUT/summary.json`` and the Ray Train run (checkpoints) under ``OUTPUT/ray/``.
``--shards``, ``--output``, ``--pretrained`` and ``--backbone-pretrained`` take paths or URIs on any store
(``s3://bucket/runs/x``: checkpoints, resume and ``model.pt`` all on S3; credentials from ``AWS_*``).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.training import TASKS, load_train_config, with_sampling_flags
from runtime.progress import print_summary
from workflows.train import run_eval_only, run_training


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__)
    p.add_argument("--shards", required=True, help="ingest output (folder or URI) or its shards/")
    p.add_argument("--model", default=None, help="registered model name (overrides `model:` in the config)")
    p.add_argument("--output", required=True, help="run folder/URI: model.pt, metrics.jsonl, ray/")
    p.add_argument("--config", default=None, help="training recipe YAML (configs/train/*.yaml)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (data-parallel ranks)")
    p.add_argument("--task", choices=TASKS, default=None)
    p.add_argument("--pretrained", default=None, help="initial weights (open_clip tag or checkpoint URI)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None, help="stop with a checkpoint after this many steps")
    p.add_argument("--batch-size", type=int, default=None, help="per worker")
    p.add_argument("--eval-batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--backbone-lr-scale", type=float, default=None, help="backbone lr = lr * this")
    p.add_argument("--backbone-pretrained", default=None,
                   help="init only the video backbone from this checkpoint URI (SwinBERT: a Video Swin or "
                        "VidSwin dual-encoder model.pt)")
    p.add_argument("--backbone-freeze-fraction", type=float, default=None,
                   help="hold the backbone lr at 0 for this fraction of the steps")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--warmup-fraction", type=float, default=None)
    p.add_argument("--grad-clip", type=float, default=None, help="max gradient norm (0 = off)")
    p.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default=None)
    p.add_argument("--grad-checkpointing", action="store_true", default=None)
    p.add_argument("--size", type=int, default=None, help="decode side in px")
    p.add_argument("--train-clips", type=int, default=None, help="clips per training video (N)")
    p.add_argument("--train-frames", type=int, default=None, help="frames per training clip (T)")
    p.add_argument("--eval-clips", type=int, default=None, help="clips per evaluation video (N)")
    p.add_argument("--eval-frames", type=int, default=None, help="frames per evaluation clip (T)")
    p.add_argument("--sample-fps", type=float, default=None, help="frame rate inside a clip (train and eval)")
    p.add_argument("--dataloader-workers", type=int, default=None, help="decode processes per Ray worker")
    p.add_argument("--cpus-per-worker", type=float, default=None)
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps (0 = end of each epoch)")
    p.add_argument("--eval-every", type=int, default=None, help="epochs between validations (0 = none)")
    p.add_argument("--log-every", type=int, default=None)
    p.add_argument("--segments", action="store_true", default=None,
                   help="train/evaluate on timed captions: one sample per segment, clips inside its span")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue the run in --output")
    p.add_argument("--max-failures", type=int, default=0, help="worker failures to recover from (Ray Train)")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate OUTPUT/model.pt (or --pretrained) on the test split (eval sampling); "
                        "writes OUTPUT/eval-<split>-<N>x<T>.json")
    p.add_argument("--split", default=None, help="--eval-only: split to evaluate (default: test_split)")
    p.add_argument("--use-gpu", choices=("auto", "yes", "no"), default="auto")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {
        "model": args.model,
        "task": args.task,
        "pretrained": args.pretrained,
        "epochs": args.epochs,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "eval_batch_size": args.eval_batch_size,
        "lr": args.lr,
        "backbone_lr_scale": args.backbone_lr_scale,
        "backbone_freeze_fraction": args.backbone_freeze_fraction,
        "backbone_pretrained": args.backbone_pretrained,
        "weight_decay": args.weight_decay,
        "warmup_fraction": args.warmup_fraction,
        "grad_clip": args.grad_clip,
        "amp": args.amp,
        "grad_checkpointing": args.grad_checkpointing,
        "size": args.size,
        "dataloader_workers": args.dataloader_workers,
        "cpus_per_worker": args.cpus_per_worker,
        "checkpoint_every": args.checkpoint_every,
        "eval_every": args.eval_every,
        "log_every": args.log_every,
        "seed": args.seed,
        "segments": args.segments,
    }
    try:
        cfg = with_sampling_flags(load_train_config(args.config, overrides), args.train_clips,
                                  args.train_frames, args.eval_clips, args.eval_frames, args.sample_fps)
        if args.eval_only:  # writes OUTPUT/eval-<split>-<N>x<T>.json and prints its [eval] line
            run_eval_only(args.shards, args.output, cfg, args.pretrained, args.split)
            return 0
        use_gpu = {"auto": None, "yes": True, "no": False}[args.use_gpu]
        summary = run_training(
            args.shards, args.output, cfg, workers=args.workers, resume=args.resume, use_gpu=use_gpu,
            max_failures=args.max_failures,
        )
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as exc:
        print(f"jobs.train: error: {exc}", file=sys.stderr)
        return 2
    print_summary("train", {k: summary[k] for k in ("model", "steps", "epochs_done", "wall_s", "model_path")})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Batch-embed a shard corpus into Parquet with Ray Data (incremental, idempotent).

    python -m jobs.embed --shards DIR --model NAME [--pretrained CKPT] --output DIR

read shards → skip already-embedded keys → decode + sparse sample (CPU tasks) → encoder actor pool
(``num_gpus=1`` per actor when the cluster has GPUs) → one ``part-<shard>.parquet`` per shard under
``OUTPUT/model_id=<id>/``. Rerunning with the same shards and model embeds nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from jobs.cli import print_summary
from pipeline.embedding import (
    DecodeShardClipsStage,
    EncodeClipsStage,
    Progress,
    ShardPartWriter,
    build_encoder,
    consolidate_errors,
    model_partition,
    plan_shards,
    write_model_card,
)

DEFAULT_SAMPLING = {"num_clips": 4, "frames_per_clip": 4, "mode": "eval"}


def resolve_sampling(pretrained: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """Sampling for embedding: the training run's eval sampling when the checkpoint records it, then flags."""
    from models.registry import recorded_eval_sampling

    sampling = dict(DEFAULT_SAMPLING)
    sampling.update(recorded_eval_sampling(pretrained) or {})
    sampling.update({k: v for k, v in overrides.items() if v is not None})
    if sampling.get("mode", "eval") == "train":
        sampling["mode"] = "eval"  # embeddings must be deterministic (eval and clip4clip modes are)
    return sampling


def add_shard_and_skip_done(batch: dict[str, Any], labels: dict[str, str],
                            todo: set[tuple[str, str]]) -> dict[str, Any]:
    """Adds the shard label (from the tar path) and drops samples that are already embedded."""
    import numpy as np

    shards = [labels[str(Path(str(p)).resolve())] for p in batch["path"]]
    keys = batch["__key__"] if "__key__" in batch else batch["key"]
    keep = np.array([(s, str(k)) in todo for s, k in zip(shards, keys)], dtype=bool)
    out = {("key" if k == "__key__" else k): np.asarray(v, dtype=object)[keep]
           for k, v in batch.items() if k != "path"}
    out["shard"] = np.array(shards, dtype=object)[keep]
    return out


def _frames_per_video(sampling: dict[str, Any]) -> int:
    """Upper bound on the frames one video contributes under ``sampling`` (sizes the Ray Data blocks)."""
    from pipeline.sampling import SamplingConfig

    cfg = SamplingConfig.from_dict(dict(sampling))
    if cfg.mode == "clip4clip":
        return cfg.max_frames
    return cfg.num_clips * cfg.frames_per_clip


def run_embed(shards: str | list[str], model: str, output: str, pretrained: str | None = None,
              sampling: dict[str, Any] | None = None, batch_size: int = 16, encoders: int = 1,
              decoders: int | None = None, backend: str | None = None, dtype: str = "float32",
              with_text: bool = False, progress_every: float = 5.0,
              encoder_threads: int | None = None) -> dict[str, Any]:
    """Embed every not-yet-embedded video of ``shards`` with ``model``; returns the run summary."""
    import ray
    import torch

    from pipeline.datasets import list_shards

    sampling = resolve_sampling(pretrained, sampling or {})
    tar_paths = [str(Path(p).resolve()) for p in list_shards(shards)]
    probe_model, transform, _ = build_encoder(model, pretrained)
    model_id = probe_model.model_id
    with torch.inference_mode():
        dim = int(probe_model.encode_text(["probe"]).shape[-1])
    del probe_model
    partition = Path(output) / model_partition(model_id)
    partition.mkdir(parents=True, exist_ok=True)
    write_model_card(partition, {"model_id": model_id, "model_name": model,
                                 "pretrained": str(Path(pretrained).resolve()) if pretrained else None,
                                 "sampling": sampling, "image_size": transform.image_size, "dtype": dtype,
                                 "dim": dim})
    work = plan_shards(tar_paths, partition)
    todo_total = sum(len(w.todo_keys) for w in work)
    print(f"[embed] model {model_id}: {len(tar_paths)} shards, {len(work)} to do, {todo_total} videos")
    writer = ShardPartWriter(partition, work, dim=dim, dtype=dtype)
    progress = Progress(todo_total, "embed", every_s=progress_every)
    if todo_total:
        if not ray.is_initialized():
            ray.init(address="auto" if _cluster_running() else "local", log_to_driver=False)
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        labels = {w.path: w.label for w in work}
        todo = {(w.label, k) for w in work for k in w.todo_keys}
        # Ray Data packs map outputs into blocks of up to target_max_block_size (128 MiB) before passing
        # them on; a batch of decoded frames is a few MB, so the encoder would wait for ~10 decoded
        # batches and the writer for the whole run. One decoded batch per block keeps every stage
        # streaming (measured: the first embeddings came out after 114 of 116 s without this).
        frame_bytes = 3 * transform.image_size ** 2 * _frames_per_video(sampling)
        ctx = ray.data.DataContext.get_current()
        previous_block_size = ctx.target_max_block_size
        ctx.target_max_block_size = max(1 << 20, int(1.5 * batch_size * frame_bytes))
        # Reading is I/O and decode actors are light next to the encoder: fractional CPUs keep a 2-core
        # machine from deadlocking (actors hold their CPUs for the whole run).
        ds = ray.data.read_webdataset([w.path for w in work if w.todo_keys], decoder=None, include_paths=True,
                                      num_cpus=0.25)
        ds = ds.map_batches(add_shard_and_skip_done, fn_kwargs={"labels": labels, "todo": todo},
                            batch_size=64, num_cpus=0.25)
        ds = ds.map_batches(
            DecodeShardClipsStage,
            fn_constructor_kwargs={"sampling": sampling, "size": transform.image_size, "backend": backend},
            batch_size=batch_size, concurrency=decoders or 1, num_cpus=0.5,
        )
        ds = ds.map_batches(
            EncodeClipsStage,
            fn_constructor_kwargs={"model_name": model, "pretrained": pretrained, "dtype": dtype,
                                   "threads": encoder_threads},
            batch_size=batch_size, concurrency=encoders, num_gpus=1 if use_gpu else 0,
            num_cpus=0.25 if use_gpu else 1,
        )
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
                writer.add_batch(batch)
                done = todo_total - sum(len(k) for k in writer.pending.values())
                progress.update(done, f"errors {writer.error_count}")
        finally:
            ctx.target_max_block_size = previous_block_size  # later pipelines in this driver: Ray's default
        if writer.unfinished:
            raise RuntimeError(f"embedding pipeline lost rows of shards {writer.unfinished}")
    errors = consolidate_errors(partition)
    text_rows = embed_captions(partition, model, pretrained, torch) if with_text else 0
    elapsed = progress.elapsed()
    summary = {"model_id": model_id, "partition": str(partition), "shards": len(tar_paths),
               "shards_embedded": len(work), "videos": writer.videos, "clips": writer.clips,
               "errors": writer.error_count, "errors_total": errors, "text_rows": text_rows,
               "seconds": round(elapsed, 2),
               "videos_per_s": round(writer.videos / elapsed, 3) if elapsed > 0 and writer.videos else 0.0,
               "startup_s": round(progress.startup_s(), 2),
               "steady_videos_per_s": round(progress.steady_rate(), 3)}
    return summary


def embed_captions(partition: Path, model: str, pretrained: str | None, torch) -> int:
    """Text embeddings of the ingest captions (for evaluation): ``text-<shard>.parquet`` beside the parts."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq


    encoder, _, _ = build_encoder(model, pretrained)
    encoder.eval()
    written = 0
    for part in sorted(partition.glob("part-*.parquet")):
        target = partition / part.name.replace("part-", "text-", 1)
        if target.exists():
            continue
        table = pq.read_table(part, columns=["video_id", "clip_index", "captions"]).to_pylist()
        pairs = [(r["video_id"], c) for r in table if r["clip_index"] == -1 for c in r["captions"]]
        embs = []
        with torch.inference_mode():
            for i in range(0, len(pairs), 256):
                embs.append(encoder.encode_text([c for _, c in pairs[i:i + 256]]).float().numpy())
        dim = embs[0].shape[1] if embs else 0
        flat = np.concatenate(embs).reshape(-1) if embs else np.zeros(0, np.float32)
        out = pa.table({"video_id": [v for v, _ in pairs], "caption": [c for _, c in pairs],
                        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim)})
        tmp = target.with_name(f".{target.name}.tmp")
        pq.write_table(out, tmp)
        tmp.replace(target)
        written += len(pairs)
    return written


def _cluster_running() -> bool:
    import os

    return bool(os.environ.get("RAY_ADDRESS"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vidsift embed", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, help="shard dir (or its shards/ folder), glob or brace pattern")
    p.add_argument("--model", required=True, help="registered model name (see models.list_models())")
    p.add_argument("--pretrained", default=None, help="checkpoint / open_clip tag for the model")
    p.add_argument("--output", required=True, help="embeddings output folder")
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {"num_clips": args.num_clips, "frames_per_clip": args.frames_per_clip, "stride": args.stride,
                 "fps": args.fps}
    try:
        summary = run_embed(args.shards, args.model, args.output, pretrained=args.pretrained,
                            sampling=overrides, batch_size=args.batch_size, encoders=args.encoders,
                            decoders=args.decoders, backend=args.backend, dtype=args.dtype,
                            with_text=args.with_text, encoder_threads=args.encoder_threads)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        print(f"vidsift embed: error: {exc}", file=sys.stderr)
        return 2
    print_summary("embed", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

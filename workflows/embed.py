"""The embed run: shards → Parquet embeddings with Ray Data (incremental, idempotent).

read shards → skip already-embedded keys → decode + sparse sample (``DecodeShardClipsStage``, CPU actors) →
encoder actor pool (``EncodeClipsStage``, ``num_gpus=1`` per actor when the cluster has GPUs) → one
``part-<shard>.parquet`` per shard under ``OUTPUT/model_id=<id>/``. Rerunning with the same shards and model
embeds nothing. Every resource (CPUs, GPUs, concurrency, batch sizes, block size) is set here, where the
stages are wired; the stages themselves (``pipeline/embedding.py``) are plain classes.

:func:`run_embed` is a sequence of named steps over one :class:`EmbedRun` state:
:func:`prepare_embed` (sampling, model probe, partition, plan) → :func:`stream_embeddings` (the Ray Data
pipeline, when there is work) → :func:`finish_embed` (errors, caption embeddings, summary).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from models import create_model, recorded_eval_sampling
from pipeline.datasets import list_shards
from pipeline.embedding import (
    DecodeShardClipsStage,
    EncodeClipsStage,
    ShardPartWriter,
    ShardWork,
    consolidate_errors,
    model_partition,
    plan_shards,
    write_model_card,
)
from pipeline.sampling import SamplingConfig
from runtime.progress import Progress
from runtime.ray_connect import connect_ray

DEFAULT_SAMPLING = {"num_clips": 4, "frames_per_clip": 4, "mode": "eval"}


def resolve_sampling(pretrained: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """Sampling for embedding: the training run's eval sampling when the checkpoint records it, then flags."""
    sampling = dict(DEFAULT_SAMPLING)
    sampling.update(recorded_eval_sampling(pretrained) or {})
    sampling.update({k: v for k, v in overrides.items() if v is not None})
    if sampling.get("mode", "eval") == "train":
        sampling["mode"] = "eval"  # embeddings must be deterministic (eval and clip4clip modes are)
    return sampling


def add_shard_and_skip_done(batch: dict[str, Any], labels: dict[str, str],
                            todo: set[tuple[str, str]]) -> dict[str, Any]:
    """Adds the shard label (from the tar path) and drops samples that are already embedded."""
    shards = [labels[str(Path(str(p)).resolve())] for p in batch["path"]]
    keys = batch["__key__"] if "__key__" in batch else batch["key"]
    keep = np.array([(s, str(k)) in todo for s, k in zip(shards, keys)], dtype=bool)
    out = {("key" if k == "__key__" else k): np.asarray(v, dtype=object)[keep]
           for k, v in batch.items() if k != "path"}
    out["shard"] = np.array(shards, dtype=object)[keep]
    return out


def frames_per_video(sampling: dict[str, Any]) -> int:
    """Upper bound on the frames one video contributes under ``sampling`` (sizes the Ray Data blocks)."""
    cfg = SamplingConfig.from_dict(dict(sampling))
    if cfg.mode == "clip4clip":
        return cfg.max_frames
    return cfg.num_clips * cfg.frames_per_clip


@dataclasses.dataclass
class EmbedRun:
    """Everything one embed run decides and produces, step by step (arguments first)."""

    model: str
    pretrained: str | None
    sampling: dict[str, Any]
    batch_size: int
    encoders: int
    decoders: int | None
    backend: str | None
    dtype: str
    encoder_threads: int | None
    tar_paths: list[str]
    model_id: str
    image_size: int
    partition: Path
    work: list[ShardWork]
    writer: ShardPartWriter
    progress: Progress

    @property
    def todo_total(self) -> int:
        return sum(len(w.todo_keys) for w in self.work)


def probe_model(model: str, pretrained: str | None) -> tuple[str, int, int]:
    """``(model_id, image_size, dim)`` of the model, from one instance built on the driver."""
    probe, transform, _ = create_model(model, pretrained=pretrained, seed=0)
    with torch.inference_mode():
        dim = int(probe.encode_text(["probe"]).shape[-1])
    return probe.model_id, transform.image_size, dim


def prepare_embed(shards: str | list[str], model: str, output: str, pretrained: str | None,
                  sampling: dict[str, Any], dtype: str, progress_every: float, **options: Any) -> EmbedRun:
    """Step 1: sampling, model id, the partition with its model card, and the plan of shards still to do."""
    tar_paths = [str(Path(p).resolve()) for p in list_shards(shards)]
    model_id, image_size, dim = probe_model(model, pretrained)
    partition = Path(output) / model_partition(model_id)
    partition.mkdir(parents=True, exist_ok=True)
    write_model_card(partition, {"model_id": model_id, "model_name": model,
                                 "pretrained": str(Path(pretrained).resolve()) if pretrained else None,
                                 "sampling": sampling, "image_size": image_size, "dtype": dtype,
                                 "dim": dim})
    work = plan_shards(tar_paths, partition)
    todo_total = sum(len(w.todo_keys) for w in work)
    print(f"[embed] model {model_id}: {len(tar_paths)} shards, {len(work)} to do, {todo_total} videos")
    return EmbedRun(model=model, pretrained=pretrained, sampling=sampling, dtype=dtype,
                    tar_paths=tar_paths, model_id=model_id, image_size=image_size, partition=partition,
                    work=work, writer=ShardPartWriter(partition, work, dim=dim, dtype=dtype),
                    progress=Progress("embed", todo_total, unit="videos", every_s=progress_every), **options)


def build_embed_dataset(run: EmbedRun, use_gpu: bool) -> ray.data.Dataset:
    """Step 2a: the Ray Data pipeline over the shards with work left, with every stage's resources."""
    labels = {w.path: w.label for w in run.work}
    todo = {(w.label, k) for w in run.work for k in w.todo_keys}
    # Reading is I/O and decode actors are light next to the encoder: fractional CPUs keep a 2-core
    # machine from deadlocking (actors hold their CPUs for the whole run).
    ds = ray.data.read_webdataset([w.path for w in run.work if w.todo_keys], decoder=None, include_paths=True,
                                  num_cpus=0.25)
    ds = ds.map_batches(add_shard_and_skip_done, fn_kwargs={"labels": labels, "todo": todo},
                        batch_size=64, num_cpus=0.25)
    ds = ds.map_batches(
        DecodeShardClipsStage,
        fn_constructor_kwargs={"sampling": run.sampling, "size": run.image_size, "backend": run.backend},
        batch_size=run.batch_size, concurrency=run.decoders or 1, num_cpus=0.5,
    )
    return ds.map_batches(
        EncodeClipsStage,
        fn_constructor_kwargs={"model_name": run.model, "pretrained": run.pretrained, "dtype": run.dtype,
                               "threads": run.encoder_threads},
        batch_size=run.batch_size, concurrency=run.encoders, num_gpus=1 if use_gpu else 0,
        num_cpus=0.25 if use_gpu else 1,
    )


def stream_embeddings(run: EmbedRun) -> None:
    """Step 2: run the pipeline and hand every output batch to the per-shard writer (progress as it goes)."""
    connect_ray()
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    # Ray Data packs map outputs into blocks of up to target_max_block_size (128 MiB) before passing
    # them on; a batch of decoded frames is a few MB, so the encoder would wait for ~10 decoded
    # batches and the writer for the whole run. One decoded batch per block keeps every stage
    # streaming (measured: the first embeddings came out after 114 of 116 s without this).
    frame_bytes = 3 * run.image_size ** 2 * frames_per_video(run.sampling)
    ctx = ray.data.DataContext.get_current()
    previous_block_size = ctx.target_max_block_size
    ctx.target_max_block_size = max(1 << 20, int(1.5 * run.batch_size * frame_bytes))
    todo_total = run.todo_total
    try:
        ds = build_embed_dataset(run, use_gpu)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            run.writer.add_batch(batch)
            done = todo_total - sum(len(k) for k in run.writer.pending.values())
            run.progress.set_done(done, f"errors {run.writer.error_count}")
    finally:
        ctx.target_max_block_size = previous_block_size  # later pipelines in this driver: Ray's default
    if run.writer.unfinished:
        raise RuntimeError(f"embedding pipeline lost rows of shards {run.writer.unfinished}")


def finish_embed(run: EmbedRun, with_text: bool) -> dict[str, Any]:
    """Step 3: merged error table, caption embeddings (``with_text``), and the run summary."""
    errors = consolidate_errors(run.partition)
    text_rows = embed_captions(run.partition, run.model, run.pretrained) if with_text else 0
    elapsed = run.progress.elapsed()
    writer = run.writer
    return {"model_id": run.model_id, "partition": str(run.partition), "shards": len(run.tar_paths),
            "shards_embedded": len(run.work), "videos": writer.videos, "clips": writer.clips,
            "errors": writer.error_count, "errors_total": errors, "text_rows": text_rows,
            "seconds": round(elapsed, 2),
            "videos_per_s": round(writer.videos / elapsed, 3) if elapsed > 0 and writer.videos else 0.0,
            "startup_s": round(run.progress.startup_s(), 2),
            "steady_videos_per_s": round(run.progress.steady_rate(), 3)}


def run_embed(shards: str | list[str], model: str, output: str, pretrained: str | None = None,
              sampling: dict[str, Any] | None = None, batch_size: int = 16, encoders: int = 1,
              decoders: int | None = None, backend: str | None = None, dtype: str = "float32",
              with_text: bool = False, progress_every: float = 5.0,
              encoder_threads: int | None = None) -> dict[str, Any]:
    """Embed every not-yet-embedded video of ``shards`` with ``model``; returns the run summary."""
    run = prepare_embed(shards, model, output, pretrained, resolve_sampling(pretrained, sampling or {}),
                        dtype, progress_every, batch_size=batch_size, encoders=encoders, decoders=decoders,
                        backend=backend, encoder_threads=encoder_threads)
    if run.todo_total:
        stream_embeddings(run)
    return finish_embed(run, with_text)


def embed_captions(partition: Path, model: str, pretrained: str | None) -> int:
    """Text embeddings of the ingest captions (for evaluation): ``text-<shard>.parquet`` beside the parts."""
    encoder, _, _ = create_model(model, pretrained=pretrained, seed=0)
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

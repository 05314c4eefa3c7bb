"""The caption run: caption a shard corpus with a SwinBERT checkpoint (Ray Data), optionally scoring the
ingest captions.

read shards → decode + sparse sample (``DecodeClipsStage``, CPU actors) → ``CaptionStage`` (an actor
holding the model, a GPU when the cluster has one) → ``OUTPUT/captions.parquet``, ``errors.parquet`` and,
with ``score_captions``, ``caption_scores.parquet`` (``pipeline.captioning.CaptionTables``), on any store
(``OUTPUT`` a path or URI; each table one complete object). Captions are a few bytes a video, so the
driver collects them and writes the tables once. Resources are set here, where the stages are wired; the
stages that touch storage get this process's store configuration (``runtime.storage.storage_env``).
With ``index``, the run is recorded under that index (``index.annotations``): the search service of the
index then shows the captions without being told where they are.

:func:`run_caption` is a sequence of named steps over one :class:`CaptionRun` state:
:func:`prepare_caption` (checks, model probe, sampling, shards) → :func:`plan_resources` (Ray, CPUs per
actor) → :func:`build_caption_dataset` → :func:`collect_captions` → :func:`write_caption_outputs`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import ray

from index.annotations import check_index_root, record_captions
from models import create_inference_model
from pipeline.captioning import (
    CaptionStage,
    CaptionTables,
    caption_model_name,
    caption_sampling,
    checkpoint_sampling,
)
from pipeline.decode_stage import DecodeClipsStage, read_shards_ray
from pipeline.shard_tar import list_shards
from runtime import storage
from runtime.ray_connect import connect_ray


@dataclasses.dataclass
class CaptionRun:
    """One caption run: its arguments, then what each step decides."""

    shards: str | Sequence[str]
    pretrained: str | None
    out: str
    score_captions: bool
    beam_size: int
    max_length: int | None
    min_length: int
    split: str | None
    batch_size: int
    decoders: int
    backend: str | None
    progress_every: float
    model_name: str | None = None
    allow_random_init: bool = False
    index: str | None = None  # an index root to record the output under (checked before the run)
    model_id: str = ""
    image_size: int = 0
    sampling: dict[str, Any] = dataclasses.field(default_factory=dict)
    tar_paths: list[str] = dataclasses.field(default_factory=list)
    use_gpu: bool = False
    decode_cpus: float = 1.0
    caption_cpus: float = 1.0
    tables: CaptionTables | None = None
    seconds: float = 0.0


def prepare_caption(run: CaptionRun, num_clips: int) -> None:
    """Step 1: check the arguments, read the model's id, frame count and input size, pick the sampling and
    list the shards; creates the output folder (local stores). Without a checkpoint it stops here
    (``models.MissingWeightsError``) unless ``allow_random_init``."""
    if run.beam_size < 1:
        raise ValueError(f"--beam must be >= 1, got {run.beam_size}")
    if run.pretrained and not storage.is_file(run.pretrained):
        raise FileNotFoundError(f"checkpoint {run.pretrained!r} does not exist")
    name = caption_model_name(run.pretrained, run.model_name)
    probe, transform, _ = create_inference_model(name, run.pretrained, run.allow_random_init)
    run.model_name, run.model_id, run.image_size = name, probe.model_id, transform.image_size
    if num_clips == 1 and run.pretrained:
        run.sampling = checkpoint_sampling(run.pretrained, probe.num_frames)
    else:
        run.sampling = caption_sampling(probe.num_frames, num_clips)
    run.tar_paths = list_shards(run.shards)
    storage.makedirs(run.out)
    print(f"[caption] model {run.model_id}: {len(run.tar_paths)} shards, sampling {run.sampling}, "
          f"beam {run.beam_size}")


def plan_resources(run: CaptionRun) -> None:
    """Step 2: join (or start) Ray and size the actors' CPU reservations to the cluster."""
    connect_ray()
    resources = ray.cluster_resources()
    run.use_gpu = resources.get("GPU", 0) > 0
    # Both stages are actors holding CPUs for the whole run; the shard read tasks need one more CPU. On
    # a small cluster scale the actors' reservations down so the pipeline cannot starve itself.
    decode_cpus, caption_cpus = 1.0, 0.0 if run.use_gpu else 1.0
    total_cpus = float(resources.get("CPU", 1))
    wanted = run.decoders * decode_cpus + caption_cpus + 1.0
    if wanted > total_cpus:
        scale = max(total_cpus - 1.0, 0.5) / (wanted - 1.0)
        decode_cpus, caption_cpus = decode_cpus * scale, caption_cpus * scale
        print(f"[caption] {total_cpus:g} CPUs: actors reserve {decode_cpus:.2f} (decode) / "
              f"{caption_cpus:.2f} (caption) CPUs")
    run.decode_cpus, run.caption_cpus = decode_cpus, caption_cpus


def build_caption_dataset(run: CaptionRun) -> ray.data.Dataset:
    """Step 3: read → decode actors → the caption actor, with the resources of :func:`plan_resources`."""
    env = {"env_vars": storage.storage_env()}  # shards and the checkpoint may live on an object store
    ds = read_shards_ray(run.tar_paths, split=run.split, runtime_env=env)
    ds = ds.map_batches(
        DecodeClipsStage,
        fn_constructor_kwargs={"sampling": run.sampling, "size": run.image_size, "backend": run.backend},
        batch_size=run.batch_size,
        concurrency=run.decoders,
        num_cpus=run.decode_cpus,
        runtime_env=env,
    )
    return ds.map_batches(
        CaptionStage,
        fn_constructor_kwargs={
            "pretrained": run.pretrained,
            "model_name": run.model_name,
            "allow_random_init": run.allow_random_init,
            "beam_size": run.beam_size,
            "max_length": run.max_length,
            "min_length": run.min_length,
            "score_captions": run.score_captions,
        },
        batch_size=run.batch_size,
        concurrency=1,
        num_gpus=1 if run.use_gpu else 0,
        num_cpus=run.caption_cpus,
        runtime_env=env,
    )


def collect_captions(run: CaptionRun, ds: ray.data.Dataset) -> None:
    """Step 4: stream the output batches into the caption tables, printing videos/s as it goes."""
    tables = run.tables = CaptionTables(run.model_id)
    start = last = time.perf_counter()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        tables.add_batch(batch)
        now = time.perf_counter()
        if now - last >= run.progress_every:
            print(f"[caption] {tables.done} videos, {tables.done / (now - start):.2f} videos/s, "
                  f"errors {len(tables.errors)}", flush=True)
            last = now
    run.seconds = time.perf_counter() - start


def write_caption_outputs(run: CaptionRun) -> dict[str, Any]:
    """Step 5: the caption tables and ``_summary.json`` (each one complete object); returns the summary."""
    tables = run.tables
    tables.write(run.out, run.score_captions)
    elapsed = run.seconds
    summary = {
        "model_id": run.model_id,
        "shards": len(run.tar_paths),
        "videos": len(tables.captions),
        "errors": len(tables.errors),
        "scored_captions": len(tables.scores),
        "beam": run.beam_size,
        "seconds": round(elapsed, 2),
        "videos_per_s": round(len(tables.captions) / elapsed, 3) if elapsed > 0 else 0.0,
        "output": run.out,
    }
    storage.write_json(storage.join(run.out, "_summary.json"), summary)
    if run.index:  # last: the record points at complete tables
        details = {k: summary[k] for k in ("model_id", "videos", "errors")}
        summary["recorded_under_index"] = record_captions(run.index, run.out, {
            **details, "pretrained": run.pretrained, "shards": run.tar_paths})
    return summary


def run_caption(
    shards: str | Sequence[str],
    pretrained: str | None,
    output: str,
    score_captions: bool = False,
    beam_size: int = 1,
    max_length: int | None = None,
    split: str | None = None,
    batch_size: int = 8,
    min_length: int = 3,
    num_clips: int = 1,
    decoders: int = 1,
    backend: str | None = None,
    progress_every: float = 5.0,
    model_name: str | None = None,
    allow_random_init: bool = False,
    index: str | None = None,
) -> dict[str, Any]:
    """Caption every sample of ``shards`` into ``output`` (a path or URI); returns the run summary (counts,
    files, throughput). ``pretrained`` (a SwinBERT checkpoint, path or URI) is required unless
    ``allow_random_init`` (then ``model_name``, default ``swinbert-tiny``, from a seeded random init). With
    ``index`` (an index root), the output is recorded under it for its search service."""
    run = CaptionRun(pretrained=pretrained, out=storage.normalize(output), score_captions=score_captions,
                     beam_size=beam_size, max_length=max_length, min_length=min_length, split=split,
                     batch_size=batch_size, decoders=decoders, backend=backend, progress_every=progress_every,
                     shards=shards, model_name=model_name, allow_random_init=allow_random_init,
                     index=check_index_root(index) if index else None)
    prepare_caption(run, num_clips)
    plan_resources(run)
    collect_captions(run, build_caption_dataset(run))
    return write_caption_outputs(run)

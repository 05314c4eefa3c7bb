"""The embed run: shards → Parquet embeddings with Ray Data (incremental, idempotent, any store).

read shards → skip already-embedded keys → decode + sparse sample (``DecodeShardClipsStage``, CPU actors) →
encoder actor pool (``EncodeClipsStage``, ``num_gpus=1`` per actor when the cluster has GPUs) → fragment
writer tasks (``write_shard_fragments``: the workers put the vectors on storage) → per shard, once all its
keys are accounted for, a ``finalize_shard`` task writes ``OUTPUT/model_id=<id>/part-<shard>.parquet``.
The driver only sees bookkeeping rows (shard, key, rows, error, fragment URI), never a vector. Rerunning
with the same shards and model embeds nothing. Every resource (CPUs, GPUs, concurrency, batch sizes, block
size, retries) is set here, where the stages are wired; the stages themselves (``pipeline/embedding.py``)
are plain classes and functions. Every stage that touches storage gets this process's store configuration
(``runtime.storage.storage_env``) as its Ray ``runtime_env``.

:func:`run_embed` is a sequence of named steps over one :class:`EmbedRun` state:
:func:`prepare_embed` (sampling, model probe, partition, plan) → :func:`stream_embeddings` (the Ray Data
pipeline and the finalize tasks, when there is work) → :func:`finish_embed` (caption embeddings, summary).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from models import create_inference_model, recorded_eval_sampling
from pipeline.embedding import (
    DecodeShardClipsStage,
    DecodeWindowsStage,
    EncodeClipsStage,
    ShardWork,
    add_shard_and_skip_done,
    clear_staging,
    finalize_shard,
    list_parts,
    model_partition,
    plan_shards,
    read_embed_errors,
    read_model_card,
    shard_durations,
    text_dir,
    write_model_card,
    write_shard_fragments,
)
from pipeline.sampling import SamplingConfig
from pipeline.shard_tar import list_shards
from runtime import storage
from runtime.progress import Progress
from runtime.ray_connect import connect_ray

DEFAULT_SAMPLING = {"num_clips": 4, "frames_per_clip": 4, "mode": "eval"}
WINDOW_BLOCK_ROWS = 4


def resolve_sampling(pretrained: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """Sampling for embedding: the training run's eval sampling when the checkpoint records it, then flags."""
    sampling = dict(DEFAULT_SAMPLING)
    sampling.update(recorded_eval_sampling(pretrained) or {})
    sampling.update({k: v for k, v in overrides.items() if v is not None})
    if sampling.get("mode", "eval") == "train":
        sampling["mode"] = "eval"  # embeddings must be deterministic (eval and clip4clip modes are)
    return sampling


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
    allow_random_init: bool
    sampling: dict[str, Any]
    batch_size: int
    encoders: int
    decoders: int | None
    backend: str | None
    dtype: str
    encoder_threads: int | None
    windows: dict[str, Any] | None  # {"window_s", "stride_s"} (None = the sampling's defaults); None: sparse
    tar_paths: list[str]
    model_id: str
    image_size: int
    dim: int
    partition: str
    work: list[ShardWork]
    progress: Progress
    results: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # finalize_shard bookkeeping
    driver_columns: set[str] = dataclasses.field(default_factory=set)  # what reached the driver loop
    errors: int = 0
    parts_seen: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)  # partly written videos

    @property
    def todo_total(self) -> int:
        return sum(len(w.todo_keys) for w in self.work)


def probe_model(model: str, pretrained: str | None, allow_random_init: bool = False) -> tuple[str, int, int]:
    """``(model_id, image_size, dim)`` of the model, from one instance built on the driver (this is where
    a run without trained weights stops, before Ray starts, unless ``allow_random_init``)."""
    probe, transform, _ = create_inference_model(model, pretrained, allow_random_init, seed=0)
    with torch.inference_mode():
        dim = int(probe.encode_text(["probe"]).shape[-1])
    return probe.model_id, transform.image_size, dim


def card_pretrained(pretrained: str | None) -> str | None:
    """The checkpoint as the card records it: an absolute path / URI when it is a file, else as given (a
    named weights tag)."""
    if not pretrained:
        return None
    try:
        return storage.normalize(pretrained) if storage.exists(pretrained) else str(pretrained)
    except (ValueError, ImportError):  # a tag such as "hf-hub:org/name" is no store URI
        return str(pretrained)


def storage_options() -> dict[str, Any]:
    """Ray options of every stage that touches storage: this process's store configuration."""
    return {"runtime_env": {"env_vars": storage.storage_env()}}


def check_same_mode(partition: str, card: dict[str, Any]) -> None:
    """Refuse to mix sparse clip rows and dense window rows in one partition: it is keyed by model only,
    so its finished parts would count as done for the other mode and the run would embed nothing."""
    held_card = read_model_card(partition)
    before = held_card.get("windows")
    if held_card and (before is None) != (card.get("windows") is None):
        held, asked = ("dense windows", "sparse clips") if before is not None else ("sparse clips",
                                                                                    "dense windows")
        raise ValueError(f"{partition!r} holds {held} rows; a run with {asked} needs its own --output")


def prepare_embed(shards: str | list[str], model: str, output: str, pretrained: str | None,
                  sampling: dict[str, Any], dtype: str, progress_every: float, **options: Any) -> EmbedRun:
    """Step 1: sampling, model id, the partition with its model card, and the plan of shards still to do
    (shards with nothing left to embed get their empty part here, without Ray)."""
    tar_paths = [storage.normalize(p) for p in list_shards(shards)]
    model_id, image_size, dim = probe_model(model, pretrained, options.get("allow_random_init", False))
    partition = storage.join(storage.normalize(output), model_partition(model_id))
    storage.makedirs(partition)
    card = {"model_id": model_id, "model_name": model, "pretrained": card_pretrained(pretrained),
            "random_init": not pretrained, "sampling": sampling, "image_size": image_size, "dtype": dtype,
            "dim": dim}
    if options.get("windows") is not None:  # a --windows run; sparse runs keep the card they had
        card["windows"] = options["windows"]
    check_same_mode(partition, card)
    write_model_card(partition, card)
    work = plan_shards(tar_paths, partition)
    clear_staging(partition)  # fragments of an interrupted run: its unfinished shards are redone whole
    todo_total = sum(len(w.todo_keys) for w in work)
    print(f"[embed] model {model_id}: {len(tar_paths)} shards, {len(work)} to do, {todo_total} videos")
    run = EmbedRun(model=model, pretrained=pretrained, sampling=sampling, dtype=dtype, tar_paths=tar_paths,
                   model_id=model_id, image_size=image_size, dim=dim, partition=partition, work=work,
                   progress=Progress("embed", todo_total, unit="videos", every_s=progress_every), **options)
    run.results += [finalize_shard(partition, w.label, dim, dtype, shard_uri=w.path)
                    for w in work if not w.todo_keys]
    return run


def build_embed_dataset(run: EmbedRun, use_gpu: bool) -> ray.data.Dataset:
    """Step 2a: the Ray Data pipeline over the shards with work left, with every stage's resources. Its
    output is bookkeeping only: the fragment writers put the vectors on storage."""
    todo_work = [w for w in run.work if w.todo_keys]
    if len({storage.scheme(w.path) for w in todo_work}) > 1:
        raise ValueError("the shards of one embed run must live on one store")
    fs, _ = storage.arrow_filesystem(todo_work[0].path)
    labels: dict[str, str] = {}
    read_paths = []
    for w in todo_work:  # labels by URI and by the store path the reader reports (include_paths)
        read_paths.append(storage.filesystem(w.path)[1])
        labels[w.path] = labels[read_paths[-1]] = w.label
    todo = {(w.label, k) for w in todo_work for k in w.todo_keys}
    env = storage_options()
    # Reading is I/O and decode actors are light next to the encoder: fractional CPUs keep a 2-core
    # machine from deadlocking (actors hold their CPUs for the whole run). The read is wired here, not
    # through pipeline.decode_stage.read_shards_ray, whose column rename is a separate 1-CPU step.
    ds = ray.data.read_webdataset(read_paths, filesystem=fs, decoder=None, include_paths=True, num_cpus=0.25,
                                  **env)
    ds = ds.map_batches(add_shard_and_skip_done, fn_kwargs={"labels": labels, "todo": todo},
                        batch_size=64, num_cpus=0.25, **env)
    decode_kwargs = {"sampling": run.sampling, "size": run.image_size, "backend": run.backend}
    ds = ds.map_batches(
        DecodeShardClipsStage if run.windows is None else DecodeWindowsStage,
        fn_constructor_kwargs=decode_kwargs if run.windows is None else {**decode_kwargs, **run.windows},
        batch_size=run.batch_size, concurrency=run.decoders or 1, num_cpus=0.5, **env,
    )
    ds = ds.map_batches(
        EncodeClipsStage,
        fn_constructor_kwargs={"model_name": run.model, "pretrained": run.pretrained, "dtype": run.dtype,
                               "threads": run.encoder_threads, "allow_random_init": run.allow_random_init},
        batch_size=run.batch_size, concurrency=run.encoders, num_gpus=1 if use_gpu else 0,
        num_cpus=0.25 if use_gpu else 1, **env,
    )
    # One encoded block → one fragment object per shard, written by a light task next to the encoder.
    return ds.map_batches(write_shard_fragments,
                          fn_kwargs={"partition": run.partition, "dim": run.dim, "dtype": run.dtype},
                          batch_size=None, num_cpus=0.25, **env)


def account_batch(run: EmbedRun, pending: dict[str, set[str]], batch: dict[str, Any]) -> list[str]:
    """Mark the keys of one bookkeeping batch done; returns the shards that are now complete."""
    run.driver_columns.update(batch)
    touched = set()
    parts = batch["parts"] if "parts" in batch else [1] * len(batch["key"])
    done = batch["parts_done"] if "parts_done" in batch else [1] * len(batch["key"])
    for shard, key, error, total, now in zip(batch["shard"], batch["key"], batch["error"], parts, done):
        # a --windows video is several decoded rows: its key is done when all of them are written (only
        # videos still partly written are kept here, so the driver's books do not grow with the corpus)
        seen = run.parts_seen.pop((str(shard), str(key)), 0) + int(now)
        if seen >= int(total):
            pending[str(shard)].discard(str(key))
        else:
            run.parts_seen[(str(shard), str(key))] = seen
        touched.add(str(shard))
        run.errors += bool(error)
    complete = sorted(s for s in touched if not pending[s])
    for shard in complete:
        del pending[shard]
    return complete


def stream_embeddings(run: EmbedRun) -> None:
    """Step 2: run the pipeline; as each shard's keys are all accounted for, launch its finalize task
    (which writes the shard's part from the workers' fragments). The driver holds only key sets."""
    connect_ray()
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    # Light I/O tasks, retried when their node dies (finalize_shard is idempotent).
    finalize = ray.remote(finalize_shard).options(num_cpus=0.25, max_retries=3, **storage_options())
    # Ray Data packs map outputs into blocks of up to target_max_block_size (128 MiB) before passing
    # them on; a batch of decoded frames is a few MB, so the encoder would wait for ~10 decoded
    # batches and the writers for the whole run. One decoded batch per block keeps every stage
    # streaming (measured: the first embeddings came out after 114 of 116 s without this).
    # a --windows video is a few decoded rows, not one: budget for WINDOW_BLOCK_ROWS of them
    rows_per_video = 1 if run.windows is None else WINDOW_BLOCK_ROWS
    frame_bytes = 3 * run.image_size ** 2 * frames_per_video(run.sampling) * rows_per_video
    ctx = ray.data.DataContext.get_current()
    previous_block_size = ctx.target_max_block_size
    ctx.target_max_block_size = max(1 << 20, int(1.5 * run.batch_size * frame_bytes))
    todo_total = run.todo_total
    pending = {w.label: set(w.todo_keys) for w in run.work if w.todo_keys}
    expected = {w.label: w.todo_keys for w in run.work}
    shard_uris = {w.label: w.path for w in run.work}  # lineage: each part records its shard tar
    futures = []
    try:
        ds = build_embed_dataset(run, use_gpu)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            for shard in account_batch(run, pending, batch):
                futures.append(finalize.remote(run.partition, shard, run.dim, run.dtype, expected[shard],
                                               shard_uris[shard]))
            run.progress.set_done(todo_total - sum(len(k) for k in pending.values()), f"errors {run.errors}")
    finally:
        ctx.target_max_block_size = previous_block_size  # later pipelines in this driver: Ray's default
    if pending:
        raise RuntimeError(f"embedding pipeline lost rows of shards {sorted(pending)}")
    run.results += ray.get(futures)


def finish_embed(run: EmbedRun, with_text: bool) -> dict[str, Any]:
    """Step 3: caption embeddings (``with_text``) and the run summary (from the finalize bookkeeping)."""
    text_rows = (embed_captions(run.partition, run.model, run.pretrained, run.allow_random_init)
                 if with_text else 0)
    elapsed = run.progress.elapsed()
    videos, clips, errors = (sum(r[k] for r in run.results) for k in ("videos", "clips", "errors"))
    # vectors per hour of video: the windows' budget (read from ingest's per-shard tables, windowed runs only)
    durations = [shard_durations(w.path, w.todo_keys) for w in run.work] if run.windows is not None else []
    hours = sum(durations) / 3600.0 if durations and all(d is not None for d in durations) else 0.0
    return {"model_id": run.model_id, "partition": run.partition, "shards": len(run.tar_paths),
            "shards_embedded": len(run.work), "videos": videos, "clips": clips, "windows": run.windows,
            "video_hours": round(hours, 4),
            "vectors_per_hour": round((videos + clips) / hours, 1) if hours > 0 else None,
            "errors": errors, "errors_total": read_embed_errors(run.partition).num_rows,
            "text_rows": text_rows, "seconds": round(elapsed, 2),
            "videos_per_s": round(videos / elapsed, 3) if elapsed > 0 and videos else 0.0,
            "startup_s": round(run.progress.startup_s(), 2),
            "steady_videos_per_s": round(run.progress.steady_rate(), 3)}


def run_embed(shards: str | list[str], model: str, output: str, pretrained: str | None = None,
              sampling: dict[str, Any] | None = None, batch_size: int = 16, encoders: int = 1,
              decoders: int | None = None, backend: str | None = None, dtype: str = "float32",
              with_text: bool = False, progress_every: float = 5.0,
              encoder_threads: int | None = None, allow_random_init: bool = False, windows: bool = False,
              window_s: float | None = None, stride_s: float | None = None) -> dict[str, Any]:
    """Embed every not-yet-embedded video of ``shards`` (any store) with ``model`` into ``output`` (any
    store); returns the run summary. ``pretrained`` (a checkpoint URI) is required unless
    ``allow_random_init`` (then a seeded random init, with a warning).

    ``windows`` (implied by ``window_s`` / ``stride_s``): clip rows are dense sliding windows instead of
    the sparse clips (docs/moments.md); window length defaults to the clip span of the (recorded) sampling,
    stride to half the window. One ``output`` per mode: a partition is keyed by model only
    (mixing the modes is refused)."""
    wanted = windows or window_s is not None or stride_s is not None
    window_cfg = {"window_s": window_s, "stride_s": stride_s} if wanted else None
    run = prepare_embed(shards, model, output, pretrained, resolve_sampling(pretrained, sampling or {}),
                        dtype, progress_every, batch_size=batch_size, encoders=encoders, decoders=decoders,
                        backend=backend, encoder_threads=encoder_threads, allow_random_init=allow_random_init,
                        windows=window_cfg)
    if run.todo_total:
        stream_embeddings(run)
    return finish_embed(run, with_text)


def embed_caption_parts(parts: list[str], target_dir: str, model: str, pretrained: str | None,
                        allow_random_init: bool) -> int:
    """Ray task: the caption text embeddings of some embedding parts, one output part per input part
    (each written whole, so a retried task redoes only what is missing); returns the rows written."""
    encoder, _, _ = create_inference_model(model, pretrained, allow_random_init, seed=0)
    encoder.eval()
    written = 0
    for part in parts:
        target = storage.join(target_dir, storage.name(part))
        if storage.exists(target):
            continue
        rows = storage.read_parquet(part, columns=["video_id", "clip_index", "captions"]).to_pylist()
        pairs = [(r["video_id"], c) for r in rows if r["clip_index"] == -1 for c in r["captions"]]
        embs = []
        with torch.inference_mode():
            for i in range(0, len(pairs), 256):
                embs.append(encoder.encode_text([c for _, c in pairs[i:i + 256]]).float().numpy())
        dim = embs[0].shape[1] if embs else 0
        flat = np.concatenate(embs).reshape(-1) if embs else np.zeros(0, np.float32)
        out = pa.table({"video_id": [v for v, _ in pairs], "caption": [c for _, c in pairs],
                        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim)})
        storage.write_parquet(out, target)
        written += len(pairs)
    return written


def embed_captions(partition: str, model: str, pretrained: str | None,
                   allow_random_init: bool = False, parts_per_task: int = 16) -> int:
    """Text embeddings of the ingest captions (for evaluation): one ``part-<shard>.parquet`` per embedding
    part under ``OUT/_text/model_id=<id>/``, beside the partition (:func:`pipeline.embedding.text_dir`).

    Ray tasks of ``parts_per_task`` parts read, encode and write; the driver only lists what is left."""
    target_dir = text_dir(partition)
    done = {storage.name(u) for u in storage.list_files(target_dir, ".parquet")}
    todo = [part for part in list_parts(partition) if storage.name(part) not in done]
    if not todo:
        return 0
    connect_ray()
    task = ray.remote(embed_caption_parts).options(num_cpus=1, max_retries=3, **storage_options())
    futures = [task.remote(todo[i:i + parts_per_task], target_dir, model, pretrained, allow_random_init)
               for i in range(0, len(todo), parts_per_task)]
    return sum(ray.get(futures))

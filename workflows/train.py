"""The Ray Train driver of a fine-tuning run (:func:`run_training`) and the single-process evaluation of a
trained model (:func:`evaluate_model`, :func:`run_eval_only`).

A run is four named steps: :func:`plan_run` (check the recipe, the output folder and the shards before Ray
starts; fix the epoch length), :func:`build_trainer` (join or start Ray, resources, the ``TorchTrainer``
over :func:`pipeline.training.train_loop_per_worker`), :func:`fit` and :func:`write_outputs` (write
``metrics.jsonl``, ``summary.json`` and, last, ``model.pt`` from the final checkpoint).

The output, the shards and every weights file are URIs on any store (``runtime.storage``): with
``--output s3://bucket/run`` the Ray Train checkpoints (``storage_path`` on the store's pyarrow filesystem),
the exported files and a resume all live on S3, and nothing is written to local disk outside caches and temp.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from models import create_model, get_model_config
from pipeline.retrieval_eval import format_metrics
from pipeline.training import (
    STATE_FILE,
    TrainConfig,
    build_objective,
    checkpoint_dirs,
    eval_batches,
    evaluate_caption,
    evaluate_retrieval,
    export_model,
    load_state_file,
    shard_inventory,
    split_count,
    summarize_metrics,
    train_loop_per_worker,
)
from runtime import storage
from runtime.ray_connect import cluster_address, connect_ray
from runtime.threads import set_torch_threads

RUN_NAME = "train"


@dataclasses.dataclass
class TrainRun:
    """A checked training run before Ray starts: where it writes, its data and the length of an epoch."""

    shards: str | os.PathLike
    output: str  # a normalised URI (an absolute local path, or s3://...)
    cfg: TrainConfig
    workers: int
    resume: bool
    use_gpu: bool | None
    max_failures: int
    inventory: dict[str, dict[str, int]]
    n_train: int
    steps_per_epoch: int
    existing: list[str]  # checkpoint folders already in the run (a resume continues the last one)

    @property
    def storage(self) -> str:
        return storage.join(self.output, "ray")

    @property
    def run_dir(self) -> str:
        return storage.join(self.storage, RUN_NAME)


def _check_recipe(cfg: TrainConfig, workers: int) -> None:
    if not cfg.model:
        raise ValueError("no model given (--model or `model:` in the config)")
    if workers < 1:
        raise ValueError(f"workers={workers}: must be >= 1")
    backbone = get_model_config(cfg.model).get("backbone")  # unknown names fail here, listing known ones
    tower = backbone.get("clip4clip") if isinstance(backbone, dict) else None
    if tower and not (cfg.backbone_pretrained or cfg.pretrained):
        raise ValueError(
            f"model {cfg.model!r} captions from the video tower of a trained {tower!r}: give its checkpoint "
            "as backbone_pretrained (--backbone-pretrained RUN/model.pt); a random tower is refused"
        )
    if cfg.backbone_pretrained and not storage.is_file(cfg.backbone_pretrained):
        raise FileNotFoundError(f"backbone_pretrained {cfg.backbone_pretrained!r}: no such checkpoint file")


def plan_run(
    shards: str | os.PathLike,
    output: str | os.PathLike,
    cfg: TrainConfig,
    workers: int = 1,
    resume: bool = False,
    use_gpu: bool | None = None,
    max_failures: int = 0,
) -> TrainRun:
    """Every check that needs no Ray: the recipe, a new run (or ``resume`` of one) in ``output``, and enough
    ``train_split`` samples for one global batch. Creates ``output`` (a local folder; nothing on a store)."""
    _check_recipe(cfg, workers)
    output = storage.normalize(output)
    storage.makedirs(output)
    run_dir = storage.join(output, "ray", RUN_NAME)
    existing = checkpoint_dirs(run_dir)
    if resume and not existing:
        raise FileNotFoundError(f"--resume: no checkpoint under {str(run_dir)!r} to resume from")
    if not resume and storage.exists(run_dir):
        raise FileExistsError(
            f"{str(run_dir)!r} already holds a training run; pass --resume to continue it, "
            "or use a new --output"
        )
    inventory = shard_inventory(shards)
    n_train = split_count(inventory, cfg.train_split)
    if n_train == 0:
        raise ValueError(f"shards {str(shards)!r} hold no sample of split {cfg.train_split!r}")
    steps_per_epoch = n_train // (cfg.batch_size * workers)
    if steps_per_epoch < 1:
        raise ValueError(
            f"{n_train} {cfg.train_split} samples cannot fill one global batch of "
            f"{cfg.batch_size} x {workers} "
            "workers; lower batch_size or workers"
        )
    return TrainRun(shards, output, cfg, workers, resume, use_gpu, max_failures, inventory, n_train,
                    steps_per_epoch, existing)


# Ray Train prints a worker's print() twice when log_to_driver is on: its print patch logs the line through
# the worker's root logger (to stderr) and, because Ray has replaced the worker's sys.stdout, also tees it to
# stdout; both streams reach this terminal. Off, a worker's print goes to stdout once.
WORKER_LOG_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


@contextlib.contextmanager
def _env(name: str, value: str):
    """``os.environ[name] = value`` inside the block only."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def connect_ray_for_training() -> None:
    """Join the job's cluster, or start a private Ray that has a State API.

    Ray Train's ``PlacementGroupCleaner`` (a detached actor that frees the workers' placement group if the
    controller dies) asks the State API, served by the dashboard, whether the controller is alive, every
    second. A private Ray without a dashboard answers every ask with an error that it logs as a warning
    ("Failed to query Ray Train Controller actor state", 610 times in a 10-minute run), and on a machine
    running other Ray instances it cannot even tell which one to ask (its thread dies with a traceback). So a
    private Ray for training gets a dashboard on 127.0.0.1, and every Ray process learns its address from
    ``RAY_API_SERVER_ADDRESS`` (set only while Ray starts: its processes inherit this environment then)."""
    if ray.is_initialized() or cluster_address():
        connect_ray(log_to_driver=True)
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with _env("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{port}"):
        connect_ray(log_to_driver=True, include_dashboard=True, dashboard_host="127.0.0.1",
                    dashboard_port=port)


def build_trainer(run: TrainRun) -> TorchTrainer:
    """Join the job's Ray cluster or start a private one (the workers' progress lines reach this terminal),
    settle ``use_gpu`` (auto: a GPU here or in the cluster) and wire the ``TorchTrainer``: checkpoints go to
    ``OUTPUT/ray`` through the store's pyarrow filesystem, and the workers get this process's store
    configuration (``runtime.storage.storage_env``) to read shards and weights from the same store."""
    connect_ray_for_training()
    if run.use_gpu is None:
        run.use_gpu = torch.cuda.is_available() or ray.cluster_resources().get("GPU", 0) > 0
    resources = {"CPU": run.cfg.cpus_per_worker}
    if run.use_gpu:
        resources["GPU"] = 1
    filesystem, storage_path = storage.arrow_filesystem(run.storage)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": run.cfg.to_dict(),
            "inventory": run.inventory,
            "steps_per_epoch": run.steps_per_epoch,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=run.workers, use_gpu=run.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            storage_path=storage_path,
            storage_filesystem=filesystem,
            name=RUN_NAME,
            worker_runtime_env={"env_vars": {**storage.storage_env(), **WORKER_LOG_ENV}},
            failure_config=ray.train.FailureConfig(max_failures=run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=run.cfg.keep_checkpoints),
        ),
    )


def fit(run: TrainRun, trainer: TorchTrainer) -> tuple[ray.train.Result, float]:
    """Run the workers to the end; returns the result (with its final checkpoint) and the wall time."""
    cfg = run.cfg
    print(
        f"[train] {cfg.model} task={cfg.task} workers={run.workers} gpu={run.use_gpu} train={run.n_train} "
        f"videos steps/epoch={run.steps_per_epoch} epochs={cfg.epochs} batch={cfg.batch_size}x{run.workers}"
        + (f" (resuming from {storage.name(run.existing[-1])})" if run.resume else ""),
        flush=True,
    )
    started = time.perf_counter()
    # Ray Train's fit() installs its own SIGINT handler (Ctrl-C aborts the run) and never puts the old one
    # back: after training, Ctrl-C in this process (the demo's search server, a test session) did nothing.
    in_main_thread = threading.current_thread() is threading.main_thread()
    sigint = signal.getsignal(signal.SIGINT) if in_main_thread else None
    try:
        result = trainer.fit()
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, sigint)
    wall = time.perf_counter() - started
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    return result, wall


def write_outputs(run: TrainRun, result: ray.train.Result, wall: float) -> dict[str, Any]:
    """The final checkpoint's history as ``metrics.jsonl``, ``summary.json`` (returned) and its model as
    ``model.pt``, each a complete file / object on the output's store; ``model.pt`` comes last: it marks a
    finished run."""
    cfg, output = run.cfg, run.output
    with result.checkpoint.as_directory() as ckpt_dir:
        state = load_state_file(storage.join(ckpt_dir, STATE_FILE))
    model_path = storage.join(output, "model.pt")
    history = json.loads(state["history"])
    storage.write_text(storage.join(output, "metrics.jsonl"), "".join(json.dumps(h) + "\n" for h in history))
    evals = [h for h in history if h.get("type") == "eval"]
    summary = {
        "model": cfg.model,
        "task": cfg.task,
        "workers": run.workers,
        "use_gpu": bool(run.use_gpu),
        "steps": int(state["step"]),
        "epochs_done": int(state["epoch"]),
        "wall_s": wall,
        "model_path": model_path,
        "checkpoint": storage.join(run.run_dir, storage.name(result.checkpoint.path)),  # a URI, scheme kept
        "final_val": next((h for h in reversed(evals) if h["split"] == cfg.val_split), None),
        "test": next((h for h in reversed(evals) if h["split"] == cfg.test_split), None),
        "config": cfg.to_dict(),
    }
    storage.write_text(storage.join(output, "summary.json"), json.dumps(summary, indent=2, default=str))
    export_model(state, output)  # model.pt last: the marker that training finished
    return summary


def run_training(
    shards: str | os.PathLike,
    output: str | os.PathLike,
    cfg: TrainConfig,
    workers: int = 1,
    resume: bool = False,
    use_gpu: bool | None = None,
    max_failures: int = 0,
) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` on the shards with a Ray Train ``TorchTrainer`` and export the result.

    Writes under ``output`` (a folder or a URI on any store, e.g. ``s3://bucket/runs/x``):
    ``ray/train/checkpoint_*`` (Ray Train storage), ``metrics.jsonl`` (one JSON object per progress / eval /
    resume event), ``summary.json`` and, last, ``model.pt`` (loadable with
    ``models.create_model(cfg.model, pretrained=output + "/model.pt")``). ``resume=True`` continues the
    run stored in ``output`` from its latest checkpoint; without it an existing run there is an error.
    """
    run = plan_run(shards, output, cfg, workers, resume, use_gpu, max_failures)
    result, wall = fit(run, build_trainer(run))
    summary = write_outputs(run, result, wall)
    line = (
        f"[train] done: {summary['steps']} steps, {summary['epochs_done']} epochs in {wall:.1f}s "
        f"-> {summary['model_path']}"
    )
    if summary["test"] is not None:
        line += f"\n[train] test: {summarize_metrics(summary['test'])}"
    print(line, file=sys.stdout, flush=True)
    return summary


def evaluate_model(
    shards: str | os.PathLike, cfg: TrainConfig, pretrained: str | os.PathLike, split: str | None = None
) -> dict[str, Any]:
    """Evaluate ``cfg.model`` loaded from ``pretrained`` (e.g. ``RUN_DIR/model.pt``) on one split of the
    shards in this process (no Ray), with ``cfg.eval_sampling`` — e.g. to compare clip counts at test time."""
    split = split or cfg.test_split
    inventory = shard_inventory(shards)
    if split_count(inventory, split) == 0:
        raise ValueError(f"shards {str(shards)!r} hold no sample of split {split!r}")
    set_torch_threads(cfg.cpus_per_worker)
    model, transform, _ = create_model(cfg.model, pretrained=str(pretrained))
    objective = build_objective(model, cfg)
    batches = eval_batches(cfg, inventory, split, transform, 0, 1)
    device = torch.device("cpu")
    if cfg.task == "caption":
        metrics = evaluate_caption(objective, batches, device)
    else:
        metrics = evaluate_retrieval(objective, batches, device, cfg.equivalence)
    return {"split": split, "model": cfg.model, "pretrained": str(pretrained),
            "eval_sampling": dict(cfg.eval_sampling), **metrics}


def eval_clip_shape(sampling: dict) -> tuple[int, int]:
    """``(clips, frames per clip)`` of an evaluation sampling (CLIP4Clip mode: one clip of ``max_frames``)."""
    if sampling.get("mode") == "clip4clip":
        return 1, sampling.get("max_frames", 12)
    return sampling["num_clips"], sampling["frames_per_clip"]


def run_eval_only(
    shards: str | os.PathLike,
    output: str | os.PathLike,
    cfg: TrainConfig,
    pretrained: str | os.PathLike | None = None,
    split: str | None = None,
) -> dict[str, Any]:
    """:func:`evaluate_model` of ``pretrained`` (default ``OUTPUT/model.pt``), written to
    ``OUTPUT/eval-<split>-<N>x<T>.json`` and printed as one ``[eval]`` line. Returns the metrics and, under
    ``path``, the file. ``output`` and ``pretrained`` are paths or URIs on any store."""
    weights = str(pretrained) if pretrained else storage.join(output, "model.pt")
    if not storage.is_file(weights):
        raise FileNotFoundError(f"--eval-only: no weights at {weights!r} (train first, or --pretrained)")
    metrics = evaluate_model(shards, cfg, weights, split)
    n, t = eval_clip_shape(cfg.eval_sampling)
    path = storage.join(output, f"eval-{metrics['split']}-{n}x{t}.json")
    storage.write_text(path, json.dumps(metrics, indent=2))
    line = format_metrics(metrics) if "t2v_R@1" in metrics else json.dumps(metrics)
    print(f"[eval] {cfg.model} {metrics['split']} {n}x{t} clips: {line} -> {path}", flush=True)
    return {**metrics, "path": str(path)}

"""The Ray Train worker function :func:`train_loop_per_worker`, as named steps over a :class:`WorkerState`.

``setup_worker`` (config, seed, model, objective, optimiser) -> ``restore_from_ray`` / ``restore_state``
(continue from ``ray.train.get_checkpoint()``) -> DDP (``ray.train.torch.prepare_model``) -> ``run_epochs``
(``train_epoch`` of ``train_step`` s and ``log_progress`` lines, then ``end_epoch``: validation, the final
test, a checkpoint) -> ``finish``. Checkpoints go through a *reporter* (``ray_report`` in a Ray Train worker),
so every step except the first and the last few lines of :func:`train_loop_per_worker` runs without Ray.
"""

from __future__ import annotations

import dataclasses
import json
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from models import create_model
from pipeline.training.config import TrainConfig
from pipeline.training.data import eval_batches, train_batches
from pipeline.training.evaluation import evaluate_caption, evaluate_retrieval, summarize_metrics
from pipeline.training.inventory import split_count
from pipeline.training.objectives import build_objective
from pipeline.training.optim import amp_dtype, build_optimizer
from pipeline.training.state import (
    STATE_FILE,
    STATE_FORMAT,
    all_gather_objects,
    load_state_file,
    optimizer_digest,
    rng_state,
    seed_everything,
    set_rng_state,
)
from runtime.threads import set_torch_threads


@dataclasses.dataclass
class TrainWindow:
    """What happened since the last progress line: its start time, samples, summed loss and steps."""

    t: float = dataclasses.field(default_factory=time.perf_counter)
    samples: int = 0
    loss: float = 0.0
    n: int = 0


@dataclasses.dataclass
class WorkerState:
    """Everything one data-parallel rank holds while it trains. ``objective`` is DDP-wrapped once the
    worker is prepared; ``model`` is always the bare model (what checkpoints store)."""

    cfg: TrainConfig
    inventory: dict[str, dict[str, int]]
    steps_per_epoch: int
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module
    transform: Callable | None
    objective: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    autocast: torch.dtype | None
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    attempt: int = 0  # restarts from a checkpoint so far (fresh data order and seeds per attempt)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    start_step: int = 0
    started: float = dataclasses.field(default_factory=time.perf_counter)
    window: TrainWindow = dataclasses.field(default_factory=TrainWindow)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.epochs

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.world

    @property
    def unwrapped(self) -> torch.nn.Module:
        """The objective without its DDP wrapper (evaluation runs it rank by rank)."""
        return self.objective.module if hasattr(self.objective, "module") else self.objective

    @property
    def has_val(self) -> bool:
        return split_count(self.inventory, self.cfg.val_split) > 0 and self.cfg.eval_every > 0

    @property
    def has_test(self) -> bool:
        return split_count(self.inventory, self.cfg.test_split) > 0


Reporter = Callable[[WorkerState, dict[str, Any]], None]


def _log(rank: int, text: str) -> None:
    if rank == 0:
        print(text, flush=True)


def build_model(cfg: TrainConfig) -> tuple[torch.nn.Module, Callable]:
    """``cfg.model`` from ``cfg.pretrained`` (and ``cfg.backbone_pretrained``), gradient checkpointing on
    when asked; returns ``(model, transform)``."""
    builder_kwargs = {"backbone_pretrained": cfg.backbone_pretrained} if cfg.backbone_pretrained else {}
    model, transform, _ = create_model(cfg.model, pretrained=cfg.pretrained, **builder_kwargs)
    if cfg.grad_checkpointing:
        setter = getattr(model, "set_grad_checkpointing", None)
        if not callable(setter):
            raise ValueError(f"model {cfg.model!r} does not support gradient checkpointing")
        setter(True)
    return model, transform


def setup_worker(loop: dict, rank: int, world: int, device: torch.device) -> WorkerState:
    """A fresh rank: ``loop`` holds ``config`` (a TrainConfig dict), ``inventory`` and ``steps_per_epoch``
    (see :func:`workflows.train.run_training`)."""
    cfg = TrainConfig.from_dict(loop["config"])
    set_torch_threads(cfg.cpus_per_worker)
    seed_everything(cfg.seed + rank)
    model, transform = build_model(cfg)
    objective = build_objective(model, cfg)
    steps_per_epoch = int(loop["steps_per_epoch"])
    optimizer, scheduler = build_optimizer(model, cfg, steps_per_epoch * cfg.epochs)
    autocast = amp_dtype(cfg, device)
    return WorkerState(
        cfg=cfg,
        inventory=loop["inventory"],
        steps_per_epoch=steps_per_epoch,
        rank=rank,
        world=world,
        device=device,
        model=model,
        transform=transform,
        objective=objective,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler("cuda", enabled=autocast == torch.float16),
        autocast=autocast,
    )


def checkpoint_state(state: WorkerState, rngs: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``state.pt`` content: model, optimizer, scheduler, scaler, counters, every rank's RNG states
    (``rngs``), the metric history and the config."""
    return {
        "format": STATE_FORMAT,
        "model_name": state.cfg.model,
        "model": {k: v.detach().cpu() for k, v in state.model.state_dict().items()},
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "step": state.step,
        "epoch": state.epoch,
        "step_in_epoch": state.step_in_epoch,
        "attempt": state.attempt,
        "rng": rngs,
        "history": json.dumps(state.history),
        "config": json.dumps(state.cfg.to_dict()),
    }


def restore_state(state: WorkerState, saved: dict[str, Any]) -> dict[str, Any]:
    """Continue from a loaded ``state.pt`` (:func:`checkpoint_state`); returns the ``resume`` event it adds
    to the history. This rank's RNG states come back when the world size is unchanged, else fresh seeds."""
    cfg = state.cfg
    if saved["model_name"] != cfg.model:
        raise ValueError(f"checkpoint is of model {saved['model_name']!r}, not {cfg.model!r}")
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.scaler.load_state_dict(saved["scaler"])
    state.step, state.epoch = int(saved["step"]), int(saved["epoch"])
    state.step_in_epoch = int(saved["step_in_epoch"])
    state.attempt = int(saved.get("attempt", 0)) + 1
    state.history = json.loads(saved["history"])
    rngs = saved["rng"]
    if len(rngs) == state.world:
        set_rng_state(rngs[state.rank])
    else:
        seed_everything(cfg.seed + state.rank + 7919 * state.attempt)
    resumed = {
        "type": "resume",
        "step": state.step,
        "epoch": state.epoch,
        "step_in_epoch": state.step_in_epoch,
        "optimizer_digest": optimizer_digest(state.optimizer.state_dict()),
        "scheduler_last_epoch": int(state.scheduler.last_epoch),
        "world_size": state.world,
    }
    state.history.append(resumed)
    _log(
        state.rank,
        f"[train] resumed at step {state.step} (epoch {state.epoch}, step {state.step_in_epoch} of it)",
    )
    return resumed


def restore_from_ray(state: WorkerState) -> None:
    """:func:`restore_state` from ``ray.train.get_checkpoint()`` when Ray Train hands one (a resume, or a
    restart after a worker failure)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return
    with checkpoint.as_directory() as ckpt_dir:
        saved = load_state_file(Path(ckpt_dir) / STATE_FILE)
    restore_state(state, saved)


def ray_report(state: WorkerState, metrics: dict[str, Any]) -> None:
    """The reporter of a Ray Train worker: every rank reports; rank 0 attaches the checkpoint (all ranks'
    RNG states gathered into it)."""
    rngs = all_gather_objects(rng_state())
    if state.rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="vidsift-ckpt-") as tmp:
        torch.save(checkpoint_state(state, rngs), Path(tmp) / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def train_step(state: WorkerState, batch: dict[str, Any]) -> float:
    """One optimizer step on ``batch`` (one random caption per video): forward under autocast, scaled
    backward, gradient clipping, optimizer and scheduler step. Returns the loss."""
    cfg, device = state.cfg, state.device
    frames = batch["frames"].to(device, non_blocking=True)
    mask = batch["mask"].to(device)
    captions = [random.choice(c) for c in batch["captions"]]
    with torch.autocast(device.type, dtype=state.autocast, enabled=state.autocast is not None):
        loss = state.objective(frames, mask, captions)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {float(loss)} at step {state.step}")
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if cfg.grad_clip > 0:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(state.objective.parameters(), cfg.grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    state.step += 1
    state.step_in_epoch += 1
    value = float(loss.detach())
    state.window.loss += value
    state.window.n += 1
    state.window.samples += state.global_batch
    return value


def log_progress(state: WorkerState) -> dict[str, Any]:
    """Add a ``train`` event (mean loss, peak lr, samples/s and ETA over the window) to the history, print
    it on rank 0 and open a new window."""
    cfg, window = state.cfg, state.window
    now = time.perf_counter()
    rate = window.samples / max(now - window.t, 1e-9)
    remaining = (min(state.total_steps, cfg.max_steps or state.total_steps) - state.step) * state.global_batch
    line = {
        "type": "train",
        "step": state.step,
        "epoch": state.epoch,
        "loss": window.loss / window.n,
        "lr": max(state.scheduler.get_last_lr()),  # the peak group (a frozen backbone reads 0)
        "samples_per_s": rate,
        "eta_s": remaining / max(rate, 1e-9),
        "elapsed_s": now - state.started,
    }
    state.history.append(line)
    _log(
        state.rank,
        f"[train] step {state.step}/{state.total_steps} epoch {state.epoch} loss {line['loss']:.4f} "
        f"lr {line['lr']:.2e} {rate:.1f} samples/s ETA {line['eta_s']:.0f}s",
    )
    state.window = TrainWindow(t=now)
    return line


def train_epoch(state: WorkerState, batches: Iterator[dict[str, Any]], report: Reporter) -> bool:
    """The rest of the current epoch (from ``step_in_epoch``). Returns True when ``max_steps`` stopped it
    before its end (:func:`finish` then checkpoints; at an epoch end the epoch checkpoint serves)."""
    cfg = state.cfg
    while state.step_in_epoch < state.steps_per_epoch:
        loss = train_step(state, next(batches))
        epoch_done = state.step_in_epoch == state.steps_per_epoch
        if state.step % cfg.log_every == 0 or epoch_done:
            log_progress(state)
        if cfg.max_steps is not None and state.step >= cfg.max_steps and not epoch_done:
            return True
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and not epoch_done:
            report(state, {"step": state.step, "epoch": state.epoch, "loss": loss})
    return False


def evaluate_split(state: WorkerState, split: str) -> dict[str, Any]:
    """This rank's share of ``split`` through the evaluation of the task; every rank gets the same metrics."""
    cfg = state.cfg
    batches = eval_batches(cfg, state.inventory, split, state.transform, state.rank, state.world)
    if cfg.task == "caption":
        return evaluate_caption(state.unwrapped, batches, state.device, state.autocast)
    return evaluate_retrieval(state.unwrapped, batches, state.device, cfg.equivalence, state.autocast)


def end_epoch(state: WorkerState, report: Reporter) -> dict[str, Any]:
    """Close an epoch: validation every ``eval_every`` epochs, the test split after the last epoch, and a
    report with a checkpoint. Returns the reported metrics."""
    cfg = state.cfg
    state.epoch += 1
    state.step_in_epoch = 0
    metrics: dict[str, Any] = {"step": state.step, "epoch": state.epoch}
    if state.has_val and state.epoch % cfg.eval_every == 0:
        t0 = time.perf_counter()
        val = evaluate_split(state, cfg.val_split)
        state.history.append(
            {
                "type": "eval",
                "split": cfg.val_split,
                "step": state.step,
                "epoch": state.epoch,
                "eval_s": time.perf_counter() - t0,
                **val,
            }
        )
        metrics.update({f"val_{k}": v for k, v in val.items() if isinstance(v, (int, float))})
        _log(state.rank, f"[eval] epoch {state.epoch} {cfg.val_split}: {summarize_metrics(val)}")
    if state.epoch == cfg.epochs and state.has_test:
        test = evaluate_split(state, cfg.test_split)
        state.history.append(
            {"type": "eval", "split": cfg.test_split, "step": state.step, "epoch": state.epoch, **test}
        )
        metrics.update({f"test_{k}": v for k, v in test.items() if isinstance(v, (int, float))})
        _log(state.rank, f"[eval] final {cfg.test_split}: {summarize_metrics(test)}")
    report(state, metrics)
    state.window = TrainWindow()  # the next progress window leaves the evaluation time out
    return metrics


def run_epochs(state: WorkerState, report: Reporter) -> bool:
    """Epoch after epoch until ``cfg.epochs`` or ``max_steps``; True when ``max_steps`` stopped mid-epoch."""
    cfg = state.cfg
    while state.epoch < cfg.epochs:
        batches = train_batches(
            cfg, state.inventory, state.epoch, state.attempt, state.transform, state.rank, state.world
        )
        if train_epoch(state, batches, report):
            return True
        end_epoch(state, report)
        if cfg.max_steps is not None and state.step >= cfg.max_steps:
            break
    return False


def finish(state: WorkerState, stopped: bool, report: Reporter) -> None:
    """A run stopped by ``max_steps`` mid-epoch records it and checkpoints; then the worker's last line."""
    if stopped:
        state.history.append(
            {"type": "stopped", "step": state.step, "epoch": state.epoch, "reason": "max_steps"}
        )
        report(state, {"step": state.step, "epoch": state.epoch, "stopped_at_max_steps": True})
    elapsed = time.perf_counter() - state.started
    _log(state.rank, f"[train] worker done: {state.step - state.start_step} steps in {elapsed:.1f}s")


def train_loop_per_worker(loop: dict) -> None:
    """Ray Train worker function. ``loop`` holds ``config`` (a TrainConfig dict), ``inventory`` and
    ``steps_per_epoch``; see :func:`workflows.train.run_training`."""
    ctx = ray.train.get_context()
    state = setup_worker(loop, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())
    restore_from_ray(state)
    state.objective = ray.train.torch.prepare_model(
        state.objective, parallel_strategy_kwargs={"find_unused_parameters": state.cfg.find_unused_parameters}
    )
    state.start_step, state.started, state.window = state.step, time.perf_counter(), TrainWindow()
    stopped = run_epochs(state, ray_report)
    finish(state, stopped, ray_report)

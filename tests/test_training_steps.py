"""The named steps of the training worker (pipeline.training.loop) and its pieces, one at a time, in this
process (no Ray Train): config round trip, parameter groups, schedule, checkpoint state save/restore, one
training step, one epoch with its reports, evaluation metrics, and a whole in-process run over real shards."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import yaml

from models import create_model
from pipeline.training import (
    STATE_FILE,
    TrainConfig,
    build_optimizer,
    collate,
    evaluate_retrieval,
    frozen_until,
    load_state_file,
    load_train_config,
    optimizer_digest,
    parameter_groups,
    rng_state,
    shard_inventory,
    split_count,
    warmup_cosine,
    with_sampling_flags,
)
from pipeline.training.loop import (
    WorkerState,
    checkpoint_state,
    evaluate_split,
    finish,
    log_progress,
    restore_state,
    run_epochs,
    setup_worker,
    train_epoch,
    train_step,
)
from pipeline.training.optim import amp_dtype

MODEL = "clip4clip-meanP-tiny"
CPU = torch.device("cpu")


def tiny_config(**overrides) -> TrainConfig:
    base = dict(
        model=MODEL,
        epochs=1,
        batch_size=4,
        eval_batch_size=8,
        lr=1e-3,
        size=32,
        train_sampling={"num_clips": 1, "frames_per_clip": 2, "mode": "train"},
        eval_sampling={"num_clips": 2, "frames_per_clip": 2, "mode": "eval"},
        shuffle_buffer=8,
        log_every=1,
    )
    return TrainConfig(**{**base, **overrides})


def worker(cfg: TrainConfig, steps_per_epoch: int = 4, inventory: dict | None = None) -> WorkerState:
    loop = {"config": cfg.to_dict(), "inventory": inventory or {}, "steps_per_epoch": steps_per_epoch}
    return setup_worker(loop, rank=0, world=1, device=CPU)


def fake_batch(transform, b: int = 4, n: int = 1, t: int = 2, seed: int = 0) -> dict:
    """A collated batch of ``b`` random videos, each of its own caption class with two captions."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (b, n, t, 32, 32, 3), dtype=np.uint8)
    samples = [
        {
            "frames": frames[i],
            "mask": np.ones((n, t), dtype=bool),
            "captions": [f"a shape number {i} moves", f"video {i}"],
            "video_id": f"v{i:02d}",
            "meta": {"caption_class": f"class{i}"},
        }
        for i in range(b)
    ]
    return collate(samples, transform)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------------- config


def test_config_round_trips_through_dict_and_yaml(tmp_path):
    cfg = tiny_config(betas=(0.8, 0.9), max_steps=7, backbone_lr_scale=0.1)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_train_config(path) == cfg
    longer = TrainConfig.from_dict({**cfg.to_dict(), "epochs": 3})
    assert load_train_config(path, {"epochs": 3, "lr": None}) == longer


def test_sampling_flags_override_only_what_is_given():
    cfg = tiny_config(eval_sampling={"num_clips": 4, "frames_per_clip": 4, "mode": "eval", "stride": 2})
    assert with_sampling_flags(cfg) is cfg
    out = with_sampling_flags(cfg, eval_clips=1, sample_fps=2.0)
    assert out.eval_sampling == {"num_clips": 1, "frames_per_clip": 4, "mode": "eval", "fps": 2.0}
    assert out.train_sampling == {**cfg.train_sampling, "fps": 2.0}
    assert with_sampling_flags(cfg, train_frames=3).train_sampling["frames_per_clip"] == 3
    with pytest.raises(ValueError, match="eval_sampling"):
        with_sampling_flags(cfg, eval_clips=0)


# ------------------------------------------------------------------------------------- optimiser, schedule


def test_parameter_groups_hold_every_trainable_parameter_once():
    model, _, _ = create_model(MODEL, seed=0)
    groups = parameter_groups(model, tiny_config(backbone_lr_scale=0.5))
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)
    assert all(g["weight_decay"] == 0.0 for g in groups if g["name"].endswith("_no_decay"))
    # a model without a param_groups helper: one lr, no decay on 1-D tensors
    plain = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    groups = parameter_groups(plain, tiny_config(weight_decay=0.3))
    assert [g["name"] for g in groups] == ["all", "all_no_decay"]
    assert [len(g["params"]) for g in groups] == [1, 3] and groups[0]["weight_decay"] == 0.3


def test_schedule_warms_up_decays_and_freezes():
    f = warmup_cosine(total_steps=20, warmup_steps=4)
    assert [f(s) for s in range(4)] == pytest.approx([1 / 5, 2 / 5, 3 / 5, 4 / 5])
    assert f(4) == 1.0 and f(20) == pytest.approx(0.0, abs=1e-12)
    frozen = frozen_until(5, f)
    assert [frozen(s) for s in range(5)] == [0.0] * 5 and frozen(5) == f(5)
    model, _, _ = create_model(MODEL, seed=0)
    cfg = tiny_config(warmup_fraction=0.2)
    optimizer, scheduler = build_optimizer(model, cfg, total_steps=20)
    for step in range(6):
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            assert lr == pytest.approx(group["initial_lr"] * f(step))
        optimizer.step()
        scheduler.step()
    assert amp_dtype(cfg, CPU) is None  # AMP is a GPU feature


# ------------------------------------------------------------------------------------------------ the steps


def test_setup_worker_builds_the_pieces():
    state = worker(tiny_config(epochs=3), steps_per_epoch=5)
    assert state.total_steps == 15 and state.global_batch == 4
    assert state.objective.model is state.model and state.unwrapped is state.objective
    assert (state.step, state.epoch, state.step_in_epoch, state.attempt) == (0, 0, 0, 0)
    assert not state.has_val and not state.has_test  # no shards in the inventory
    assert state.scheduler.get_last_lr()[0] == pytest.approx(1e-3 / 3)  # warmup: round(0.1 * 15) = 2 steps


def test_one_train_step_changes_the_weights():
    state = worker(tiny_config())
    before = weights(state.model)
    loss = train_step(state, fake_batch(state.transform))
    assert math.isfinite(loss) and loss > 0
    assert (state.step, state.step_in_epoch) == (1, 1)
    assert state.window.n == 1 and state.window.samples == 4 and state.window.loss == pytest.approx(loss)
    after = state.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "no weight moved"
    assert all(int(s["step"]) == 1 for s in state.optimizer.state_dict()["state"].values())
    line = log_progress(state)
    assert line["type"] == "train" and line["step"] == 1 and line["loss"] == pytest.approx(loss)
    assert state.history == [line] and state.window.n == 0


def test_checkpoint_state_save_and_restore_round_trip(tmp_path):
    cfg = tiny_config()
    state = worker(cfg)
    train_step(state, fake_batch(state.transform))
    log_progress(state)
    torch.save(checkpoint_state(state, [rng_state()]), tmp_path / STATE_FILE)
    expected_draws = (random.random(), np.random.rand(), torch.rand(1).item())
    saved = load_state_file(tmp_path / STATE_FILE)
    assert saved["step"] == 1 and saved["step_in_epoch"] == 1 and saved["model_name"] == MODEL

    fresh = worker(cfg)
    fresh.model.load_state_dict({k: torch.zeros_like(v) for k, v in fresh.model.state_dict().items()})
    resumed = restore_state(fresh, saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected_draws  # this rank's RNG
    for name, tensor in state.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[name], tensor), name
    assert optimizer_digest(fresh.optimizer.state_dict()) == optimizer_digest(state.optimizer.state_dict())
    assert resumed == {"type": "resume", "step": 1, "epoch": 0, "step_in_epoch": 1, "world_size": 1,
                       "optimizer_digest": resumed["optimizer_digest"], "scheduler_last_epoch": 1}
    assert fresh.history == [*state.history, resumed] and fresh.attempt == 1
    assert fresh.scheduler.get_last_lr() == state.scheduler.get_last_lr()
    # the restored worker trains on exactly as the original does
    batch = fake_batch(state.transform, seed=1)
    random.seed(5)
    torch.manual_seed(5)
    a = train_step(state, batch)
    random.seed(5)
    torch.manual_seed(5)
    assert train_step(fresh, batch) == pytest.approx(a, rel=1e-6)

    other = worker(TrainConfig.from_dict({**cfg.to_dict(), "model": "clip4clip-seqTransf-tiny"}))
    with pytest.raises(ValueError, match="checkpoint is of model"):
        restore_state(other, saved)
    two_ranks = {**saved, "rng": saved["rng"] * 2}  # another world size: fresh seeds, not the RNG states
    assert restore_state(worker(cfg), two_ranks)["world_size"] == 1


def test_train_epoch_reports_checkpoints_and_stops_at_max_steps():
    reports: list[dict] = []
    state = worker(tiny_config(checkpoint_every=1, log_every=2), steps_per_epoch=3)
    batches = iter([fake_batch(state.transform, seed=i) for i in range(3)])
    assert train_epoch(state, batches, lambda s, m: reports.append(m)) is False
    assert state.step == 3 and state.step_in_epoch == 3
    assert [m["step"] for m in reports] == [1, 2]  # the epoch end's report is end_epoch's
    assert [h["step"] for h in state.history] == [2, 3]  # every log_every steps and at the epoch end

    reports.clear()
    state = worker(tiny_config(checkpoint_every=1, max_steps=2), steps_per_epoch=3)
    batches = iter([fake_batch(state.transform, seed=i) for i in range(3)])
    assert train_epoch(state, batches, lambda s, m: reports.append(m)) is True
    assert state.step == 2 and [m["step"] for m in reports] == [1]
    finish(state, True, lambda s, m: reports.append(m))
    assert state.history[-1] == {"type": "stopped", "step": 2, "epoch": 0, "reason": "max_steps"}
    assert reports[-1] == {"step": 2, "epoch": 0, "stopped_at_max_steps": True}


def test_evaluation_step_returns_retrieval_metrics():
    state = worker(tiny_config())
    batch = fake_batch(state.transform)
    metrics = evaluate_retrieval(state.objective, [batch, batch], CPU, "caption_class")  # duplicates merge
    assert metrics["num_videos"] == 4 and metrics["num_texts"] == 8
    assert metrics["equivalence"] == "caption_class"
    for key in ("t2v_R@1", "t2v_R@5", "v2t_R@1"):
        assert 0.0 <= metrics[key] <= 1.0
    assert 1.0 <= metrics["t2v_MnR"] <= 4.0
    assert state.objective.training  # evaluation leaves the training mode as it found it


def test_steps_run_a_whole_epoch_over_shards_without_ray_train(ingested_shards):
    """setup -> run_epochs (train_epoch + end_epoch: validation, test, reports) -> finish, in this process."""
    inventory = shard_inventory(ingested_shards)
    cfg = tiny_config(batch_size=2)
    state = worker(cfg, steps_per_epoch=2, inventory=inventory)
    reports: list[dict] = []
    stopped = run_epochs(state, lambda s, m: reports.append(m))
    finish(state, stopped, lambda s, m: reports.append(m))
    assert not stopped and (state.step, state.epoch, state.step_in_epoch) == (2, 1, 0)
    assert [h["step"] for h in state.history if h["type"] == "train"] == [1, 2]
    evals = {h["split"]: h for h in state.history if h["type"] == "eval"}
    assert set(evals) == {s for s in ("val", "test") if split_count(inventory, s) > 0}
    assert evals["test"]["num_videos"] == split_count(inventory, "test")
    assert len(reports) == 1 and reports[0]["epoch"] == 1
    assert reports[0]["test_t2v_R@1"] == evals["test"]["t2v_R@1"]
    assert evaluate_split(state, "test")["t2v_R@1"] == evals["test"]["t2v_R@1"]  # deterministic

"""The Ray Train fine-tuning loop: recipe parsing, schedule, batching, and a real two-worker CPU run that is
stopped at --max-steps and resumed from its checkpoint with the step counter and optimizer state intact."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.train import main as train_main
from models import create_model, save_checkpoint
from pipeline.retrieval_eval import retrieval_metrics
from pipeline.training import (
    TrainConfig,
    build_optimizer,
    checkpoint_dirs,
    collate,
    distinct_batches,
    embed_split,
    load_state_file,
    load_train_config,
    make_dataset,
    optimizer_digest,
    rng_state,
    set_rng_state,
    shard_inventory,
    shards_with,
    split_count,
    warmup_cosine,
)
from workflows.train import evaluate_model, run_training

REPO = Path(__file__).resolve().parents[1]


def test_config_yaml_overrides_and_unknown_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: clip4clip-meanP-tiny\nlr: 0.001\nepochs: 3\nbetas: [0.9, 0.95]\n")
    cfg = load_train_config(path, {"epochs": 5, "lr": None})
    assert cfg.model == "clip4clip-meanP-tiny" and cfg.epochs == 5 and cfg.lr == 0.001
    assert cfg.betas == (0.9, 0.95)
    path.write_text("model: x\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        load_train_config(path)
    with pytest.raises(ValueError, match="task"):
        TrainConfig(model="x", task="segmentation")
    with pytest.raises(ValueError, match="train_sampling"):
        TrainConfig(model="x", train_sampling={"num_clips": 0})
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_train_config(tmp_path / "nope.yaml")


def test_shipped_configs_parse():
    configs = sorted((REPO / "configs" / "train").glob("*.yaml"))
    assert len(configs) >= 4
    for path in configs:
        cfg = load_train_config(path)
        assert cfg.model, path


def test_warmup_cosine_schedule():
    f = warmup_cosine(total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(1 / 11)
    assert f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    values = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_distinct_batches_avoid_class_collisions():
    samples = [{"meta": {"c": c}, "i": i} for i, c in enumerate("aabbccddaabb")]
    batches = list(distinct_batches(samples, 4, lambda s: s["meta"]["c"]))
    assert sum(len(b) for b in batches) == len(samples)  # nothing is lost
    assert sorted(s["i"] for b in batches for s in b) == list(range(len(samples)))
    assert [len(b) for b in batches] == [4, 4, 2, 2]
    assert all(len({s["meta"]["c"] for s in b}) == len(b) for b in batches)
    # without a key: plain chunks in order
    plain = list(distinct_batches(samples, 5, None))
    assert [len(b) for b in plain] == [5, 5, 2]


def test_param_groups_split_backbone_and_new_modules():
    model, _, _ = create_model("clip4clip-seqTransf-tiny")
    cfg = TrainConfig(model="clip4clip-seqTransf-tiny", lr=1e-4, backbone_lr_scale=1e-3, weight_decay=0.2)
    optimizer, scheduler = build_optimizer(model, cfg, total_steps=50)
    lrs = {g["name"]: g["initial_lr"] for g in optimizer.param_groups}
    assert lrs["backbone"] == pytest.approx(1e-7) and lrs["new"] == pytest.approx(1e-4)
    decay = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert decay["backbone"] == 0.2 and decay["backbone_no_decay"] == 0.0
    n_params = sum(len(g["params"]) for g in optimizer.param_groups)
    assert n_params == sum(1 for p in model.parameters() if p.requires_grad)
    # warmup: the first step runs at 1/(warmup+1) of the peak
    assert scheduler.get_last_lr()[0] == pytest.approx(optimizer.param_groups[0]["initial_lr"] / 6)


def test_backbone_freeze_holds_only_the_backbone(tmp_path):
    """backbone_freeze_fraction: backbone lr 0 for that share of the steps, then the normal schedule;
    the new modules follow warmup + cosine from step 0."""
    model, _, _ = create_model("swinbert-tiny", image_size=32, num_frames=4)
    cfg = TrainConfig(model="swinbert-tiny", task="caption", lr=1e-3, backbone_lr_scale=0.5,
                      backbone_freeze_fraction=0.4, warmup_fraction=0.1)
    optimizer, scheduler = build_optimizer(model, cfg, total_steps=10)
    names = [g["name"] for g in optimizer.param_groups]
    backbone = [i for i, n in enumerate(names) if n.startswith("backbone")]
    other = [i for i, n in enumerate(names) if not n.startswith("backbone")]
    assert backbone and other
    seen = []
    for _ in range(10):
        lrs = scheduler.get_last_lr()
        seen.append((max(lrs[i] for i in backbone), min(lrs[i] for i in other)))
        optimizer.step()
        scheduler.step()
    assert all(b == 0.0 for b, _ in seen[:4]) and all(o > 0 for _, o in seen)
    assert seen[4][0] > 0 and seen[4][0] == pytest.approx(seen[4][1] * 0.5)
    with pytest.raises(ValueError, match="backbone_freeze_fraction"):
        TrainConfig(model="swinbert-tiny", backbone_freeze_fraction=1.0)


def test_missing_backbone_checkpoint_fails_before_ray_starts(tmp_path):
    cfg = TrainConfig(model="swinbert-tiny", task="caption", backbone_pretrained=str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match="backbone_pretrained .*nope.pt"):
        run_training(tmp_path / "shards", tmp_path / "out", cfg)
    assert not (tmp_path / "out").exists()


def test_tower_captioner_without_its_retrieval_checkpoint_is_refused(tmp_path):
    """A captioner over a CLIP4Clip video tower trains only on a trained tower, never on a random one."""
    cfg = TrainConfig(model="swinbert-clip4clip-tiny-p4", task="caption", backbone_lr_scale=0.0)
    with pytest.raises(ValueError, match="trained 'clip4clip-meanP-3d-tiny-p4'.*backbone_pretrained"):
        run_training(tmp_path / "shards", tmp_path / "out", cfg)
    assert not (tmp_path / "out").exists()


def test_rng_state_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_two_worker_run_stops_and_resumes(ingested_shards, ray_local, tmp_path):
    """Real Ray Train run with 2 CPU workers (DDP over gloo): stop at step 2, resume, finish the epoch."""
    inventory = shard_inventory(ingested_shards)
    n_train = split_count(inventory, "train")
    assert n_train >= 8
    cfg = TrainConfig(
        model="clip4clip-meanP-tiny",
        epochs=1,
        batch_size=2,
        eval_batch_size=8,
        lr=1e-3,
        size=32,
        train_sampling={"num_clips": 1, "frames_per_clip": 2, "mode": "train"},
        eval_sampling={"num_clips": 2, "frames_per_clip": 2, "mode": "eval"},
        shuffle_buffer=8,
        log_every=1,
        max_steps=2,
    )
    out = tmp_path / "run"
    first = run_training(ingested_shards, out, cfg, workers=2)
    assert first["steps"] == 2 and first["epochs_done"] == 0
    ckpts = checkpoint_dirs(out / "ray" / "train")
    assert ckpts, "no checkpoint written"
    saved = load_state_file(Path(ckpts[-1]) / "state.pt")
    assert saved["step"] == 2 and saved["epoch"] == 0 and saved["step_in_epoch"] == 2
    assert len(saved["rng"]) == 2  # both ranks' RNG states
    assert saved["scheduler"]["last_epoch"] == 2
    saved_digest = optimizer_digest(saved["optimizer"])
    assert all(int(s["step"]) == 2 for s in saved["optimizer"]["state"].values())

    with pytest.raises(FileExistsError, match="--resume"):
        run_training(ingested_shards, out, cfg, workers=2)

    steps_per_epoch = n_train // (cfg.batch_size * 2)
    cfg.max_steps = None
    second = run_training(ingested_shards, out, cfg, workers=2, resume=True)
    assert second["steps"] == steps_per_epoch and second["epochs_done"] == 1
    history = _read_jsonl(out / "metrics.jsonl")
    resume = [h for h in history if h["type"] == "resume"]
    assert len(resume) == 1
    assert resume[0]["step"] == 2 and resume[0]["scheduler_last_epoch"] == 2
    assert resume[0]["optimizer_digest"] == saved_digest
    train_steps = [h["step"] for h in history if h["type"] == "train"]
    assert train_steps == list(range(1, steps_per_epoch + 1))  # no step repeated or skipped
    test_eval = [h for h in history if h["type"] == "eval" and h["split"] == "test"]
    assert len(test_eval) == 1 and 0.0 <= test_eval[0]["t2v_R@1"] <= 1.0
    assert test_eval[0]["num_videos"] == split_count(inventory, "test")
    assert test_eval[0]["equivalence"] == "caption_class"

    # the exported model loads through the registry and holds the final weights
    final = load_state_file(Path(checkpoint_dirs(out / "ray" / "train")[-1]) / "state.pt")
    assert final["step"] == steps_per_epoch
    assert all(int(s["step"]) == steps_per_epoch for s in final["optimizer"]["state"].values())
    model, _, _ = create_model("clip4clip-meanP-tiny", pretrained=str(out / "model.pt"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, final["model"][name]), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test"]["split"] == "test"
    # evaluating the exported model alone (no Ray) reproduces the in-training test numbers exactly
    again = evaluate_model(ingested_shards, cfg, out / "model.pt")
    for key in ("t2v_R@1", "t2v_R@5", "t2v_MnR", "v2t_R@1", "v2t_MnR"):
        assert again[key] == pytest.approx(test_eval[0][key]), key


@pytest.mark.slow
def test_caption_task_trains_swinbert(ingested_shards, ray_local, tmp_path):
    """--task caption: SwinBERT MLM loss through the same loop; eval = held-out MLM loss + caption metrics."""
    cfg = load_train_config(
        REPO / "configs" / "train" / "tiny-swinbert-caption.yaml",
        {"epochs": 1, "batch_size": 2, "eval_batch_size": 4, "dataloader_workers": 0, "log_every": 1},
    )
    out = tmp_path / "cap"
    summary = run_training(ingested_shards, out, cfg, workers=1)
    assert summary["task"] == "caption" and summary["epochs_done"] == 1
    test = summary["test"]
    assert math.isfinite(test["mlm_loss"]) and test["mlm_loss"] > 0
    assert "CIDEr-D" in test and "BLEU-4" in test
    losses = [h["loss"] for h in _read_jsonl(out / "metrics.jsonl") if h["type"] == "train"]
    assert losses and all(math.isfinite(v) for v in losses)
    model, _, _ = create_model("swinbert-tiny", pretrained=str(out / "model.pt"))
    assert hasattr(model, "generate")


def _tiny_eval_config(**overrides) -> TrainConfig:
    return TrainConfig(
        model="clip4clip-meanP-tiny",
        size=32,
        eval_batch_size=4,
        eval_sampling={"num_clips": 2, "frames_per_clip": 2, "mode": "eval"},
        **overrides,
    )


def test_embed_split_matches_a_direct_model_call(ingested_shards, tmp_path):
    """embed_split (what the trainer's evaluation sees) = the model called directly on the same clips:
    one row per test video sorted by video_id, every caption of it, its caption class."""
    model, transform, _ = create_model("clip4clip-meanP-tiny", seed=0)
    weights = save_checkpoint(model, tmp_path / "untrained.pt")
    cfg = _tiny_eval_config()
    video_emb, text_emb, owners, classes = embed_split(ingested_shards, cfg, weights, "test")

    inventory = shard_inventory(ingested_shards)
    dataset = make_dataset(shards_with(inventory, "test"), "test", cfg.eval_sampling, cfg.size, cfg.seed,
                           False, 0, 0, 1)
    samples = sorted(dataset, key=lambda s: s["video_id"])
    n_videos = split_count(inventory, "test")
    assert len(samples) == n_videos and len({s["video_id"] for s in samples}) == n_videos
    batch = collate(samples, transform)
    model.eval()
    with torch.no_grad():
        direct_video = model.encode_video(batch["frames"], batch["mask"]).numpy()
        direct_text = model.encode_text([c for caps in batch["captions"] for c in caps]).numpy()
    direct_owners = np.concatenate([np.full(len(c), j) for j, c in enumerate(batch["captions"])])

    dim = model.encode_text(["x"]).shape[-1]
    assert video_emb.shape == (n_videos, dim) and text_emb.shape == (len(direct_owners), dim)
    assert video_emb.dtype == np.float32 and text_emb.dtype == np.float32
    np.testing.assert_array_equal(owners, direct_owners)
    np.testing.assert_allclose(video_emb, direct_video, atol=1e-5)
    np.testing.assert_allclose(text_emb, direct_text, atol=1e-5)
    assert classes == [s["meta"]["caption_class"] for s in samples]
    assert np.allclose(np.linalg.norm(video_emb, axis=1), 1.0, atol=1e-4)
    # without an equivalence field there are no classes; the embeddings stay the same
    _, _, _, none = embed_split(ingested_shards, _tiny_eval_config(equivalence=None), weights, "test")
    assert none is None


def test_eval_only_job_reports_and_writes_the_metrics(ingested_shards, tmp_path, capsys):
    """`jobs.train --eval-only` on an untrained tiny checkpoint: the metrics it prints and writes are those
    of evaluate_model and of retrieval_metrics over embed_split (the same evaluation, three ways)."""
    run = tmp_path / "run"
    model, _, _ = create_model("clip4clip-meanP-tiny", seed=0)
    save_checkpoint(model, run / "model.pt")
    argv = ["--eval-only", "--shards", str(ingested_shards), "--model", "clip4clip-meanP-tiny",
            "--output", str(run), "--size", "32", "--eval-clips", "2", "--eval-frames", "2",
            "--eval-batch-size", "4"]
    assert train_main(argv) == 0
    out = capsys.readouterr().out
    path = run / "eval-test-2x2.json"
    assert "[eval] clip4clip-meanP-tiny test 2x2 clips: t2v R@1 " in out and str(path) in out
    written = json.loads(path.read_text())
    assert written["split"] == "test" and written["model"] == "clip4clip-meanP-tiny"
    assert written["pretrained"] == str(run / "model.pt")
    assert written["eval_sampling"] == {"num_clips": 2, "frames_per_clip": 2, "mode": "eval"}
    assert written["num_videos"] == split_count(shard_inventory(ingested_shards), "test")
    assert written["equivalence"] == "caption_class"

    cfg = _tiny_eval_config()
    direct = evaluate_model(ingested_shards, cfg, run / "model.pt")
    video_emb, text_emb, owners, classes = embed_split(ingested_shards, cfg, run / "model.pt")
    recomputed = retrieval_metrics(text_emb.astype(np.float64) @ video_emb.astype(np.float64).T, owners,
                                   equivalence=classes)
    for key in ("t2v_R@1", "t2v_R@5", "t2v_R@10", "t2v_MdR", "t2v_MnR", "v2t_R@1", "v2t_MnR", "num_texts"):
        assert written[key] == pytest.approx(direct[key]) == pytest.approx(recomputed[key]), key

    # another split and --pretrained; missing weights are a clear error (exit 2)
    other = tmp_path / "other"
    assert train_main([*argv[:5], "--output", str(other), "--pretrained", str(run / "model.pt"),
                       "--size", "32", "--eval-clips", "1", "--eval-frames", "2", "--split", "val"]) == 0
    assert json.loads((other / "eval-val-1x2.json").read_text())["split"] == "val"
    capsys.readouterr()
    assert train_main([*argv[:5], "--output", str(tmp_path / "empty")]) == 2
    assert "no weights" in capsys.readouterr().err


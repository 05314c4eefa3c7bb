"""Trained models are artifacts on any store: checkpoints saved to and loaded from S3 (a moto server that
speaks the real S3 HTTP API), inference models that refuse to run without weights, and a short
``jobs.train`` run whose checkpoints, resume, metrics and ``model.pt`` all live on S3."""

from __future__ import annotations

import json
import os

import pytest
import torch

import models
from jobs.train import main as train_main
from models import (
    MissingWeightsError,
    PretrainedWeightsError,
    RandomInitWarning,
    create_inference_model,
    create_model,
    is_vidsift_checkpoint,
    load_checkpoint,
    recorded_eval_sampling,
    save_checkpoint,
)
from pipeline.training import checkpoint_dirs, load_state_file
from runtime import storage


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private VIDSIFT_CACHE (remote weights are downloaded there, and only there)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(storage.CACHE_ENV, str(folder))
    return folder


@pytest.fixture
def clean_cwd(tmp_path, monkeypatch):
    """Run in an empty working directory, to prove that nothing is written to local disk there."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_checkpoint_round_trip_through_s3(s3_bucket, cache):
    model, _, _ = create_model("clip4clip-meanP-tiny", seed=3)
    uri = f"{s3_bucket}/models/c4c/model.pt"
    extra = {"eval_sampling": {"num_clips": 2, "frames_per_clip": 2, "mode": "eval"}}
    assert save_checkpoint(model, uri, extra=extra) == uri
    assert storage.is_file(uri) and storage.list_files(f"{s3_bucket}/models/c4c") == [uri]  # no temp left
    assert is_vidsift_checkpoint(uri) and load_checkpoint(uri)["model_name"] == "clip4clip-meanP-tiny"
    assert recorded_eval_sampling(uri) == extra["eval_sampling"]

    loaded, _, _ = create_model("clip4clip-meanP-tiny", pretrained=uri)
    assert loaded.model_id == model.model_id and loaded.pretrained == uri  # the card records the URI
    served, _, _ = create_inference_model("clip4clip-meanP-tiny", pretrained=uri)
    assert served.model_id == model.model_id
    assert any(cache.rglob("model.pt")), "remote weights are read from the local cache"
    assert models.resolve_weights(uri).read_bytes() == storage.read_bytes(uri)


def test_family_loaders_take_uris(s3_bucket, cache):
    """Video Swin (pretrained= and as SwinBERT's backbone_pretrained=) from an s3:// checkpoint."""
    swin, _, _ = create_model("video-swin-tiny", seed=1)
    uri = save_checkpoint(swin, f"{s3_bucket}/swin/model.pt")
    again, _, _ = create_model("video-swin-tiny", pretrained=uri)
    assert again.model_id == swin.model_id
    captioner, _, _ = create_model("swinbert-tiny", backbone_pretrained=uri)
    source, loaded = swin.state_dict(), captioner.backbone.state_dict()
    shared = [k for k in loaded if k in source and not k.endswith(("relative_position_index", "attn_mask"))]
    assert len(shared) > 10 and all(torch.equal(loaded[k], source[k]) for k in shared)


def test_missing_remote_weights_are_a_clear_error(s3_bucket, cache):
    missing = f"{s3_bucket}/nothing/model.pt"
    with pytest.raises(PretrainedWeightsError, match="does not exist") as err:
        create_model("clip4clip-meanP-tiny", pretrained=missing)
    assert isinstance(err.value, FileNotFoundError) and missing in str(err.value)
    with pytest.raises(FileNotFoundError, match="nothing/model.pt"):
        load_checkpoint(missing)
    assert not is_vidsift_checkpoint(missing) and recorded_eval_sampling(missing) is None


def test_inference_model_needs_weights_or_an_explicit_random_init(capsys):
    with pytest.raises(MissingWeightsError, match="--pretrained"):
        create_inference_model("clip4clip-meanP-tiny")
    with pytest.warns(RandomInitWarning, match="SEEDED RANDOM INIT"):
        model, _, _ = create_inference_model("clip4clip-meanP-tiny", allow_random_init=True)
    assert "SEEDED RANDOM INIT (seed=0)" in capsys.readouterr().out
    assert model.model_id == create_model("clip4clip-meanP-tiny", seed=0)[0].model_id


def _train_argv(shards, output: str, max_steps: int) -> list[str]:
    return ["--shards", str(shards), "--model", "clip4clip-meanP-tiny", "--output", output,
            "--workers", "1", "--epochs", "1", "--batch-size", "2", "--eval-batch-size", "8", "--size", "32",
            "--train-clips", "1", "--train-frames", "2", "--eval-clips", "2", "--eval-frames", "2",
            "--max-steps", str(max_steps), "--log-every", "1", "--dataloader-workers", "0", "--use-gpu", "no"]


def test_train_job_on_s3_checkpoints_resumes_and_evaluates(s3_bucket, ingested_shards, ray_local, cache,
                                                           clean_cwd, capsys):
    """jobs.train --output s3://: Ray Train checkpoints on S3 (workers reach the store through the driver's
    AWS_* variables, which the session's Ray workers were started without), a --resume from them, the
    exported files, then --eval-only of the S3 model.pt. Nothing lands in the working directory."""
    run = f"{s3_bucket}/runs/c4c"
    assert train_main(_train_argv(ingested_shards, run, max_steps=1)) == 0
    first = checkpoint_dirs(f"{run}/ray/train")
    assert first and all(d.startswith(f"{run}/ray/train/checkpoint_") for d in first)
    assert load_state_file(f"{first[-1]}/state.pt")["step"] == 1
    assert train_main(_train_argv(ingested_shards, run, max_steps=1)) == 2  # an existing run needs --resume
    assert "--resume" in capsys.readouterr().err

    assert train_main([*_train_argv(ingested_shards, run, max_steps=2), "--resume"]) == 0
    names = {storage.name(u) for u in storage.list_files(run)}
    assert {"model.pt", "metrics.jsonl", "summary.json"} <= names
    summary = json.loads(storage.read_text(f"{run}/summary.json"))
    assert summary["steps"] == 2 and summary["model_path"] == f"{run}/model.pt"
    assert summary["checkpoint"].startswith(f"{run}/ray/train/checkpoint_")
    history = [json.loads(line) for line in storage.read_text(f"{run}/metrics.jsonl").splitlines()]
    assert [h["step"] for h in history if h["type"] == "resume"] == [1]
    assert [h["step"] for h in history if h["type"] == "train"] == [1, 2]
    final = load_state_file(f"{checkpoint_dirs(f'{run}/ray/train')[-1]}/state.pt")
    model, _, _ = create_model("clip4clip-meanP-tiny", pretrained=f"{run}/model.pt")
    assert final["step"] == 2
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, final["model"][key]), key

    capsys.readouterr()
    evaluation = f"{s3_bucket}/evals/c4c"
    argv = ["--eval-only", "--shards", str(ingested_shards), "--model", "clip4clip-meanP-tiny",
            "--output", evaluation, "--pretrained", f"{run}/model.pt", "--size", "32", "--eval-clips", "2",
            "--eval-frames", "2", "--eval-batch-size", "4"]
    assert train_main(argv) == 0
    written = json.loads(storage.read_text(f"{evaluation}/eval-test-2x2.json"))
    assert written["pretrained"] == f"{run}/model.pt" and 0.0 <= written["t2v_R@1"] <= 1.0
    assert f"{evaluation}/eval-test-2x2.json" in capsys.readouterr().out
    assert train_main([*argv[:7], "--pretrained", f"{run}/missing.pt"]) == 2
    assert "no weights" in capsys.readouterr().err
    assert os.listdir(clean_cwd) == []

"""`ray job submit` of the training job against a private `ray start --head` (slow: CI runs it once)."""

from __future__ import annotations

import json
import time

import pytest
from conftest import ray_job_submit

from jobs.train import main
from models import create_model


def submit(head: dict, entrypoint: list[str]):
    """``ray_job_submit``, retried while the head's job agent is still starting ("try again later")."""
    deadline = time.time() + 120
    while True:
        proc = ray_job_submit(head, entrypoint, timeout=600)
        if "No available agent to submit job" not in proc.stdout + proc.stderr or time.time() > deadline:
            return proc
        time.sleep(5)


@pytest.mark.slow
def test_train_job_submit(ray_head, ingested_shards, tmp_path):
    out = tmp_path / "run"
    entrypoint = [
        "python", "-m", "jobs.train",
        "--shards", str(ingested_shards),
        "--model", "clip4clip-meanP-tiny",
        "--config", "configs/train/tiny-meanP.yaml",
        "--output", str(out),
        "--workers", "2",
        "--epochs", "1",
        "--batch-size", "2",
        "--eval-batch-size", "8",
        "--dataloader-workers", "0",
        "--log-every", "1",
    ]
    proc = submit(ray_head, entrypoint)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "[train] done:" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["epochs_done"] == 1 and summary["steps"] >= 1
    assert 0.0 <= summary["test"]["t2v_R@1"] <= 1.0
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if h["type"] == "train"] == list(range(1, summary["steps"] + 1))
    model, _, _ = create_model("clip4clip-meanP-tiny", pretrained=str(out / "model.pt"))
    assert model.model_id.startswith("clip4clip-meanP-tiny@")


def test_train_job_rejects_bad_input(tmp_path, capsys):
    """Bad input is a clear error naming the input, exit code 2 (no Ray needed)."""
    assert main(["--shards", str(tmp_path / "missing"), "--model", "clip4clip-meanP-tiny",
                 "--output", str(tmp_path / "o")]) == 2
    assert "missing" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("modle: x\n")
    assert main(["--shards", str(tmp_path), "--config", str(tmp_path / "bad.yaml"),
                 "--output", str(tmp_path / "o")]) == 2
    assert "modle" in capsys.readouterr().err
    assert main(["--shards", str(tmp_path), "--model", "no-such-model", "--output", str(tmp_path / "o")]) == 2

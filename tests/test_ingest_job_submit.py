"""`ray job submit -- python -m jobs.ingest ...` against a private `ray start --head` cluster."""

from __future__ import annotations

import json
import tarfile
import time

import pandas as pd
import pytest
from conftest import ray_job_submit


def submit(head: dict, entrypoint: list[str]):
    """``ray_job_submit``, retried while the head's job agent is still starting ("try again later")."""
    deadline = time.time() + 120
    while True:
        proc = ray_job_submit(head, entrypoint)
        if "No available agent to submit job" not in proc.stdout + proc.stderr or time.time() > deadline:
            return proc
        time.sleep(5)


@pytest.mark.slow
def test_ingest_via_ray_job_submit(ray_head, synthetic_corpus, tmp_path):
    out = tmp_path / "submitted"
    proc = submit(
        ray_head,
        [
            "python",
            "-m",
            "jobs.ingest",
            "--input",
            str(synthetic_corpus / "manifest.parquet"),
            "--output",
            str(out),
            "--samples-per-shard",
            "8",
            "--workers",
            "2",
        ],
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "samples + errors == inputs  yes" in proc.stdout and "videos/s" in proc.stdout
    run = json.loads((out / "manifest.json").read_text())
    assert run["summary"]["samples"] == 24 and run["summary"]["complete"]
    assert [s["status"] for s in run["shards"]] == ["done"] * 3
    keys = []
    for shard in run["shards"]:
        with tarfile.open(out / shard["tar"]) as tar:
            keys += [m.name.split(".", 1)[0] for m in tar.getmembers() if m.name.endswith(".json")]
        assert len(pd.read_parquet(out / shard["index"])) == shard["samples"]
    assert keys == sorted(pd.read_parquet(synthetic_corpus / "manifest.parquet")["video_id"])
    assert len(pd.read_parquet(out / "errors.parquet")) == 0

    missing = submit(
        ray_head,
        [
            "python",
            "-m",
            "jobs.ingest",
            "--input",
            str(tmp_path / "nope.csv"),
            "--output",
            str(tmp_path / "o2"),
        ],
    )
    assert missing.returncode != 0
    assert "input manifest not found" in missing.stdout + missing.stderr

"""The main job end to end: the tiny demo recipe through `ray job submit` against a local head."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import ray_job_submit

from index import VideoIndex


@pytest.mark.slow
def test_demo_pipeline_via_ray_job_submit(ray_head, tmp_path):
    work = tmp_path / "demo"
    proc = ray_job_submit(ray_head, ["python", "-m", "jobs.demo", "--workdir", str(work),
                                     "--config", "configs/demo-tiny.yaml"], timeout=1500)
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-4000:])
    assert "=== example queries ===" in proc.stdout and "report:" in proc.stdout
    # every stage left its real output behind
    assert len(list((work / "ingest" / "shards").glob("*.tar"))) == 3
    assert (work / "train" / "model.pt").exists() and (work / "caption-train" / "model.pt").exists()
    captions = pq.read_table(work / "captions" / "captions.parquet").to_pylist()
    assert captions and all(row["caption"].strip() for row in captions)
    metrics = json.loads((work / "metrics.json").read_text())
    assert metrics["index"]["count"] > 0 and "caption_test" in metrics
    report = (work / "report.html").read_text()
    assert report.count("data:image/png;base64,") >= 2 * 3  # 2 queries × top-3 thumbnails
    # the published index answers text queries from Python
    index = VideoIndex.open(work / "index", pretrained=str(work / "train" / "model.pt"))
    hits = index.search("a red circle moves to the left", k=3)
    assert len(hits) == 3 and all(h.end_s >= h.start_s for h in hits)


def test_demo_config_is_complete():
    """Both shipped demo recipes name every field the demo reads, and their training configs exist."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    needed = {"n", "seed", "profile", "min_duration", "max_duration", "size", "fps", "keyframe_interval",
              "samples_per_shard", "train_config", "caption_config", "queries", "top_k"}
    for name in ("demo.yaml", "demo-tiny.yaml"):
        cfg = yaml.safe_load((root / "configs" / name).read_text())
        assert needed <= set(cfg), (name, needed - set(cfg))
        assert (root / cfg["train_config"]).exists() and (root / cfg["caption_config"]).exists()

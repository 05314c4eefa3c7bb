"""The main job end to end: the tiny demo recipe through `ray job submit` against a local head (with
--no-serve); its last step serving the search page over a run's index; how captions are judged grounded."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import ray_job_submit
from test_serve import write_generated_captions  # a jobs.caption output folder

import models
from index import VideoIndex, build_index
from index.annotations import record_captions, recorded_captions
from index.testing import clustered_vectors, write_embeddings
from workflows.demo import DemoState, caption_grounding, serve


@pytest.mark.slow
def test_demo_pipeline_via_ray_job_submit(ray_head, tmp_path):
    work = tmp_path / "demo"
    proc = ray_job_submit(ray_head, ["python", "-m", "jobs.demo", "--workdir", str(work),
                                     "--config", "configs/demo-tiny.yaml", "--no-serve"], timeout=1500)
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-4000:])
    assert "=== example queries ===" in proc.stdout and "report:" in proc.stdout
    # the metrics are a table, not a JSON dump, and --no-serve ends the run instead of serving
    # (the tiny recipe stops at max_steps, before the trainer's test evaluation: no retrieval rows here)
    assert "right class at rank 1" in proc.stdout and "caption diversity" in proc.stdout
    assert '"retrieval_test"' not in proc.stdout and "not serving (--no-serve)" in proc.stdout
    # every stage left its real output behind
    assert len(list((work / "ingest" / "shards").glob("*.tar"))) == 3
    assert (work / "train" / "model.pt").exists() and (work / "caption-train" / "model.pt").exists()
    captions = pq.read_table(work / "captions" / "captions.parquet").to_pylist()
    assert captions and all(row["caption"].strip() for row in captions)
    assert recorded_captions(str(work / "index")) == [str(work / "captions")]  # `serve --index` finds them
    metrics = json.loads((work / "metrics.json").read_text())
    assert metrics["index"]["count"] > 0 and "caption_test" in metrics
    assert metrics["caption_grounding"]["videos"] == len(captions)
    assert set(metrics["stage_seconds"]) >= {"synth", "train", "embed", "cap-train", "caption", "total"}
    report = (work / "report.html").read_text()
    assert report.count("data:image/png;base64,") >= 2 * 3  # 2 queries × top-3 thumbnails
    # the published index answers text queries from Python
    index = VideoIndex.open(work / "index", pretrained=str(work / "train" / "model.pt"))
    hits = index.search("a red circle moves to the left", k=3)
    assert len(hits) == 3 and all(h.end_s >= h.start_s for h in hits)


def test_demo_config_is_complete():
    """Both shipped demo recipes name every field the demo reads, and their training configs exist."""
    root = Path(__file__).resolve().parents[1]
    needed = {"n", "seed", "profile", "min_duration", "max_duration", "size", "fps", "keyframe_interval",
              "samples_per_shard", "train_config", "caption_config", "queries", "top_k"}
    for name in ("demo.yaml", "demo-tiny.yaml"):
        cfg = yaml.safe_load((root / "configs" / name).read_text())
        assert needed <= set(cfg), (name, needed - set(cfg))
        assert (root / cfg["train_config"]).exists() and (root / cfg["caption_config"]).exists()


def _demo_workdir_with_index(work: Path, shards: Path) -> list[str]:
    """What the demo's earlier steps leave for serving: train/model.pt (a saved seeded CLIP4Clip), an index
    over one vector per ingested video, ingest/ (the shards); returns the indexed video ids."""
    (work / "train").mkdir(parents=True)
    model, _, _ = models.create_model("clip4clip-meanP-tiny", seed=0)
    ckpt = models.save_checkpoint(model, work / "train" / "model.pt")
    ids = sorted(v for p in shards.rglob("0*.parquet") for v in pq.read_table(p, columns=["video_id"])
                 .column(0).to_pylist())
    dim = model.encode_text(["x"]).shape[1]
    write_embeddings(work / "emb", clustered_vectors(len(ids), dim, seed=3), model_id=model.model_id,
                     model_name="clip4clip-meanP-tiny", pretrained=str(ckpt), video_prefix="synth",
                     captions=[[f"synthetic video {v}"] for v in range(len(ids))])
    build_index(work / "emb", work / "index", factory="Flat", progress=False)
    (work / "ingest").symlink_to(shards, target_is_directory=True)
    write_generated_captions(work / "captions", ids)  # what the caption step writes, and records
    record_captions(str(work / "index"), str(work / "captions"), {"model_id": "cap@0"})
    return ids


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        return json.loads(response.read())


def test_demo_ends_by_serving_its_index(ingested_shards, tmp_path, capsys):
    """The demo's last step serves the search page over the run's index (the trained checkpoint and the
    captions found from the index alone), prints its URL, answers /healthz and /search while it runs, and
    returns once stopped; serve: false skips it."""
    work = tmp_path / "demo"
    ids = _demo_workdir_with_index(work, ingested_shards)
    state = DemoState(work=work, cfg={"serve": True, "host": "127.0.0.1", "port": 0})
    thread = threading.Thread(target=serve, args=(state,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while state.url is None:
        assert thread.is_alive() and time.monotonic() < deadline, "the demo's serve step did not start"
        time.sleep(0.05)
    try:
        health = _get_json(state.url + "/healthz")
        assert health["ok"] is True
        found = _get_json(state.url + "/search?q=a+red+circle+moves+left&k=3")
        assert len(found["hits"]) == 3 and {h["video_id"] for h in found["hits"]} <= set(ids)
        everything = _get_json(state.url + "/search?q=a+video&k=100")["hits"]
        assert {h["video_id"] for h in everything if "generated_caption" in h} == set(ids[::2])
        assert found["version"] == health["version"]
    finally:
        state.stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert f"search page: {state.url}/" in capsys.readouterr().out
    serve(DemoState(work=work, cfg={"serve": False}))  # returns at once, saying how to serve later
    assert "not serving (--no-serve)" in capsys.readouterr().out


def test_caption_grounding_tells_a_template_from_grounded_captions():
    """One caption for every video scores as a template; captions naming each video's attributes score 1."""
    rows = [{"colour": c, "shape": s, "direction": d} for c, s, d in
            [("red", "circle", "left"), ("blue", "square", "up"), ("green", "triangle", "right"),
             ("yellow", "circle", "down")]]
    template = caption_grounding(["we see that a golden square travels to the"] * 4, rows)
    assert template["distinct"] == 1 and template["top_caption_share"] == 1.0
    assert template["colour"] == 0.25 and template["direction"] == 0.0 and template["all_three"] == 0.0
    grounded = caption_grounding(["a crimson ball moves leftwards", "the azure box drifts upwards",
                                  "in this clip an emerald wedge glides to the right",
                                  "we see that a golden disk slides towards the bottom"], rows)
    assert grounded["distinct_ratio"] == 1.0 and grounded["all_three"] == 1.0
    # naming two colours (or none) is not naming the video's colour
    mixed = caption_grounding(["a red and blue circle moves left", "a shape moves up", "", ""], rows[:2] * 2)
    assert mixed["colour"] == 0.0 and mixed["direction"] == 0.5

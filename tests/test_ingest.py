"""Ingest of the shared synthetic corpus on real local Ray: shard layout, loading with webdataset and
Ray Data, determinism, rerun idempotence, kill-and-rerun, transcoding, keys and the no-cluster stage."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.ingest import CRASH_ENV, IngestConfig, IngestIncompleteError, IngestShardStage, run_ingest
from pipeline.keys import assign_keys, is_safe_key, sanitize_key

JSON_FIELDS = {
    "video_id",
    "key",
    "source",
    "sha256",
    "bytes",
    "duration",
    "fps",
    "width",
    "height",
    "codec",
    "num_frames",
    "num_keyframes",
    "captions",
    "split",
    "caption_class",
    "hard_group",
    "transcoded",
}


def tar_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))}


def test_shard_layout_and_metadata(ingested_shards, synthetic_corpus):
    out = ingested_shards
    manifest = json.loads((out / "manifest.json").read_text())
    summary = manifest["summary"]
    assert summary["inputs"] == 24 and summary["samples"] == 24 and summary["errors"] == 0
    assert summary["accounted"] and summary["complete"]
    assert [s["shard"] for s in manifest["shards"]] == ["000000", "000001", "000002"]
    source = pd.read_parquet(synthetic_corpus / "manifest.parquet").set_index("video_id")
    seen = []
    for shard in manifest["shards"]:
        tar_path = out / shard["tar"]
        with tarfile.open(tar_path) as tar:
            members = tar.getmembers()
            assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.mode == 0o644 for m in members)
            names = [m.name for m in members]
            jsons = [json.loads(tar.extractfile(m).read()) for m in members if m.name.endswith(".json")]
        assert len(names) == 2 * shard["samples"] == 16
        index = pq.read_table(out / shard["index"]).to_pandas()
        assert list(index["key"]) == [j["key"] for j in jsons]
        for meta in jsons:
            assert JSON_FIELDS <= set(meta) and is_safe_key(meta["key"])
            row = source.loc[meta["video_id"]]
            assert meta["captions"] == list(row["captions"]) and meta["split"] == row["split"]
            assert meta["caption_class"] == row["caption_class"] and meta["hard_group"] == row["hard_group"]
            assert meta["codec"] == "h264" and meta["width"] == 64 and meta["fps"] == pytest.approx(10.0)
            assert meta["duration"] == pytest.approx(row["duration"], abs=0.15)
            # 1 s keyframe interval in the corpus: about one keyframe a second, found by demuxing only.
            assert abs(meta["num_keyframes"] - meta["duration"]) <= 1.01
            assert meta["num_frames"] == pytest.approx(meta["duration"] * 10, abs=1)
            video = (synthetic_corpus / row["path"]).read_bytes()
            assert meta["bytes"] == len(video) and not meta["transcoded"]
        seen += [j["video_id"] for j in jsons]
    assert seen == sorted(source.index)  # sorted by id, nothing lost, nothing twice
    assert len(pd.read_parquet(out / "errors.parquet")) == 0


def test_shards_load_with_webdataset_and_ray_data(ingested_shards, ray_local):
    import ray
    import webdataset as wds

    urls = [str(p) for p in sorted((ingested_shards / "shards").glob("*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == 24
    for s in samples:
        meta = json.loads(s["json"])
        assert meta["key"] == s["__key__"] and s["mp4"][4:8] == b"ftyp"
    ds = ray.data.read_webdataset(urls)
    rows = ds.take_all()
    assert len(rows) == 24 and {r["__key__"] for r in rows} == {s["__key__"] for s in samples}


def test_determinism_and_rerun_skips(ingested_shards, synthetic_corpus, ray_local, tmp_path, capsys):
    manifest = str(
        synthetic_corpus / "manifest.csv"
    )  # CSV manifest (JSON captions) -> same shards as parquet
    summary = run_ingest(manifest, tmp_path / "a", samples_per_shard=8, workers=1)
    assert summary["shards_written"] == 3
    assert tar_bytes(tmp_path / "a") == tar_bytes(ingested_shards)
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "a" / "shards").iterdir()}
    again = run_ingest(manifest, tmp_path / "a", samples_per_shard=8)
    assert again["shards_skipped"] == 3 and again["shards_written"] == 0 and again["samples"] == 24
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "a" / "shards").iterdir()} == mtimes
    # A changed config (shard size) invalidates the plan: different shards, stale ones removed.
    regrouped = run_ingest(manifest, tmp_path / "a", samples_per_shard=12)
    assert regrouped["shards"] == 2 and regrouped["shards_written"] == 2
    assert sorted(p.name for p in (tmp_path / "a" / "shards").iterdir()) == [
        "000000.parquet",
        "000000.tar",
        "000001.parquet",
        "000001.tar",
    ]
    assert "videos/s" in capsys.readouterr().out


def test_partial_shard_is_redone(ingested_shards, synthetic_corpus, ray_local, tmp_path):
    out = tmp_path / "partial"
    run_ingest(str(synthetic_corpus / "manifest.parquet"), out, samples_per_shard=8)
    tar = out / "shards" / "000001.tar"
    tar.write_bytes(tar.read_bytes()[:5000])  # a torn tar next to a valid index: must not count as complete
    (out / "shards" / "000002.parquet").unlink()  # tar without its index: not complete either
    summary = run_ingest(str(synthetic_corpus / "manifest.parquet"), out, samples_per_shard=8)
    assert summary["shards_written"] == 2 and summary["shards_skipped"] == 1
    assert tar_bytes(out) == tar_bytes(ingested_shards)


def test_kill_worker_mid_shard_then_rerun(
    ingested_shards, synthetic_corpus, ray_local, tmp_path, monkeypatch
):
    out = tmp_path / "killed"
    monkeypatch.setenv(CRASH_ENV, f"1:{tmp_path / 'crashed-once'}")
    with pytest.raises(IngestIncompleteError, match="000001"):
        run_ingest(str(synthetic_corpus / "manifest.parquet"), out, samples_per_shard=8, task_retries=0)
    assert (tmp_path / "crashed-once").exists()
    assert not (out / "shards" / "000001.tar").exists() and not (out / "shards" / "000001.parquet").exists()
    assert list((out / "shards").glob("000001.tar.tmp-*"))  # the half-written temp tar of the killed worker
    first = json.loads((out / "manifest.json").read_text())
    assert first["summary"]["failed_shards"] == ["000001"] and first["summary"]["unfinished"] == 8
    monkeypatch.delenv(CRASH_ENV)
    summary = run_ingest(str(synthetic_corpus / "manifest.parquet"), out, samples_per_shard=8)
    assert summary["shards_written"] == 1 and summary["shards_skipped"] == 2 and summary["complete"]
    assert tar_bytes(out) == tar_bytes(ingested_shards)
    assert not list((out / "shards").glob("*.tmp-*"))
    index = pd.concat(pd.read_parquet(p) for p in sorted((out / "shards").glob("*.parquet")))
    assert len(index) == 24 and index["video_id"].is_unique


def test_killed_worker_is_retried_by_ray(ingested_shards, synthetic_corpus, ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv(CRASH_ENV, f"0:{tmp_path / 'crashed-once'}")
    summary = run_ingest(
        str(synthetic_corpus / "manifest.parquet"), tmp_path / "r", samples_per_shard=8, task_retries=1
    )
    assert (tmp_path / "crashed-once").exists() and summary["complete"]
    assert tar_bytes(tmp_path / "r") == tar_bytes(ingested_shards)


def test_transcode_sets_size_fps_and_keyframes(synthetic_corpus, ray_local, tmp_path):
    rows = pd.read_parquet(synthetic_corpus / "manifest.parquet").head(3)
    rows = rows.assign(path=[str(synthetic_corpus / p) for p in rows["path"]])
    rows[["video_id", "path", "captions"]].to_json(tmp_path / "m.jsonl", orient="records", lines=True)
    runs = []
    for name in ("t1", "t2"):
        summary = run_ingest(
            str(tmp_path / "m.jsonl"),
            tmp_path / name,
            samples_per_shard=2,
            short_side=32,
            fps=5,
            keyframe_interval=0.5,
        )
        assert summary["samples"] == 3
        runs.append(tar_bytes(tmp_path / name))
    assert runs[0] == runs[1]  # single-threaded x264: byte-identical
    index = pd.concat(pd.read_parquet(p) for p in sorted((tmp_path / "t1" / "shards").glob("*.parquet")))
    for meta in index.to_dict(orient="records"):
        assert meta["transcoded"] and meta["codec"] == "h264"
        assert (meta["width"], meta["height"]) == (32, 32) and meta["fps"] == pytest.approx(5.0)
        assert meta["num_frames"] == pytest.approx(meta["duration"] * 5, abs=1)
        assert meta["num_keyframes"] >= 2 * meta["duration"] - 1  # a keyframe every 0.5 s
        assert meta["source_sha256"] != meta["sha256"]


def test_stage_runs_without_a_cluster(synthetic_corpus, tmp_path):
    rows = [
        {
            "input_index": i,
            "video_id": vid,
            "key": vid,
            "captions": ["a caption"],
            "split": "train",
            "source": str(synthetic_corpus / "videos" / f"{vid}.mp4"),
        }
        for i, vid in enumerate(["synth-000003", "synth-000004"])
    ]
    rows.append(
        {
            "input_index": 2,
            "video_id": "gone",
            "key": "gone",
            "captions": [],
            "source": str(tmp_path / "gone.mp4"),
        }
    )
    stage = IngestShardStage(str(tmp_path), {"samples_per_shard": 3})
    out = stage({"shard": [5], "rows": [rows]})
    result = out["result"][0]
    assert out["shard"] == [5] and result["samples"] == 2 and result["errors"] == 1
    assert result["error_rows"][0]["reason"] == "missing"
    with tarfile.open(tmp_path / "shards" / "000005.tar") as tar:
        assert tar.getnames() == [
            "synth-000003.mp4",
            "synth-000003.json",
            "synth-000004.mp4",
            "synth-000004.json",
        ]
    assert IngestConfig(samples_per_shard=3).fingerprint() != IngestConfig(samples_per_shard=4).fingerprint()


def test_keys_are_safe_stable_and_unique():
    ids = [
        "clip.v1.final",
        "../../etc/passwd",
        "a/b",
        "tab\there",
        "vidéo ünï",
        "plain-id_1",
        "",
        "...",
        "__key__",
        "x" * 300,
        "a_b",
        "a b",
    ]
    keys = assign_keys(ids)
    assert len(set(keys.values())) == len(ids)
    for original, key in keys.items():
        assert is_safe_key(key) and "." not in key and "/" not in key and not key.startswith(("_", "-"))
        assert key == sanitize_key(original) or original in ("a_b", "a b")
    assert keys["plain-id_1"] == "plain-id_1"  # safe ids are kept verbatim
    assert keys["vidéo ünï"].startswith("video_uni-")
    assert assign_keys(list(reversed(ids))) == keys
    # An unchanged id that looks like another id's slug-hash does not collide.
    crafted = sanitize_key("a.b")
    both = assign_keys(["a.b", crafted])
    assert len(set(both.values())) == 2

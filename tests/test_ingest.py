"""Ingest of the shared synthetic corpus on real local Ray: shard layout, loading with webdataset and
Ray Data, determinism, rerun idempotence, kill-and-rerun, transcoding, keys and the no-cluster stage."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import ray
import webdataset as wds

from pipeline.ingest import (
    CRASH_ENV,
    DuplicateId,
    IngestConfig,
    IngestIncompleteError,
    IngestRequest,
    IngestShardStage,
    plan_inputs,
    run_ingest,
)
from pipeline.ingest import shard as ingest_shard
from pipeline.ingest.run import (
    plan_run,
    prepare_output,
    report,
    run_shard_tasks,
    summarize,
    write_error_table,
    write_run_manifest,
)
from pipeline.inputs import BadManifestRow
from pipeline.keys import assign_keys, is_safe_key, sanitize_key
from pipeline.probe import ProbeError
from runtime.errors import InvalidMetadata, NotAVideo, UnreadableInput

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
    assert list((out / "shards").glob("*.tmp"))  # the half-written temp tar of the killed worker
    first = json.loads((out / "manifest.json").read_text())
    assert first["summary"]["failed_shards"] == ["000001"] and first["summary"]["unfinished"] == 8
    monkeypatch.delenv(CRASH_ENV)
    summary = run_ingest(str(synthetic_corpus / "manifest.parquet"), out, samples_per_shard=8)
    assert summary["shards_written"] == 1 and summary["shards_skipped"] == 2 and summary["complete"]
    assert tar_bytes(out) == tar_bytes(ingested_shards)
    assert not list((out / "shards").glob("*.tmp"))  # the rerun removed it
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


# ------------------------------------------------------------------------------------ steps and error policy
def _rows(synthetic_corpus, tmp_path) -> list[dict]:
    sources = [synthetic_corpus / "videos" / "synth-000003.mp4", tmp_path / "gone.mp4"]
    return [
        {"input_index": i, "video_id": vid, "key": vid, "captions": [], "source": str(src)}
        for i, (vid, src) in enumerate(zip(["a", "gone"], sources))
    ]


def test_stage_records_named_input_failures_or_raises_them(synthetic_corpus, tmp_path):
    rows = _rows(synthetic_corpus, tmp_path)
    stage = IngestShardStage(str(tmp_path / "rec"), {"samples_per_shard": 2})
    result = stage({"shard": [0], "rows": [rows]})["result"][0]
    assert result["samples"] == 1 and [e["reason"] for e in result["error_rows"]] == ["missing"]
    strict = IngestShardStage(str(tmp_path / "strict"), {"samples_per_shard": 2}, on_error="raise")
    with pytest.raises(ProbeError, match="gone.mp4") as info:
        strict({"shard": [0], "rows": [rows]})
    assert isinstance(info.value, UnreadableInput) and info.value.reason == "missing"
    with pytest.raises(ValueError, match="error policy"):
        IngestShardStage(str(tmp_path / "x"), {}, on_error="skip")


@pytest.mark.parametrize("bug", [RuntimeError("boom"), KeyError("duration")])
def test_a_bug_in_a_sample_raises_instead_of_becoming_an_error_row(
    synthetic_corpus, tmp_path, monkeypatch, bug
):
    def broken(row, config, data=None):
        raise bug

    monkeypatch.setattr(ingest_shard, "process_sample", broken)
    stage = IngestShardStage(str(tmp_path), {"samples_per_shard": 2})
    with pytest.raises(type(bug)):
        stage({"shard": [0], "rows": [_rows(synthetic_corpus, tmp_path)]})
    assert not (tmp_path / "shards" / "000000.parquet").exists()  # no index: the shard is not complete


def test_steps_run_alone_without_ray(tmp_path):
    """A manifest whose every row fails on the driver: every step runs without a cluster."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in [
        {"video_id": "a", "path": "nosuchscheme://x/a.mp4"},
        {"video_id": "b", "path": "b.mp4", "captions": 5},
    ]))
    config = IngestConfig(samples_per_shard=2)
    state = plan_run(IngestRequest(input=str(manifest), output=tmp_path / "out", config=config))
    assert state.shards == []
    assert [e["reason"] for e in state.driver_errors] == ["bad_uri", "invalid_metadata"]
    prepare_output(state)
    assert state.todo == [] and state.results == {}
    run_shard_tasks(state)
    assert not state.started_ray and state.workers is None
    write_error_table(state)
    summarize(state)
    assert state.summary["errors"] == 2 and state.summary["accounted"] and state.summary["complete"]
    write_run_manifest(state)
    report(state)
    errors = pd.read_parquet(tmp_path / "out" / "errors.parquet")
    assert list(errors["reason"]) == ["bad_uri", "invalid_metadata"] and "captions" in errors["message"][1]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["summary"] == state.summary
    state.failed[0] = "WorkerCrashedError: killed"
    with pytest.raises(IngestIncompleteError, match="killed"):
        report(state)
    with pytest.raises(BadManifestRow, match="row 1"):
        plan_run(IngestRequest(input=str(manifest), output=tmp_path / "o2", on_error="raise"))
    with pytest.raises(ValueError, match="error policy"):
        IngestRequest(input=str(manifest), output=tmp_path / "o3", on_error="ignore")


def test_duplicate_ids_raise_under_the_raise_policy():
    rows = [{"input_index": i, "video_id": "same", "source": f"/v/{i}.mp4"} for i in range(2)]
    candidates, errors = plan_inputs([dict(r) for r in rows])
    assert len(candidates) == 1 and [e["reason"] for e in errors] == ["duplicate_id"]
    with pytest.raises(DuplicateId, match="row 0") as info:
        plan_inputs([dict(r) for r in rows], on_error="raise")
    assert isinstance(info.value, InvalidMetadata) and isinstance(info.value, ValueError)


def test_ingest_on_error_raise_stops_at_the_first_bad_video(synthetic_corpus, ray_local, tmp_path):
    (tmp_path / "noise.mp4").write_bytes(b"this is not a video\n" * 50)
    good = synthetic_corpus / "videos" / "synth-000003.mp4"
    pd.DataFrame({"video_id": ["good", "noise"], "path": [str(good), str(tmp_path / "noise.mp4")]}).to_csv(
        tmp_path / "m.csv", index=False)
    summary = run_ingest(str(tmp_path / "m.csv"), tmp_path / "rec", samples_per_shard=2, progress=False)
    assert summary["samples"] == 1 and summary["errors_by_reason"] == {"not_a_video": 1}
    with pytest.raises(NotAVideo, match="noise"):
        run_ingest(str(tmp_path / "m.csv"), tmp_path / "strict", samples_per_shard=2, progress=False,
                   on_error="raise")


def test_read_ahead_keeps_row_order_bounds_memory_and_ties_errors_to_their_row(tmp_path, monkeypatch):
    """Remote inputs are read a few ahead by threads: same order, at most ``depth`` waiting, and a failed
    read surfaces for its own row only."""
    import threading
    import time as time_module

    from pipeline.ingest import sample as ingest_sample
    from pipeline.ingest.layout import IngestConfig

    in_flight, peak, lock = [0], [0], threading.Lock()

    def slow_read(source, max_bytes):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time_module.sleep(0.02)
        with lock:
            in_flight[0] -= 1
        if source.endswith("bad"):
            raise ProbeError("unreadable", f"cannot read {source}")
        return source.encode()

    monkeypatch.setattr(ingest_sample, "read_source", slow_read)
    rows = [{"source": f"s3://b/v{i}" + ("bad" if i == 5 else "")} for i in range(12)]
    got = []
    for row, pending in ingest_sample.read_ahead(rows, IngestConfig(), depth=3):
        try:
            got.append((row["source"], pending.result()))
        except ProbeError as exc:
            got.append((row["source"], exc.reason))
    expected = [(r["source"], r["source"].encode() if i != 5 else "unreadable") for i, r in enumerate(rows)]
    assert got == expected
    assert 1 < peak[0] <= 3 + 1  # reads overlap, never more than depth (+ the one being handed out)
    assert [p for _, p in ingest_sample.read_ahead(rows[:2], IngestConfig(), depth=0)] == [None, None]

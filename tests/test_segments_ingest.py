"""Timed captions (``segments``) through ingest: valid ones reach the shard json, each bad one is a named
error row, the video is still written; manifests without the column are unchanged."""

from __future__ import annotations

import json
import tarfile

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.ingest import IngestShardStage, plan_inputs, run_ingest
from pipeline.ingest.segments import InvalidSegment, check_segment
from pipeline.inputs import read_inputs
from synthetic import generate_corpus

GOOD = [{"start_s": 1.0, "end_s": 3.5, "caption": "a red circle moves left"},
        {"start_s": 4.0, "end_s": 16.95, "caption": "a blue square moves up"}]  # past the end by < 1 frame
BAD = [
    ({"start_s": -0.5, "end_s": 2.0, "caption": "x"}, "segment_negative_start"),
    ({"start_s": 5.0, "end_s": 5.0, "caption": "x"}, "segment_order"),
    ({"start_s": 6.0, "end_s": 4.0, "caption": "x"}, "segment_order"),
    ({"start_s": 10.0, "end_s": 17.5, "caption": "x"}, "segment_past_end"),
    ({"start_s": 1.0, "caption": "x"}, "segment_malformed"),
    ({"start_s": "soon", "end_s": 2.0, "caption": "x"}, "segment_malformed"),
    ({"start_s": 1.0, "end_s": 2.0, "caption": ""}, "segment_malformed"),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two 16.9 s long-profile videos at 10 fps; video 0 gets good and bad segments, video 1 none."""
    root = tmp_path_factory.mktemp("seg")
    manifest = generate_corpus(root, n=2, seed=3, min_duration=16.9, max_duration=16.9, size=32, fps=10,
                               profile="long")
    assert set(manifest["duration"]) == {16.9}
    segments = [GOOD[:1] + [b for b, _ in BAD] + GOOD[1:], None]
    frame = pd.DataFrame({"video_id": manifest["video_id"], "path": manifest["path"],
                          "captions": manifest["captions"], "split": manifest["split"],
                          "segments": [json.dumps(s) if s is not None else "" for s in segments]})
    frame.to_csv(root / "segments.csv", index=False)
    frame.drop(columns=["segments"]).to_csv(root / "plain.csv", index=False)
    return root, manifest


def _stage_run(manifest_uri, out):
    rows, _ = plan_inputs(read_inputs(manifest_uri))
    result = IngestShardStage(str(out), {"samples_per_shard": 8})({"shard": [0], "rows": [rows]})["result"][0]
    with tarfile.open(out / "shards" / "000000.tar") as tar:
        jsons = {m.name: json.load(tar.extractfile(m)) for m in tar if m.name.endswith(".json")}
    return result, jsons


def test_good_segments_reach_the_json_and_each_bad_one_is_a_named_error_row(corpus, tmp_path):
    root, manifest = corpus
    result, jsons = _stage_run(str(root / "segments.csv"), tmp_path)
    vid0, vid1 = manifest["video_id"]
    assert result["samples"] == 2  # both videos written, the one with bad segments too
    assert jsons[f"{vid0}.json"]["segments"] == GOOD
    assert jsons[f"{vid1}.json"]["segments"] == []  # an empty cell: no timed captions
    errors = result["error_rows"]
    assert [e["reason"] for e in errors] == [reason for _, reason in BAD]
    assert result["errors"] == result["segment_errors"] == len(BAD)
    for i, e in enumerate(errors, start=1):  # the bad segments are items 1..7 of the cell
        assert e["video_id"] == vid0 and e["message"].startswith(f"segment {i} of {vid0}: "), e
    assert "end_s 17.5 > duration 16.9" in errors[3]["message"]


def test_manifest_without_segments_is_unchanged(corpus, tmp_path):
    root, manifest = corpus
    result, jsons = _stage_run(str(root / "plain.csv"), tmp_path)
    assert result["samples"] == 2 and result["errors"] == 0 and not result["segment_errors"]
    assert all("segments" not in j for j in jsons.values())


def test_long_profile_manifest_ingests_with_its_segments(corpus, ray_local, tmp_path):
    """The synthetic parquet manifest (list<struct> cells) through run_ingest: accounting counts videos."""
    root, manifest = corpus
    summary = run_ingest(str(root / "manifest.parquet"), str(tmp_path / "out"), samples_per_shard=8)
    assert summary["samples"] == 2 and summary["errors"] == 0 and summary["segment_errors"] == 0
    assert summary["accounted"] and summary["complete"]
    import webdataset as wds  # the reader the training/embed side uses (test-only import)

    tars = sorted(str(p) for p in (tmp_path / "out" / "shards").glob("*.tar"))
    for sample in wds.WebDataset(tars, shardshuffle=False):
        meta = json.loads(sample["json"])
        expected = manifest.set_index("video_id").loc[meta["video_id"], "segments"]
        assert meta["segments"] == [dict(s) for s in expected] and len(meta["segments"]) >= 2
    assert pq.read_table(tmp_path / "out" / "errors.parquet").num_rows == 0


def test_bad_segments_with_errors_recorded_by_run_ingest_and_raise_policy(corpus, ray_local, tmp_path):
    root, _ = corpus
    summary = run_ingest(str(root / "segments.csv"), str(tmp_path / "out"), samples_per_shard=8)
    assert summary["samples"] == 2 and summary["errors"] == 0 and summary["segment_errors"] == len(BAD)
    assert summary["accounted"] and summary["errors_by_reason"]["segment_order"] == 2
    errors = pq.read_table(tmp_path / "out" / "errors.parquet").to_pylist()
    assert len(errors) == len(BAD) and all(e["message"].startswith("segment ") for e in errors)
    rows, _ = plan_inputs(read_inputs(str(root / "segments.csv")))
    stage = IngestShardStage(str(tmp_path / "strict"), {"samples_per_shard": 8}, on_error="raise")
    with pytest.raises(InvalidSegment, match="segment 1 of synth-000000: start_s -0.5 < 0"):
        stage({"shard": [0], "rows": [rows]})


def test_check_segment_tolerance_is_one_frame():
    assert check_segment({"start_s": 0, "end_s": 10.04, "caption": "c"}, 10.0, 25.0)["end_s"] == 10.04
    with pytest.raises(InvalidSegment, match="segment_past_end|> duration"):
        check_segment({"start_s": 0, "end_s": 10.05, "caption": "c"}, 10.0, 25.0)


def test_unparsable_segments_cell_is_an_invalid_row(tmp_path):
    (tmp_path / "m.csv").write_text('path,segments\na.mp4,"not json"\n')
    (row,) = read_inputs(str(tmp_path / "m.csv"))
    assert row["error"][0] == "invalid_metadata" and "segments is not JSON" in row["error"][1]

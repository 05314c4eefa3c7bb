"""Moments: the long synthetic profile, sliding windows at embed time, merging windows into moments and
hits that name them (docs/moments.md)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from index import VideoIndex, build_index
from index.moments import WINDOW_CLIP_BASE, Moment, merge_windows
from index.testing import embedding_schema
from pipeline import embedding
from pipeline.decode import decode_frames
from pipeline.embedding import (
    VIDEO_ROW,
    DecodeWindowsStage,
    EncodeClipsStage,
    plan_windows,
    window_clip_plan,
    window_span,
)
from pipeline.probe import probe_record
from runtime import storage
from synthetic import (
    COLOUR_WORDS,
    COLOURS,
    DIRECTION_WORDS,
    SHAPE_WORDS,
    generate_corpus,
    make_config,
    make_manifest,
    make_spec,
)

MODEL = "clip4clip-meanP-tiny"


# ------------------------------------------------------------------------------------------ merge windows
def test_merge_windows_keeps_runs_near_the_best_and_merges_overlaps():
    starts = np.arange(9) * 2.0
    ends = starts + 4.0
    scores = [0.1, 0.2, 0.80, 0.85, 0.82, 0.3, 0.1, 0.79, 0.2]
    # rel_threshold 0.1: keep >= 0.765 -> windows 2,3,4 (overlapping: one run [4, 12]) and 7 ([14, 18])
    moments = merge_windows(starts, ends, scores, rel_threshold=0.1)
    assert moments == [Moment(4.0, 12.0, 0.85, 3), Moment(14.0, 18.0, 0.79, 1)]
    # max_gap_s bridges the 2 s gap between the two runs
    assert merge_windows(starts, ends, scores, rel_threshold=0.1, max_gap_s=2.0) == [
        Moment(4.0, 18.0, 0.85, 4)]
    assert merge_windows(starts, ends, scores, rel_threshold=0.1, limit=1) == [Moment(4.0, 12.0, 0.85, 3)]
    # rel_threshold 0 keeps only the best window
    assert merge_windows(starts, ends, scores, rel_threshold=0.0) == [Moment(6.0, 10.0, 0.85, 1)]


def test_merge_windows_touching_gaps_ties_and_unscored():
    # non-overlapping 1 s windows: touching ones merge (gap 0), a 1 s hole splits
    starts, ends = [0, 1, 2, 4, 5], [1, 2, 3, 5, 6]
    scores = [0.9, 0.9, np.nan, 0.9, 0.9]  # window 2 not scored: ignored
    assert merge_windows(starts, ends, scores) == [Moment(0.0, 2.0, 0.9, 2), Moment(4.0, 6.0, 0.9, 2)]
    assert merge_windows(starts, ends, scores, max_gap_s=2.0) == [Moment(0.0, 6.0, 0.9, 4)]
    # unsorted input, negative scores: threshold relative to |best|
    assert merge_windows([4, 0], [6, 2], [-0.5, -0.52], rel_threshold=0.05) == [
        Moment(4.0, 6.0, -0.5, 1), Moment(0.0, 2.0, -0.52, 1)]
    assert merge_windows([], [], []) == []
    assert merge_windows([0], [1], [np.nan]) == []
    with pytest.raises(ValueError, match="differ in length"):
        merge_windows([0, 1], [1], [0.5])
    with pytest.raises(ValueError, match="must be >= 0"):
        merge_windows([0], [1], [0.5], rel_threshold=-1)


def test_window_clip_base_is_one_contract():
    assert embedding.WINDOW_CLIP_BASE == WINDOW_CLIP_BASE


# ---------------------------------------------------------------------------------------- window plans
def test_plan_windows_20s_window_4_stride_2():
    assert plan_windows(20.0, 4.0, 2.0) == [(float(s), float(s + 4)) for s in range(0, 17, 2)]
    # an uncovered tail gets one window ending at the end; a short video is one window
    assert plan_windows(21.0, 4.0, 2.0)[-2:] == [(16.0, 20.0), (17.0, 21.0)]
    assert plan_windows(3.0, 4.0, 2.0) == [(0.0, 3.0)]
    with pytest.raises(ValueError, match="must be > 0"):
        plan_windows(20.0, 4.0, 0.0)


def test_window_defaults_follow_the_recorded_sampling():
    assert window_span({"num_clips": 4, "frames_per_clip": 4, "mode": "eval"}, 25.0) == pytest.approx(0.16)
    assert window_span({"num_clips": 4, "frames_per_clip": 4, "fps": 2.0, "mode": "eval"}, 25.0) == 2.0
    assert window_span({"num_clips": 2, "frames_per_clip": 8, "stride": 5, "mode": "eval"}, 10.0) == 4.0
    assert window_span({"mode": "clip4clip", "max_frames": 12, "max_fps": 1.0}, 25.0) == 12.0
    plan = window_clip_plan([(0.0, 4.0), (2.0, 6.0)], 4, 20.0, 10.0)
    np.testing.assert_allclose(plan.times, [[0.55, 1.55, 2.55, 3.55], [2.55, 3.55, 4.55, 5.55]])


# ------------------------------------------------------------------------------------ long synthetic
@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    manifest = generate_corpus(root, n=3, seed=5, min_duration=20.0, max_duration=30.0, size=32, fps=10,
                               profile="long")
    return root, manifest


def test_long_profile_manifest_is_deterministic_and_segments_name_their_events():
    a = make_manifest(n=40, seed=9, min_duration=20, max_duration=30, size=32, fps=10, profile="long")
    b = make_manifest(n=40, seed=9, min_duration=20, max_duration=30, size=32, fps=10, profile="long")
    assert a.drop(columns=["segments"]).equals(b.drop(columns=["segments"]))
    assert list(a["segments"]) == list(b["segments"])
    for row in a.itertuples():
        assert 20.0 <= row.duration <= 30.0 and 2 <= len(row.segments) <= 3
        events = row.caption_class.split(">")
        assert len(events) == len(row.segments)
        last_end = 0.0
        for seg, event in zip(row.segments, events):
            colour, shape, direction = event.split("|")
            assert 2.0 - 0.1 <= seg["end_s"] - seg["start_s"] <= 4.0 + 0.1
            assert seg["start_s"] >= last_end + 1.0 - 1e-9  # >= 1 s of empty background before each event
            last_end = seg["end_s"]
            assert any(w in seg["caption"] for w in COLOUR_WORDS[colour])
            assert any(w in seg["caption"] for w in SHAPE_WORDS[shape])
            assert any(seg["caption"].endswith(w) for w in DIRECTION_WORDS[direction])
        assert row.duration - last_end >= 1.0 - 1e-9
    with pytest.raises(ValueError, match="min_duration >= 16"):
        make_manifest(n=1, min_duration=10, max_duration=20, profile="long")


def test_long_profile_shape_is_visible_and_moving_exactly_during_its_segments(long_corpus):
    root, manifest = long_corpus
    for row in manifest.itertuples():
        data = (root / row.path).read_bytes()
        n = row.num_frames
        times = (np.arange(n) + 0.5) / row.fps
        frames = decode_frames(data, times).astype(np.int16)
        cfg = make_config(seed=5, min_duration=20, max_duration=30, size=32, fps=10, profile="long")
        spec = make_spec(cfg, row.Index)
        background = frames[0]
        for i in range(n):
            t = times[i]
            inside = [k for k, s in enumerate(row.segments) if s["start_s"] <= t < s["end_s"]]
            diff = np.abs(frames[i] - background).max(axis=-1)
            if not inside:
                assert diff.max() < 40, f"{row.video_id} frame {i} ({t:.2f} s): a shape outside every segment"
                continue
            colour = np.array(COLOURS[spec["shapes"][inside[0]]["colour"]])
            near = np.abs(frames[i] - colour).max(axis=-1) < 60
            assert near.sum() >= 4, f"{row.video_id} frame {i} ({t:.2f} s): event {inside[0]} not visible"
        for seg in row.segments:  # moving: the shape's centroid changes across the event
            a, b = (int(seg["start_s"] * row.fps) + 1, int(seg["end_s"] * row.fps) - 2)
            assert np.abs(frames[a] - frames[b]).max() > 60


# ------------------------------------------------------------------------------ windows at embed time
def _embed_rows(data: bytes, record: dict, window_s=None, stride_s=None, sampling=None):
    sampling = sampling or {"num_clips": 2, "frames_per_clip": 2, "mode": "eval"}
    decode = DecodeWindowsStage(sampling=sampling, size=32, window_s=window_s, stride_s=stride_s)
    batch = {"key": np.array(["k0"], dtype=object), "mp4": [data], "json": [json.dumps(record)],
             "shard": np.array(["s-000000"], dtype=object)}
    decoded = decode(batch)
    encoder = EncodeClipsStage(MODEL, allow_random_init=True, threads=1)
    return decoded, encoder(decoded)


def test_windows_20s_video_window_4_stride_2(long_corpus):
    root, manifest = long_corpus
    data = (root / manifest.iloc[0]["path"]).read_bytes()
    record = {**probe_record(data), "video_id": "v0", "sha256": "x", "captions": ["c"]}
    record["duration"] = 20.0  # plan over the first 20 s: 9 windows
    decoded, out = _embed_rows(data, record, window_s=4.0, stride_s=2.0)
    assert len(decoded["key"]) == 1 + 5  # the sparse row + 9 windows in rows of 2 (last one padded)
    assert decoded["window_index"][-1].tolist() == [8, -1]
    clips = out["clip_index"].tolist()
    assert clips.count(VIDEO_ROW) == 1 and not any(0 <= c < WINDOW_CLIP_BASE for c in clips)
    windows = sorted((c - WINDOW_CLIP_BASE, s, e) for c, s, e in zip(clips, out["start_s"], out["end_s"])
                     if c >= WINDOW_CLIP_BASE)
    assert windows == [(w, 2.0 * w, 2.0 * w + 4.0) for w in range(9)]
    assert len(set(out["id"].tolist())) == len(clips) == 10
    assert all(not e for e in out["error"])
    # bookkeeping: the driver waits for all 6 decoded rows of the video, even when they reach the
    # fragment writers in several batches
    assert decoded["parts"].tolist() == [6] * 6
    assert out["parts"].tolist() == [6] * 10 and int(out["part_done"].sum()) == 6


def test_fragment_bookkeeping_counts_decoded_rows(long_corpus, tmp_path):
    root, manifest = long_corpus
    data = (root / manifest.iloc[0]["path"]).read_bytes()
    record = {**probe_record(data), "video_id": "v0", "sha256": "x", "captions": ["c"], "duration": 20.0}
    _, out = _embed_rows(data, record, window_s=4.0, stride_s=2.0)
    dim = out["embedding"].shape[1]
    halves = [{k: v[sl] for k, v in out.items()} for sl in (slice(0, 4), slice(4, None))]
    books = [embedding.write_shard_fragments(h, str(tmp_path / "part"), dim) for h in halves]
    assert [b["parts"].tolist() for b in books] == [[6], [6]]
    assert sum(int(b["parts_done"][0]) for b in books) == 6
    assert sum(int(b["rows"][0]) for b in books) == 10


def test_windows_default_to_the_sampling_span_and_bad_json_is_an_error_row(long_corpus):
    root, manifest = long_corpus
    data = (root / manifest.iloc[1]["path"]).read_bytes()
    record = {**probe_record(data), "video_id": "v1", "sha256": "x", "captions": ["c"]}
    sampling = {"num_clips": 2, "frames_per_clip": 4, "fps": 2.0, "mode": "eval"}  # 2 s clips
    _, out = _embed_rows(data, record, sampling=sampling)
    bounds = [(s, e) for c, s, e in zip(out["clip_index"], out["start_s"], out["end_s"]) if c >= 0]
    assert bounds == plan_windows(record["duration"], 2.0, 1.0)
    _, broken = _embed_rows(data, {k: v for k, v in record.items() if k != "fps"}, window_s=4, stride_s=2)
    # no fps in the json: the sparse row probes and gives the video row; the windows are one error row
    assert broken["clip_index"].tolist() == [VIDEO_ROW, embedding.ERROR_ROW]
    assert broken["error"].tolist() == ["", "invalid_metadata"]


# ------------------------------------------------------------------------------ moments in VideoIndex
def _write_rows(root, rows, dim):
    sub = storage.join(str(root), "model_id=toy_m")
    storage.makedirs(sub)
    storage.write_parquet(pa.Table.from_pylist(rows, schema=embedding_schema(dim)),
                          storage.join(sub, "part-000000.parquet"))
    storage.write_text(storage.join(sub, "_model.json"), json.dumps({"model_id": "toy@m", "dim": dim}))


def test_search_names_the_high_scoring_window_run(tmp_path):
    dim, rng = 16, np.random.default_rng(0)
    query = rng.normal(size=dim).astype(np.float32)
    query /= np.linalg.norm(query)
    rows, next_id = [], 0

    def add(video_id, clip_index, start, end, vec):
        nonlocal next_id
        rows.append({"id": next_id, "video_id": video_id, "key": video_id, "shard": "s",
                     "clip_index": clip_index, "start_s": start, "end_s": end, "model_id": "toy@m",
                     "embedding": vec.tolist(), "captions": [f"caption of {video_id}"]})
        next_id += 1

    def noise():
        v = rng.normal(size=dim).astype(np.float32)
        v -= (v @ query) * query  # orthogonal to the query: score ~0
        return v / np.linalg.norm(v)

    for v in range(6):  # windowed videos: 9 windows of 4 s every 2 s; video 2 holds the event at windows 3-5
        vid = f"win-{v}"
        for w in range(9):
            vec = noise()
            if v == 2 and w in (3, 4, 5):
                vec = (0.95 + 0.01 * (w == 4)) * query + 0.2 * vec
            elif v == 4 and w == 7:
                vec = 0.6 * query + 0.8 * vec  # a weaker, single-window match elsewhere
            add(vid, WINDOW_CLIP_BASE + w, 2.0 * w, 2.0 * w + 4.0, vec / np.linalg.norm(vec))
        add(vid, VIDEO_ROW, 0.0, 20.0, noise())
    for v in range(4):  # sparse-clip videos (no windows): unchanged behaviour
        for c in range(3):
            add(f"sparse-{v}", c, float(c), float(c + 1), noise() if v or c else 0.7 * query + 0.7 * noise())
    _write_rows(tmp_path / "emb", rows, dim)
    build_index(tmp_path / "emb", tmp_path / "idx", factory="Flat", progress=False)
    index = VideoIndex.open(tmp_path / "idx")
    hits = index.search(query, k=3)
    top = hits[0]
    assert top.video_id == "win-2" and (top.start_s, top.end_s) == (6.0, 14.0)
    assert top.moments == [Moment(6.0, 14.0, pytest.approx(top.score, abs=1e-5), 3)]
    sparse = next(h for h in hits if h.video_id == "sparse-0")
    assert sparse.moments is None and (sparse.start_s, sparse.end_s) == (0.0, 1.0)
    # several moments per video; off with moments_per_video=0 (the best window's own span)
    many = index.search(query, k=3, moments_per_video=3, rel_threshold=1.0)
    assert len(many[0].moments) >= 1 and many[0].moments[0].start_s == 6.0
    plain = index.search(query, k=3, moments_per_video=0)[0]
    assert plain.moments is None and (plain.start_s, plain.end_s) == (8.0, 12.0)


# --------------------------------------------------------------------------- end to end on local Ray
@pytest.mark.slow
def test_windowed_embed_run_writes_window_rows_and_reports_vectors_per_hour(long_corpus, ray_local, tmp_path):
    from pipeline.ingest import run_ingest  # only this test ingests (keeps the module's imports light)
    from workflows.embed import run_embed

    root, manifest = long_corpus
    shards = tmp_path / "ingest"
    run_ingest(str(root / "manifest.parquet"), str(shards), samples_per_shard=8)
    sampling = {"num_clips": 2, "frames_per_clip": 4, "fps": 1.0, "mode": "eval"}  # clip span 4 s
    summary = run_embed(str(shards), MODEL, str(tmp_path / "emb"), sampling=sampling, batch_size=2,
                        allow_random_init=True, windows=True)
    expected = {vid: plan_windows(d, 4.0, 2.0) for vid, d in zip(manifest["video_id"], manifest["duration"])}
    assert summary["videos"] == 3 and summary["errors"] == 0
    assert summary["clips"] == sum(len(w) for w in expected.values())
    hours = manifest["duration"].sum() / 3600
    assert summary["video_hours"] == pytest.approx(hours, abs=1e-4)
    assert summary["vectors_per_hour"] == pytest.approx((3 + summary["clips"]) / hours, rel=1e-3)
    partition = summary["partition"]
    assert embedding.read_model_card(partition)["windows"] == {"window_s": None, "stride_s": None}
    table = embedding.read_embeddings(partition).to_pylist()
    for vid, bounds in expected.items():
        got = sorted((r["clip_index"], r["start_s"], r["end_s"]) for r in table
                     if r["video_id"] == vid and r["clip_index"] >= 0)
        assert got == [(WINDOW_CLIP_BASE + w, s, e) for w, (s, e) in enumerate(bounds)]
    build_index(tmp_path / "emb", tmp_path / "idx", factory="Flat", progress=False)
    index = VideoIndex.open(tmp_path / "idx", allow_random_init=True)
    for hit in index.search("a red circle moves left", k=3):
        assert hit.moments and 0.0 <= hit.start_s < hit.end_s <= manifest["duration"].max()
    # the partition is keyed by model only: a sparse run into it is refused, never a silent no-op
    with pytest.raises(ValueError, match="holds dense windows rows; a run with sparse clips needs its own"):
        run_embed(str(shards), MODEL, str(tmp_path / "emb"), sampling=sampling, batch_size=2,
                  allow_random_init=True)

"""Training and evaluation on timed captions (issue #16, docs/moments.md): clips drawn inside a segment's
span, batches that keep same-class segments apart but let segments of one video be hard negatives, a whole
in-process epoch over real shards of the ``long`` profile, the held-out query phrasing, and the moment
metrics (temporal IoU, R{n}@{IoU}, video R@1) on hand-checkable cases."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from pipeline.datasets import ShardClipDataset, segment_class
from pipeline.ingest import IngestShardStage, plan_inputs
from pipeline.inputs import read_inputs
from pipeline.moment_eval import MomentQuery, Span, best_iou, moment_metrics, relevant_segments, temporal_iou
from pipeline.sampling import SamplingConfig, plan_in_span
from pipeline.training import TrainConfig, distinct_batches, load_train_config, meta_key, shard_inventory
from pipeline.training.loop import run_epochs, setup_worker
from synthetic import (
    HELDOUT_SEGMENT_TEMPLATES,
    SINGLE_TEMPLATES,
    generate_corpus,
    make_manifest,
)

TRAIN_CLIP = SamplingConfig(num_clips=1, frames_per_clip=4, fps=4.0, mode="train")


# ------------------------------------------------------------------------------------ sampling in a span


def test_train_clips_fall_inside_the_span_at_random_places():
    fps, start, end = 8.0, 5.125, 7.5
    firsts = set()
    for seed in range(200):
        plan = plan_in_span(TRAIN_CLIP, start, end, fps, rng=np.random.default_rng(seed))
        assert plan.mask.all()
        assert (plan.times >= start).all() and (plan.times < end).all(), plan.times
        assert np.allclose(np.diff(plan.times[0]), 0.25)  # 4 fps inside the clip
        frame = plan.times * fps - 0.5  # frame centres of the video's own grid (start is on it)
        assert np.allclose(frame, np.round(frame))
        firsts.add(round(float(plan.times[0, 0]), 4))
    # the 0.75 s clip may start anywhere in the 2.375 s span that leaves it inside: frames 41 .. 53
    assert min(firsts) == pytest.approx(5.1875) and max(firsts) <= end - 0.75
    assert len(firsts) >= 8


def test_eval_clip_is_centred_and_stream_start_time_is_added():
    cfg = SamplingConfig(num_clips=1, frames_per_clip=4, fps=4.0, mode="eval")
    plan = plan_in_span(cfg, 10.0, 14.0, 8.0)
    centre = (plan.times[0, 0] + plan.times[0, -1]) / 2
    assert abs(centre - 12.0) <= 1 / 8.0
    shifted = plan_in_span(cfg, 10.0, 14.0, 8.0, start_time=1.5)
    assert np.allclose(shifted.times, plan.times + 1.5)


def test_span_shorter_than_the_clip_masks_requests_past_its_end():
    plan = plan_in_span(SamplingConfig(num_clips=1, frames_per_clip=8, fps=8.0, mode="eval"), 3.0, 3.5, 8.0)
    assert plan.mask[0].tolist() == [True] * 4 + [False] * 4
    assert (plan.times[plan.mask] < 3.5).all()
    for bad in ((2.0, 2.0), (-1.0, 1.0), (3.0, float("nan"))):
        with pytest.raises(ValueError, match="segment span"):
            plan_in_span(TRAIN_CLIP, bad[0], bad[1], 8.0)


# ------------------------------------------------------------------------------------ classes and batches


def _segment_sample(video: str, i: int, cls: str) -> dict:
    return {"video_id": f"{video}#{i}", "meta": {"caption_class": cls, "source_video_id": video}}


def test_segment_class_is_the_event_of_the_video_class_or_else_the_caption():
    record = {"caption_class": "red|circle|left>blue|square|up",
              "segments": [{"caption": "x"}, {"caption": "A  Red circle"}]}
    assert [segment_class(record, i) for i in range(2)] == ["red|circle|left", "blue|square|up"]
    other = {"caption_class": "red|circle|left", "segments": [{"caption": "x"}, {"caption": "A  Red circle"}]}
    assert segment_class(other, 1) == "a red circle"  # parts do not match the segments: the caption


def test_batches_keep_same_class_segments_apart_and_same_video_segments_together():
    # video A: two events; video B: one event of the same class as A's first
    stream = [_segment_sample("A", 0, "red|circle|left"), _segment_sample("B", 0, "red|circle|left"),
              _segment_sample("A", 1, "blue|square|up"), _segment_sample("C", 0, "green|box|down")]
    batches = list(distinct_batches(iter(stream), 2, meta_key("caption_class")))
    ids = [[s["video_id"] for s in b] for b in batches]
    assert ids[0] == ["A#0", "A#1"]  # the same video's other event is a (hard) negative in the batch
    for b in batches:
        classes = [s["meta"]["caption_class"] for s in b]
        assert len(classes) == len(set(classes))  # never two segments of one class (false negatives)
    # the video's own class would keep A's events apart and let A#0 and B#0 (same event) share a batch
    by_video = [_segment_sample("A", 0, "x"), _segment_sample("A", 1, "x"), _segment_sample("B", 0, "y")]
    for s, vc in zip(by_video, ["A-class", "A-class", "B-class"]):
        s["meta"]["video_caption_class"] = vc
    wrong = list(distinct_batches(iter(by_video), 2, meta_key("video_caption_class")))
    assert [s["video_id"] for s in wrong[0]] == ["A#0", "B#0"]


def test_config_segments_option_and_the_moments_recipe():
    assert TrainConfig(model="m").segments is False
    cfg = load_train_config("configs/train/tiny-moments.yaml")
    assert cfg.segments is True and cfg.distinct_batch_key == "caption_class" == cfg.equivalence
    with pytest.raises(ValueError, match="unknown training config keys"):
        TrainConfig.from_dict({"model": "m", "segment": True})


# ------------------------------------------------------------------------------------ real shards


@pytest.fixture(scope="module")
def long_shards(tmp_path_factory):
    """Four long-profile videos (20-24 s, 8 fps, 32 px) ingested in this process (no Ray)."""
    root = tmp_path_factory.mktemp("long")
    manifest = generate_corpus(root, n=4, seed=11, min_duration=20.0, max_duration=24.0, size=32, fps=8,
                               profile="long", split_fractions=(0.5, 0.0, 0.5))
    rows, _ = plan_inputs(read_inputs(str(root / "manifest.parquet")))
    out = root / "ingested"
    IngestShardStage(str(out), {"samples_per_shard": 8})({"shard": [0], "rows": [rows]})
    return out, manifest


def test_dataset_yields_one_sample_per_segment_with_its_caption_and_span(long_shards):
    out, manifest = long_shards
    ds = ShardClipDataset(out, sampling=TRAIN_CLIP, size=32, segments=True, shuffle_shards=False, seed=3)
    samples = list(ds)
    assert len(samples) == sum(len(s) for s in manifest["segments"])
    by_video = {row.video_id: row for row in manifest.itertuples()}
    for s in samples:
        video, i = s["video_id"].split("#")
        row, i = by_video[video], int(i)
        seg = row.segments[i]
        assert s["captions"] == [seg["caption"]] and s["meta"]["source_video_id"] == video
        assert s["meta"]["caption_class"] == row.caption_class.split(">")[i]
        assert s["meta"]["video_caption_class"] == row.caption_class
        assert (s["times"] >= seg["start_s"]).all() and (s["times"] < seg["end_s"]).all()
        frames = s["frames"].astype(np.int16)
        assert np.abs(np.diff(frames, axis=1)).max() > 40  # the event's shape moves between the frames
    plain = list(ShardClipDataset(out, sampling=TRAIN_CLIP, size=32, shuffle_shards=False))
    assert len(plain) == len(manifest)  # without the option: one sample per video, as before


def test_a_segment_epoch_trains_and_evaluates_over_segments_in_process(long_shards):
    out, manifest = long_shards
    cfg = TrainConfig(model="clip4clip-meanP-tiny", segments=True, epochs=1, batch_size=2, eval_batch_size=4,
                      size=32, train_sampling=TRAIN_CLIP.to_dict(),
                      eval_sampling={"num_clips": 1, "frames_per_clip": 4, "fps": 4.0, "mode": "eval"},
                      shuffle_buffer=4, log_every=1)
    inventory = shard_inventory(out)
    state = setup_worker({"config": cfg.to_dict(), "inventory": inventory, "steps_per_epoch": 2}, 0, 1,
                         torch.device("cpu"))
    reports: list[dict] = []
    run_epochs(state, lambda s, m: reports.append(m))
    test = next(h for h in state.history if h["type"] == "eval" and h["split"] == "test")
    test_rows = manifest[manifest["split"] == "test"]
    assert test["num_videos"] == sum(len(s) for s in test_rows["segments"])  # items are segments
    assert test["equivalence"] == "caption_class"
    assert 0.0 <= test["t2v_R@1"] <= 1.0 and state.step == 2


# ------------------------------------------------------------------------------------ held-out phrasing


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{subject\}", ".+").replace(r"\{verb\}", ".+")
    return re.compile(f"^{pattern}$")


def test_test_split_queries_use_a_phrasing_no_training_caption_has():
    assert not set(HELDOUT_SEGMENT_TEMPLATES) & set(SINGLE_TEMPLATES)
    manifest = make_manifest(n=60, seed=2, min_duration=20, max_duration=30, size=32, fps=8, profile="long")
    rows = list(manifest.itertuples())
    train_caps = [seg["caption"] for r in rows if r.split != "test" for seg in r.segments]
    test_caps = [seg["caption"] for r in rows if r.split == "test" for seg in r.segments]
    assert train_caps and test_caps and not set(train_caps) & set(test_caps)
    heldout = [_template_regex(t) for t in HELDOUT_SEGMENT_TEMPLATES]
    for cap in test_caps:
        assert any(r.match(cap) for r in heldout), cap
    for cap in train_caps:
        assert not any(r.match(cap) for r in heldout), cap
    train_words = {w for c in train_caps for w in c.split()}
    assert {w for c in test_caps for w in c.split()} <= train_words | {"an"}  # no unseen word, only order


# ------------------------------------------------------------------------------------ moment metrics


def test_temporal_iou_hand_cases():
    assert temporal_iou(0, 2, 1, 3) == pytest.approx(1 / 3)
    assert temporal_iou(0, 4, 1, 2) == pytest.approx(0.25)
    assert temporal_iou(2, 5, 2, 5) == 1.0
    assert temporal_iou(0, 1, 1, 2) == 0.0 and temporal_iou(0, 1, 3, 4) == 0.0
    assert temporal_iou(10, 13, 10.5, 13.5) == pytest.approx(2.5 / 3.5)
    with pytest.raises(ValueError):
        temporal_iou(2, 1, 0, 1)
    assert best_iou(Span("v", 0, 2), [Span("w", 0, 2), Span("v", 1, 3)]) == pytest.approx(1 / 3)


def test_moment_metrics_hand_cases():
    segs = [Span("v1", 4, 7), Span("v2", 10, 12), Span("v3", 1, 4)]
    classes = ["red|circle|left", "blue|box|up", "red|circle|left"]
    assert relevant_segments(segs, classes, 0) == [segs[0], segs[2]]
    assert relevant_segments(segs, None, 0) == [segs[0]]
    queries = [
        # q1: top moment [4.5, 7.5] vs [4, 7]: IoU 2.5 / 3.5 = 0.714 -> R1@0.5 and R1@0.7
        MomentQuery("q1", [segs[0], segs[2]], [Span("v1", 4.5, 7.5)], ["v1"]),
        # q2: right video, top IoU 1/3; the second moment [10, 13] has IoU 2/3 -> R5@0.5 only
        MomentQuery("q2", [segs[1]], [Span("v2", 9, 11), Span("v2", 10, 13)], ["v2"]),
        # q3: another video of the same class first, [1, 2.8] vs [1, 4]: IoU 0.6 -> R1@0.5 (equivalence)
        MomentQuery("q3", [segs[0], segs[2]], [Span("v3", 1, 2.8)], ["v3"]),
        # q4: a wrong video first (IoU 0), the right one second with the exact span -> R5 only
        MomentQuery("q4", [segs[1]], [Span("v1", 4, 7), Span("v2", 10, 12)], ["v1", "v2"]),
    ]
    m = moment_metrics(queries)
    assert m["R1@0.5"] == pytest.approx(2 / 4)  # q1, q3
    assert m["R1@0.7"] == pytest.approx(1 / 4)  # q1
    assert m["R5@0.5"] == pytest.approx(4 / 4)
    assert m["R5@0.7"] == pytest.approx(2 / 4)  # q1, q4
    assert m["video_R@1"] == pytest.approx(3 / 4)  # q4's first video holds no relevant segment
    assert m["mIoU@1"] == pytest.approx((2.5 / 3.5 + 1 / 3 + 0.6 + 0.0) / 4)
    assert m["num_queries"] == 4
    with pytest.raises(ValueError):
        moment_metrics([])

"""Sampling plans (pure functions) and sample_clips end to end on a real video."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_decode import frame_pattern, make_video, nearest_reference

from pipeline.clips import sample_clips
from pipeline.decode import decode_all_frames, probe_video
from pipeline.sampling import SamplingConfig, plan_clips, plan_from_config


def test_config_roundtrip_and_validation():
    cfg = SamplingConfig(num_clips=3, frames_per_clip=4, fps=2.0, mode="eval", jitter=0.2)
    assert SamplingConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert SamplingConfig.from_json(cfg.to_json()) == cfg
    assert cfg.shape == (3, 4) and SamplingConfig(mode="clip4clip", max_frames=7).shape == (1, 7)
    with pytest.raises(ValueError, match="mode"):
        SamplingConfig(mode="random")
    with pytest.raises(ValueError, match="stride or fps"):
        SamplingConfig(stride=2, fps=1.0)
    with pytest.raises(ValueError, match="jitter"):
        SamplingConfig(jitter=0.6)
    with pytest.raises(ValueError, match="unknown keys"):
        SamplingConfig.from_dict({"num_clip": 3})
    with pytest.raises(ValueError, match="duration"):
        plan_clips(0.0, 30.0)
    with pytest.raises(ValueError, match="fps"):
        plan_clips(5.0, float("nan"))


def test_eval_plan_is_deterministic_and_centred():
    a = plan_clips(10.0, 10.0, num_clips=4, frames_per_clip=2, mode="eval", stride=2)
    b = plan_clips(10.0, 10.0, num_clips=4, frames_per_clip=2, mode="eval", stride=2)
    np.testing.assert_array_equal(a.times, b.times)
    assert a.times.shape == a.mask.shape == (4, 2) and a.mask.all()
    # Segments of 2.5 s; clip span 0.2 s; each clip's centre near its segment's centre.
    centres = a.times.mean(axis=1)
    np.testing.assert_allclose(centres, [1.25, 3.75, 6.25, 8.75], atol=0.1)
    np.testing.assert_allclose(np.diff(a.times, axis=1), 0.2)
    # Times are frame centres (x.05 at 10 fps), never frame boundaries.
    np.testing.assert_allclose((a.times * 10) % 1, 0.5, atol=1e-6)


def test_train_plan_is_seeded_and_stays_in_segments():
    kwargs = dict(num_clips=4, frames_per_clip=3, mode="train", stride=1)
    a = plan_clips(20.0, 25.0, rng=np.random.default_rng(3), **kwargs)
    b = plan_clips(20.0, 25.0, rng=np.random.default_rng(3), **kwargs)
    c = plan_clips(20.0, 25.0, rng=np.random.default_rng(4), **kwargs)
    np.testing.assert_array_equal(a.times, b.times)
    assert not np.array_equal(a.times, c.times)
    for _ in range(50):
        p = plan_clips(20.0, 25.0, rng=np.random.default_rng(_), **kwargs)
        seg = np.floor(p.times / 5.0)
        assert (seg == np.arange(4)[:, None]).all()  # every frame inside its own segment
        np.testing.assert_allclose(np.diff(p.times, axis=1), 0.04)
    # Start positions vary across seeds (random clip start inside each segment).
    starts = np.array([plan_clips(20.0, 25.0, rng=np.random.default_rng(s), **kwargs).times[0, 0]
                       for s in range(20)])
    assert starts.std() > 0.5


def test_train_jitter_and_target_fps():
    cfg = SamplingConfig(num_clips=2, frames_per_clip=5, fps=2.0, mode="train", jitter=0.3)
    p = plan_from_config(cfg, 30.0, 30.0, rng=np.random.default_rng(0))
    gaps = np.diff(p.times, axis=1)
    assert (gaps > 0.5 * (1 - 2 * 0.3) - 1e-9).all() and (gaps < 0.5 * (1 + 2 * 0.3) + 1e-9).all()
    assert not np.allclose(gaps, 0.5)  # jitter did something
    no_jit = plan_from_config(SamplingConfig(num_clips=2, frames_per_clip=5, fps=2.0, mode="train"), 30.0,
                              30.0, rng=np.random.default_rng(0))
    np.testing.assert_allclose(np.diff(no_jit.times, axis=1), 0.5)


def test_short_video_repeats_last_frame_and_masks():
    # 1 s at 10 fps, one clip of 8 frames at stride 2 needs 1.5 s: frames past the end are padding.
    p = plan_clips(1.0, 10.0, num_clips=1, frames_per_clip=8, mode="eval", stride=2)
    np.testing.assert_array_equal(p.mask[0], [True] * 5 + [False] * 3)
    np.testing.assert_allclose(p.times[0, 5:], 0.95)  # centre of the last frame
    assert (p.times <= 0.95 + 1e-9).all()
    pt = plan_clips(1.0, 10.0, num_clips=3, frames_per_clip=8, mode="train", stride=2,
                    rng=np.random.default_rng(0))
    assert pt.mask.sum(axis=1).tolist() == [5, 5, 5] and (pt.times <= 0.95 + 1e-9).all()


def test_clip4clip_plan():
    cfg = SamplingConfig(mode="clip4clip", max_frames=12)
    long = plan_from_config(cfg, 60.0, 30.0)
    assert long.times.shape == (1, 12) and long.mask.all()
    np.testing.assert_allclose(np.diff(long.times[0]), 5.0)  # evenly spaced over the video
    short = plan_from_config(cfg, 4.5, 30.0)
    assert short.mask[0].tolist() == [True] * 4 + [False] * 8  # <= 1 fps -> 4 frames
    assert (np.diff(short.times[0, :4]) >= 1.0 - 1e-9).all()
    np.testing.assert_allclose(short.times[0, 4:], 4.5 - 0.5 / 30)
    tiny = plan_from_config(cfg, 0.3, 30.0)
    assert tiny.mask.sum() == 1
    np.testing.assert_array_equal(plan_from_config(cfg, 60.0, 30.0).times, long.times)


def test_start_time_offset():
    p = plan_clips(10.0, 10.0, num_clips=2, frames_per_clip=2, mode="eval", start_time=1.5)
    q = plan_clips(10.0, 10.0, num_clips=2, frames_per_clip=2, mode="eval")
    np.testing.assert_allclose(p.times, q.times + 1.5)


@pytest.mark.parametrize("backend", ["pyav", "torchcodec"])
def test_sample_clips_end_to_end(backend):
    data = make_video(num_frames=40, fps=10, gop=10, size=(48, 64))
    meta = probe_video(data)
    reference = decode_all_frames(data)
    cfg = SamplingConfig(num_clips=4, frames_per_clip=2, stride=2, mode="train")
    s = sample_clips(data, cfg, size=32, backend=backend, rng=np.random.default_rng(1), meta=meta)
    assert s.frames.shape == (4, 2, 32, 32, 3) and s.frames.dtype == np.uint8
    assert s.mask.all() and s.times.shape == (4, 2) and (s.time_error == 0).all()
    full = sample_clips(data, cfg.to_dict(), backend=backend, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(full.times, s.times)  # same seed, same plan (dict config, probed meta)
    got_idx = nearest_reference(full.frames.reshape(-1, 48, 64, 3), reference)
    np.testing.assert_array_equal(got_idx, meta.frame_index_at(s.times.reshape(-1)))
    # Keyframe mode: every frame is a keyframe (t = 0, 1, 2, 3 s) and the error says how far it moved.
    k = sample_clips(data, cfg, backend=backend, keyframe_mode=True, rng=np.random.default_rng(1))
    kt = k.times + k.time_error
    np.testing.assert_allclose(kt, np.round(kt))
    nearest = np.abs(k.times[..., None] - meta.keyframe_times).min(axis=-1)
    np.testing.assert_allclose(np.abs(k.time_error), nearest)
    first = frame_pattern(int(kt[0, 0] * 10), 48, 64)
    assert np.abs(k.frames[0, 0].astype(int) - first.astype(int)).mean() < 6
    # A plan can be passed directly; json meta (duration/fps only) works in exact mode.
    s2 = sample_clips(data, cfg, backend=backend, rng=np.random.default_rng(1),
                      meta={"duration": meta.duration, "fps": meta.fps})
    np.testing.assert_array_equal(s2.times, s.times)

"""One probe (pipeline.decode.probe_video): ingest's record and the decoders' timelines come from the same
demux pass, so they agree on duration, fps, frames and keyframes; its options (ingest's) only decide what
is an error; every failure is one error type naming the input and the reason."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from test_decode import make_video
from test_ingest_bad_inputs import encode_video

from pipeline.decode import VideoDecodeError, VideoMeta, keyframe_meta, probe_video
from pipeline.probe import ProbeError, probe_record

VIDEOS = {
    "cfr": lambda: make_video(num_frames=45, fps=10, gop=10),
    "bframes": lambda: make_video(num_frames=60, fps=10, gop=12, bframes=2),
    "vfr": lambda: make_video(num_frames=8, fps=10, gop=5, pts=[0, 100, 150, 300, 310, 500, 700, 720]),
    "rotated": lambda: make_video(num_frames=12, fps=10, gop=4, rotation=90),
    "matroska": lambda: make_video(num_frames=30, fps=10, gop=10, fmt="matroska"),
    "mpegts": lambda: make_video(num_frames=30, fps=10, gop=10, fmt="mpegts"),
    "odd-size": lambda: make_video(num_frames=15, fps=10, gop=5, size=(37, 53)),
}


@pytest.mark.parametrize("name", sorted(VIDEOS))
def test_ingest_record_and_decode_timeline_agree(name, tmp_path):
    data = VIDEOS[name]()
    record = json.loads(json.dumps(probe_record(data, decode_check=True)))  # as the shard json holds it
    path = tmp_path / "v.bin"
    path.write_bytes(data)
    full, light = probe_video(path), probe_video(data, keyframes_only=True)
    for meta in (full, light):
        assert isinstance(meta, VideoMeta)
        assert (round(meta.duration, 6), round(meta.fps, 6)) == (record["duration"], record["fps"])
        assert (meta.num_frames, meta.num_keyframes) == (record["num_frames"], record["num_keyframes"])
        assert (meta.coded_width, meta.coded_height, meta.codec) == (record["width"], record["height"],
                                                                     record["codec"])
    np.testing.assert_array_equal(full.keyframe_times, light.keyframe_times)
    rebuilt = keyframe_meta(record)  # what keyframe-mode training uses instead of a probe
    np.testing.assert_array_equal(rebuilt.keyframe_times, full.keyframe_times)
    assert rebuilt.start_time == full.start_time and rebuilt.duration == pytest.approx(full.duration)
    if name == "rotated":  # displayed size is turned; the record keeps the coded size (nothing decoded)
        assert (full.width, full.height) == (record["height"], record["width"]) and full.rotation % 180 == 90


def test_options_decide_what_is_an_error_not_the_values(tmp_path, caplog):
    """A header that declares more frames than are present: ingest (strict) refuses it as a decode_error
    naming the input; the decoders get the frames that are there, with a warning."""
    whole = encode_video(frames=24, seed=5, faststart_path=tmp_path / "faststart.mp4")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    with pytest.raises(ProbeError) as info:
        probe_video(cut, keyframes_only=True, strict=True)
    assert info.value.reason == "decode_error" and str(cut) in info.value.message
    assert "truncated" in info.value.message
    with caplog.at_level(logging.WARNING, logger="pipeline.decode.probe"):
        kept = probe_video(cut)
    assert 0 < kept.num_frames < 24 and "declared frames present" in caplog.text
    with pytest.raises(VideoDecodeError) as info:
        probe_record(cut.read_bytes())
    assert info.value.reason == "decode_error" and "truncated" in info.value.message


def test_one_error_type_names_input_and_reason(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_bytes(b"this is a text file, not a video\n" * 20)
    good = encode_video(seed=1)
    cases = [(path, "not_a_video"), (good[: len(good) // 2], "decode_error"),
             (tmp_path / "gone.mp4", "missing"), (b"", "not_a_video")]
    for source, reason in cases:
        for kwargs in ({}, {"keyframes_only": True, "strict": True}):
            with pytest.raises(VideoDecodeError) as info:
                probe_video(source, **kwargs)
            assert info.value.reason == reason, (source if isinstance(source, bytes) else str(source))[:40]
            if not isinstance(source, bytes):
                assert str(source) in info.value.message
    with pytest.raises(VideoDecodeError) as info:
        probe_video(make_video(num_frames=4, fps=10, gop=2, size=(48, 64)), max_pixels=1000)
    assert info.value.reason == "too_large" and "64x48" in info.value.message


def test_raw_stream_without_timestamps_is_an_ingest_error_but_decodes(tmp_path):
    """Annex-B H.264 carries no timestamps and no duration: the decoders space its frames at the nominal
    rate; ingest (strict) refuses it rather than record a guessed duration."""
    data = make_video(num_frames=25, fps=10, gop=10, fmt="h264")
    meta = probe_video(data)
    assert not meta.has_timestamps and meta.num_frames == 25 and meta.duration > 0
    with pytest.raises(ProbeError) as info:
        probe_record(data)
    assert info.value.reason == "zero_duration" and "no declared duration" in info.value.message

"""Frame-exact sparse decoding: every backend returns the frame a full sequential decode shows at a time."""

from __future__ import annotations

import io
import json
import pickle
from fractions import Fraction

import av
import numpy as np
import pytest

import pipeline.clips
import pipeline.decode
from pipeline.clips import sample_clips
from pipeline.decode import (
    VideoDecodeError,
    available_backends,
    crop_resize,
    decode,
    decode_all_frames,
    decode_frames,
    decode_keyframes,
    estimate_frames_decoded,
    keyframe_meta,
    probe_video,
)
from pipeline.probe import probe_record as ingest_probe
from pipeline.sampling import SamplingConfig
from runtime.errors import DecodeFailure, NotAVideo, UnreadableInput, should_record

# Every backend, always: torchcodec is a declared dependency, so a machine where it does not import fails its
# cases (the ``backend`` check below) instead of silently running fewer of them.
BACKENDS = ["torchcodec", "pyav"]


@pytest.fixture(autouse=True)
def _backend_imports(request):
    """A case parametrized by ``backend`` fails, naming it, when that backend does not import here (the
    unparametrized tests that name torchcodec fail on their own: ``get_backend`` / the import raises)."""
    backend = getattr(request.node, "callspec", None) and request.node.callspec.params.get("backend")
    if backend and backend not in available_backends():
        pytest.fail(f"decode backend {backend!r} does not import on this machine; it is a declared "
                    "dependency (pyproject.toml): install it (make install)")


def test_every_backend_is_a_parameter():
    """A backend pipeline.decode gains is tested too (and torchcodec, a declared dependency, imports)."""
    assert set(available_backends()) <= set(BACKENDS)
    assert available_backends() == BACKENDS, f"only {available_backends()} import on this machine"
    with pytest.raises(ValueError, match="expected one of"):
        pipeline.decode.get_backend("nope")


def frame_pattern(i: int, h: int, w: int) -> np.ndarray:
    """A distinct, compressible picture per frame: 8x8 blocks of seeded random colours."""
    rng = np.random.default_rng(i)
    blocks = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(blocks.repeat(8, 0).repeat(8, 1)[:h, :w])


def make_video(
    num_frames: int = 40, fps: int = 10, gop: int = 10, size: tuple[int, int] = (48, 64), bframes: int = 0,
    pts: list[int] | None = None, rotation: int | None = None, fmt: str = "mp4",
) -> bytes:
    """H.264 test video in memory. ``pts`` (in 1/fps/100 units) makes a VFR stream."""
    h, w = size
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream("libx264", rate=fps)
        # 4:2:0 needs even sizes; odd test sizes use 4:4:4
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p" if h % 2 == 0 and w % 2 == 0 else "yuv444p"
        stream.options = {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "bf": str(bframes),
                          "crf": "12", "preset": "ultrafast" if bframes == 0 else "fast"}
        if pts is not None:
            stream.codec_context.time_base = Fraction(1, fps * 100)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(frame_pattern(i, h, w), format="rgb24")
            if pts is not None:
                frame.pts = pts[i]
                frame.time_base = Fraction(1, fps * 100)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def assert_same_frames(got: np.ndarray, want: np.ndarray, tol: float = 0.0) -> None:
    assert got.shape == want.shape
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.mean() <= tol, f"mean abs diff {diff.mean():.3f} > {tol}"


def nearest_reference(frames: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Index of the closest reference frame for each frame (proves *which* frame was returned)."""
    d = np.abs(frames[:, None].astype(np.int16) - reference[None].astype(np.int16)).mean(axis=(2, 3, 4))
    return d.argmin(axis=1)


@pytest.mark.parametrize("gop", [1, 4, 10, 250])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_decode_matches_full_decode(gop, backend):
    data = make_video(num_frames=45, fps=10, gop=gop)
    meta = probe_video(data)
    assert meta.num_frames == 45 and meta.fps == pytest.approx(10.0)
    reference = decode_all_frames(data, backend="pyav")
    # Out of order, duplicates, backwards jumps (forces seeks), boundaries, before start, past end.
    times = np.array([2.35, 0.05, 0.0, 4.49, 1.0, 0.999, 3.1, 3.1, 0.42, -1.0, 99.0, 1.26, 1.27])
    want = reference[meta.frame_index_at(times)]
    np.testing.assert_array_equal(meta.frame_index_at(times), [23, 0, 0, 44, 10, 9, 31, 31, 4, 0, 44, 12, 12])
    result = decode(data, times, backend=backend)
    got = result.frames
    if backend == "pyav":
        np.testing.assert_array_equal(got, want)  # same library: pixel-identical
    else:
        assert_same_frames(got, want, tol=2.0)  # other colour conversion: within a grey level or two
        assert (nearest_reference(got, reference) == meta.frame_index_at(times)).all()
    np.testing.assert_allclose(result.frame_times, meta.frame_times[meta.frame_index_at(times)], atol=1e-6)


def test_pyav_decodes_only_what_is_needed():
    data = make_video(num_frames=100, fps=10, gop=10)
    meta = probe_video(data)
    times = [2.05, 2.15, 7.55]  # frames 20, 21 (forward, no seek) and 75 (seek to 70)
    result = decode(data, times, backend="pyav")
    assert result.frames_decoded <= estimate_frames_decoded(meta, times) + 2  # +2: decoder pipeline delay
    assert estimate_frames_decoded(meta, times) == 2 + 6
    assert result.frames_decoded < 20


@pytest.mark.parametrize("backend", BACKENDS)
def test_bframes_and_seeks(backend):
    data = make_video(num_frames=60, fps=10, gop=12, bframes=2)
    meta = probe_video(data)
    reference = decode_all_frames(data)
    times = np.linspace(0.0, 5.95, 23)[::-1]
    got = decode_frames(data, times, backend=backend)
    assert (nearest_reference(got, reference) == meta.frame_index_at(times)).all()
    if backend == "pyav":
        np.testing.assert_array_equal(got, reference[meta.frame_index_at(times)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_variable_frame_rate(backend):
    # Irregular gaps: 10 ms .. 400 ms between frames (time base 1/1000).
    gaps = [10, 40, 400, 20, 100, 100, 250, 30, 60, 10, 300, 90, 45, 55, 200, 100, 100, 20, 80, 100]
    pts = np.concatenate([[0], np.cumsum(gaps)]).tolist()
    data = make_video(num_frames=len(pts), fps=10, gop=5, pts=pts)
    meta = probe_video(data)
    np.testing.assert_allclose(meta.frame_times, np.array(pts) / 1000.0)
    reference = decode_all_frames(data)
    assert len(reference) == len(pts)
    # Times inside each frame's interval, right at its start and just before the next frame.
    times = []
    for a, b in zip(pts[:-1], pts[1:]):
        times += [a / 1000.0 + 1e-6, (a + b) / 2000.0, b / 1000.0 - 1e-4]
    times = np.array(times)
    idx = meta.frame_index_at(times)
    np.testing.assert_array_equal(idx, np.repeat(np.arange(len(pts) - 1), 3))
    got = decode_frames(data, times, backend=backend)
    if backend == "pyav":
        np.testing.assert_array_equal(got, reference[idx])
    assert (nearest_reference(got, reference) == idx).all()


def test_backends_agree_with_resize_and_file_sources(tmp_path):
    data = make_video(num_frames=30, fps=10, gop=8, size=(50, 74))  # odd-ish size
    path = tmp_path / "v.mp4"
    path.write_bytes(data)
    times = [0.31, 2.9, 1.5]
    a = decode_frames(str(path), times, size=32, backend="pyav")
    b = decode_frames(io.BytesIO(data), times, size=32, backend="torchcodec")
    c = decode_frames(data, times, size=(24, 40), backend="pyav")
    assert a.shape == b.shape == (3, 32, 32, 3) and a.dtype == np.uint8
    assert c.shape == (3, 24, 40, 3)
    assert_same_frames(a, b, tol=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_frame_size(backend):
    data = make_video(num_frames=15, fps=10, gop=5, size=(37, 53))
    reference = decode_all_frames(data)
    got = decode_frames(data, [0.35, 1.25], backend=backend)
    assert got.shape == (2, 37, 53, 3)
    assert nearest_reference(got, reference).tolist() == [3, 12]
    assert decode_frames(data, [0.35], size=16, backend=backend).shape == (1, 16, 16, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotation_metadata_applied(backend):
    data = make_video(num_frames=12, fps=10, gop=4, size=(48, 64), rotation=90)
    meta = probe_video(data)
    assert meta.rotation == 90 and (meta.height, meta.width) == (64, 48)
    got = decode_frames(data, [0.55], backend=backend)
    assert got.shape == (1, 64, 48, 3)
    upright = np.rot90(frame_pattern(5, 48, 64))  # counter-clockwise, as the display matrix says
    assert np.abs(got[0].astype(int) - upright.astype(int)).mean() < 12


def test_stream_without_index_decodes_sequentially():
    # A raw Annex-B H.264 elementary stream: no container index, no timestamps.
    data = make_video(num_frames=25, fps=10, gop=10, fmt="h264")
    meta = probe_video(data)
    assert not meta.has_timestamps and meta.num_frames == 25
    reference = decode_all_frames(data)
    # Raw streams carry no timestamps: frames sit at the nominal rate the demuxer reports.
    times = (np.array([20, 3, 19, 24]) + 0.5) / meta.fps
    np.testing.assert_array_equal(meta.frame_index_at(times), [20, 3, 19, 24])
    got = decode_frames(data, times, backend="pyav")
    np.testing.assert_array_equal(got, reference[[20, 3, 19, 24]])


@pytest.mark.parametrize("bframes", [0, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_keyframe_mode_snaps_to_nearest_keyframe(backend, bframes):
    data = make_video(num_frames=50, fps=10, gop=10, bframes=bframes)
    meta = probe_video(data)
    np.testing.assert_allclose(meta.keyframe_times, [0.0, 1.0, 2.0, 3.0, 4.0])
    reference = decode_all_frames(data)
    times = np.array([0.2, 0.6, 1.49, 3.7, 4.9])
    result = decode_keyframes(data, times, backend=backend)
    want_kf = np.array([0.0, 1.0, 1.0, 4.0, 4.0])
    np.testing.assert_allclose(result.frame_times, want_kf)
    np.testing.assert_allclose(result.time_error, want_kf - times)
    assert (nearest_reference(result.frames, reference) == (want_kf * 10).astype(int)).all()
    if backend == "pyav":
        assert result.frames_decoded == 3  # one decode per distinct keyframe


def test_crop_resize_shapes_and_identity():
    frames = np.stack([frame_pattern(i, 40, 60) for i in range(2)])
    assert crop_resize(frames, None) is frames
    np.testing.assert_array_equal(crop_resize(frames, (40, 40)), frames[:, :, 10:50])
    small = crop_resize(frames, 20)
    assert small.shape == (2, 20, 20, 3) and small.dtype == np.uint8
    with pytest.raises(ValueError, match="size"):
        crop_resize(frames, 0)
    odd = np.stack([frame_pattern(i, 37, 53) for i in range(2)])  # odd sizes, portrait and landscape out
    assert crop_resize(odd, (21, 9)).shape == (2, 21, 9, 3) and crop_resize(odd, 15).shape == (2, 15, 15, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_and_missing_inputs_raise_named_errors(tmp_path, backend):
    with pytest.raises(VideoDecodeError) as err:
        decode_frames(b"this is not a video" * 10, [0.0], backend=backend)
    assert err.value.reason in ("not_a_video", "decode_error")
    with pytest.raises(VideoDecodeError, match="missing"):
        decode_frames(tmp_path / "nope.mp4", [0.0], backend=backend)
    with pytest.raises(VideoDecodeError, match="not_a_video"):
        probe_video(b"\x00" * 100)


def test_decode_errors_are_named_input_failures(tmp_path):
    """Each reason is the matching runtime.errors kind (the error policy records it); still a RuntimeError,
    and it survives pickling (Ray ships it across processes)."""
    kinds = {"missing": UnreadableInput, "not_a_video": NotAVideo, "no_video_stream": NotAVideo,
             "zero_duration": NotAVideo, "decode_error": DecodeFailure}
    for reason, kind in kinds.items():
        err = VideoDecodeError(reason, "clip.mp4: details")
        assert isinstance(err, kind) and isinstance(err, RuntimeError) and should_record(err, "record")
        assert err.reason == reason and err.message == "clip.mp4: details"
        again = pickle.loads(pickle.dumps(err))
        assert type(again) is type(err) and (again.reason, again.message) == (reason, err.message)
    assert not should_record(VideoDecodeError("decode_error", "x"), "raise")
    with pytest.raises(UnreadableInput, match="nope.mp4"):
        probe_video(tmp_path / "nope.mp4")
    with pytest.raises(NotAVideo):
        probe_video(b"this is not a video" * 10)


def test_keyframes_only_probe_matches_full_probe():
    data = make_video(num_frames=50, fps=10, gop=10, bframes=2)
    full, light = probe_video(data), probe_video(data, keyframes_only=True)
    np.testing.assert_allclose(light.keyframe_times, full.keyframe_times)
    assert light.keyframes_only and light.num_frames == full.num_frames == 50
    assert light.duration == pytest.approx(full.duration) and light.fps == pytest.approx(full.fps)
    with pytest.raises(ValueError, match="full probe"):
        light.frame_index_at([0.5])
    # Exact decoding with a keyframes-only meta re-probes instead of using it.
    np.testing.assert_array_equal(decode_frames(data, [2.35], backend="pyav", meta=light),
                                  decode_frames(data, [2.35], backend="pyav"))


@pytest.mark.parametrize("bframes", [0, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_keyframe_mode_from_shard_json_needs_no_probe(monkeypatch, backend, bframes):
    """Ingest records the keyframe timeline in the sample json; keyframe mode then seeks without a probe."""
    data = make_video(num_frames=50, fps=10, gop=10, bframes=bframes)
    record = json.loads(json.dumps(ingest_probe(data)))  # as read back from the shard's .json member
    light = probe_video(data, keyframes_only=True)
    rebuilt = keyframe_meta(record)
    np.testing.assert_array_equal(rebuilt.keyframe_times, light.keyframe_times)  # bit-identical times
    np.testing.assert_array_equal(rebuilt.pts, light.pts)
    assert rebuilt.start_time == light.start_time and rebuilt.keyframes_only
    assert keyframe_meta({"duration": 5.0, "fps": 10.0}) is None  # older shards: no timeline, probe instead

    cfg = SamplingConfig(num_clips=3, frames_per_clip=2, mode="eval")
    want = sample_clips(data, cfg, backend=backend, keyframe_mode=True)

    def no_probe(*args, **kwargs):
        raise AssertionError("probed although the shard json carries the keyframe timeline")

    monkeypatch.setattr(pipeline.clips, "probe_video", no_probe)
    monkeypatch.setattr(pipeline.decode, "probe_video", no_probe)
    got = sample_clips(data, cfg, backend=backend, keyframe_mode=True, meta=record)
    np.testing.assert_array_equal(got.frames, want.frames)
    np.testing.assert_allclose(got.time_error, want.time_error)
    assert np.abs(got.time_error).max() > 0  # the snapping really happened


@pytest.mark.parametrize("bframes", [0, 2])
def test_keyframe_packets_match_torchcodec_pixels(bframes):
    """The keyframe fast path (one packet + flush) gives torchcodec's own pixels for the snapped times."""
    import torchcodec.decoders  # a declared dependency: missing fails the test

    data = make_video(num_frames=50, fps=10, gop=10, bframes=bframes)
    times = np.array([0.3, 1.2, 2.6, 4.4])
    ours = decode_keyframes(data, times, backend="pyav")
    assert ours.frames_decoded == 4
    direct = torchcodec.decoders.VideoDecoder(data, dimension_order="NHWC", seek_mode="approximate")
    want = direct.get_frames_played_at(seconds=ours.frame_times.tolist()).data.numpy()
    assert np.abs(ours.frames.astype(int) - want.astype(int)).max() <= 1
    rotated = make_video(num_frames=30, fps=10, gop=10, bframes=bframes, size=(48, 64), rotation=90)
    upright = decode_keyframes(rotated, [1.1], backend="pyav").frames
    assert upright.shape[1:3] == decode_frames(rotated, [1.0], backend="pyav").shape[1:3] == (64, 48)
    np.testing.assert_array_equal(upright[0], decode_frames(rotated, [1.0], backend="pyav")[0])

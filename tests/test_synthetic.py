"""Synthetic corpus: real H.264, determinism, idempotent reruns, captions, splits, no single-frame leak."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest

import synthetic
from jobs import synth as synth_job
from synthetic import (
    COLOURS,
    MOTION_COLOURS,
    MOTION_DIRECTIONS,
    MOTION_SHAPES,
    generate_corpus,
    make_config,
    make_manifest,
    make_spec,
    read_manifest_csv,
    render_frame,
    render_frames,
    shape_state,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
REQUIRED_COLUMNS = [
    "video_id", "path", "captions", "split", "caption_class", "hard_group",
    "duration", "fps", "width", "height", "seed",
]  # fmt: skip


def decode_all(path: Path) -> tuple[np.ndarray, list[bool], av.video.stream.VideoStream]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames, keys = [], []
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            keys.append(bool(frame.key_frame))
        rate = stream.average_rate
        codec = stream.codec_context.name
    return np.stack(frames), keys, (rate, codec)


@pytest.fixture(scope="module")
def corpus(synthetic_corpus):
    """The session's corpus (conftest: 24 videos, 2-4 s, 64 px, 10 fps, 1 s keyframes) and the manifest that
    the same call returns: rerun on that folder, it finds every video valid and encodes none again (the
    session's corpus is not generated a second time for this module)."""
    progress = []
    manifest = generate_corpus(synthetic_corpus, n=24, seed=7, min_duration=2.0, max_duration=4.0, size=64,
                               fps=10, keyframe_interval=1.0, progress=progress.append)  # fmt: skip
    assert progress and progress[-1]["generated"] == 0 and progress[-1]["skipped"] == 24
    return synthetic_corpus, manifest


def test_manifest_contract(corpus):
    out, manifest = corpus
    assert list(manifest.columns[: len(REQUIRED_COLUMNS)]) == REQUIRED_COLUMNS
    assert len(manifest) == 24 and manifest["video_id"].is_unique
    assert manifest["video_id"].iloc[5] == "synth-000005"
    on_disk = pd.read_parquet(out / "manifest.parquet")
    pd.testing.assert_frame_equal(
        on_disk.assign(captions=on_disk["captions"].map(list)), manifest, check_dtype=False
    )
    from_csv = read_manifest_csv(out / "manifest.csv")
    assert from_csv["captions"].tolist() == manifest["captions"].tolist()
    assert from_csv["caption_class"].tolist() == manifest["caption_class"].tolist()
    for row in manifest.itertuples():
        assert row.path == f"videos/{row.video_id}.mp4" and (out / row.path).is_file()
        assert 2 <= len(row.captions) <= 5 and len(set(row.captions)) == len(row.captions)
        assert row.split in ("train", "val", "test")
        assert 2.0 - 0.05 <= row.duration <= 4.0 + 0.05
        assert (row.width, row.height, row.fps, row.seed) == (64, 64, 10.0, 7)
        assert row.hard_group == "+".join(
            sorted("|".join(p.split("|")[:2]) for p in row.caption_class.split(">"))
        )
    assert not list((out / "videos").glob(".*tmp*")), "no temp files left behind"


def test_videos_decode_with_right_frames_size_fps_and_keyframes(corpus):
    out, manifest = corpus
    for row in manifest.itertuples():
        frames, keys, (rate, codec) = decode_all(out / row.path)
        assert codec == "h264" and float(rate) == 10.0
        assert frames.shape == (row.num_frames, 64, 64, 3)
        assert row.num_frames == round(row.duration * 10)
        gop = row.keyframe_interval_frames
        assert gop == 10
        assert [i for i, k in enumerate(keys) if k] == list(range(0, row.num_frames, gop))


def test_keyframe_interval_other_values_and_odd_size(tmp_path):
    manifest = generate_corpus(tmp_path, n=3, seed=3, min_duration=2.0, max_duration=2.5, size=65, fps=12,
                               keyframe_interval=0.5, profile="motion")  # fmt: skip
    assert set(manifest["width"]) == {66} and set(manifest["height"]) == {66}  # rounded up to even
    for row in manifest.itertuples():
        frames, keys, (rate, _) = decode_all(tmp_path / row.path)
        assert frames.shape[1:] == (66, 66, 3) and float(rate) == 12.0
        assert [i for i, k in enumerate(keys) if k] == list(range(0, row.num_frames, 6))


def test_decoded_frames_match_the_render(corpus):
    out, manifest = corpus
    cfg = make_config(seed=7, min_duration=2.0, max_duration=4.0, size=64, fps=10, keyframe_interval=1.0)
    for index in (0, 1, 2):
        rendered = render_frames(make_spec(cfg, index), cfg).astype(np.float32)
        decoded, _, _ = decode_all(out / manifest["path"].iloc[index])
        psnr = 10 * np.log10(255.0**2 / np.mean((decoded.astype(np.float32) - rendered) ** 2))
        assert psnr > 28, f"video {index}: PSNR {psnr:.1f} dB vs the numpy render"


def test_same_seed_is_byte_identical_in_any_worker_count(corpus, tmp_path):
    out, manifest = corpus
    subset = tmp_path / "again"
    again = generate_corpus(subset, n=24, seed=7, min_duration=2.0, max_duration=4.0, size=64, fps=10,
                            keyframe_interval=1.0, workers=2)  # fmt: skip
    assert (subset / "manifest.csv").read_bytes() == (out / "manifest.csv").read_bytes()
    assert (subset / "manifest.parquet").read_bytes() == (out / "manifest.parquet").read_bytes()
    pd.testing.assert_frame_equal(again, manifest)
    for path in manifest["path"]:
        assert (subset / path).read_bytes() == (out / path).read_bytes(), path
    other = make_manifest(n=24, seed=8, min_duration=2.0, max_duration=4.0, size=64, fps=10)
    assert other["caption_class"].tolist() != manifest["caption_class"].tolist()
    # Splits hash the video id only, so they do not move with the seed.
    assert other["split"].tolist() == manifest["split"].tolist()


def test_rerun_is_idempotent_and_repairs_missing_partial_and_stale_files(tmp_path):
    kwargs = dict(n=6, seed=11, min_duration=2.0, max_duration=2.0, size=64, fps=10, profile="motion")
    first = generate_corpus(tmp_path, **kwargs)
    assert first.attrs["generation_stats"]["generated"] == 6
    originals = {p: (tmp_path / p).read_bytes() for p in first["path"]}
    mtimes = {p: (tmp_path / p).stat().st_mtime_ns for p in first["path"]}

    second = generate_corpus(tmp_path, **kwargs)
    assert second.attrs["generation_stats"] == {
        **second.attrs["generation_stats"],
        "generated": 0,
        "skipped": 6,
    }
    assert all((tmp_path / p).stat().st_mtime_ns == mtimes[p] for p in first["path"])

    videos = tmp_path / "videos"
    (tmp_path / first["path"][0]).unlink()  # lost
    blob = (tmp_path / first["path"][1]).read_bytes()
    (tmp_path / first["path"][1]).write_bytes(blob[: len(blob) // 2])  # truncated by a crash
    (videos / ".synth-000002.mp4.tmp-99999").write_bytes(blob[:100])  # a crashed writer's temp file
    third = generate_corpus(tmp_path, **kwargs)
    assert third.attrs["generation_stats"]["generated"] == 2
    assert {p: (tmp_path / p).read_bytes() for p in first["path"]} == originals
    assert not list(videos.glob(".*tmp*"))

    # Different settings in the same folder: every file is stale (digest differs) and gets rebuilt.
    fourth = generate_corpus(tmp_path, **{**kwargs, "seed": 12})
    assert fourth.attrs["generation_stats"]["generated"] == 6


def test_motion_profile_has_48_classes_and_captions_name_their_class():
    manifest = make_manifest(n=3000, seed=0, profile="motion", size=64, fps=10)
    expected = {f"{c}|{s}|{d}" for c in MOTION_COLOURS for s in MOTION_SHAPES for d in MOTION_DIRECTIONS}
    assert set(manifest["caption_class"]) == expected
    assert (manifest["num_shapes"] == 1).all()
    for row in manifest.head(300).itertuples():
        assert row.caption_class == f"{row.colour}|{row.shape}|{row.direction}"
        assert row.hard_group == f"{row.colour}|{row.shape}"
        for caption in row.captions:
            assert any(w in caption for w in synthetic.COLOUR_WORDS[row.colour])
            assert any(w in caption for w in synthetic.DIRECTION_WORDS[row.direction])


@pytest.mark.parametrize("profile", ["motion", "full"])
def test_caption_sets_of_different_classes_never_collide(profile):
    manifest = make_manifest(n=4000, seed=1, profile=profile, size=64, fps=10)
    owner: dict[str, str] = {}
    for captions, cls in zip(manifest["captions"], manifest["caption_class"]):
        for caption in captions:
            assert owner.setdefault(caption, cls) == cls, f"{caption!r} describes {owner[caption]} and {cls}"
    if profile == "full":
        assert (manifest["num_shapes"] == 2).mean() == pytest.approx(0.5, abs=0.05)
        assert set(manifest["event"]) == {"move", "grow", "shrink", "appear", "disappear"}
        pair = manifest[manifest["num_shapes"] == 2].iloc[0]
        first, second = pair["caption_class"].split(">")
        assert first.startswith(f"{pair['colour']}|{pair['shape']}|")
        assert second.startswith(f"{pair['colour2']}|{pair['shape2']}|")
        assert manifest["speed"].dropna().isin(["slowly", "quickly"]).all()


def test_split_fractions_are_respected():
    manifest = make_manifest(n=6000, seed=0, split_fractions=(0.5, 0.2, 0.3), size=64, fps=10)
    shares = manifest["split"].value_counts(normalize=True)
    assert shares["train"] == pytest.approx(0.5, abs=0.025)
    assert shares["val"] == pytest.approx(0.2, abs=0.025)
    assert shares["test"] == pytest.approx(0.3, abs=0.025)


def test_two_shape_events_happen_in_caption_order():
    cfg = make_config(seed=5, min_duration=4.0, max_duration=4.0, size=64, fps=10, profile="full")
    checked = 0
    for index in range(200):
        spec = make_spec(cfg, index)
        if len(spec["shapes"]) != 2:
            continue
        duration = spec["num_frames"] / 10
        times = (np.arange(spec["num_frames"]) + 0.5) / 10
        changes = []
        for s in spec["shapes"]:
            states = [shape_state(s, t, duration, spec["anchor_t"]) for t in times]
            moving = [i for i in range(1, len(states)) if states[i] != states[i - 1]]
            changes.append((min(moving), max(moving)))
        assert changes[0][1] < changes[1][0], f"video {index}: events overlap or run out of order"
        checked += 1
    assert checked > 50


def test_appear_and_disappear_are_visible_changes():
    cfg = make_config(seed=2, min_duration=3.0, max_duration=3.0, size=32, fps=10, profile="full")
    seen = set()
    for index in range(300):
        spec = make_spec(cfg, index)
        s = spec["shapes"][0]
        if len(spec["shapes"]) != 1 or s["event"] not in ("appear", "disappear"):
            continue
        colour = np.array(COLOURS[s["colour"]], dtype=np.uint8)
        first, last = (render_frame(spec, cfg, i) for i in (0, spec["num_frames"] - 1))
        present = [bool((frame == colour).all(-1).any()) for frame in (first, last)]
        assert present == ([False, True] if s["event"] == "appear" else [True, False])
        seen.add(s["event"])
    assert seen == {"appear", "disappear"}


# ---------------------------------------------------------------------------------------------------------
# No single frame tells the caption: a classifier fed one frame is at chance, the same classifier fed two
# frames (the positive control, proving the test can fail) is near perfect.
# ---------------------------------------------------------------------------------------------------------
def _ridge_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Held-out accuracy of a ridge-regression classifier (train on even rows, test on odd rows)."""
    x = np.concatenate([features, np.ones((len(features), 1))], axis=1)
    y = np.where(labels, 1.0, -1.0)
    train, test = slice(0, None, 2), slice(1, None, 2)
    w = np.linalg.solve(x[train].T @ x[train] + 1.0 * np.eye(x.shape[1]), x[train].T @ y[train])
    return float(np.mean(np.sign(x[test] @ w) == y[test]))


def _shape_mask(frame: np.ndarray, colour: str) -> np.ndarray:
    return (frame == np.array(COLOURS[colour], dtype=np.uint8)).all(-1)


def _periodic_features(mask: np.ndarray, axis: int) -> np.ndarray:
    """Where along ``axis`` the shape is: column/row mass plus its first circular moments."""
    profile = mask.sum(axis=axis).astype(np.float64)
    profile /= max(profile.sum(), 1.0)
    angle = 2 * np.pi * (np.arange(len(profile)) + 0.5) / len(profile)
    return np.concatenate([profile, [profile @ np.cos(angle), profile @ np.sin(angle)]])


@pytest.mark.parametrize("pair", [("left", "right"), ("up", "down")])
def test_single_frame_cannot_tell_the_direction(pair):
    size, fps = 32, 10
    cfg = make_config(seed=21, min_duration=2.0, max_duration=4.0, size=size, fps=fps, profile="motion")
    rng = np.random.default_rng(0)
    axis = 0 if pair[0] in ("left", "right") else 1  # sum over rows -> x profile; over columns -> y profile
    single, double, labels, positions = [], [], [], {pair[0]: [], pair[1]: []}
    for index in range(3000):
        spec = make_spec(cfg, index)
        s = spec["shapes"][0]
        if s["direction"] not in pair:
            continue
        i = int(rng.integers(spec["num_frames"] - 3))
        now, later = (_shape_mask(render_frame(spec, cfg, j), s["colour"]) for j in (i, i + 3))
        f_now, f_later = _periodic_features(now, axis), _periodic_features(later, axis)
        single.append(f_now)
        # Positive control: the same features of two frames plus the circular shift between them.
        shift = np.angle(complex(*f_later[-2:]) / complex(*f_now[-2:]))
        double.append(np.concatenate([f_now, f_later, [shift]]))
        labels.append(s["direction"] == pair[0])
        ys, xs = np.nonzero(now)
        coord = xs if axis == 0 else ys
        positions[s["direction"]].append(np.angle(np.exp(2j * np.pi * (coord + 0.5) / size).mean()))
        if len(labels) >= 600:
            break
    labels = np.array(labels)
    assert 0.35 < labels.mean() < 0.65
    single_acc = _ridge_accuracy(np.array(single), labels)
    double_acc = _ridge_accuracy(np.array(double), labels)
    assert single_acc < 0.62, f"one frame predicts {pair} with accuracy {single_acc:.2f}"
    assert double_acc > 0.9, f"positive control failed: two frames give only {double_acc:.2f}"
    # The circular mean position of the two groups agrees within sampling noise (uniform on the torus).
    a, b = (np.exp(1j * np.array(positions[d])) for d in pair)
    diff = abs(a.mean() - b.mean())
    assert diff < 4 * math.sqrt(0.5 / len(a) + 0.5 / len(b)), f"mean position differs by {diff:.3f}"


@pytest.mark.slow
def test_single_encoded_frame_cannot_tell_the_direction(tmp_path):
    """The same check on decoded H.264 frames: compression must not leak the motion either."""
    manifest = generate_corpus(tmp_path, n=300, seed=5, min_duration=2.0, max_duration=2.0, size=32, fps=10,
                               profile="motion")  # fmt: skip
    rng = np.random.default_rng(0)
    single, double, labels = [], [], []
    for row in manifest[manifest["direction"].isin(["left", "right"])].itertuples():
        frames, _, _ = decode_all(tmp_path / row.path)
        colour = np.array(COLOURS[row.colour], dtype=np.int32)
        i = int(rng.integers(len(frames) - 3))
        masks = [np.abs(frames[j].astype(np.int32) - colour).sum(-1) < 120 for j in (i, i + 3)]
        f_now, f_later = (_periodic_features(mask, 0) for mask in masks)
        single.append(f_now)
        shift = np.angle(complex(*f_later[-2:]) / complex(*f_now[-2:]))
        double.append(np.concatenate([f_now, f_later, [shift]]))
        labels.append(row.direction == "left")
    labels = np.array(labels)
    assert len(labels) > 100
    assert _ridge_accuracy(np.array(single), labels) < 0.65
    assert _ridge_accuracy(np.array(double), labels) > 0.9


def test_single_frame_cannot_tell_grow_from_shrink():
    cfg = make_config(seed=4, min_duration=2.0, max_duration=4.0, size=64, fps=10, profile="full")
    rng = np.random.default_rng(1)
    areas = {"grow": [], "shrink": []}
    single, double, labels = [], [], []
    for index in range(4000):
        spec = make_spec(cfg, index)
        s = spec["shapes"][0]
        if len(spec["shapes"]) != 1 or s["event"] not in ("grow", "shrink") or s["shape"] != "square":
            continue
        i = int(rng.integers(spec["num_frames"] - 5))
        now, later = (
            _shape_mask(render_frame(spec, cfg, j), s["colour"]).sum() / 64.0**2 for j in (i, i + 5)
        )
        areas[s["event"]].append(now)
        single.append([now, now**2])
        double.append([now, later, later - now])
        labels.append(s["event"] == "grow")
        if len(labels) >= 300:
            break
    labels = np.array(labels)
    assert _ridge_accuracy(np.array(single) * 10, labels) < 0.65
    assert _ridge_accuracy(np.array(double) * 10, labels) > 0.9
    grow, shrink = np.array(areas["grow"]), np.array(areas["shrink"])
    pooled_se = math.sqrt(grow.var() / len(grow) + shrink.var() / len(shrink))
    assert abs(grow.mean() - shrink.mean()) < 4 * pooled_se


# ---------------------------------------------------------------------------------------------------------
# Inputs and CLI.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"n": 0}, "n must"),
        ({"n": 2, "profile": "fancy"}, "profile"),
        ({"n": 2, "split_fractions": (0.5, 0.5, 0.5)}, "split_fractions"),
        ({"n": 2, "min_duration": 5.0, "max_duration": 2.0}, "min_duration"),
        ({"n": 2, "size": 8}, "size"),
        ({"n": 2, "fps": 0}, "fps"),
        ({"n": 2, "keyframe_interval": -1}, "keyframe_interval"),
        ({"n": 2, "workers": 0}, "workers"),
    ],
)
def test_bad_arguments_name_the_input(tmp_path, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        generate_corpus(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_cli_main_progress_summary_and_errors(tmp_path, capsys):
    args = ["--output", str(tmp_path), "--n", "4", "--size", "64", "--fps", "10", "--min-duration", "2",
            "--max-duration", "2", "--profile", "motion", "--keyframe-interval", "0.5"]  # fmt: skip
    assert synth_job.main(args) == 0
    printed = capsys.readouterr().out
    assert "videos/s" in printed and "ETA" in printed and "done: 4 videos" in printed
    manifest = pd.read_parquet(tmp_path / "manifest.parquet")
    assert set(manifest["keyframe_interval_frames"]) == {5} and set(manifest["profile"]) == {"motion"}
    assert synth_job.main(args) == 0
    assert "0 generated, 4 already present" in capsys.readouterr().out
    assert synth_job.main(["--output", str(tmp_path / "bad"), "--n", "0"]) == 2
    assert "n must" in capsys.readouterr().err


def test_cli_as_module(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.synth",
            "--output",
            str(tmp_path),
            "--n",
            "2",
            "--size",
            "64",
            "--fps",
            "10",
            "--max-duration",
            "2",
        ],  # fmt: skip
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "done: 2 videos" in result.stdout
    rows = read_manifest_csv(tmp_path / "manifest.csv")
    assert len(rows) == 2
    check_csv_captions(rows, pd.read_parquet(tmp_path / "manifest.parquet"))


def check_csv_captions(csv_rows: pd.DataFrame, parquet_rows: pd.DataFrame) -> None:
    """The CSV manifest's JSON captions decode to the same non-empty lists of distinct, non-empty strings
    as the Parquet manifest's."""
    for captions, expected in zip(csv_rows["captions"], parquet_rows["captions"]):
        assert isinstance(captions, list) and 2 <= len(captions) <= 5, captions
        assert all(isinstance(c, str) and c.strip() for c in captions), captions
        assert len(set(captions)) == len(captions), captions
        assert captions == list(expected)


def test_csv_caption_check_can_fail(tmp_path):
    """The check above rejects what a broken CSV writer would produce."""
    manifest = make_manifest(2, seed=0, size=64, fps=10, max_duration=2.0)
    check_csv_captions(manifest, manifest)
    for broken in (
        manifest.assign(captions=[json.dumps(c) for c in manifest["captions"]]),  # still JSON-encoded
        manifest.assign(captions=[[] for _ in range(2)]),  # lost
        manifest.assign(captions=[list(c)[:1] + [""] for c in manifest["captions"]]),  # an empty caption
        manifest.assign(captions=[list(c)[::-1] for c in manifest["captions"]]),  # reordered
    ):
        with pytest.raises(AssertionError):
            check_csv_captions(broken, manifest)


def test_unwritable_video_fails_naming_it_and_leaves_no_temp_file(tmp_path):
    (tmp_path / "videos" / "synth-000001.mp4").mkdir(parents=True)  # a folder squats the file's name
    with pytest.raises(RuntimeError, match=r"synth-000001\.mp4 \(index 1\)"):
        generate_corpus(tmp_path, n=2, seed=0, min_duration=2.0, max_duration=2.0, size=64, fps=10)
    assert not list((tmp_path / "videos").glob(".*tmp*"))
    assert not (tmp_path / "manifest.parquet").exists()

"""A corpus of bad inputs, generated here with PyAV: every row must end as a sample or an error with the right
reason class; manifest formats, globs and fsspec URIs; unusable inputs fail the job with a clear message."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest

from jobs.ingest import main as ingest_main
from pipeline.ingest import run_ingest
from pipeline.inputs import BadManifestRow, BadURI, InputError, read_inputs
from pipeline.keys import is_safe_key
from pipeline.probe import ProbeError, probe_record
from runtime.errors import DecodeFailure, NotAVideo, UnreadableInput, should_record


def encode_video(
    width: int = 64,
    height: int = 48,
    frames: int = 12,
    fps: int = 12,
    seed: int = 0,
    faststart_path: Path | None = None,
) -> bytes:
    """A small real H.264 mp4: moov at the end (as PyAV writes it), or first when written to a file path."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    target, options = (str(faststart_path), {"movflags": "faststart"}) if faststart_path else (buf, {})
    with av.open(target, mode="w", format="mp4", options=options) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            img = np.full((height, width, 3), (i * 20) % 255, np.uint8)
            img[: height // 2, : width // 2] = rng.integers(0, 255, 3, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return faststart_path.read_bytes() if faststart_path else buf.getvalue()


def encode_audio_only() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory) -> tuple[Path, dict[str, str | None]]:
    """Folder with videos/ + manifest.csv; returns (manifest, rows (id, path, expected reason or None))."""
    root = tmp_path_factory.mktemp("bad")
    vids = root / "videos"
    vids.mkdir()
    good = encode_video(seed=1)
    faststart = encode_video(frames=24, seed=5, faststart_path=root / "faststart.mp4")
    assert faststart[:64].find(b"moov") > 0  # header first: a truncated copy still opens, frames are missing
    files = {
        "good.mp4": good,
        "vidéo ünïcode.mp4": encode_video(seed=2),
        "my.dotted.name.v2.mp4": encode_video(seed=3),
        # seeded noise: unseeded bytes now and then parse as some demuxer's stream (a flaky reason class)
        "random.mp4": np.random.default_rng(0).bytes(4096),
        "garbled.mp4": good[:32] + np.random.default_rng(100).bytes(len(good) - 32),
        "truncated.mp4": good[: len(good) // 2],
        "truncated-faststart.mp4": faststart[: len(faststart) * 2 // 3],
        "zero.mp4": b"",
        "notes.mp4": b"this is a text file, not a video\n" * 20,
        "audio.mp4": encode_audio_only(),
        "huge.mp4": encode_video(width=320, height=240, frames=4, seed=4),
    }
    for name, data in files.items():
        (vids / name).write_bytes(data)
    rows = [  # (video_id, path, expected reason or None)
        ("ok-1", "videos/good.mp4", None),
        ("vidéo/ünïcode ../..", "videos/vidéo ünïcode.mp4", None),
        ("my.dotted.name.v2", "videos/my.dotted.name.v2.mp4", None),
        ("ok-1", "videos/vidéo ünïcode.mp4", "duplicate_id"),
        ("random", "videos/random.mp4", "not_a_video"),
        ("garbled", "videos/garbled.mp4", "decode_error"),
        ("truncated", "videos/truncated.mp4", "decode_error"),
        ("truncated-faststart", "videos/truncated-faststart.mp4", "decode_error"),
        ("zero", "videos/zero.mp4", "not_a_video"),
        ("notes", "videos/notes.mp4", "not_a_video"),
        ("audio", "videos/audio.mp4", "no_video_stream"),
        ("huge", "videos/huge.mp4", "too_large"),
        ("missing", "videos/does-not-exist.mp4", "missing"),
        ("a-dir", "videos", "unreadable"),
        ("bad-scheme", "nosuchscheme://bucket/x.mp4", "bad_uri"),
        ("file-uri", f"file://{vids / 'good.mp4'}", None),
    ]
    manifest = root / "manifest.csv"
    pd.DataFrame(
        {
            "video_id": [r[0] for r in rows],
            "path": [r[1] for r in rows],
            "captions": [json.dumps([f"caption of {r[0]}"]) for r in rows],
            "split": "train",
        }
    ).to_csv(manifest, index=False)
    return manifest, rows


def test_every_bad_input_gets_its_reason(bad_corpus, ray_local, tmp_path):
    manifest, rows = bad_corpus
    summary = run_ingest(str(manifest), tmp_path / "out", samples_per_shard=4, max_pixels=64 * 48 * 4)
    assert summary["inputs"] == len(rows) and summary["accounted"] and summary["complete"]
    errors = pd.read_parquet(tmp_path / "out" / "errors.parquet")
    assert set(errors.columns) >= {"source", "video_id", "reason", "message"}
    expected_errors = sorted((i, r[2]) for i, r in enumerate(rows) if r[2] is not None)
    got = sorted(zip(errors["input_index"], errors["reason"]))
    assert got == expected_errors, errors[["video_id", "reason", "message"]].to_string()
    assert all(errors["message"].str.len() > 0)
    assert "320x240" in errors.loc[errors.reason == "too_large", "message"].iloc[0]
    samples = []
    for tar_path in sorted((tmp_path / "out" / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                assert member.isfile() and "/" not in member.name and ".." not in member.name
                stem, ext = member.name.split(".", 1)
                assert ext in ("mp4", "json") and is_safe_key(stem)
                if ext == "json":
                    samples.append(json.loads(tar.extractfile(member).read()))
    assert len(samples) + len(errors) == len(rows)
    ids = {s["video_id"] for s in samples}
    assert ids == {"ok-1", "vidéo/ünïcode ../..", "my.dotted.name.v2", "file-uri"}
    keys = {s["video_id"]: s["key"] for s in samples}
    assert keys["ok-1"] == "ok-1" and keys["file-uri"] == "file-uri"
    assert keys["my.dotted.name.v2"].startswith("my_dotted_name_v2-")
    assert keys["vidéo/ünïcode ../.."].startswith("video_unicode-")
    dup_row = errors[errors.reason == "duplicate_id"].iloc[0]
    assert "row 0" in dup_row["message"]  # the first occurrence wins; the message says which row that was


def test_max_bytes_is_too_large(bad_corpus, ray_local, tmp_path):
    manifest, _ = bad_corpus
    one = tmp_path / "one.tsv"
    pd.DataFrame(
        {"id": ["big"], "uri": [str(manifest.parent / "videos" / "good.mp4")], "caption": ["one caption"]}
    ).to_csv(one, sep="\t", index=False)
    summary = run_ingest(str(one), tmp_path / "out", samples_per_shard=4, max_bytes=100)
    errors = pd.read_parquet(tmp_path / "out" / "errors.parquet")
    assert summary["samples"] == 0 and list(errors["reason"]) == ["too_large"]
    assert "max_bytes=100" in errors["message"][0]


def test_manifest_formats_globs_and_dirs(bad_corpus, tmp_path):
    manifest, rows = bad_corpus
    csv_rows = read_inputs(manifest)
    assert [r["video_id"] for r in csv_rows] == [r[0] for r in rows]
    assert csv_rows[0]["source"] == str(manifest.parent / "videos" / "good.mp4")  # relative to the manifest
    assert csv_rows[0]["captions"] == ["caption of ok-1"] and csv_rows[0]["split"] == "train"
    assert csv_rows[14]["error"][0] == "bad_uri" and "nosuchscheme" in csv_rows[14]["error"][1]
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps({"url": "../bad/videos/good.mp4", "captions": ["x", "y"]}) + "\n")
    (rel,) = read_inputs(jsonl)
    assert rel["video_id"] == "good" and rel["captions"] == ["x", "y"]
    assert rel["source"] == os.path.normpath(str(tmp_path / ".." / "bad" / "videos" / "good.mp4"))
    pq_manifest = tmp_path / "m.parquet"
    pd.DataFrame({"source": ["a.mp4"], "video_id": ["a"], "caption_class": ["k"]}).to_parquet(pq_manifest)
    (row,) = read_inputs(pq_manifest)
    assert row["caption_class"] == "k" and row["source"] == str(tmp_path / "a.mp4")
    by_dir = read_inputs(manifest.parent / "videos")
    assert len(by_dir) == 11 and [r["source"] for r in by_dir] == sorted(r["source"] for r in by_dir)
    by_glob = read_inputs(str(manifest.parent / "videos" / "*.v2.mp4"))
    assert [r["video_id"] for r in by_glob] == ["my.dotted.name.v2"]


def test_unusable_input_fails_with_a_clear_error(tmp_path, capsys):
    with pytest.raises(InputError, match="not found"):
        read_inputs(tmp_path / "nope.csv")
    (tmp_path / "nocol.csv").write_text("name,caption\na,b\n")
    with pytest.raises(InputError, match="no path column"):
        read_inputs(tmp_path / "nocol.csv")
    with pytest.raises(InputError, match="no input files match"):
        read_inputs(str(tmp_path / "*.mp4"))
    assert ingest_main(["--input", str(tmp_path / "nope.csv"), "--output", str(tmp_path / "o")]) == 2
    assert "input manifest not found" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_cli_exit_zero_with_bad_inputs(bad_corpus, ray_local, tmp_path, capsys):
    manifest, rows = bad_corpus
    rc = ingest_main(
        [
            "--input",
            str(manifest),
            "--output",
            str(tmp_path / "cli"),
            "--samples-per-shard",
            "8",
            "--max-pixels",
            str(64 * 48 * 4),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "samples + errors == inputs  yes" in out and "duplicate_id" in out
    run = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert run["summary"]["samples"] + run["summary"]["errors"] == len(rows)


def test_probe_counts_by_demuxing_and_optional_decode_check(bad_corpus):
    manifest, _ = bad_corpus
    good = (manifest.parent / "videos" / "good.mp4").read_bytes()
    fast = probe_record(good)
    assert fast == probe_record(good, decode_check=True)
    assert (fast["width"], fast["height"], fast["codec"], fast["num_frames"]) == (64, 48, "h264", 12)
    assert fast["fps"] == pytest.approx(12.0) and fast["duration"] == pytest.approx(1.0)
    assert fast["num_keyframes"] >= 1
    with pytest.raises(ProbeError) as info:
        probe_record((manifest.parent / "videos" / "huge.mp4").read_bytes(), max_pixels=1000)
    assert info.value.reason == "too_large"


def test_probe_errors_are_named_input_failures(bad_corpus):
    manifest, _ = bad_corpus
    videos = manifest.parent / "videos"
    kinds = {"random.mp4": NotAVideo, "audio.mp4": NotAVideo, "truncated.mp4": DecodeFailure}
    for name, kind in kinds.items():
        with pytest.raises(ProbeError) as info:
            probe_record((videos / name).read_bytes())
        assert isinstance(info.value, kind) and should_record(info.value, "record"), name
        again = pickle.loads(pickle.dumps(info.value))
        assert type(again) is type(info.value) and again.message == info.value.message
    assert isinstance(ProbeError("missing", "x"), UnreadableInput)
    assert type(ProbeError("too_large", "x")).__mro__[1] is ProbeError


def test_read_inputs_error_policy(bad_corpus, tmp_path):
    manifest, _ = bad_corpus
    assert read_inputs(manifest)[14]["error"][0] == "bad_uri"
    with pytest.raises(BadURI, match="row 14.*nosuchscheme") as info:
        read_inputs(manifest, on_error="raise")
    assert isinstance(info.value, UnreadableInput) and isinstance(info.value, ValueError)
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps({"path": "a.mp4", "captions": 3.5}) + "\n")
    (row,) = read_inputs(jsonl)
    assert row["error"][0] == "invalid_metadata" and "manifest row 0" in row["error"][1]
    with pytest.raises(BadManifestRow, match="captions must be a list"):
        read_inputs(jsonl, on_error="raise")
    assert issubclass(InputError, UnreadableInput) and issubclass(InputError, ValueError)


def test_cli_on_error_raise_exits_2_naming_the_input(bad_corpus, tmp_path, capsys):
    manifest, _ = bad_corpus
    rc = ingest_main(["--input", str(manifest), "--output", str(tmp_path / "o"), "--on-error", "raise"])
    assert rc == 2 and "nosuchscheme" in capsys.readouterr().err

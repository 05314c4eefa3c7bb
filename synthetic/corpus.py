"""A corpus on disk: settings checked, videos rendered + encoded (in spawned processes, skipping finished
ones), manifest written; plus the dry-run manifest and the run's summary."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synthetic.encode import encode_mp4, is_valid_video, video_digest
from synthetic.grammar import HELDOUT_SPLIT, caption_class, hard_group, make_captions, make_segments
from synthetic.render import render_frames
from synthetic.spec import LONG_MIN_DURATION, PROFILES, RenderConfig, make_spec, split_for, video_id_for


def _build_one(cfg: RenderConfig, index: int, n: int, videos_dir: str) -> tuple[int, bool]:
    """Render + encode one video unless a valid one exists. Returns (index, generated)."""
    spec = make_spec(cfg, index)
    digest = video_digest(spec, cfg)
    path = Path(videos_dir) / f"{video_id_for(index, n)}.mp4"
    if is_valid_video(path, digest, spec["num_frames"], cfg.size):
        return index, False
    try:
        encode_mp4(render_frames(spec, cfg), path, cfg.fps, cfg.gop, comment=digest)
    except Exception as exc:  # name the video: the bare FFmpeg/OS error says nothing about which one
        raise RuntimeError(f"synthetic video {path.name} (index {index}) was not written: {exc}") from exc
    return index, True


def _build_chunk(cfg: RenderConfig, indices: list[int], n: int, videos_dir: str) -> list[tuple[int, bool]]:
    return [_build_one(cfg, i, n, videos_dir) for i in indices]


# ---------------------------------------------------------------------------------------------------------
# Manifest + corpus.
# ---------------------------------------------------------------------------------------------------------
def _validate(n, size, fps, keyframe_interval, min_duration, max_duration, split_fractions, profile, workers):
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1 or n > 1_000_000:
        raise ValueError(f"n must be an integer in [1, 1000000], got {n!r}")
    if not 16 <= int(size) <= 1024:
        raise ValueError(f"size must be in [16, 1024] px, got {size!r}")
    if not (isinstance(fps, (int, float, Fraction)) and 0 < fps <= 240):
        raise ValueError(f"fps must be a number in (0, 240], got {fps!r}")
    if not (isinstance(keyframe_interval, (int, float)) and keyframe_interval > 0):
        raise ValueError(f"keyframe_interval must be > 0 seconds, got {keyframe_interval!r}")
    if not (0 < min_duration <= max_duration <= 3600):
        raise ValueError(
            "durations must satisfy 0 < min_duration <= max_duration <= 3600, "
            f"got min_duration={min_duration!r}, max_duration={max_duration!r}"
        )
    fractions = tuple(float(f) for f in split_fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(
            f"split_fractions must be 3 non-negative numbers summing to 1, got {split_fractions!r}"
        )
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    if profile == "long" and min_duration < LONG_MIN_DURATION:
        raise ValueError(
            f"profile long needs min_duration >= {LONG_MIN_DURATION:g} s (3 events + gaps), "
            f"got {min_duration!r}"
        )
    if not (isinstance(workers, int) and workers >= 1):
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    return fractions


def make_config(
    seed=0, min_duration=2.0, max_duration=10.0, size=128, fps=25, keyframe_interval=1.0, profile="full"
) -> RenderConfig:
    """RenderConfig with the size rounded up to even (yuv420p needs even dimensions)."""
    size = int(size)
    size += size % 2
    return RenderConfig(
        size=size,
        fps=Fraction(fps).limit_denominator(1001),
        keyframe_interval=float(keyframe_interval),
        profile=profile,
        seed=int(seed),
        min_duration=float(min_duration),
        max_duration=float(max_duration),
    )


def make_manifest(
    n: int,
    seed: int = 0,
    min_duration: float = 2.0,
    max_duration: float = 10.0,
    size: int = 128,
    fps: float = 25,
    keyframe_interval: float = 1.0,
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    profile: str = "full",
) -> pd.DataFrame:
    """The manifest of a corpus without rendering anything (a dry run: fast even for 100k videos)."""
    fractions = _validate(
        n, size, fps, keyframe_interval, min_duration, max_duration, split_fractions, profile, 1
    )
    cfg = make_config(seed, min_duration, max_duration, size, fps, keyframe_interval, profile)
    rows = []
    for index in range(n):
        spec = make_spec(cfg, index)
        video_id = video_id_for(index, n)
        shapes = spec["shapes"]
        row = {
            "video_id": video_id,
            "path": f"videos/{video_id}.mp4",
            "captions": make_captions(spec, profile, cfg.seed),
            "split": split_for(video_id, fractions),
            "caption_class": caption_class(spec, profile),
            "hard_group": hard_group(spec),
            "duration": spec["num_frames"] / float(cfg.fps),
            "fps": float(cfg.fps),
            "width": cfg.size,
            "height": cfg.size,
            "seed": cfg.seed,
            "num_frames": spec["num_frames"],
            "keyframe_interval_frames": cfg.gop,
            "profile": profile,
            "num_shapes": len(shapes),
            "background": spec["background"],
        }
        if profile == "long":
            row["segments"] = make_segments(spec, cfg, heldout=row["split"] == HELDOUT_SPLIT)
        for slot, suffix in ((0, ""), (1, "2")):
            s = shapes[slot] if slot < len(shapes) else None
            for key in ("colour", "shape", "event", "direction", "speed"):
                row[key + suffix] = s[key] if s else None
        rows.append(row)
    frame = pd.DataFrame(rows)
    for column in ("duration", "fps"):
        frame[column] = frame[column].astype("float64")
    for column in ("width", "height", "seed", "num_frames", "keyframe_interval_frames", "num_shapes"):
        frame[column] = frame[column].astype("int64")
    return frame


def write_manifest(manifest: pd.DataFrame, output_dir: Path) -> None:
    """``manifest.parquet`` + ``manifest.csv`` (captions JSON-encoded), each written atomically."""
    output_dir = Path(output_dir)
    tmp_parquet = output_dir / f".manifest.parquet.tmp-{os.getpid()}"
    manifest.to_parquet(tmp_parquet, index=False)
    os.replace(tmp_parquet, output_dir / "manifest.parquet")
    csv_frame = manifest.copy()
    for column in ("captions", "segments"):
        if column in csv_frame.columns:
            csv_frame[column] = csv_frame[column].map(json.dumps)
    tmp_csv = output_dir / f".manifest.csv.tmp-{os.getpid()}"
    csv_frame.to_csv(tmp_csv, index=False)
    os.replace(tmp_csv, output_dir / "manifest.csv")


def read_manifest_csv(path: str | Path) -> pd.DataFrame:
    """Read ``manifest.csv`` back with ``captions`` decoded to lists."""
    frame = pd.read_csv(path)
    for column in ("captions", "segments"):
        if column in frame.columns:
            frame[column] = frame[column].map(json.loads)
    return frame


def corpus_summary(manifest: pd.DataFrame, output_dir: str | Path, seconds: float) -> dict[str, Any]:
    """What a :func:`generate_corpus` run made: videos (generated / already present), caption classes,
    split sizes, total seconds of video, frame size and the run's wall time."""
    stats = manifest.attrs.get("generation_stats", {})
    return {
        "output": str(output_dir),
        "videos": len(manifest),
        "generated": stats.get("generated"),
        "skipped": stats.get("skipped"),
        "caption_classes": int(manifest["caption_class"].nunique()),
        "splits": {str(k): int(v) for k, v in manifest["split"].value_counts().items()},
        "video_seconds": round(float(manifest["duration"].sum()), 3),
        "size": int(manifest["width"].iloc[0]),
        "seconds": round(seconds, 3),
    }


def generate_corpus(
    output_dir,
    n: int,
    seed: int = 0,
    min_duration: float = 2.0,
    max_duration: float = 10.0,
    size: int = 128,
    fps: float = 25,
    keyframe_interval: float = 1.0,
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    profile: str = "full",
    workers: int = 1,
    progress: Callable[[dict], None] | None = None,
) -> pd.DataFrame:
    """Generate ``n`` captioned synthetic videos under ``output_dir`` and return the manifest.

    Writes ``videos/<video_id>.mp4`` and ``manifest.parquet`` / ``manifest.csv``. Idempotent: videos already
    present with the same spec (digest in the mp4 comment tag) are kept. ``progress`` (optional) is called
    with ``{"done", "total", "generated", "skipped", "elapsed_s"}`` as videos finish.

    ``workers > 1`` uses spawned processes, so a calling *script* needs the usual
    ``if __name__ == "__main__":`` guard (``python -m jobs.synth`` and pytest are fine).
    """
    _validate(n, size, fps, keyframe_interval, min_duration, max_duration, split_fractions, profile, workers)
    manifest = make_manifest(
        n, seed, min_duration, max_duration, size, fps, keyframe_interval, split_fractions, profile
    )
    cfg = make_config(seed, min_duration, max_duration, size, fps, keyframe_interval, profile)
    output_dir = Path(output_dir)
    videos_dir = output_dir / "videos"
    videos_dir.mkdir(parents=True, exist_ok=True)
    for stale in videos_dir.glob(".*.mp4.tmp-*"):  # leftovers of a crashed run, never finished files
        stale.unlink(missing_ok=True)

    stats = {"done": 0, "total": n, "generated": 0, "skipped": 0, "elapsed_s": 0.0}
    start = time.perf_counter()

    def record(results: list[tuple[int, bool]]) -> None:
        for _, generated in results:
            stats["done"] += 1
            stats["generated" if generated else "skipped"] += 1
        stats["elapsed_s"] = time.perf_counter() - start
        if progress is not None:
            progress(dict(stats))

    chunk = 8
    chunks = [list(range(i, min(i + chunk, n))) for i in range(0, n, chunk)]
    if workers == 1:
        for indices in chunks:
            record(_build_chunk(cfg, indices, n, str(videos_dir)))
    else:
        import multiprocessing

        # spawn: never fork a process that may hold Ray / torch threads.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = [pool.submit(_build_chunk, cfg, indices, n, str(videos_dir)) for indices in chunks]
            for future in as_completed(futures):
                record(future.result())
    write_manifest(manifest, output_dir)
    manifest.attrs["generation_stats"] = dict(stats)
    return manifest

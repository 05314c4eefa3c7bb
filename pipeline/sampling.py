"""Sparse clip sampling plans (ClipBERT / CLIP4Clip style) as pure functions.

A plan says *which instants* of a video to look at: ``times`` float ``[N, T]`` in seconds from the start of
the video stream and ``mask`` bool ``[N, T]`` (False = padding). Decoding is a separate step
(:mod:`pipeline.decode`); :func:`pipeline.clips.sample_clips` glues the two.

Modes
- ``train`` (ClipBERT): the video is cut into ``N`` equal segments; each clip of ``T`` frames starts at a
  uniformly random point inside its segment (so the clip ends inside the segment when it fits), with
  optional per-frame temporal jitter. Randomness comes only from the ``numpy.random.Generator`` passed in.
- ``eval``: deterministic, each clip centred in its segment.
- ``clip4clip``: one clip (``N = 1``) of up to ``max_frames`` frames evenly spaced over the whole video at
  no more than ``max_fps`` (1 fps by default); shorter videos are padded to ``max_frames`` (mask False), so
  every plan of a config has the same shape and batches stack.

Frame spacing inside a clip is ``stride`` source frames (``stride / video_fps`` seconds) or ``1 / fps``
seconds when a target ``fps`` is given. Times are placed at frame *centres* (half a source frame after the
frame boundary) so that float rounding can never tip a request into the neighbouring frame.
Requests past the end of the video are replaced by the time of the last frame and masked False.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

MODES = ("train", "eval", "clip4clip")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample clips from one video; plain data, JSON-serialisable (``to_dict`` / ``from_dict``).

    ``stride`` (source frames between sampled frames) and ``fps`` (target sampling rate) are exclusive;
    with neither, consecutive source frames are taken (stride 1). ``jitter`` is the maximum per-frame
    offset in train mode as a fraction of the frame spacing (0 <= jitter < 0.5 keeps frames ordered).
    ``max_frames`` / ``max_fps`` apply to ``clip4clip`` mode only.
    """

    num_clips: int = 4
    frames_per_clip: int = 2
    stride: int | None = None
    fps: float | None = None
    mode: str = "train"
    jitter: float = 0.0
    max_frames: int = 12
    max_fps: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"SamplingConfig.mode={self.mode!r}: expected one of {MODES}")
        if self.num_clips < 1 or self.frames_per_clip < 1:
            raise ValueError(
                f"SamplingConfig: num_clips={self.num_clips} and frames_per_clip={self.frames_per_clip} "
                "must both be >= 1"
            )
        if self.stride is not None and self.fps is not None:
            raise ValueError("SamplingConfig: give stride or fps, not both")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"SamplingConfig.stride={self.stride}: must be >= 1")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"SamplingConfig.fps={self.fps}: must be > 0")
        if not 0.0 <= self.jitter < 0.5:
            raise ValueError(f"SamplingConfig.jitter={self.jitter}: must be in [0, 0.5)")
        if self.max_frames < 1 or not self.max_fps > 0:
            raise ValueError(
                f"SamplingConfig: max_frames={self.max_frames} must be >= 1 and max_fps={self.max_fps} > 0"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """``(N, T)`` of every plan made from this config."""
        if self.mode == "clip4clip":
            return (1, self.max_frames)
        return (self.num_clips, self.frames_per_clip)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (they are usually typos)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"SamplingConfig.from_dict: unknown keys {sorted(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SamplingConfig:
        return cls.from_dict(json.loads(text))


@dataclasses.dataclass
class ClipPlan:
    """``times`` float64 ``[N, T]`` seconds (stream time), ``mask`` bool ``[N, T]`` (False = padding)."""

    times: np.ndarray
    mask: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.times.shape)  # type: ignore[return-value]


def _check_video(duration: float, fps: float) -> None:
    if not (np.isfinite(duration) and duration > 0):
        raise ValueError(f"video duration={duration!r}: must be a finite number > 0")
    if not (np.isfinite(fps) and fps > 0):
        raise ValueError(f"video fps={fps!r}: must be a finite number > 0")


def _finish(raw: np.ndarray, duration: float, fps: float, start_time: float, valid: np.ndarray) -> ClipPlan:
    """Clamp to the video, mark requests past the end invalid and point them at the last frame."""
    last_frame_time = max(duration - 0.5 / fps, 0.0)
    valid = valid & (raw < duration)
    times = np.clip(raw, 0.0, last_frame_time)
    times = np.where(valid, times, last_frame_time)
    return ClipPlan(times=times.astype(np.float64) + start_time, mask=valid.astype(bool))


def plan_clips(
    duration: float,
    fps: float,
    num_clips: int = 4,
    frames_per_clip: int = 2,
    mode: str = "train",
    *,
    stride: int | None = None,
    target_fps: float | None = None,
    jitter: float = 0.0,
    max_frames: int = 12,
    max_fps: float = 1.0,
    rng: np.random.Generator | None = None,
    start_time: float = 0.0,
) -> ClipPlan:
    """Plan ``N x T`` sample times for a video of ``duration`` seconds at ``fps`` (see module docstring).

    ``rng`` is used in train mode only; without one a fresh unseeded generator is used. ``start_time``
    (the stream's first timestamp) is added to every time so plans address stream timestamps directly.
    """
    config = SamplingConfig(
        num_clips=num_clips, frames_per_clip=frames_per_clip, stride=stride, fps=target_fps, mode=mode,
        jitter=jitter, max_frames=max_frames, max_fps=max_fps,
    )
    return plan_from_config(config, duration, fps, rng=rng, start_time=start_time)


def plan_from_config(
    config: SamplingConfig,
    duration: float,
    fps: float,
    rng: np.random.Generator | None = None,
    start_time: float = 0.0,
) -> ClipPlan:
    """Plan for one video from a :class:`SamplingConfig`."""
    _check_video(duration, fps)
    if config.mode == "clip4clip":
        return _plan_clip4clip(config, duration, fps, start_time)
    n, t = config.num_clips, config.frames_per_clip
    step = 1.0 / config.fps if config.fps is not None else (config.stride or 1) / fps
    half_frame = 0.5 / fps
    span = (t - 1) * step  # first to last sample of one clip
    segment = duration / n
    seg_starts = np.arange(n) * segment
    if config.mode == "eval":
        starts = seg_starts + (segment - span) / 2.0 - half_frame
        starts = np.clip(starts, 0.0, max(duration - span - 2 * half_frame, 0.0))
    else:
        if rng is None:
            rng = np.random.default_rng()
        # Room for the clip start inside its segment; clips longer than a segment start at the segment
        # start (or earlier, so that they still end inside the video when they fit in it at all).
        room = np.maximum(segment - span - 2 * half_frame, 0.0)
        starts = seg_starts + rng.uniform(0.0, 1.0, size=n) * room
        starts = np.minimum(starts, max(duration - span - 2 * half_frame, 0.0))
    # Snap clip starts onto the source frame grid: with stride sampling every time is then a frame centre.
    starts = np.floor(starts * fps + 1e-6) / fps
    raw = starts[:, None] + half_frame + np.arange(t)[None, :] * step
    if config.mode == "train" and config.jitter > 0:
        raw = raw + rng.uniform(-config.jitter, config.jitter, size=raw.shape) * step
    return _finish(raw, duration, fps, start_time, np.ones((n, t), dtype=bool))


def plan_in_span(
    config: SamplingConfig,
    start_s: float,
    end_s: float,
    fps: float,
    rng: np.random.Generator | None = None,
    start_time: float = 0.0,
) -> ClipPlan:
    """A plan of ``config`` inside ``[start_s, end_s)`` of a video (a captioned segment, docs/moments.md):
    the span is planned as if it were the whole video (train: ClipBERT random sparse clips inside it; eval:
    centred), then shifted to its place. Every valid time lies in ``[start_s, end_s)``; requests past the
    span's end are masked False. ``start_time`` is the stream's first timestamp, as in
    :func:`plan_from_config`."""
    if not (np.isfinite(start_s) and np.isfinite(end_s) and 0.0 <= start_s < end_s):
        raise ValueError(f"segment span [{start_s!r}, {end_s!r}): need finite 0 <= start_s < end_s")
    plan = plan_from_config(config, float(end_s) - float(start_s), fps, rng=rng, start_time=0.0)
    return ClipPlan(times=plan.times + float(start_s) + start_time, mask=plan.mask)


def _plan_clip4clip(config: SamplingConfig, duration: float, fps: float, start_time: float) -> ClipPlan:
    """``1 x max_frames``: evenly spaced over the video at <= max_fps, padded (mask False) when short."""
    available = max(int(np.floor(duration * config.max_fps + 1e-9)), 1)
    count = min(config.max_frames, available)
    # Centres of `count` equal segments of the video; their spacing is duration/count >= 1/max_fps.
    raw = (np.arange(count) + 0.5) * (duration / count)
    padded = np.full(config.max_frames, duration + 1.0)  # past the end -> last frame, masked
    padded[:count] = raw
    valid = np.zeros(config.max_frames, dtype=bool)
    valid[:count] = True
    return _finish(padded[None, :], duration, fps, start_time, valid[None, :])

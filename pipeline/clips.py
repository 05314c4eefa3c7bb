"""Sparse clip sampling: a sampling plan (`pipeline.sampling`) + sparse decoding (`pipeline.decode`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from pipeline.decode import Size, Source, VideoMeta, decode, keyframe_meta, probe_video
from pipeline.sampling import ClipPlan, SamplingConfig, plan_from_config


@dataclasses.dataclass
class ClipSample:
    """``frames`` uint8 ``[N, T, H, W, 3]``, ``mask`` bool ``[N, T]``, ``times`` float ``[N, T]`` (requested
    seconds), ``time_error`` float ``[N, T]`` (returned frame time - requested; non-zero in keyframe mode)."""

    frames: np.ndarray
    mask: np.ndarray
    times: np.ndarray
    time_error: np.ndarray


def _duration_fps(meta: VideoMeta | Mapping[str, Any]) -> tuple[float, float, float]:
    if isinstance(meta, VideoMeta):
        return meta.duration, meta.fps, meta.start_time
    try:
        return float(meta["duration"]), float(meta["fps"]), float(meta.get("start_time", 0.0) or 0.0)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"meta needs numeric 'duration' and 'fps', got {dict(meta)!r}") from exc


def sample_clips(
    source: Source,
    plan_or_config: ClipPlan | SamplingConfig | Mapping[str, Any],
    size: Size = None,
    backend: str | None = None,
    keyframe_mode: bool = False,
    rng: np.random.Generator | None = None,
    meta: VideoMeta | Mapping[str, Any] | None = None,
    device: str = "cpu",
) -> ClipSample:
    """Plan (unless a :class:`ClipPlan` is given) and decode ``N x T`` frames of one video.

    ``plan_or_config`` may be a plan, a :class:`SamplingConfig` or its dict. ``meta`` (a
    :class:`VideoMeta` or a dict with ``duration``/``fps``, e.g. the shard json) spares a probe; keyframe
    mode needs keyframe times, so it probes unless ``meta`` is a :class:`VideoMeta` or a shard json that
    carries them (ingest records ``time_base`` + ``keyframe_pts``).
    """
    if keyframe_mode and isinstance(meta, Mapping):
        meta = keyframe_meta(meta) or meta
    if isinstance(plan_or_config, ClipPlan):
        plan = plan_or_config
    else:
        config = (
            plan_or_config if isinstance(plan_or_config, SamplingConfig)
            else SamplingConfig.from_dict(dict(plan_or_config))
        )
        if meta is None or (keyframe_mode and not isinstance(meta, VideoMeta)):
            meta = probe_video(source, keyframes_only=keyframe_mode)
        duration, fps, start = _duration_fps(meta)
        plan = plan_from_config(config, duration, fps, rng=rng, start_time=start)
    video_meta = meta if isinstance(meta, VideoMeta) else None
    n, t = plan.times.shape
    result = decode(source, plan.times.reshape(-1), size=size, backend=backend, keyframe_mode=keyframe_mode,
                    meta=video_meta, device=device)
    frames = result.frames.reshape(n, t, *result.frames.shape[1:])
    return ClipSample(
        frames=frames, mask=plan.mask.copy(), times=plan.times.copy(),
        time_error=result.time_error.reshape(n, t).astype(np.float64),
    )

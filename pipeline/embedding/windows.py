"""Sliding windows for ``--windows`` runs (docs/moments.md): their bounds, sample times, decode stage."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.clips import sample_clips
from pipeline.embedding.decode import DecodeShardClipsStage
from pipeline.sampling import ClipPlan, SamplingConfig
from runtime.errors import InputError, InvalidMetadata, should_record

WINDOW_DECODE_GROUP = 64  # windows decoded per pass over a video (bounds the frames held at once)


def window_span(sampling: SamplingConfig | Mapping[str, Any], video_fps: float) -> float:
    """Default window length (s): the time one clip of the recorded sampling covers, ``frames_per_clip``
    frame steps (``1 / fps`` with a target fps, else ``stride`` source frames); ``clip4clip`` mode:
    ``max_frames / max_fps``."""
    cfg = sampling if isinstance(sampling, SamplingConfig) else SamplingConfig.from_dict(dict(sampling))
    if cfg.mode == "clip4clip":
        return cfg.max_frames / cfg.max_fps
    step = 1.0 / cfg.fps if cfg.fps is not None else (cfg.stride or 1) / video_fps
    return cfg.frames_per_clip * step


def plan_windows(duration: float, window_s: float, stride_s: float) -> list[tuple[float, float]]:
    """``[(start_s, end_s)]`` of sliding windows over ``[0, duration]``: starts ``0, stride, 2 stride...``
    while the window fits, then one window ending at ``duration`` when the tail is not covered; a video
    shorter than a window is one window ``(0, duration)``."""
    if not (window_s > 0 and stride_s > 0):
        raise ValueError(f"window_s={window_s} and stride_s={stride_s} must be > 0")
    eps = 1e-6
    if duration <= window_s + eps:
        return [(0.0, float(duration))]
    count = int(np.floor((duration - window_s) / stride_s + eps)) + 1
    bounds = [(round(i * stride_s, 6), round(i * stride_s + window_s, 6)) for i in range(count)]
    if bounds[-1][1] < duration - eps:
        bounds.append((round(duration - window_s, 6), round(float(duration), 6)))
    return bounds


def window_clip_plan(bounds: Sequence[tuple[float, float]], frames: int, duration: float, fps: float,
                     start_time: float = 0.0) -> ClipPlan:
    """``[W, frames]`` sample times: each window's frames at the centres of ``frames`` equal parts of it,
    snapped to source frame centres (so a window of ``frames`` frame steps takes them as trained)."""
    b = np.asarray(bounds, dtype=np.float64).reshape(-1, 2)
    part = (b[:, 1] - b[:, 0]) / frames
    raw = b[:, :1] + (np.arange(frames)[None, :] + 0.5) * part[:, None]
    snapped = (np.floor(raw * fps + 1e-6) + 0.5) / fps
    times = np.clip(snapped, 0.5 / fps, max(duration - 0.5 / fps, 0.5 / fps))
    return ClipPlan(times=times + start_time, mask=np.ones(times.shape, dtype=bool))


class DecodeWindowsStage(DecodeShardClipsStage):
    """:class:`DecodeShardClipsStage` for ``--windows`` runs: per input video, its usual sparse row (which
    gives the video-level row) plus rows of ``N`` sliding windows each (``N x T`` = the sampling's shape,
    so batches stack; the last row is padded with masked windows). Extra columns: ``window_index`` int64
    ``[B, N]`` (-1: no window; all -1 on the sparse row), ``window_bounds`` float64 ``[B, N, 2]`` and
    ``parts`` (decoded rows of the video, so the driver knows when all of them are written).

    ``window_s`` / ``stride_s``: seconds; None = :func:`window_span` of the sampling (per video fps) and
    half the window. A video whose windows cannot be decoded keeps its video row and gets one error row.
    """

    def __init__(self, *args: Any, window_s: float | None = None, stride_s: float | None = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.window_s, self.stride_s = window_s, stride_s

    def windows_of(self, record: Mapping[str, Any]) -> list[tuple[float, float]]:
        try:
            duration, fps = float(record["duration"]), float(record["fps"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidMetadata(f"sample json has no usable duration/fps: {exc}") from exc
        window = self.window_s or window_span(self.sampling, fps)
        return plan_windows(duration, window, self.stride_s or window / 2.0)

    def _window_rows(self, mp4: Any, record: Mapping[str, Any]) -> dict[str, list]:
        """The window rows of one video: ``frames``, ``mask``, ``times``, ``time_error``, ``window_index``,
        ``window_bounds`` per row of ``N`` windows."""
        n, t = self.sampling.shape
        bounds = self.windows_of(record)
        duration, fps = float(record["duration"]), float(record["fps"])
        start_time = float(record.get("start_time") or 0.0)
        out: dict[str, list] = {k: [] for k in ("frames", "mask", "times", "time_error", "window_index",
                                                "window_bounds")}
        group = max(n, WINDOW_DECODE_GROUP // n * n)
        for g in range(0, len(bounds), group):
            part = bounds[g:g + group]
            plan = window_clip_plan(part, t, duration, fps, start_time)
            clip = sample_clips(bytes(mp4), plan, size=self.size, backend=self.backend, device=self.device)
            for c in range(0, len(part), n):
                k = min(n, len(part) - c)
                row = {"frames": np.zeros((n, t, *self.size, 3), np.uint8), "mask": np.zeros((n, t), bool),
                       "times": np.zeros((n, t)), "time_error": np.zeros((n, t)),
                       "window_index": np.full(n, -1, np.int64), "window_bounds": np.zeros((n, 2))}
                for name in ("frames", "mask", "times", "time_error"):
                    row[name][:k] = getattr(clip, name)[c:c + k]
                row["window_index"][:k] = np.arange(g + c, g + c + k)
                row["window_bounds"][:k] = np.asarray(part[c:c + k])
                for name, value in row.items():
                    out[name].append(value)
        return out

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = super().__call__(batch)
        n, _ = self.sampling.shape
        b = len(out["key"])
        out["window_index"] = np.full((b, n), -1, np.int64)
        out["window_bounds"] = np.zeros((b, n, 2))
        out["parts"] = np.ones(b, np.int64)  # decoded rows of the video: its sparse row + its window rows
        extra: dict[str, list] = {k: [] for k in out}
        for i in range(b):
            if out["error"][i]:
                continue  # the sparse row already carries this video's failure
            try:
                rows = self._window_rows(batch["mp4"][i], json.loads(out["json"][i]))
                count, failure = len(rows["frames"]), ("", "")
            except InputError as exc:  # no row may be lost to a bad input; a bug raises
                if not should_record(exc, self.on_error):
                    raise
                rows, count, failure = {}, 1, (exc.reason, f"windows: {exc}")
            out["parts"][i] = 1 + count
            blank = {"error": failure[0], "error_message": failure[1], "parts": 1 + count,
                     "window_index": np.full(n, -1, np.int64)}  # a failure row: no window, no frames
            for name in out:
                if name in rows:
                    extra[name] += rows[name]
                elif name in blank:
                    extra[name] += [blank[name]] * count
                elif np.ndim(out[name]) > 1:
                    extra[name] += [np.zeros_like(out[name][i])] * count
                else:
                    extra[name] += [out[name][i]] * count
        if extra["key"]:
            for name in out:
                out[name] = np.concatenate([out[name], np.asarray(extra[name], dtype=out[name].dtype)])
        return out

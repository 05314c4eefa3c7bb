"""Probing: a video's timeline (every frame and keyframe timestamp, duration, fps, size, rotation) by demuxing
packets only, and the keyframe timeline rebuilt from a shard sample's json."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import av
import numpy as np

from pipeline.decode.errors import VideoDecodeError
from pipeline.decode.source import Source, describe_source, normalize_source, open_container

log = logging.getLogger(__name__)


@dataclasses.dataclass
class VideoMeta:
    """What :func:`probe_video` learns from the container without decoding a single frame.

    ``frame_times`` are the sorted presentation timestamps (seconds) of every frame, ``keyframe_times``
    those of the keyframes. ``width``/``height`` are as displayed (after rotation).
    """

    duration: float
    fps: float
    width: int
    height: int
    num_frames: int
    codec: str
    rotation: float
    start_time: float
    frame_times: np.ndarray
    keyframe_times: np.ndarray
    time_base: float
    pts: np.ndarray  # int64 stream units, sorted (same order as frame_times); -1 when the stream has none
    has_timestamps: bool = True
    keyframes_only: bool = False  # probed with keyframes_only=True: frame_times lists keyframes only

    @property
    def keyframe_indices(self) -> np.ndarray:
        return np.searchsorted(self.frame_times, self.keyframe_times)

    def frame_index_at(self, times: np.ndarray | Sequence[float]) -> np.ndarray:
        """Index of the frame shown at each time (the frame whose interval contains it, clamped)."""
        if self.keyframes_only:
            raise ValueError("frame_index_at needs a full probe (probe_video(..., keyframes_only=False))")
        idx = np.searchsorted(self.frame_times, np.asarray(times, dtype=np.float64), side="right") - 1
        return np.clip(idx, 0, len(self.frame_times) - 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (no per-frame arrays except the keyframe times)."""
        return {
            "duration": self.duration, "fps": self.fps, "width": self.width, "height": self.height,
            "num_frames": self.num_frames, "codec": self.codec, "rotation": self.rotation,
            "start_time": self.start_time, "keyframe_times": [float(t) for t in self.keyframe_times],
        }


def keyframe_meta(info: Mapping[str, Any]) -> VideoMeta | None:
    """The keyframes-only :class:`VideoMeta` (what ``probe_video(..., keyframes_only=True)`` returns) rebuilt
    from a shard sample's json (``pipeline.probe.probe_video`` records ``time_base`` and ``keyframe_pts`` at
    ingest); ``None`` when the json lacks them (older shards, streams without timestamps)."""
    tb, kpts = info.get("time_base") or [], info.get("keyframe_pts") or []
    if len(tb) != 2 or not kpts or not tb[1]:
        return None
    pts = np.asarray(sorted(int(p) for p in kpts), dtype=np.int64)
    # pts * num / den: the same arithmetic as probe_video, so both give bit-identical times
    times = pts * float(tb[0]) / float(tb[1])
    return VideoMeta(
        duration=float(info["duration"]), fps=float(info["fps"]), width=int(info.get("width") or 0),
        height=int(info.get("height") or 0), num_frames=int(info.get("num_frames") or len(pts)),
        codec=str(info.get("codec") or ""), rotation=0.0, start_time=float(info.get("start_time") or 0.0),
        frame_times=times, keyframe_times=times.copy(), time_base=float(tb[0]) / float(tb[1]), pts=pts,
        has_timestamps=True, keyframes_only=True,
    )


@dataclasses.dataclass
class _Demuxed:
    """Packets of the first video stream (timestamps, keyframe flags, durations) and its header fields."""

    pts: list[int]
    keys: list[bool]
    durations: list[int]
    has_ts: bool
    rotation: float
    time_base: Any  # Fraction or None
    rate: Any  # Fraction or None
    width: int
    height: int
    codec: str
    header_frames: int
    header_duration: float


def _read_packets(container, stream, name: str, keyframes_only: bool) -> tuple[list, list, list, bool, float]:
    """(pts, keyframe flags, durations, has timestamps, rotation) of every packet, by demuxing only.

    The rotation is read off the first decoded frame (display-matrix side data: one frame's work), unless
    ``keyframes_only``. A stream that breaks off after some packets keeps them (logged).
    """
    pts_list: list[int] = []
    key_list: list[bool] = []
    durations: list[int] = []
    has_ts, rotation = True, None
    try:
        for packet in container.demux(stream):
            if rotation is None and packet.size and not keyframes_only:
                try:
                    first = packet.decode()
                except av.error.FFmpegError:
                    first = []
                if first:
                    rotation = float(first[0].rotation or 0.0)
            if packet.size == 0 and packet.pts is None:
                continue  # the flush packet at end of stream
            ts = packet.pts if packet.pts is not None else packet.dts
            if ts is None:
                has_ts, ts = False, -1
            pts_list.append(int(ts))
            key_list.append(bool(packet.is_keyframe))
            durations.append(int(packet.duration or 0))
    except av.error.FFmpegError as exc:
        if not pts_list:
            raise VideoDecodeError("not_a_video", f"{name}: {exc}") from exc
        log.warning("probe %s: stream ends early (%s); using %d packets", name, exc, len(pts_list))
    return pts_list, key_list, durations, has_ts, rotation or 0.0


def _demux(source: Source, keyframes_only: bool) -> _Demuxed:
    """Open ``source`` and demux its first video stream (see :func:`_read_packets`)."""
    name = describe_source(source)
    with open_container(normalize_source(source), name) as container:
        if not container.streams.video:
            raise VideoDecodeError("no_video_stream", f"{name}: no video stream")
        stream = container.streams.video[0]
        pts, keys, durations, has_ts, rotation = _read_packets(container, stream, name, keyframes_only)
        if not pts:
            raise VideoDecodeError("zero_duration", f"{name}: video stream has no frames")
        tb_frac, cc = stream.time_base, stream.codec_context
        if stream.duration and tb_frac:
            header_duration = float(stream.duration * tb_frac)
        elif container.duration:
            header_duration = container.duration / 1e6
        else:
            header_duration = 0.0
        return _Demuxed(
            pts=pts, keys=keys, durations=durations, has_ts=has_ts, rotation=rotation, time_base=tb_frac,
            rate=stream.average_rate or stream.guessed_rate or stream.base_rate, width=cc.width,
            height=cc.height, codec=cc.name, header_frames=int(stream.frames or 0),
            header_duration=header_duration,
        )


def _frame_timeline(d: _Demuxed) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float, bool]:
    """(frame_times, pts, keyframe flags, start, duration, has_timestamps), sorted by presentation time."""
    pts = np.asarray(d.pts, dtype=np.int64)
    keys = np.asarray(d.keys, dtype=bool)
    n = len(pts)
    tb_frac, rate = d.time_base, d.rate
    tb = float(tb_frac) if tb_frac else 0.0
    if d.has_ts and tb > 0:
        order = np.argsort(pts, kind="stable")
        pts, keys = pts[order], keys[order]
        # pts * num / den rounds once, so a time written as a decimal (0.59) equals its frame's start
        frame_times = pts * float(tb_frac.numerator) / float(tb_frac.denominator)
        last_dur = d.durations[int(order[-1])] * tb
        fps_guess = float(rate) if rate else (n - 1) / max(frame_times[-1] - frame_times[0], 1e-9)
        if last_dur <= 0:
            last_dur = float(np.median(np.diff(frame_times))) if n > 1 else 1.0 / max(fps_guess, 1e-9)
        start = float(frame_times[0])
        return frame_times, pts, keys, start, float(frame_times[-1] - start + last_dur), True
    # Raw elementary streams carry no timestamps: frames are evenly spaced at the nominal rate.
    fps_guess = float(rate) if rate else 25.0
    return np.arange(n) / fps_guess, np.full(n, -1, dtype=np.int64), keys, 0.0, n / fps_guess, False


def probe_video(source: Source, keyframes_only: bool = False) -> VideoMeta:
    """Duration, fps, size, rotation and every frame/keyframe timestamp, by demuxing packets only.

    Works on streams without a seek index (packets are read in order); raises :class:`VideoDecodeError`
    with reason ``not_a_video`` / ``no_video_stream`` / ``zero_duration`` on unusable input.
    ``keyframes_only=True`` returns keyframes only (``frame_times == keyframe_times``) and skips reading
    the rotation (no decoding at all); it is enough for keyframe mode, not for exact decoding. Every
    packet is still demuxed: demuxer-level discarding mis-times keyframes of B-frame mp4 streams.
    """
    d = _demux(source, keyframes_only)
    if keyframes_only and not d.has_ts:
        return probe_video(source)  # raw streams: no timestamps to seek by, count every frame
    frame_times, pts, keys, start, duration, has_ts = _frame_timeline(d)
    n = len(pts)
    if not keys.any():
        keys[0] = True
    if keyframes_only:
        frame_times, pts, keys = np.asarray(frame_times)[keys], pts[keys], keys[keys]
        n = d.header_frames or n
        rate_f = float(d.rate) if d.rate else 0.0
        duration = d.header_duration or (n / rate_f if rate_f else duration)
    if not duration > 0:
        raise VideoDecodeError("zero_duration", f"{describe_source(source)}: duration {duration}")
    fps = n / duration if n > 1 else (float(d.rate) if d.rate else 1.0 / duration)
    width, height = d.width, d.height
    if int(round(d.rotation / 90.0)) % 2:
        width, height = height, width
    tb = float(d.time_base) if d.time_base else 0.0
    return VideoMeta(
        duration=duration, fps=float(fps), width=int(width), height=int(height), num_frames=n,
        codec=str(d.codec), rotation=float(d.rotation), start_time=start,
        frame_times=np.asarray(frame_times, dtype=np.float64),
        keyframe_times=np.asarray(frame_times, dtype=np.float64)[keys], time_base=tb, pts=pts,
        has_timestamps=has_ts, keyframes_only=keyframes_only,
    )

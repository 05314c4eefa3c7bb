"""Probing: a video's timeline (every frame and keyframe timestamp, duration, fps, size, rotation) by demuxing
packets only, and the keyframe timeline rebuilt from a shard sample's json.

:func:`probe_video` is the one probe of the project: ingest calls it with its options (``max_pixels``,
``decode_check``, ``strict``) and records :meth:`VideoMeta.ingest_record`; the decoders and the clip
sampler build their timelines from it. One demux pass, one result type (:class:`VideoMeta`), one error type
(:class:`VideoDecodeError`, naming the input and the reason)."""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Mapping, Sequence
from typing import Any, BinaryIO

import av
import numpy as np

from pipeline.decode.errors import VideoDecodeError
from pipeline.decode.source import Source, describe_source, normalize_source

log = logging.getLogger(__name__)


@dataclasses.dataclass
class VideoMeta:
    """What :func:`probe_video` learns from the container without decoding a single frame.

    ``frame_times`` are the sorted presentation timestamps (seconds) of every frame, ``keyframe_times``
    those of the keyframes. ``width``/``height`` are as displayed (after rotation), ``coded_width`` /
    ``coded_height`` as stored (what ingest records: it decodes nothing, so it knows no rotation).
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
    coded_width: int = 0
    coded_height: int = 0
    num_keyframes: int = 0  # keyframe packets of the stream (0: unknown)
    time_base_ratio: tuple[int, int] | None = None  # the stream's time base as (num, den)

    def ingest_record(self) -> dict[str, Any]:
        """The fields ingest writes to a sample's json and its shard's Parquet: ``duration``, ``fps``
        (rounded to the microsecond), coded ``width`` / ``height``, ``codec``, ``num_frames``,
        ``num_keyframes``, and the keyframe timeline (``start_time``, ``time_base`` ``[num, den]``, sorted
        ``keyframe_pts``; ``0.0, [], []`` for a stream without timestamps) that :func:`keyframe_meta`
        rebuilds, so keyframe-mode training seeks without probing again."""
        record = {"duration": round(self.duration, 6), "fps": round(self.fps, 6), "width": self.coded_width,
                  "height": self.coded_height, "codec": self.codec, "num_frames": self.num_frames,
                  "num_keyframes": self.num_keyframes}
        if not self.has_timestamps or self.time_base_ratio is None or not self.num_keyframes:
            return {**record, "start_time": 0.0, "time_base": [], "keyframe_pts": []}
        keyframe_pts = self.pts if self.keyframes_only else self.pts[self.keyframe_indices]
        return {**record, "start_time": float(self.start_time), "time_base": list(self.time_base_ratio),
                "keyframe_pts": sorted(int(p) for p in keyframe_pts)}

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


# Magic numbers of containers we recognise: bytes that start like a video but do not open are a decode_error
# (e.g. a truncated mp4), anything else is not_a_video.
_CONTAINER_MAGIC = (
    (4, b"ftyp"), (4, b"moov"), (4, b"mdat"), (4, b"free"), (4, b"wide"), (0, b"\x1a\x45\xdf\xa3"),
    (0, b"RIFF"), (0, b"\x00\x00\x01\xba"), (0, b"\x00\x00\x01\xb3"), (0, b"FLV"), (0, b"\x47"),
)
# Open without decoding: avformat_find_stream_info would otherwise decode frames (tens of ms for one 720p
# keyframe) only to learn the pixel format, which a keyframes-only probe does not need. Small probe window.
FAST_OPEN_OPTIONS = {"skip_frame": "all", "analyzeduration": "0", "probesize": "65536"}


def looks_like_video(data: bytes) -> bool:
    """True when the bytes start with a known container signature."""
    for offset, magic in _CONTAINER_MAGIC:
        if data[offset : offset + len(magic)] == magic and (magic != b"\x47" or data[188:189] == b"\x47"):
            return True
    return False


def _head(src: str | bytes | BinaryIO) -> bytes:
    """The first bytes of a normalised source (for :func:`looks_like_video`)."""
    if isinstance(src, bytes):
        return src[:256]
    if isinstance(src, str):
        with open(src, "rb") as fh:
            return fh.read(256)
    src.seek(0)
    return src.read(256)


def open_probe(src: str | bytes | BinaryIO, name: str, fast: bool = False):
    """Open a normalised source with PyAV (``fast``: :data:`FAST_OPEN_OPTIONS`); an open failure is a
    ``VideoDecodeError`` naming the input: ``decode_error`` when the bytes start like a container
    (truncated or corrupt), else ``not_a_video``."""
    if isinstance(src, bytes) and not src:
        raise VideoDecodeError("not_a_video", f"{name}: empty file (0 bytes)")
    try:
        if isinstance(src, bytes):
            return av.open(io.BytesIO(src), mode="r", options=FAST_OPEN_OPTIONS if fast else {})
        if hasattr(src, "seek"):
            src.seek(0)
        return av.open(src, mode="r", options=FAST_OPEN_OPTIONS if fast else {})
    except (av.error.FFmpegError, OSError) as exc:
        looks = looks_like_video(_head(src))
        reason = "decode_error" if looks else "not_a_video"
        hint = " (container signature found: truncated or corrupt?)" if looks else ""
        raise VideoDecodeError(reason, f"{name}: cannot open container{hint}: {type(exc).__name__}: {exc}"
                               ) from exc


def _open_for_probe(src: str | bytes | BinaryIO, name: str, fast: bool):
    """Fast open when it yields the video geometry and rate (mp4/mkv headers do), else a full open (also when
    no video stream showed up: formats like MPEG-TS may need more than the small probe window to find it).
    ``fast=False`` (the probe decodes a frame) always opens fully: ``skip_frame`` would stay set."""
    if not fast:
        return open_probe(src, name)
    try:
        container = open_probe(src, name, fast=True)
    except VideoDecodeError:
        return open_probe(src, name)  # a format that needs a longer look; the full open reports the error
    video = container.streams.video
    if video and video[0].codec_context.width and (video[0].average_rate or video[0].guessed_rate):
        return container
    container.close()
    return open_probe(src, name)


@dataclasses.dataclass(frozen=True)
class ProbeOptions:
    """How strictly :func:`probe_video` reads (ingest's options; the decoders take the defaults).

    ``max_pixels``: a larger frame is ``too_large``. ``decode_check``: decode the first keyframe (headers
    that parse over frames that do not decode are a ``decode_error``). ``strict``: a stream that breaks off
    after some packets, or holds fewer frames than its header declares, or whose duration is known only by
    guessing a rate, is a ``decode_error`` / ``zero_duration`` instead of a logged warning."""

    max_pixels: int | None = None
    decode_check: bool = False
    strict: bool = False


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
    header_duration: float  # the stream's declared duration (0 when it declares none)
    container_duration: float  # the container's (0 when none)


def _first_frame(decoder, packet, name: str, options: ProbeOptions) -> float | None:
    """Decode one keyframe packet and flush (one frame of work): its rotation; ``None`` when it does not
    decode (a ``decode_error`` under ``decode_check``)."""
    try:
        decoder.thread_count = 1
        frames = list(decoder.decode(packet)) + list(decoder.decode(None))
    except av.error.FFmpegError as exc:
        if options.decode_check:
            raise VideoDecodeError("decode_error", f"{name}: first keyframe does not decode: {exc}") from exc
        return None
    frames = [f for f in frames if f.width and f.height]
    if not frames:
        if options.decode_check:
            raise VideoDecodeError("decode_error", f"{name}: first keyframe decoded to no frame")
        return None
    return float(frames[0].rotation or 0.0)


def _read_packets(container, stream, name: str, decode_first: bool,
                  options: ProbeOptions) -> tuple[list, list, list, bool, float | None]:
    """(pts, keyframe flags, durations, has timestamps, rotation) of every non-empty packet, by demuxing
    only; the first keyframe is decoded when ``decode_first`` (rotation, ``decode_check``). A stream that
    breaks off after some packets keeps them (logged), or is a ``decode_error`` when ``strict``."""
    pts_list: list[int] = []
    key_list: list[bool] = []
    durations: list[int] = []
    has_ts, rotation, decoded = True, None, not decode_first
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue  # the flush packet at end of stream
            if not decoded and packet.is_keyframe:
                rotation, decoded = _first_frame(stream.codec_context, packet, name, options), True
            ts = packet.pts if packet.pts is not None else packet.dts
            if ts is None:
                has_ts, ts = False, -1
            pts_list.append(int(ts))
            key_list.append(bool(packet.is_keyframe))
            durations.append(int(packet.duration or 0))
    except av.error.FFmpegError as exc:
        if not pts_list or options.strict:
            raise VideoDecodeError("decode_error", f"{name}: demux failed after {len(pts_list)} packets: "
                                   f"{exc}") from exc
        log.warning("probe %s: stream ends early (%s); using %d packets", name, exc, len(pts_list))
    if options.decode_check and not decoded:
        raise VideoDecodeError("decode_error", f"{name}: no keyframe among {len(pts_list)} packets")
    return pts_list, key_list, durations, has_ts, rotation


def _demux(source: Source, keyframes_only: bool, options: ProbeOptions) -> _Demuxed:
    """Open ``source`` and demux its first video stream in one pass (see :func:`_read_packets`)."""
    name = describe_source(source)
    decode_first = options.decode_check or not keyframes_only  # the rotation takes one decoded frame
    src = normalize_source(source)
    container = _open_for_probe(src, name, fast=not decode_first)
    try:
        if not container.streams:
            reason = "decode_error" if looks_like_video(_head(src)) else "not_a_video"
            raise VideoDecodeError(reason, f"{name}: container has no streams (truncated?)")
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams})
            raise VideoDecodeError("no_video_stream",
                                   f"{name}: no video stream (streams: {', '.join(kinds)})")
        stream = container.streams.video[0]
        cc = stream.codec_context
        width, height = int(cc.width or 0), int(cc.height or 0)
        if options.max_pixels is not None and width * height > options.max_pixels:
            raise VideoDecodeError("too_large", f"{name}: {width}x{height}={width * height} px > "
                                   f"max_pixels={options.max_pixels}")
        pts, keys, durations, has_ts, rotation = _read_packets(container, stream, name, decode_first, options)
        if not pts:
            raise VideoDecodeError("zero_duration", f"{name}: video stream has no frames")
        declared = int(stream.frames or 0)
        if declared and len(pts) < declared:
            if options.strict:
                raise VideoDecodeError("decode_error",
                                       f"{name}: truncated: {len(pts)} of {declared} declared frames present")
            log.warning("probe %s: %d of %d declared frames present", name, len(pts), declared)
        tb_frac = stream.time_base
        return _Demuxed(
            pts=pts, keys=keys, durations=durations, has_ts=has_ts, rotation=rotation or 0.0,
            time_base=tb_frac, rate=stream.average_rate or stream.guessed_rate or stream.base_rate,
            width=width, height=height, codec=cc.name, header_frames=declared,
            header_duration=float(stream.duration * tb_frac) if stream.duration and tb_frac else 0.0,
            container_duration=container.duration / av.time_base if container.duration else 0.0,
        )
    finally:
        container.close()


def _frame_timeline(d: _Demuxed) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float, bool]:
    """(frame_times, pts, keyframe flags, start, timeline duration, has_timestamps), sorted by presentation
    time; the duration is the span from the first frame's start to the last frame's end."""
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


def _duration(d: _Demuxed, timeline: float, has_ts: bool, name: str, options: ProbeOptions) -> float:
    """The one duration rule: the stream's declared duration, else the timeline's span (timestamps), else
    the container's; a stream with none of them has only a guessed rate (``zero_duration`` when strict)."""
    for duration in (d.header_duration, timeline if has_ts else 0.0, d.container_duration):
        if duration > 0:
            return float(duration)
    if options.strict or not timeline > 0:
        raise VideoDecodeError("zero_duration", f"{name}: duration unknown ({len(d.pts)} packets without "
                               "timestamps, no declared duration)")
    return float(timeline)


def probe_video(source: Source, keyframes_only: bool = False, max_pixels: int | None = None,
                decode_check: bool = False, strict: bool = False) -> VideoMeta:
    """Duration, fps, size, rotation and every frame/keyframe timestamp, by demuxing packets only: the one
    probe of every stage (ingest records its :meth:`VideoMeta.ingest_record`; the decoders build their
    timelines from it), so ingest metadata and decode timelines agree.

    Works on streams without a seek index (packets are read in order); raises :class:`VideoDecodeError`
    naming the input, with reason ``missing`` / ``not_a_video`` / ``no_video_stream`` / ``zero_duration`` /
    ``decode_error`` / ``too_large`` on unusable input. ``keyframes_only=True`` returns keyframes only
    (``frame_times == keyframe_times``) and decodes nothing (no rotation read, fast open); it is enough for
    keyframe mode and ingest, not for exact decoding. Every packet is still demuxed: demuxer-level
    discarding mis-times keyframes of B-frame mp4 streams. ``max_pixels``, ``decode_check``, ``strict``:
    :class:`ProbeOptions`. ``fps`` is the stream's nominal rate, else frames / duration.
    """
    options = ProbeOptions(max_pixels, decode_check, strict)
    d = _demux(source, keyframes_only, options)
    if keyframes_only and not d.has_ts and not strict:
        return probe_video(source, max_pixels=max_pixels)  # raw streams: no timestamps to seek by
    frame_times, pts, keys, start, timeline, has_ts = _frame_timeline(d)
    n = len(pts)
    duration = _duration(d, timeline, has_ts, describe_source(source), options)
    if not keys.any():
        keys[0] = True
    if keyframes_only:
        frame_times, pts, keys = np.asarray(frame_times)[keys], pts[keys], keys[keys]
    fps = float(d.rate) if d.rate else n / duration
    width, height = d.width, d.height
    if int(round(d.rotation / 90.0)) % 2:
        width, height = height, width
    tb = float(d.time_base) if d.time_base else 0.0
    return VideoMeta(
        duration=duration, fps=float(fps), width=int(width), height=int(height), num_frames=n,
        codec=str(d.codec), rotation=float(d.rotation), start_time=start,
        frame_times=np.asarray(frame_times, dtype=np.float64),
        keyframe_times=np.asarray(frame_times, dtype=np.float64)[keys], time_base=tb, pts=pts,
        has_timestamps=has_ts, keyframes_only=keyframes_only, coded_width=d.width, coded_height=d.height,
        num_keyframes=int(np.count_nonzero(d.keys)),
        time_base_ratio=(int(d.time_base.numerator), int(d.time_base.denominator)) if d.time_base else None,
    )

"""Frame-exact sparse video decoding behind one backend interface (torchcodec, PyAV).

``decode_frames(source, times)`` returns, for every requested time, the frame whose presentation interval
``[pts_i, pts_{i+1})`` contains it (times before the first frame give the first frame, times after the last
give the last). Every backend gives the same frame for the same request; only colour conversion may differ
by a grey level or so between the libraries.

Speed comes from never decoding more than needed: requests are sorted and de-duplicated, the decoder seeks
to the keyframe before a requested frame only when that keyframe lies after the last decoded frame, and
otherwise decodes forward; nothing after the last requested frame is decoded. **Keyframe mode**
(:func:`decode_keyframes`) snaps every request to the nearest keyframe instead, so each output frame costs
exactly one keyframe decode (the keyframe packet alone, then a decoder flush), and reports the time error.

Rotation metadata is applied (frames come out upright, as torchcodec does). Resizing (``size``: int = square
side, or ``(H, W)``) centre-crops the decoded frame to the output aspect ratio and then resizes it with
antialiased bilinear interpolation; normalisation belongs to the model transform.
"""

from __future__ import annotations

import abc
import dataclasses
import io
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Union

import av
import numpy as np

from runtime.errors import DecodeFailure, InputError, NotAVideo, UnreadableInput

log = logging.getLogger(__name__)

Source = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]
Size = Union[int, tuple[int, int], None]


class VideoDecodeError(InputError, RuntimeError):
    """A video could not be probed or decoded; ``reason`` is a short machine-readable key.

    A named input failure (:class:`runtime.errors.InputError`, still a ``RuntimeError`` for old callers):
    ``VideoDecodeError(reason, message)`` builds the subclass that also is the matching ``runtime.errors``
    kind (``missing`` -> :class:`UnreadableInput`, ``not_a_video`` / ``no_video_stream`` /
    ``zero_duration`` -> :class:`NotAVideo`, ``decode_error`` -> :class:`DecodeFailure`).
    """

    def __new__(cls, *args: Any, **kwargs: Any):
        if cls is VideoDecodeError and args:
            cls = _DECODE_KINDS.get(args[0], VideoDecodeError)
        return super().__new__(cls, *args, **kwargs)

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self):
        return VideoDecodeError, (self.reason, self.message)


class UnreadableVideo(VideoDecodeError, UnreadableInput):
    """missing: the video file is not there or cannot be read."""


class NotAVideoError(VideoDecodeError, NotAVideo):
    """not_a_video / no_video_stream / zero_duration: no usable video stream."""


class VideoDecodeFailure(VideoDecodeError, DecodeFailure):
    """decode_error: the stream is there but requested frames do not decode."""


_DECODE_KINDS: dict[str, type[VideoDecodeError]] = {
    "missing": UnreadableVideo,
    "not_a_video": NotAVideoError,
    "no_video_stream": NotAVideoError,
    "zero_duration": NotAVideoError,
    "decode_error": VideoDecodeFailure,
}


# --------------------------------------------------------------------------------------------- helpers


def describe_source(source: Source) -> str:
    """Short human-readable name of a source for error messages."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return f"<file object {getattr(source, 'name', type(source).__name__)}>"


def normalize_source(source: Source) -> str | bytes | BinaryIO:
    """Path -> str; bytes-like -> bytes; seekable file object -> itself; other streams -> their bytes."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise VideoDecodeError("missing", f"{path}: no such file")
        return path
    if isinstance(source, (bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, bytes):
        if not source:
            raise VideoDecodeError("not_a_video", "empty bytes")
        return source
    if hasattr(source, "read"):
        if hasattr(source, "seekable") and source.seekable():
            return source
        return source.read()
    raise TypeError(f"video source must be a path, bytes or a file object, got {type(source).__name__}")


def _open_av(source: str | bytes | BinaryIO) -> av.container.InputContainer:
    if isinstance(source, bytes):
        return av.open(io.BytesIO(source), "r")
    if hasattr(source, "seek"):
        source.seek(0)
    return av.open(source, "r")


def _open_or_raise(src: str | bytes | BinaryIO, name: str) -> av.container.InputContainer:
    """:func:`_open_av`, with open failures as ``VideoDecodeError("not_a_video")`` naming the input."""
    try:
        return _open_av(src)
    except (av.error.FFmpegError, OSError) as exc:
        raise VideoDecodeError("not_a_video", f"{name}: {exc}") from exc


def _size_hw(size: Size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        h, w = (int(v) for v in size)
    if h < 1 or w < 1:
        raise ValueError(f"size={size!r}: must be positive")
    return h, w


def crop_resize(frames: np.ndarray, size: Size) -> np.ndarray:
    """Centre-crop uint8 ``[K, H, W, 3]`` to the aspect ratio of ``size`` and resize to it (antialiased).

    Equivalent to "resize the shorter side, then centre crop" up to sub-pixel rounding, but only the kept
    region is resampled.
    """
    hw = _size_hw(size)
    if hw is None or frames.shape[0] == 0:
        return frames
    out_h, out_w = hw
    h, w = frames.shape[1:3]
    scale = max(out_h / h, out_w / w)
    crop_h = min(h, max(1, round(out_h / scale)))
    crop_w = min(w, max(1, round(out_w / scale)))
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    cropped = frames[:, top : top + crop_h, left : left + crop_w]
    if (crop_h, crop_w) == (out_h, out_w):
        return np.ascontiguousarray(cropped)
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(cropped)).permute(0, 3, 1, 2).float()
    y = F.interpolate(x, size=(out_h, out_w), mode="bilinear", antialias=scale < 1, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _rotate(frame: np.ndarray, rotation: float) -> np.ndarray:
    """Apply display rotation (degrees counter-clockwise, as in the display matrix) to ``[H, W, 3]``."""
    k = int(round(rotation / 90.0)) % 4
    return np.ascontiguousarray(np.rot90(frame, k=k)) if k else frame


# --------------------------------------------------------------------------------------------- probing


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
    with _open_or_raise(normalize_source(source), name) as container:
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


# --------------------------------------------------------------------------------------------- backends


@dataclasses.dataclass
class DecodeResult:
    """``frames`` uint8 ``[K, H, W, 3]``; ``frame_times`` pts (s) of the frame returned for each request;
    ``time_error`` = frame_times - requested (0 in exact mode up to the frame interval);
    ``frames_decoded``: frames the decoder produced (-1 when the backend cannot tell)."""

    frames: np.ndarray
    frame_times: np.ndarray
    time_error: np.ndarray
    frames_decoded: int = -1


class DecoderBackend(abc.ABC):
    """One decoding library: exact-mode and keyframe-mode decoding of requested times."""

    name = "base"

    @abc.abstractmethod
    def decode_times(self, source, times: np.ndarray, meta: VideoMeta | None) -> DecodeResult:
        """Exact mode: for each time, the frame whose presentation interval contains it."""

    @abc.abstractmethod
    def decode_keyframes(self, source, times: np.ndarray, meta: VideoMeta) -> DecodeResult:
        """Keyframe mode: each time snapped to the nearest keyframe, with the time error."""


class PyAVBackend(DecoderBackend):
    """PyAV (libav* through Cython): seeks by pts with our own keyframe bookkeeping."""

    name = "pyav"

    def __init__(self, thread_type: str = "SLICE"):
        self.thread_type = thread_type

    def decode_times(self, source, times: np.ndarray, meta: VideoMeta | None) -> DecodeResult:
        if meta is None or meta.keyframes_only:
            meta = probe_video(source)
        idx = meta.frame_index_at(times)
        frames, decoded = self.decode_indices(source, np.unique(idx), meta)
        lookup = {int(i): f for i, f in zip(np.unique(idx), frames)}
        out = np.stack([lookup[int(i)] for i in idx]) if len(idx) else np.zeros((0, 1, 1, 3), np.uint8)
        ft = meta.frame_times[idx]
        return DecodeResult(out, ft, np.zeros(len(idx)), decoded)

    def decode_keyframes(self, source, times: np.ndarray, meta: VideoMeta) -> DecodeResult:
        kidx = _nearest_keyframe_indices(meta, times)
        uniq = np.unique(kidx)
        try:
            frames = _decode_keyframe_packets(source, meta, uniq)
        except av.error.FFmpegError:
            frames = None
        if frames is not None:
            decoded = len(uniq)
        else:
            frames, decoded = self.decode_indices(source, uniq, meta, keyframes_only=True)
        lookup = {int(i): f for i, f in zip(uniq, frames)}
        out = np.stack([lookup[int(i)] for i in kidx])
        ft = meta.frame_times[kidx]
        return DecodeResult(out, ft, ft - np.asarray(times, dtype=np.float64), decoded)

    def _open(self, src, name: str, keyframes_only: bool):
        container = _open_or_raise(src, name)
        stream = container.streams.video[0]
        stream.thread_type = self.thread_type
        if keyframes_only:
            # The decoder drops non-key frames itself: after a seek the first output is the keyframe.
            # (Demuxer-level discard would be cheaper, but the mp4 demuxer then mis-times B-frame streams.)
            stream.codec_context.skip_frame = "NONKEY"
        return container, stream

    def decode_indices(
        self, source, indices: np.ndarray, meta: VideoMeta, keyframes_only: bool = False
    ) -> tuple[list[np.ndarray], int]:
        """Decode the frames at sorted unique ``indices``; returns (frames, number of frames decoded)."""
        src = normalize_source(source)
        name = describe_source(source)
        key_idx = meta.keyframe_indices
        pts_to_index = {int(p): i for i, p in enumerate(meta.pts)} if meta.has_timestamps else None
        out: list[np.ndarray] = []
        decoded = 0
        seekable = meta.has_timestamps
        container = stream = None
        try:
            frames_iter = None
            pos = -1  # index of the last frame taken from frames_iter
            seq_count = -1  # frames seen since (re)opening, for streams without timestamps
            for target in indices:
                target = int(target)
                kf = int(key_idx[np.searchsorted(key_idx, target, side="right") - 1])
                if container is None or (not seekable and target <= pos):
                    if container is not None:
                        container.close()
                    container, stream = self._open(src, name, keyframes_only)
                    frames_iter = _iter_frames(container, stream)
                    pos, seq_count = -1, -1
                if seekable and (kf > pos or target <= pos):
                    try:
                        container.seek(int(meta.pts[kf]), stream=stream, backward=True, any_frame=False)
                        frames_iter = _iter_frames(container, stream)
                    except av.error.FFmpegError:
                        # e.g. a stream without an index: decode from the start instead
                        seekable = False
                        container.close()
                        container, stream = self._open(src, name, keyframes_only)
                        frames_iter = _iter_frames(container, stream)
                        pos, seq_count = -1, -1
                frame = None
                for vf in frames_iter:
                    decoded += 1
                    seq_count += 1
                    if pts_to_index is not None and vf.pts is not None:
                        cur = pts_to_index.get(int(vf.pts))
                        if cur is None:
                            continue  # a frame outside the probed stream (should not happen)
                    else:
                        cur = seq_count
                    pos = cur
                    if cur >= target:
                        frame = vf
                        break
                if frame is None:
                    raise VideoDecodeError(
                        "decode_error", f"{name}: frame {target} (t={meta.frame_times[target]:.3f}s) missing"
                    )
                if pos != target and not keyframes_only:
                    raise VideoDecodeError(
                        "decode_error", f"{name}: decoder skipped frame {target}, landed on {pos}"
                    )
                out.append(_rotate(frame.to_ndarray(format="rgb24"), frame.rotation or 0.0))
        finally:
            if container is not None:
                container.close()
        return out, decoded


def _iter_frames(container, stream):
    try:
        for packet in container.demux(stream):
            yield from packet.decode()
    except av.error.InvalidDataError:
        return


def _decode_keyframe_packets(source, meta: VideoMeta, kidx: np.ndarray) -> list[np.ndarray] | None:
    """One decoded picture per sorted unique keyframe index: seek to its pts, send that single packet and
    flush the decoder, so the keyframe comes out at once. Waiting for the next packets instead (what a
    decode-until-pts loop does) costs the B-frame reorder delay -- 2-4 more frames per keyframe -- and
    with ``skip_frame=NONKEY`` even the *next* keyframe. ``None`` when the stream cannot be served this way
    (no timestamps, a seek that does not land on the keyframe): callers fall back to decoding forward."""
    if not meta.has_timestamps or len(meta.pts) != len(meta.frame_times):
        return None
    src = normalize_source(source)
    name = describe_source(source)
    container = _open_or_raise(src, name)
    out: list[np.ndarray] = []
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "SLICE"  # frame threads would add their own output delay
        decoder = stream.codec_context
        for i in kidx:
            target = int(meta.pts[int(i)])
            container.seek(target, stream=stream, backward=True, any_frame=False)  # also flushes the decoder
            frames = None
            for packet in container.demux(stream):
                if packet.pts is None or packet.pts < target:
                    continue  # leading packets of the GOP before the keyframe in decode order
                if packet.pts > target or not packet.is_keyframe:
                    return None  # the keyframe is not where the probe put it: decode forward instead
                frames = list(packet.decode()) + list(decoder.decode(None))
                break
            if not frames:
                return None
            out.append(_rotate(frames[0].to_ndarray(format="rgb24"), frames[0].rotation or 0.0))
    return out


def _nearest_keyframe_indices(meta: VideoMeta, times: np.ndarray) -> np.ndarray:
    kt = meta.keyframe_times
    times = np.asarray(times, dtype=np.float64)
    right = np.clip(np.searchsorted(kt, times), 0, len(kt) - 1)
    left = np.clip(right - 1, 0, len(kt) - 1)
    pick = np.where(np.abs(kt[left] - times) <= np.abs(kt[right] - times), left, right)
    return meta.keyframe_indices[pick]


class TorchCodecBackend(DecoderBackend):
    """torchcodec ``VideoDecoder`` (exact seeks, ``get_frames_played_at``); NVDEC via ``device="cuda"``."""

    name = "torchcodec"

    def __init__(self, device: str = "cpu", num_threads: int = 0):
        # 0 = FFmpeg picks (like PyAV and decord do); use 1 when many DataLoader workers / Ray actors already
        # share the cores.
        self.device = device
        self.num_threads = num_threads

    def _decoder(self, source, seek_mode: str = "exact"):
        from torchcodec.decoders import VideoDecoder

        src = normalize_source(source)
        if hasattr(src, "seek"):
            src.seek(0)
        try:
            return VideoDecoder(
                src, dimension_order="NHWC", seek_mode=seek_mode, device=self.device,
                num_ffmpeg_threads=self.num_threads,
            )
        except (RuntimeError, ValueError) as exc:
            raise VideoDecodeError("not_a_video", f"{describe_source(source)}: {exc}") from exc

    def decode_times(self, source, times: np.ndarray, meta: VideoMeta | None) -> DecodeResult:
        decoder = self._decoder(source)
        md = decoder.metadata
        begin = float(md.begin_stream_seconds or 0.0)
        end = float(md.end_stream_seconds)
        query = np.clip(np.asarray(times, dtype=np.float64), begin, np.nextafter(end, -np.inf))
        try:
            batch = decoder.get_frames_played_at(seconds=query.tolist())
        except RuntimeError as exc:
            raise VideoDecodeError("decode_error", f"{describe_source(source)}: {exc}") from exc
        frames = batch.data.cpu().numpy()
        ft = batch.pts_seconds.cpu().numpy().astype(np.float64)
        return DecodeResult(frames, ft, np.zeros(len(query)), -1)

    def decode_keyframes(self, source, times: np.ndarray, meta: VideoMeta) -> DecodeResult:
        kidx = _nearest_keyframe_indices(meta, times)
        kt = meta.frame_times[kidx]
        if not str(self.device).startswith("cuda"):
            # torchcodec has no decode-one-packet call: its seek-then-decode-to-pts waits out the B-frame
            # reorder delay (2-4 frames per keyframe). On CPU both libraries run the same FFmpeg decoder,
            # so keyframe mode sends the single keyframe packet through PyAV and flushes (same pixels).
            uniq, inverse = np.unique(kidx, return_inverse=True)
            try:
                frames = _decode_keyframe_packets(source, meta, uniq)
            except av.error.FFmpegError:
                frames = None
            if frames is not None:
                out = np.stack(frames)[inverse]
                return DecodeResult(out, kt, kt - np.asarray(times, dtype=np.float64), len(uniq))
        # Approximate mode skips the full-file scan; each request is a keyframe pts, so every frame is
        # one seek + one keyframe decode (plus the decoder's reorder delay).
        decoder = self._decoder(source, seek_mode="approximate")
        uniq, inverse = np.unique(kt, return_inverse=True)
        try:
            batch = decoder.get_frames_played_at(seconds=uniq.tolist())
        except RuntimeError as exc:
            raise VideoDecodeError("decode_error", f"{describe_source(source)}: {exc}") from exc
        frames = batch.data.cpu().numpy()[inverse]
        return DecodeResult(frames, kt, kt - np.asarray(times, dtype=np.float64), -1)


def _torchcodec_available() -> bool:
    try:
        import torchcodec.decoders  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure (missing ffmpeg libs) means "not available"
        return False
    return True


def available_backends() -> list[str]:
    """Backends that import on this machine, preferred first."""
    return (["torchcodec"] if _torchcodec_available() else []) + ["pyav"]


def get_backend(backend: str | DecoderBackend | None = None, device: str = "cpu") -> DecoderBackend:
    """Backend by name (``"torchcodec"``, ``"pyav"``), or the default (torchcodec when it imports).

    ``device="cuda"`` selects NVDEC in torchcodec when CUDA is available (CPU otherwise).
    """
    if isinstance(backend, DecoderBackend):
        return backend
    name = backend or available_backends()[0]
    if name == "torchcodec":
        if not _torchcodec_available():
            raise ValueError("backend='torchcodec': torchcodec does not import here; use backend='pyav'")
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                log.info("device=%s requested but CUDA is unavailable; decoding on CPU", device)
                device = "cpu"
        return TorchCodecBackend(device=device)
    if name == "pyav":
        return PyAVBackend()
    raise ValueError(f"backend={backend!r}: expected one of {['torchcodec', 'pyav']}")


# --------------------------------------------------------------------------------------------- API


def decode(
    source: Source,
    times: Sequence[float] | np.ndarray,
    size: Size = None,
    backend: str | DecoderBackend | None = None,
    keyframe_mode: bool = False,
    meta: VideoMeta | None = None,
    device: str = "cpu",
) -> DecodeResult:
    """Decode the frames shown at ``times`` (seconds); see the module docstring. Full result object."""
    times_arr = np.asarray(times, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(times_arr)):
        raise ValueError(f"decode {describe_source(source)}: times must be finite, got {times_arr}")
    impl = get_backend(backend, device=device)
    if isinstance(source, Path):
        source = str(source)
    if len(times_arr) == 0:
        hw = _size_hw(size) or (0, 0)
        return DecodeResult(np.zeros((0, *hw, 3), np.uint8), times_arr, times_arr, 0)
    try:
        if keyframe_mode:
            if meta is None:
                meta = probe_video(source, keyframes_only=True)
            result = impl.decode_keyframes(source, times_arr, meta)
        else:
            result = impl.decode_times(source, times_arr, meta)
    except av.error.FFmpegError as exc:
        raise VideoDecodeError("decode_error", f"{describe_source(source)}: {exc}") from exc
    result.frames = crop_resize(result.frames, size)
    return result


def decode_frames(
    source: Source,
    times: Sequence[float] | np.ndarray,
    size: Size = None,
    backend: str | DecoderBackend | None = None,
    meta: VideoMeta | None = None,
    device: str = "cpu",
) -> np.ndarray:
    """uint8 ``[len(times), H, W, 3]``: for each time the frame whose presentation interval contains it."""
    return decode(source, times, size=size, backend=backend, meta=meta, device=device).frames


def decode_keyframes(
    source: Source,
    times: Sequence[float] | np.ndarray,
    size: Size = None,
    backend: str | DecoderBackend | None = None,
    meta: VideoMeta | None = None,
    device: str = "cpu",
) -> DecodeResult:
    """Keyframe mode: each time snapped to the nearest keyframe (one keyframe decode per output frame);
    ``time_error`` holds keyframe time minus requested time."""
    return decode(source, times, size=size, backend=backend, keyframe_mode=True, meta=meta, device=device)


def estimate_frames_decoded(meta: VideoMeta, times: Sequence[float] | np.ndarray) -> int:
    """Frames a forward-only decoder with keyframe seeks (ours; torchcodec's) decodes to serve ``times``."""
    key_idx = meta.keyframe_indices
    pos, total = -1, 0
    for target in np.unique(meta.frame_index_at(times)):
        kf = int(key_idx[np.searchsorted(key_idx, target, side="right") - 1])
        start = kf if (pos < 0 or kf > pos or target <= pos) else pos + 1
        total += int(target) - start + 1
        pos = int(target)
    return total


def decode_all_frames(source: Source, backend: str = "pyav") -> np.ndarray:
    """Every frame, sequentially, in presentation order (reference for tests and the full-decode baseline)."""
    src = normalize_source(source)
    if backend == "torchcodec":
        decoder = TorchCodecBackend()._decoder(src)
        return decoder.get_frames_in_range(0, len(decoder)).data.numpy()
    with _open_av(src) as container:
        stream = container.streams.video[0]
        stream.thread_type = "SLICE"
        frames = [(f.pts, _rotate(f.to_ndarray(format="rgb24"), f.rotation or 0.0))
                  for f in container.decode(stream)]
    frames.sort(key=lambda pf: -1 if pf[0] is None else pf[0])
    return np.stack([f for _, f in frames])

"""Probing and transcoding video bytes with PyAV.

``probe_video`` demuxes every packet (no decoding) to count frames and keyframes, and decodes only the first
frame to prove the stream is decodable. Failures raise ``ProbeError`` (the one video input failure,
:class:`pipeline.decode.VideoDecodeError`) with one of the ingest reason classes.
"""

from __future__ import annotations

import io
from fractions import Fraction
from typing import Any

import av

from pipeline.decode.errors import VideoDecodeError

# Magic numbers of containers we recognise; bytes that start like a video but do not open are a decode_error
# (e.g. a truncated mp4), anything else is not_a_video.
_CONTAINER_MAGIC = (
    (4, b"ftyp"),
    (4, b"moov"),
    (4, b"mdat"),
    (4, b"free"),
    (4, b"wide"),
    (0, b"\x1a\x45\xdf\xa3"),
    (0, b"RIFF"),
    (0, b"\x00\x00\x01\xba"),
    (0, b"\x00\x00\x01\xb3"),
    (0, b"FLV"),
    (0, b"\x47"),
)


# Ingest's name for the one video input failure (reasons missing, unreadable, bad_uri, not_a_video,
# no_video_stream, zero_duration, decode_error, too_large; see pipeline/decode/errors.py).
ProbeError = VideoDecodeError


def looks_like_video(data: bytes) -> bool:
    """True when the bytes start with a known container signature."""
    for offset, magic in _CONTAINER_MAGIC:
        if data[offset : offset + len(magic)] == magic and (magic != b"\x47" or data[188:189] == b"\x47"):
            return True
    return False


# Open without decoding: avformat_find_stream_info would otherwise decode frames (tens of ms for one 720p
# keyframe) only to learn the pixel format, which probing does not need. Small probe window, no analysis.
FAST_OPEN_OPTIONS = {"skip_frame": "all", "analyzeduration": "0", "probesize": "65536"}


def _open(data: bytes, fast: bool = False):
    if len(data) == 0:
        raise ProbeError("not_a_video", "empty file (0 bytes)")
    try:
        return av.open(io.BytesIO(data), mode="r", options=FAST_OPEN_OPTIONS if fast else {})
    except av.error.FFmpegError as exc:
        reason = "decode_error" if looks_like_video(data) else "not_a_video"
        hint = " (container signature found: truncated or corrupt?)" if reason == "decode_error" else ""
        raise ProbeError(reason, f"cannot open container{hint}: {type(exc).__name__}: {exc}") from exc


def _open_for_probe(data: bytes, decode_check: bool):
    """Fast open when it yields the video geometry and rate (mp4/mkv headers do), else a full open (also when
    no video stream showed up: formats like MPEG-TS may need more than the small probe window to find it)."""
    if decode_check:
        return _open(data)
    try:
        container = _open(data, fast=True)
    except ProbeError:
        return _open(data)  # a format that needs a longer look; the full open reports the real error
    video = container.streams.video
    if video and video[0].codec_context.width and (video[0].average_rate or video[0].guessed_rate):
        return container
    container.close()
    return _open(data)


def probe_video(data: bytes, max_pixels: int | None = None, decode_check: bool = False) -> dict[str, Any]:
    """Metadata of the first video stream: duration, fps, width, height, codec, num_frames, num_keyframes.

    Frames and keyframes are counted by demuxing packets, nothing is decoded -- except the first keyframe when
    ``decode_check`` is set (headers that parse over frames that do not decode are then a decode_error).
    """
    container = _open_for_probe(data, decode_check)
    try:
        if not container.streams:
            reason = "decode_error" if looks_like_video(data) else "not_a_video"
            raise ProbeError(reason, f"container has no streams ({len(data)} bytes; truncated?)")
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams})
            raise ProbeError("no_video_stream", f"no video stream (streams: {', '.join(kinds)})")
        stream = container.streams.video[0]
        declared_frames = int(stream.frames or 0)
        width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        if max_pixels is not None and width * height > max_pixels:
            raise ProbeError("too_large", f"{width}x{height}={width * height} px > max_pixels={max_pixels}")
        codec = stream.codec_context.name
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        num_frames = num_keyframes = 0
        first_pts = last_end = None
        keyframe_pts: list[int] = []
        decoded_first = not decode_check
        decoder = stream.codec_context
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                if not decoded_first and packet.is_keyframe:
                    decoded_first = _decode_keyframe(decoder, packet, num_frames)
                num_frames += 1
                num_keyframes += int(packet.is_keyframe)
                if packet.is_keyframe and packet.pts is not None:
                    keyframe_pts.append(int(packet.pts))
                if packet.pts is not None:
                    end = packet.pts + (packet.duration or 0)
                    first_pts = packet.pts if first_pts is None else min(first_pts, packet.pts)
                    last_end = end if last_end is None else max(last_end, end)
        except av.error.FFmpegError as exc:
            raise ProbeError("decode_error", f"demux failed after {num_frames} packets: {exc}") from exc
        if num_frames == 0:
            raise ProbeError("zero_duration", "video stream has no frames")
        if declared_frames and num_frames < declared_frames:
            raise ProbeError(
                "decode_error", f"truncated: {num_frames} of {declared_frames} declared frames present"
            )
        duration = 0.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        if duration <= 0 and last_end is not None and stream.time_base is not None:
            duration = float((last_end - first_pts) * stream.time_base)
        if duration <= 0 and container.duration:
            duration = container.duration / av.time_base
        if duration <= 0:
            raise ProbeError("zero_duration", f"duration is {duration} s ({num_frames} packets)")
        fps = float(rate) if rate else num_frames / duration
        if not decoded_first:
            raise ProbeError("decode_error", f"no keyframe among {num_frames} packets")
        return {
            "duration": round(duration, 6),
            "fps": round(fps, 6),
            "width": width,
            "height": height,
            "codec": codec,
            "num_frames": num_frames,
            "num_keyframes": num_keyframes,
            **_timeline(stream.time_base, first_pts, keyframe_pts),
        }
    finally:
        container.close()


def _timeline(time_base, first_pts: int | None, keyframe_pts: list[int]) -> dict[str, Any]:
    """``start_time`` (seconds), ``time_base`` ``[num, den]`` and the sorted ``keyframe_pts``: enough for
    ``pipeline.decode.keyframe_meta`` to rebuild the keyframe timeline, so keyframe-mode training seeks
    without probing the video again. Empty lists when the stream carries no timestamps (keyframe mode then
    probes)."""
    if not time_base or first_pts is None or not keyframe_pts:
        return {"start_time": 0.0, "time_base": [], "keyframe_pts": []}
    return {
        "start_time": first_pts * float(time_base.numerator) / float(time_base.denominator),
        "time_base": [int(time_base.numerator), int(time_base.denominator)],
        "keyframe_pts": sorted(keyframe_pts),
    }


def _decode_keyframe(decoder, packet, index: int) -> bool:
    """Decode one keyframe packet and flush (one frame of work, no reordering delay); True when it decoded."""
    try:
        decoder.thread_count = 1
        frames = list(decoder.decode(packet)) + list(decoder.decode(None))
    except av.error.FFmpegError as exc:
        raise ProbeError("decode_error", f"keyframe packet {index} does not decode: {exc}") from exc
    if not any(frame.width and frame.height for frame in frames):
        raise ProbeError("decode_error", f"keyframe packet {index} decoded to no frame")
    return True


def _even(value: float) -> int:
    return max(2, int(round(value / 2.0)) * 2)


def transcode_video(
    data: bytes,
    short_side: int | None = None,
    fps: float | None = None,
    keyframe_interval: float = 1.0,
    crf: int = 23,
    preset: str = "veryfast",
) -> bytes:
    """Re-encode to H.264/yuv420p mp4 (no audio) with a keyframe every ``keyframe_interval`` seconds.

    ``short_side`` rescales so the shorter side has that many pixels (never upscales); ``fps`` resamples the
    frame rate by dropping/repeating frames on their timestamps. Decoder and encoder run single-threaded so
    output bytes are deterministic and one worker uses one core.
    """
    source = _open(data)
    out_buf = io.BytesIO()
    try:
        if not source.streams.video:
            raise ProbeError("no_video_stream", "no video stream to transcode")
        in_stream = source.streams.video[0]
        in_stream.codec_context.thread_count = 1  # one worker = one core; Ray runs the parallelism
        src_w, src_h = in_stream.codec_context.width, in_stream.codec_context.height
        scale = 1.0
        if short_side and min(src_w, src_h) > short_side:
            scale = short_side / min(src_w, src_h)
        out_w, out_h = _even(src_w * scale), _even(src_h * scale)
        src_rate = in_stream.average_rate or in_stream.guessed_rate or Fraction(25)
        out_rate = (
            Fraction(fps).limit_denominator(1001) if fps else Fraction(src_rate).limit_denominator(1001)
        )
        gop = max(1, int(round(float(out_rate) * keyframe_interval)))
        output = av.open(out_buf, mode="w", format="mp4")
        stream = output.add_stream("libx264", rate=out_rate)
        stream.width, stream.height, stream.pix_fmt = out_w, out_h, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = {
            "crf": str(crf),
            "preset": preset,
            "threads": "1",
            "keyint_min": str(gop),
            "sc_threshold": "0",
            "g": str(gop),
        }
        index = 0
        step = 1.0 / float(out_rate)

        def emit(frame) -> None:
            nonlocal index
            img = frame.reformat(width=out_w, height=out_h, format="yuv420p")
            img.pts, img.time_base = index, 1 / out_rate
            for packet in stream.encode(img):
                output.mux(packet)
            index += 1

        previous, previous_t = None, 0.0
        try:
            for frame in source.decode(in_stream):
                if fps is None:
                    emit(frame)
                    continue
                t = float(frame.time) if frame.time is not None else previous_t + 1.0 / float(src_rate)
                # Output frame i shows the latest source frame at or before i/fps (drop or repeat frames).
                while previous is not None and index * step < t - 1e-9:
                    emit(previous)
                previous, previous_t = frame, t
            if previous is not None:
                end_t = previous_t + 1.0 / float(src_rate)
                while index * step < end_t - 1e-9 or index == 0:
                    emit(previous)
        except av.error.FFmpegError as exc:
            raise ProbeError("decode_error", f"decoding failed at output frame {index}: {exc}") from exc
        for packet in stream.encode(None):
            output.mux(packet)
        output.close()
        if index == 0:
            raise ProbeError("zero_duration", "no frames to transcode")
    finally:
        source.close()
    return out_buf.getvalue()

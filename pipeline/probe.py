"""Ingest's probe and transcode of video bytes with PyAV.

``probe_record`` is the one probe (:func:`pipeline.decode.probe_video`: one demux pass, nothing decoded but
the first keyframe under ``decode_check``) with ingest's options, as the fields ingest records. Failures
raise ``ProbeError`` (the one video input failure, :class:`pipeline.decode.VideoDecodeError`) with one of
the ingest reason classes, naming the input.
"""

from __future__ import annotations

import io
from fractions import Fraction
from typing import Any

import av

from pipeline.decode.errors import VideoDecodeError
from pipeline.decode.probe import open_probe, probe_video

# Ingest's name for the one video input failure (reasons missing, unreadable, bad_uri, not_a_video,
# no_video_stream, zero_duration, decode_error, too_large; see pipeline/decode/errors.py).
ProbeError = VideoDecodeError


def probe_record(data: bytes, max_pixels: int | None = None, decode_check: bool = False) -> dict[str, Any]:
    """Ingest's metadata of a video: the one probe (:func:`pipeline.decode.probe_video`) with ingest's
    options -- keyframes only (nothing decoded but the first keyframe under ``decode_check``), strict (a
    stream cut short, or without timestamps or a declared duration, is an error) -- as the fields ingest
    records (:meth:`pipeline.decode.VideoMeta.ingest_record`)."""
    meta = probe_video(data, keyframes_only=True, max_pixels=max_pixels, decode_check=decode_check,
                       strict=True)
    return meta.ingest_record()


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
    source = open_probe(data, f"<{len(data)} bytes>")
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

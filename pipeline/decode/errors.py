"""Video input failures: one ``VideoDecodeError(reason, message)`` for every stage that reads a video
(ingest's probe, the decoders), that is also the matching ``runtime.errors`` kind, so the stages' error policy
(``on_error``) records them. Ingest calls it ``pipeline.probe.ProbeError``."""

from __future__ import annotations

from typing import Any

from runtime.errors import DecodeFailure, InputError, NotAVideo, UnreadableInput


class VideoDecodeError(InputError, RuntimeError):
    """A video could not be read, probed or decoded; ``reason`` is a short machine-readable key.

    A named input failure (:class:`runtime.errors.InputError`, still a ``RuntimeError`` for old callers):
    ``VideoDecodeError(reason, message)`` builds the subclass that also is the matching ``runtime.errors``
    kind (``missing`` / ``unreadable`` / ``bad_uri`` -> :class:`UnreadableInput`, ``not_a_video`` /
    ``no_video_stream`` / ``zero_duration`` -> :class:`NotAVideo`, ``decode_error`` ->
    :class:`DecodeFailure`, ``too_large`` -> :class:`OutOfLimits`, a plain named input failure).
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
    """missing / unreadable / bad_uri: the video file is not there or its bytes cannot be read."""


class NotAVideoError(VideoDecodeError, NotAVideo):
    """not_a_video / no_video_stream / zero_duration: no usable video stream."""


class VideoDecodeFailure(VideoDecodeError, DecodeFailure):
    """decode_error: a video container whose packets or frames do not decode (truncated, garbled)."""


class OutOfLimits(VideoDecodeError):
    """too_large: the input exceeds a configured limit (bytes, pixels)."""


_DECODE_KINDS: dict[str, type[VideoDecodeError]] = {
    "missing": UnreadableVideo,
    "unreadable": UnreadableVideo,
    "bad_uri": UnreadableVideo,
    "not_a_video": NotAVideoError,
    "no_video_stream": NotAVideoError,
    "zero_duration": NotAVideoError,
    "decode_error": VideoDecodeFailure,
    "too_large": OutOfLimits,
}

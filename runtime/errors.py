"""The error policy of every stage, as a parameter (webdataset's ``handler`` idea).

Only *named input failures* are data errors: the input is unreadable, is not a video, fails to decode, or
its metadata is invalid. Each is an :class:`InputError` subclass, is recorded as an error row naming the
input and the reason, and the stage moves on. Any other exception is a bug and raises (policy ``"record"``,
the default). Policy ``"raise"`` raises input failures too (debugging, strict pipelines).
"""

from __future__ import annotations

from typing import Literal

ErrorPolicy = Literal["record", "raise"]
ERROR_POLICIES: tuple[str, ...] = ("record", "raise")


class InputError(Exception):
    """A named failure of one input; ``reason`` is a short machine-readable tag used in error tables."""

    reason = "bad_input"


class UnreadableInput(InputError):
    """The input cannot be opened or read (missing file, permission, network error, truncated read)."""

    reason = "unreadable"


class NotAVideo(InputError):
    """The input was read but holds no decodable video stream."""

    reason = "not_a_video"


class DecodeFailure(InputError):
    """The video stream is there but frames could not be decoded (corrupt packets, bad seek)."""

    reason = "decode_failure"


class InvalidMetadata(InputError):
    """A manifest row or the sample's json is malformed (missing key, bad type, out-of-range value)."""

    reason = "invalid_metadata"


class TaggedMetadataError(InvalidMetadata, ValueError):
    """Invalid metadata whose ``reason`` tag is given per instance (a stage's finer reason classes), and
    that survives pickling between Ray processes with it."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __reduce__(self):
        return type(self), (self.reason, self.message)


def check_policy(policy: str) -> ErrorPolicy:
    """``policy`` itself, or a ``ValueError`` naming the allowed policies."""
    if policy not in ERROR_POLICIES:
        raise ValueError(f"unknown error policy {policy!r}; expected one of {', '.join(ERROR_POLICIES)}")
    return policy  # type: ignore[return-value]


def should_record(exc: BaseException, policy: ErrorPolicy) -> bool:
    """True when ``exc`` is a named input failure the stage records and skips under ``policy``.

    Call it in an ``except`` block and re-raise when it is False: bugs never become error rows.
    """
    return policy == "record" and isinstance(exc, InputError)


def error_reason(exc: BaseException) -> str:
    """``reason: message`` for an error row: the failure's tag and the text naming the input."""
    reason = getattr(exc, "reason", type(exc).__name__)
    return f"{reason}: {exc}"

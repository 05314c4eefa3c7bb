"""Timed captions (``segments``) of one sample, checked against its probed duration (docs/moments.md).

A manifest's optional ``segments`` column holds, per video, a list of ``{start_s, end_s, caption}``.
:func:`check_segments` keeps the valid ones (in input order) and names each bad one: a bad segment is an
error row of its own (reason below, message ``segment <i> of <video_id>: ...``) and the video is still
ingested with its valid segments. Rules: times are finite numbers, ``0 <= start_s < end_s``,
``end_s <= duration + one frame`` (``1 / fps``), ``caption`` a non-empty string.
"""

from __future__ import annotations

from typing import Any

from runtime.errors import TaggedMetadataError
from runtime.values import finite_float

SEGMENT_FIELDS = ("start_s", "end_s", "caption")
# reason classes of a bad segment (also in pipeline.ingest.layout.REASONS)
SEGMENT_REASONS = ("segment_malformed", "segment_negative_start", "segment_order", "segment_past_end")


class InvalidSegment(TaggedMetadataError):
    """One timed caption of a sample is malformed or outside the video."""


def check_segment(segment: Any, duration: float, fps: float) -> dict[str, Any]:
    """The segment as ``{start_s, end_s, caption}`` (floats, str), or :class:`InvalidSegment` saying why."""
    if not isinstance(segment, dict):
        message = f"expected an object with {SEGMENT_FIELDS}, got {segment!r}"
        raise InvalidSegment("segment_malformed", message)
    missing = [f for f in SEGMENT_FIELDS if f not in segment or segment[f] is None]
    if missing:
        raise InvalidSegment("segment_malformed", f"missing {', '.join(missing)} in {segment!r}")
    start, end, caption = finite_float(segment["start_s"]), finite_float(segment["end_s"]), segment["caption"]
    if start is None or end is None:
        raise InvalidSegment("segment_malformed", f"start_s/end_s must be finite numbers, got {segment!r}")
    if not isinstance(caption, str) or not caption.strip():
        raise InvalidSegment("segment_malformed", f"caption must be a non-empty string, got {caption!r}")
    if start < 0:
        raise InvalidSegment("segment_negative_start", f"start_s {start} < 0")
    if start >= end:
        raise InvalidSegment("segment_order", f"start_s {start} >= end_s {end}")
    tolerance = 1.0 / fps if fps and fps > 0 else 0.0
    if end > duration + tolerance:
        raise InvalidSegment(
            "segment_past_end",
            f"end_s {end} > duration {duration} s (+ one frame, {tolerance:.4f} s)",
        )
    return {"start_s": start, "end_s": end, "caption": caption}


def check_segments(
    segments: list[Any], video_id: str, duration: float, fps: float
) -> tuple[list[dict[str, Any]], list[InvalidSegment]]:
    """(valid segments in input order, one named :class:`InvalidSegment` per bad one)."""
    valid, bad = [], []
    for index, segment in enumerate(segments):
        try:
            valid.append(check_segment(segment, duration, fps))
        except InvalidSegment as exc:
            bad.append(InvalidSegment(exc.reason, f"segment {index} of {video_id}: {exc.message}"))
    return valid, bad

"""Moment retrieval metrics (docs/moments.md): temporal IoU, R{n}@{IoU} over a corpus, video R@1.

Pure functions over plain numbers and ids (no model, no index): the caller ranks moments for every query
(``bench/moments.py`` takes them from ``index.VideoIndex.search(text, moments_per_video=M)``, which merges
window scores with :func:`index.moments.merge_windows`) and this module scores the rankings.

Definitions (video corpus moment retrieval, as in TVR; one query per ground-truth segment):

- a query's *relevant segments* are every segment of the evaluated corpus whose class equals the query
  segment's class (the same event in another video is equally correct -- the ``equivalence`` of
  :mod:`pipeline.retrieval_eval`; without classes only the query's own segment is relevant);
- a returned moment ``(video_id, start_s, end_s)`` is *correct at IoU t* when its video holds a relevant
  segment whose temporal IoU with the moment is ``>= t``;
- ``R{n}@{t}``: the fraction of queries with a correct moment among the first ``n`` returned;
- ``video_R@1``: the fraction of queries whose first returned video holds a relevant segment;
- ``mIoU@1``: mean over queries of the best IoU of the first moment with a relevant segment of its video
  (0 when the video holds none).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

IOU_THRESHOLDS = (0.5, 0.7)
RANKS = (1, 5)


@dataclasses.dataclass(frozen=True)
class Span:
    """A stretch of one video: ``[start_s, end_s]`` seconds."""

    video_id: str
    start_s: float
    end_s: float


@dataclasses.dataclass
class MomentQuery:
    """One query: its ``relevant`` segments and the moments returned for it, best first."""

    text: str
    relevant: list[Span]
    returned: list[Span]
    returned_videos: list[str] = dataclasses.field(default_factory=list)  # the videos, in hit order


def temporal_iou(a_start: float, a_end: float, b_start: float, b_end: float) -> float:
    """``|A ∩ B| / |A ∪ B|`` of two intervals (0 when they do not overlap; both empty: 0)."""
    if a_end < a_start or b_end < b_start:
        raise ValueError(f"interval ends before it starts: [{a_start}, {a_end}], [{b_start}, {b_end}]")
    inter = max(0.0, min(a_end, b_end) - max(a_start, b_start))
    union = (a_end - a_start) + (b_end - b_start) - inter
    return inter / union if union > 0 else 0.0


def best_iou(moment: Span, relevant: Iterable[Span]) -> float:
    """The highest IoU of ``moment`` with a relevant segment of the same video (0 when there is none)."""
    ious = [temporal_iou(moment.start_s, moment.end_s, r.start_s, r.end_s)
            for r in relevant if r.video_id == moment.video_id]
    return max(ious, default=0.0)


def relevant_segments(segments: Sequence[Span], classes: Sequence[str] | None, i: int) -> list[Span]:
    """The relevant segments of the query made from ``segments[i]``: every segment of its class
    (``classes[j] == classes[i]``), or only ``segments[i]`` without classes."""
    if classes is None:
        return [segments[i]]
    return [s for s, c in zip(segments, classes) if c == classes[i]]


def moment_metrics(
    queries: Sequence[MomentQuery], ranks: Sequence[int] = RANKS, thresholds: Sequence[float] = IOU_THRESHOLDS
) -> dict[str, float]:
    """``R{n}@{t}`` for every rank and threshold, ``video_R@1``, ``mIoU@1`` and ``num_queries`` (see the
    module docstring)."""
    if not queries:
        raise ValueError("moment_metrics: no queries")
    out: dict[str, float] = {}
    ious = [[best_iou(m, q.relevant) for m in q.returned[: max(ranks)]] for q in queries]
    for n in ranks:
        for t in thresholds:
            hits = sum(any(v >= t for v in row[:n]) for row in ious)
            out[f"R{n}@{t:g}"] = hits / len(queries)
    video_hits = 0
    for q in queries:
        videos = q.returned_videos or [m.video_id for m in q.returned[:1]]
        first = videos[0] if videos else None
        video_hits += any(r.video_id == first for r in q.relevant)
    out["video_R@1"] = video_hits / len(queries)
    out["mIoU@1"] = sum(row[0] if row else 0.0 for row in ious) / len(queries)
    out["num_queries"] = float(len(queries))
    return out

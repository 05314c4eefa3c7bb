"""Moments: runs of high-scoring windows of one video, merged into ``(start_s, end_s, score)`` spans.

Pure functions over numbers (no FAISS, no I/O). A video embedded with ``--windows`` has one row per
sliding window (``clip_index >= WINDOW_CLIP_BASE``, see docs/moments.md); given the query's score for each
window, :func:`merge_windows`:

1. keeps the windows whose score is within ``rel_threshold`` of the video's best window score:
   ``score >= best - rel_threshold * abs(best)`` (``rel_threshold=0`` keeps only the best window(s),
   ``rel_threshold=1`` with a positive best keeps every window scoring >= 0);
2. sorts the kept windows by start and merges a window into the current run when it starts no later than
   ``max_gap_s`` seconds after the run's end (overlapping and touching windows always merge: gap <= 0);
3. scores each run (a moment) by the max of its windows' scores, and returns moments best first (ties:
   earlier start first), at most ``limit`` of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# clip_index of window rows = WINDOW_CLIP_BASE + window number (docs/interfaces.md); pipeline/embedding.py
# writes the same constant (index/ and pipeline/ do not import each other; tests/test_moments.py checks it).
WINDOW_CLIP_BASE = 1_000_000
DEFAULT_REL_THRESHOLD = 0.05
DEFAULT_MAX_GAP_S = 0.0


@dataclasses.dataclass(frozen=True)
class Moment:
    """A span of one video: ``[start_s, end_s]`` seconds, the best window ``score`` in it, its windows."""

    start_s: float
    end_s: float
    score: float
    num_windows: int = 1


def is_window(clip_index: int | None) -> bool:
    """True for a window row's clip_index (not a sparse clip, not the video-level row)."""
    return clip_index is not None and int(clip_index) >= WINDOW_CLIP_BASE


def merge_windows(
    starts: Sequence[float] | np.ndarray,
    ends: Sequence[float] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    rel_threshold: float = DEFAULT_REL_THRESHOLD,
    max_gap_s: float = DEFAULT_MAX_GAP_S,
    limit: int | None = None,
) -> list[Moment]:
    """The moments of one video from its windows' ``[start, end]`` and query scores (module docstring).

    Windows with a non-finite score (not scored) are ignored; no windows give ``[]``.
    """
    s, e, v = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (starts, ends, scores))
    if not len(s) == len(e) == len(v):
        raise ValueError(f"starts, ends and scores differ in length: {len(s)}, {len(e)}, {len(v)}")
    if rel_threshold < 0 or max_gap_s < 0:
        raise ValueError(f"rel_threshold={rel_threshold} and max_gap_s={max_gap_s} must be >= 0")
    finite = np.isfinite(v)
    if not finite.any():
        return []
    best = float(v[finite].max())
    keep = finite & (v >= best - rel_threshold * abs(best))
    order = np.lexsort((e[keep], s[keep]))
    ks, ke, kv = s[keep][order], e[keep][order], v[keep][order]
    runs: list[list[float]] = []  # [start, end, score, count]
    for start, end, score in zip(ks, ke, kv):
        if runs and start - runs[-1][1] <= max_gap_s:
            run = runs[-1]
            run[1], run[2], run[3] = max(run[1], end), max(run[2], score), run[3] + 1
        else:
            runs.append([start, end, score, 1])
    moments = [Moment(float(a), float(b), float(c), int(n)) for a, b, c, n in runs]
    moments.sort(key=lambda m: (-m.score, m.start_s))
    return moments if limit is None else moments[: int(limit)]

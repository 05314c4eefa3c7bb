"""Run a parsed search against one snapshot: encode the texts once, page with ``offset``, filter videos.

The request path asks the snapshot's :class:`index.searcher.Searcher` (``encode_text`` + ``rank``) and
nothing else, so a one-process ``VideoIndex`` and a fan-out searcher over shard deployments plug in alike; a
``partial`` ranking (shards that missed the deadline) is passed on to the client.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any
from urllib.parse import quote

from index.query import Hit
from workflows.serve.live import Snapshot
from workflows.serve.queries import SearchRequest


@dataclasses.dataclass
class SearchOutcome:
    """One list of hit dicts per query, and whether some shards were missing from the ranking."""

    pages: list[list[dict[str, Any]]]
    partial: bool = False
    missing_shards: tuple[str, ...] = ()


def run_search(snapshot: Snapshot, request: SearchRequest, deadline: float | None = None) -> SearchOutcome:
    """``k`` hit dicts per query after ``offset`` that pass the filters; ``deadline`` (monotonic seconds)
    bounds the ranking (``Searcher.rank(timeout_s=...)``).

    Filters apply before ranking: FAISS ranks only the rows of the videos that pass them
    (:meth:`Catalog.allowed_ids` → ``VideoIndex.search(allowed_ids=...)``), so a page is full whenever
    enough videos pass, and ``offset`` pages through one ranking of exactly those videos."""
    snapshot.catalog.check(request.filters)
    searcher = snapshot.searcher
    vectors = searcher.encode_text(list(request.queries))
    wanted = request.offset + request.k
    allowed = snapshot.catalog.allowed_ids(request.filters) if request.filters else None
    if allowed is not None and not len(allowed):
        return SearchOutcome([[] for _ in request.queries])
    timeout_s = None if deadline is None else max(deadline - time.monotonic(), 0.0)
    ranked = searcher.rank(vectors, wanted, allowed_ids=allowed, timeout_s=timeout_s)
    pages = [[hit_dict(snapshot, h) for h in hits[request.offset:wanted]] for hits in ranked.hits]
    return SearchOutcome(pages, bool(ranked.partial), tuple(ranked.missing_shards))


def hit_dict(snapshot: Snapshot, hit: Hit) -> dict[str, Any]:
    """The JSON of one hit (``moments`` too when the index has them); ``preview_url`` is None when the service
    cannot reach the video."""
    out: dict[str, Any] = {"video_id": hit.video_id, "score": round(hit.score, 6), "start_s": hit.start_s,
                           "end_s": hit.end_s, "clip_index": hit.clip_index}
    if hit.caption is not None:
        out["caption"] = hit.caption
    generated = snapshot.catalog.generated.get(hit.video_id)
    if generated is not None:  # what the captioner wrote for this video (serve --captions)
        out["generated_caption"] = generated
    moments = getattr(hit, "moments", None)  # set by VideoIndex for videos embedded with sliding windows
    if moments:
        out["moments"] = [{"start_s": m.start_s, "end_s": m.end_s, "score": round(m.score, 6)}
                          for m in moments]
    out["preview_url"] = preview_url(hit) if hit.video_id in snapshot.catalog.sources else None
    return out


def preview_url(hit: Hit) -> str:
    start = 0.0 if hit.start_s is None else hit.start_s
    end = start + 1.0 if hit.end_s is None else hit.end_s
    return f"/previews/{quote(hit.video_id, safe='')}.webp?start={start:.3f}&end={end:.3f}"

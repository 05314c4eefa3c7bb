"""Run a parsed search against one snapshot: encode the texts once, page with ``offset``, filter videos."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from index.query import Hit
from workflows.serve.live import Snapshot
from workflows.serve.queries import SearchRequest


def run_search(snapshot: Snapshot, request: SearchRequest) -> list[list[dict[str, Any]]]:
    """One list of hit dicts per query: ``k`` videos after ``offset`` that pass the filters.

    Filters apply before ranking: FAISS ranks only the rows of the videos that pass them
    (:meth:`Catalog.allowed_ids` → ``VideoIndex.search(allowed_ids=...)``), so a page is full whenever
    enough videos pass, and ``offset`` pages through one ranking of exactly those videos."""
    snapshot.catalog.check(request.filters)
    vectors = snapshot.index.encode_text(list(request.queries))
    wanted = request.offset + request.k
    allowed = snapshot.catalog.allowed_ids(request.filters) if request.filters else None
    if allowed is not None and not len(allowed):
        return [[] for _ in request.queries]
    ranked = snapshot.index.search(vectors, k=wanted, allowed_ids=allowed)
    return [[hit_dict(snapshot, h) for h in hits[request.offset:wanted]] for hits in ranked]


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

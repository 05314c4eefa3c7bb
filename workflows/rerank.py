"""Caption reranking of retrieval results: the captioner as a ``VideoIndex.search(..., rerank=...)`` hook.

``rerank_hits`` rescores hits with SwinBERT's caption log-likelihood of the query; ``make_reranker`` wraps
it as a hook; ``ShardFramesLookup`` gives the hook each video's frames from a shard corpus.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

from pipeline.captioning import caption_sampling
from pipeline.datasets import ShardClipDataset

FramesLookup = Callable[[str], tuple[Any, Any]]


def rerank_hits(
    model, query_text: str, hits: list, frames_lookup: FramesLookup, weight: float = 1.0, batch_size: int = 16
) -> list:
    """Rescore retrieval ``hits`` with the captioner: ``score = retrieval score + weight x L(query | video)``
    where ``L`` is the length-normalised caption log-likelihood (``model.score_captions``); sorted best first.

    ``hits``: ``index.query.Hit`` objects or dicts with ``video_id`` and ``score``; the same kind comes back
    (dicts gain ``retrieval_score`` and ``caption_score``). ``frames_lookup(video_id)`` returns the
    model-ready ``(frames [T, 3, S, S] or [N, T, 3, S, S] float, mask)``; a video it cannot find raises.
    """
    if not isinstance(query_text, str) or not query_text.strip():
        raise ValueError(f"rerank needs the query text, got {query_text!r}")
    if not hits:
        return []
    ids = [h["video_id"] if isinstance(h, Mapping) else h.video_id for h in hits]
    caption_scores: list[float] = []
    device = next(model.parameters()).device
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        pairs = []
        for vid in chunk:
            try:
                pairs.append(frames_lookup(vid))
            except KeyError as exc:
                raise KeyError(f"rerank: no frames for video {vid!r} ({exc})") from exc
        frames = torch.stack([torch.as_tensor(f) for f, _ in pairs]).to(device)
        mask = torch.stack([torch.as_tensor(m).bool() for _, m in pairs]).to(device)
        with torch.inference_mode():
            caption_scores += model.score_captions(frames, mask, [query_text] * len(chunk)).tolist()
    out = []
    for hit, cs in zip(hits, caption_scores):
        if isinstance(hit, Mapping):
            base = float(hit["score"])
            out.append({**hit, "score": base + weight * cs, "retrieval_score": base, "caption_score": cs})
        else:
            out.append(dataclasses.replace(hit, score=float(hit.score) + weight * cs))
    return sorted(out, key=lambda h: -(h["score"] if isinstance(h, Mapping) else h.score))


def make_reranker(model, frames_lookup: FramesLookup, weight: float = 1.0) -> Callable[[str, list], list]:
    """A ``(query_text, hits) -> hits`` hook for ``VideoIndex.search(..., rerank=...)``."""

    def rerank(query_text: str, hits: list) -> list:
        return rerank_hits(model, query_text, hits, frames_lookup, weight)

    return rerank


class ShardFramesLookup:
    """``video_id -> (frames, mask)`` over a shard corpus, decoded once (eval sampling) and cached.

    Uses ``pipeline.datasets.ShardClipDataset`` with the captioner's sampling and ``transform``; meant for
    evaluation corpora that fit in memory (the frames of every video are kept).
    """

    def __init__(self, shards, transform, num_frames: int, split: str | None = None, num_clips: int = 1,
                 sampling: dict[str, Any] | None = None):
        self.dataset = ShardClipDataset(
            shards,
            sampling=sampling or caption_sampling(num_frames, num_clips),
            size=transform.image_size,
            split=split,
            shuffle_shards=False,
        )
        self.transform = transform
        self._cache: dict[str, tuple[Any, Any]] | None = None
        self.records: dict[str, dict[str, Any]] = {}  # video_id -> the sample's json (captions, split, ...)

    def _load(self) -> dict[str, tuple[Any, Any]]:
        if self._cache is None:
            self._cache = {}
            for sample in self.dataset:
                self.records[str(sample["video_id"])] = dict(sample["meta"], captions=sample["captions"])
                self._cache[str(sample["video_id"])] = (
                    self.transform(sample["frames"]),
                    torch.as_tensor(sample["mask"]).bool(),
                )
        return self._cache

    def video_ids(self) -> list[str]:
        return sorted(self._load())

    def __call__(self, video_id: str):
        cache = self._load()
        if video_id not in cache:
            raise KeyError(f"video {video_id!r} is not in the shards (or failed to decode)")
        return cache[video_id]

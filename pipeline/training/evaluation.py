"""Evaluation of a split during (or after) training: each worker encodes its share, the shares are gathered,
and :mod:`pipeline.retrieval_eval` (retrieval) or the MLM loss + :mod:`pipeline.caption_metrics` (caption)
turn them into metrics every worker agrees on."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from models import create_model
from pipeline.caption_metrics import evaluate_captions
from pipeline.retrieval_eval import flatten_captions, format_metrics, retrieval_metrics
from pipeline.training.config import TrainConfig
from pipeline.training.data import eval_batches
from pipeline.training.inventory import shard_inventory
from pipeline.training.objectives import CaptionObjective, RetrievalObjective, build_objective
from pipeline.training.state import all_gather_objects
from runtime.threads import set_torch_threads


@torch.no_grad()
def encode_split(
    objective: RetrievalObjective,
    batches: Iterable[dict],
    device: torch.device,
    equivalence: str | None,
    autocast: torch.dtype | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str] | None]:
    """Encode this worker's share of a split and gather all workers' shares:
    ``(video_emb [V, D], text_emb [N, D], text_to_video [N], classes [V] or None)``.

    Videos are deduplicated by ``video_id`` and sorted, so the result does not depend on how the shards were
    divided among workers; ``classes`` holds each video's ``equivalence`` meta field when every video has one.
    """
    was_training = objective.training
    objective.eval()
    rows: list[tuple[str, np.ndarray, list[str], Any, np.ndarray]] = []
    try:
        for batch in batches:
            frames = batch["frames"].to(device, non_blocking=True)
            mask = batch["mask"].to(device)
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                video = objective.embed_videos(frames, mask).float().cpu().numpy()
                texts, owners = flatten_captions(batch["captions"])
                text = objective.model.encode_text(texts).float().cpu().numpy()
            for i, vid in enumerate(batch["video_id"]):
                cls = batch["meta"][i].get(equivalence) if equivalence else None
                rows.append((vid, video[i], batch["captions"][i], cls, text[owners == i]))
    finally:
        objective.train(was_training)
    merged: dict[str, tuple] = {}
    for part in all_gather_objects(rows):
        for row in part:
            merged.setdefault(row[0], row)
    if not merged:
        raise ValueError("evaluation split is empty: no video was decoded")
    ordered = [merged[k] for k in sorted(merged)]
    video_emb = np.stack([r[1] for r in ordered])
    text_emb = np.concatenate([r[4] for r in ordered])
    owners = np.concatenate([np.full(len(r[4]), j, dtype=np.int64) for j, r in enumerate(ordered)])
    classes = None
    if equivalence and all(r[3] is not None for r in ordered):
        classes = [str(r[3]) for r in ordered]
    return video_emb, text_emb, owners, classes


@torch.no_grad()
def evaluate_retrieval(
    objective: RetrievalObjective,
    batches: Iterable[dict],
    device: torch.device,
    equivalence: str | None,
    autocast: torch.dtype | None = None,
) -> dict[str, float]:
    """Encode a split (:func:`encode_split`, all workers) and compute t2v/v2t metrics; every worker returns
    the same numbers."""
    video_emb, text_emb, owners, classes = encode_split(objective, batches, device, equivalence, autocast)
    sim = text_emb.astype(np.float64) @ video_emb.astype(np.float64).T
    metrics = retrieval_metrics(sim, owners, equivalence=classes)
    metrics["equivalence"] = equivalence if classes is not None else None
    return metrics


@torch.no_grad()
def evaluate_caption(
    objective: CaptionObjective,
    batches: Iterable[dict],
    device: torch.device,
    autocast: torch.dtype | None = None,
    max_generate: int = 64,
) -> dict[str, float]:
    """Mean MLM loss over a split (gathered over workers) and, when the model can ``generate``, caption
    metrics (:func:`pipeline.caption_metrics.evaluate_captions`) on up to ``max_generate`` videos a worker."""
    was_training = objective.training
    objective.eval()
    total, count = 0.0, 0
    hypotheses: list[tuple[str, str, list[str]]] = []
    try:
        for batch in batches:
            frames = batch["frames"].to(device, non_blocking=True)
            mask = batch["mask"].to(device)
            first = [c[0] for c in batch["captions"]]
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                loss = objective(frames, mask, first)
            total += float(loss) * len(first)
            count += len(first)
            generate = getattr(objective.model, "generate", None)
            if callable(generate) and len(hypotheses) < max_generate:
                outs, _ = generate(frames, mask)
                for vid, hyp, refs in zip(batch["video_id"], outs, batch["captions"]):
                    hypotheses.append((vid, str(hyp), list(refs)))
    finally:
        objective.train(was_training)
    parts = all_gather_objects((total, count, hypotheses))
    total = sum(p[0] for p in parts)
    count = sum(p[1] for p in parts)
    if count == 0:
        raise ValueError("evaluation split is empty: no video was decoded")
    metrics: dict[str, Any] = {"mlm_loss": total / count, "num_videos": float(count)}
    merged = {vid: (hyp, refs) for p in parts for vid, hyp, refs in p[2]}
    if merged:
        keys = sorted(merged)
        metrics.update(evaluate_captions([merged[k][0] for k in keys], [merged[k][1] for k in keys]))
    return metrics


def embed_split(
    shards: str | os.PathLike, cfg: TrainConfig, pretrained: str | os.PathLike, split: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str] | None]:
    """:func:`encode_split` of ``cfg.model`` loaded from ``pretrained`` on one split, in this process (no
    Ray): what the trainer's evaluation sees, for analysis scripts (e.g. ``bench/attribute_accuracy.py``)."""
    set_torch_threads(cfg.cpus_per_worker)
    model, transform, _ = create_model(cfg.model, pretrained=str(pretrained))
    batches = eval_batches(cfg, shard_inventory(shards), split or cfg.test_split, transform, 0, 1)
    return encode_split(build_objective(model, cfg), batches, torch.device("cpu"), cfg.equivalence)


def summarize_metrics(metrics: dict[str, Any]) -> str:
    """One log line of an evaluation's metrics (retrieval: :func:`pipeline.retrieval_eval.format_metrics`)."""
    if "t2v_R@1" in metrics:
        return format_metrics({k: v for k, v in metrics.items() if k[:4] in ("t2v_", "v2t_")})
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))

"""Contrastive losses for text-video retrieval (CLIP4Clip's symmetric CrossEn) and multi-clip aggregation.

Features are all-gathered across data-parallel workers *with gradient*
(``torch.distributed.nn.functional.all_gather``): every worker scores its local rows against the global
batch, so negatives come from all workers and gradients flow back to the worker that produced them.
Without an initialised process group (or with one worker) nothing is gathered and no barrier runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_LOGIT_SCALE = math.log(100.0)
CLIP_AGGREGATIONS = ("mean", "max", "lse")


def distributed_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when not distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(features: torch.Tensor) -> torch.Tensor:
    """Concatenate ``features [B, ...]`` from all workers along dim 0, keeping the autograd graph.

    Every worker must pass the same batch size. A no-op without a process group.
    """
    rank, world = distributed_world()
    if world == 1:
        return features
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(features.contiguous()), dim=0)


def scaled_logits(
    text_emb: torch.Tensor, video_emb: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """``exp(logit_scale) * text @ video.T`` with the scale clamped at ln(100) (CLIP's cap)."""
    if not isinstance(logit_scale, torch.Tensor):
        logit_scale = torch.tensor(float(logit_scale), device=text_emb.device)
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    return scale * text_emb @ video_emb.t()


def cross_entropy_sym(sim_matrix: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP4Clip's CrossEn, symmetric: mean of InfoNCE over rows and over columns of a square matrix."""
    if sim_matrix.ndim != 2 or sim_matrix.shape[0] != sim_matrix.shape[1]:
        raise ValueError(f"similarity matrix must be square [B, B], got {tuple(sim_matrix.shape)}")
    if labels is None:
        labels = torch.arange(sim_matrix.shape[0], device=sim_matrix.device)
    return 0.5 * (F.cross_entropy(sim_matrix, labels) + F.cross_entropy(sim_matrix.t(), labels))


def contrastive_loss(
    video_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """Symmetric InfoNCE between paired ``video_emb [B, D]`` and ``text_emb [B, D]`` (row i ↔ row i).

    In a distributed run the other workers' embeddings are gathered (with gradient) and serve as
    negatives; each worker computes the loss of its own rows (labels offset by ``rank * B``), which
    gives the same gradients as the full global matrix at 1/world the memory.
    """
    if video_emb.shape != text_emb.shape:
        raise ValueError(
            f"video and text embeddings must be paired: {tuple(video_emb.shape)} vs {tuple(text_emb.shape)}"
        )
    rank, world = distributed_world()
    local = video_emb.shape[0]
    all_video = gather_with_grad(video_emb)
    all_text = gather_with_grad(text_emb)
    labels = torch.arange(local, device=video_emb.device) + rank * local
    t2v = scaled_logits(text_emb, all_video, logit_scale)
    v2t = scaled_logits(video_emb, all_text, logit_scale)
    return 0.5 * (F.cross_entropy(t2v, labels) + F.cross_entropy(v2t, labels))


def aggregate_clips(
    clip_emb: torch.Tensor, clip_mask: torch.Tensor | None = None, mode: str = "mean", normalize: bool = True
) -> torch.Tensor:
    """ClipBERT-style aggregation of per-clip embeddings ``[B, N, D]`` → ``[B, D]``.

    ``mode``: ``mean`` (average), ``max`` (element-wise max) or ``lse`` (log-sum-exp over clips, a smooth
    max). ``clip_mask [B, N]`` (bool) drops clips that have no valid frame; a row with no valid clip raises.
    """
    if mode not in CLIP_AGGREGATIONS:
        raise ValueError(f"clip aggregation {mode!r} is not one of {CLIP_AGGREGATIONS}")
    if clip_emb.ndim != 3:
        raise ValueError(f"clip embeddings must be [B, N, D], got {tuple(clip_emb.shape)}")
    if clip_mask is None:
        clip_mask = torch.ones(clip_emb.shape[:2], dtype=torch.bool, device=clip_emb.device)
    clip_mask = clip_mask.to(device=clip_emb.device, dtype=torch.bool)
    if not bool(clip_mask.any(dim=1).all()):
        raise ValueError("every video needs at least one valid clip to aggregate")
    m = clip_mask.unsqueeze(-1)
    if mode == "mean":
        out = (clip_emb * m).sum(1) / m.sum(1).clamp(min=1)
    elif mode == "max":
        out = clip_emb.masked_fill(~m, float("-inf")).amax(1)
    else:
        out = torch.logsumexp(clip_emb.masked_fill(~m, float("-inf")), dim=1)
    return F.normalize(out, dim=-1) if normalize else out


def aggregate_clip_logits(
    clip_logits: torch.Tensor, clip_mask: torch.Tensor | None = None, mode: str = "mean"
) -> torch.Tensor:
    """ClipBERT's score-level aggregation: per-clip logits ``[Bt, Bv, N]`` → ``[Bt, Bv]`` by mean/max/lse."""
    if mode not in CLIP_AGGREGATIONS:
        raise ValueError(f"clip aggregation {mode!r} is not one of {CLIP_AGGREGATIONS}")
    if clip_mask is None:
        clip_mask = torch.ones(clip_logits.shape[1:], dtype=torch.bool, device=clip_logits.device)
    m = clip_mask.to(device=clip_logits.device, dtype=torch.bool).unsqueeze(0).expand_as(clip_logits)
    if not bool(m.any(-1).all()):
        raise ValueError("every video needs at least one valid clip to aggregate")
    if mode == "mean":
        return (clip_logits * m).sum(-1) / m.sum(-1).clamp(min=1)
    filled = clip_logits.masked_fill(~m, float("-inf"))
    return filled.amax(-1) if mode == "max" else torch.logsumexp(filled, dim=-1)

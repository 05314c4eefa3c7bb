"""Training objectives, each one ``nn.Module`` so DDP sees the whole forward: :class:`RetrievalObjective`
(symmetric InfoNCE over the global batch) and :class:`CaptionObjective` (SwinBERT's masked-language-model
loss)."""

from __future__ import annotations

import torch

from models import losses
from pipeline.training.config import TrainConfig


class RetrievalObjective(torch.nn.Module):
    """Symmetric InfoNCE (gathered over workers) between videos and one caption per video.

    ``forward`` returns the loss, so DDP wraps the whole computation (text and video towers). The model's
    own ``loss`` is used when it has one (tightTransf adds its cross-encoder term there).
    """

    def __init__(self, model: torch.nn.Module, clip_aggregation: str = "mean"):
        super().__init__()
        self.model = model
        self.clip_aggregation = clip_aggregation
        if hasattr(model, "clip_aggregation"):
            model.clip_aggregation = clip_aggregation

    def embed_videos(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, N, T, 3, S, S]`` clips → aggregated, L2-normalised ``[B, D]``."""
        if hasattr(self.model, "embed_batch"):
            return self.model.embed_batch(frames, mask)
        clip_emb = self.model.encode_clips(frames, mask)
        return losses.aggregate_clips(clip_emb.float(), mask.any(-1), mode=self.clip_aggregation)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor, captions: list[str]) -> torch.Tensor:
        if hasattr(self.model, "loss"):
            return self.model.loss(frames, mask, captions)
        video = self.embed_videos(frames, mask)
        text = self.model.encode_text(captions).float()
        return losses.contrastive_loss(video, text, self.model.logit_scale)


class CaptionObjective(torch.nn.Module):
    """SwinBERT's masked-language-model (+ attention sparsity) loss, ``model.training_loss``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, frames: torch.Tensor, mask: torch.Tensor, captions: list[str]) -> torch.Tensor:
        out = self.model.training_loss(frames, mask, captions)
        return out[0] if isinstance(out, tuple) else out


def build_objective(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    if cfg.task == "caption":
        if not hasattr(model, "training_loss"):
            raise ValueError(f"model {cfg.model!r} has no training_loss(); --task caption needs SwinBERT")
        return CaptionObjective(model)
    for method in ("encode_clips", "encode_text"):
        if not hasattr(model, method):
            raise ValueError(
                f"model {cfg.model!r} has no {method}(); --task retrieval needs a text-video model"
            )
    return RetrievalObjective(model, cfg.clip_aggregation)

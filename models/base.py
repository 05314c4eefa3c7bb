"""The retrieval-model contract: what the embed job, the trainer and the index query call on a model.

:class:`RetrievalModel` holds everything a text-video dual encoder shares; a family implements three hooks:

* ``text_features(tokens [B, L]) -> [B, D]``: the text tower, unnormalised;
* ``video_embedding(frames [B, T, 3, S, S], mask [B, T] | None) -> [B, D]``: the video tower on one clip
  per video, L2-normalised (``mask`` already checked: right shape, every row has a valid frame; the
  family normalises because a temporal head may already end with a normalisation);
* ``logit_scale``: a 1-element parameter (the learned CLIP temperature, ``exp`` clamped at 100).

and sets ``embed_dim``, ``image_size``, ``context_length``, ``num_frames`` in ``__init__`` (the base
``__init__`` sets ``clip_aggregation`` and ``tokenizer``). The base class adds no parameters or buffers,
so state dict keys (and ``model_id`` digests) are the families' own.

Frames are what the family's :class:`models.transforms.VideoTransform` returns; ``[B, N, T, 3, S, S]``
inputs are N clips per video whose embeddings are aggregated with ``clip_aggregation`` (ClipBERT's
consensus: ``mean`` / ``max`` / ``lse``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import losses
from models.transforms import build_tokenizer


class RetrievalModel(nn.Module):
    """Text-video retrieval model: ``encode_text``/``encode_video``/``encode_clips`` into one space."""

    embed_dim: int
    image_size: int
    context_length: int
    num_frames: int
    # parameter-name rules for param_groups: new modules train at the head lr; these skip weight decay
    NO_DECAY_SUBSTRINGS: tuple[str, ...] = ("embedding",)
    NO_DECAY_SUFFIXES: tuple[str, ...] = ()

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.clip_aggregation = config.get("clip_aggregation", "mean")
        if self.clip_aggregation not in losses.CLIP_AGGREGATIONS:
            raise ValueError(
                f"clip_aggregation {self.clip_aggregation!r} is not one of {losses.CLIP_AGGREGATIONS}"
            )
        self.tokenizer = None  # set by the builder (open_clip SimpleTokenizer); built lazily otherwise

    # ------------------------------------------------------------------ family hooks

    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def video_embedding(self, frames: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def new_module_prefixes(self) -> tuple[str, ...]:
        """Parameter-name prefixes of modules trained at the head lr (the rest is the backbone)."""
        return ()

    # ------------------------------------------------------------------ checks

    def _check_frames(self, frames: torch.Tensor, ndim: int, what: str = "frames") -> None:
        s = self.image_size
        if not isinstance(frames, torch.Tensor) or not frames.is_floating_point():
            raise TypeError(f"{what} must be a float tensor (apply the model's transform to uint8 frames)")
        if frames.ndim != ndim or tuple(frames.shape[-3:]) != (3, s, s):
            dims = "[B, T, 3, S, S]" if ndim == 5 else "[B, N, T, 3, S, S]"
            raise ValueError(f"{what} must be {dims} with S={s}, got {tuple(frames.shape)}")

    def _frame_mask(self, mask: torch.Tensor | None, b: int, t: int, device) -> torch.Tensor:
        """``mask`` as bool ``[B, T]`` on ``device`` (all True when ``None``); shape checked."""
        if mask is None:
            return torch.ones(b, t, dtype=torch.bool, device=device)
        mask = torch.as_tensor(mask, device=device).to(torch.bool)
        if tuple(mask.shape) != (b, t):
            raise ValueError(f"mask must be [B, T] = {(b, t)}, got {tuple(mask.shape)}")
        return mask

    # ------------------------------------------------------------------ text

    def tokenize(self, texts: list[str] | torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, context_length]`` from captions (or pass token tensors through, checked)."""
        if isinstance(texts, torch.Tensor):
            if texts.ndim != 2 or texts.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"token tensor must be int [B, L], got {texts.dtype} {tuple(texts.shape)}")
            if texts.shape[1] != self.context_length:
                raise ValueError(
                    f"token tensor length {texts.shape[1]} != context length {self.context_length}"
                )
            return texts.long()
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError("captions must be a list of strings or a token tensor")
        if self.tokenizer is None:
            self.tokenizer = build_tokenizer(self.context_length)
        device = self.logit_scale.device
        return self.tokenizer(list(texts), context_length=self.context_length).to(device)

    def encode_text(self, texts: list[str] | torch.Tensor) -> torch.Tensor:
        """Captions (list[str]) or token ids ``[B, L]`` → L2-normalised ``[B, D]``."""
        return F.normalize(self.text_features(self.tokenize(texts)), dim=-1)

    # ------------------------------------------------------------------ video

    def encode_video(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``frames [B, T, 3, S, S]`` (+ bool ``mask [B, T]``) → L2-normalised ``[B, D]``.

        Multi-clip input ``[B, N, T, 3, S, S]`` (+ ``[B, N, T]``) is aggregated with ``clip_aggregation``.
        """
        if isinstance(frames, torch.Tensor) and frames.ndim == 6:
            return self.embed_batch(frames, mask)
        self._check_frames(frames, 5)
        if mask is not None:
            mask = self._frame_mask(mask, frames.shape[0], frames.shape[1], frames.device)
            if not bool(mask.any(1).all()):
                raise ValueError("every video needs at least one valid frame (a mask row is all False)")
        return self.video_embedding(frames, mask)

    def encode_clips(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``frames [B, N, T, 3, S, S]``, ``mask [B, N, T]`` → ``[B, N, D]``, one L2-normalised row per clip.

        A clip with no valid frame gets an all-zero row (``mask.any(-1)`` says which clips are real).
        """
        self._check_frames(frames, 6)
        b, n, t = frames.shape[:3]
        if mask is None:
            mask = torch.ones(b, n, t, dtype=torch.bool, device=frames.device)
        mask = torch.as_tensor(mask, device=frames.device).to(torch.bool)
        if tuple(mask.shape) != (b, n, t):
            raise ValueError(f"mask must be [B, N, T] = {(b, n, t)}, got {tuple(mask.shape)}")
        flat_mask = mask.reshape(b * n, t)
        clip_valid = flat_mask.any(1)
        safe_mask = flat_mask | ~clip_valid.unsqueeze(1)
        emb = self.encode_video(frames.reshape(b * n, *frames.shape[2:]), safe_mask)
        emb = emb * clip_valid.unsqueeze(1).to(emb.dtype)
        return emb.view(b, n, -1)

    def video_from_clips(self, clip_emb: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Video embedding aggregated from ``encode_clips`` output (``mask [B, N, T]``), without a second
        forward: what the embed job stores beside the clip rows."""
        clip_mask = None if mask is None else torch.as_tensor(mask, device=clip_emb.device).bool().any(-1)
        return losses.aggregate_clips(clip_emb, clip_mask, self.clip_aggregation)

    def embed_batch(self, frames: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Video embedding of ``[B, T, ...]`` or aggregated ``[B, N, T, ...]`` frames."""
        if frames.ndim == 6:
            return self.video_from_clips(self.encode_clips(frames, mask), mask)
        return self.encode_video(frames, mask)

    # ------------------------------------------------------------------ scores and training

    def similarity(self, text_emb: torch.Tensor, video_emb: torch.Tensor) -> torch.Tensor:
        """Logits ``exp(logit_scale) · text · videoᵀ`` (``[Bt, Bv]``), scale clamped at ln 100."""
        return losses.scaled_logits(text_emb, video_emb, self.logit_scale)

    def contrastive_loss(self, video_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Symmetric CrossEn over paired embeddings, gathered across workers with gradient."""
        return losses.contrastive_loss(video_emb, text_emb, self.logit_scale)

    def loss(
        self, video_frames: torch.Tensor, mask: torch.Tensor | None, captions: list[str]
    ) -> torch.Tensor:
        """Training loss for a batch of paired (video, caption): symmetric CrossEn."""
        if len(captions) != video_frames.shape[0]:
            raise ValueError(f"{len(captions)} captions for {video_frames.shape[0]} videos")
        return self.contrastive_loss(self.embed_batch(video_frames, mask), self.encode_text(captions))

    def forward(
        self, video_frames: torch.Tensor, mask: torch.Tensor | None, captions: list[str]
    ) -> torch.Tensor:
        return self.loss(video_frames, mask, captions)

    def param_groups(
        self, lr: float, backbone_lr: float | None = None, weight_decay: float = 0.0
    ) -> list[dict]:
        """Optimizer groups: backbone at ``backbone_lr`` (default ``lr``), new modules at ``lr``.

        Gains, biases (``ndim < 2``) and names matching ``NO_DECAY_SUBSTRINGS`` / ``NO_DECAY_SUFFIXES`` skip
        weight decay (as in CLIP4Clip/open_clip).
        """
        backbone_lr = lr if backbone_lr is None else backbone_lr
        prefixes = self.new_module_prefixes()
        groups: dict[tuple[str, bool], list] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            new = name.startswith(prefixes)
            no_decay = (
                param.ndim < 2
                or any(s in name for s in self.NO_DECAY_SUBSTRINGS)
                or name.endswith(self.NO_DECAY_SUFFIXES)
            )
            groups.setdefault(("new" if new else "backbone", no_decay), []).append(param)
        return [
            {
                "name": f"{kind}{'_no_decay' if no_decay else ''}",
                "params": params,
                "lr": lr if kind == "new" else backbone_lr,
                "weight_decay": 0.0 if no_decay else weight_decay,
            }
            for (kind, no_decay), params in sorted(groups.items())
        ]

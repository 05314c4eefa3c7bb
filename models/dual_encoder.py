"""VidSwin dual encoder: a Video Swin video tower + an open_clip text tower, projected to a shared space.

Video: ``VideoSwinTransformer.forward_features`` → token grid ``[B, T/2, H/32, W/32, 8C]`` → mean over the
grid → ``Linear(8C, D)``. Text: open_clip ``TextTransformer`` (projected EOT token, ``D`` wide). Trained with
the same symmetric CrossEn as CLIP4Clip and exposing the same retrieval API.

Weights: ``pretrained`` is a vidsift checkpoint of this model; the towers can be initialised separately with
``video_pretrained=`` (a Video Swin file, see ``models.video_swin``; ``video_pretrained_source=`` names its
layout) and ``text_pretrained=`` (an open_clip tag / open_clip or OpenAI TorchScript file of the config's
``open_clip_arch``; only its text tower is used).
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.model import _build_text_tower

from models.base import RetrievalModel
from models.checkpoint import load_state_strict, read_pretrained_checkpoint
from models.pretrained import (
    PretrainedWeightsError,
    PretrainedWeightsNotFound,
    read_state_dict_file,
    resolve_clip_weights,
    resolve_weights,
)
from models.registry import get_model_entry, merge_config
from models.transforms import IMAGENET_MEAN, IMAGENET_STD, VideoTransform, build_tokenizer
from models.video_swin import load_pretrained, video_swin_from_config

TEXT_TOWER_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
# Every key a dual-encoder config may hold (create_model overrides outside these are rejected).
CONFIG_KEYS = (
    "video_backbone", "video_overrides", "open_clip_arch", "embed_dim", "quick_gelu", "text_cfg",
    "num_frames", "clip_aggregation",
)

# --------------------------------------------------------------------------------------------- helpers


def repeat_last_valid(frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Replace padded frames (``mask`` False) of ``[B, T, ...]`` by the last valid frame before them (or the
    first valid one), so a window-attention video tower sees no blank frames."""
    b, t = mask.shape
    pos = torch.arange(t, device=frames.device).expand(b, t)
    last = torch.where(mask, pos, torch.full_like(pos, -1)).cummax(dim=1).values
    first = torch.where(mask, pos, torch.full_like(pos, t)).amin(dim=1, keepdim=True).clamp(max=t - 1)
    idx = torch.where(last < 0, first.expand(b, t), last)
    return frames.gather(1, idx.view(b, t, *([1] * (frames.ndim - 2))).expand_as(frames))


# --------------------------------------------------------------------------------------------- model


class VidSwinDualEncoder(RetrievalModel):
    """Video Swin + CLIP text dual encoder (see module docstring)."""

    NO_DECAY_SUBSTRINGS = ("embedding", "relative_position_bias_table")

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        self.config = copy.deepcopy(config)
        embed_dim = int(config["embed_dim"])
        entry = get_model_entry(config["video_backbone"])
        if entry.family != "video_swin":
            raise ValueError(f"video_backbone {config['video_backbone']!r} is not a Video Swin model")
        video_cfg = {**entry.config, **config.get("video_overrides", {})}
        self.video = video_swin_from_config(video_cfg)
        self.video_proj = nn.Linear(self.video.num_features, embed_dim)
        nn.init.normal_(self.video_proj.weight, std=self.video.num_features**-0.5)
        nn.init.zeros_(self.video_proj.bias)
        self.register_buffer("quick_gelu_flag", torch.tensor([int(bool(config.get("quick_gelu", False)))]))
        self.text = _build_text_tower(
            embed_dim, config["text_cfg"], quick_gelu=bool(config.get("quick_gelu", False))
        )
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))
        self.embed_dim = embed_dim
        self.num_frames = int(config.get("num_frames", 8))  # default frames per clip for samplers
        self.image_size = int(video_cfg["image_size"])
        self.context_length = int(self.text.context_length)

    def new_module_prefixes(self) -> tuple[str, ...]:
        """Projections + scale train at the head lr; the Swin and text transformers are the backbone."""
        return ("video_proj.", "logit_scale", "text.text_projection")

    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """open_clip text tower: projected EOT token ``[B, D]`` (unnormalised)."""
        return self.text(tokens)

    def video_embedding(self, frames: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Swin token grid → mean → projection → L2 norm; padded frames repeat the last valid one."""
        if mask is not None:
            frames = repeat_last_valid(frames, mask)
        grid = self.video.forward_features(frames.permute(0, 2, 1, 3, 4))
        return F.normalize(self.video_proj(grid.mean(dim=(1, 2, 3))), dim=-1)


# --------------------------------------------------------------------------------------------- weights


def load_text_tower(model: VidSwinDualEncoder, path: str | os.PathLike) -> None:
    """Fill the text tower from a CLIP weights file (state dict / TorchScript); only text keys are used."""
    state = read_state_dict_file(path)
    state = {k[len("text.") :] if k.startswith("text.") else k: v for k, v in state.items()}
    text_state = {k: v for k, v in state.items() if k.startswith(TEXT_TOWER_KEYS)}
    own = model.text.state_dict()
    text_state = {
        k: v.to(own[k].dtype) if k in own and v.is_floating_point() else v for k, v in text_state.items()
    }
    missing = sorted(set(own) - set(text_state))
    bad = [k for k in own if k in text_state and text_state[k].shape != own[k].shape]
    if missing or bad:
        raise PretrainedWeightsError(
            f"text weights {str(path)!r} do not fit the text tower: "
            f"missing {missing[:6]}, wrong shape {bad[:6]}"
        )
    model.text.load_state_dict({k: text_state[k] for k in own}, strict=True)


def _checkpoint_payload(pretrained: str | os.PathLike | None, cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The vidsift checkpoint ``pretrained`` (its activation flag copied into ``cfg``), or ``None``."""
    if pretrained is None:
        return None
    if not resolve_weights(pretrained).is_file():  # any store: a remote checkpoint's local cached copy
        raise PretrainedWeightsNotFound(
            f"pretrained {str(pretrained)!r} is not a file; the dual encoder takes a vidsift checkpoint "
            "pretrained= (use text_pretrained= / video_pretrained= to initialise one tower)"
        )
    payload = read_pretrained_checkpoint(pretrained)  # clear error for foreign / unreadable files
    flag = payload["state_dict"].get("quick_gelu_flag")
    if flag is not None:
        cfg["quick_gelu"] = bool(int(flag))
    return payload


# --------------------------------------------------------------------------------------------- builder


def build_vidswin_dual_encoder(
    name: str,
    config: dict[str, Any],
    pretrained: str | os.PathLike | None = None,
    video_pretrained: str | os.PathLike | None = None,
    video_pretrained_source: str | None = None,
    text_pretrained: str | os.PathLike | None = None,
    cache_dir: str | None = None,
    **overrides: Any,
):
    """Factory builder: ``(VidSwinDualEncoder, VideoTransform, SimpleTokenizer)``.

    ``pretrained`` is a vidsift checkpoint of this model; without one, ``video_pretrained`` (+ its layout
    ``video_pretrained_source``) and ``text_pretrained`` (open_clip tag or CLIP weights file) initialise
    the towers separately.
    """
    cfg = merge_config(name, config, overrides, CONFIG_KEYS)
    payload = _checkpoint_payload(pretrained, cfg)
    text_weights = None
    if payload is None and text_pretrained is not None:
        # checked and fetched before building, so a bad tag / unreachable hub fails fast
        text_weights, tag_cfg = resolve_clip_weights(cfg.get("open_clip_arch"), text_pretrained, cache_dir)
        if "quick_gelu" in tag_cfg:
            cfg["quick_gelu"] = bool(tag_cfg["quick_gelu"])
    model = VidSwinDualEncoder(cfg)
    if payload is not None:
        load_state_strict(model, payload, pretrained, "dual_encoder")
    else:
        if video_pretrained is not None:
            load_pretrained(model.video, video_pretrained, video_pretrained_source or "vidsift")
        if text_pretrained is not None:
            load_text_tower(model, text_weights)
    model.pretrained = None if pretrained is None else str(pretrained)
    tokenizer = build_tokenizer(model.context_length)
    model.tokenizer = tokenizer
    transform = VideoTransform(model.image_size, IMAGENET_MEAN, IMAGENET_STD, interpolation="bicubic")
    return model.eval(), transform, tokenizer

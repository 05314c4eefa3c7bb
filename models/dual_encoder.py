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

from models import losses
from models.pretrained import PretrainedWeightsError, read_state_dict_file, resolve_clip_weights
from models.registry import get_model_entry, load_checkpoint, register_model
from models.transforms import VideoTransform, build_tokenizer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TEXT_TOWER_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def repeat_last_valid(frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Replace padded frames (``mask`` False) of ``[B, T, ...]`` by the last valid frame before them (or the
    first valid one), so a window-attention video tower sees no blank frames."""
    b, t = mask.shape
    pos = torch.arange(t, device=frames.device).expand(b, t)
    last = torch.where(mask, pos, torch.full_like(pos, -1)).cummax(dim=1).values
    first = torch.where(mask, pos, torch.full_like(pos, t)).amin(dim=1, keepdim=True).clamp(max=t - 1)
    idx = torch.where(last < 0, first.expand(b, t), last)
    return frames.gather(1, idx.view(b, t, *([1] * (frames.ndim - 2))).expand_as(frames))


class VidSwinDualEncoder(nn.Module):
    """Video Swin + CLIP text dual encoder (see module docstring)."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        from open_clip.model import _build_text_tower

        self.config = copy.deepcopy(config)
        embed_dim = int(config["embed_dim"])
        entry = get_model_entry(config["video_backbone"])
        if entry.family != "video_swin":
            raise ValueError(f"video_backbone {config['video_backbone']!r} is not a Video Swin model")
        video_cfg = {**entry.config, **config.get("video_overrides", {})}
        self.video, _, _ = entry.builder(video_cfg)
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
        self.clip_aggregation = config.get("clip_aggregation", "mean")
        if self.clip_aggregation not in losses.CLIP_AGGREGATIONS:
            raise ValueError(
                f"clip_aggregation {self.clip_aggregation!r} is not one of {losses.CLIP_AGGREGATIONS}"
            )
        self.tokenizer = None

    def param_groups(
        self, lr: float, backbone_lr: float | None = None, weight_decay: float = 0.0
    ) -> list[dict]:
        """Backbone towers (Swin, text transformer) at ``backbone_lr``; projections + scale at ``lr``."""
        backbone_lr = lr if backbone_lr is None else backbone_lr
        groups: dict[tuple[str, bool], list] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            new = (
                name.startswith("video_proj.")
                or name == "logit_scale"
                or name.startswith("text.text_projection")
            )
            no_decay = param.ndim < 2 or "embedding" in name or "relative_position_bias_table" in name
            groups.setdefault(("new" if new else "backbone", no_decay), []).append(param)
        return [
            {
                "name": f"{kind}{'_no_decay' if nd else ''}",
                "params": params,
                "lr": lr if kind == "new" else backbone_lr,
                "weight_decay": 0.0 if nd else weight_decay,
            }
            for (kind, nd), params in sorted(groups.items())
        ]

    def _check_frames(self, frames: torch.Tensor, ndim: int) -> None:
        s = self.image_size
        if not isinstance(frames, torch.Tensor) or not frames.is_floating_point():
            raise TypeError("frames must be a float tensor (apply the model's transform to uint8 frames)")
        if frames.ndim != ndim or tuple(frames.shape[-3:]) != (3, s, s):
            dims = "[B, T, 3, S, S]" if ndim == 5 else "[B, N, T, 3, S, S]"
            raise ValueError(f"frames must be {dims} with S={s}, got {tuple(frames.shape)}")

    def encode_video(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``frames [B, T, 3, S, S]`` (+ bool ``mask [B, T]``) → L2-normalised ``[B, D]``.

        Multi-clip input ``[B, N, T, 3, S, S]`` (+ ``[B, N, T]``) is aggregated with ``clip_aggregation``.
        """
        if isinstance(frames, torch.Tensor) and frames.ndim == 6:
            return self.embed_batch(frames, mask)
        self._check_frames(frames, 5)
        b, t = frames.shape[:2]
        if mask is not None:
            mask = torch.as_tensor(mask, device=frames.device).bool()
            if tuple(mask.shape) != (b, t):
                raise ValueError(f"mask must be [B, T] = {(b, t)}, got {tuple(mask.shape)}")
            if not bool(mask.any(1).all()):
                raise ValueError("every video needs at least one valid frame (a mask row is all False)")
            frames = repeat_last_valid(frames, mask)
        grid = self.video.forward_features(frames.permute(0, 2, 1, 3, 4))
        return F.normalize(self.video_proj(grid.mean(dim=(1, 2, 3))), dim=-1)

    def encode_clips(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, N, T, 3, S, S]`` (+ ``mask [B, N, T]``) → ``[B, N, D]``; clips without valid frames → 0."""
        self._check_frames(frames, 6)
        b, n, t = frames.shape[:3]
        if mask is None:
            mask = torch.ones(b, n, t, dtype=torch.bool, device=frames.device)
        mask = torch.as_tensor(mask, device=frames.device).bool()
        if tuple(mask.shape) != (b, n, t):
            raise ValueError(f"mask must be [B, N, T] = {(b, n, t)}, got {tuple(mask.shape)}")
        flat = mask.reshape(b * n, t)
        valid = flat.any(1)
        emb = self.encode_video(frames.reshape(b * n, *frames.shape[2:]), flat | ~valid.unsqueeze(1))
        return (emb * valid.unsqueeze(1).to(emb.dtype)).view(b, n, -1)

    def tokenize(self, texts: list[str] | torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, context_length]`` (token tensors are passed through after a shape check)."""
        if isinstance(texts, torch.Tensor):
            if texts.ndim != 2 or texts.shape[1] != self.context_length:
                raise ValueError(f"token tensor must be [B, {self.context_length}], got {tuple(texts.shape)}")
            return texts.long()
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError("captions must be a list of strings or a token tensor")
        if self.tokenizer is None:
            self.tokenizer = build_tokenizer(self.context_length)
        return self.tokenizer(list(texts), context_length=self.context_length).to(self.logit_scale.device)

    def encode_text(self, texts: list[str] | torch.Tensor) -> torch.Tensor:
        """Captions or token ids → L2-normalised ``[B, D]``."""
        return F.normalize(self.text(self.tokenize(texts)), dim=-1)

    def similarity(self, text_emb: torch.Tensor, video_emb: torch.Tensor) -> torch.Tensor:
        """Logits ``exp(logit_scale) · text · videoᵀ``, scale clamped at ln 100."""
        return losses.scaled_logits(text_emb, video_emb, self.logit_scale)

    def contrastive_loss(self, video_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Symmetric CrossEn over paired embeddings, gathered across workers with gradient."""
        return losses.contrastive_loss(video_emb, text_emb, self.logit_scale)

    def embed_batch(self, frames: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Video embedding of ``[B, T, ...]`` or aggregated ``[B, N, T, ...]`` frames."""
        if frames.ndim == 6:
            return self.video_from_clips(self.encode_clips(frames, mask), mask)
        return self.encode_video(frames, mask)

    def video_from_clips(self, clip_emb: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Video embedding aggregated from ``encode_clips`` output (``mask [B, N, T]``), without a second
        forward: what the embed job stores beside the clip rows."""
        clip_mask = None if mask is None else torch.as_tensor(mask, device=clip_emb.device).bool().any(-1)
        return losses.aggregate_clips(clip_emb, clip_mask, self.clip_aggregation)

    def loss(
        self, video_frames: torch.Tensor, mask: torch.Tensor | None, captions: list[str]
    ) -> torch.Tensor:
        """Symmetric CrossEn for a batch of paired (video, caption)."""
        if len(captions) != video_frames.shape[0]:
            raise ValueError(f"{len(captions)} captions for {video_frames.shape[0]} videos")
        return self.contrastive_loss(self.embed_batch(video_frames, mask), self.encode_text(captions))

    def forward(
        self, video_frames: torch.Tensor, mask: torch.Tensor | None, captions: list[str]
    ) -> torch.Tensor:
        return self.loss(video_frames, mask, captions)


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


def build_vidswin_dual_encoder(
    config: dict[str, Any],
    pretrained: str | os.PathLike | None = None,
    video_pretrained: str | os.PathLike | None = None,
    video_pretrained_source: str | None = None,
    text_pretrained: str | os.PathLike | None = None,
    **overrides: Any,
):
    """Registry builder: ``(VidSwinDualEncoder, VideoTransform, SimpleTokenizer)``."""
    cfg = copy.deepcopy(config)
    for key, value in overrides.items():
        if key in ("text_cfg", "video_overrides") and isinstance(value, dict):
            cfg[key] = {**cfg.get(key, {}), **value}
        else:
            cfg[key] = value
    cache_dir = cfg.pop("cache_dir", None)
    payload = None
    if pretrained is not None:
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(
                f"pretrained {str(pretrained)!r} is not a file; the dual encoder takes a vidsift checkpoint "
                "pretrained= (use text_pretrained= / video_pretrained= to initialise one tower)"
            )
        payload = load_checkpoint(pretrained)  # clear error for foreign / unreadable files
        flag = payload["state_dict"].get("quick_gelu_flag")
        if flag is not None:
            cfg["quick_gelu"] = bool(int(flag))
    text_weights = None
    if payload is None and text_pretrained is not None:
        # checked and fetched before building, so a bad tag / unreachable hub fails fast
        text_weights, tag_cfg = resolve_clip_weights(cfg.get("open_clip_arch"), text_pretrained, cache_dir)
        if "quick_gelu" in tag_cfg:
            cfg["quick_gelu"] = bool(tag_cfg["quick_gelu"])
    model = VidSwinDualEncoder(cfg)
    if payload is not None:
        try:
            model.load_state_dict(payload["state_dict"], strict=True)
        except RuntimeError as exc:
            raise PretrainedWeightsError(
                f"vidsift checkpoint {str(pretrained)!r} (model {payload.get('model_name')!r}) does not fit "
                f"dual encoder config: {str(exc).splitlines()[0]} ..."
            ) from exc
    else:
        if video_pretrained is not None:
            from models.video_swin import load_pretrained

            load_pretrained(model.video, video_pretrained, video_pretrained_source or "vidsift")
        if text_pretrained is not None:
            load_text_tower(model, text_weights)
    model.pretrained = None if pretrained is None else str(pretrained)
    tokenizer = build_tokenizer(model.context_length)
    model.tokenizer = tokenizer
    return model.eval(), VideoTransform(model.image_size, IMAGENET_MEAN, IMAGENET_STD), tokenizer


DUAL_ENCODER_CONFIGS: dict[str, dict[str, Any]] = {
    "vidswin-t-cliptext": {
        "video_backbone": "video-swin-t",
        "video_overrides": {},
        "open_clip_arch": "ViT-B-32",
        "embed_dim": 512,
        "quick_gelu": True,
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
        "num_frames": 16,
    },
    # CPU-trainable: 32 px, 8 frames, Swin C=16 (8C = 128) → 64-d shared space.
    "vidswin-tiny-cliptext": {
        "video_backbone": "video-swin-tiny",
        "video_overrides": {"image_size": 32},
        "open_clip_arch": None,
        "embed_dim": 64,
        "quick_gelu": False,
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
        "num_frames": 8,
    },
    # swinbert-tiny's backbone exactly (64 px, 8 frames, C=16): retrieval pre-training for the captioner,
    # loaded with create_model("swinbert-tiny", backbone_pretrained=<this model's checkpoint>).
    "vidswin-tiny64-cliptext": {
        "video_backbone": "video-swin-tiny",
        "video_overrides": {},
        "open_clip_arch": None,
        "embed_dim": 64,
        "quick_gelu": False,
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
        "num_frames": 8,
    },
}

for _name, _cfg in DUAL_ENCODER_CONFIGS.items():
    register_model(_name, "dual_encoder", _cfg, build_vidswin_dual_encoder)

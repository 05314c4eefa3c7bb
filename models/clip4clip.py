"""CLIP4Clip (Luo et al., 2021) on open_clip: CLIP image tower per frame + a temporal similarity head.

Video = T frames → projected CLS feature per frame (2D patches, or the paper's 3D linear patch) → one of
four heads:

* ``meanP``: L2-normalise frames, masked mean, L2-normalise.
* ``seqLSTM``: 1-layer LSTM over the valid frames, residual, then meanP.
* ``seqTransf``: frame position embeddings (initialised from CLIP's text positional embedding) + up to 4
  transformer blocks copied from the first CLIP text blocks, masked, residual, then meanP.
* ``tightTransf``: a cross-encoder over (projected text tokens + frame features) that returns one score per
  (text, video) pair, for reranking; its first-stage embeddings are the meanP ones.

Text = projected EOT token of CLIP's text transformer. Logits = exp(logit_scale)·t·vᵀ, scale clamped at ln100.

3D linear patch: ``Conv3d(3, width, (3, p, p), stride (1, p, p), padding (1, 0, 0))`` inflated from CLIP's 2D
patch kernel. ``patch3d_init="center"`` (the paper's choice, default) puts the 2D kernel in the centre time
slot and zeros elsewhere, so a static clip embeds exactly like its frame; ``"average"`` puts 1/3 of the kernel
in each slot (equal to 2D on interior frames of a static clip, not at the zero-padded ends).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.model import CLIP

from models import losses
from models.pretrained import (
    PretrainedWeightsError,
    is_torchscript_archive,
    load_clip_state_dict,
    read_state_dict_file,
    resolve_clip_weights,
)
from models.registry import load_checkpoint, register_model
from models.transforms import VideoTransform, build_tokenizer

SIM_HEADERS = ("meanP", "seqLSTM", "seqTransf", "tightTransf")
MASK_NEG = -1e4  # additive attention mask value; finite so fully-masked rows stay NaN-free

# --------------------------------------------------------------------------------------------- helpers


def masked_mean_normalized(frame_feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """meanP: L2-normalise frames ``[B, T, D]``, average the valid ones (``mask [B, T]``), L2-normalise."""
    x = F.normalize(frame_feats, dim=-1)
    m = mask.to(x.dtype).unsqueeze(-1)
    x = (x * m).sum(1) / m.sum(1).clamp(min=1.0)
    return F.normalize(x, dim=-1)


def key_padding_attn_mask(key_valid: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``[B * heads, L, L]`` that hides invalid keys (open_clip blocks are batch-first MHA)."""
    b, length = key_valid.shape
    add = torch.zeros(b, 1, 1, length, dtype=dtype, device=key_valid.device)
    add = add.masked_fill(~key_valid.view(b, 1, 1, length), MASK_NEG)
    return add.expand(b, num_heads, length, length).reshape(b * num_heads, length, length)


def _merge_config(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    cfg = copy.deepcopy(config)
    for key, value in overrides.items():
        if key in ("vision_cfg", "text_cfg") and isinstance(value, dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


# --------------------------------------------------------------------------------------------- blocks


class CrossEncoder(nn.Module):
    """tightTransf: joint transformer over [text tokens; frame features] → one matching score per pair."""

    def __init__(self, width: int, layers: int, heads: int, max_text: int, max_frames: int):
        super().__init__()
        from open_clip.transformer import Transformer

        self.heads = heads
        self.type_embedding = nn.Embedding(2, width)
        self.text_position = nn.Embedding(max_text, width)
        self.frame_position = nn.Embedding(max_frames, width)
        self.transformer = Transformer(width, layers, heads)
        self.ln = nn.LayerNorm(width)
        self.score = nn.Linear(width, 1)
        nn.init.normal_(self.type_embedding.weight, std=0.02)
        nn.init.normal_(self.text_position.weight, std=0.01)
        nn.init.normal_(self.frame_position.weight, std=0.01)

    def forward(
        self,
        text_tokens: torch.Tensor,
        text_valid: torch.Tensor,
        frames: torch.Tensor,
        frame_valid: torch.Tensor,
    ) -> torch.Tensor:
        """Paired inputs ``[P, L, D]``/``[P, L]`` and ``[P, T, D]``/``[P, T]`` → scores ``[P]``."""
        length, t = text_tokens.shape[1], frames.shape[1]
        pos_t = self.text_position(torch.arange(length, device=text_tokens.device))
        pos_v = self.frame_position(torch.arange(t, device=frames.device))
        x = torch.cat(
            [
                text_tokens + pos_t + self.type_embedding.weight[0],
                frames + pos_v + self.type_embedding.weight[1],
            ],
            1,
        )
        valid = torch.cat([text_valid, frame_valid], 1)
        x = self.transformer(x, attn_mask=key_padding_attn_mask(valid, self.heads, x.dtype))
        return self.score(self.ln(x[:, 0])).squeeze(-1)


# --------------------------------------------------------------------------------------------- model


class CLIP4Clip(nn.Module):
    """CLIP4Clip retrieval model; see the module docstring; ``config`` is plain data."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = copy.deepcopy(config)
        self.sim_header = config.get("sim_header", "meanP")
        if self.sim_header not in SIM_HEADERS:
            raise ValueError(f"sim_header {self.sim_header!r} is not one of {SIM_HEADERS}")
        self.linear_patch = config.get("linear_patch", "2d")
        if self.linear_patch not in ("2d", "3d"):
            raise ValueError(f"linear_patch {self.linear_patch!r} must be '2d' or '3d'")
        self.patch3d_init = config.get("patch3d_init", "center")
        if self.patch3d_init not in ("center", "average"):
            raise ValueError(f"patch3d_init {self.patch3d_init!r} must be 'center' or 'average'")
        self.max_frames = int(config.get("max_frames", 12))
        self.num_frames = int(config.get("num_frames", 8))  # default frames per clip for samplers
        self.clip_aggregation = config.get("clip_aggregation", "mean")
        if self.clip_aggregation not in losses.CLIP_AGGREGATIONS:
            raise ValueError(
                f"clip_aggregation {self.clip_aggregation!r} is not one of {losses.CLIP_AGGREGATIONS}"
            )
        self.clip = CLIP(
            embed_dim=config["embed_dim"],
            vision_cfg=config["vision_cfg"],
            text_cfg=config["text_cfg"],
            quick_gelu=bool(config.get("quick_gelu", False)),
            nonscalar_logit_scale=True,  # 1-element, not 0-d: the registry digests tensors as bytes
        )
        # persisted so a vidsift checkpoint rebuilds with the activation its weights were trained with
        self.register_buffer("quick_gelu_flag", torch.tensor([int(bool(config.get("quick_gelu", False)))]))
        visual = self.clip.visual
        if not hasattr(visual, "conv1"):
            raise ValueError("CLIP4Clip needs a ViT image tower (open_clip VisionTransformer)")
        embed_dim = int(config["embed_dim"])
        text_width = int(self.clip.transformer.width)
        self.embed_dim = embed_dim
        self.image_size = int(visual.image_size[0])
        self.context_length = int(self.clip.context_length)
        self.tokenizer = (
            None  # set by the builder (open_clip SimpleTokenizer); encode_text(list[str]) needs it
        )

        if self.linear_patch == "3d":
            width, patch = visual.conv1.out_channels, visual.conv1.kernel_size
            self.conv2 = nn.Conv3d(3, width, (3, *patch), stride=(1, *patch), padding=(1, 0, 0), bias=False)
        if self.sim_header == "seqLSTM":
            self.lstm_visual = nn.LSTM(embed_dim, embed_dim, num_layers=1, batch_first=True)
        if self.sim_header == "seqTransf":
            if text_width != embed_dim:
                raise ValueError(
                    f"seqTransf copies CLIP text blocks onto frames: text width {text_width} must equal "
                    f"embed_dim {embed_dim}"
                )
            if self.max_frames > self.context_length:
                raise ValueError(
                    f"max_frames {self.max_frames} exceeds the text context {self.context_length}"
                )
            n_layers = min(int(config.get("seq_layers", 4)), len(self.clip.transformer.resblocks))
            self.frame_position_embeddings = nn.Embedding(self.max_frames, embed_dim)
            self.transformer_clip = nn.ModuleList(
                copy.deepcopy(self.clip.transformer.resblocks[i]) for i in range(n_layers)
            )
        if self.sim_header == "tightTransf":
            heads = int(config.get("cross_heads", max(1, embed_dim // 64)))
            self.cross = CrossEncoder(
                embed_dim, int(config.get("cross_layers", 4)), heads, self.context_length, self.max_frames
            )
        self.init_from_clip()

    # ------------------------------------------------------------------ initialisation from CLIP weights

    @torch.no_grad()
    def init_from_clip(self) -> None:
        """(Re)initialise the new modules from the current CLIP weights (call after loading CLIP weights)."""
        if self.linear_patch == "3d":
            w2d = self.clip.visual.conv1.weight
            w3d = torch.zeros_like(self.conv2.weight)
            if self.patch3d_init == "center":
                w3d[:, :, 1] = w2d
            else:
                w3d[:] = (w2d / 3.0).unsqueeze(2)
            self.conv2.weight.copy_(w3d)
        if self.sim_header == "seqTransf":
            self.frame_position_embeddings.weight.copy_(self.clip.positional_embedding[: self.max_frames])
            for i, block in enumerate(self.transformer_clip):
                block.load_state_dict(self.clip.transformer.resblocks[i].state_dict())

    def new_module_prefixes(self) -> tuple[str, ...]:
        """Parameter-name prefixes of modules that are not part of CLIP (trained at the head lr)."""
        return ("conv2.", "lstm_visual.", "frame_position_embeddings.", "transformer_clip.", "cross.")

    def param_groups(
        self, lr: float, backbone_lr: float | None = None, weight_decay: float = 0.0
    ) -> list[dict]:
        """Optimizer groups: CLIP backbone at ``backbone_lr`` (default ``lr``) and new modules at ``lr``.

        Gains, biases and embeddings/logit scale skip weight decay (as in CLIP4Clip/open_clip).
        """
        backbone_lr = lr if backbone_lr is None else backbone_lr
        groups: dict[tuple[str, bool], list] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            new = name.startswith(self.new_module_prefixes())
            no_decay = (
                param.ndim < 2 or "embedding" in name or name.endswith(("logit_scale", "class_embedding"))
            )
            groups.setdefault(("new" if new else "backbone", no_decay), []).append(param)
        out = []
        for (kind, no_decay), params in sorted(groups.items()):
            out.append(
                {
                    "name": f"{kind}{'_no_decay' if no_decay else ''}",
                    "params": params,
                    "lr": lr if kind == "new" else backbone_lr,
                    "weight_decay": 0.0 if no_decay else weight_decay,
                }
            )
        return out

    # ------------------------------------------------------------------ towers

    def _check_frames(self, frames: torch.Tensor, ndim: int, what: str) -> None:
        s = self.image_size
        if not isinstance(frames, torch.Tensor) or not frames.is_floating_point():
            raise TypeError(f"{what} must be a float tensor (apply the model's transform to uint8 frames)")
        if frames.ndim != ndim or tuple(frames.shape[-3:]) != (3, s, s):
            dims = "[B, T, 3, S, S]" if ndim == 5 else "[B, N, T, 3, S, S]"
            raise ValueError(f"{what} must be {dims} with S={s}, got {tuple(frames.shape)}")

    def _visual_from_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """open_clip VisionTransformer.forward after conv1: ``[N, W, g, g]`` → projected CLS ``[N, D]``."""
        from open_clip.transformer import _expand_token

        visual = self.clip.visual
        x = patches.reshape(patches.shape[0], patches.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([_expand_token(visual.class_embedding, x.shape[0]).to(x.dtype), x], dim=1)
        x = x + visual.positional_embedding.to(x.dtype)
        x = visual.patch_dropout(x)
        x = visual.ln_pre(x)
        x = visual.transformer(x)
        pooled, _ = visual._pool(x)
        return pooled @ visual.proj if visual.proj is not None else pooled

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Per-frame projected CLS features (not normalised): ``[B, T, 3, S, S]`` → ``[B, T, D]``."""
        self._check_frames(frames, 5, "frames")
        b, t = frames.shape[:2]
        if self.linear_patch == "2d":
            return self.clip.visual(frames.flatten(0, 1)).view(b, t, -1)
        x = self.conv2(frames.permute(0, 2, 1, 3, 4))  # [B, W, T, g, g]
        x = x.permute(0, 2, 1, 3, 4).flatten(0, 1)  # [B*T, W, g, g]
        return self._visual_from_patches(x).view(b, t, -1)

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
        device = self.clip.logit_scale.device
        return self.tokenizer(list(texts), context_length=self.context_length).to(device)

    def encode_text_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP text tower: ``(EOT feature [B, D], projected token features [B, L, D])``, unnormalised."""
        from open_clip.transformer import text_global_pool

        clip = self.clip
        x = clip.token_embedding(tokens) + clip.positional_embedding
        x = clip.transformer(x, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)
        proj = clip.text_projection
        seq = x @ proj if isinstance(proj, torch.Tensor) else (proj(x) if proj is not None else x)
        pooled = text_global_pool(
            seq, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None)
        )
        return pooled, seq

    # ------------------------------------------------------------------ heads

    def _temporal_head(self, frame_feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Frame features ``[B, T, D]`` → normalised video embedding ``[B, D]`` through the sim head."""
        if self.sim_header == "seqLSTM":
            # compact valid frames to the front (stable), pack, run the LSTM, residual
            order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
            feats = torch.gather(frame_feats, 1, order.unsqueeze(-1).expand_as(frame_feats))
            lengths = mask.sum(1).clamp(min=1).cpu()
            packed = nn.utils.rnn.pack_padded_sequence(feats, lengths, batch_first=True, enforce_sorted=False)
            out, _ = self.lstm_visual(packed)
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=feats.shape[1])
            frame_feats = out + feats
            mask = torch.gather(mask, 1, order)
        elif self.sim_header == "seqTransf":
            t = frame_feats.shape[1]
            if t > self.max_frames:
                raise ValueError(f"seqTransf supports at most max_frames={self.max_frames} frames, got {t}")
            pos = self.frame_position_embeddings(torch.arange(t, device=frame_feats.device))
            x = frame_feats + pos
            heads = self.transformer_clip[0].attn.num_heads if len(self.transformer_clip) else 1
            attn_mask = key_padding_attn_mask(mask, heads, x.dtype)
            for block in self.transformer_clip:
                x = block(x, attn_mask=attn_mask)
            frame_feats = x + frame_feats
        return masked_mean_normalized(frame_feats, mask)

    def _frame_mask(self, mask: torch.Tensor | None, b: int, t: int, device) -> torch.Tensor:
        if mask is None:
            return torch.ones(b, t, dtype=torch.bool, device=device)
        mask = torch.as_tensor(mask, device=device).to(torch.bool)
        if tuple(mask.shape) != (b, t):
            raise ValueError(f"mask must be [B, T] = {(b, t)}, got {tuple(mask.shape)}")
        return mask

    # ------------------------------------------------------------------ public API

    def encode_video(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``frames [B, T, 3, S, S]`` (+ bool ``mask [B, T]``) → L2-normalised ``[B, D]``.

        Multi-clip input ``[B, N, T, 3, S, S]`` (+ ``[B, N, T]``) is aggregated with ``clip_aggregation``.
        """
        if isinstance(frames, torch.Tensor) and frames.ndim == 6:
            return self.embed_batch(frames, mask)
        self._check_frames(frames, 5, "frames")
        mask = self._frame_mask(mask, frames.shape[0], frames.shape[1], frames.device)
        if not bool(mask.any(1).all()):
            raise ValueError("every video needs at least one valid frame (a mask row is all False)")
        return self._temporal_head(self.encode_frames(frames), mask)

    def encode_clips(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``frames [B, N, T, 3, S, S]``, ``mask [B, N, T]`` → ``[B, N, D]``, one L2-normalised row per clip.

        A clip with no valid frame gets an all-zero row (``mask.any(-1)`` says which clips are real).
        """
        self._check_frames(frames, 6, "frames")
        b, n, t = frames.shape[:3]
        if mask is None:
            mask = torch.ones(b, n, t, dtype=torch.bool, device=frames.device)
        mask = torch.as_tensor(mask, device=frames.device).to(torch.bool)
        if tuple(mask.shape) != (b, n, t):
            raise ValueError(f"mask must be [B, N, T] = {(b, n, t)}, got {tuple(mask.shape)}")
        flat_mask = mask.reshape(b * n, t)
        clip_valid = flat_mask.any(1)
        safe_mask = flat_mask | ~clip_valid.unsqueeze(1)
        emb = self._temporal_head(self.encode_frames(frames.reshape(b * n, *frames.shape[2:])), safe_mask)
        emb = emb * clip_valid.unsqueeze(1).to(emb.dtype)
        return emb.view(b, n, -1)

    def encode_text(self, texts: list[str] | torch.Tensor) -> torch.Tensor:
        """Captions (list[str]) or token ids ``[B, L]`` → L2-normalised ``[B, D]``."""
        pooled, _ = self.encode_text_tokens(self.tokenize(texts))
        return F.normalize(pooled, dim=-1)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    def similarity(self, text_emb: torch.Tensor, video_emb: torch.Tensor) -> torch.Tensor:
        """Logits ``exp(logit_scale) · text · videoᵀ`` (``[Bt, Bv]``), scale clamped at ln 100."""
        return losses.scaled_logits(text_emb, video_emb, self.clip.logit_scale)

    def contrastive_loss(self, video_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Symmetric CrossEn over paired embeddings, gathered across workers with gradient."""
        return losses.contrastive_loss(video_emb, text_emb, self.clip.logit_scale)

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

    def cross_scores(
        self, texts: list[str] | torch.Tensor, frames: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tightTransf: cross-encoder score for every (text, video) pair → ``[Bt, Bv]`` (for reranking)."""
        if self.sim_header != "tightTransf":
            raise RuntimeError(f"cross_scores needs a tightTransf model, this one is {self.sim_header}")
        self._check_frames(frames, 5, "frames")
        tokens = self.tokenize(texts)
        mask = self._frame_mask(mask, frames.shape[0], frames.shape[1], frames.device)
        if frames.shape[1] > self.max_frames:
            raise ValueError(f"tightTransf supports at most max_frames={self.max_frames} frames")
        _, text_seq = self.encode_text_tokens(tokens)
        frame_feats = self.encode_frames(frames)
        # keep only positions up to the longest caption's EOT (the rest is padding)
        eot = tokens.argmax(dim=-1)
        length = int(eot.max()) + 1
        text_seq = text_seq[:, :length]
        text_valid = torch.arange(length, device=tokens.device).unsqueeze(0) <= eot.unsqueeze(1)
        bt, bv = text_seq.shape[0], frame_feats.shape[0]
        scores = self.cross(
            text_seq.unsqueeze(1).expand(bt, bv, *text_seq.shape[1:]).flatten(0, 1),
            text_valid.unsqueeze(1).expand(bt, bv, length).flatten(0, 1),
            frame_feats.unsqueeze(0).expand(bt, bv, *frame_feats.shape[1:]).flatten(0, 1),
            mask.unsqueeze(0).expand(bt, bv, mask.shape[1]).flatten(0, 1),
        )
        return scores.view(bt, bv)

    def loss(
        self, video_frames: torch.Tensor, mask: torch.Tensor | None, captions: list[str]
    ) -> torch.Tensor:
        """Training loss for a batch of paired (video, caption): symmetric CrossEn (+ cross-encoder CrossEn
        for tightTransf, which trains both its first-stage embeddings and its reranker)."""
        if len(captions) != video_frames.shape[0]:
            raise ValueError(f"{len(captions)} captions for {video_frames.shape[0]} videos")
        video_emb = self.embed_batch(video_frames, mask)
        text_emb = self.encode_text(captions)
        loss = self.contrastive_loss(video_emb, text_emb)
        if self.sim_header == "tightTransf":
            frames, frame_mask = video_frames, mask
            if frames.ndim == 6:  # the cross-encoder sees the first clip of each video
                frames = frames[:, 0]
                frame_mask = None if mask is None else torch.as_tensor(mask)[:, 0]
            loss = loss + losses.cross_entropy_sym(self.cross_scores(captions, frames, frame_mask))
        return loss

    def forward(
        self, video_frames: torch.Tensor, mask: torch.Tensor | None, captions: list[str]
    ) -> torch.Tensor:
        return self.loss(video_frames, mask, captions)


# --------------------------------------------------------------------------------------------- builder


def load_vidsift_weights(
    model: nn.Module, payload: dict[str, Any], path: str | os.PathLike, family: str
) -> None:
    """Load a ``models.save_checkpoint`` payload strictly; a clear error when it does not fit."""
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise PretrainedWeightsError(
            f"vidsift checkpoint {str(path)!r} (model {payload.get('model_name')!r}) does not fit this "
            f"{family} config: {str(exc).splitlines()[0]} ..."
        ) from exc


def build_clip4clip(config: dict[str, Any], pretrained: str | os.PathLike | None = None, **overrides: Any):
    """Registry builder: ``(CLIP4Clip, VideoTransform, SimpleTokenizer)`` with ``pretrained`` loaded."""
    cfg = _merge_config(config, overrides)
    cache_dir = cfg.pop("cache_dir", None)
    payload = None
    if pretrained is not None and os.path.isfile(pretrained) and not is_torchscript_archive(pretrained):
        try:
            payload = load_checkpoint(pretrained)
        except ValueError:
            payload = None  # not a vidsift checkpoint: CLIP weights (state dict / TorchScript), below
    if payload is not None:
        flag = payload["state_dict"].get("quick_gelu_flag")
        if flag is not None:
            cfg["quick_gelu"] = bool(int(flag))
        model = CLIP4Clip(cfg)
        load_vidsift_weights(model, payload, pretrained, "clip4clip")
    elif pretrained is not None:
        weights, tag_cfg = resolve_clip_weights(cfg.get("open_clip_arch"), pretrained, cache_dir=cache_dir)
        if "quick_gelu" in tag_cfg:  # build with the activation the tagged weights were trained with
            cfg["quick_gelu"] = bool(tag_cfg["quick_gelu"])
        model = CLIP4Clip(cfg)
        load_clip_state_dict(model.clip, read_state_dict_file(weights), source=repr(str(pretrained)))
        model.init_from_clip()
    else:
        model = CLIP4Clip(cfg)
    model.pretrained = None if pretrained is None else str(pretrained)
    tokenizer = build_tokenizer(model.context_length)
    model.tokenizer = tokenizer
    transform = VideoTransform(model.image_size)
    return model.eval(), transform, tokenizer


# --------------------------------------------------------------------------------------------- configs

_VIT_B_32 = {
    "open_clip_arch": "ViT-B-32",
    "embed_dim": 512,
    "quick_gelu": True,  # OpenAI CLIP (CLIP4Clip's init) was trained with QuickGELU
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
    "max_frames": 12,
    "num_frames": 12,
}
_VIT_B_16 = {
    **_VIT_B_32,
    "open_clip_arch": "ViT-B-16",
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
}
# Tiny: trains from scratch on 2 CPU cores (32 px frames, 4x4 patches of 8 px).
_TINY = {
    "open_clip_arch": None,
    "embed_dim": 64,
    "quick_gelu": False,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    "max_frames": 16,
    "num_frames": 8,
    "seq_layers": 2,
    "cross_layers": 2,
    "cross_heads": 2,
}

CLIP4CLIP_CONFIGS: dict[str, dict[str, Any]] = {
    "clip4clip-meanP-ViT-B-32": {**_VIT_B_32, "sim_header": "meanP"},
    "clip4clip-seqLSTM-ViT-B-32": {**_VIT_B_32, "sim_header": "seqLSTM"},
    "clip4clip-seqTransf-ViT-B-32": {**_VIT_B_32, "sim_header": "seqTransf"},
    "clip4clip-tightTransf-ViT-B-32": {**_VIT_B_32, "sim_header": "tightTransf", "cross_layers": 4},
    "clip4clip-meanP-ViT-B-16": {**_VIT_B_16, "sim_header": "meanP"},
    "clip4clip-seqTransf-ViT-B-16": {**_VIT_B_16, "sim_header": "seqTransf"},
    "clip4clip-meanP-tiny": {**_TINY, "sim_header": "meanP"},
    "clip4clip-seqLSTM-tiny": {**_TINY, "sim_header": "seqLSTM"},
    "clip4clip-seqTransf-tiny": {**_TINY, "sim_header": "seqTransf"},
    "clip4clip-tightTransf-tiny": {**_TINY, "sim_header": "tightTransf"},
    "clip4clip-meanP-3d-tiny": {**_TINY, "sim_header": "meanP", "linear_patch": "3d"},
    # 32 px frames with 4 px tube patches (8 x 8 tokens): the 8 px model's misses are circle <-> square; finer
    # tubes see the outline. The model of issue #6's 10-minute result (configs/train/tiny-meanP-3d-p4.yaml).
    "clip4clip-meanP-3d-tiny-p4": {
        **_TINY, "sim_header": "meanP", "linear_patch": "3d",
        "vision_cfg": {**_TINY["vision_cfg"], "patch_size": 4},
    },
    # 64 px frames with 16 px tube patches: the same 4 x 4 tokens (same cost per step) but 4x the pixels per
    # shape, so small circles and squares stop looking alike (the 32 px model's main error).
    "clip4clip-meanP-3d-tiny64": {
        **_TINY, "sim_header": "meanP", "linear_patch": "3d",
        "vision_cfg": {**_TINY["vision_cfg"], "image_size": 64, "patch_size": 16},
    },
}

for _name, _cfg in CLIP4CLIP_CONFIGS.items():
    register_model(_name, "clip4clip", _cfg, build_clip4clip)

# The VidSwin dual encoder registers itself on import; the registry imports this module.
import models.dual_encoder  # noqa: E402,F401

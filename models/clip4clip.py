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
from open_clip.transformer import Transformer, _expand_token, text_global_pool

from models import losses
from models.base import RetrievalModel
from models.checkpoint import load_checkpoint, load_state_strict, read_pretrained_checkpoint
from models.pretrained import (
    PretrainedWeightsMismatch,
    is_torchscript_archive,
    load_clip_state_dict,
    read_state_dict_file,
    resolve_clip_weights,
    resolve_weights,
)
from models.registry import merge_config
from models.transforms import CLIP_MEAN, CLIP_STD, VideoTransform, build_tokenizer

SIM_HEADERS = ("meanP", "seqLSTM", "seqTransf", "tightTransf")
MASK_NEG = -1e4  # additive attention mask value; finite so fully-masked rows stay NaN-free
# Every key a CLIP4Clip config may hold (create_model overrides outside these are rejected).
CONFIG_KEYS = (
    "open_clip_arch", "embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "max_frames", "num_frames",
    "sim_header", "linear_patch", "patch3d_init", "seq_layers", "cross_layers", "cross_heads",
    "clip_aggregation",
)

# --------------------------------------------------------------------------------------------- helpers


def visual_from_patches(visual: nn.Module, patches: torch.Tensor) -> torch.Tensor:
    """open_clip VisionTransformer.forward after conv1: ``[N, W, g, g]`` → projected CLS ``[N, D]``."""
    x = patches.reshape(patches.shape[0], patches.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([_expand_token(visual.class_embedding, x.shape[0]).to(x.dtype), x], dim=1)
    x = x + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)
    x = visual.ln_pre(x)
    x = visual.transformer(x)
    pooled, _ = visual._pool(x)
    return pooled @ visual.proj if visual.proj is not None else pooled


def frame_features(visual: nn.Module, conv2: nn.Module | None, frames: torch.Tensor) -> torch.Tensor:
    """The video tower: frames ``[B, T, 3, S, S]`` → per-frame projected CLS ``[B, T, D]``, through CLIP's 2D
    patch embedding, or through the 3D linear patch ``conv2`` (each frame's tokens see its neighbours)."""
    b, t = frames.shape[:2]
    if conv2 is None:
        return visual(frames.flatten(0, 1)).view(b, t, -1)
    x = conv2(frames.permute(0, 2, 1, 3, 4))  # [B, W, T, g, g]
    x = x.permute(0, 2, 1, 3, 4).flatten(0, 1)  # [B*T, W, g, g]
    return visual_from_patches(visual, x).view(b, t, -1)


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


# --------------------------------------------------------------------------------------------- blocks


class CrossEncoder(nn.Module):
    """tightTransf: joint transformer over [text tokens; frame features] → one matching score per pair."""

    def __init__(self, width: int, layers: int, heads: int, max_text: int, max_frames: int):
        super().__init__()
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


class CLIP4Clip(RetrievalModel):
    """CLIP4Clip retrieval model; see the module docstring; ``config`` is plain data."""

    NO_DECAY_SUFFIXES = ("logit_scale", "class_embedding")

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        self.config = copy.deepcopy(config)
        self._read_options(config)
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
        self.embed_dim = int(config["embed_dim"])
        self.image_size = int(visual.image_size[0])
        self.context_length = int(self.clip.context_length)
        self._build_new_modules(config)
        self.init_from_clip()

    def _read_options(self, config: dict[str, Any]) -> None:
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

    def _build_new_modules(self, config: dict[str, Any]) -> None:
        """The modules CLIP does not have: 3D patch, LSTM, frame transformer or cross-encoder."""
        embed_dim, text_width = self.embed_dim, int(self.clip.transformer.width)
        if self.linear_patch == "3d":
            width, patch = self.clip.visual.conv1.out_channels, self.clip.visual.conv1.kernel_size
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

    # ------------------------------------------------------------------ towers

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Per-frame projected CLS features (not normalised): ``[B, T, 3, S, S]`` → ``[B, T, D]``."""
        self._check_frames(frames, 5, "frames")
        return frame_features(self.clip.visual, getattr(self, "conv2", None), frames)

    def encode_text_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP text tower: ``(EOT feature [B, D], projected token features [B, L, D])``, unnormalised."""
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

    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Projected EOT feature ``[B, D]`` (unnormalised)."""
        return self.encode_text_tokens(tokens)[0]

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

    def video_embedding(self, frames: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Frames ``[B, T, 3, S, S]`` (checked mask or ``None``) → the sim head's normalised ``[B, D]``."""
        mask = self._frame_mask(mask, frames.shape[0], frames.shape[1], frames.device)
        return self._temporal_head(self.encode_frames(frames), mask)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

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
        loss = super().loss(video_frames, mask, captions)
        if self.sim_header == "tightTransf":
            frames, frame_mask = video_frames, mask
            if frames.ndim == 6:  # the cross-encoder sees the first clip of each video
                frames = frames[:, 0]
                frame_mask = None if mask is None else torch.as_tensor(mask)[:, 0]
            loss = loss + losses.cross_entropy_sym(self.cross_scores(captions, frames, frame_mask))
        return loss


class CLIP4ClipVideoTower(nn.Module):
    """CLIP4Clip's video tower alone, as a captioner's backbone (CLIP4Caption, Tang et al. 2021: caption from
    the frame features of a retrieval-trained video encoder). ``forward_features`` maps frames
    ``[B, 3, T, S, S]`` (Video Swin's layout) to the per-frame projected CLS features as a ``[B, T, 1, 1, D]``
    token grid: the features meanP averages into the retrieval embedding. Its state dict keys are the
    retrieval model's (``clip.visual.*``, ``conv2.*``), so a trained checkpoint loads by key
    (:func:`load_video_tower`)."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        full = CLIP4Clip(config)  # built whole, then trimmed to the video tower: the same init and key names
        self.clip = nn.ModuleDict({"visual": full.clip.visual})
        self.conv2 = getattr(full, "conv2", None)
        self.num_features = full.embed_dim
        self.image_size = full.image_size
        self.source_config = copy.deepcopy(config)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.permute(0, 2, 1, 3, 4)  # [B, 3, T, S, S] -> [B, T, 3, S, S]
        feats = frame_features(self.clip["visual"], self.conv2, frames)
        return feats[:, :, None, None, :]


def load_video_tower(tower: CLIP4ClipVideoTower, path: str | os.PathLike) -> None:
    """Load the video tower of a trained CLIP4Clip checkpoint (``jobs.train``, any store) into ``tower``:
    every tower key must be in the checkpoint with the same shape (its text tower is not read)."""
    payload = read_pretrained_checkpoint(path)
    state = payload["state_dict"]
    want = tower.state_dict()
    missing = sorted(k for k in want if k not in state)
    wrong = sorted(k for k in want if k in state and state[k].shape != want[k].shape)
    if missing or wrong:
        raise PretrainedWeightsMismatch(
            f"checkpoint {str(path)!r} (model {payload.get('model_name')!r}) holds no CLIP4Clip video tower "
            f"of this config: missing {missing[:3]}, other shapes {wrong[:3]}"
        )
    flag, quick = state.get("quick_gelu_flag"), bool(tower.source_config.get("quick_gelu", False))
    if flag is not None and bool(int(flag)) != quick:
        raise PretrainedWeightsMismatch(
            f"checkpoint {str(path)!r} was trained with quick_gelu={bool(int(flag))}; this tower's config "
            f"says {quick}"
        )
    tower.load_state_dict({k: state[k] for k in want}, strict=True)


# --------------------------------------------------------------------------------------------- weights


def _vidsift_payload(pretrained: str | os.PathLike | None) -> dict[str, Any] | None:
    """The payload when ``pretrained`` is a vidsift checkpoint, else ``None`` (CLIP weights or a tag)."""
    if pretrained is None:
        return None
    path = resolve_weights(pretrained)  # a remote checkpoint: its local cached copy
    if not path.is_file() or is_torchscript_archive(path):
        return None
    try:
        return load_checkpoint(pretrained)
    except ValueError:
        return None  # not a vidsift checkpoint: CLIP weights (state dict / TorchScript)


def _model_with_weights(
    cfg: dict[str, Any], pretrained: str | os.PathLike | None, cache_dir: str | None
) -> CLIP4Clip:
    """Build ``cfg`` and load ``pretrained``: a vidsift checkpoint, CLIP weights (file or open_clip tag)."""
    payload = _vidsift_payload(pretrained)
    if payload is not None:
        flag = payload["state_dict"].get("quick_gelu_flag")
        if flag is not None:
            cfg["quick_gelu"] = bool(int(flag))
        model = CLIP4Clip(cfg)
        load_state_strict(model, payload, pretrained, "clip4clip")
        return model
    if pretrained is None:
        return CLIP4Clip(cfg)
    weights, tag_cfg = resolve_clip_weights(cfg.get("open_clip_arch"), pretrained, cache_dir=cache_dir)
    if "quick_gelu" in tag_cfg:  # build with the activation the tagged weights were trained with
        cfg["quick_gelu"] = bool(tag_cfg["quick_gelu"])
    model = CLIP4Clip(cfg)
    load_clip_state_dict(model.clip, read_state_dict_file(weights), source=repr(str(pretrained)))
    model.init_from_clip()
    return model


# --------------------------------------------------------------------------------------------- builder


def build_clip4clip(
    name: str,
    config: dict[str, Any],
    pretrained: str | os.PathLike | None = None,
    cache_dir: str | None = None,
    **overrides: Any,
):
    """Factory builder: ``(CLIP4Clip, VideoTransform, SimpleTokenizer)`` with ``pretrained`` loaded.

    ``pretrained``: a vidsift checkpoint, an open_clip / OpenAI CLIP weights file, or an open_clip tag of the
    config's ``open_clip_arch`` (downloaded into ``cache_dir``).
    """
    cfg = merge_config(name, config, overrides, CONFIG_KEYS)
    model = _model_with_weights(cfg, pretrained, cache_dir)
    model.pretrained = None if pretrained is None else str(pretrained)
    tokenizer = build_tokenizer(model.context_length)
    model.tokenizer = tokenizer
    transform = VideoTransform(model.image_size, CLIP_MEAN, CLIP_STD, interpolation="bicubic")
    return model.eval(), transform, tokenizer

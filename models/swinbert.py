"""SwinBERT (Lin et al., CVPR 2022): end-to-end video captioning on a Video Swin backbone.

Video Swin token grid ``[B, T/2, H/32, W/32, 8C]`` → flatten → linear projection to the hidden size →
a multimodal transformer over ``[caption tokens; video tokens]`` with SwinBERT's attention pattern
(the backbone may instead be the video tower of a trained CLIP4Clip, CLIP4Caption style: one token per
frame, its projected CLS feature; ``{"clip4clip": NAME}`` in the config, see :func:`build_backbone`):

* caption → caption: causal (token ``i`` sees tokens ``<= i``);
* caption → video: full (every valid video token);
* video → caption: never;
* video → video: through the **learnable sparse attention mask** ``M = sigmoid(W)`` (``W`` is ``L x L``
  over the video tokens, the diagonal fixed to 1). It is applied *soft* by adding ``log M`` to the
  attention logits, i.e. each attention weight is multiplied by ``M`` and renormalised (the original adds
  ``-10000·(1-M)``, which saturates for any ``M`` much below 1; ``log M`` keeps the gradient informative).
  With ``sparse_mask_hard_inference`` the mask is thresholded at 0.5 in eval mode (kept where ``M >= 0.5``).
  An L1 loss ``mean(M off the diagonal)`` times ``sparsity_weight`` pushes it sparse. When the number of
  frames differs from the configured one, ``M`` is linearly interpolated along both time axes.

Because video tokens never look at caption tokens, the model runs as two streams sharing every weight:
the video stream (self-attention under ``M``) is computed once per video and cached
(:class:`VideoContext`); the caption stream attends to ``[captions; cached video states]`` of the same
layer. This is exactly the joint attention above, and makes decoding and scoring cheap.

Training objective: masked language modelling with the causal caption mask (SwinBERT): a fraction
``mask_prob`` of the caption tokens (at least 1, at most ``max_masked_tokens``; the end-of-sentence token
is maskable, the start token is not) are replaced 80% by ``[MASK]``, 10% by a random token, 10% kept,
and predicted. Generation appends a trailing ``[MASK]`` and predicts it — the same input pattern.

Tokenizer: :class:`models.caption_tokenizer.CaptionTokenizer` (open_clip's BPE + ``[MASK]``, ``[PAD]``:
49,410 ids); the softmax over them is evaluated only at masked / decoded positions, so it stays cheap on CPU.
Greedy and beam search: :mod:`models.caption_decoding`. The in-process training loop for tests and demos:
:func:`pipeline.training.captioner.train_captioner`.

File layout (timm style): helpers → blocks → model → checkpoint filter → registrations (the factory's
builder; configs are data: ``models/configs/swinbert-*.json``).
"""


from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.caption_decoding import NEG_INF, beam_search, greedy_search
from models.caption_tokenizer import CaptionTokenizer
from models.checkpoint import read_pretrained_checkpoint
from models.clip4clip import CLIP4ClipVideoTower, load_video_tower
from models.pretrained import PretrainedWeightsMismatch
from models.registry import get_model_entry, is_registered, merge_config
from models.transforms import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, VideoTransform
from models.video_swin import VideoSwinTransformer, load_pretrained


# --------------------------------------------------------------------------------------------- helpers
@dataclasses.dataclass
class VideoContext:
    """The cached video stream: per-layer video token states and which tokens are valid."""

    layer_inputs: list[torch.Tensor]  # depth x [B, Lv, H]: the input of each layer's video stream
    valid: torch.Tensor  # bool [B, Lv]

    def repeat_interleave(self, repeats: int | torch.Tensor) -> VideoContext:
        """Each video repeated (e.g. per beam or per candidate caption)."""
        return VideoContext(
            [x.repeat_interleave(repeats, dim=0) for x in self.layer_inputs],
            self.valid.repeat_interleave(repeats, dim=0),
        )


def _to_additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool ``allowed`` → additive bias (0 where allowed, -inf where not)."""
    zeros = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zeros, torch.full((), NEG_INF, dtype=dtype, device=allowed.device))


def causal_allowed(length: int, device=None) -> torch.Tensor:
    """bool ``[L, L]``: query ``i`` may see key ``j`` iff ``j <= i``."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


# ---------------------------------------------------------------------------------------------- blocks
class SparseVideoMask(nn.Module):
    """Learnable video-token attention mask ``sigmoid(W)`` over a ``T x S`` grid, diagonal fixed to 1."""

    def __init__(self, temporal: int, spatial: int):
        super().__init__()
        self.temporal, self.spatial = int(temporal), int(spatial)
        n = self.temporal * self.spatial
        # Zero init: M = 0.5 everywhere, a uniform log-bias that leaves attention unchanged at the start.
        self.logits = nn.Parameter(torch.zeros(n, n))

    def probabilities(self, temporal: int | None = None, spatial: int | None = None) -> torch.Tensor:
        """``M`` for a grid of ``temporal x spatial`` tokens (linear interpolation over time when needed)."""
        temporal = self.temporal if temporal is None else int(temporal)
        spatial = self.spatial if spatial is None else int(spatial)
        if spatial != self.spatial:
            raise ValueError(
                f"sparse mask was learned for {self.spatial} spatial tokens per step but the video gives "
                f"{spatial}: use the configured image_size"
            )
        m = torch.sigmoid(self.logits)
        if temporal != self.temporal:
            t0, s = self.temporal, self.spatial
            grid = m.view(t0, s, t0, s).permute(1, 3, 0, 2).reshape(1, s * s, t0, t0)
            grid = F.interpolate(grid, size=(temporal, temporal), mode="bilinear", align_corners=True)
            m = grid.view(s, s, temporal, temporal).permute(2, 0, 3, 1).reshape(temporal * s, temporal * s)
        eye = torch.eye(m.shape[0], dtype=torch.bool, device=m.device)
        return torch.where(eye, torch.ones((), dtype=m.dtype, device=m.device), m)

    def sparsity_loss(self) -> torch.Tensor:
        """L1 (= mean, values are positive) of ``M`` off the diagonal."""
        m = torch.sigmoid(self.logits)
        n = m.shape[0]
        if n < 2:
            return m.sum() * 0.0
        off = ~torch.eye(n, dtype=torch.bool, device=m.device)
        return m[off].mean()


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, lq, d = x_q.shape
        lk = x_kv.shape[1]
        h = self.num_heads
        q = self.q(x_q).view(b, lq, h, d // h).transpose(1, 2)
        k, v = self.kv(x_kv).view(b, lk, 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(out.transpose(1, 2).reshape(b, lq, d))


class MultimodalBlock(nn.Module):
    """Pre-LN transformer block run as a video stream and a caption stream that share all weights."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )
        self.drop = nn.Dropout(dropout)

    def forward_video(self, vid: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        y = self.norm1(vid)
        vid = vid + self.drop(self.attn(y, y, bias))
        return vid + self.drop(self.mlp(self.norm2(vid)))

    def forward_caption(self, cap: torch.Tensor, vid_in: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``cap`` attends to ``[cap; vid_in]`` (``vid_in`` = this layer's video-stream input)."""
        y = self.norm1(cap)
        kv = torch.cat([y, self.norm1(vid_in)], dim=1)
        cap = cap + self.drop(self.attn(y, kv, bias))
        return cap + self.drop(self.mlp(self.norm2(cap)))


# ----------------------------------------------------------------------------------------------- model
class SwinBERT(nn.Module):
    """Video Swin + multimodal transformer captioner (see the module docstring).

    Frames are what :func:`create_model`'s transform returns: float ``[B, T, 3, S, S]`` (or clips
    ``[B, N, T, 3, S, S]``, concatenated in time: the sparsely sampled frames of the whole video) with a
    bool ``mask`` ``[B, T]`` / ``[B, N, T]`` of real (non-padding) frames, or ``None`` for all real.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: CaptionTokenizer,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        num_frames: int = 32,
        image_size: int = 224,
        temporal_patch: int = 2,
        spatial_stride: int = 32,
        use_sparse_mask: bool = True,
        sparsity_weight: float = 0.5,
        sparse_mask_hard_inference: bool = False,
        mask_prob: float = 0.5,
        max_masked_tokens: int = 45,
        max_gen_length: int | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.hidden_size = hidden_size
        self.num_frames = int(num_frames)
        self.image_size = int(image_size)
        self.temporal_patch = int(temporal_patch)
        self.use_sparse_mask = bool(use_sparse_mask)
        self.sparsity_weight = float(sparsity_weight)
        self.sparse_mask_hard_inference = bool(sparse_mask_hard_inference)
        self.mask_prob = float(mask_prob)
        self.max_masked_tokens = int(max_masked_tokens)
        self.context_length = tokenizer.context_length
        self.max_gen_length = int(max_gen_length or self.context_length - 1)
        feat_dim = int(backbone.num_features)
        self.video_proj = nn.Linear(feat_dim, hidden_size)
        self.video_type = nn.Parameter(torch.zeros(hidden_size))
        self.word_embed = nn.Embedding(tokenizer.vocab_size, hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(self.context_length, hidden_size))
        self.embed_norm = nn.LayerNorm(hidden_size)
        self.embed_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            MultimodalBlock(hidden_size, num_heads, mlp_ratio, dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(hidden_size)
        # MLM head (BERT): transform then a decoder tied to the word embeddings.
        self.head_transform = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.LayerNorm(hidden_size)
        )
        self.head_bias = nn.Parameter(torch.zeros(tokenizer.vocab_size))
        grid_t = max(1, self.num_frames // self.temporal_patch)
        grid_s = (self.image_size // spatial_stride) ** 2
        self.sparse_mask = SparseVideoMask(grid_t, grid_s) if self.use_sparse_mask else None
        # Ids never predicted (start, mask, pad).
        blocked = torch.zeros(tokenizer.vocab_size, dtype=torch.bool)
        blocked[[tokenizer.sot_id, tokenizer.mask_id, tokenizer.pad_id]] = True
        self.register_buffer("_blocked_ids", blocked, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        for name, m in self.named_modules():
            if name.startswith("backbone"):
                continue
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    # ------------------------------------------------------------------------------------ video stream
    def _prepare_frames(self, frames: torch.Tensor, mask: torch.Tensor | None):
        if not isinstance(frames, torch.Tensor) or frames.dtype not in (
            torch.float32,
            torch.float16,
            torch.bfloat16,
        ):
            raise TypeError("frames must be the float tensor the model's transform returns, [B, T, 3, S, S]")
        if frames.ndim == 6:  # clips [B, N, T, 3, S, S] -> one sequence of N*T frames
            b, n, t = frames.shape[:3]
            frames = frames.reshape(b, n * t, *frames.shape[3:])
            if mask is not None:
                mask = mask.reshape(b, n * t)
        if frames.ndim != 5 or frames.shape[2] != 3:
            raise ValueError(
                f"frames must be [B, T, 3, S, S] or [B, N, T, 3, S, S], got {tuple(frames.shape)}"
            )
        b, t = frames.shape[:2]
        if mask is None:
            mask = torch.ones(b, t, dtype=torch.bool, device=frames.device)
        mask = torch.as_tensor(mask, device=frames.device).bool()
        if mask.shape != (b, t):
            raise ValueError(
                f"mask must be [B, T] = {(b, t)} for frames {tuple(frames.shape)}, got {tuple(mask.shape)}"
            )
        if not bool(mask.any(dim=1).all()):
            bad = (~mask.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(f"videos at batch positions {bad} have no valid frame (mask all False)")
        pad = (-t) % self.temporal_patch
        if pad:  # Video Swin embeds frame pairs: pad with a repeated last frame marked invalid
            frames = torch.cat([frames, frames[:, -1:].expand(b, pad, *frames.shape[2:])], dim=1)
            mask = torch.cat([mask, torch.zeros(b, pad, dtype=torch.bool, device=mask.device)], dim=1)
        return frames, mask

    def video_tokens(self, frames: torch.Tensor, mask: torch.Tensor | None = None):
        """Backbone → flattened projected tokens ``[B, Lv, H]``, validity ``[B, Lv]``, grid ``(T', S')``."""
        frames, mask = self._prepare_frames(frames, mask)
        grid = self.backbone.forward_features(frames.permute(0, 2, 1, 3, 4))  # [B, T', h, w, C]
        b, tg, hg, wg, c = grid.shape
        tokens = self.video_proj(grid.reshape(b, tg * hg * wg, c)) + self.video_type
        step_valid = mask.view(b, tg, -1).any(dim=2)  # a temporal token is real if any of its frames is
        valid = step_valid[:, :, None].expand(b, tg, hg * wg).reshape(b, -1)
        return self.embed_drop(tokens), valid, (tg, hg * wg)

    def video_attention_mask(self, temporal: int, spatial: int) -> torch.Tensor | None:
        """The video→video mask in use (soft ``M``, or ``M >= 0.5`` in eval with hard inference)."""
        if self.sparse_mask is None:
            return None
        m = self.sparse_mask.probabilities(temporal, spatial)
        if self.sparse_mask_hard_inference and not self.training:
            m = (m >= 0.5).to(m.dtype)
        return m

    def video_context(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> VideoContext:
        """Run the video stream once; the result is reused by every caption/decoding step."""
        tokens, valid, (tg, sg) = self.video_tokens(frames, mask)
        b, lv, _ = tokens.shape
        eye = torch.eye(lv, dtype=torch.bool, device=tokens.device)
        allowed = valid[:, None, :] | eye  # padded video tokens are never keys (except for themselves)
        bias = _to_additive(allowed, tokens.dtype)
        m = self.video_attention_mask(tg, sg)
        if m is not None and self.sparse_mask_hard_inference and not self.training:
            bias = bias + _to_additive(m > 0.5, tokens.dtype)[None]  # m is already 0/1
        elif m is not None:
            bias = bias + torch.log(m.clamp_min(1e-12)).to(tokens.dtype)[None]  # soft: weights x M
        bias = bias[:, None]  # [B, 1, Lv, Lv] broadcast over heads
        layer_inputs = []
        x = tokens
        for block in self.blocks:
            layer_inputs.append(x)
            x = block.forward_video(x, bias)
        return VideoContext(layer_inputs, valid)

    # ---------------------------------------------------------------------------------- caption stream
    def caption_hidden(
        self,
        ctx: VideoContext,
        ids: torch.Tensor,
        allowed: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states ``[B, Lc, H]`` of caption tokens ``ids`` given the cached video stream.

        ``allowed``: bool ``[Lc, Lc]`` or ``[B, Lc, Lc]`` caption→caption visibility (default causal);
        ``positions``: position ids ``[Lc]`` (default ``0..Lc-1``).
        """
        b, lc = ids.shape
        if positions is None:
            positions = torch.arange(lc, device=ids.device)
        if int(positions.max()) >= self.context_length:
            raise ValueError(
                f"caption of {lc} tokens exceeds the model's context length {self.context_length}"
            )
        if allowed is None:
            allowed = causal_allowed(lc, ids.device)
        if allowed.ndim == 2:
            allowed = allowed[None].expand(b, lc, lc)
        vid_allowed = ctx.valid[:, None, :].expand(b, lc, ctx.valid.shape[1])
        x = self.word_embed(ids) + self.pos_embed[positions]
        x = self.embed_drop(self.embed_norm(x))
        bias = _to_additive(torch.cat([allowed, vid_allowed], dim=2), x.dtype)[:, None]
        for block, vid_in in zip(self.blocks, ctx.layer_inputs):
            x = block.forward_caption(x, vid_in, bias)
        return self.norm(x)

    def token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """MLM head: hidden ``[..., H]`` → logits ``[..., V]`` (start/mask/pad ids get -inf)."""
        logits = self.head_transform(hidden) @ self.word_embed.weight.t() + self.head_bias
        return logits.masked_fill(self._blocked_ids, NEG_INF)

    def joint_forward(self, frames, mask, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference formulation: ONE transformer over ``[caption tokens; video tokens]`` with the full
        ``(Lc+Lv)^2`` SwinBERT attention pattern. Returns ``(caption hidden [B, Lc, H], video states
        [B, Lv, H])``. Slower than the two-stream path (which it equals); kept to test the pattern."""
        tokens, valid, (tg, sg) = self.video_tokens(frames, mask)
        b, lv, _ = tokens.shape
        lc = ids.shape[1]
        x = self.embed_drop(self.embed_norm(self.word_embed(ids) + self.pos_embed[:lc]))
        allowed = torch.zeros(b, lc + lv, lc + lv, dtype=torch.bool, device=ids.device)
        allowed[:, :lc, :lc] = causal_allowed(lc, ids.device)
        allowed[:, :lc, lc:] = valid[:, None, :]
        allowed[:, lc:, lc:] = valid[:, None, :] | torch.eye(lv, dtype=torch.bool, device=ids.device)
        bias = _to_additive(allowed, x.dtype)
        m = self.video_attention_mask(tg, sg)
        if m is not None and self.sparse_mask_hard_inference and not self.training:
            bias[:, lc:, lc:] += _to_additive(m > 0.5, x.dtype)
        elif m is not None:
            bias[:, lc:, lc:] += torch.log(m.clamp_min(1e-12)).to(x.dtype)
        h = torch.cat([x, tokens], dim=1)
        for block in self.blocks:
            h = block.forward_video(h, bias[:, None])  # a plain self-attention block over the joint sequence
        return self.norm(h[:, :lc]), h[:, lc:]

    # --------------------------------------------------------------------------------------- training
    def _as_ids(self, captions) -> torch.Tensor:
        if isinstance(captions, torch.Tensor):
            return captions.long()
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError("captions must be a list of str (one per video) or a LongTensor of token ids")
        return self.tokenizer(list(captions))

    def mlm_inputs(self, ids: torch.Tensor, generator: torch.Generator | None = None):
        """SwinBERT masking: returns ``(inputs, target_positions bool [B, L])``.

        Candidates are every token after SOT up to and including EOT; per caption
        ``min(max(1, round(mask_prob * n)), max_masked_tokens)`` are chosen; each chosen token becomes
        ``[MASK]`` (80%), a random BPE id (10%) or stays (10%).
        """
        tok = self.tokenizer
        device = ids.device
        cand = (ids != tok.pad_id) & (ids != tok.sot_id)
        n_cand = cand.sum(dim=1)
        n_mask = (
            (n_cand.float() * self.mask_prob).round().long().clamp(min=1).clamp(max=self.max_masked_tokens)
        )
        n_mask = torch.minimum(n_mask, n_cand)
        noise = torch.rand(ids.shape, generator=generator, device="cpu").to(device)
        noise = noise.masked_fill(~cand, -1.0)
        rank = noise.argsort(dim=1, descending=True).argsort(dim=1)
        targets = (rank < n_mask[:, None]) & cand
        choice = torch.rand(ids.shape, generator=generator, device="cpu").to(device)
        random_ids = torch.randint(0, tok.base_vocab_size, ids.shape, generator=generator, device="cpu").to(
            device
        )
        inputs = ids.clone()
        inputs = torch.where(targets & (choice < 0.8), torch.full_like(ids, tok.mask_id), inputs)
        inputs = torch.where(targets & (choice >= 0.8) & (choice < 0.9), random_ids, inputs)
        return inputs, targets

    def param_groups(self, lr: float, backbone_lr_scale: float = 0.05) -> list[dict[str, Any]]:
        """Optimizer groups: the backbone at ``backbone_lr_scale x lr`` (SwinBERT trains it at 0.05x),
        everything else (projection, multimodal transformer, sparse mask) at ``lr``. A scale of 0 holds the
        backbone: its parameters stop requiring gradients, so no backward pass runs through it."""
        if backbone_lr_scale == 0:
            self.backbone.requires_grad_(False)
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        ids = {id(p) for p in backbone}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": rest, "lr": lr, "name": "captioner"}]
        if backbone:
            groups.append({"params": backbone, "lr": lr * backbone_lr_scale, "name": "backbone"})
        return groups

    def sparsity_loss(self) -> torch.Tensor:
        """L1 sparsity of the learnable video mask (0 for the ``use_sparse_mask=False`` ablation)."""
        if self.sparse_mask is None:
            return self.video_type.sum() * 0.0
        return self.sparse_mask.sparsity_loss()

    def training_loss(self, frames, mask, captions, generator: torch.Generator | None = None):
        """MLM loss + ``sparsity_weight`` x sparsity: ``(loss, {"mlm": float, "sparsity": float})``.

        ``frames``/``mask`` as the transform gives them (``[B, T, 3, S, S]`` / ``[B, T]``, or clips);
        ``captions``: one str per video (or token ids ``[B, L]`` from the tokenizer).
        """
        ids = self._as_ids(captions).to(frames.device)
        if ids.shape[0] != frames.shape[0]:
            raise ValueError(f"got {ids.shape[0]} captions for {frames.shape[0]} videos")
        inputs, targets = self.mlm_inputs(ids, generator)
        ctx = self.video_context(frames, mask)
        hidden = self.caption_hidden(ctx, inputs)
        logits = self.token_logits(hidden[targets])
        mlm = F.cross_entropy(logits, ids[targets])
        sparsity = self.sparsity_loss()
        loss = mlm + self.sparsity_weight * sparsity
        return loss, {"mlm": float(mlm.detach()), "sparsity": float(sparsity.detach())}

    # ---------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def score_captions(self, frames, mask, captions) -> torch.Tensor | list[torch.Tensor]:
        """Length-normalised log-likelihood (mean log-prob per token, EOT included) of captions.

        ``captions``: one str per video → tensor ``[B]``; or a list of str lists (several per video) →
        a list of tensors. Exactly the probabilities greedy/beam decoding uses, in one pass: each real
        token ``i`` is paired with a ``[MASK]`` query at position ``i`` that sees real tokens ``< i``.
        """
        ctx = self.video_context(frames, mask)
        if len(captions) and not isinstance(captions[0], str) and not isinstance(captions, torch.Tensor):
            counts = torch.tensor([len(c) for c in captions], device=frames.device)
            flat = [c for group in captions for c in group]
            scores = self.score_with_context(ctx.repeat_interleave(counts), self._as_ids(flat))
            return list(scores.split(counts.tolist()))
        ids = self._as_ids(captions)
        if ids.shape[0] != frames.shape[0]:
            raise ValueError(f"got {ids.shape[0]} captions for {frames.shape[0]} videos")
        return self.score_with_context(ctx, ids)

    def score_with_context(self, ctx: VideoContext, ids: torch.Tensor) -> torch.Tensor:
        """:meth:`score_captions` on a precomputed :class:`VideoContext` (one row of ``ids`` per video)."""
        tok = self.tokenizer
        ids = ids.to(ctx.valid.device)
        b, length = ids.shape
        device = ids.device
        n_q = length - 1  # query i (1..L-1) predicts ids[:, i]
        seq = torch.cat([ids, torch.full((b, n_q), tok.mask_id, dtype=torch.long, device=device)], dim=1)
        positions = torch.cat([torch.arange(length, device=device), torch.arange(1, length, device=device)])
        allowed = torch.zeros(length + n_q, length + n_q, dtype=torch.bool, device=device)
        allowed[:length, :length] = causal_allowed(length, device)
        q_pos = torch.arange(1, length, device=device)
        allowed[length:, :length] = torch.arange(length, device=device)[None, :] < q_pos[:, None]
        allowed[length:, length:] = torch.eye(n_q, dtype=torch.bool, device=device)
        hidden = self.caption_hidden(ctx, seq, allowed, positions)[:, length:]
        logp = self.token_logits(hidden).log_softmax(dim=-1)
        target = ids[:, 1:]
        valid = target != tok.pad_id
        token_logp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).masked_fill(~valid, 0.0)
        return token_logp.sum(dim=1) / valid.sum(dim=1).clamp(min=1)

    # --------------------------------------------------------------------------------------- decoding
    @torch.no_grad()
    def generate(
        self,
        frames,
        mask=None,
        max_length: int | None = None,
        beam_size: int = 1,
        length_penalty: float = 1.0,
        min_length: int = 0,
    ) -> tuple[list[str], torch.Tensor]:
        """Caption a batch: ``(captions, scores [B])``; scores are length-normalised log-likelihoods.

        Each step appends ``[MASK]`` after the prefix and takes the head's prediction at it (SwinBERT
        decoding). ``beam_size=1`` is greedy. Stops at EOT or ``max_length`` generated tokens; EOT is not
        allowed before ``min_length`` words (an early, barely trained model otherwise ends at once: EOT
        beats every single word while the word mass is still spread over many paraphrases).
        """
        ctx = self.video_context(frames, mask)
        max_length = min(int(max_length or self.max_gen_length), self.context_length - 1)
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        min_length = max(0, min(int(min_length), max_length - 1))
        if beam_size == 1:
            ids, scores = self._greedy(ctx, max_length, min_length)
        else:
            ids, scores = self._beam(ctx, max_length, beam_size, length_penalty, min_length)
        return [self.tokenizer.decode(row[1:].tolist()) for row in ids], scores

    def _next_logp(self, ctx: VideoContext, prefix: torch.Tensor) -> torch.Tensor:
        b = prefix.shape[0]
        mask_col = torch.full((b, 1), self.tokenizer.mask_id, dtype=torch.long, device=prefix.device)
        hidden = self.caption_hidden(ctx, torch.cat([prefix, mask_col], dim=1))[:, -1]
        return self.token_logits(hidden).log_softmax(dim=-1)

    def _greedy(self, ctx: VideoContext, max_length: int, min_length: int = 0):
        def next_logp(prefix: torch.Tensor) -> torch.Tensor:
            return self._next_logp(ctx, prefix)

        batch, device = ctx.valid.shape[0], ctx.valid.device
        return greedy_search(next_logp, self.tokenizer, batch, device, max_length, min_length)

    def _beam(self, ctx: VideoContext, max_length: int, k: int, alpha: float, min_length: int = 0):
        batch, device = ctx.valid.shape[0], ctx.valid.device
        beams = ctx.repeat_interleave(k)

        def next_logp(prefix: torch.Tensor) -> torch.Tensor:
            return self._next_logp(beams, prefix)

        return beam_search(next_logp, self.tokenizer, batch, device, max_length, k, alpha, min_length)


# ------------------------------------------------------------------------------------ checkpoint filter
def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: SwinBERT) -> dict[str, torch.Tensor]:
    """Adapt a SwinBERT state dict to ``model``: a sparse mask learned for another frame count is
    interpolated over time (as at run time); anything else must match exactly."""
    out = dict(state_dict)
    key = "sparse_mask.logits"
    if key in out and model.sparse_mask is not None:
        src = out[key]
        dst = model.sparse_mask.logits
        if src.shape != dst.shape:
            s = model.sparse_mask.spatial
            if src.shape[0] % s:
                raise ValueError(f"checkpoint sparse mask {tuple(src.shape)} does not fit {s} spatial tokens")
            probe = SparseVideoMask(src.shape[0] // s, s)
            probe.logits.data.copy_(src)
            m = probe.probabilities(model.sparse_mask.temporal, s).clamp(1e-6, 1 - 1e-6)
            out[key] = torch.log(m) - torch.log1p(-m)
    elif key in out and model.sparse_mask is None:
        out.pop(key)  # a trained mask loaded into the no-mask ablation is simply unused
    return out


def load_backbone(model: SwinBERT, path: str, source: str = "vidsift") -> None:
    """Initialise the backbone. A Video Swin from a vidsift checkpoint (a ``video-swin-*`` model, or any
    model holding the backbone under a key prefix) or a raw file in ``source`` layout (``torchvision``,
    ``mmaction``, ``swin2d``; see ``models.video_swin.convert_checkpoint``); a CLIP4Clip video tower from a
    trained CLIP4Clip checkpoint."""
    if isinstance(model.backbone, CLIP4ClipVideoTower):
        if source != "vidsift":
            raise ValueError(f"a CLIP4Clip video tower loads vidsift checkpoints only, not {source!r} files")
        load_video_tower(model.backbone, path)
        return
    if source != "vidsift":
        load_pretrained(model.backbone, path, source, strict=True)
        return
    state_dict = read_pretrained_checkpoint(path)["state_dict"]
    want = model.backbone.state_dict()
    want = {k for k in want if not k.endswith(("relative_position_index", "attn_mask"))}
    prefixes = {k[: len(k) - len(name)] for k in state_dict for name in want if k.endswith(name)}
    for prefix in sorted(prefixes, key=len):
        sub = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if want <= set(sub):
            load_pretrained(model.backbone, {k: sub[k] for k in want}, "vidsift", strict=True)
            return
    raise PretrainedWeightsMismatch(
        f"checkpoint {path!r} holds no Video Swin backbone matching this SwinBERT config"
    )


def _recorded_overrides(payload: dict[str, Any], path: Any, config: dict[str, Any]) -> dict[str, Any]:
    """The config overrides a SwinBERT checkpoint was trained with: the built config it records (registry
    saves ``model.config``), else the overrides kept in ``extra`` by :func:`checkpoint_extra`."""
    name = payload["model_name"]
    family = get_model_entry(name).family if is_registered(name) else None
    if family != "swinbert":
        raise PretrainedWeightsMismatch(
            f"checkpoint {str(path)!r} is a {name!r} model, not a SwinBERT; "
            "pass a Video Swin checkpoint as backbone_pretrained=... instead"
        )
    built = {k: v for k, v in (payload.get("config") or {}).items() if k in config and v != config[k]}
    saved = dict((payload.get("extra") or {}).get("config_overrides") or {})
    return {**built, **{k: v for k, v in saved.items() if k in config}}


def load_swinbert_state(model: SwinBERT, payload: dict[str, Any], path: Any) -> None:
    """Load a SwinBERT checkpoint through :func:`checkpoint_filter_fn`; every key must fit."""
    state = checkpoint_filter_fn(payload["state_dict"], model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise PretrainedWeightsMismatch(
            f"checkpoint {str(path)!r} does not fit this SwinBERT config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


def checkpoint_extra(model: SwinBERT, **more: Any) -> dict[str, Any]:
    """``extra`` for ``models.save_checkpoint`` that records the config overrides the model was built with,
    so ``create_model(name, pretrained=path)`` rebuilds the same architecture."""
    overrides = {k: (list(v) if isinstance(v, tuple) else v)
                 for k, v in (getattr(model, "config_overrides", None) or {}).items()}
    return {"config_overrides": overrides, **more}


# --------------------------------------------------------------------------------------- registrations
def build_backbone(cfg: dict[str, Any]) -> tuple[nn.Module, int, int]:
    """The backbone of a ``swinbert`` config's ``backbone`` entry and its token grid geometry
    ``(temporal_patch, spatial_stride)``: a Video Swin (keyword arguments of :class:`VideoSwinTransformer`),
    or ``{"clip4clip": NAME}``, the video tower of the registered CLIP4Clip ``NAME`` (one token per frame)."""
    spec = dict(cfg["backbone"])
    if "clip4clip" in spec:
        tower = CLIP4ClipVideoTower(get_model_entry(spec["clip4clip"]).config)
        if int(cfg["image_size"]) != tower.image_size:
            raise ValueError(f"SwinBERT image_size {cfg['image_size']} must equal the video tower's "
                             f"{tower.image_size} (CLIP4Clip {spec['clip4clip']!r})")
        return tower, 1, tower.image_size
    # token grid geometry follows the backbone: patch size x one 2x patch merging per stage after the first
    patch = tuple(spec.get("patch_size", (2, 4, 4)))
    return VideoSwinTransformer(**spec), int(patch[0]), int(patch[1]) * 2 ** (len(spec["depths"]) - 1)


def swinbert_from_config(cfg: dict[str, Any]) -> SwinBERT:
    """A randomly initialised :class:`SwinBERT` (with its backbone) from a ``swinbert`` config."""
    tokenizer = CaptionTokenizer(cfg["context_length"])
    backbone, temporal_patch, spatial_stride = build_backbone(cfg)
    return SwinBERT(
        backbone,
        tokenizer,
        hidden_size=cfg["hidden_size"],
        depth=cfg["depth"],
        num_heads=cfg["num_heads"],
        mlp_ratio=cfg["mlp_ratio"],
        dropout=cfg["dropout"],
        num_frames=cfg["num_frames"],
        image_size=cfg["image_size"],
        temporal_patch=temporal_patch,
        spatial_stride=spatial_stride,
        use_sparse_mask=cfg["use_sparse_mask"],
        sparsity_weight=cfg["sparsity_weight"],
        sparse_mask_hard_inference=cfg["sparse_mask_hard_inference"],
        mask_prob=cfg["mask_prob"],
        max_masked_tokens=cfg["max_masked_tokens"],
        max_gen_length=cfg["max_gen_length"],
    )


def build_swinbert(
    name: str,
    config: dict[str, Any],
    pretrained=None,
    backbone_pretrained=None,
    backbone_pretrained_source: str = "vidsift",
    **overrides: Any,
):
    """Factory builder: ``(SwinBERT, VideoTransform (bilinear, ImageNet), CaptionTokenizer)``.

    ``overrides`` replace config keys (``num_frames``, ``image_size``, ``use_sparse_mask``, ...). A
    checkpoint saved with ``extra=checkpoint_extra(model)`` brings back the overrides it was trained with
    (explicit ``overrides`` still win). ``backbone_pretrained`` (+ ``backbone_pretrained_source``) initialises
    only the Video Swin backbone.
    """
    payload = None
    if pretrained is not None:
        payload = read_pretrained_checkpoint(pretrained)
        overrides = {**_recorded_overrides(payload, pretrained, config), **overrides}
    cfg = merge_config(name, config, overrides)
    model = swinbert_from_config(cfg)
    model.config_overrides = dict(overrides)
    model.config = dict(cfg)  # saved by models.save_checkpoint, so a reload rebuilds this architecture
    if backbone_pretrained:
        load_backbone(model, str(backbone_pretrained), backbone_pretrained_source)
    if payload is not None:
        load_swinbert_state(model, payload, pretrained)
    model.eval()
    if isinstance(model.backbone, CLIP4ClipVideoTower):  # frames normalised as the tower was trained
        transform = VideoTransform(cfg["image_size"], CLIP_MEAN, CLIP_STD, interpolation="bicubic")
    else:
        transform = VideoTransform(cfg["image_size"], IMAGENET_MEAN, IMAGENET_STD, interpolation="bilinear")
    return model, transform, model.tokenizer


__all__ = [
    "CaptionTokenizer",
    "SparseVideoMask",
    "SwinBERT",
    "VideoContext",
    "build_backbone",
    "build_swinbert",
    "checkpoint_extra",
    "checkpoint_filter_fn",
    "load_backbone",
    "swinbert_from_config",
]

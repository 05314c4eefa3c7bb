"""Video Swin Transformer (Liu et al., 2022, "Video Swin Transformer") as a vidsift video encoder.

Layout (timm style): helpers → blocks → model → checkpoint filter → builder (configs are data:
``models/configs/video-swin-*.json``).

Faithful to the official implementation (and to ``torchvision.models.video.swin3d_*``): 3D patch partition
(Conv3d), stages of 3D W-MSA / SW-MSA blocks (cyclic shift by half the window, -100 masks across
sub-windows), a (2P-1)(2M-1)(2M-1) relative-position bias table per block, spatial-only 2×2 patch merging,
window shrink and no shift along any axis where the input is not larger than the window, stochastic depth and
a final LayerNorm. Faster than the references on CPU because attention goes through
``F.scaled_dot_product_attention`` (no materialised attention matrix), the window/shift geometry, token
permutations, bias index and shift mask are computed once per stage and input shape and cached, and the
cyclic shift + padding + window partition is a single gather instead of pad → roll → permute copies.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from models.checkpoint import is_vidsift_checkpoint, load_checkpoint, require_file
from models.pretrained import PretrainedWeightsMismatch
from models.registry import merge_config
from models.transforms import IMAGENET_MEAN, IMAGENET_STD, VideoTransform

log = logging.getLogger(__name__)

__all__ = [
    "VideoSwinTransformer",
    "LoadReport",
    "convert_checkpoint",
    "load_pretrained",
    "CHECKPOINT_SOURCES",
    "build_video_swin",
    "video_swin_from_config",
]

SHIFT_MASK_VALUE = -100.0  # the value the official code puts between tokens of different sub-windows


# --------------------------------------------------------------------------------------------- helpers


def _triple(value: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"expected 3 values (T, H, W), got {value}")
    return value  # type: ignore[return-value]


def window_and_shift_for(
    size_thw: Sequence[int], window_size: Sequence[int], shift_size: Sequence[int]
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Shrink the window to the input and drop the shift along axes where the input is not larger.

    Same rule as the official ``get_window_size`` (and torchvision): ``size <= window`` → window = size,
    shift = 0, decided per axis.
    """
    window = list(window_size)
    shift = list(shift_size)
    for i in range(3):
        if size_thw[i] <= window[i]:
            window[i] = int(size_thw[i])
            shift[i] = 0
    return tuple(window), tuple(shift)  # type: ignore[return-value]


def relative_position_index_3d(window_size: Sequence[int]) -> torch.Tensor:
    """``[N, N]`` index into a (2P-1)(2M-1)(2M-1) table for every token pair of a ``window_size`` window."""
    wt, wh, ww = window_size
    coords = torch.stack(
        torch.meshgrid(torch.arange(wt), torch.arange(wh), torch.arange(ww), indexing="ij")
    ).flatten(1)  # 3, N
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # N, N, 3
    rel = rel + torch.tensor([wt - 1, wh - 1, ww - 1])
    return rel[..., 0] * (2 * wh - 1) * (2 * ww - 1) + rel[..., 1] * (2 * ww - 1) + rel[..., 2]


def _window_token_order(padded_thw: Sequence[int], window: Sequence[int], shift: Sequence[int]) -> np.ndarray:
    """For each (window, position-in-window) slot, the flat index of the padded-grid token that lands there.

    Equivalent to ``roll(-shift)`` followed by window partition, in window-major order.
    """
    tp, hp, wp = padded_thw
    grid = np.arange(tp * hp * wp).reshape(tp, hp, wp)
    grid = np.roll(grid, shift=(-shift[0], -shift[1], -shift[2]), axis=(0, 1, 2))
    wt, wh, ww = window
    grid = grid.reshape(tp // wt, wt, hp // wh, wh, wp // ww, ww).transpose(0, 2, 4, 1, 3, 5)
    return grid.reshape(-1)


def _shift_mask(padded_thw: Sequence[int], window: Sequence[int], shift: Sequence[int]) -> torch.Tensor:
    """``[nW, N, N]`` float mask: 0 inside a sub-window, -100 between tokens from different sub-windows."""
    labels = np.zeros(padded_thw, dtype=np.int64)
    stride = 1
    for axis in range(3):
        axis_labels = np.zeros(padded_thw[axis], dtype=np.int64)
        if shift[axis] > 0:
            axis_labels[-window[axis] : -shift[axis]] = 1
            axis_labels[-shift[axis] :] = 2
        shape = [1, 1, 1]
        shape[axis] = -1
        labels = labels + stride * axis_labels.reshape(shape)
        stride *= 3
    order = _window_token_order(padded_thw, window, (0, 0, 0))  # the labels are already in shifted frame
    num_tokens = window[0] * window[1] * window[2]
    windows = torch.from_numpy(labels.reshape(-1)[order].reshape(-1, num_tokens))
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.zeros(diff.shape).masked_fill_(diff != 0, SHIFT_MASK_VALUE)


@dataclass
class WindowGeometry:
    """Everything the blocks of one stage share for one input shape (cached per stage).

    ``gather``/``scatter`` are ``None`` when windows can be formed by a plain view/permute (no padding,
    no shift); ``mask`` is ``None`` for unshifted blocks.
    """

    size_thw: tuple[int, int, int]
    padded_thw: tuple[int, int, int]
    window: tuple[int, int, int]
    shift: tuple[int, int, int]
    num_windows: int
    bias_index: torch.Tensor  # [N*N] long
    plain_gather: torch.Tensor | None  # unshifted blocks, only when padding is needed
    plain_scatter: torch.Tensor | None
    shifted_gather: torch.Tensor | None  # shifted blocks (None when no axis is shifted)
    shifted_scatter: torch.Tensor | None
    shift_mask: torch.Tensor | None  # [nW, 1, N, N] float32

    @property
    def has_shift(self) -> bool:
        return any(s > 0 for s in self.shift)

    @property
    def needs_pad(self) -> bool:
        return self.padded_thw != self.size_thw


def _gather_indices(
    size_thw: Sequence[int], padded_thw: Sequence[int], window: Sequence[int], shift: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather index (slots ← tokens, padding → an appended zero token) and its inverse (tokens ← slots)."""
    t, h, w = size_thw
    tp, hp, wp = padded_thw
    order = _window_token_order(padded_thw, window, shift)  # padded flat index per slot
    pt, rest = np.divmod(order, hp * wp)
    ph, pw = np.divmod(rest, wp)
    inside = (pt < t) & (ph < h) & (pw < w)
    source = np.where(inside, (pt * h + ph) * w + pw, t * h * w)  # t*h*w = the appended zero token
    inverse = np.empty(t * h * w, dtype=np.int64)
    inverse[source[inside]] = np.nonzero(inside)[0]
    return torch.from_numpy(source.astype(np.int64)), torch.from_numpy(inverse)


def build_window_geometry(
    size_thw: Sequence[int], window_size: Sequence[int], device: torch.device
) -> WindowGeometry:
    """Window/shift sizes, bias index, token permutations and shift mask for one stage and input shape."""
    size_thw = tuple(int(s) for s in size_thw)
    half = tuple(w // 2 for w in window_size)
    window, shift = window_and_shift_for(size_thw, window_size, half)
    padded = tuple(math.ceil(s / w) * w for s, w in zip(size_thw, window))
    num_windows = (padded[0] // window[0]) * (padded[1] // window[1]) * (padded[2] // window[2])
    n = window[0] * window[1] * window[2]
    # The official code (and torchvision) index the *full-window* table with the top-left N×N block of the
    # full-window index when the window shrinks; keep that so shrunk windows match pretrained behaviour.
    full_index = relative_position_index_3d(window_size)
    bias_index = full_index[:n, :n].reshape(-1).to(device)
    plain_gather = plain_scatter = None
    if padded != size_thw:
        plain_gather, plain_scatter = (
            t.to(device) for t in _gather_indices(size_thw, padded, window, (0,) * 3)
        )
    shifted_gather = shifted_scatter = shift_mask = None
    if any(s > 0 for s in shift):
        shifted_gather, shifted_scatter = (
            t.to(device) for t in _gather_indices(size_thw, padded, window, shift)
        )
        shift_mask = _shift_mask(padded, window, shift).unsqueeze(1).to(device)
    return WindowGeometry(
        size_thw=size_thw,
        padded_thw=padded,
        window=window,
        shift=shift,
        num_windows=num_windows,
        bias_index=bias_index,
        plain_gather=plain_gather,
        plain_scatter=plain_scatter,
        shifted_gather=shifted_gather,
        shifted_scatter=shifted_scatter,
        shift_mask=shift_mask,
    )


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (timm's ``drop_path``): zero whole residual branches, rescale the rest."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


_ONEDNN_LINEAR = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
_onednn_linear_ok = _ONEDNN_LINEAR is not None and torch.backends.mkldnn.is_available()


def fast_linear(x: torch.Tensor, layer: nn.Linear, gelu: bool = False) -> torch.Tensor:
    """``layer(x)`` (then exact GELU if asked); fp32 CPU inference goes through oneDNN with the GELU fused.

    oneDNN's linear is markedly faster than the default CPU addmm path for the skinny matrices of Swin
    (K = C..4C); it records no autograd, so training, autocast and other devices/dtypes use ``F.linear``.
    """
    global _onednn_linear_ok
    if (
        _onednn_linear_ok
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and layer.weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not (torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad))
    ):
        try:
            return _ONEDNN_LINEAR(
                x,
                layer.weight,
                layer.bias,
                "gelu" if gelu else "none",
                [None] if gelu else [],
                "none" if gelu else "",
            )
        except RuntimeError as exc:  # an op/build without this kernel: fall back for good
            _onednn_linear_ok = False
            log.debug("oneDNN linear unavailable (%s); using F.linear", exc)
    y = F.linear(x, layer.weight, layer.bias)
    return F.gelu(y) if gelu else y


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


# ---------------------------------------------------------------------------------------------- blocks


class PatchEmbed3d(nn.Module):
    """3D patch partition + linear embedding: pad to a multiple of the patch, Conv3d, LayerNorm."""

    def __init__(self, patch_size=(2, 4, 4), in_chans: int = 3, embed_dim: int = 96, patch_norm: bool = True):
        super().__init__()
        self.patch_size = _triple(patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, t, h, w = x.shape
        pads = [(p - s % p) % p for s, p in zip((t, h, w), self.patch_size)]
        if any(pads):
            x = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]))
        x = self.proj(x).permute(0, 2, 3, 4, 1)  # B, T', H', W', C (channels last)
        return self.norm(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop.p == 0.0 or not self.training:
            return fast_linear(fast_linear(x, self.fc1, gelu=True), self.fc2)
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class WindowAttention3d(nn.Module):
    """Multi-head self-attention inside 3D windows with a learned relative-position bias (per block)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: Sequence[int],
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = _triple(window_size)
        wt, wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * wt - 1) * (2 * wh - 1) * (2 * ww - 1), num_heads)
        )
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self._bias_cache: tuple | None = None

    def relative_position_bias(self, bias_index: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """``[1, heads, N, N]`` bias gathered from the table (every call, so gradients reach the table)."""
        bias = self.relative_position_bias_table[bias_index].view(num_tokens, num_tokens, self.num_heads)
        return bias.permute(2, 0, 1).unsqueeze(0)

    def attention_bias(
        self, bias_index: torch.Tensor, mask: torch.Tensor | None, num_tokens: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """Relative-position bias (+ shift mask) as SDPA's additive ``attn_mask``.

        With autograd recording for the table the bias is gathered every call. Otherwise (inference) the
        ``[1, heads, N, N]`` bias is cached, keyed by the geometry's index tensor and the table's storage and
        version counter, so any in-place update (optimizer step, ``load_state_dict``) invalidates it. The
        ``[nW, heads, N, N]`` bias + mask sum is not cached: it would pin B-independent but large memory.
        """
        table = self.relative_position_bias_table
        if torch.is_grad_enabled() and table.requires_grad:
            bias = self.relative_position_bias(bias_index, num_tokens)
        else:
            # the entry holds the index tensor itself, so its id cannot be recycled while cached
            key = (dtype, table.data_ptr(), table._version)
            cached = self._bias_cache
            if cached is not None and cached[0] is bias_index and cached[1] == key:
                bias = cached[2]
            else:
                with torch.no_grad():
                    bias = self.relative_position_bias(bias_index, num_tokens).to(dtype).contiguous()
                self._bias_cache = (bias_index, key, bias)
        return (bias + mask if mask is not None else bias).to(dtype)

    def forward(
        self, windows: torch.Tensor, bias_index: torch.Tensor, mask: torch.Tensor | None, num_windows: int
    ) -> torch.Tensor:
        """``windows`` [B*nW, N, C] → [B*nW, N, C]; ``mask`` [nW, 1, N, N] or None."""
        bw, n, c = windows.shape
        qkv = (
            fast_linear(windows, self.qkv)
            .view(bw, n, 3, self.num_heads, c // self.num_heads)
            .permute(2, 0, 3, 1, 4)
        )
        q, k, v = qkv.unbind(0)
        bias = self.attention_bias(bias_index, mask, n, q.dtype)
        dropout_p = self.attn_drop if self.training else 0.0
        if mask is not None and bw != num_windows:
            # The fused CPU/GPU kernels broadcast the mask only over a leading dim of size 1, so run one
            # call per clip instead of materialising a B×-sized mask.
            outs = [
                F.scaled_dot_product_attention(qi, ki, vi, attn_mask=bias, dropout_p=dropout_p)
                for qi, ki, vi in zip(q.split(num_windows), k.split(num_windows), v.split(num_windows))
            ]
            x = torch.cat(outs)
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
        x = x.transpose(1, 2).reshape(bw, n, c)
        return self.proj_drop(fast_linear(x, self.proj))


class VideoSwinBlock(nn.Module):
    """Pre-norm transformer block over 3D windows; odd blocks of a stage use shifted windows."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: Sequence[int],
        shifted: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.shifted = shifted
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention3d(dim, num_heads, window_size, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def _attention_residual(self, x: torch.Tensor, geo: WindowGeometry) -> torch.Tensor:
        """``x + drop_path(W-MSA/SW-MSA(norm1(x)))``."""
        b, t, h, w, c = x.shape
        wt, wh, ww = geo.window
        n = wt * wh * ww
        shifted = self.shifted and geo.has_shift
        gather, scatter = (
            (geo.shifted_gather, geo.shifted_scatter) if shifted else (geo.plain_gather, geo.plain_scatter)
        )
        y = self.norm1(x)
        grid8 = (b, t // wt, wt, h // wh, wh, w // ww, ww, c)
        if gather is None:  # no padding, no shift: windows are a view/permute away
            windows = y.view(grid8).permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b * geo.num_windows, n, c)
        else:  # cyclic shift + zero padding + partition in one gather
            flat = y.view(b, t * h * w, c)
            if geo.needs_pad:
                flat = torch.cat([flat, flat.new_zeros(b, 1, c)], dim=1)
            windows = flat.index_select(1, gather).view(b * geo.num_windows, n, c)
        out = self.attn(windows, geo.bias_index, geo.shift_mask if shifted else None, geo.num_windows)
        if scatter is not None:
            return x + self.drop_path(out.view(b, -1, c).index_select(1, scatter).view(b, t, h, w, c))
        # window reverse as a strided view; the residual add does the reordering copy in the same pass
        out = self.drop_path(
            out.view(b, t // wt, h // wh, w // ww, wt, wh, ww, c).permute(0, 1, 4, 2, 5, 3, 6, 7)
        )
        if torch.is_grad_enabled() and (x.requires_grad or out.requires_grad):
            return x + out.reshape(b, t, h, w, c)  # out= variants don't record autograd
        result = torch.empty_like(x, memory_format=torch.contiguous_format)
        torch.add(x.view(grid8), out, out=result.view(grid8))
        return result

    def forward(self, x: torch.Tensor, geo: WindowGeometry) -> torch.Tensor:
        x = self._attention_residual(x.contiguous(), geo)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Spatial-only 2×2 merging: concat the four neighbours (4C), LayerNorm, Linear 4C → 2C (no bias)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w, _ = x.shape
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        # order x[0::2,0::2], x[1::2,0::2], x[0::2,1::2], x[1::2,1::2] as in the official code
        x = torch.cat(
            [x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], -1
        )
        return fast_linear(self.norm(x), self.reduction)


class VideoSwinStage(nn.Module):
    """``depth`` blocks sharing one cached window geometry, then (except the last stage) patch merging."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: Sequence[int],
        drop_path: Sequence[float],
        downsample: bool,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        self.window_size = _triple(window_size)
        self.blocks = nn.ModuleList(
            VideoSwinBlock(
                dim, num_heads, self.window_size, shifted=i % 2 == 1, drop_path=drop_path[i], **block_kwargs
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None
        self.grad_checkpointing = False
        self._geometry: dict[tuple, WindowGeometry] = {}

    def geometry(self, size_thw: Sequence[int], device: torch.device) -> WindowGeometry:
        """Window geometry for this input shape/device, built once (holds no parameters: never stale)."""
        key = (tuple(size_thw), str(device))
        geo = self._geometry.get(key)
        if geo is None:
            if len(self._geometry) >= 16:  # many distinct shapes (e.g. multi-scale training): bound memory
                self._geometry.clear()
            geo = self._geometry[key] = build_window_geometry(size_thw, self.window_size, device)
        return geo

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output of the blocks, output after merging — the same tensor for the last stage)."""
        geo = self.geometry(x.shape[1:4], x.device)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, geo, use_reentrant=False)
            else:
                x = block(x, geo)
        merged = self.downsample(x) if self.downsample is not None else x
        return x, merged


# ----------------------------------------------------------------------------------------------- model


class VideoSwinTransformer(nn.Module):
    """Video Swin backbone: ``[B, 3, T, H, W]`` → token grid ``[B, T/2, H/32, W/32, 8C]`` → pooled embedding.

    Args:
        patch_size: 3D patch (P, 4, 4); the paper uses (2, 4, 4).
        embed_dim: C, the stage-1 width; the last stage has ``num_features = 8C``.
        depths / num_heads: blocks and heads per stage.
        window_size: 3D window (P', M, M), e.g. (8, 7, 7).
        drop_path_rate: stochastic depth, linearly increasing over all blocks.
        output_dim: if set, ``forward`` projects the pooled features to this size (``None`` → 8C).
    """

    def __init__(
        self,
        patch_size: Sequence[int] = (2, 4, 4),
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: Sequence[int] = (8, 7, 7),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        patch_norm: bool = True,
        output_dim: int | None = None,
    ) -> None:
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} differ in length")
        self.patch_size = _triple(patch_size)
        self.window_size = _triple(window_size)
        self.embed_dim = embed_dim
        self.num_layers = len(depths)
        self.num_features = embed_dim * 2 ** (self.num_layers - 1)
        self.output_dim = output_dim if output_dim is not None else self.num_features
        self.patch_embed = PatchEmbed3d(self.patch_size, in_chans, embed_dim, patch_norm)
        self.pos_drop = nn.Dropout(drop_rate)
        total = sum(depths)
        rates = [drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
        self.layers = nn.ModuleList()
        start = 0
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            self.layers.append(
                VideoSwinStage(
                    embed_dim * 2**i,
                    depth,
                    heads,
                    self.window_size,
                    drop_path=rates[start : start + depth],
                    downsample=i < self.num_layers - 1,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                )
            )
            start += depth
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, output_dim) if output_dim is not None else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward (saves memory when fine-tuning)."""
        for layer in self.layers:
            layer.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor, return_stages: bool = False):
        """``[B, 3, T, H, W]`` → normalised token grid ``[B, T/P, H/32, W/32, 8C]``.

        With ``return_stages=True`` returns ``(grid, stages)`` where ``stages[i]`` is stage i's block output
        (before merging and the final norm), ``[B, T/P, H/2^(i+2), W/2^(i+2), C·2^i]``.
        """
        if x.ndim != 5 or x.shape[1] != self.patch_embed.proj.in_channels:
            raise ValueError(
                f"expected video [B, {self.patch_embed.proj.in_channels}, T, H, W], got {tuple(x.shape)}"
            )
        x = self.pos_drop(self.patch_embed(x))
        stages = []
        for layer in self.layers:
            out, x = layer(x)
            stages.append(out)
        grid = self.norm(x)
        return (grid, stages) if return_stages else grid

    def forward_head(self, grid: torch.Tensor) -> torch.Tensor:
        """Mean over the token grid, then the optional projection."""
        return self.head(grid.mean(dim=(1, 2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, T, H, W]`` → ``[B, output_dim]`` (not normalised)."""
        return self.forward_head(self.forward_features(x))

    # --- vidsift encoder API (frames as produced by the registry transform: [..., T, 3, S, S]) ---

    def encode_clips(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, N, T, 3, S, S]`` (+ mask ``[B, N, T]``) → L2-normalised ``[B, N, D]`` per-clip embeddings.

        Padded frames (mask False) are replaced by the clip's last valid frame so they add no new content;
        clips with no valid frame get a zero embedding.
        """
        b, n, t = frames.shape[:3]
        clips = frames.reshape(b * n, t, *frames.shape[3:])
        valid_clip = torch.ones(b * n, dtype=torch.bool, device=frames.device)
        if mask is not None:
            m = mask.reshape(b * n, t).to(frames.device).bool()
            valid_clip = m.any(dim=1)
            pos = torch.arange(t, device=frames.device).expand(b * n, t)
            last_valid = torch.where(m, pos, torch.full_like(pos, -1)).cummax(dim=1).values.clamp(min=0)
            clips = clips.gather(1, last_valid.view(b * n, t, 1, 1, 1).expand_as(clips))
        param = next(self.parameters())
        emb = self(clips.permute(0, 2, 1, 3, 4).to(device=param.device, dtype=param.dtype))
        emb = F.normalize(emb, dim=-1) * valid_clip[:, None].to(device=emb.device, dtype=emb.dtype)
        return emb.view(b, n, -1)

    def encode_video(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T, 3, S, S]`` or ``[B, N, T, 3, S, S]`` → L2-normalised ``[B, D]`` (mean of valid clips)."""
        if frames.ndim == 5:
            frames = frames.unsqueeze(1)
            mask = mask.unsqueeze(1) if mask is not None else None
        clips = self.encode_clips(frames, mask)
        return F.normalize(clips.sum(dim=1), dim=-1)


# ----------------------------------------------------------------------------------- checkpoint filter

CHECKPOINT_SOURCES = ("vidsift", "torchvision", "mmaction", "swin2d")

# Keys that are derived (index buffers, masks) or belong to a classifier we don't use.
_DERIVED_KEY = re.compile(r"(relative_position_index|attn_mask)$")
_CLASSIFIER_KEY = re.compile(r"^(head|cls_head|fc|classifier)(\.|$)")


def _unwrap(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Strip the usual nesting (``state_dict`` / ``model`` / ``module``) and the ``module.`` DDP prefix."""
    for key in ("state_dict", "model", "module"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


def _filter_torchvision(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision ``swin3d_*``: ``features.{2i}.{j}`` blocks, ``features.{2i+1}`` merging, ``mlp.{0,3}``."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"^features\.(\d+)\.(.*)$", k)
        if m:
            idx, rest = int(m.group(1)), m.group(2)
            if idx % 2 == 0:
                bm = re.match(r"^(\d+)\.(.*)$", rest)
                if bm:
                    name = bm.group(2).replace("mlp.0.", "mlp.fc1.").replace("mlp.3.", "mlp.fc2.")
                    k = f"layers.{idx // 2}.blocks.{bm.group(1)}.{name}"
            else:
                k = f"layers.{idx // 2}.downsample.{rest}"
        out[k] = v
    return out


def _filter_mmaction(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official Video-Swin-Transformer (mmaction): ``backbone.`` prefix, otherwise our names."""
    out = {}
    for k, v in sd.items():
        if k.startswith("backbone."):
            k = k[len("backbone.") :]
        out[k] = v
    return out


def _inflate_bias_table(table: torch.Tensor, window_size: Sequence[int]) -> torch.Tensor:
    """2D ``[(2M-1)^2, nH]`` → 3D ``[(2P-1)(2M-1)(2M-1), nH]``: bicubic resize if M differs, tile 2P-1×."""
    wt, wh, ww = window_size
    length, heads = table.shape
    side = int(round(math.sqrt(length)))
    if side * side != length:
        raise ValueError(f"2D relative position table of {length} rows is not square")
    target = (2 * wh - 1, 2 * ww - 1)
    if (side, side) != target:
        grid = table.t().reshape(1, heads, side, side).float()
        grid = F.interpolate(grid, size=target, mode="bicubic", align_corners=False)
        table = grid.reshape(heads, -1).t().to(table.dtype)
    return table.repeat(2 * wt - 1, 1)


def _filter_swin2d(
    sd: dict[str, torch.Tensor], patch_size: Sequence[int], window_size: Sequence[int]
) -> dict[str, torch.Tensor]:
    """2D Swin ImageNet checkpoint (timm or original Microsoft layout) inflated to 3D as in the paper."""
    num_stages = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"^layers\.(\d+)\.", k))), default=0)
    # Microsoft's layout merges at the end of stage i (layers.i.downsample), timm ≥ 0.9 at the start of
    # stage i+1 (layers.{i+1}.downsample); ours follows Microsoft's.
    timm_layout = f"layers.{num_stages - 1}.downsample.reduction.weight" in sd
    out = {}
    for k, v in sd.items():
        m = re.match(r"^layers\.(\d+)\.downsample\.(.*)$", k)
        if m and timm_layout:
            k = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        if k == "patch_embed.proj.weight" and v.ndim == 4:
            # repeat the 2D kernel over the P temporal positions and divide by P: the same response to a
            # static video as the 2D model has to one frame
            p = _triple(patch_size)[0]
            v = v.unsqueeze(2).repeat(1, 1, p, 1, 1) / p
        elif k.endswith("relative_position_bias_table") and v.ndim == 2:
            v = _inflate_bias_table(v, _triple(window_size))
        out[k] = v
    return out


def convert_checkpoint(
    state_dict: dict[str, Any],
    source: str,
    patch_size: Sequence[int] = (2, 4, 4),
    window_size: Sequence[int] = (8, 7, 7),
) -> dict[str, torch.Tensor]:
    """Map a ``source`` layout state dict to ours: ``vidsift``, ``torchvision``, ``mmaction`` or ``swin2d``.

    Derived buffers (``relative_position_index``, ``attn_mask``) and classifier heads (``head.*``,
    ``cls_head.*``) are dropped and logged; every other key is renamed or passed through unchanged, so keys
    we don't understand surface as *unexpected* when loading. ``patch_size``/``window_size`` are the target
    model's (used by the 2D inflation).
    """
    if source not in CHECKPOINT_SOURCES:
        raise ValueError(f"unknown checkpoint source {source!r}; expected one of {CHECKPOINT_SOURCES}")
    sd = _unwrap(dict(state_dict))
    if source == "torchvision":
        sd = _filter_torchvision(sd)
    elif source == "mmaction":
        sd = _filter_mmaction(sd)
    elif source == "swin2d":
        sd = _filter_swin2d(sd, patch_size, window_size)
    out, dropped = {}, []
    for k, v in sd.items():
        if _DERIVED_KEY.search(k) or (source != "vidsift" and _CLASSIFIER_KEY.match(k)):
            dropped.append(k)
            continue
        out[k] = v
    if dropped:
        log.info(
            "convert_checkpoint(%s): dropped %d derived/classifier keys: %s",
            source,
            len(dropped),
            ", ".join(sorted(dropped)[:8]) + (" ..." if len(dropped) > 8 else ""),
        )
    return out


@dataclass
class LoadReport:
    """What happened when weights were loaded: keys our model lacks / the checkpoint lacks / shape clashes."""

    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        parts = []
        for label, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("shape mismatch", self.mismatched),
        ):
            if keys:
                parts.append(
                    f"{label} ({len(keys)}): {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}"
                )
        return "; ".join(parts) or "all keys matched"


def load_pretrained(
    model: VideoSwinTransformer,
    state_dict_or_path: dict[str, Any] | str | os.PathLike,
    source: str = "vidsift",
    strict: bool = True,
) -> LoadReport:
    """Load weights from a state dict or a file (vidsift checkpoint or raw state dict in ``source`` layout).

    Raises on missing/unexpected/mis-shaped keys unless ``strict=False``, in which case they are logged as
    a warning and returned in the :class:`LoadReport`. The projection ``head`` of a model built with
    ``output_dim`` counts as missing when the checkpoint has none — pass ``strict=False`` to keep it random.
    """
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        path = require_file(state_dict_or_path)
        if is_vidsift_checkpoint(path):
            state_dict, source = load_checkpoint(path)["state_dict"], "vidsift"
        else:
            try:
                state_dict = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise PretrainedWeightsMismatch(
                    f"pretrained weights {path!r} could not be read safely: {exc}"
                ) from exc
            if not isinstance(state_dict, dict):
                raise PretrainedWeightsMismatch(
                    f"pretrained weights {path!r} hold a {type(state_dict).__name__}, not a state dict"
                )
    else:
        state_dict = state_dict_or_path
    converted = convert_checkpoint(state_dict, source, model.patch_size, model.window_size)
    own = model.state_dict()
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in converted.items()
        if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape
    ]
    loadable = {k: v for k, v in converted.items() if k in own and v.shape == own[k].shape}
    report = LoadReport(
        missing=sorted(k for k in own if k not in converted),
        unexpected=sorted(k for k in converted if k not in own),
        mismatched=mismatched,
    )
    if not report.ok:
        if strict:
            raise PretrainedWeightsMismatch(f"weights ({source}) do not fit {type(model).__name__}: {report}")
        log.warning("loading %s weights non-strictly: %s", source, report)
    model.load_state_dict(loadable, strict=False)
    return report


# ------------------------------------------------------------------------------------------- builder

# Constructor arguments of VideoSwinTransformer a config may hold (besides image_size / num_frames).
MODEL_KEYS = (
    "patch_size",
    "embed_dim",
    "depths",
    "num_heads",
    "window_size",
    "mlp_ratio",
    "drop_path_rate",
    "drop_rate",
    "attn_drop_rate",
    "qkv_bias",
    "patch_norm",
    "output_dim",
    "in_chans",
)
CONFIG_KEYS = (*MODEL_KEYS, "image_size", "num_frames")


def video_swin_from_config(config: dict[str, Any], device: str | torch.device | None = None):
    """A randomly initialised :class:`VideoSwinTransformer` from a ``video_swin`` config (``device="meta"``:
    no init, for weights that will overwrite every tensor)."""
    kwargs = {k: config[k] for k in MODEL_KEYS if k in config}
    if device is None:
        return VideoSwinTransformer(**kwargs)
    with torch.device(device):
        return VideoSwinTransformer(**kwargs)


def build_video_swin(
    name: str,
    config: dict[str, Any],
    pretrained: str | os.PathLike | None = None,
    pretrained_source: str | None = None,
    strict: bool = True,
    **overrides: Any,
):
    """Factory builder: ``(VideoSwinTransformer, VideoTransform (bilinear, ImageNet), None)``.

    ``overrides`` replace config entries (``output_dim``, ``drop_path_rate``, ``image_size``, ...);
    ``pretrained`` is a vidsift checkpoint or a raw state dict file whose layout ``pretrained_source``
    names (``torchvision`` / ``mmaction`` / ``swin2d`` / ``vidsift``).
    """
    cfg = merge_config(name, config, overrides, CONFIG_KEYS)
    transform = VideoTransform(cfg["image_size"], IMAGENET_MEAN, IMAGENET_STD, interpolation="bilinear")
    if pretrained is None:
        return video_swin_from_config(cfg), transform, None
    path = require_file(pretrained)
    vidsift = is_vidsift_checkpoint(path)
    if not vidsift and pretrained_source is None:
        raise PretrainedWeightsMismatch(
            f"{path!r} is not a vidsift checkpoint; name its layout with pretrained_source= "
            f"(one of {CHECKPOINT_SOURCES})"
        )
    # every tensor will be overwritten (or the load raises): skip the random init, it dominates build time
    if strict:
        model = video_swin_from_config(cfg, "meta").to_empty(device="cpu")
    else:
        model = video_swin_from_config(cfg)
    if vidsift:
        load_pretrained(model, load_checkpoint(path)["state_dict"], "vidsift", strict=strict)
    else:
        load_pretrained(model, path, pretrained_source, strict=strict)
    return model, transform, None

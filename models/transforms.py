"""Model-side video transform and tokenizer: the one resize-and-crop every family uses.

``VideoTransform`` turns decoded uint8 frames ``[..., T, H, W, 3]`` (numpy, torch, or anything
``np.asarray`` takes) into the float ``[..., T, 3, S, S]`` tensor a model eats: resize the shorter side to
``S`` (antialiased; ``bicubic`` like CLIP's preprocessing, ``bilinear`` for the Video Swin families), centre
crop ``S x S``, scale to [0, 1] and normalise with ``mean``/``std``. Bicubic overshoots, so its resized
pixels are clamped back to [0, 1]; antialiased bilinear is a convex combination and is left as is. Bad
input is a ``ValueError`` naming what was received and the expected layout. It is a plain picklable
object so Ray Data stages can ship it to workers.

Per family (set by its builder): CLIP4Clip bicubic + CLIP mean/std; the VidSwin dual encoder bicubic +
ImageNet mean/std; Video Swin and SwinBERT bilinear + ImageNet mean/std.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Kinetics Video Swin checkpoints were trained on ImageNet-normalised RGB in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "area")
LAYOUT = "uint8 [..., T, H, W, 3] (RGB frames, channels last)"


class VideoTransform:
    """uint8 ``[..., T, H, W, 3]`` → float32 ``[..., T, 3, S, S]`` (resize, centre crop, normalise)."""

    def __init__(
        self,
        image_size: int,
        mean: tuple[float, ...] = CLIP_MEAN,
        std: tuple[float, ...] = CLIP_STD,
        interpolation: str = "bicubic",
    ):
        if int(image_size) <= 0:
            raise ValueError(f"image_size must be positive, got {image_size!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {interpolation!r} is not one of {INTERPOLATIONS}")
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.interpolation = interpolation

    def __repr__(self) -> str:
        return (
            f"VideoTransform(image_size={self.image_size}, mean={self.mean}, std={self.std}, "
            f"interpolation={self.interpolation!r})"
        )

    def __call__(self, frames: Any) -> torch.Tensor:
        x = as_uint8_frames(frames)
        lead = x.shape[:-3]
        h, w = int(x.shape[-3]), int(x.shape[-2])
        x = x.reshape(-1, h, w, 3).permute(0, 3, 1, 2).float().div_(255.0)
        s = self.image_size
        if (h, w) != (s, s):
            x = self._resize_crop(x, h, w)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, 3, 1, 1)
        x = (x - mean) / std
        return x.reshape(*lead, 3, s, s).contiguous()

    def _resize_crop(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``[N, 3, H, W]`` in [0, 1]: shorter side to S, then the centre ``S x S``."""
        s = self.image_size
        scale = s / min(h, w)
        new_h, new_w = max(s, round(h * scale)), max(s, round(w * scale))
        if (new_h, new_w) != (h, w):
            if self.interpolation in ("bilinear", "bicubic"):
                x = F.interpolate(
                    x, size=(new_h, new_w), mode=self.interpolation, align_corners=False, antialias=True
                )
            else:
                x = F.interpolate(x, size=(new_h, new_w), mode=self.interpolation)
            if self.interpolation == "bicubic":
                x = x.clamp_(0.0, 1.0)
        top, left = (new_h - s) // 2, (new_w - s) // 2
        return x[:, :, top : top + s, left : left + s]


def as_uint8_frames(frames: Any) -> torch.Tensor:
    """``frames`` as a uint8 tensor ``[..., T, H, W, 3]``; a ``ValueError`` naming what came otherwise."""
    if isinstance(frames, torch.Tensor):
        x = frames
    else:
        array = np.asarray(frames)
        if array.dtype != np.uint8:
            raise ValueError(
                f"frames must be {LAYOUT}, got a {type(frames).__name__} of dtype {array.dtype} "
                f"with shape {array.shape}"
            )
        x = torch.from_numpy(np.ascontiguousarray(array))
    if x.dtype != torch.uint8 or x.ndim < 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be {LAYOUT}, got {x.dtype} with shape {tuple(x.shape)}")
    h, w = int(x.shape[-3]), int(x.shape[-2])
    if h == 0 or w == 0:
        raise ValueError(f"frames must be {LAYOUT}, got an empty spatial size {h}x{w}")
    return x


def build_tokenizer(context_length: int) -> SimpleTokenizer:
    """open_clip's bundled BPE ``SimpleTokenizer`` (vocab ships with the package: works offline)."""
    return SimpleTokenizer(context_length=int(context_length))

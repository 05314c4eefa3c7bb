"""Model-side video transforms and tokenizers.

``VideoTransform`` turns decoded uint8 frames ``[..., T, H, W, 3]`` (numpy or torch) into the float
``[..., T, 3, S, S]`` tensor a retrieval model eats: resize the shorter side to ``S`` (bicubic, antialiased,
like CLIP's preprocessing), centre crop ``S x S``, scale to [0, 1] and normalise with the CLIP mean/std.
It is a plain picklable object so Ray Data stages can ship it to workers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
        if isinstance(frames, np.ndarray):
            frames = torch.from_numpy(np.ascontiguousarray(frames))
        if not isinstance(frames, torch.Tensor):
            raise TypeError(f"frames must be a numpy array or torch tensor, got {type(frames).__name__}")
        if frames.dtype != torch.uint8:
            raise TypeError(f"frames must be uint8 [..., T, H, W, 3], got dtype {frames.dtype}")
        if frames.ndim < 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [..., T, H, W, 3], got shape {tuple(frames.shape)}")
        lead = frames.shape[:-3]
        h, w = int(frames.shape[-3]), int(frames.shape[-2])
        if h == 0 or w == 0:
            raise ValueError(f"frames have an empty spatial size {h}x{w}")
        x = frames.reshape(-1, h, w, 3).permute(0, 3, 1, 2).float().div_(255.0)
        s = self.image_size
        if (h, w) != (s, s):
            scale = s / min(h, w)
            new_h, new_w = max(s, round(h * scale)), max(s, round(w * scale))
            if (new_h, new_w) != (h, w):
                antialias = self.interpolation in ("bilinear", "bicubic")
                x = (
                    F.interpolate(
                        x,
                        size=(new_h, new_w),
                        mode=self.interpolation,
                        align_corners=False,
                        antialias=antialias,
                    )
                    if antialias
                    else F.interpolate(x, size=(new_h, new_w), mode=self.interpolation)
                )
                x = x.clamp_(0.0, 1.0)
            top, left = (new_h - s) // 2, (new_w - s) // 2
            x = x[:, :, top : top + s, left : left + s]
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, 3, 1, 1)
        x = (x - mean) / std
        return x.reshape(*lead, 3, s, s).contiguous()


def build_tokenizer(context_length: int):
    """open_clip's bundled BPE ``SimpleTokenizer`` (vocab ships with the package: works offline)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=int(context_length))

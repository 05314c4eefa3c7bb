"""Shared pixel work on decoded frames: display rotation, centre-crop + antialiased resize."""

from __future__ import annotations

from typing import Union

import numpy as np

Size = Union[int, tuple[int, int], None]


def size_hw(size: Size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        h, w = (int(v) for v in size)
    if h < 1 or w < 1:
        raise ValueError(f"size={size!r}: must be positive")
    return h, w


def crop_resize(frames: np.ndarray, size: Size) -> np.ndarray:
    """Centre-crop uint8 ``[K, H, W, 3]`` to the aspect ratio of ``size`` and resize to it (antialiased).

    Equivalent to "resize the shorter side, then centre crop" up to sub-pixel rounding, but only the kept
    region is resampled.
    """
    hw = size_hw(size)
    if hw is None or frames.shape[0] == 0:
        return frames
    out_h, out_w = hw
    h, w = frames.shape[1:3]
    scale = max(out_h / h, out_w / w)
    crop_h = min(h, max(1, round(out_h / scale)))
    crop_w = min(w, max(1, round(out_w / scale)))
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    cropped = frames[:, top : top + crop_h, left : left + crop_w]
    if (crop_h, crop_w) == (out_h, out_w):
        return np.ascontiguousarray(cropped)
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(cropped)).permute(0, 3, 1, 2).float()
    y = F.interpolate(x, size=(out_h, out_w), mode="bilinear", antialias=scale < 1, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def rotate_frame(frame: np.ndarray, rotation: float) -> np.ndarray:
    """Apply display rotation (degrees counter-clockwise, as in the display matrix) to ``[H, W, 3]``."""
    k = int(round(rotation / 90.0)) % 4
    return np.ascontiguousarray(np.rot90(frame, k=k)) if k else frame

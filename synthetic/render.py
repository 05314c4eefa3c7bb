"""Rendering a spec to RGB frames: vectorised numpy masks on a torus."""

from __future__ import annotations

from typing import Any

import numpy as np

from synthetic.spec import COLOURS, GROW_DELTA, RenderConfig, stream_rng


# ---------------------------------------------------------------------------------------------------------
# Rendering: vectorised numpy masks on a torus.
# ---------------------------------------------------------------------------------------------------------
def _progress(t_frac: float, window: tuple[float, float]) -> float:
    """Time spent inside the event window up to ``t_frac`` (fraction of the video)."""
    return min(max(t_frac, window[0]), window[1]) - window[0]


def shape_state(
    s: dict[str, Any], t: float, duration: float, anchor_t: float
) -> tuple[float, float, float, bool]:
    """Centre (x, y) in frame sides (mod 1), radius in frame sides, and visibility of shape ``s`` at ``t``."""
    window = s["window"]
    t_frac, anchor_frac = t / duration, anchor_t / duration
    # Seconds of event time between the anchor frame and t (negative before the anchor).
    active_s = (_progress(t_frac, window) - _progress(anchor_frac, window)) * duration
    x, y = s["anchor_xy"]
    radius = s["anchor_radius"]
    if s["event"] == "move":
        x = (x + s["velocity"][0] * active_s) % 1.0
        y = (y + s["velocity"][1] * active_s) % 1.0
    elif s["event"] in ("grow", "shrink"):
        span = (window[1] - window[0]) * duration
        sign = 1.0 if s["event"] == "grow" else -1.0
        radius = radius + sign * GROW_DELTA * active_s / span
    visible = True
    if s.get("visible_window"):  # long profile: only the background outside the event
        visible = window[0] <= t_frac < window[1]
    elif s["event"] == "appear":
        visible = t_frac >= s["switch"]
    elif s["event"] == "disappear":
        visible = t_frac < s["switch"]
    return x, y, radius, visible


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask from broadcastable offsets dx [1, W], dy [H, 1] (pixels) and radius r (pixels)."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        half = r * 0.86  # same area as the circle
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":
        top, bottom, half_base = -1.1 * r, 0.75 * r, 1.15 * r
        inside_y = (dy >= top) & (dy <= bottom)
        return inside_y & (np.abs(dx) <= half_base * (dy - top) / (bottom - top))
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.22 * r
    raise ValueError(f"unknown shape {shape!r}")


def _background(spec: dict[str, Any], size: int, seed: int) -> np.ndarray:
    base = np.asarray(spec["bg_colour"], dtype=np.float32)
    frame = np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    if spec["background"] == "textured":
        rng = stream_rng(seed, spec["index"], 2)
        coarse = rng.normal(0.0, 9.0, size=(8, 8, 1)).astype(np.float32)
        # Nearest-neighbour upsampling of a coarse grid + fine grain: a light, static texture.
        reps = -(-size // 8)
        blotches = np.repeat(np.repeat(coarse, reps, axis=0), reps, axis=1)[:size, :size]
        grain = rng.normal(0.0, 3.0, size=(size, size, 1)).astype(np.float32)
        frame = frame + blotches + grain
    return np.clip(frame, 0, 255).astype(np.uint8)


def render_frames(spec: dict[str, Any], cfg: RenderConfig, indices=None) -> np.ndarray:
    """Frames of the video (all, or those at ``indices``) as uint8 ``[T, H, W, 3]`` RGB, H = W = cfg.size.

    Frame ``i`` shows the scene at the middle of its interval, ``(i + 0.5) / fps``. Masks are built for all
    frames at once (broadcast ``[T, H, W]``), so a 3 s clip costs a few numpy calls, not a Python pixel loop.
    """
    size, fps = cfg.size, float(cfg.fps)
    duration = spec["num_frames"] / fps
    indices = np.arange(spec["num_frames"]) if indices is None else np.asarray(indices, dtype=np.int64)
    frames = np.empty((len(indices), size, size, 3), dtype=np.uint8)
    frames[:] = _background(spec, size, cfg.seed)
    coords = np.arange(size, dtype=np.float32) + 0.5
    times = (indices + 0.5) / fps
    for s in spec["shapes"]:
        states = np.array([shape_state(s, t, duration, spec["anchor_t"]) for t in times], dtype=np.float32)
        states = states.reshape(len(times), 4)
        x, y, radius, visible = states[:, 0], states[:, 1], states[:, 2], states[:, 3] > 0
        # Offsets on the torus: a shape leaving one edge is drawn entering at the opposite edge.
        half = np.float32(size / 2)
        dx = (coords[None, :] - x[:, None] * size + half) % size - half
        dy = (coords[None, :] - y[:, None] * size + half) % size - half
        mask = _shape_mask(
            s["shape"], dx[:, None, :], dy[:, :, None], radius[:, None, None] * np.float32(size)
        )
        mask &= visible[:, None, None]
        frames[mask] = COLOURS[s["colour"]]
    return frames


def render_frame(spec: dict[str, Any], cfg: RenderConfig, i: int) -> np.ndarray:
    """Frame ``i`` of the video as uint8 ``[H, W, 3]`` RGB."""
    return render_frames(spec, cfg, [i])[0]

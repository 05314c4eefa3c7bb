"""What happens in one video: a JSON-serialisable spec, a pure function of ``(seed, index)``, the profile,
the duration range and fps (geometry, events, background); plus the corpus-wide render settings, video ids and
splits."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

PROFILES = ("motion", "full", "long")
SPLITS = ("train", "val", "test")

# Saturated colours that stay distinct after yuv420p chroma subsampling at 64 px.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 190, 60),
    "blue": (45, 85, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 210),
    "cyan": (40, 210, 215),
}
MOTION_COLOURS = ("red", "green", "blue", "yellow")
FULL_COLOURS = tuple(COLOURS)
MOTION_SHAPES = ("circle", "square", "triangle")
FULL_SHAPES = ("circle", "square", "triangle", "diamond")
MOTION_DIRECTIONS = ("left", "right", "up", "down")
FULL_DIRECTIONS = ("left", "right", "up", "down", "up-left", "up-right", "down-left", "down-right")
FULL_EVENTS = ("move", "grow", "shrink", "appear", "disappear")
SPEEDS = ("slowly", "quickly")

# Unit direction vectors in image coordinates (y grows downwards).
DIRECTION_VECTORS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up-left": (-math.sqrt(0.5), -math.sqrt(0.5)),
    "up-right": (math.sqrt(0.5), -math.sqrt(0.5)),
    "down-left": (-math.sqrt(0.5), math.sqrt(0.5)),
    "down-right": (math.sqrt(0.5), math.sqrt(0.5)),
}

# Speeds in frame sides per second. ``motion`` draws a speed from one range (speed is not captioned).
MOTION_SPEED_RANGE = (0.18, 0.38)
FULL_SPEED_RANGES = {"slowly": (0.10, 0.18), "quickly": (0.40, 0.60)}

# Shape "radius" as a fraction of the frame side; size events change it by GROW_DELTA.
RADIUS_RANGE = (0.05, 0.28)
GROW_DELTA = 0.07

# ``long`` profile: events per video, seconds per event, the least empty background before/between/after.
LONG_EVENTS = (2, 3)
LONG_EVENT_S = (2.0, 4.0)
LONG_MIN_GAP_S = 1.0
LONG_MIN_DURATION = LONG_EVENTS[1] * LONG_EVENT_S[1] + (LONG_EVENTS[1] + 1) * LONG_MIN_GAP_S  # 16 s
LONG_DEFAULT_DURATION = (20.0, 30.0)


# ---------------------------------------------------------------------------------------------------------
# Specs: what happens in one video (pure function of seed, index, profile, duration range and fps).
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RenderConfig:
    """Settings shared by every video of a corpus."""

    size: int
    fps: Fraction
    keyframe_interval: float
    profile: str
    seed: int
    min_duration: float
    max_duration: float

    @property
    def gop(self) -> int:
        return max(1, round(self.keyframe_interval * float(self.fps)))


def video_id_for(index: int, n: int) -> str:
    """Stable id ``synth-000042`` (at least 6 digits, more when ``n`` needs them)."""
    return f"synth-{index:0{max(6, len(str(max(n - 1, 0))))}d}"


def split_for(video_id: str, split_fractions: tuple[float, float, float]) -> str:
    """Deterministic split from a hash of the video id (independent of seed and of n)."""
    u = int.from_bytes(hashlib.sha256(video_id.encode()).digest()[:8], "big") / 2.0**64
    cumulative = 0.0
    for name, fraction in zip(SPLITS, split_fractions):
        cumulative += fraction
        if u < cumulative:
            return name
    return SPLITS[-1]


def stream_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    # SeedSequence on a tuple gives independent streams per (seed, index, purpose), in any process.
    return np.random.default_rng([seed & 0xFFFFFFFF, index, stream])


def _event_window(slot: int, num_events: int) -> tuple[float, float]:
    """Fraction of the video during which event ``slot`` happens (events never overlap)."""
    if num_events == 1:
        return (0.0, 1.0)
    return (0.05, 0.48) if slot == 0 else (0.52, 0.95)


def make_spec(cfg: RenderConfig, index: int) -> dict[str, Any]:
    """The semantic + geometric description of video ``index`` (JSON-serialisable)."""
    rng = stream_rng(cfg.seed, index, 0)
    fps = float(cfg.fps)
    duration_req = rng.uniform(cfg.min_duration, cfg.max_duration)
    num_frames = max(1, round(duration_req * fps))
    if cfg.profile == "long":
        return _long_spec(cfg, index, rng, num_frames)
    if cfg.profile == "motion":
        num_shapes = 1
        colours, shapes, directions = MOTION_COLOURS, MOTION_SHAPES, MOTION_DIRECTIONS
    else:
        num_shapes = int(rng.integers(1, 3))
        colours, shapes, directions = FULL_COLOURS, FULL_SHAPES, FULL_DIRECTIONS

    picked: list[tuple[str, str]] = []
    while len(picked) < num_shapes:
        pair = (colours[rng.integers(len(colours))], shapes[rng.integers(len(shapes))])
        if pair not in picked:  # two shapes must be tellable apart in the caption
            picked.append(pair)

    # Anchor frame: the frame whose position/size are drawn uniformly; everything else follows from it.
    anchor_t = (rng.integers(num_frames) + 0.5) / fps if num_frames else 0.0
    shape_specs = []
    first_x = None
    for slot, (colour, shape) in enumerate(picked):
        event = "move" if cfg.profile == "motion" else FULL_EVENTS[rng.integers(len(FULL_EVENTS))]
        direction = speed = None
        velocity = (0.0, 0.0)
        if event == "move":
            direction = directions[rng.integers(len(directions))]
            if cfg.profile == "motion":
                speed_value = rng.uniform(*MOTION_SPEED_RANGE)
            else:
                speed = SPEEDS[rng.integers(len(SPEEDS))]
                speed_value = rng.uniform(*FULL_SPEED_RANGES[speed])
            vx, vy = DIRECTION_VECTORS[direction]
            velocity = (vx * speed_value, vy * speed_value)
        x = rng.uniform(0.0, 1.0)
        y = rng.uniform(0.0, 1.0)
        if first_x is not None:
            # Keep the second shape half a frame away from the first (still uniform marginally).
            x = (first_x + 0.5 + rng.uniform(-0.1, 0.1)) % 1.0
        first_x = x
        if event in ("grow", "shrink"):
            radius = rng.uniform(RADIUS_RANGE[0] + GROW_DELTA, RADIUS_RANGE[1] - GROW_DELTA)
        else:
            # Same spread as a size event seen at a random frame, so size alone hints nothing.
            radius = rng.uniform(RADIUS_RANGE[0] + GROW_DELTA, RADIUS_RANGE[1] - GROW_DELTA) + GROW_DELTA * (
                rng.uniform() - rng.uniform()
            )
        w0, w1 = _event_window(slot, num_shapes)
        # Appear/disappear happen at one instant inside the window, away from its ends.
        switch = w0 + (w1 - w0) * rng.uniform(0.2, 0.8)
        shape_specs.append(
            {
                "colour": colour,
                "shape": shape,
                "event": event,
                "direction": direction,
                "speed": speed,
                "velocity": [float(velocity[0]), float(velocity[1])],
                "anchor_xy": [float(x), float(y)],
                "anchor_radius": float(radius),
                "window": [w0, w1],
                "switch": float(switch),
            }
        )
    background = "plain" if rng.uniform() < 0.5 else "textured"
    bg_level = rng.uniform(20, 80)
    bg_tint = rng.uniform(-10, 10, size=3)
    return {
        "index": index,
        "num_frames": int(num_frames),
        "anchor_t": float(anchor_t),
        "shapes": shape_specs,
        "background": background,
        "bg_colour": [float(np.clip(bg_level + t, 0, 255)) for t in bg_tint],
    }


def _event_frames(rng: np.random.Generator, num_frames: int, fps: float) -> list[tuple[int, int]]:
    """``[first, end)`` frame ranges of 2-3 events at random times, >= LONG_MIN_GAP_S apart and from the
    ends of the video (``long`` profile)."""
    count = int(rng.integers(LONG_EVENTS[0], LONG_EVENTS[1] + 1))
    lengths = [max(1, round(rng.uniform(*LONG_EVENT_S) * fps)) for _ in range(count)]
    gap = max(1, round(LONG_MIN_GAP_S * fps))
    free = num_frames - sum(lengths) - (count + 1) * gap
    if free < 0:
        raise ValueError(f"video of {num_frames} frames is too short for {count} events (profile long)")
    cuts = np.sort(rng.integers(0, free + 1, size=count))
    extra = np.diff(np.concatenate([[0], cuts]))
    frames, cursor = [], 0
    for length, more in zip(lengths, extra):
        cursor += gap + int(more)
        frames.append((cursor, cursor + length))
        cursor += length
    return frames


def _long_spec(cfg: RenderConfig, index: int, rng: np.random.Generator, num_frames: int) -> dict[str, Any]:
    """Spec of a ``long`` video: one motion-style shape per event, visible only during its event."""
    fps = float(cfg.fps)
    events = _event_frames(rng, num_frames, fps)
    picked: list[tuple[str, str]] = []
    while len(picked) < len(events):
        colour = MOTION_COLOURS[rng.integers(len(MOTION_COLOURS))]
        pair = (colour, MOTION_SHAPES[rng.integers(len(MOTION_SHAPES))])
        if pair not in picked:  # each event's caption names a shape the others do not show
            picked.append(pair)
    shape_specs = []
    for (colour, shape), (f0, f1) in zip(picked, events):
        direction = MOTION_DIRECTIONS[rng.integers(len(MOTION_DIRECTIONS))]
        speed_value = rng.uniform(*MOTION_SPEED_RANGE)
        vx, vy = DIRECTION_VECTORS[direction]
        radius = rng.uniform(RADIUS_RANGE[0] + GROW_DELTA, RADIUS_RANGE[1] - GROW_DELTA)
        shape_specs.append({
            "colour": colour, "shape": shape, "event": "move", "direction": direction, "speed": None,
            "velocity": [float(vx * speed_value), float(vy * speed_value)],
            "anchor_xy": [float(rng.uniform()), float(rng.uniform())], "anchor_radius": float(radius),
            "window": [f0 / num_frames, f1 / num_frames], "switch": None, "frames": [int(f0), int(f1)],
            "visible_window": True,
        })
    bg_level = rng.uniform(20, 80)
    bg_tint = rng.uniform(-10, 10, size=3)
    return {
        "index": index,
        "num_frames": int(num_frames),
        "anchor_t": float((events[0][0] + 0.5) / fps),  # the first event starts at its drawn position
        "shapes": shape_specs,
        "background": "plain" if rng.uniform() < 0.5 else "textured",
        "bg_colour": [float(np.clip(bg_level + t, 0, 255)) for t in bg_tint],
    }

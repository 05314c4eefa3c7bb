"""Synthetic text-video corpus: coloured shapes doing captioned events, encoded as real H.264 mp4.

Every video is a pure function of ``(seed, index)`` and the render settings, so a corpus regenerates
byte-for-byte in any order, in any number of worker processes, and any subset can be rebuilt alone.

Design rule: **no single frame tells the caption**. Moving shapes wrap around the frame edges (toroidal
motion) from a uniformly random position, so the position of a shape in any frame is uniform whatever its
direction; growing/shrinking shapes are anchored at a uniformly random frame with a uniform size there, so the
size marginal of "grows" equals that of "shrinks". Only the change between frames tells the caption.

Profiles:
- ``motion``: one shape; caption = colour x shape x direction (4 x 3 x 4 = 48 classes).
- ``full``: one or two shapes; events move (8 directions, slowly/quickly), grow, shrink, appear, disappear;
  with two shapes the events happen one after the other and the order is part of the caption.
- ``long`` (moments, docs/moments.md): 20-30 s videos (``min_duration >= 16``) with 2-3 events of 2-4 s at
  random non-overlapping times, each a ``motion``-style shape (colour x shape x direction) that is visible
  and moving only during its event; between events only the static background. The manifest gets a
  ``segments`` column: one ``{start_s, end_s, caption}`` per event (times on the frame grid, the caption
  names the event), and ``captions`` describe the events in order. The ``test`` split's timed captions
  use HELDOUT_SEGMENT_TEMPLATES, sentence shapes that no training caption has (held-out query phrasing).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

# Bump when rendering or encoding changes: it is part of every video's digest, so old files get rebuilt.
GENERATOR_VERSION = 7

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

# ---------------------------------------------------------------------------------------------------------
# Caption vocabulary. Every synonym list is disjoint from every other list of the same slot, and templates
# are unambiguous, so a caption string determines its semantic class (tests check this).
# ---------------------------------------------------------------------------------------------------------
COLOUR_WORDS = {
    "red": ["red", "crimson", "scarlet"],
    "green": ["green", "emerald"],
    "blue": ["blue", "azure"],
    "yellow": ["yellow", "golden"],
    "purple": ["purple", "violet"],
    "cyan": ["cyan", "turquoise"],
}
SHAPE_WORDS = {
    "circle": ["circle", "disk", "round shape", "ball"],
    "square": ["square", "box", "block", "square shape"],
    "triangle": ["triangle", "triangular shape", "wedge"],
    "diamond": ["diamond", "rhombus", "diamond shape"],
}
MOVE_VERBS = ["moves", "slides", "travels", "drifts", "glides"]
DIRECTION_WORDS = {
    "left": ["to the left", "leftwards", "left"],
    "right": ["to the right", "rightwards", "right"],
    "up": ["up", "upwards", "towards the top"],
    "down": ["down", "downwards", "towards the bottom"],
    "up-left": ["up and to the left", "diagonally up-left", "towards the top left"],
    "up-right": ["up and to the right", "diagonally up-right", "towards the top right"],
    "down-left": ["down and to the left", "diagonally down-left", "towards the bottom left"],
    "down-right": ["down and to the right", "diagonally down-right", "towards the bottom right"],
}
SPEED_WORDS = {
    "slowly": ["slowly", "gently", "at a slow pace"],
    "quickly": ["quickly", "rapidly", "fast", "at high speed"],
}
EVENT_PHRASES = {
    "grow": ["grows", "gets bigger", "expands", "increases in size"],
    "shrink": ["shrinks", "gets smaller", "contracts", "decreases in size"],
    "appear": ["appears", "shows up", "comes into view", "pops into view"],
    "disappear": ["disappears", "vanishes", "goes out of view", "pops out of view"],
}
SUBJECT_TEMPLATES = ["a {colour} {shape}", "the {colour} {shape}", "one {colour} {shape}"]
SINGLE_TEMPLATES = ["{subject} {verb}", "in this clip {subject} {verb}", "we see that {subject} {verb}"]
PAIR_TEMPLATES = [
    "{s1} {v1}, then {s2} {v2}",
    "first {s1} {v1}, and then {s2} {v2}",
    "{s1} {v1} before {s2} {v2}",
    "{s1} {v1}; afterwards {s2} {v2}",
]
MIN_CAPTIONS, MAX_CAPTIONS = 2, 5

# ``long`` profile: events per video, seconds per event, the least empty background before/between/after.
LONG_EVENTS = (2, 3)
LONG_EVENT_S = (2.0, 4.0)
LONG_MIN_GAP_S = 1.0
LONG_MIN_DURATION = LONG_EVENTS[1] * LONG_EVENT_S[1] + (LONG_EVENTS[1] + 1) * LONG_MIN_GAP_S  # 16 s
LONG_DEFAULT_DURATION = (20.0, 30.0)
LONG_PREFIXES = ["", "first ", "in this video "]
# Timed captions of the ``test`` split (``long`` profile) use these sentence templates instead of
# SINGLE_TEMPLATES: held-out queries are phrased in a way no training caption is (same vocabulary, words in
# new orders, so a text tower trained from scratch has seen every token; tests check the sets are disjoint).
HELDOUT_SEGMENT_TEMPLATES = [
    "{subject} that we see {verb}",
    "in this clip we see that {subject} {verb}",
    "{subject} in this clip {verb}",
]
HELDOUT_SPLIT = "test"


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


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    # SeedSequence on a tuple gives independent streams per (seed, index, purpose), in any process.
    return np.random.default_rng([seed & 0xFFFFFFFF, index, stream])


def _event_window(slot: int, num_events: int) -> tuple[float, float]:
    """Fraction of the video during which event ``slot`` happens (events never overlap)."""
    if num_events == 1:
        return (0.0, 1.0)
    return (0.05, 0.48) if slot == 0 else (0.52, 0.95)


def make_spec(cfg: RenderConfig, index: int) -> dict[str, Any]:
    """The semantic + geometric description of video ``index`` (JSON-serialisable)."""
    rng = _rng(cfg.seed, index, 0)
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


def make_segments(spec: dict[str, Any], cfg: RenderConfig, heldout: bool = False) -> list[dict[str, Any]]:
    """The timed captions of a ``long`` video: ``{start_s, end_s, caption}`` per event, in time order.
    ``heldout``: phrased with HELDOUT_SEGMENT_TEMPLATES (the test split's), else SINGLE_TEMPLATES."""
    fps = float(cfg.fps)
    segments = []
    for slot, s in enumerate(spec["shapes"]):
        rng = random.Random(f"vidsift-segment:{cfg.seed}:{spec['index']}:{slot}")
        template = _choice(rng, HELDOUT_SEGMENT_TEMPLATES if heldout else SINGLE_TEMPLATES)
        caption = template.format(subject=_subject(s, rng), verb=_verb_phrase(s, rng, False))
        f0, f1 = s["frames"]
        segments.append({"start_s": round(f0 / fps, 6), "end_s": round(f1 / fps, 6), "caption": caption})
    return segments


def caption_class(spec: dict[str, Any], profile: str) -> str:
    """Canonical semantic key: ``red|circle|left`` (motion) or ``red|circle|move|left|slowly>...``."""
    parts = []
    for s in spec["shapes"]:
        if profile in ("motion", "long"):
            parts.append(f"{s['colour']}|{s['shape']}|{s['direction']}")
        elif s["event"] == "move":
            parts.append(f"{s['colour']}|{s['shape']}|move|{s['direction']}|{s['speed']}")
        else:
            parts.append(f"{s['colour']}|{s['shape']}|{s['event']}")
    return ">".join(parts)


def hard_group(spec: dict[str, Any]) -> str:
    """Same shapes and colours, motion and order ignored: ``blue|square+red|circle``."""
    return "+".join(sorted(f"{s['colour']}|{s['shape']}" for s in spec["shapes"]))


def _verb_phrase(s: dict[str, Any], rng: random.Random, with_speed: bool) -> str:
    if s["event"] != "move":
        return _choice(rng, EVENT_PHRASES[s["event"]])
    verb = _choice(rng, MOVE_VERBS)
    direction = _choice(rng, DIRECTION_WORDS[s["direction"]])
    if not with_speed:
        return f"{verb} {direction}"
    return f"{verb} {_choice(rng, SPEED_WORDS[s['speed']])} {direction}"


def _choice(rng: random.Random, options: list[str]) -> str:
    return options[rng.randrange(len(options))]


def _subject(s: dict[str, Any], rng: random.Random) -> str:
    template = _choice(rng, SUBJECT_TEMPLATES)
    colour = _choice(rng, COLOUR_WORDS[s["colour"]])
    subject = template.format(colour=colour, shape=_choice(rng, SHAPE_WORDS[s["shape"]]))
    if subject.startswith("a ") and colour[0] in "aeiou":
        subject = "an" + subject[1:]
    return subject


def make_captions(spec: dict[str, Any], profile: str, seed: int) -> list[str]:
    """2-5 distinct paraphrases that all state exactly the semantics of ``caption_class``."""
    # random.Random seeded with a string hashes it with SHA-512: stable across processes and Python versions,
    # and ~10x cheaper per draw than a numpy Generator (this runs ~30 times per video).
    rng = random.Random(f"vidsift-captions:{seed}:{spec['index']}")
    want = rng.randint(MIN_CAPTIONS, MAX_CAPTIONS)
    with_speed = profile == "full"
    captions: list[str] = []
    for _ in range(200):  # the phrase space is in the hundreds, so this always fills up
        shapes = spec["shapes"]
        if profile == "long":
            events = [f"{_subject(sh, rng)} {_verb_phrase(sh, rng, False)}" for sh in shapes]
            caption = _choice(rng, LONG_PREFIXES) + ", then ".join(events)
        elif len(shapes) == 1:
            caption = _choice(rng, SINGLE_TEMPLATES).format(
                subject=_subject(shapes[0], rng), verb=_verb_phrase(shapes[0], rng, with_speed)
            )
        else:
            caption = _choice(rng, PAIR_TEMPLATES).format(
                s1=_subject(shapes[0], rng),
                v1=_verb_phrase(shapes[0], rng, with_speed),
                s2=_subject(shapes[1], rng),
                v2=_verb_phrase(shapes[1], rng, with_speed),
            )
        if caption not in captions:
            captions.append(caption)
        if len(captions) == want:
            break
    return captions


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
        rng = _rng(seed, spec["index"], 2)
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


# ---------------------------------------------------------------------------------------------------------
# Encoding and validation.
# ---------------------------------------------------------------------------------------------------------
def video_digest(spec: dict[str, Any], cfg: RenderConfig) -> str:
    """Identity of a rendered file: stored in the mp4 comment tag so reruns can tell stale files."""
    payload = {
        "version": GENERATOR_VERSION,
        "spec": spec,
        "size": cfg.size,
        "fps": str(cfg.fps),
        "gop": cfg.gop,
        "seed": cfg.seed,
        "profile": cfg.profile,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def rgb_to_yuv420p(frames: np.ndarray) -> np.ndarray:
    """RGB uint8 ``[T, H, W, 3]`` -> planar yuv420p ``[T, H*3/2, W]`` (BT.601 limited range, 2x2 chroma mean).

    Integer BT.601 arithmetic in numpy rather than swscale inside the encoder: swscale's rgb24 -> yuv420p
    path gave different bytes for the same input on repeated calls, which broke bit-exact regeneration.
    """
    r, g, b = (frames[..., c].astype(np.int32) for c in range(3))
    t, h, w = r.shape
    y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16
    # Chroma from the sum of each 2x2 block (the transform is linear, so this is the mean of U and V).
    rs, gs, bs = (
        q[:, 0::2, 0::2] + q[:, 1::2, 0::2] + q[:, 0::2, 1::2] + q[:, 1::2, 1::2] for q in (r, g, b)
    )
    u = ((-38 * rs - 74 * gs + 112 * bs + 512) >> 10) + 128
    v = ((112 * rs - 94 * gs - 18 * bs + 512) >> 10) + 128
    # Planes back to back (Y, then U, then V), the layout PyAV expects for a [H*3/2, W] yuv420p array.
    luma, chroma = h * w, (h // 2) * (w // 2)
    flat = np.empty((t, luma + 2 * chroma), dtype=np.uint8)
    flat[:, :luma] = y.reshape(t, luma)  # always within [16, 235]: no clipping needed
    flat[:, luma : luma + chroma] = u.reshape(t, chroma)  # within [16, 240]
    flat[:, luma + chroma :] = v.reshape(t, chroma)
    return flat.reshape(t, h * 3 // 2, w)


def encode_mp4(frames: np.ndarray, path: Path, fps: Fraction, gop: int, comment: str = "") -> None:
    """Encode RGB frames [T, H, W, 3] (H, W even) to H.264/yuv420p mp4 at ``path`` (temp file + rename)."""
    import av

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with av.open(str(tmp), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            if comment:
                container.metadata["comment"] = comment
            stream = container.add_stream("libx264", rate=fps)
            stream.width = frames.shape[2]
            stream.height = frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {
                "preset": "veryfast",
                "crf": "20",
                "g": str(gop),
                "keyint_min": str(gop),
                "sc_threshold": "0",  # no scene-cut keyframes: keyframes exactly every `gop` frames
                "threads": "1",  # single-threaded x264 is bit-exact across runs; parallelism is per video
                # mbtree=0: with macroblock-tree rate control x264 gave different bytes for the same input on
                # rare repeated encodes; without it, 800 repeated encodes were bit-identical.
                "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:mbtree=0",
            }
            for i, planes in enumerate(rgb_to_yuv420p(frames)):
                frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
                frame.pts = i
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def is_valid_video(path: Path, digest: str, num_frames: int, size: int) -> bool:
    """True if ``path`` is a finished mp4 of this exact spec (digest tag, frame count, size)."""
    import av

    if not Path(path).is_file():
        return False
    try:
        with av.open(str(path)) as container:
            if container.metadata.get("comment") != digest or not container.streams.video:
                return False
            stream = container.streams.video[0]
            shape = (stream.frames, stream.codec_context.width, stream.codec_context.height)
            if shape != (num_frames, size, size):
                return False
            # The moov box sits at the front (faststart), so a truncated file still "opens": demux every
            # packet (cheap, no decoding) to be sure all the frame data is there.
            packets = sum(1 for packet in container.demux(stream) if packet.size)
            return packets == num_frames
    except (av.error.FFmpegError, OSError):
        return False


def _build_one(cfg: RenderConfig, index: int, n: int, videos_dir: str) -> tuple[int, bool]:
    """Render + encode one video unless a valid one exists. Returns (index, generated)."""
    spec = make_spec(cfg, index)
    digest = video_digest(spec, cfg)
    path = Path(videos_dir) / f"{video_id_for(index, n)}.mp4"
    if is_valid_video(path, digest, spec["num_frames"], cfg.size):
        return index, False
    try:
        encode_mp4(render_frames(spec, cfg), path, cfg.fps, cfg.gop, comment=digest)
    except Exception as exc:  # name the video: the bare FFmpeg/OS error says nothing about which one
        raise RuntimeError(f"synthetic video {path.name} (index {index}) was not written: {exc}") from exc
    return index, True


def _build_chunk(cfg: RenderConfig, indices: list[int], n: int, videos_dir: str) -> list[tuple[int, bool]]:
    return [_build_one(cfg, i, n, videos_dir) for i in indices]


# ---------------------------------------------------------------------------------------------------------
# Manifest + corpus.
# ---------------------------------------------------------------------------------------------------------
def _validate(n, size, fps, keyframe_interval, min_duration, max_duration, split_fractions, profile, workers):
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1 or n > 1_000_000:
        raise ValueError(f"n must be an integer in [1, 1000000], got {n!r}")
    if not 16 <= int(size) <= 1024:
        raise ValueError(f"size must be in [16, 1024] px, got {size!r}")
    if not (isinstance(fps, (int, float, Fraction)) and 0 < fps <= 240):
        raise ValueError(f"fps must be a number in (0, 240], got {fps!r}")
    if not (isinstance(keyframe_interval, (int, float)) and keyframe_interval > 0):
        raise ValueError(f"keyframe_interval must be > 0 seconds, got {keyframe_interval!r}")
    if not (0 < min_duration <= max_duration <= 3600):
        raise ValueError(
            "durations must satisfy 0 < min_duration <= max_duration <= 3600, "
            f"got min_duration={min_duration!r}, max_duration={max_duration!r}"
        )
    fractions = tuple(float(f) for f in split_fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(
            f"split_fractions must be 3 non-negative numbers summing to 1, got {split_fractions!r}"
        )
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    if profile == "long" and min_duration < LONG_MIN_DURATION:
        raise ValueError(
            f"profile long needs min_duration >= {LONG_MIN_DURATION:g} s (3 events + gaps), "
            f"got {min_duration!r}"
        )
    if not (isinstance(workers, int) and workers >= 1):
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    return fractions


def make_config(
    seed=0, min_duration=2.0, max_duration=10.0, size=128, fps=25, keyframe_interval=1.0, profile="full"
) -> RenderConfig:
    """RenderConfig with the size rounded up to even (yuv420p needs even dimensions)."""
    size = int(size)
    size += size % 2
    return RenderConfig(
        size=size,
        fps=Fraction(fps).limit_denominator(1001),
        keyframe_interval=float(keyframe_interval),
        profile=profile,
        seed=int(seed),
        min_duration=float(min_duration),
        max_duration=float(max_duration),
    )


def make_manifest(
    n: int,
    seed: int = 0,
    min_duration: float = 2.0,
    max_duration: float = 10.0,
    size: int = 128,
    fps: float = 25,
    keyframe_interval: float = 1.0,
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    profile: str = "full",
) -> pd.DataFrame:
    """The manifest of a corpus without rendering anything (a dry run: fast even for 100k videos)."""
    fractions = _validate(
        n, size, fps, keyframe_interval, min_duration, max_duration, split_fractions, profile, 1
    )
    cfg = make_config(seed, min_duration, max_duration, size, fps, keyframe_interval, profile)
    rows = []
    for index in range(n):
        spec = make_spec(cfg, index)
        video_id = video_id_for(index, n)
        shapes = spec["shapes"]
        row = {
            "video_id": video_id,
            "path": f"videos/{video_id}.mp4",
            "captions": make_captions(spec, profile, cfg.seed),
            "split": split_for(video_id, fractions),
            "caption_class": caption_class(spec, profile),
            "hard_group": hard_group(spec),
            "duration": spec["num_frames"] / float(cfg.fps),
            "fps": float(cfg.fps),
            "width": cfg.size,
            "height": cfg.size,
            "seed": cfg.seed,
            "num_frames": spec["num_frames"],
            "keyframe_interval_frames": cfg.gop,
            "profile": profile,
            "num_shapes": len(shapes),
            "background": spec["background"],
        }
        if profile == "long":
            row["segments"] = make_segments(spec, cfg, heldout=row["split"] == HELDOUT_SPLIT)
        for slot, suffix in ((0, ""), (1, "2")):
            s = shapes[slot] if slot < len(shapes) else None
            for key in ("colour", "shape", "event", "direction", "speed"):
                row[key + suffix] = s[key] if s else None
        rows.append(row)
    frame = pd.DataFrame(rows)
    for column in ("duration", "fps"):
        frame[column] = frame[column].astype("float64")
    for column in ("width", "height", "seed", "num_frames", "keyframe_interval_frames", "num_shapes"):
        frame[column] = frame[column].astype("int64")
    return frame


def write_manifest(manifest: pd.DataFrame, output_dir: Path) -> None:
    """``manifest.parquet`` + ``manifest.csv`` (captions JSON-encoded), each written atomically."""
    output_dir = Path(output_dir)
    tmp_parquet = output_dir / f".manifest.parquet.tmp-{os.getpid()}"
    manifest.to_parquet(tmp_parquet, index=False)
    os.replace(tmp_parquet, output_dir / "manifest.parquet")
    csv_frame = manifest.copy()
    for column in ("captions", "segments"):
        if column in csv_frame.columns:
            csv_frame[column] = csv_frame[column].map(json.dumps)
    tmp_csv = output_dir / f".manifest.csv.tmp-{os.getpid()}"
    csv_frame.to_csv(tmp_csv, index=False)
    os.replace(tmp_csv, output_dir / "manifest.csv")


def read_manifest_csv(path: str | Path) -> pd.DataFrame:
    """Read ``manifest.csv`` back with ``captions`` decoded to lists."""
    frame = pd.read_csv(path)
    for column in ("captions", "segments"):
        if column in frame.columns:
            frame[column] = frame[column].map(json.loads)
    return frame


def corpus_summary(manifest: pd.DataFrame, output_dir: str | Path, seconds: float) -> dict[str, Any]:
    """What a :func:`generate_corpus` run made: videos (generated / already present), caption classes,
    split sizes, total seconds of video, frame size and the run's wall time."""
    stats = manifest.attrs.get("generation_stats", {})
    return {
        "output": str(output_dir),
        "videos": len(manifest),
        "generated": stats.get("generated"),
        "skipped": stats.get("skipped"),
        "caption_classes": int(manifest["caption_class"].nunique()),
        "splits": {str(k): int(v) for k, v in manifest["split"].value_counts().items()},
        "video_seconds": round(float(manifest["duration"].sum()), 3),
        "size": int(manifest["width"].iloc[0]),
        "seconds": round(seconds, 3),
    }


def generate_corpus(
    output_dir,
    n: int,
    seed: int = 0,
    min_duration: float = 2.0,
    max_duration: float = 10.0,
    size: int = 128,
    fps: float = 25,
    keyframe_interval: float = 1.0,
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    profile: str = "full",
    workers: int = 1,
    progress: Callable[[dict], None] | None = None,
) -> pd.DataFrame:
    """Generate ``n`` captioned synthetic videos under ``output_dir`` and return the manifest.

    Writes ``videos/<video_id>.mp4`` and ``manifest.parquet`` / ``manifest.csv``. Idempotent: videos already
    present with the same spec (digest in the mp4 comment tag) are kept. ``progress`` (optional) is called
    with ``{"done", "total", "generated", "skipped", "elapsed_s"}`` as videos finish.

    ``workers > 1`` uses spawned processes, so a calling *script* needs the usual
    ``if __name__ == "__main__":`` guard (``python -m jobs.synth`` and pytest are fine).
    """
    _validate(n, size, fps, keyframe_interval, min_duration, max_duration, split_fractions, profile, workers)
    manifest = make_manifest(
        n, seed, min_duration, max_duration, size, fps, keyframe_interval, split_fractions, profile
    )
    cfg = make_config(seed, min_duration, max_duration, size, fps, keyframe_interval, profile)
    output_dir = Path(output_dir)
    videos_dir = output_dir / "videos"
    videos_dir.mkdir(parents=True, exist_ok=True)
    for stale in videos_dir.glob(".*.mp4.tmp-*"):  # leftovers of a crashed run, never finished files
        stale.unlink(missing_ok=True)

    stats = {"done": 0, "total": n, "generated": 0, "skipped": 0, "elapsed_s": 0.0}
    start = time.perf_counter()

    def record(results: list[tuple[int, bool]]) -> None:
        for _, generated in results:
            stats["done"] += 1
            stats["generated" if generated else "skipped"] += 1
        stats["elapsed_s"] = time.perf_counter() - start
        if progress is not None:
            progress(dict(stats))

    chunk = 8
    chunks = [list(range(i, min(i + chunk, n))) for i in range(0, n, chunk)]
    if workers == 1:
        for indices in chunks:
            record(_build_chunk(cfg, indices, n, str(videos_dir)))
    else:
        import multiprocessing

        # spawn: never fork a process that may hold Ray / torch threads.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = [pool.submit(_build_chunk, cfg, indices, n, str(videos_dir)) for indices in chunks]
            for future in as_completed(futures):
                record(future.result())
    write_manifest(manifest, output_dir)
    manifest.attrs["generation_stats"] = dict(stats)
    return manifest

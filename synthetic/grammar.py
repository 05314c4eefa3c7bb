"""The caption grammar: vocabulary, sentence templates, and the captions, timed captions and semantic keys
of a spec. A caption string determines its semantic class (``caption_class``)."""

from __future__ import annotations

import random
from typing import Any

from synthetic.spec import RenderConfig

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

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

from synthetic.corpus import (
    corpus_summary,
    generate_corpus,
    make_config,
    make_manifest,
    read_manifest_csv,
    write_manifest,
)
from synthetic.encode import GENERATOR_VERSION, encode_mp4, is_valid_video, rgb_to_yuv420p, video_digest
from synthetic.grammar import (
    COLOUR_WORDS,
    DIRECTION_WORDS,
    EVENT_PHRASES,
    HELDOUT_SEGMENT_TEMPLATES,
    HELDOUT_SPLIT,
    MOVE_VERBS,
    PAIR_TEMPLATES,
    SHAPE_WORDS,
    SINGLE_TEMPLATES,
    SPEED_WORDS,
    SUBJECT_TEMPLATES,
    caption_class,
    hard_group,
    make_captions,
    make_segments,
)
from synthetic.render import render_frame, render_frames, shape_state
from synthetic.spec import (
    COLOURS,
    DIRECTION_VECTORS,
    FULL_COLOURS,
    FULL_DIRECTIONS,
    FULL_EVENTS,
    FULL_SHAPES,
    LONG_DEFAULT_DURATION,
    LONG_MIN_DURATION,
    MOTION_COLOURS,
    MOTION_DIRECTIONS,
    MOTION_SHAPES,
    PROFILES,
    SPLITS,
    RenderConfig,
    make_spec,
    split_for,
    video_id_for,
)

__all__ = [
    "COLOURS", "COLOUR_WORDS", "DIRECTION_VECTORS", "DIRECTION_WORDS", "EVENT_PHRASES", "FULL_COLOURS",
    "FULL_DIRECTIONS", "FULL_EVENTS", "FULL_SHAPES", "GENERATOR_VERSION", "HELDOUT_SEGMENT_TEMPLATES",
    "HELDOUT_SPLIT", "LONG_DEFAULT_DURATION", "LONG_MIN_DURATION", "MOTION_COLOURS", "MOTION_DIRECTIONS",
    "MOTION_SHAPES", "MOVE_VERBS", "PAIR_TEMPLATES", "PROFILES", "SHAPE_WORDS", "SINGLE_TEMPLATES",
    "SPEED_WORDS", "SPLITS", "SUBJECT_TEMPLATES", "RenderConfig", "caption_class", "corpus_summary",
    "encode_mp4", "generate_corpus", "hard_group", "is_valid_video", "make_captions", "make_config",
    "make_manifest", "make_segments", "make_spec", "read_manifest_csv", "render_frame", "render_frames",
    "rgb_to_yuv420p", "shape_state", "split_for", "video_digest", "video_id_for", "write_manifest",
]  # fmt: skip

"""The reindex config (``configs/reindex.yaml`` merged over :data:`DEFAULT_CONFIG`) and its errors."""

from __future__ import annotations

import json
import os
from typing import Any

import yaml

from runtime import storage

DEFAULT_CONFIG: dict[str, Any] = {
    "model": "clip4clip-meanP-tiny",
    "pretrained": None,
    "ingest": {"samples_per_shard": 64, "workers": None},
    "embed": {
        "batch_size": 16,
        "encoders": 1,
        "sampling": {"num_clips": 4, "frames_per_clip": 4},
        "windows": False,  # moment windows (jobs.embed --windows): the recipe asks for moments
        "window_s": None,  # window length (null: the sampling's clip span), docs/moments.md
        "stride_s": None,  # window stride (null: half the window)
        "with_text": True,  # caption text embeddings (jobs.embed --with-text): a build tunes nprobe on text
    },
    "index": {
        "factory": None,
        "memory_budget": "4GB",
        "recall_target": 0.95,
        "k": 10,
        "keep": 3,
        "growth_factor": 2.0,
        "compact_threshold": 0.2,  # compact when tombstoned rows pass this share (index.tombstones)
        # a full build of at least this many live rows is distributed (index.distributed, docs/reindex.md)
        "distributed_rows": 1_000_000,
        "slice_rows": 262_144,  # rows per add task of a distributed build (index.DEFAULT_SLICE_ROWS)
    },
    "validate": {"min_recall": 0.9, "known_queries": 5},
    "lock": {"ttl_s": 3600.0, "heartbeat_s": 30.0},
    "hash_workers": 4,
}


class ReindexError(RuntimeError):
    """The reindex cannot proceed (bad source, bad workdir, failed validation)."""


class ReindexInputError(ReindexError):
    """Bad arguments: an unusable workdir or config."""


PLACEHOLDER_MARK = "YOUR-BUCKET"  # configs/reindex.yaml ships `pretrained: s3://YOUR-BUCKET/...`


def check_pretrained(pretrained: str | None, allow_random_init: bool = False) -> None:
    """The nightly job never builds with a random model silently: a trained checkpoint URI is required
    (the shipped config's placeholder fails here) unless ``allow_random_init``."""
    if pretrained and PLACEHOLDER_MARK in str(pretrained):
        raise ReindexInputError(
            f"the reindex model checkpoint (config key `pretrained`, or --pretrained) is still the "
            f"placeholder {pretrained!r}: set `pretrained:` in the reindex config (configs/reindex.yaml) or "
            "--pretrained URI to your trained checkpoint (a jobs.train model.pt on any store)"
        )
    if not pretrained and not allow_random_init:
        raise ReindexInputError(
            "no trained model for the reindex: set `pretrained:` in the reindex config "
            "(configs/reindex.yaml) or pass --pretrained URI; --allow-random-init builds with a seeded "
            "random model on purpose (tests only)"
        )


def merge_config(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of nested dicts (``override`` wins); unknown top-level keys are an error."""
    out = json.loads(json.dumps(base))
    for key, value in (override or {}).items():
        if key not in base:
            raise ReindexInputError(f"unknown reindex config key {key!r} (known: {sorted(base)})")
        if isinstance(base[key], dict) and isinstance(value, dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def load_config(path: str | os.PathLike | None) -> dict[str, Any]:
    """``DEFAULT_CONFIG`` merged with the YAML file at ``path`` (if any; any store)."""
    if path is None:
        return merge_config(DEFAULT_CONFIG, {})
    try:
        data = yaml.safe_load(storage.read_text(path)) or {}
    except FileNotFoundError as exc:
        raise ReindexInputError(f"reindex config not found: {path}") from exc
    if not isinstance(data, dict):
        raise ReindexInputError(f"reindex config {path} must be a mapping, got {type(data).__name__}")
    return merge_config(DEFAULT_CONFIG, data)

"""Captioning data pieces: the SwinBERT caption stage for Ray Data, the captioner's sampling, and the
caption tables (``captions.parquet``, ``caption_scores.parquet``, ``errors.parquet``) on any store
(:mod:`runtime.storage`: each one complete object).

The caption output folder is a folder of named tables, not one dataset: readers open a table by its name,
so the errors keep their plain ``errors.parquet`` name (as ingest's do).

The run that wires them (resources included) is ``workflows/caption.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from models import create_inference_model, load_checkpoint, recorded_eval_sampling
from pipeline.caption_layout import (
    CAPTION_COLUMNS,
    CAPTIONS_FILE,
    ERROR_COLUMNS,
    ERRORS_FILE,
    SCORE_COLUMNS,
    SCORES_FILE,
)
from runtime import storage
from runtime.errors import DecodeFailure, ErrorPolicy, check_policy

DEFAULT_CAPTIONER = "swinbert-tiny"  # the model a run without a checkpoint builds (--allow-random-init)


def checkpoint_model_name(pretrained: str | os.PathLike) -> str:
    """The registered model name a vidsift checkpoint (a path or URI on any store) was saved from."""
    return str(load_checkpoint(pretrained)["model_name"])


def caption_model_name(pretrained: str | os.PathLike | None, model_name: str | None = None) -> str:
    """The captioner to build: the checkpoint's own model when there is one, else ``model_name`` (default
    :data:`DEFAULT_CAPTIONER`, which only a run that allows a random init can use)."""
    return checkpoint_model_name(pretrained) if pretrained else (model_name or DEFAULT_CAPTIONER)


def checkpoint_sampling(pretrained: str | os.PathLike, num_frames: int) -> dict[str, Any]:
    """The eval sampling the captioner was trained with (recorded in the checkpoint by ``jobs.train``), so
    captioning and scoring see frames spaced as in training; :func:`caption_sampling` when the checkpoint
    records none or one that does not give the model its ``num_frames`` frames."""
    recorded = recorded_eval_sampling(pretrained)
    if recorded and recorded.get("mode", "eval") == "eval" and (
        int(recorded.get("num_clips", 1)) * int(recorded.get("frames_per_clip", 0)) == num_frames
    ):
        return recorded
    return caption_sampling(num_frames)


def caption_sampling(
    num_frames: int, num_clips: int = 1, frames_per_clip: int | None = None
) -> dict[str, Any]:
    """Eval-mode (deterministic) sparse sampling giving the captioner ``num_frames`` frames in total:
    by default one clip of ``num_frames`` evenly spread frames (SwinBERT's sparse sampling)."""
    if frames_per_clip is None:
        if num_frames % num_clips:
            raise ValueError(f"num_clips={num_clips} does not divide the model's {num_frames} frames")
        frames_per_clip = num_frames // num_clips
    return {"num_clips": int(num_clips), "frames_per_clip": int(frames_per_clip), "mode": "eval"}


class CaptionStage:
    """Ray Data ``map_batches`` class: decoded clips → generated caption (+ scores of the ingest captions).

    Input: the columns of ``pipeline.decode_stage.DecodeClipsStage`` (``key``, ``video_id``, ``frames`` uint8
    ``[B, N, T, H, W, 3]``, ``mask``, ``captions`` JSON, ``error``, ``error_message``). Output keeps ``key``,
    ``video_id``, ``error``/``error_message`` and adds ``caption``, ``score``, ``caption_scores`` (JSON list
    of ``[caption, score]``; empty unless ``score_captions``).

    Error policy (``on_error``): a row that arrives with a decode error is an input failure; under
    ``"record"`` (the default) it is carried on with an empty caption, under ``"raise"`` it raises
    :class:`runtime.errors.DecodeFailure` naming the key. A failure of the model itself (generation,
    scoring) is a bug and always raises: it never turns into error rows.

    The model comes from :func:`models.create_inference_model`: ``pretrained`` (a vidsift checkpoint, path
    or URI) is required unless ``allow_random_init`` (then ``model_name``, seeded random init).
    """

    def __init__(
        self,
        pretrained: str | None,
        beam_size: int = 1,
        max_length: int | None = None,
        score_captions: bool = False,
        device: str | None = None,
        min_length: int = 3,
        on_error: ErrorPolicy = "record",
        model_name: str | None = None,
        allow_random_init: bool = False,
    ):
        self.on_error = check_policy(on_error)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.transform, _ = create_inference_model(
            caption_model_name(pretrained, model_name), pretrained, allow_random_init
        )
        self.model.to(self.device).eval()
        self.model_id = self.model.model_id
        self.beam_size = int(beam_size)
        self.max_length = max_length
        self.min_length = int(min_length)
        self.score_captions = bool(score_captions)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        keys = [str(k) for k in batch["key"]]
        n = len(keys)
        errors = [str(e or "") for e in batch.get("error", [""] * n)]
        messages = [str(m or "") for m in batch.get("error_message", [""] * n)]
        if self.on_error == "raise":
            for key, reason, message in zip(keys, errors, messages):
                if reason:
                    raise DecodeFailure(f"{key}: {reason}: {message}")
        captions, scores, scored = [""] * n, [float("nan")] * n, ["[]"] * n
        ok = [i for i in range(n) if not errors[i]]
        if ok:
            frames = self.transform(np.asarray(batch["frames"])[ok]).to(self.device)
            mask = torch.as_tensor(np.asarray(batch["mask"])[ok]).to(self.device)
            with torch.inference_mode():
                out, out_scores = self.model.generate(
                    frames, mask, max_length=self.max_length, beam_size=self.beam_size,
                    min_length=self.min_length,
                )
                refs = [json.loads(batch["captions"][i]) if self.score_captions else [] for i in ok]
                ref_scores = self._score(frames, mask, refs) if self.score_captions else None
            for j, i in enumerate(ok):
                captions[i], scores[i] = out[j], float(out_scores[j])
                if ref_scores is not None:
                    scored[i] = json.dumps([[c, float(s)] for c, s in zip(refs[j], ref_scores[j])])
        return {
            "key": np.array(keys, dtype=object),
            "video_id": np.array([str(v) for v in batch.get("video_id", keys)], dtype=object),
            "caption": np.array(captions, dtype=object),
            "score": np.array(scores, dtype=np.float64),
            "caption_scores": np.array(scored, dtype=object),
            "error": np.array(errors, dtype=object),
            "error_message": np.array(messages, dtype=object),
        }

    def _score(self, frames, mask, refs: list[list[str]]) -> list[list[float]]:
        has = [j for j, r in enumerate(refs) if r]
        out: list[list[float]] = [[] for _ in refs]
        if has:
            scores = self.model.score_captions(frames[has], mask[has], [refs[j] for j in has])
            for j, s in zip(has, scores):
                out[j] = s.tolist()
        return out


def write_parquet(
    rows: list[dict[str, Any]], columns: Sequence[str], uri: str | os.PathLike, types: dict[str, Any]
) -> None:
    """``rows`` as a Parquet file of ``columns`` (strings unless ``types`` says otherwise): one complete
    object on any store."""
    schema = pa.schema([(c, types.get(c, pa.string())) for c in columns])
    table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows], schema=schema)
    storage.write_parquet(table, uri)


class CaptionTables:
    """Collects :class:`CaptionStage` output batches on the driver and writes the three caption tables.

    Every input sample ends in exactly one of ``captions`` and ``errors``; ``scores`` holds one row per
    scored ingest caption. Rows are sorted before writing, so reruns give identical files.
    """

    def __init__(self, model_id: str):
        self.model_id = model_id
        self.captions: list[dict[str, Any]] = []
        self.scores: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []

    @property
    def done(self) -> int:
        return len(self.captions) + len(self.errors)

    def add_batch(self, batch: Mapping[str, Any]) -> None:
        for i in range(len(batch["key"])):
            key, video_id = str(batch["key"][i]), str(batch["video_id"][i])
            if batch["error"][i]:
                self.errors.append({"key": key, "video_id": video_id, "reason": str(batch["error"][i]),
                                    "message": str(batch["error_message"][i])})
                continue
            self.captions.append({"video_id": video_id, "key": key, "caption": str(batch["caption"][i]),
                                  "score": float(batch["score"][i]), "model_id": self.model_id})
            for cap, s in json.loads(batch["caption_scores"][i]):
                self.scores.append({"video_id": video_id, "caption": cap, "score": float(s),
                                    "model_id": self.model_id})

    def write(self, out: str | os.PathLike, score_captions: bool) -> None:
        """``captions.parquet``, ``errors.parquet`` and (``score_captions``) ``caption_scores.parquet``
        under ``out`` (a path or URI)."""
        self.captions.sort(key=lambda r: r["key"])
        self.scores.sort(key=lambda r: (r["video_id"], r["caption"]))
        self.errors.sort(key=lambda r: r["key"])
        types = {"score": pa.float64()}
        write_parquet(self.captions, CAPTION_COLUMNS, storage.join(out, CAPTIONS_FILE), types)
        if score_captions:
            write_parquet(self.scores, SCORE_COLUMNS, storage.join(out, SCORES_FILE), types)
        write_parquet(self.errors, ERROR_COLUMNS, storage.join(out, ERRORS_FILE), {})

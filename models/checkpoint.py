"""vidsift checkpoints and model identity: one file format for every family.

A checkpoint is ``{"format", "model_name", "config", "state_dict", "extra"}`` written with ``torch.save``
(atomically: a complete object or none, through ``runtime.storage``) and read with
``torch.load(weights_only=True)``. Checkpoints live on any store: every path here may be a URI (``s3://``,
``gs://``, ``file://`` or a plain path); readers get a local copy from
:func:`models.pretrained.resolve_weights` (the download cache for remote ones). ``model_id = name@digest``
(a sha256 over the state dict) identifies every embedding a model produces. The family builders read
``pretrained=`` files through :func:`read_pretrained_checkpoint` / :func:`load_state_strict`, which turn
every failure into a :class:`models.pretrained.PretrainedWeightsError`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from models.pretrained import (
    PretrainedWeightsError,
    PretrainedWeightsMismatch,
    PretrainedWeightsNotFound,
    resolve_weights,
)
from models.registry import get_model_config
from runtime import storage

CHECKPOINT_FORMAT = "vidsift-checkpoint-v1"


def state_dict_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """A stable sha256 over parameter names, shapes, dtypes and values (12 hex chars)."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key]
        if not isinstance(tensor, torch.Tensor):
            continue
        t = tensor.detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:12]


def model_id_for(name: str, model: torch.nn.Module) -> str:
    """``name@digest``: the identity of a model's weights, stored next to every embedding."""
    return f"{name}@{state_dict_digest(model.state_dict())}"


def save_checkpoint(
    model: torch.nn.Module, path: str | os.PathLike, extra: dict[str, Any] | None = None
) -> Path | str:
    """Save a vidsift checkpoint (model name, config, state dict) to ``path`` on any store, atomically
    (local: temp + rename; remote: one complete object). Returns the local ``Path``, or the URI."""
    name = getattr(model, "model_name", None)
    if not name:
        raise ValueError("model has no model_name; build it with models.create_model")
    built_config = getattr(model, "config", None)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_name": name,
        # The config the model was actually built with (overrides included) when it records one.
        "config": dict(built_config) if isinstance(built_config, dict) else get_model_config(name),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": dict(extra or {}),
    }
    text = os.fspath(path)
    with storage.open_output(text) as fh:
        torch.save(payload, fh)
    return storage.local_path(text) if storage.is_local(text) else text


def is_vidsift_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` (any store) is a file written by :func:`save_checkpoint`."""
    try:
        payload = torch.load(resolve_weights(path), map_location="cpu", weights_only=True)
    except Exception:
        return False
    return isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a vidsift checkpoint (a path or URI on any store) safely (``weights_only=True``); clear errors for
    missing or foreign files."""
    try:
        local = resolve_weights(path)
    except FileNotFoundError:
        local = None
    if local is None or not local.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(local, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint {str(path)!r} could not be read safely: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {str(path)!r} is not a vidsift checkpoint (format={CHECKPOINT_FORMAT})")
    return payload


def read_pretrained_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """:func:`load_checkpoint` for a builder's ``pretrained=``: a missing file raises
    :class:`PretrainedWeightsNotFound` (a ``FileNotFoundError``), a foreign or unreadable one
    :class:`PretrainedWeightsMismatch` (a ``ValueError``), with the same messages."""
    try:
        return load_checkpoint(path)
    except FileNotFoundError as exc:
        raise PretrainedWeightsNotFound(str(exc)) from exc
    except ValueError as exc:
        raise PretrainedWeightsMismatch(str(exc)) from exc


def require_file(path: str | os.PathLike, hint: str = "") -> str:
    """The local file (``str``) holding ``path`` (any store: see :func:`resolve_weights`), else
    :class:`PretrainedWeightsNotFound` (``hint`` appended)."""
    text = str(path)
    try:
        local = resolve_weights(path)
    except FileNotFoundError:
        local = None
    if local is None or not local.is_file():
        raise PretrainedWeightsNotFound(f"pretrained weights file {text!r} does not exist{hint}")
    return str(local)


def load_state_strict(
    model: torch.nn.Module, payload: dict[str, Any], path: str | os.PathLike, family: str
) -> None:
    """Load a :func:`save_checkpoint` payload strictly; :class:`PretrainedWeightsError` if it does not fit."""
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise PretrainedWeightsError(
            f"vidsift checkpoint {str(path)!r} (model {payload.get('model_name')!r}) does not fit this "
            f"{family} config: {str(exc).splitlines()[0]} ..."
        ) from exc


def recorded_eval_sampling(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """The eval sampling a ``jobs.train`` run recorded in its checkpoint (``extra.eval_sampling``, else the
    saved train config's), or ``None`` when ``path`` (any store) is not a vidsift checkpoint or records
    none."""
    if not path:
        return None
    try:
        extra = load_checkpoint(path).get("extra", {})
    except FileNotFoundError:  # an open_clip tag, or no file: nothing recorded
        return None
    except ValueError:  # an open_clip / TorchScript file: nothing recorded
        return None
    config = extra.get("train_config") or {}
    if isinstance(config, str):  # the trainer stores its config as JSON text
        config = json.loads(config)
    recorded = extra.get("eval_sampling") or config.get("eval_sampling")
    return dict(recorded) if recorded else None

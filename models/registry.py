"""Model registry: every encoder variant is data (a config) registered under a name.

Family modules (``models/video_swin.py``, ``models/clip4clip.py``, ``models/swinbert.py``) call
:func:`register_model` at import time with a builder; :func:`create_model` looks the name up and
returns ``(model, transform, tokenizer)`` the way open_clip's factory does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# Modules whose import registers model families. Imported lazily so `import models` stays cheap.
FAMILY_MODULES = ("models.video_swin", "models.clip4clip", "models.dual_encoder", "models.swinbert")

CHECKPOINT_FORMAT = "vidsift-checkpoint-v1"


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One registered variant: its family, its config (plain data) and the builder that uses it."""

    name: str
    family: str
    config: dict[str, Any]
    builder: Callable[..., tuple[torch.nn.Module, Any, Any]]


_REGISTRY: dict[str, ModelEntry] = {}
_FAMILIES_LOADED = False


def register_model(name: str, family: str, config: dict[str, Any], builder: Callable[..., tuple]) -> None:
    """Register a variant; ``builder(config, pretrained=..., **kw)`` -> (model, transform, tokenizer)."""
    if name in _REGISTRY and _REGISTRY[name].config != config:
        raise ValueError(f"model name {name!r} is already registered with a different config")
    _REGISTRY[name] = ModelEntry(name=name, family=family, config=dict(config), builder=builder)


def _load_families() -> None:
    global _FAMILIES_LOADED
    if _FAMILIES_LOADED:
        return
    for module in FAMILY_MODULES:
        importlib.import_module(module)
    _FAMILIES_LOADED = True


def list_models(family: str | None = None) -> list[str]:
    """Names of all registered variants (optionally of one family), sorted."""
    _load_families()
    return sorted(n for n, e in _REGISTRY.items() if family is None or e.family == family)


def get_model_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; a clear error listing the known names otherwise."""
    _load_families()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def get_model_config(name: str) -> dict[str, Any]:
    """A copy of the registered config of ``name``."""
    return dict(get_model_entry(name).config)


def create_model(name: str, pretrained: str | os.PathLike | None = None, seed: int | None = None,
                 **overrides: Any):
    """Build a registered model: returns ``(model, transform, tokenizer)``.

    ``pretrained`` is whatever the family understands (an open_clip tag, a local checkpoint, a vidsift
    checkpoint). Weights that cannot be had raise; there is never a silent random init when weights
    were asked for. ``tokenizer`` is ``None`` for video-only backbones. The returned model carries
    ``model.model_id`` (name + weights digest) which identifies every embedding it produces.
    """
    if seed is not None and not pretrained:
        # Seeded random init: every process that builds it holds the same weights and model_id.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return create_model(name, pretrained=None, **overrides)
    entry = get_model_entry(name)
    model, transform, tokenizer = entry.builder(dict(entry.config), pretrained=pretrained, **overrides)
    if not getattr(model, "model_id", None):
        model.model_id = model_id_for(name, model)
    model.model_name = name
    return model, transform, tokenizer


def create_encoder(name: str, pretrained: str | os.PathLike | None = None, seed: int = 0):
    """:func:`create_model` for inference stages (embed, index queries). Without ``pretrained`` the random
    init is seeded, so every process that builds it holds the same weights and the same ``model_id`` —
    the embedding job's actors, its driver, and the index's text encoder agree (benchmarks, tests)."""
    if pretrained:
        return create_model(name, pretrained=pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(name, pretrained=None)


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
) -> Path:
    """Save a vidsift checkpoint (model name, config, state dict) atomically (tmp + rename)."""
    name = getattr(model, "model_name", None)
    if not name:
        raise ValueError("model has no model_name; build it with models.create_model")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    built_config = getattr(model, "config", None)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_name": name,
        # The config the model was actually built with (overrides included) when it records one.
        "config": dict(built_config) if isinstance(built_config, dict) else get_model_config(name),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": dict(extra or {}),
    }
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def is_vidsift_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` is a file written by :func:`save_checkpoint`."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a vidsift checkpoint safely (``weights_only=True``); clear errors for missing or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint {str(path)!r} could not be read safely: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {str(path)!r} is not a vidsift checkpoint (format={CHECKPOINT_FORMAT})")
    return payload


def recorded_eval_sampling(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """The eval sampling a ``jobs.train`` run recorded in its checkpoint (``extra.eval_sampling``, else the
    saved train config's), or ``None`` when ``path`` is not a vidsift checkpoint or records none."""
    if not path or not Path(path).is_file():
        return None
    try:
        extra = load_checkpoint(path).get("extra", {})
    except ValueError:  # an open_clip / TorchScript file: nothing recorded
        return None
    config = extra.get("train_config") or {}
    if isinstance(config, str):  # the trainer stores its config as JSON text
        config = json.loads(config)
    recorded = extra.get("eval_sampling") or config.get("eval_sampling")
    return dict(recorded) if recorded else None

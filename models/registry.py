"""Model registry: every encoder variant is DATA, one JSON file per name under ``models/configs/``.

A file is ``{"name": ..., "family": ..., "description": ..., "config": {...}}`` (open_clip's
``model_configs/`` style). The files are read on first use (importing this module reads nothing and
registers nothing); :func:`models.factory.create_model` maps the entry's ``family`` to its builder.
JSON has no tuples: every list in a config is read back as a tuple (the configs hold no lists), so a config
compares equal to the Python dict it was written from and survives ``torch.save(weights_only=True)``.

:func:`merge_config` is the one rule every family uses for ``create_model(name, **overrides)``: nested
dicts are merged key by key, any other value replaces, and a key the family does not know is a
``ValueError`` naming the key and the model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One registered variant: its name, family, config (plain data) and where it was read from."""

    name: str
    family: str
    config: dict[str, Any]
    description: str = ""
    path: str = ""


_REGISTRY: dict[str, ModelEntry] = {}
_CONFIG_DIRS_READ: set[Path] = set()


def _tuples(value: Any) -> Any:
    """JSON lists back to tuples, recursively (the Python configs used tuples for every sequence)."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def read_config_file(path: str | os.PathLike) -> ModelEntry:
    """Parse one config file into a :class:`ModelEntry`; a clear error for a malformed file."""
    path = Path(path)
    doc = json.loads(path.read_text())
    missing = [k for k in ("name", "family", "config") if k not in doc]
    if missing or not isinstance(doc.get("config"), dict):
        raise ValueError(f"model config {str(path)!r} needs 'name', 'family' and a 'config' object")
    return ModelEntry(
        name=str(doc["name"]),
        family=str(doc["family"]),
        config=_tuples(doc["config"]),
        description=str(doc.get("description", "")),
        path=str(path),
    )


def add_model_config(path: str | os.PathLike) -> list[str]:
    """Register the config file ``path`` (or every ``*.json`` in the folder ``path``); returns the names.

    A name already registered with a different config is an error (the same config again is a no-op).
    """
    path = Path(path)
    files: Iterable[Path] = sorted(path.glob("*.json")) if path.is_dir() else [path]
    names = []
    for file in files:
        entry = read_config_file(file)
        known = _REGISTRY.get(entry.name)
        if known is not None and (known.config != entry.config or known.family != entry.family):
            raise ValueError(
                f"model name {entry.name!r} is already registered from {known.path!r} with another config"
            )
        _REGISTRY.setdefault(entry.name, entry)
        names.append(entry.name)
    return names


def _load_builtin() -> None:
    if CONFIG_DIR not in _CONFIG_DIRS_READ:
        add_model_config(CONFIG_DIR)
        _CONFIG_DIRS_READ.add(CONFIG_DIR)


def list_models(family: str | None = None) -> list[str]:
    """Names of all registered variants (optionally of one family), sorted."""
    _load_builtin()
    return sorted(n for n, e in _REGISTRY.items() if family is None or e.family == family)


def get_model_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; a clear error listing the known names otherwise."""
    _load_builtin()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def get_model_config(name: str) -> dict[str, Any]:
    """A (deep) copy of the registered config of ``name``."""
    return copy.deepcopy(get_model_entry(name).config)


def is_registered(name: str) -> bool:
    _load_builtin()
    return name in _REGISTRY


def merge_config(
    model_name: str, config: dict[str, Any], overrides: dict[str, Any], known_keys: Iterable[str] = ()
) -> dict[str, Any]:
    """``config`` with ``overrides`` applied: the one merge rule of every family.

    A dict value merged into a dict entry is merged key by key (recursively); any other value replaces the
    entry. Keys that are neither in ``config`` nor in the family's ``known_keys`` raise a ``ValueError``
    naming the key and ``model_name``.
    """
    allowed = set(config) | set(known_keys)
    unknown = sorted(k for k in overrides if k not in allowed)
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for model {model_name!r}; "
            f"known: {', '.join(sorted(allowed))}"
        )
    return _merge(config, overrides)


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out

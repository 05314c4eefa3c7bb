"""Checkpoint state: every rank's RNG (python, numpy, torch, CUDA), the ``state.pt`` file format
(model + optimizer + scheduler + scaler + step + epoch + RNG + history in one file, loaded with
``weights_only=True``), the checkpoint folders of a run and the export of the final ``model.pt``. Paths are
URIs on any store (``runtime.storage``): a run's checkpoints and ``model.pt`` may live on S3."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from models import create_model, save_checkpoint
from runtime import storage

STATE_FILE = "state.pt"
STATE_FORMAT = "vidsift-train-state-v1"


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states as ``weights_only``-loadable objects."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def optimizer_digest(optimizer_state: dict[str, Any]) -> str:
    """sha256 (12 hex) over an optimizer state dict's tensors and settings: proves a resume restored it."""
    h = hashlib.sha256()
    for pid in sorted(optimizer_state["state"]):
        for name in sorted(optimizer_state["state"][pid]):
            value = optimizer_state["state"][pid][name]
            t = torch.as_tensor(value).detach().cpu().reshape(-1).contiguous()
            h.update(f"{pid}/{name}/{tuple(t.shape)}/{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for group in optimizer_state["param_groups"]:
        h.update(
            json.dumps(
                {k: v for k, v in group.items() if k != "params"}, sort_keys=True, default=str
            ).encode()
        )
    return h.hexdigest()[:12]


def load_state_file(path: str | os.PathLike) -> dict[str, Any]:
    """Load a training ``state.pt`` (a path or URI on any store) safely (``weights_only=True``) and check its
    format."""
    if not storage.is_file(path):
        raise FileNotFoundError(f"training state {str(path)!r} does not exist")
    state = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{str(path)!r} is not a vidsift training state ({STATE_FORMAT})")
    return state


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (``[obj]`` outside a multi-process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[str]:
    """Checkpoint folders (URIs) of a Ray Train run folder on any store that hold a ``state.pt``, oldest
    first: Ray Train names them ``checkpoint_<timestamp>``, so their names sort by time."""
    found = [d for d in storage.list_dirs(run_dir) if storage.name(d).startswith("checkpoint_")]
    return sorted((d for d in found if storage.is_file(storage.join(d, STATE_FILE))), key=storage.name)


def export_model(state: dict[str, Any], output: str | os.PathLike) -> Path | str:
    """Write ``OUTPUT/model.pt`` (a :func:`models.save_checkpoint` file; ``OUTPUT`` on any store) from a
    training state. Returns its local ``Path`` or URI."""
    model, _, _ = create_model(state["model_name"])
    model.load_state_dict(state["model"])
    extra = {"step": int(state["step"]), "epoch": int(state["epoch"]), "train_config": state["config"]}
    return save_checkpoint(model, storage.join(output, "model.pt"), extra=extra)

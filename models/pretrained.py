"""Loading CLIP weights into an ``open_clip.model.CLIP`` without ever running untrusted pickles.

``pretrained`` may be:

* an **open_clip tag** (``openai``, ``laion2b_s34b_b79k``, ...) for the config's ``open_clip_arch``:
  fetched with open_clip's own download code (cache first); if the file cannot be had (no hub, no
  network) a :class:`PretrainedWeightsError` says so — never a silent random init;
* a **local open_clip checkpoint** (a state dict, or ``{"state_dict": ...}``), read with
  ``torch.load(weights_only=True)``;
* an **OpenAI TorchScript archive** (``ViT-B-32.pt``): ``torch.load(weights_only=True)`` refuses TorchScript
  zips, and ``torch.jit.load`` would execute the archive's code, so :func:`read_torchscript_state_dict` parses
  the zip's ``data.pkl`` with a restricted unpickler that only rebuilds tensors (every ``__torch__`` module
  becomes an inert attribute bag) and reads the raw storages from ``data/<n>``;
* a **vidsift checkpoint** (``models.save_checkpoint``) — handled by the model builders.

Every weights file may live on any store (``s3://``, ``gs://``, a local path): :func:`resolve_weights` is the
one place that turns a URI into a local file (``runtime.storage.cached_copy``: a remote object is downloaded
once into the local cache); every loader of every family goes through it.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from open_clip.factory import convert_state_dict
from open_clip.model import resize_pos_embed, resize_text_pos_embed
from open_clip.pretrained import download_pretrained, get_pretrained_cfg, list_pretrained_tags_by_model

from runtime import storage

OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


class PretrainedWeightsError(RuntimeError):
    """Weights were asked for but could not be had or did not fit the model (every family raises it)."""


class PretrainedWeightsNotFound(PretrainedWeightsError, FileNotFoundError):
    """``pretrained`` names a weights file that does not exist (also a ``FileNotFoundError``)."""


class PretrainedWeightsMismatch(PretrainedWeightsError, ValueError):
    """The weights file is foreign, unreadable or for another model (also a ``ValueError``)."""


# --------------------------------------------------------------------------------------------- TorchScript


class _ScriptModuleState:
    """Inert stand-in for a ``__torch__.*`` class found in a TorchScript pickle: it only keeps its state."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        self._state = dict(state) if isinstance(state, dict) else {}


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *extra):
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, False, OrderedDict())


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *extra):
    return data


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _RestrictedTorchScriptUnpickler(pickle.Unpickler):
    """Allows tensor rebuilding and nothing else; ``__torch__`` classes become attribute bags."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._storages: dict[str, Any] = {}

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptModuleState
        raise pickle.UnpicklingError(f"TorchScript archive references {module}.{name}, which is not allowed")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r} in TorchScript archive")
        _, storage_type, key, _location, numel = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unexpected storage type {storage_type!r}")
        key = str(key)
        if key not in self._storages:
            data = self._archive.read(f"{self._prefix}data/{key}")
            dtype = storage_type.dtype
            itemsize = torch.empty((), dtype=dtype).element_size()
            if len(data) < int(numel) * itemsize:
                raise pickle.UnpicklingError(f"storage {key} is truncated ({len(data)} bytes)")
            untyped = torch.UntypedStorage.from_buffer(
                bytearray(data[: int(numel) * itemsize]), dtype=torch.uint8
            )
            self._storages[key] = torch.storage.TypedStorage(
                wrap_storage=untyped, dtype=dtype, _internal=True
            )
        return self._storages[key]


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """True for a zip holding ``<prefix>/data.pkl`` and ``<prefix>/code/`` (``torch.jit.save``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any(n.endswith("/data.pkl") for n in names) and any("/code/" in n for n in names)


def _flatten_module_state(obj: Any, prefix: str, out: dict[str, torch.Tensor], seen: set[int]) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    for key, value in obj._state.items():
        if key in ("training",) or key.startswith("_"):
            continue
        if isinstance(value, torch.Tensor):
            out[prefix + key] = value
        elif isinstance(value, _ScriptModuleState):
            _flatten_module_state(value, f"{prefix}{key}.", out, seen)


def read_torchscript_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript archive as a state dict, without executing any of its code."""
    path = Path(path)
    with zipfile.ZipFile(path) as zf:
        pkl_names = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkl_names:
            raise PretrainedWeightsError(f"{str(path)!r} is not a TorchScript archive (no data.pkl)")
        prefix = pkl_names[0][: -len("data.pkl")]
        with zf.open(pkl_names[0]) as fh:
            try:
                root = _RestrictedTorchScriptUnpickler(fh, zf, prefix).load()
            except (pickle.UnpicklingError, KeyError, ValueError, TypeError) as exc:
                raise PretrainedWeightsError(
                    f"TorchScript archive {str(path)!r} could not be read safely: {exc}"
                ) from exc
    if not isinstance(root, _ScriptModuleState):
        raise PretrainedWeightsError(f"TorchScript archive {str(path)!r} does not hold a module")
    state: dict[str, torch.Tensor] = {}
    _flatten_module_state(root, "", state, set())
    return state


def resolve_weights(uri: str | os.PathLike) -> Path:
    """The local file holding the weights at ``uri``: a local path as it is (the caller says what is missing
    or not a file; an open_clip tag stays a bare name), a remote URI (``s3://``, ``gs://``...) through
    ``runtime.storage.cached_copy`` (downloaded once into ``VIDSIFT_CACHE``). A remote object that does not
    exist raises :class:`PretrainedWeightsNotFound` naming the URI."""
    text = os.fspath(uri)
    try:
        return storage.cached_copy(text)
    except FileNotFoundError as exc:
        raise PretrainedWeightsNotFound(f"pretrained weights file {text!r} does not exist") from exc


# ------------------------------------------------------------------------------------------- state dicts


def read_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A CLIP state dict from a file on any store: TorchScript archive or a weights_only state dict."""
    text, path = str(path), resolve_weights(path)
    if not path.is_file():
        raise PretrainedWeightsNotFound(f"pretrained weights file {text!r} does not exist")
    if is_torchscript_archive(path):
        state = read_torchscript_state_dict(path)
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file  # optional: only .safetensors weights need it

        state = load_file(str(path), device="cpu")
    else:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise PretrainedWeightsError(
                f"weights file {text!r} could not be read safely: {exc}"
            ) from exc
        if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
            payload = payload["state_dict"]
        if not isinstance(payload, dict) or not payload:
            raise PretrainedWeightsError(f"weights file {text!r} does not hold a state dict")
        state = payload
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_clip_state_dict(
    clip_model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str
) -> None:
    """Load an open_clip/OpenAI CLIP state dict into ``clip_model`` strictly (fp16→fp32, pos-embed resize)."""
    state = {k: v for k, v in state_dict.items() if k not in OPENAI_EXTRA_KEYS}
    state = convert_state_dict(clip_model, state)
    if "logit_scale" in state and state["logit_scale"].ndim != clip_model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(clip_model.logit_scale.shape)
    ref = clip_model.state_dict()
    state = {k: (v.to(ref[k].dtype) if k in ref and v.is_floating_point() else v) for k, v in state.items()}
    resize_pos_embed(state, clip_model)
    resize_text_pos_embed(state, clip_model)
    missing = sorted(set(ref) - set(state))
    unexpected = sorted(set(state) - set(ref))
    if missing or unexpected:
        raise PretrainedWeightsError(
            f"weights from {source} do not fit this CLIP config: missing {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
            f"{'...' if len(unexpected) > 8 else ''}"
        )
    bad = [k for k in ref if tuple(ref[k].shape) != tuple(state[k].shape)]
    if bad:
        raise PretrainedWeightsError(
            f"weights from {source} have wrong shapes for {bad[:8]}: e.g. {bad[0]} "
            f"{tuple(state[bad[0]].shape)} vs model {tuple(ref[bad[0]].shape)}"
        )
    clip_model.load_state_dict(state, strict=True)


def open_clip_tag_config(arch: str | None, tag: str) -> dict[str, Any]:
    """open_clip's pretrained config for ``(arch, tag)``; a clear error when the tag does not exist."""
    cfg = get_pretrained_cfg(arch, tag) if arch else {}
    if not cfg:
        known = list_pretrained_tags_by_model(arch) if arch else []
        raise PretrainedWeightsError(
            f"pretrained {tag!r} is neither an existing file nor an open_clip tag for architecture {arch!r}"
            + (
                f" (known tags: {', '.join(known)})"
                if known
                else " (this config has no open_clip pretrained tags)"
            )
        )
    return cfg


def fetch_open_clip_tag(arch: str, tag: str, cache_dir: str | None = None) -> Path:
    """Download (or find cached) open_clip weights for ``(arch, tag)``; raise if they cannot be had."""
    cfg = open_clip_tag_config(arch, tag)
    try:
        target = download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as exc:
        raise PretrainedWeightsError(
            f"open_clip weights {arch}/{tag} could not be had (download failed: "
            f"{type(exc).__name__}: {exc}); "
            "no model was built — pass a local checkpoint path instead"
        ) from exc
    if not target or not Path(target).is_file():
        raise PretrainedWeightsError(
            f"open_clip weights {arch}/{tag} could not be had (nothing was downloaded)"
        )
    return Path(target)


def resolve_clip_weights(
    arch: str | None, pretrained: str | os.PathLike, cache_dir: str | None = None
) -> tuple[Path, dict[str, Any]]:
    """``(local weights file, open_clip tag config or {})`` for a path or an open_clip tag of ``arch``.

    Tags are checked and fetched *before* any model is built, so a bad tag or an unreachable hub fails fast.
    """
    path = resolve_weights(pretrained)
    if path.is_file():
        return path, {}
    text = str(pretrained)
    if os.sep in text or text.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt")):
        raise PretrainedWeightsNotFound(f"pretrained weights file {text!r} does not exist")
    tag_cfg = open_clip_tag_config(arch, text)
    return fetch_open_clip_tag(arch, text, cache_dir=cache_dir), tag_cfg

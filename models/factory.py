"""The one model factory: ``create_model(name) -> (model, transform, tokenizer)``, open_clip style.

The registry (:mod:`models.registry`) holds every variant as data; this module maps the entry's family to
its builder (a plain dict, no string imports). Every builder has the signature
``builder(name, config, pretrained=None, <family options>, **overrides)`` and follows the same rules:

* ``overrides`` go through :func:`models.registry.merge_config` (nested dicts merged, unknown keys are a
  ``ValueError`` naming the key and the model);
* ``pretrained`` that cannot be had or does not fit raises :class:`models.pretrained.PretrainedWeightsError`
  (a missing file also is a ``FileNotFoundError``) — never a silent random init;
* the transform is a :class:`models.transforms.VideoTransform`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from models.checkpoint import model_id_for
from models.clip4clip import build_clip4clip
from models.dual_encoder import build_vidswin_dual_encoder
from models.registry import get_model_entry
from models.swinbert import build_swinbert
from models.video_swin import build_video_swin

BUILDERS: dict[str, Callable[..., tuple[torch.nn.Module, Any, Any]]] = {
    "clip4clip": build_clip4clip,
    "dual_encoder": build_vidswin_dual_encoder,
    "swinbert": build_swinbert,
    "video_swin": build_video_swin,
}


def create_model(
    name: str, pretrained: str | os.PathLike | None = None, seed: int | None = None, **overrides: Any
):
    """Build a registered model: returns ``(model, transform, tokenizer)``.

    ``pretrained`` is whatever the family understands (an open_clip tag, a local checkpoint, a vidsift
    checkpoint); a falsy value means none. Without it, ``seed`` makes the random init reproducible (every
    process that builds it holds the same weights and ``model_id``: the embed job's actors, its driver and
    the index's text encoder agree). ``tokenizer`` is ``None`` for video-only backbones. The model carries
    ``model.model_name`` and ``model.model_id`` (name + weights digest), which identifies every embedding it
    produces.
    """
    entry = get_model_entry(name)
    builder = BUILDERS.get(entry.family)
    if builder is None:
        raise ValueError(
            f"model {name!r} ({entry.path}) has family {entry.family!r}, which has no builder; "
            f"known families: {', '.join(sorted(BUILDERS))}"
        )
    pretrained = pretrained or None
    if seed is not None and pretrained is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, transform, tokenizer = builder(name, entry.config, **overrides)
    else:
        model, transform, tokenizer = builder(name, entry.config, pretrained=pretrained, **overrides)
    if not getattr(model, "model_id", None):
        model.model_id = model_id_for(name, model)
    model.model_name = name
    return model, transform, tokenizer

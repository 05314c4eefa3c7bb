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
import warnings
from collections.abc import Callable
from typing import Any

import torch

from models.checkpoint import model_id_for
from models.clip4clip import build_clip4clip
from models.dual_encoder import build_vidswin_dual_encoder
from models.pretrained import PretrainedWeightsError
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

    ``pretrained`` is whatever the family understands (an open_clip tag, a weights file, a vidsift
    checkpoint); files may be URIs on any store (``s3://...``: fetched once into the local cache, see
    :func:`models.pretrained.resolve_weights`); a falsy value means none. Without it, ``seed`` makes the
    random init reproducible (every process that builds it holds the same weights and ``model_id``: the
    embed job's actors, its driver and the index's text encoder agree). ``tokenizer`` is ``None`` for
    video-only backbones. The model carries ``model.model_name`` and ``model.model_id`` (name + weights
    digest), which identifies every embedding it produces.
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


class MissingWeightsError(PretrainedWeightsError):
    """An inference stage was asked to run without trained weights and without ``allow_random_init``."""


class RandomInitWarning(UserWarning):
    """An inference model was built from a seeded random init (``--allow-random-init``)."""


def create_inference_model(
    name: str,
    pretrained: str | os.PathLike | None = None,
    allow_random_init: bool = False,
    seed: int = 0,
):
    """:func:`create_model` for inference and production stages (embed, the index's text encoder, caption,
    reindex, serve): trained weights are required.

    ``pretrained`` is a checkpoint path or URI on any store (e.g. ``s3://bucket/run/model.pt``).
    Without it, it refuses with :class:`MissingWeightsError`, unless ``allow_random_init`` is
    given; then the init is seeded (every process agrees on the weights) and a :class:`RandomInitWarning`
    names it, so a random model never serves silently.
    """
    if pretrained:
        return create_model(name, pretrained=pretrained)
    if not allow_random_init:
        raise MissingWeightsError(
            f"model {name!r}: no trained weights given (--pretrained URI, e.g. a jobs.train model.pt on any "
            "store). Inference stages refuse a random init; pass --allow-random-init to use a seeded random "
            "model on purpose (tests, benchmarks)."
        )
    message = f"model {name!r}: using a SEEDED RANDOM INIT (seed={seed}), not trained weights"
    warnings.warn(message, RandomInitWarning, stacklevel=2)
    print(f"[models] WARNING: {message}", flush=True)
    return create_model(name, pretrained=None, seed=seed)

"""A plain in-process training loop for the captioner (tests and demos); real caption training is
``jobs.train --task caption`` through Ray Train (:mod:`pipeline.training.loop`)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import torch

from models.swinbert import SwinBERT


def train_captioner(
    model: SwinBERT,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None, Sequence[str]]],
    steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    backbone_lr_scale: float = 0.05,
    seed: int = 0,
    log_every: int = 0,
) -> list[dict[str, float]]:
    """Plain in-process AdamW loop over ``(frames, mask, captions)`` batches (cycled), for tests and demos.

    The backbone learns at ``backbone_lr_scale x lr`` (SwinBERT's ``backbone_coef_lr``: at the head's
    rate a randomly initialised Video Swin collapses different videos onto one feature within tens of
    steps). Returns one ``{"step", "loss", "mlm", "sparsity"}`` dict per step. Real training goes through
    ``jobs.train --task caption`` (Ray Train), which calls :meth:`SwinBERT.training_loss` the same way.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("train_captioner needs at least one batch")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    optimizer = torch.optim.AdamW(model.param_groups(lr, backbone_lr_scale), weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    history = []
    start = time.perf_counter()
    for step in range(steps):
        frames, mask, captions = batches[step % len(batches)]
        loss, parts = model.training_loss(frames, mask, captions, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append({"step": step, "loss": float(loss.detach()), **parts})
        if log_every and (step + 1) % log_every == 0:
            rate = (step + 1) / (time.perf_counter() - start)
            print(
                f"[train_captioner] step {step + 1}/{steps} loss {history[-1]['loss']:.4f} "
                f"mlm {parts['mlm']:.4f} sparsity {parts['sparsity']:.4f} ({rate:.2f} steps/s)",
                flush=True,
            )
    model.eval()
    return history

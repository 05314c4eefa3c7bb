"""Optimiser and schedule: AdamW over the model's parameter groups (pretrained backbone at
``lr * backbone_lr_scale``, new modules at ``lr``), linear warmup + cosine decay, an optional backbone
freeze, and the AMP dtype (GPU only)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

from pipeline.training.config import TrainConfig


def parameter_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups. Models with a ``param_groups(lr, backbone_lr, weight_decay)`` helper split the
    pretrained backbone (``lr * backbone_lr_scale``) from new modules (``lr``) and exempt gains, biases and
    embeddings from weight decay; other models get one group at ``lr`` (1-D tensors without decay)."""
    helper = getattr(model, "param_groups", None)
    if callable(helper):
        params = inspect.signature(helper).parameters
        if "backbone_lr" in params:  # CLIP4Clip, dual encoders: (lr, backbone_lr, weight_decay)
            groups = helper(
                lr=cfg.lr, backbone_lr=cfg.lr * cfg.backbone_lr_scale, weight_decay=cfg.weight_decay
            )
        elif "backbone_lr_scale" in params:  # SwinBERT: (lr, backbone_lr_scale), no decay split
            groups = helper(lr=cfg.lr, backbone_lr_scale=cfg.backbone_lr_scale)
        else:
            groups = helper(lr=cfg.lr)
        out = []
        for group in groups:
            if not group["params"]:
                continue
            if "weight_decay" in group:
                out.append(group)
                continue
            decay = [p for p in group["params"] if p.ndim >= 2]
            flat = [p for p in group["params"] if p.ndim < 2]
            name = group.get("name", "group")
            if decay:
                out.append({**group, "params": decay, "weight_decay": cfg.weight_decay})
            if flat:
                out.append({**group, "params": flat, "weight_decay": 0.0, "name": f"{name}_no_decay"})
        return out
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    return [
        {"name": "all", "params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"name": "all_no_decay", "params": no_decay, "lr": cfg.lr, "weight_decay": 0.0},
    ]


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor: linear warmup from ~0 to 1 over ``warmup_steps``, cosine to 0 at ``total_steps``."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps - 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, total_steps: int):
    """AdamW over :func:`parameter_groups` and a warmup + cosine LambdaLR over ``total_steps``."""
    groups = parameter_groups(model, cfg)
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "names"} for g in groups],
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
    )
    schedule = warmup_cosine(total_steps, round(cfg.warmup_fraction * total_steps))
    frozen_steps = round(cfg.backbone_freeze_fraction * total_steps)
    lambdas = [
        frozen_until(frozen_steps, schedule) if frozen_steps and str(g.get("name", "")).startswith("backbone")
        else schedule
        for g in groups
    ]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    return optimizer, scheduler


def frozen_until(frozen_steps: int, schedule: Callable[[int], float]) -> Callable[[int], float]:
    """LR factor 0 before ``frozen_steps``, then ``schedule`` (the run's warmup + cosine) from there on."""

    def factor(step: int) -> float:
        return 0.0 if step < frozen_steps else schedule(step)

    return factor


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (``None`` = full precision). AMP is a GPU feature here: CPU runs in fp32."""
    if device.type != "cuda" or cfg.amp == "off":
        return None
    if cfg.amp == "fp16":
        return torch.float16
    if cfg.amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16

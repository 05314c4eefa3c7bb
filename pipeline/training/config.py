"""The training recipe: :class:`TrainConfig` (YAML in ``configs/train/``, flags override it)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml

from pipeline.sampling import SamplingConfig

TASKS = ("retrieval", "caption")


@dataclasses.dataclass
class TrainConfig:
    """A training recipe. Every field can be set in YAML and most from the command line."""

    model: str = ""
    task: str = "retrieval"
    pretrained: str | None = None  # weights for the *initial* model (an open_clip tag or a checkpoint)
    # Initialise only the video backbone from this checkpoint (SwinBERT starts from a pretrained Video Swin:
    # e.g. a vidswin-tiny64-cliptext retrieval run's model.pt). Passed to the model builder.
    backbone_pretrained: str | None = None
    # schedule
    epochs: int = 10
    max_steps: int | None = None  # stop (with a checkpoint) after this many optimizer steps in total
    batch_size: int = 32  # per worker
    eval_batch_size: int = 32
    lr: float = 1e-4
    backbone_lr_scale: float = 1.0  # CLIP4Clip "coef_lr": pretrained backbone at lr * this
    # Backbone lr held at 0 for this fraction of the steps: a captioner trained from scratch first learns to
    # read the (random, diverse) video features; unfrozen from step 0, MLM collapses them to a constant.
    backbone_freeze_fraction: float = 0.0
    weight_decay: float = 0.2
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    amp: str = "auto"  # auto (bf16/fp16 on GPU, off on CPU) | off | bf16 | fp16
    grad_checkpointing: bool = False
    find_unused_parameters: bool = False
    # data
    size: int = 64  # decode side in px (the model transform then resizes to its image size)
    train_sampling: dict = dataclasses.field(
        default_factory=lambda: {"num_clips": 1, "frames_per_clip": 4, "mode": "train"}
    )
    eval_sampling: dict = dataclasses.field(
        default_factory=lambda: {"num_clips": 4, "frames_per_clip": 4, "mode": "eval"}
    )
    clip_aggregation: str = "mean"  # ClipBERT consensus over clips: mean | max | lse
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    equivalence: str | None = "caption_class"  # meta field: videos sharing it count as equally correct
    distinct_batch_key: str | None = "caption_class"  # no two samples of a local batch share this field
    # Train and evaluate on timed captions (docs/moments.md): one sample per segment, clips drawn inside its
    # span, its caption; caption_class (distinct_batch_key, equivalence) is then the segment's class.
    segments: bool = False
    shuffle_buffer: int = 256
    dataloader_workers: int = 0
    # bookkeeping
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0  # steps; 0 = at the end of every epoch only
    eval_every: int = 1  # epochs; 0 = no per-epoch validation
    keep_checkpoints: int = 2
    cpus_per_worker: float = 1.0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"TrainConfig.task={self.task!r}: expected one of {TASKS}")
        for name in ("epochs", "batch_size", "eval_batch_size", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: must be >= 1")
        if self.max_steps is not None and int(self.max_steps) < 1:
            raise ValueError(f"TrainConfig.max_steps={self.max_steps!r}: must be >= 1")
        if not self.lr > 0 or not self.backbone_lr_scale >= 0:
            raise ValueError(f"TrainConfig: lr={self.lr} must be > 0 and backbone_lr_scale >= 0")
        if not 0 <= self.backbone_freeze_fraction < 1:
            raise ValueError(
                f"TrainConfig.backbone_freeze_fraction={self.backbone_freeze_fraction}: must be in [0, 1)"
            )
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"TrainConfig.warmup_fraction={self.warmup_fraction}: must be in [0, 1)")
        if self.amp not in ("auto", "off", "bf16", "fp16"):
            raise ValueError(f"TrainConfig.amp={self.amp!r}: expected auto, off, bf16 or fp16")
        if self.clip_aggregation not in ("mean", "max", "lse"):
            raise ValueError(f"TrainConfig.clip_aggregation={self.clip_aggregation!r}: expected mean/max/lse")
        self.betas = tuple(float(b) for b in self.betas)  # YAML gives a list
        for name in ("train_sampling", "eval_sampling"):
            try:
                SamplingConfig.from_dict(dict(getattr(self, name)))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"TrainConfig.{name}: {exc}") from exc

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict; unknown keys are an error naming them (they are usually typos)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; known keys: {sorted(names)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out


def load_train_config(path: str | os.PathLike | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML recipe (optional) and apply ``overrides`` (``None`` values are ignored)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text())
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"training config {str(path)!r} must be a mapping, got {type(loaded).__name__}")
        data.update(loaded)
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    return TrainConfig.from_dict(data)


def with_sampling_flags(
    cfg: TrainConfig,
    train_clips: int | None = None,
    train_frames: int | None = None,
    eval_clips: int | None = None,
    eval_frames: int | None = None,
    sample_fps: float | None = None,
) -> TrainConfig:
    """``cfg`` with the command line's clip counts / frames per clip / fps applied to ``train_sampling``
    and ``eval_sampling`` (``sample_fps`` to both, replacing a ``stride``); ``cfg`` itself when none is
    set."""
    train_s = _sampling(cfg.train_sampling, train_clips, train_frames, sample_fps)
    eval_s = _sampling(cfg.eval_sampling, eval_clips, eval_frames, sample_fps)
    if train_s is None and eval_s is None:
        return cfg
    data = cfg.to_dict()
    data["train_sampling"] = train_s or cfg.train_sampling
    data["eval_sampling"] = eval_s or cfg.eval_sampling
    return TrainConfig.from_dict(data)


def _sampling(base: dict, clips: int | None, frames: int | None, fps: float | None) -> dict | None:
    if clips is None and frames is None and fps is None:
        return None
    out = dict(base)
    if clips is not None:
        out["num_clips"] = clips
    if frames is not None:
        out["frames_per_clip"] = frames
    if fps is not None:
        out["fps"] = fps
        out.pop("stride", None)
    return out

"""End-to-end fine-tuning of retrieval encoders (CLIP4Clip, Video Swin) and SwinBERT with Ray Train.

Pieces, in the order the loop uses them:

- :class:`TrainConfig` — the training recipe (YAML in ``configs/train/``, flags override it).
- shard inventory — which samples of which split live in which shard (``OUT/shards/NNNNNN.parquet``);
  it fixes the number of steps of an epoch so every data-parallel worker runs the same number of steps
  (an uneven last batch would hang DDP's all-reduce).
- data — :class:`pipeline.datasets.ShardClipDataset` streams and decodes clips from the tars (train:
  few random sparse clips, ClipBERT-style; eval: more, deterministic), batched with the model transform.
- objectives — :class:`RetrievalObjective` (symmetric InfoNCE over the global batch) and
  :class:`CaptionObjective` (SwinBERT's masked-language-model loss); each is one ``nn.Module`` so DDP sees
  the whole forward.
- optimiser — AdamW over the model's parameter groups (pretrained backbone at ``lr * backbone_lr_scale``,
  new modules at ``lr``), linear warmup + cosine decay, gradient clipping, AMP on GPU.
- checkpoints — model + optimizer + scheduler + scaler + step + epoch + every rank's RNG in one
  ``state.pt``, reported through ``ray.train.report`` and reloaded from ``ray.train.get_checkpoint()``.
- :func:`train_loop_per_worker` — the Ray Train worker function; :func:`run_training` — the driver
  (TorchTrainer, resume, export of ``model.pt`` and ``metrics.jsonl``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

TASKS = ("retrieval", "caption")
STATE_FILE = "state.pt"
STATE_FORMAT = "vidsift-train-state-v1"
RUN_NAME = "train"


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------


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
        from pipeline.sampling import SamplingConfig

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
        import yaml

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


# ---------------------------------------------------------------------------------------------------------
# Shard inventory
# ---------------------------------------------------------------------------------------------------------


def shards_folder(shards: str | os.PathLike) -> Path:
    """Accept the ingest output folder (with ``shards/``) or the ``shards/`` folder itself."""
    root = Path(shards)
    if (root / "shards").is_dir():
        root = root / "shards"
    if not root.is_dir():
        raise FileNotFoundError(f"shard folder {str(shards)!r} does not exist")
    if not sorted(root.glob("*.tar")):
        raise FileNotFoundError(f"shard folder {str(root)!r} holds no .tar shards (run jobs.ingest first)")
    return root


def shard_inventory(shards: str | os.PathLike) -> dict[str, dict[str, int]]:
    """``{tar path: {split: count}}`` from the per-shard parquet sidecars written by ingest."""
    import pyarrow.parquet as pq

    root = shards_folder(shards)
    inventory: dict[str, dict[str, int]] = {}
    for tar in sorted(root.glob("*.tar")):
        sidecar = tar.with_suffix(".parquet")
        if not sidecar.is_file():
            raise FileNotFoundError(f"shard {str(tar)!r} has no parquet sidecar {sidecar.name!r}")
        table = (
            pq.read_table(sidecar, columns=["split"]) if "split" in pq.read_schema(sidecar).names else None
        )
        counts: dict[str, int] = {}
        if table is None:
            counts["None"] = pq.read_metadata(sidecar).num_rows
        else:
            for split in table.column("split").to_pylist():
                counts[str(split)] = counts.get(str(split), 0) + 1
        inventory[str(tar)] = counts
    return inventory


def split_count(inventory: dict[str, dict[str, int]], split: str) -> int:
    return sum(c.get(split, 0) for c in inventory.values())


def shards_with(inventory: dict[str, dict[str, int]], split: str) -> list[str]:
    """Tar paths holding at least one sample of ``split``."""
    return [tar for tar, counts in inventory.items() if counts.get(split, 0) > 0]


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


def distinct_batches(
    samples: Iterable[dict], batch_size: int, key: Callable[[dict], Any] | None, max_pending: int = 4096
) -> Iterator[list[dict]]:
    """Group a sample stream into batches of ``batch_size`` in which no two samples share ``key(sample)``.

    Contrastive losses treat every other pair in a batch as a negative; two videos of one caption class
    would be false negatives. Samples that collide wait for a later batch (bounded by ``max_pending``;
    past it batches are filled regardless). The final partial batch is yielded as well.
    """
    pending: list[dict] = []
    for sample in samples:
        pending.append(sample)
        while len(pending) >= batch_size:
            batch, seen, rest = [], set(), []
            for s in pending:
                k = key(s) if key is not None else None
                if len(batch) < batch_size and (k is None or k not in seen):
                    batch.append(s)
                    seen.add(k)
                else:
                    rest.append(s)
            if len(batch) < batch_size and len(pending) < max_pending:
                break  # wait for more samples to fill the batch without collisions
            while len(batch) < batch_size and rest:
                batch.append(rest.pop(0))
            pending = rest
            yield batch
    while pending:  # end of stream: keep batches collision-free, the last ones may be partial
        batch, seen, rest = [], set(), []
        for s in pending:
            k = key(s) if key is not None else None
            if len(batch) < batch_size and (k is None or k not in seen):
                batch.append(s)
                seen.add(k)
            else:
                rest.append(s)
        pending = rest
        yield batch


def collate(samples: list[dict], transform: Callable | None) -> dict[str, Any]:
    """Stack decoded samples: ``frames`` float ``[B, N, T, 3, S, S]`` (after ``transform``), ``mask``
    bool ``[B, N, T]``, plus the per-sample lists ``captions``, ``video_id``, ``meta``."""
    frames = np.stack([np.asarray(s["frames"]) for s in samples])
    mask = torch.as_tensor(np.stack([np.asarray(s["mask"], dtype=bool) for s in samples]))
    frames_t = transform(frames) if transform is not None else torch.from_numpy(frames)
    return {
        "frames": frames_t,
        "mask": mask,
        "captions": [list(s["captions"]) for s in samples],
        "video_id": [s["video_id"] for s in samples],
        "meta": [dict(s.get("meta") or {}) for s in samples],
    }


def meta_key(field: str | None) -> Callable[[dict], Any] | None:
    """``sample -> sample["meta"][field]`` (``None`` when the field is absent)."""
    if not field:
        return None
    return lambda s: (s.get("meta") or {}).get(field)


def make_dataset(
    shard_paths: list[str],
    split: str,
    sampling: dict,
    size: int,
    seed: int,
    train: bool,
    shuffle_buffer: int,
    rank: int,
    world: int,
):
    """A :class:`pipeline.datasets.ShardClipDataset` over ``shard_paths`` keeping ``split`` only; this
    rank's share (whole shards when there are enough, else every ``world``-th sample)."""
    from pipeline.datasets import ShardClipDataset
    from pipeline.sampling import SamplingConfig

    return ShardClipDataset(
        shard_paths,
        sampling=SamplingConfig.from_dict(dict(sampling)),
        size=size,
        split=split,
        shuffle_shards=train,
        shuffle_buffer=shuffle_buffer if train else 0,
        seed=seed,
        rank=rank,
        world_size=world,
    )


def iterate_samples(dataset, dataloader_workers: int) -> Iterator[dict]:
    """Iterate a sample dataset, decoding in ``dataloader_workers`` processes when > 0."""
    if dataloader_workers <= 0:
        yield from dataset
        return
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=dataloader_workers, persistent_workers=False, prefetch_factor=4
    )
    yield from loader


# ---------------------------------------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------------------------------------


class RetrievalObjective(torch.nn.Module):
    """Symmetric InfoNCE (gathered over workers) between videos and one caption per video.

    ``forward`` returns the loss, so DDP wraps the whole computation (text and video towers). The model's
    own ``loss`` is used when it has one (tightTransf adds its cross-encoder term there).
    """

    def __init__(self, model: torch.nn.Module, clip_aggregation: str = "mean"):
        super().__init__()
        self.model = model
        self.clip_aggregation = clip_aggregation
        if hasattr(model, "clip_aggregation"):
            model.clip_aggregation = clip_aggregation

    def embed_videos(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, N, T, 3, S, S]`` clips → aggregated, L2-normalised ``[B, D]``."""
        if hasattr(self.model, "embed_batch"):
            return self.model.embed_batch(frames, mask)
        from models.losses import aggregate_clips

        clip_emb = self.model.encode_clips(frames, mask)
        return aggregate_clips(clip_emb.float(), mask.any(-1), mode=self.clip_aggregation)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor, captions: list[str]) -> torch.Tensor:
        if hasattr(self.model, "loss"):
            return self.model.loss(frames, mask, captions)
        from models.losses import contrastive_loss

        video = self.embed_videos(frames, mask)
        text = self.model.encode_text(captions).float()
        return contrastive_loss(video, text, self.model.logit_scale)


class CaptionObjective(torch.nn.Module):
    """SwinBERT's masked-language-model (+ attention sparsity) loss, ``model.training_loss``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, frames: torch.Tensor, mask: torch.Tensor, captions: list[str]) -> torch.Tensor:
        out = self.model.training_loss(frames, mask, captions)
        return out[0] if isinstance(out, tuple) else out


def build_objective(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    if cfg.task == "caption":
        if not hasattr(model, "training_loss"):
            raise ValueError(f"model {cfg.model!r} has no training_loss(); --task caption needs SwinBERT")
        return CaptionObjective(model)
    for method in ("encode_clips", "encode_text"):
        if not hasattr(model, method):
            raise ValueError(
                f"model {cfg.model!r} has no {method}(); --task retrieval needs a text-video model"
            )
    return RetrievalObjective(model, cfg.clip_aggregation)


# ---------------------------------------------------------------------------------------------------------
# Optimiser and schedule
# ---------------------------------------------------------------------------------------------------------


def parameter_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups. Models with a ``param_groups(lr, backbone_lr, weight_decay)`` helper split the
    pretrained backbone (``lr * backbone_lr_scale``) from new modules (``lr``) and exempt gains, biases and
    embeddings from weight decay; other models get one group at ``lr`` (1-D tensors without decay)."""
    helper = getattr(model, "param_groups", None)
    if callable(helper):
        import inspect

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


# ---------------------------------------------------------------------------------------------------------
# RNG and checkpoint state
# ---------------------------------------------------------------------------------------------------------


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
    import hashlib

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
    """Load a training ``state.pt`` safely (``weights_only=True``) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training state {str(path)!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{str(path)!r} is not a vidsift training state ({STATE_FORMAT})")
    return state


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------


def _all_gather_objects(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def encode_split(
    objective: RetrievalObjective,
    batches: Iterable[dict],
    device: torch.device,
    equivalence: str | None,
    autocast: torch.dtype | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str] | None]:
    """Encode this worker's share of a split and gather all workers' shares:
    ``(video_emb [V, D], text_emb [N, D], text_to_video [N], classes [V] or None)``.

    Videos are deduplicated by ``video_id`` and sorted, so the result does not depend on how the shards were
    divided among workers; ``classes`` holds each video's ``equivalence`` meta field when every video has one.
    """
    from pipeline.retrieval_eval import flatten_captions

    was_training = objective.training
    objective.eval()
    rows: list[tuple[str, np.ndarray, list[str], Any, np.ndarray]] = []
    try:
        for batch in batches:
            frames = batch["frames"].to(device, non_blocking=True)
            mask = batch["mask"].to(device)
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                video = objective.embed_videos(frames, mask).float().cpu().numpy()
                texts, owners = flatten_captions(batch["captions"])
                text = objective.model.encode_text(texts).float().cpu().numpy()
            for i, vid in enumerate(batch["video_id"]):
                cls = batch["meta"][i].get(equivalence) if equivalence else None
                rows.append((vid, video[i], batch["captions"][i], cls, text[owners == i]))
    finally:
        objective.train(was_training)
    merged: dict[str, tuple] = {}
    for part in _all_gather_objects(rows):
        for row in part:
            merged.setdefault(row[0], row)
    if not merged:
        raise ValueError("evaluation split is empty: no video was decoded")
    ordered = [merged[k] for k in sorted(merged)]
    video_emb = np.stack([r[1] for r in ordered])
    text_emb = np.concatenate([r[4] for r in ordered])
    owners = np.concatenate([np.full(len(r[4]), j, dtype=np.int64) for j, r in enumerate(ordered)])
    classes = None
    if equivalence and all(r[3] is not None for r in ordered):
        classes = [str(r[3]) for r in ordered]
    return video_emb, text_emb, owners, classes


@torch.no_grad()
def evaluate_retrieval(
    objective: RetrievalObjective,
    batches: Iterable[dict],
    device: torch.device,
    equivalence: str | None,
    autocast: torch.dtype | None = None,
) -> dict[str, float]:
    """Encode a split (:func:`encode_split`, all workers) and compute t2v/v2t metrics; every worker returns
    the same numbers."""
    from pipeline.retrieval_eval import retrieval_metrics

    video_emb, text_emb, owners, classes = encode_split(objective, batches, device, equivalence, autocast)
    sim = text_emb.astype(np.float64) @ video_emb.astype(np.float64).T
    metrics = retrieval_metrics(sim, owners, equivalence=classes)
    metrics["equivalence"] = equivalence if classes is not None else None
    return metrics


@torch.no_grad()
def evaluate_caption(
    objective: CaptionObjective,
    batches: Iterable[dict],
    device: torch.device,
    autocast: torch.dtype | None = None,
    max_generate: int = 64,
) -> dict[str, float]:
    """Mean MLM loss over a split (gathered over workers) and, when the model can ``generate``, caption
    metrics (:func:`pipeline.caption_metrics.evaluate_captions`) on up to ``max_generate`` videos a worker."""
    was_training = objective.training
    objective.eval()
    total, count = 0.0, 0
    hypotheses: list[tuple[str, str, list[str]]] = []
    try:
        for batch in batches:
            frames = batch["frames"].to(device, non_blocking=True)
            mask = batch["mask"].to(device)
            first = [c[0] for c in batch["captions"]]
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                loss = objective(frames, mask, first)
            total += float(loss) * len(first)
            count += len(first)
            generate = getattr(objective.model, "generate", None)
            if callable(generate) and len(hypotheses) < max_generate:
                outs, _ = generate(frames, mask)
                for vid, hyp, refs in zip(batch["video_id"], outs, batch["captions"]):
                    hypotheses.append((vid, str(hyp), list(refs)))
    finally:
        objective.train(was_training)
    parts = _all_gather_objects((total, count, hypotheses))
    total = sum(p[0] for p in parts)
    count = sum(p[1] for p in parts)
    if count == 0:
        raise ValueError("evaluation split is empty: no video was decoded")
    metrics: dict[str, Any] = {"mlm_loss": total / count, "num_videos": float(count)}
    merged = {vid: (hyp, refs) for p in parts for vid, hyp, refs in p[2]}
    if merged:
        from pipeline.caption_metrics import evaluate_captions

        keys = sorted(merged)
        metrics.update(evaluate_captions([merged[k][0] for k in keys], [merged[k][1] for k in keys]))
    return metrics


# ---------------------------------------------------------------------------------------------------------
# The Ray Train worker loop
# ---------------------------------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def _log(rank: int, text: str) -> None:
    if rank == 0:
        print(text, flush=True)


def embed_split(
    shards: str | os.PathLike, cfg: TrainConfig, pretrained: str | os.PathLike, split: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str] | None]:
    """:func:`encode_split` of ``cfg.model`` loaded from ``pretrained`` on one split, in this process (no
    Ray): what the trainer's evaluation sees, for analysis scripts (e.g. ``bench/attribute_accuracy.py``)."""
    from models import create_model

    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    model, transform, _ = create_model(cfg.model, pretrained=str(pretrained))
    inventory = {"inventory": shard_inventory(shards)}
    batches = _eval_batches(cfg, inventory, split or cfg.test_split, transform, 0, 1)
    return encode_split(build_objective(model, cfg), batches, torch.device("cpu"), cfg.equivalence)


def _eval_batches(cfg: TrainConfig, loop: dict, split: str, transform, rank: int, world: int):
    shards = shards_with(loop["inventory"], split)
    dataset = make_dataset(shards, split, cfg.eval_sampling, cfg.size, cfg.seed, False, 0, rank, world)
    samples = iterate_samples(dataset, cfg.dataloader_workers)
    return (collate(b, transform) for b in distinct_batches(samples, cfg.eval_batch_size, None))


def _train_batches(cfg: TrainConfig, loop: dict, epoch: int, attempt: int, transform, rank: int, world: int):
    """Endless full batches for one epoch on this rank: shards shuffled per (seed, epoch, attempt), this
    rank's share, cycled with a fresh order if the rank runs out before the epoch's step count (shards
    rarely divide evenly between ranks)."""
    shards = shards_with(loop["inventory"], cfg.train_split)
    seed = cfg.seed + 7919 * attempt
    dataset = make_dataset(
        shards, cfg.train_split, cfg.train_sampling, cfg.size, seed, True, cfg.shuffle_buffer, rank, world
    )
    cycle = 0
    while True:
        dataset.set_epoch(epoch * 1000 + cycle)
        produced = 0
        samples = iterate_samples(dataset, cfg.dataloader_workers)
        for batch in distinct_batches(samples, cfg.batch_size, meta_key(cfg.distinct_batch_key)):
            if len(batch) < cfg.batch_size:
                continue  # every rank must contribute equal batches to the gathered loss
            produced += 1
            yield collate(batch, transform)
        if produced == 0:
            raise ValueError(
                f"rank {rank}: split {cfg.train_split!r} gives this rank no full batch of "
                f"{cfg.batch_size}; lower batch_size"
            )
        cycle += 1


def train_loop_per_worker(loop: dict) -> None:
    """Ray Train worker function. ``loop`` holds ``config`` (a TrainConfig dict), ``inventory``,
    ``steps_per_epoch`` and ``model_kwargs``; see :func:`run_training`."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.from_dict(loop["config"])
    rank, world = _world()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    device = ray.train.torch.get_device()
    seed_everything(cfg.seed + rank)

    from models import create_model

    builder_kwargs = {"backbone_pretrained": cfg.backbone_pretrained} if cfg.backbone_pretrained else {}
    model, transform, _ = create_model(cfg.model, pretrained=cfg.pretrained, **builder_kwargs)
    if cfg.grad_checkpointing:
        setter = getattr(model, "set_grad_checkpointing", None)
        if not callable(setter):
            raise ValueError(f"model {cfg.model!r} does not support gradient checkpointing")
        setter(True)
    objective = build_objective(model, cfg)

    steps_per_epoch = int(loop["steps_per_epoch"])
    total_steps = steps_per_epoch * cfg.epochs
    optimizer, scheduler = build_optimizer(model, cfg, total_steps)
    autocast = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=autocast == torch.float16)

    step, epoch, step_in_epoch, attempt = 0, 0, 0, 0
    history: list[dict[str, Any]] = []
    resumed: dict[str, Any] | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = load_state_file(Path(ckpt_dir) / STATE_FILE)
        if state["model_name"] != cfg.model:
            raise ValueError(f"checkpoint is of model {state['model_name']!r}, not {cfg.model!r}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, step_in_epoch = int(state["step"]), int(state["epoch"]), int(state["step_in_epoch"])
        attempt = int(state.get("attempt", 0)) + 1
        history = json.loads(state["history"])
        rngs = state["rng"]
        if len(rngs) == world:
            set_rng_state(rngs[rank])
        else:
            seed_everything(cfg.seed + rank + 7919 * attempt)
        resumed = {
            "type": "resume",
            "step": step,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "optimizer_digest": optimizer_digest(optimizer.state_dict()),
            "scheduler_last_epoch": int(scheduler.last_epoch),
            "world_size": world,
        }
        history.append(resumed)
        _log(rank, f"[train] resumed at step {step} (epoch {epoch}, step {step_in_epoch} of it)")

    objective = ray.train.torch.prepare_model(
        objective, parallel_strategy_kwargs={"find_unused_parameters": cfg.find_unused_parameters}
    )
    unwrapped = objective.module if hasattr(objective, "module") else objective

    def save_and_report(metrics: dict[str, Any]) -> None:
        """Every rank reports; rank 0 attaches the checkpoint (all ranks' RNG states gathered into it)."""
        rngs = _all_gather_objects(rng_state())
        if rank != 0:
            ray.train.report(metrics)
            return
        state = {
            "format": STATE_FORMAT,
            "model_name": cfg.model,
            "model": {k: v.detach().cpu() for k, v in unwrapped.model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "step": step,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "attempt": attempt,
            "rng": rngs,
            "history": json.dumps(history),
            "config": json.dumps(cfg.to_dict()),
        }
        with tempfile.TemporaryDirectory(prefix="vidsift-ckpt-") as tmp:
            torch.save(state, Path(tmp) / STATE_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def run_eval(split: str) -> dict[str, Any]:
        batches = _eval_batches(cfg, loop, split, transform, rank, world)
        if cfg.task == "caption":
            return evaluate_caption(unwrapped, batches, device, autocast)
        return evaluate_retrieval(unwrapped, batches, device, cfg.equivalence, autocast)

    has_val = split_count(loop["inventory"], cfg.val_split) > 0 and cfg.eval_every > 0
    has_test = split_count(loop["inventory"], cfg.test_split) > 0
    global_batch = cfg.batch_size * world
    start = time.perf_counter()
    start_step = step
    window_t, window_samples, window_loss, window_n = time.perf_counter(), 0, 0.0, 0
    objective.train()
    stop = False
    while epoch < cfg.epochs and not stop:
        batches = _train_batches(cfg, loop, epoch, attempt, transform, rank, world)
        while step_in_epoch < steps_per_epoch:
            batch = next(batches)
            frames = batch["frames"].to(device, non_blocking=True)
            mask = batch["mask"].to(device)
            captions = [random.choice(c) for c in batch["captions"]]
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                loss = objective(frames, mask, captions)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {float(loss)} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            step_in_epoch += 1
            window_loss += float(loss.detach())
            window_n += 1
            window_samples += global_batch
            if step % cfg.log_every == 0 or step_in_epoch == steps_per_epoch:
                now = time.perf_counter()
                rate = window_samples / max(now - window_t, 1e-9)
                remaining = (min(total_steps, cfg.max_steps or total_steps) - step) * global_batch
                line = {
                    "type": "train",
                    "step": step,
                    "epoch": epoch,
                    "loss": window_loss / window_n,
                    "lr": max(scheduler.get_last_lr()),  # the peak group (a frozen backbone reads 0)
                    "samples_per_s": rate,
                    "eta_s": remaining / max(rate, 1e-9),
                    "elapsed_s": now - start,
                }
                history.append(line)
                _log(
                    rank,
                    f"[train] step {step}/{total_steps} epoch {epoch} loss {line['loss']:.4f} "
                    f"lr {line['lr']:.2e} {rate:.1f} samples/s ETA {line['eta_s']:.0f}s",
                )
                window_t, window_samples, window_loss, window_n = now, 0, 0.0, 0
            if cfg.max_steps is not None and step >= cfg.max_steps and step_in_epoch < steps_per_epoch:
                stop = True  # mid-epoch: checkpoint below; at an epoch end the epoch checkpoint serves
                break
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step_in_epoch < steps_per_epoch:
                save_and_report({"step": step, "epoch": epoch, "loss": float(loss.detach())})
        if stop:
            break
        epoch += 1
        step_in_epoch = 0
        metrics: dict[str, Any] = {"step": step, "epoch": epoch}
        if has_val and epoch % cfg.eval_every == 0:
            t0 = time.perf_counter()
            val = run_eval(cfg.val_split)
            history.append(
                {
                    "type": "eval",
                    "split": cfg.val_split,
                    "step": step,
                    "epoch": epoch,
                    "eval_s": time.perf_counter() - t0,
                    **val,
                }
            )
            metrics.update({f"val_{k}": v for k, v in val.items() if isinstance(v, (int, float))})
            _log(rank, f"[eval] epoch {epoch} {cfg.val_split}: {_summary(val)}")
        if epoch == cfg.epochs and has_test:
            test = run_eval(cfg.test_split)
            history.append({"type": "eval", "split": cfg.test_split, "step": step, "epoch": epoch, **test})
            metrics.update({f"test_{k}": v for k, v in test.items() if isinstance(v, (int, float))})
            _log(rank, f"[eval] final {cfg.test_split}: {_summary(test)}")
        save_and_report(metrics)
        window_t, window_samples, window_loss, window_n = time.perf_counter(), 0, 0.0, 0  # skip eval time
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break
    if stop:
        history.append({"type": "stopped", "step": step, "epoch": epoch, "reason": "max_steps"})
        save_and_report({"step": step, "epoch": epoch, "stopped_at_max_steps": True})
    _log(rank, f"[train] worker done: {step - start_step} steps in {time.perf_counter() - start:.1f}s")


def _summary(metrics: dict[str, Any]) -> str:
    if "t2v_R@1" in metrics:
        from pipeline.retrieval_eval import format_metrics

        return format_metrics({k: v for k, v in metrics.items() if k[:4] in ("t2v_", "v2t_")})
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))


# ---------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint folders of a Ray Train run folder holding a ``state.pt``, oldest first (by step)."""
    run_dir = Path(run_dir)
    found = []
    for d in run_dir.glob("checkpoint_*"):
        if (d / STATE_FILE).is_file():
            found.append(d)
    return sorted(found, key=lambda d: (d.stat().st_mtime, d.name))


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def export_model(state: dict[str, Any], output: Path) -> Path:
    """Write ``OUTPUT/model.pt`` (a :func:`models.save_checkpoint` file) from a training state."""
    from models import create_model, save_checkpoint

    model, _, _ = create_model(state["model_name"])
    model.load_state_dict(state["model"])
    extra = {"step": int(state["step"]), "epoch": int(state["epoch"]), "train_config": state["config"]}
    return save_checkpoint(model, output / "model.pt", extra=extra)


def _init_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:  # inside `ray job submit`, or pointed at a cluster on purpose
        ray.init(address=address)
    else:  # a private single-machine Ray; never attach to someone else's cluster by accident
        ray.init(address="local", include_dashboard=False)


def run_training(
    shards: str | os.PathLike,
    output: str | os.PathLike,
    cfg: TrainConfig,
    workers: int = 1,
    resume: bool = False,
    use_gpu: bool | None = None,
    max_failures: int = 0,
) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` on the shards with a Ray Train ``TorchTrainer`` and export the result.

    Writes under ``output``: ``ray/train/checkpoint_*`` (Ray Train storage), ``model.pt`` (loadable with
    ``models.create_model(cfg.model, pretrained=output/"model.pt")``), ``metrics.jsonl`` (one JSON object per
    progress / eval / resume event) and ``summary.json``. ``resume=True`` continues the run stored in
    ``output`` from its latest checkpoint; without it an existing run there is an error.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    if not cfg.model:
        raise ValueError("no model given (--model or `model:` in the config)")
    if workers < 1:
        raise ValueError(f"workers={workers}: must be >= 1")
    from models import get_model_config

    get_model_config(cfg.model)  # unknown names fail here, with the list of known ones
    if cfg.backbone_pretrained and not Path(cfg.backbone_pretrained).is_file():
        raise FileNotFoundError(f"backbone_pretrained {cfg.backbone_pretrained!r}: no such checkpoint file")
    output = Path(output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    storage = output / "ray"
    run_dir = storage / RUN_NAME
    existing = checkpoint_dirs(run_dir)
    if resume and not existing:
        raise FileNotFoundError(f"--resume: no checkpoint under {str(run_dir)!r} to resume from")
    if not resume and run_dir.exists():
        raise FileExistsError(
            f"{str(run_dir)!r} already holds a training run; pass --resume to continue it, "
            "or use a new --output"
        )

    inventory = shard_inventory(shards)
    n_train = split_count(inventory, cfg.train_split)
    if n_train == 0:
        raise ValueError(f"shards {str(shards)!r} hold no sample of split {cfg.train_split!r}")
    steps_per_epoch = n_train // (cfg.batch_size * workers)
    if steps_per_epoch < 1:
        raise ValueError(
            f"{n_train} {cfg.train_split} samples cannot fill one global batch of "
            f"{cfg.batch_size} x {workers} "
            "workers; lower batch_size or workers"
        )
    _init_ray()
    if use_gpu is None:
        import ray

        use_gpu = torch.cuda.is_available() or ray.cluster_resources().get("GPU", 0) > 0
    resources = {"CPU": cfg.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "inventory": inventory,
            "steps_per_epoch": steps_per_epoch,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            storage_path=str(storage),
            name=RUN_NAME,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )
    print(
        f"[train] {cfg.model} task={cfg.task} workers={workers} gpu={use_gpu} train={n_train} videos "
        f"steps/epoch={steps_per_epoch} epochs={cfg.epochs} batch={cfg.batch_size}x{workers}"
        + (f" (resuming from {existing[-1].name})" if resume else ""),
        flush=True,
    )
    started = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - started
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as ckpt_dir:
        state = load_state_file(Path(ckpt_dir) / STATE_FILE)
    model_path = export_model(state, output)
    history = json.loads(state["history"])
    _atomic_write_text(output / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    evals = [h for h in history if h.get("type") == "eval"]
    summary = {
        "model": cfg.model,
        "task": cfg.task,
        "workers": workers,
        "use_gpu": bool(use_gpu),
        "steps": int(state["step"]),
        "epochs_done": int(state["epoch"]),
        "wall_s": wall,
        "model_path": str(model_path),
        "checkpoint": str(result.checkpoint.path),
        "final_val": next((h for h in reversed(evals) if h["split"] == cfg.val_split), None),
        "test": next((h for h in reversed(evals) if h["split"] == cfg.test_split), None),
        "config": cfg.to_dict(),
    }
    _atomic_write_text(output / "summary.json", json.dumps(summary, indent=2, default=str))
    line = (
        f"[train] done: {summary['steps']} steps, {summary['epochs_done']} epochs in {wall:.1f}s "
        f"-> {model_path}"
    )
    if summary["test"] is not None:
        line += f"\n[train] test: {_summary(summary['test'])}"
    print(line, file=sys.stdout, flush=True)
    return summary


def evaluate_model(
    shards: str | os.PathLike, cfg: TrainConfig, pretrained: str | os.PathLike, split: str | None = None
) -> dict[str, Any]:
    """Evaluate ``cfg.model`` loaded from ``pretrained`` (e.g. ``RUN_DIR/model.pt``) on one split of the
    shards in this process (no Ray), with ``cfg.eval_sampling`` — e.g. to compare clip counts at test time."""
    from models import create_model

    split = split or cfg.test_split
    inventory = shard_inventory(shards)
    if split_count(inventory, split) == 0:
        raise ValueError(f"shards {str(shards)!r} hold no sample of split {split!r}")
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    model, transform, _ = create_model(cfg.model, pretrained=str(pretrained))
    objective = build_objective(model, cfg)
    batches = _eval_batches(cfg, {"inventory": inventory}, split, transform, 0, 1)
    device = torch.device("cpu")
    if cfg.task == "caption":
        metrics = evaluate_caption(objective, batches, device)
    else:
        metrics = evaluate_retrieval(objective, batches, device, cfg.equivalence)
    return {"split": split, "model": cfg.model, "pretrained": str(pretrained),
            "eval_sampling": dict(cfg.eval_sampling), **metrics}

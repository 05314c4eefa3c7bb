"""Batches for the trainer: :class:`pipeline.datasets.ShardClipDataset` streams and decodes clips from the
tars (train: few random sparse clips, ClipBERT-style; eval: more, deterministic), grouped so no two samples
of a local batch share a caption class, and stacked with the model transform.

With ``segments: true`` a sample is one timed caption (clips inside its span) and its ``caption_class`` is
the *segment's* class: two segments of one event class stay apart (they would be false negatives), while
other segments of the same video -- different events -- may share a batch as hard negatives. (The video's
own class, ``video_caption_class``, would do both wrong: it is the same for every segment of a video and
differs between two videos showing the same event.)"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from pipeline.datasets import ShardClipDataset
from pipeline.sampling import SamplingConfig
from pipeline.training.config import TrainConfig
from pipeline.training.inventory import shards_with


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
    segments: bool = False,
):
    """A :class:`pipeline.datasets.ShardClipDataset` over ``shard_paths`` keeping ``split`` only; this
    rank's share (whole shards when there are enough, else every ``world``-th sample). ``segments``: one
    sample per timed caption, clips inside its span (docs/moments.md)."""
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
        segments=segments,
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


def eval_batches(
    cfg: TrainConfig, inventory: dict[str, dict[str, int]], split: str, transform, rank: int, world: int
) -> Iterator[dict[str, Any]]:
    """This rank's share of ``split`` in deterministic ``eval_batch_size`` batches (``eval_sampling``)."""
    shards = shards_with(inventory, split)
    dataset = make_dataset(
        shards, split, cfg.eval_sampling, cfg.size, cfg.seed, False, 0, rank, world, segments=cfg.segments
    )
    samples = iterate_samples(dataset, cfg.dataloader_workers)
    return (collate(b, transform) for b in distinct_batches(samples, cfg.eval_batch_size, None))


def train_batches(
    cfg: TrainConfig,
    inventory: dict[str, dict[str, int]],
    epoch: int,
    attempt: int,
    transform,
    rank: int,
    world: int,
) -> Iterator[dict[str, Any]]:
    """Endless full batches for one epoch on this rank: shards shuffled per (seed, epoch, attempt), this
    rank's share, cycled with a fresh order if the rank runs out before the epoch's step count (shards
    rarely divide evenly between ranks)."""
    shards = shards_with(inventory, cfg.train_split)
    seed = cfg.seed + 7919 * attempt
    dataset = make_dataset(
        shards, cfg.train_split, cfg.train_sampling, cfg.size, seed, True, cfg.shuffle_buffer, rank, world,
        segments=cfg.segments,
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

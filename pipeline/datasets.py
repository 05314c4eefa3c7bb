"""The torch dataset over WebDataset shards, for training (the Ray Data decode stage, which needs no torch,
is :mod:`pipeline.decode_stage`).

``ShardClipDataset`` reads ``shards/NNNNNN.tar`` (``{key}.mp4`` + ``{key}.json``, see docs/interfaces.md)
with webdataset's tar reader, splits the work across (distributed rank x DataLoader worker) consumers so
that every sample is read by exactly one of them, shuffles shards per epoch (``set_epoch``) and samples
through a buffer, and sparse-samples clips from each video (:func:`pipeline.clips.sample_clips`).

Shards are URIs on any store (a folder, ``s3://``, ``gs://``...): listings and tar streams go through
:mod:`runtime.storage` (:func:`open_shard_streams` feeds webdataset's tar reader).

Error policy (``on_error``, see :mod:`runtime.errors`): only *named input failures* -- a corrupt tar
(:class:`BadTar`), a sample without its mp4 or with bad json (:class:`BadSample`), a video that does not
decode (:class:`pipeline.decode.VideoDecodeError`) -- are recorded. Under ``"record"`` (default) the dataset
logs, counts (``error_counts`` / ``errors``) and skips them and the epoch goes on. Under ``"raise"`` they
raise. Any other exception is a bug and raises under either policy.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.clips import sample_clips
from pipeline.decode import Size
from pipeline.decode_stage import (
    BadSample,
    as_sampling_config,
    failure_message,
    json_record,
    plan_meta,
)
from pipeline.sampling import SamplingConfig, plan_in_span
from pipeline.shard_tar import TAR_FAILURES, BadTar, list_shards, open_shard_streams
from runtime.errors import (
    ErrorPolicy,
    InputError,
    check_policy,
    should_record,
)

log = logging.getLogger(__name__)

MAX_ERROR_RECORDS = 1000


def distributed_rank_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit ``rank``/``world_size``, else ``torch.distributed`` (as set up by Ray Train), else (0, 1)."""
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ValueError("give both rank and world_size, or neither")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def consumer_slot(rank: int, world_size: int, worker_id: int, num_workers: int) -> tuple[int, int]:
    """(index, count) of one (rank, DataLoader worker) consumer among all of them."""
    return rank * num_workers + worker_id, world_size * num_workers


# --------------------------------------------------------------------------------------------- samples
# Small generators over sample dicts (webdataset's style): each takes an iterator and gives one, and a
# failure goes to ``errors`` (a SkipLog, which holds the error policy).


class SkipLog:
    """Where a stream's skipped inputs go: the error policy (``on_error``: ``"record"`` counts and logs a
    named input failure and moves on, ``"raise"`` raises it), the counts by reason, the first
    ``MAX_ERROR_RECORDS`` records, and an optional ``on_skip(record)`` callback."""

    def __init__(self, on_error: ErrorPolicy = "record",
                 on_skip: Callable[[dict[str, Any]], None] | None = None):
        self.on_error = check_policy(on_error)
        self.on_skip = on_skip
        self.counts: collections.Counter[str] = collections.Counter()
        self.records: list[dict[str, Any]] = []

    def skip(self, key: str, url: str, exc: InputError) -> None:
        """Record a named input failure under ``"record"``; raise it under ``"raise"``."""
        if not should_record(exc, self.on_error):
            raise exc
        message = failure_message(exc)
        record = {"key": key, "shard": os.path.basename(url), "reason": exc.reason, "message": message}
        log.warning("skipping sample %s in %s: %s: %s", key, url, exc.reason, message)
        self.counts[exc.reason] += 1
        if len(self.records) < MAX_ERROR_RECORDS:
            self.records.append(record)
        if self.on_skip is not None:
            self.on_skip(record)

    def tar_error(self, exc: Exception) -> bool:
        """webdataset's handler: a bad tar is recorded (keep going with the next member / shard)."""
        if not isinstance(exc, TAR_FAILURES):
            raise exc  # a bug, not a bad shard
        self.skip("", getattr(exc, "url", "?"), BadTar(f"{type(exc).__name__}: {exc}"))
        return True


def tar_samples(shards: Sequence[str], index: int, count: int, by_shard: bool,
                errors: SkipLog) -> Iterator[dict[str, Any]]:
    """``{"__key__", "__url__", "mp4", "json"}`` samples of consumer ``index`` of ``count``: whole shards
    (``by_shard``: every ``count``-th shard) or every ``count``-th sample of every shard."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    mine = shards[index::count] if by_shard else shards
    files = tar_file_expander(open_shard_streams(mine, errors.tar_error), handler=errors.tar_error)
    for position, sample in enumerate(group_by_keys(files, handler=errors.tar_error)):
        if by_shard or position % count == index:
            yield sample


def shuffled(samples: Iterator[dict[str, Any]], buffer_size: int,
             rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    """Samples through a shuffle buffer of ``buffer_size`` (unchanged order when it is 0 or 1)."""
    if buffer_size <= 1:
        yield from samples
        return
    buffer: list[dict[str, Any]] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        j = int(rng.integers(len(buffer)))
        yield buffer[j]
        buffer[j] = sample
    rng.shuffle(buffer)
    yield from buffer


def complete_samples(samples: Iterator[dict[str, Any]], split: str | None,
                     errors: SkipLog) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """``(sample, json record)`` of every sample with an mp4 and a json object (else a :class:`BadSample`
    to ``errors``), of ``split`` only when one is given."""
    for sample in samples:
        key, url = str(sample.get("__key__", "")), str(sample.get("__url__", ""))
        if "mp4" not in sample or "json" not in sample:
            missing = [ext for ext in ("mp4", "json") if ext not in sample]
            errors.skip(key, url, BadSample("incomplete_sample", f"missing member(s) {missing}"))
            continue
        try:
            record = json_record(sample["json"])
        except BadSample as exc:
            errors.skip(key, url, exc)
            continue
        if split is not None and record.get("split") != split:
            continue
        yield sample, record


def _clip_sample(key: str, video_id: str, clip: Any, captions: list[str], meta: dict[str, Any]) -> dict:
    return {"key": key, "video_id": video_id, "frames": clip.frames, "mask": clip.mask, "times": clip.times,
            "time_error": clip.time_error, "captions": captions, "meta": meta}


def video_clips(pairs: Iterator[tuple[dict, dict]], sampling: SamplingConfig, decode: Mapping[str, Any],
                rng: np.random.Generator, errors: SkipLog) -> Iterator[dict[str, Any]]:
    """One sample per video: its clips sparse-sampled by ``sampling`` (:func:`pipeline.clips.sample_clips`
    with the ``decode`` options: size, backend, keyframe_mode, device); a video that does not decode goes
    to ``errors``."""
    for sample, record in pairs:
        key, url = str(sample["__key__"]), str(sample.get("__url__", ""))
        try:
            clip = sample_clips(sample["mp4"], sampling, rng=rng, meta=plan_meta(record), **decode)
        except InputError as exc:  # a bad video is skipped (policy "record"); a bug raises
            errors.skip(key, url, exc)
            continue
        yield _clip_sample(record.get("key", key), record.get("video_id", key), clip,
                           list(record.get("captions") or []), record)


def segment_clips(pairs: Iterator[tuple[dict, dict]], sampling: SamplingConfig, decode: Mapping[str, Any],
                  rng: np.random.Generator, errors: SkipLog) -> Iterator[dict[str, Any]]:
    """One sample per timed caption of each video (``ShardClipDataset(segments=True)``, see its docstring);
    a video whose clips do not decode goes to ``errors`` and gives no (further) sample."""
    for sample, record in pairs:
        key, url = str(sample["__key__"]), str(sample.get("__url__", ""))
        segments = record.get("segments") or []
        meta = plan_meta(record)
        if segments and meta is None:
            errors.skip(key, url, BadSample("bad_json", f"{key}: segments need duration and fps in the json"))
            continue
        video_id = str(record.get("video_id", key))
        for i, seg in enumerate(segments):
            start, end = float(seg["start_s"]), float(seg["end_s"])
            plan = plan_in_span(sampling, start, end, meta["fps"], rng=rng,
                                start_time=float(meta.get("start_time") or 0.0))
            try:
                clip = sample_clips(sample["mp4"], plan, rng=rng, meta=meta, **decode)
            except InputError as exc:  # a bad video is skipped (policy "record"); a bug raises
                errors.skip(key, url, exc)
                break
            segment_meta = {
                **record, "source_video_id": video_id,
                "segment": {"index": i, "start_s": start, "end_s": end},
                "caption_class": segment_class(record, i), "video_caption_class": record.get("caption_class"),
            }
            yield _clip_sample(f"{record.get('key', key)}#{i}", f"{video_id}#{i}", clip,
                               [str(seg["caption"])], segment_meta)


# --------------------------------------------------------------------------------------------- torch


class ShardClipDataset(IterableDataset):
    """Sparse-sampled clips from WebDataset shards, for torch ``DataLoader`` (see the module docstring): the
    generators above, chained per consumer and epoch.

    Args:
        shards: shard tars (list, brace pattern, glob or ingest output directory).
        sampling: :class:`SamplingConfig` (or its dict); default ClipBERT train 4x2.
        size: output frame size (int square side or ``(H, W)``).
        split: keep only samples whose json ``split`` equals this (None = all).
        shuffle_shards: reshuffle the shard order every epoch (seeded by ``seed`` and the epoch).
        shuffle_buffer: sample shuffle buffer size per consumer (0 = no sample shuffle).
        rank, world_size: explicit distributed position (else ``torch.distributed``, else single process).
        split_by: ``"shard"`` (each consumer reads whole shards), ``"sample"`` (every consumer reads every
            shard and keeps every k-th sample), or ``"auto"`` (shard when there are at least as many shards
            as consumers). Either way each sample goes to exactly one consumer.
        backend, keyframe_mode, device: passed to :func:`pipeline.clips.sample_clips`.
        on_error: error policy, ``"record"`` (skip and count named input failures) or ``"raise"``.
        on_skip: optional callback ``f(record: dict)`` for every skipped sample (e.g. to write them out).
        segments: one sample per timed caption (``segments`` of the shard json, docs/moments.md) instead of
            one per video: clips planned inside the segment's span (:func:`pipeline.sampling.plan_in_span`),
            ``captions`` = the segment's caption, ``video_id`` = ``"<video_id>#<i>"``; ``meta`` is the video's
            json plus ``source_video_id``, ``segment`` (``{index, start_s, end_s}``), ``caption_class`` =
            the segment's class (:func:`segment_class`) and ``video_caption_class`` (the video's). Videos
            without segments give no sample.

    ``error_counts`` (by reason) and ``errors`` (the first records) fill as samples are skipped.
    """

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str],
        sampling: SamplingConfig | Mapping[str, Any] | None = None,
        size: Size = 224,
        split: str | None = None,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 0,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        split_by: str = "auto",
        backend: str | None = None,
        keyframe_mode: bool = False,
        device: str = "cpu",
        on_error: ErrorPolicy = "record",
        on_skip: Callable[[dict[str, Any]], None] | None = None,
        segments: bool = False,
    ):
        super().__init__()
        if split_by not in ("auto", "shard", "sample"):
            raise ValueError(f"split_by={split_by!r}: expected 'auto', 'shard' or 'sample'")
        self.shards = list_shards(shards)
        self.sampling = as_sampling_config(SamplingConfig() if sampling is None else sampling)
        self.decode = {"size": size, "backend": backend, "keyframe_mode": keyframe_mode, "device": device}
        self.split = split
        self.shuffle_shards = shuffle_shards
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.rank, self.world_size = rank, world_size
        self.split_by = split_by
        self.segments = bool(segments)
        self.epoch = 0
        self.skips = SkipLog(on_error, on_skip)
        self.error_counts = self.skips.counts
        self.errors = self.skips.records

    def set_epoch(self, epoch: int) -> None:
        """Resample for a new epoch: new shard order, shuffle buffer and train-mode clip positions."""
        self.epoch = int(epoch)

    def consumer(self) -> tuple[int, int]:
        """(index, count) of the calling (rank, DataLoader worker) among all consumers."""
        rank, world = distributed_rank_world(self.rank, self.world_size)
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return consumer_slot(rank, world, worker_id, num_workers)

    def shard_order(self) -> list[str]:
        """This epoch's shard order; identical in every consumer (it is split afterwards)."""
        order = list(self.shards)
        if self.shuffle_shards:
            rng = np.random.default_rng([self.seed, self.epoch])
            order = [order[i] for i in rng.permutation(len(order))]
        return order

    def raw_samples(self) -> Iterator[dict[str, Any]]:
        """This consumer's ``{"__key__", "__url__", "mp4", "json"}`` samples, before decoding/shuffling."""
        index, count = self.consumer()
        order = self.shard_order()
        by_shard = self.split_by == "shard" or (self.split_by == "auto" and len(order) >= count)
        return tar_samples(order, index, count, by_shard, self.skips)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        index, _ = self.consumer()
        rng = np.random.default_rng([self.seed, self.epoch, index])
        samples = shuffled(self.raw_samples(), self.shuffle_buffer, rng)
        pairs = complete_samples(samples, self.split, self.skips)
        clips = segment_clips if self.segments else video_clips
        return clips(pairs, self.sampling, self.decode, rng, self.skips)


def segment_class(record: Mapping[str, Any], i: int) -> str:
    """The class of timed caption ``i`` of a video: part ``i`` of the video's ``caption_class`` when it
    has one part per segment (the ``long`` synthetic profile: ``colour|shape|direction`` per event, in time
    order), else the caption text itself (lower-cased, spaces collapsed). Two segments of one class are
    equally correct in evaluation and kept out of one training batch; two segments of one video with
    different classes are ordinary (hard) negatives."""
    segments = record.get("segments") or []
    parts = str(record.get("caption_class") or "").split(">")
    if record.get("caption_class") and len(parts) == len(segments):
        return parts[i]
    return " ".join(str(segments[i]["caption"]).lower().split())


def collate_clips(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack ``frames`` (uint8 ``[B, N, T, H, W, 3]``), ``mask``, ``times``, ``time_error`` into tensors;
    keep ``captions`` (list of lists), ``key``, ``video_id`` and ``meta`` as lists."""
    if not samples:
        raise ValueError("collate_clips: empty batch")
    out: dict[str, Any] = {
        "frames": torch.from_numpy(np.stack([s["frames"] for s in samples])),
        "mask": torch.from_numpy(np.stack([s["mask"] for s in samples]).astype(bool)),
        "times": torch.from_numpy(np.stack([s["times"] for s in samples]).astype(np.float32)),
    }
    if all("time_error" in s for s in samples):
        out["time_error"] = torch.from_numpy(np.stack([s["time_error"] for s in samples]).astype(np.float32))
    for name in ("key", "video_id", "captions", "meta"):
        out[name] = [s.get(name) for s in samples]
    return out


# --------------------------------------------------------------------------------------------- Ray Data



"""The Ray Data decode stage over shard rows, and the read that feeds it: :class:`DecodeClipsStage` decodes
and sparse-samples each row of a ``map_batches`` batch (:func:`pipeline.clips.sample_clips`);
:func:`read_shards_ray` reads shards (on any store, with the store's pyarrow filesystem) into a Ray Dataset
with the columns the stage expects. Also the sample-level helpers the torch dataset
(:mod:`pipeline.datasets`) shares with it: the sample's json, its timeline, :class:`BadSample`.

No torch here: decode actors and read tasks import this module, and torch would cost each of those
processes seconds of CPU and a few hundred MB (tests/test_architecture.py keeps it so).

Error policy (``on_error``, see :mod:`runtime.errors`): a sample without its mp4 or with bad json
(:class:`BadSample`) or a video that does not decode (:class:`pipeline.decode.VideoDecodeError`) is a named
input failure: under ``"record"`` (default) the stage gives its row the key, ``error`` (reason) and
``error_message`` instead of frames, so no row is lost; under ``"raise"`` it raises. Any other exception is
a bug and raises under either policy.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.clips import sample_clips
from pipeline.decode import Size
from pipeline.sampling import SamplingConfig
from pipeline.shard_tar import list_shards
from runtime import storage
from runtime.errors import ErrorPolicy, InputError, TaggedMetadataError, check_policy, should_record

log = logging.getLogger(__name__)


class BadSample(TaggedMetadataError):
    """A shard sample that is not an mp4 + json-object pair (reason ``incomplete_sample`` / ``bad_json``)."""


def as_sampling_config(sampling: SamplingConfig | Mapping[str, Any]) -> SamplingConfig:
    return sampling if isinstance(sampling, SamplingConfig) else SamplingConfig.from_dict(dict(sampling))


def json_record(value: Any) -> dict[str, Any]:
    """The sample's json as a dict; :class:`BadSample` (``bad_json``) when it is not a JSON object."""
    if isinstance(value, Mapping):
        return dict(value)
    try:
        if isinstance(value, (bytes, bytearray)):
            value = value.decode("utf-8")
        if not isinstance(value, str):
            raise TypeError(f"sample json is {type(value).__name__}, expected bytes or str")
        record = json.loads(value)
    except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadSample("bad_json", str(exc)) from exc
    if not isinstance(record, dict):
        raise BadSample("bad_json", f"sample json is a {type(record).__name__}, expected an object")
    return record


def failure_message(exc: BaseException) -> str:
    return str(getattr(exc, "message", exc))


def plan_meta(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """Duration/fps (and, from current ingests, start time and keyframe timeline) from the shard json when
    usable (spares a probe, also in keyframe mode), else None (probe the video)."""
    try:
        duration, fps = float(record["duration"]), float(record["fps"])
    except (KeyError, TypeError, ValueError):
        return None
    if not (np.isfinite(duration) and duration > 0 and np.isfinite(fps) and fps > 0):
        return None
    extra = {k: record[k] for k in _TIMELINE_KEYS if record.get(k) is not None}
    return {**extra, "duration": duration, "fps": fps}


_TIMELINE_KEYS = ("start_time", "time_base", "keyframe_pts", "num_frames", "width", "height", "codec")


class DecodeClipsStage:
    """Ray Data ``map_batches`` callable: decode + sparse-sample every row of a shard batch.

    Input columns: ``key`` (or ``__key__``), ``mp4`` (bytes), ``json`` (bytes/str/dict). Output keeps
    ``key`` and adds ``video_id``, ``frames`` uint8 ``[B, N, T, H, W, 3]``, ``mask``, ``times``,
    ``time_error``, ``captions`` (JSON list), ``json`` (str), ``error`` (reason, "" when fine) and
    ``error_message``. Failed rows carry zero frames and an all-False mask. Train-mode plans are seeded
    from ``seed`` and the key, so reruns give the same clips. ``on_error``: ``"record"`` turns a named input
    failure into such a row, ``"raise"`` raises it; any other exception raises.
    """

    def __init__(
        self,
        sampling: SamplingConfig | Mapping[str, Any] | None = None,
        size: Size = 224,
        backend: str | None = None,
        keyframe_mode: bool = False,
        seed: int = 0,
        device: str = "cpu",
        on_error: ErrorPolicy = "record",
    ):
        if size is None:
            raise ValueError("DecodeClipsStage needs a fixed size so that batches stack")
        if sampling is None:
            sampling = SamplingConfig(mode="eval")
        self.sampling = as_sampling_config(sampling)
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.backend = backend
        self.keyframe_mode = keyframe_mode
        self.seed = int(seed)
        self.device = device
        self.on_error = check_policy(on_error)

    def _one(self, key: str, mp4: Any, raw_json: Any) -> tuple[dict[str, Any], Any]:
        record = json_record(raw_json) if raw_json is not None else {}
        if mp4 is None:
            raise BadSample("incomplete_sample", f"{key}: no mp4 member")
        rng = np.random.default_rng([self.seed, zlib.crc32(key.encode("utf-8"))])
        clip = sample_clips(bytes(mp4), self.sampling, size=self.size, backend=self.backend,
                            keyframe_mode=self.keyframe_mode, rng=rng, meta=plan_meta(record),
                            device=self.device)
        return record, clip

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        keys_col = batch["key"] if "key" in batch else batch["__key__"]
        keys = [str(k) for k in keys_col]
        mp4s = batch.get("mp4", [None] * len(keys))
        jsons = batch.get("json", [None] * len(keys))
        n, t = self.sampling.shape
        h, w = self.size
        frames = np.zeros((len(keys), n, t, h, w, 3), dtype=np.uint8)
        mask = np.zeros((len(keys), n, t), dtype=bool)
        times = np.zeros((len(keys), n, t), dtype=np.float64)
        time_error = np.zeros((len(keys), n, t), dtype=np.float64)
        video_ids, captions, records, errors, messages = [], [], [], [], []
        for i, key in enumerate(keys):
            record: dict[str, Any] = {}
            reason, message = "", ""
            try:
                record, clip = self._one(key, mp4s[i], jsons[i])
                frames[i], mask[i], times[i] = clip.frames, clip.mask, clip.times
                time_error[i] = clip.time_error
            except InputError as exc:  # no row may be lost to a bad input; a bug raises
                if not should_record(exc, self.on_error):
                    raise
                reason, message = exc.reason, failure_message(exc)
            if reason:
                log.warning("DecodeClipsStage: %s: %s: %s", key, reason, message)
            video_ids.append(str(record.get("video_id", key)))
            captions.append(json.dumps(list(record.get("captions") or [])))
            records.append(json.dumps(record, sort_keys=True))
            errors.append(reason)
            messages.append(message)
        return {
            "key": np.array(keys, dtype=object),
            "video_id": np.array(video_ids, dtype=object),
            "frames": frames,
            "mask": mask,
            "times": times,
            "time_error": time_error,
            "captions": np.array(captions, dtype=object),
            "json": np.array(records, dtype=object),
            "error": np.array(errors, dtype=object),
            "error_message": np.array(messages, dtype=object),
        }


def read_shards_ray(shards: str | os.PathLike | Sequence[str], split: str | None = None, **read_kwargs):
    """Shards (on any store) as a Ray Dataset with columns ``key``, ``mp4`` (bytes) and ``json`` (bytes),
    ready for :class:`DecodeClipsStage`. ``split`` keeps only samples whose json ``split`` matches; samples
    whose json cannot be parsed are kept (the stage records them as errors) so nothing disappears silently.
    The read tasks get the store's pyarrow filesystem and this process's store configuration
    (:func:`runtime.storage.storage_env`)."""
    import ray.data  # why: Ray Data is imported only by the callers that build datasets

    paths = list_shards(shards)
    filesystem, _ = storage.arrow_filesystem(paths[0])
    arrow_paths = [storage.arrow_filesystem(p)[1] for p in paths]
    env = storage.storage_env()
    if env and "runtime_env" not in read_kwargs:
        read_kwargs["runtime_env"] = {"env_vars": env}
    ds = ray.data.read_webdataset(arrow_paths, filesystem=filesystem, decoder=None, **read_kwargs)
    ds = ds.rename_columns({"__key__": "key"})
    if split is not None:
        ds = ds.filter(_SplitFilter(split))
    return ds


class _SplitFilter:
    def __init__(self, split: str):
        self.split = split

    def __call__(self, row: dict[str, Any]) -> bool:
        try:
            return json_record(row.get("json")).get("split") == self.split
        except BadSample:
            return True

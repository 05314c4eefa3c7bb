"""Batch embedding of shards into Parquet: the encoder stage, the workers' part writers, the incremental plan.

Data flow (wired, with every resource, in ``workflows/embed.py``): shards → skip keys that are already
embedded → :class:`DecodeShardClipsStage` (:class:`pipeline.datasets.DecodeClipsStage` plus the shard
column) → :class:`EncodeClipsStage` (an actor pool, GPUs when there are any) → :func:`write_shard_fragments`
(Ray tasks: each encoded block goes to storage as one fragment object per shard, and only bookkeeping rows
— shard, key, rows, error, fragment URI — travel on to the driver) → :func:`finalize_shard` (a Ray task the
driver launches once every key of a shard is accounted for: merges the shard's fragments, drops duplicate
ids left by retried tasks, writes the shard's error part and then ``part-<shard>.parquet``, one complete
object each). The driver never holds a vector.

Layout of an embeddings output ``OUT`` (every path a URI, see :mod:`runtime.storage`)::

    OUT/model_id=<id>/part-<shard>.parquet         the embedding rows: a clean Parquet dataset
    OUT/model_id=<id>/_model.json                  the model card (not Parquet; readers skip ``_`` names)
    OUT/_errors/model_id=<id>/part-<shard>.parquet error rows per shard (itself a clean dataset)
    OUT/_text/model_id=<id>/part-<shard>.parquet   caption text embeddings (``--with-text``)
    OUT/_staging/model_id=<id>/<shard>/frag-*.parquet  in-flight fragments, removed once the part exists

Error tables, text embeddings and fragments live *beside* the partition, not inside it, so that every
reader — ``pyarrow.dataset``, ``pandas.read_parquet``, ``ray.data.read_parquet``, DuckDB (whose directory
and glob readers do not skip ``_`` names) and autofaiss — gets exactly the embedding table from the
partition folder. Other code finds these files through :func:`list_parts`, :func:`read_embed_errors`,
:func:`errors_dir`, :func:`remove_shard_outputs` and :func:`read_model_card`, never by name.

A shard's part is written last and in one put, so after a crash the next run sees each shard either
complete or absent, and redoes only the absent ones: no duplicate rows, no missing rows. Rows are keyed by a
stable ``id`` (int64 hash of video id + clip index).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from models import create_inference_model
from pipeline.clips import sample_clips
from pipeline.datasets import DecodeClipsStage
from pipeline.sampling import ClipPlan, SamplingConfig
from runtime import storage
from runtime.errors import (
    DecodeFailure,
    ErrorPolicy,
    InputError,
    InvalidMetadata,
    check_policy,
    should_record,
)

VIDEO_ROW = -1  # clip_index of the video-level row
ERROR_ROW = -2  # clip_index of the one row an input failure leaves (never in a part file)
# clip_index of sliding-window rows = WINDOW_CLIP_BASE + window number (docs/moments.md); index/moments.py
# reads the same constant (pipeline/ and index/ do not import each other; tests/test_moments.py checks it).
WINDOW_CLIP_BASE = 1_000_000
WINDOW_DECODE_GROUP = 64  # windows decoded per pass over a video (bounds the frames held at once)

EMBEDDING_COLUMNS = ("id", "video_id", "key", "shard", "clip_index", "start_s", "end_s", "model_id",
                     "sha256", "captions", "embedding")
ERROR_COLUMNS = ("key", "shard", "video_id", "reason", "message")

PART_PREFIX = "part-"  # the only data files of a partition: part-<shard>.parquet
MODEL_CARD = "_model.json"
ERRORS_ROOT = "_errors"  # OUT/_errors/model_id=<id>/part-<shard>.parquet
TEXT_ROOT = "_text"  # OUT/_text/model_id=<id>/part-<shard>.parquet
STAGING_ROOT = "_staging"  # OUT/_staging/model_id=<id>/<shard>/frag-<digest>.parquet


# ----------------------------------------------------------------------------------------------- naming


def stable_id(video_id: str, clip_index: int) -> int:
    """A stable non-negative int64 for (video, clip): the FAISS id of that row in every index."""
    digest = hashlib.blake2b(f"{video_id}\x00{clip_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF_FFFF_FFFF


def model_partition(model_id: str) -> str:
    """Directory name of a model's partition: ``model_id=<id>`` with path-unsafe characters replaced."""
    safe = re.sub(r"[^A-Za-z0-9_.@-]", "_", model_id).strip(".") or "model"
    return f"model_id={safe}"


def shard_label(tar_path: str | os.PathLike) -> str:
    """Stable name of a shard for file names: ``<ingest dir>-<tar stem>`` (``ingest-000003``).

    The ingest output folder's name is part of it so shards of several ingest runs (a nightly reindex
    writes one per run) never share a label. Works on any URI (``s3://b/ingest/shards/000003.tar``)."""
    folder = storage.parent(tar_path)
    if storage.name(folder) == "shards":
        folder = storage.parent(folder)
    stem = PurePosixPath(storage.name(tar_path)).stem
    parent_name = storage.name(folder)
    parent_name = "" if parent_name in (".", "..") else parent_name
    label = f"{parent_name}-{stem}" if parent_name else stem
    return re.sub(r"[^A-Za-z0-9_-]", "_", label)


def _sidecar(partition: str | os.PathLike, root: str) -> str:
    """``OUT/<root>/model_id=<id>``: a folder beside the partition (never inside it)."""
    return storage.join(storage.parent(partition), root, storage.name(partition))


def errors_dir(partition: str | os.PathLike) -> str:
    """Where a partition's per-shard error tables live (``OUT/_errors/model_id=<id>/``)."""
    return _sidecar(partition, ERRORS_ROOT)


def text_dir(partition: str | os.PathLike) -> str:
    """Where ``--with-text`` writes the caption text embeddings (``OUT/_text/model_id=<id>/``)."""
    return _sidecar(partition, TEXT_ROOT)


def staging_dir(partition: str | os.PathLike, label: str | None = None) -> str:
    """In-flight fragments of a partition (or of one shard of it)."""
    root = _sidecar(partition, STAGING_ROOT)
    return storage.join(root, label) if label else root


def part_uri(partition: str | os.PathLike, label: str) -> str:
    return storage.join(partition, f"{PART_PREFIX}{label}.parquet")


def list_parts(partition: str | os.PathLike) -> list[str]:
    """URIs of a partition's data files (``part-*.parquet``), sorted; ``[]`` when there are none."""
    return [u for u in storage.list_files(partition, ".parquet") if storage.name(u).startswith(PART_PREFIX)]


def read_model_card(partition: str | os.PathLike) -> dict[str, Any]:
    """The partition's ``_model.json`` (``{}`` when absent)."""
    return storage.read_json(storage.join(partition, MODEL_CARD), default={}) or {}


# ------------------------------------------------------------------------------------------------ plan


@dataclasses.dataclass
class ShardWork:
    """One input shard: where it is, which keys it holds, and which of them still need embedding."""

    path: str
    label: str
    keys: list[str]
    todo_keys: list[str]


def shard_index_uri(tar_path: str | os.PathLike) -> str:
    """Ingest's per-shard Parquet index beside a shard tar (``NNNNNN.tar`` → ``NNNNNN.parquet``)."""
    text = os.fspath(tar_path)
    return (text[: -len(".tar")] if text.endswith(".tar") else text) + ".parquet"


def shard_keys(tar_path: str | os.PathLike) -> list[str]:
    """Keys of a shard, from ingest's per-shard Parquet index when present, else from the tar itself."""
    index = shard_index_uri(tar_path)
    if storage.exists(index):
        return [str(k) for k in storage.read_parquet(index, columns=["key"]).column("key").to_pylist()]
    keys: list[str] = []
    with storage.open_input(tar_path) as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
        for member in tar:
            stem, _, ext = member.name.partition(".")
            if ext == "mp4":
                keys.append(stem)
    return keys


def shard_durations(tar_path: str | os.PathLike, keys: Sequence[str]) -> float | None:
    """Seconds of video of ``keys`` in a shard, from ingest's per-shard index (None when it has none)."""
    index = shard_index_uri(tar_path)
    if not storage.exists(index):
        return None
    table = storage.read_parquet(index, columns=["key", "duration"]).to_pylist()
    wanted = set(keys)
    return float(sum(r["duration"] or 0.0 for r in table if r["key"] in wanted))


def existing_video_ids(partition: str | os.PathLike) -> set[tuple[str, str]]:
    """(video_id, sha256) pairs already embedded in a model partition (video-level rows)."""
    done: set[tuple[str, str]] = set()
    for part in list_parts(partition):
        table = storage.read_parquet(part, columns=["video_id", "sha256", "clip_index"])
        columns = (table.column(c).to_pylist() for c in ("video_id", "sha256", "clip_index"))
        for vid, sha, clip in zip(*columns):
            if clip == VIDEO_ROW:
                done.add((vid, sha))
    return done


def plan_shards(tar_paths: Sequence[str], partition: str | os.PathLike) -> list[ShardWork]:
    """Which shards still need work: a shard with a finished part file is done; in a new shard, videos
    already embedded from another shard (same video id and content hash) are skipped."""
    labels = [shard_label(p) for p in tar_paths]
    if len(set(labels)) != len(labels):
        raise ValueError("two input shards map to the same label; give shard dirs with distinct names")
    finished = {storage.name(u) for u in list_parts(partition)}  # one listing, not a HEAD per shard
    done_ids = existing_video_ids(partition) if finished else set()
    work = []
    for path, label in zip(tar_paths, labels):
        if storage.name(part_uri(partition, label)) in finished:
            continue
        keys = shard_keys(path)
        todo = keys
        index = shard_index_uri(path)
        if done_ids and storage.exists(index):
            meta = storage.read_parquet(index, columns=["key", "video_id", "sha256"]).to_pylist()
            todo = [m["key"] for m in meta if (m["video_id"], m["sha256"]) not in done_ids]
        work.append(ShardWork(path=str(path), label=label, keys=keys, todo_keys=list(todo)))
    return work


# ----------------------------------------------------------------------------------------------- stage


class DecodeShardClipsStage(DecodeClipsStage):
    """:class:`pipeline.datasets.DecodeClipsStage` that also carries the ``shard`` column through, so each
    encoded row can be filed under the shard it came from. Its parameters (the error policy included) are
    the base stage's."""

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = super().__call__(batch)
        out["shard"] = np.asarray(batch["shard"], dtype=object)
        return out


# --------------------------------------------------------------------------------------------- windows


def window_span(sampling: SamplingConfig | Mapping[str, Any], video_fps: float) -> float:
    """Default window length (s): the time one clip of the recorded sampling covers, ``frames_per_clip``
    frame steps (``1 / fps`` with a target fps, else ``stride`` source frames); ``clip4clip`` mode:
    ``max_frames / max_fps``."""
    cfg = sampling if isinstance(sampling, SamplingConfig) else SamplingConfig.from_dict(dict(sampling))
    if cfg.mode == "clip4clip":
        return cfg.max_frames / cfg.max_fps
    step = 1.0 / cfg.fps if cfg.fps is not None else (cfg.stride or 1) / video_fps
    return cfg.frames_per_clip * step


def plan_windows(duration: float, window_s: float, stride_s: float) -> list[tuple[float, float]]:
    """``[(start_s, end_s)]`` of sliding windows over ``[0, duration]``: starts ``0, stride, 2 stride...``
    while the window fits, then one window ending at ``duration`` when the tail is not covered; a video
    shorter than a window is one window ``(0, duration)``."""
    if not (window_s > 0 and stride_s > 0):
        raise ValueError(f"window_s={window_s} and stride_s={stride_s} must be > 0")
    eps = 1e-6
    if duration <= window_s + eps:
        return [(0.0, float(duration))]
    count = int(np.floor((duration - window_s) / stride_s + eps)) + 1
    bounds = [(round(i * stride_s, 6), round(i * stride_s + window_s, 6)) for i in range(count)]
    if bounds[-1][1] < duration - eps:
        bounds.append((round(duration - window_s, 6), round(float(duration), 6)))
    return bounds


def window_clip_plan(bounds: Sequence[tuple[float, float]], frames: int, duration: float, fps: float,
                     start_time: float = 0.0) -> ClipPlan:
    """``[W, frames]`` sample times: each window's frames at the centres of ``frames`` equal parts of it,
    snapped to source frame centres (so a window of ``frames`` frame steps takes them as trained)."""
    b = np.asarray(bounds, dtype=np.float64).reshape(-1, 2)
    part = (b[:, 1] - b[:, 0]) / frames
    raw = b[:, :1] + (np.arange(frames)[None, :] + 0.5) * part[:, None]
    snapped = (np.floor(raw * fps + 1e-6) + 0.5) / fps
    times = np.clip(snapped, 0.5 / fps, max(duration - 0.5 / fps, 0.5 / fps))
    return ClipPlan(times=times + start_time, mask=np.ones(times.shape, dtype=bool))


class DecodeWindowsStage(DecodeShardClipsStage):
    """:class:`DecodeShardClipsStage` for ``--windows`` runs: per input video, its usual sparse row (which
    gives the video-level row) plus rows of ``N`` sliding windows each (``N x T`` = the sampling's shape,
    so batches stack; the last row is padded with masked windows). Extra columns: ``window_index`` int64
    ``[B, N]`` (-1: no window; all -1 on the sparse row), ``window_bounds`` float64 ``[B, N, 2]`` and
    ``parts`` (decoded rows of the video, so the driver knows when all of them are written).

    ``window_s`` / ``stride_s``: seconds; None = :func:`window_span` of the sampling (per video fps) and
    half the window. A video whose windows cannot be decoded keeps its video row and gets one error row.
    """

    def __init__(self, *args: Any, window_s: float | None = None, stride_s: float | None = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.window_s, self.stride_s = window_s, stride_s

    def windows_of(self, record: Mapping[str, Any]) -> list[tuple[float, float]]:
        try:
            duration, fps = float(record["duration"]), float(record["fps"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidMetadata(f"sample json has no usable duration/fps: {exc}") from exc
        window = self.window_s or window_span(self.sampling, fps)
        return plan_windows(duration, window, self.stride_s or window / 2.0)

    def _window_rows(self, mp4: Any, record: Mapping[str, Any]) -> dict[str, list]:
        """The window rows of one video: ``frames``, ``mask``, ``times``, ``time_error``, ``window_index``,
        ``window_bounds`` per row of ``N`` windows."""
        n, t = self.sampling.shape
        bounds = self.windows_of(record)
        duration, fps = float(record["duration"]), float(record["fps"])
        start_time = float(record.get("start_time") or 0.0)
        out: dict[str, list] = {k: [] for k in ("frames", "mask", "times", "time_error", "window_index",
                                                "window_bounds")}
        group = max(n, WINDOW_DECODE_GROUP // n * n)
        for g in range(0, len(bounds), group):
            part = bounds[g:g + group]
            plan = window_clip_plan(part, t, duration, fps, start_time)
            clip = sample_clips(bytes(mp4), plan, size=self.size, backend=self.backend, device=self.device)
            for c in range(0, len(part), n):
                k = min(n, len(part) - c)
                row = {"frames": np.zeros((n, t, *self.size, 3), np.uint8), "mask": np.zeros((n, t), bool),
                       "times": np.zeros((n, t)), "time_error": np.zeros((n, t)),
                       "window_index": np.full(n, -1, np.int64), "window_bounds": np.zeros((n, 2))}
                for name in ("frames", "mask", "times", "time_error"):
                    row[name][:k] = getattr(clip, name)[c:c + k]
                row["window_index"][:k] = np.arange(g + c, g + c + k)
                row["window_bounds"][:k] = np.asarray(part[c:c + k])
                for name, value in row.items():
                    out[name].append(value)
        return out

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = super().__call__(batch)
        n, _ = self.sampling.shape
        b = len(out["key"])
        out["window_index"] = np.full((b, n), -1, np.int64)
        out["window_bounds"] = np.zeros((b, n, 2))
        out["parts"] = np.ones(b, np.int64)  # decoded rows of the video: its sparse row + its window rows
        extra: dict[str, list] = {k: [] for k in out}
        for i in range(b):
            if out["error"][i]:
                continue  # the sparse row already carries this video's failure
            try:
                rows = self._window_rows(batch["mp4"][i], json.loads(out["json"][i]))
                count, failure = len(rows["frames"]), ("", "")
            except InputError as exc:  # no row may be lost to a bad input; a bug raises
                if not should_record(exc, self.on_error):
                    raise
                rows, count, failure = {}, 1, (exc.reason, f"windows: {exc}")
            out["parts"][i] = 1 + count
            blank = {"error": failure[0], "error_message": failure[1], "parts": 1 + count,
                     "window_index": np.full(n, -1, np.int64)}  # a failure row: no window, no frames
            for name in out:
                if name in rows:
                    extra[name] += rows[name]
                elif name in blank:
                    extra[name] += [blank[name]] * count
                elif np.ndim(out[name]) > 1:
                    extra[name] += [np.zeros_like(out[name][i])] * count
                else:
                    extra[name] += [out[name][i]] * count
        if extra["key"]:
            for name in out:
                out[name] = np.concatenate([out[name], np.asarray(extra[name], dtype=out[name].dtype)])
        return out


class EncodeClipsStage:
    """Ray Data ``map_batches`` class: decoded clips → one row per clip plus one video-level row.

    Input: the columns of :class:`pipeline.datasets.DecodeClipsStage` plus ``shard``. Output: flat rows with
    the embedding schema (``embedding`` as ``[R, D]``). A row that arrives with a decode error, or without a
    single valid frame, is an input failure: under ``on_error="record"`` (the default) it comes out as one
    row with ``error`` set and an empty embedding, so the writer can record it and nothing is lost; under
    ``"raise"`` it raises :class:`runtime.errors.DecodeFailure` naming the key. Anything that goes wrong in
    the model itself is a bug and always raises.

    ``threads``: torch threads of this process (the workflow passes it; default every core of the node).
    The model comes from :func:`models.create_inference_model`: trained weights (``pretrained``, a URI on
    any store) are required unless ``allow_random_init``, and then the init is seeded (seed 0), so the
    driver and every encoder actor hold the same weights and reruns keep the same model id.
    """

    def __init__(self, model_name: str, pretrained: str | None = None, device: str | None = None,
                 dtype: str = "float32", threads: int | None = None, on_error: ErrorPolicy = "record",
                 allow_random_init: bool = False):
        self.on_error = check_policy(on_error)
        # Ray pins actor threads to the CPUs they asked for; an encoder that owns the node's compute
        # should use every core (decode actors ask for fractions and mostly wait on I/O).
        torch.set_num_threads(int(threads or os.cpu_count() or 1))
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, transform, _ = create_inference_model(model_name, pretrained, allow_random_init, seed=0)
        self.model = model.to(self.device).eval()
        self.transform = transform
        self.model_id = model.model_id
        self.dtype = np.float16 if dtype == "float16" else np.float32
        self.dim: int | None = None

    def embed(self, frames: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 ``[B, N, T, H, W, 3]`` + ``[B, N, T]`` → (clip ``[B, N, D]``, video ``[B, D]``) float32."""
        with torch.inference_mode():
            x = self.transform(frames).to(self.device)
            m = torch.as_tensor(mask, device=self.device)
            clips = self.model.encode_clips(x, m)
            video = self.model.video_from_clips(clips, m)  # one forward: aggregate the clip rows
        return clips.float().cpu().numpy(), video.float().cpu().numpy()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        errors = [str(e) for e in batch["error"]]
        ok = np.array([not e for e in errors], dtype=bool)
        mask = np.asarray(batch["mask"], dtype=bool)
        ok &= mask.any(axis=(1, 2))
        clip_emb = video_emb = None
        if ok.any():
            clip_emb, video_emb = self.embed(np.asarray(batch["frames"])[ok], mask[ok])
            self.dim = video_emb.shape[1]
        dim = self.dim or 0
        rows: dict[str, list] = {c: [] for c in ("id", "video_id", "key", "shard", "clip_index", "start_s",
                                                 "end_s", "model_id", "sha256", "captions", "embedding",
                                                 "error", "error_message", "parts", "part_done")}
        times = np.asarray(batch["times"], dtype=np.float64)
        j = 0
        # decoded rows per video (several on a --windows run); part_done marks each decoded row's first row
        parts = np.asarray(batch["parts"] if "parts" in batch else np.ones(len(batch["key"])), np.int64)
        for i, key in enumerate(batch["key"]):
            before = len(rows["id"])
            record = json.loads(batch["json"][i]) if batch["json"][i] else {}
            common = {"video_id": str(batch["video_id"][i]), "key": str(key), "shard": str(batch["shard"][i]),
                      "model_id": self.model_id, "sha256": str(record.get("sha256", "")),
                      "captions": str(batch["captions"][i])}
            if not ok[i]:
                reason = errors[i] or "no_valid_frames"
                message = str(batch["error_message"][i]) or "no frame of this video could be decoded"
                if self.on_error == "raise":
                    raise DecodeFailure(f"{key} (shard {common['shard']}): {reason}: {message}")
                self._append(rows, common, ERROR_ROW, 0.0, 0.0, np.zeros(dim, np.float32), reason, message)
            else:
                self._append_video(rows, common, batch, i, times[i], mask[i], clip_emb[j], video_emb[j])
                j += 1
            added = len(rows["id"]) - before
            rows["parts"] += [int(parts[i])] * added
            rows["part_done"] += [1] + [0] * (added - 1)
        out = {k: np.array(v, dtype=object) for k, v in rows.items() if k != "embedding"}
        out["id"] = np.array(rows["id"], dtype=np.int64)
        out["clip_index"] = np.array(rows["clip_index"], dtype=np.int64)
        out["start_s"] = np.array(rows["start_s"], dtype=np.float64)
        out["end_s"] = np.array(rows["end_s"], dtype=np.float64)
        if "parts" in batch:  # a --windows run: bookkeeping of the video's decoded rows
            out["parts"] = np.array(rows["parts"], dtype=np.int64)
            out["part_done"] = np.array(rows["part_done"], dtype=np.int64)
        else:
            del out["parts"], out["part_done"]
        out["embedding"] = (np.stack(rows["embedding"]).astype(self.dtype) if rows["embedding"]
                            else np.zeros((0, dim), self.dtype))
        return out

    def _append_video(self, rows, common, batch, i, times, mask, clip_emb, video_emb) -> None:
        """The rows of one decoded input row: its clip rows and video row; on a ``--windows`` run (columns
        ``window_index`` / ``window_bounds``) a window row gives window rows only, the sparse row only the
        video row."""
        windows = np.asarray(batch["window_index"][i]) if "window_index" in batch else None
        valid_clips = mask.any(axis=1)
        if windows is not None and windows.max() >= 0:
            bounds = np.asarray(batch["window_bounds"][i], dtype=np.float64)
            for c in np.flatnonzero(valid_clips & (windows >= 0)):
                self._append(rows, common, WINDOW_CLIP_BASE + int(windows[c]), bounds[c, 0], bounds[c, 1],
                             clip_emb[c], "", "")
            return
        if windows is None:
            for c in np.flatnonzero(valid_clips):
                start, end = _clip_span(times[c], mask[c])
                self._append(rows, common, int(c), start, end, clip_emb[c], "", "")
        start, end = _clip_span(times.ravel(), mask.ravel())
        self._append(rows, common, VIDEO_ROW, start, end, video_emb, "", "")

    @staticmethod
    def _append(rows, common, clip_index, start, end, emb, reason, message) -> None:
        rows["id"].append(stable_id(common["video_id"], clip_index))
        for k, v in common.items():
            rows[k].append(v)
        rows["clip_index"].append(clip_index)
        rows["start_s"].append(float(start))
        rows["end_s"].append(float(end))
        rows["embedding"].append(np.asarray(emb, dtype=np.float32))
        rows["error"].append(reason)
        rows["error_message"].append(message)


def _clip_span(times: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    valid = times[mask] if mask.any() else times
    return float(valid.min()), float(valid.max())


# ---------------------------------------------------------------------------------------------- writers


def embedding_schema(dim: int, dtype: str = "float32") -> pa.Schema:
    """The embeddings Parquet schema (docs/interfaces.md) for ``dim``-dimensional vectors."""
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema([
        ("id", pa.int64()), ("video_id", pa.string()), ("key", pa.string()), ("shard", pa.string()),
        ("clip_index", pa.int64()), ("start_s", pa.float64()), ("end_s", pa.float64()),
        ("model_id", pa.string()), ("sha256", pa.string()), ("captions", pa.list_(pa.string())),
        ("embedding", pa.list_(value, dim)),
    ])


ERROR_SCHEMA = pa.schema([(c, pa.string()) for c in ERROR_COLUMNS])
BOOKKEEPING_COLUMNS = ("shard", "key", "rows", "error", "fragment")
# --windows runs add: decoded rows of the key in all / in this fragment (a windowed video is several decoded
# rows that may reach the writers in different batches: the driver waits for all of them)
PARTS_COLUMNS = ("parts", "parts_done")


def fragment_schema(dim: int, dtype: str = "float32") -> pa.Schema:
    """A staged fragment: the embedding schema plus the input failure (``error``, ``error_message``)."""
    return embedding_schema(dim, dtype).append(pa.field("error", pa.string())).append(
        pa.field("error_message", pa.string()))


def encoded_table(batch: Mapping[str, Any], dim: int, dtype: str = "float32") -> pa.Table:
    """One :class:`EncodeClipsStage` output batch as an Arrow table of :func:`fragment_schema`."""
    schema = fragment_schema(dim, dtype)
    n = len(batch["key"])
    errors = [str(e) for e in batch["error"]]
    emb = np.asarray(batch["embedding"])
    if emb.ndim != 2 or emb.shape[1] != dim:
        if not all(errors):  # an actor that has seen only failed inputs emits zero-width vectors for them
            raise ValueError(f"encoded batch has vectors of shape {emb.shape}, expected [{n}, {dim}]")
        emb = np.zeros((n, dim), np.float32)
    value_type = schema.field("embedding").type.value_type
    flat = pa.array(emb.astype(value_type.to_pandas_dtype()).reshape(-1), type=value_type)
    columns = {
        "id": pa.array(np.asarray(batch["id"], dtype=np.int64)),
        "clip_index": pa.array(np.asarray(batch["clip_index"], dtype=np.int64)),
        "start_s": pa.array(np.asarray(batch["start_s"], dtype=np.float64)),
        "end_s": pa.array(np.asarray(batch["end_s"], dtype=np.float64)),
        "captions": pa.array([list(json.loads(c or "[]")) for c in batch["captions"]], pa.list_(pa.string())),
        "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
        "error": pa.array(errors, pa.string()),
    }
    for name in ("video_id", "key", "shard", "model_id", "sha256", "error_message"):
        columns[name] = pa.array([str(v) for v in batch[name]], pa.string())
    return pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)


def write_shard_fragments(batch: Mapping[str, Any], partition: str, dim: int,
                          dtype: str = "float32") -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function (runs on the workers): write one encoded batch to storage as one
    fragment object per shard it holds, and return only bookkeeping — one row per input key with its
    ``shard``, ``key``, ``rows`` (embedding rows written), ``error`` (reason, "" when fine), the
    ``fragment`` URI (+ ``parts`` / ``parts_done`` on --windows runs: the key's decoded rows in all / here,
    :data:`PARTS_COLUMNS`). Fragment names are a digest of their (key, clip) rows: a retried task rewrites
    the same object, and :func:`finalize_shard` drops duplicate ids in any case."""
    table = encoded_table(batch, dim, dtype)
    columns = BOOKKEEPING_COLUMNS + (PARTS_COLUMNS if "parts" in batch else ())
    out: dict[str, list] = {c: [] for c in columns}
    for shard in sorted(set(table.column("shard").to_pylist())):
        sub = table.filter(pc.equal(table.column("shard"), shard))
        keys, clips, errors = (sub.column(c).to_pylist() for c in ("key", "clip_index", "error"))
        rows_id = "\n".join(sorted(f"{k}\x00{c}" for k, c in zip(keys, clips)))
        digest = hashlib.blake2b(rows_id.encode(), digest_size=10).hexdigest()
        uri = storage.join(staging_dir(partition, shard), f"frag-{digest}.parquet")
        storage.write_parquet(sub, uri)
        in_shard = [str(s) == shard for s in batch["shard"]]
        parts, done = (np.asarray(batch[c] if c in batch else np.ones(len(in_shard)), np.int64)[in_shard]
                       for c in ("parts", "part_done"))
        per_key: dict[str, list] = {}
        for key, error, total, first in zip(keys, errors, parts, done):
            entry = per_key.setdefault(key, [0, "", int(total), 0])
            entry[3] += int(first)
            if error:
                entry[1] = error
            else:
                entry[0] += 1
        for key, values in per_key.items():
            for column, value in zip(columns, (shard, key, *values[:2], uri, *values[2:])):
                out[column].append(value)
    result = {c: np.array(out[c], dtype=object) for c in columns}
    for column in ("rows", *PARTS_COLUMNS[: len(columns) - len(BOOKKEEPING_COLUMNS)]):
        result[column] = np.array(out[column], dtype=np.int64)
    return result


def merge_fragments(partition: str | os.PathLike, label: str, dim: int, dtype: str = "float32") -> pa.Table:
    """A shard's staged fragments as one table, sorted by (video, clip), each ``id`` once (a retried task
    may have left a second copy of a fragment)."""
    schema = fragment_schema(dim, dtype)
    fragments = storage.list_files(staging_dir(partition, label), ".parquet")
    tables = [storage.read_parquet(f).cast(schema) for f in fragments] or [schema.empty_table()]
    table = pa.concat_tables(tables).sort_by([("video_id", "ascending"), ("clip_index", "ascending")])
    _, first = np.unique(table.column("id").to_numpy(), return_index=True)
    return table.take(pa.array(np.sort(first)))


def _shard_summary(label: str, clip_index: pa.ChunkedArray, errors: int, part: str) -> dict[str, Any]:
    videos = int(pc.sum(pc.equal(clip_index, VIDEO_ROW)).as_py() or 0)
    return {"shard": label, "videos": videos, "clips": len(clip_index) - videos, "errors": int(errors),
            "path": part}


def finalize_shard(partition: str, label: str, dim: int, dtype: str = "float32",
                   expected_keys: Sequence[str] = ()) -> dict[str, Any]:
    """Write a shard's outputs from its fragments (a Ray task; idempotent): its error table, then
    ``part-<shard>.parquet`` — each one complete object, the part last because it marks the shard done —
    then drop the fragments. Returns bookkeeping: ``shard``, ``videos``, ``clips``, ``errors``, ``path``.

    Every key in ``expected_keys`` must have a row (an embedding or an error): a shard is never marked
    done with rows missing."""
    part = part_uri(partition, label)
    error_part = storage.join(errors_dir(partition), f"{PART_PREFIX}{label}.parquet")
    if storage.exists(part):  # a retry of a task that got as far as the part: the shard is done
        errors = storage.read_parquet(error_part).num_rows if storage.exists(error_part) else 0
        clip_index = storage.read_parquet(part, columns=["clip_index"]).column(0)
        return _shard_summary(label, clip_index, errors, part)
    table = merge_fragments(partition, label, dim, dtype)
    missing = set(expected_keys) - set(table.column("key").to_pylist())
    if missing:
        raise RuntimeError(f"shard {label}: no rows for {len(missing)} keys (e.g. {sorted(missing)[:3]}); "
                           f"fragments under {staging_dir(partition, label)} are missing")
    failed = pc.not_equal(table.column("error"), "")
    bad = table.filter(failed)
    sources = ("key", "shard", "video_id", "error", "error_message")  # → ERROR_COLUMNS
    errors = pa.Table.from_arrays([bad.column(c) for c in sources], schema=ERROR_SCHEMA)
    data = table.filter(pc.invert(failed)).select(list(EMBEDDING_COLUMNS))
    storage.write_parquet(errors, error_part)  # errors first: the part marks the shard done
    storage.write_parquet(data, part)
    storage.remove(staging_dir(partition, label), recursive=True)
    return _shard_summary(label, data.column("clip_index"), errors.num_rows, part)


def clear_staging(partition: str | os.PathLike) -> None:
    """Drop fragments an interrupted run left behind (its unfinished shards are redone whole)."""
    storage.remove(staging_dir(partition), recursive=True)


def write_model_card(partition: str | os.PathLike, card: Mapping[str, Any]) -> None:
    """``_model.json``: which model (name, checkpoint, id) and sampling produced this partition."""
    storage.write_json(storage.join(partition, MODEL_CARD), dict(card))


# ---------------------------------------------------------------------------------------------- readers


def read_embeddings(partition: str | os.PathLike, video_level: bool | None = None) -> pa.Table:
    """All embedding rows of a model partition (optionally only video-level or only clip rows)."""
    parts = list_parts(partition)
    if not parts:
        raise FileNotFoundError(f"no embedding parts under {os.fspath(partition)!r}")
    table = pa.concat_tables([storage.read_parquet(p) for p in parts])
    if video_level is None:
        return table
    is_video = pc.equal(table.column("clip_index"), VIDEO_ROW)
    return table.filter(is_video if video_level else pc.invert(is_video))


def read_embed_errors(partition: str | os.PathLike, label_prefix: str = "") -> pa.Table:
    """The embed error rows (:data:`ERROR_SCHEMA`) of a partition, or of its shards whose label starts
    with ``label_prefix``; an empty table when there are none."""
    prefix = f"{PART_PREFIX}{label_prefix}"
    parts = [u for u in storage.list_files(errors_dir(partition), ".parquet")
             if storage.name(u).startswith(prefix)]
    tables = [storage.read_parquet(u).cast(ERROR_SCHEMA) for u in parts]
    return pa.concat_tables(tables) if tables else ERROR_SCHEMA.empty_table()


def remove_shard_outputs(partition: str | os.PathLike, label_prefix: str) -> None:
    """Delete every output of the shards whose label starts with ``label_prefix`` (parts, error and text
    tables, fragments), so the next run redoes them."""
    prefix = f"{PART_PREFIX}{label_prefix}"
    for folder in (partition, errors_dir(partition), text_dir(partition)):
        for uri in storage.list_files(folder, ".parquet"):
            if storage.name(uri).startswith(prefix):
                storage.remove(uri)
    for folder in storage.list_dirs(staging_dir(partition)):
        if storage.name(folder).startswith(label_prefix):
            storage.remove(folder, recursive=True)


def iter_partition_dirs(output: str | os.PathLike) -> Iterable[str]:
    """Model partitions (URIs) under an embeddings output folder."""
    return [u for u in storage.list_dirs(output) if storage.name(u).startswith("model_id=")]

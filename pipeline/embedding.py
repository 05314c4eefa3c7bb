"""Batch embedding of shards into Parquet: the encoder stage, the per-shard writer, and the incremental plan.

Data flow (wired, with every resource, in ``workflows/embed.py``): shards → skip keys that are already
embedded → :class:`DecodeShardClipsStage` (:class:`pipeline.datasets.DecodeClipsStage` plus the shard
column) → :class:`EncodeClipsStage` (an actor pool, GPUs when there are any) → :class:`ShardPartWriter` on
the driver, which writes one Parquet file per input shard once every sample of that shard has come back.
A shard's file is written atomically, so after a crash the next run sees each shard either complete or
absent, and redoes only the absent ones: no duplicate rows, no missing rows. Rows are keyed by a stable
``id`` (int64 hash of video id + clip index).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from models import create_model
from pipeline.datasets import DecodeClipsStage
from runtime.errors import DecodeFailure, ErrorPolicy, check_policy

VIDEO_ROW = -1  # clip_index of the video-level row

EMBEDDING_COLUMNS = ("id", "video_id", "key", "shard", "clip_index", "start_s", "end_s", "model_id",
                     "sha256", "captions", "embedding")
ERROR_COLUMNS = ("key", "shard", "video_id", "reason", "message")


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
    writes one per run) never share a label."""
    path = Path(tar_path)
    parent = path.parent.parent if path.parent.name == "shards" else path.parent
    label = f"{parent.name}-{path.stem}" if parent.name else path.stem
    return re.sub(r"[^A-Za-z0-9_-]", "_", label)


# ------------------------------------------------------------------------------------------------ plan


@dataclasses.dataclass
class ShardWork:
    """One input shard: where it is, which keys it holds, and which of them still need embedding."""

    path: str
    label: str
    keys: list[str]
    todo_keys: list[str]


def shard_keys(tar_path: str) -> list[str]:
    """Keys of a shard, from ingest's per-shard Parquet index when present, else from the tar itself."""
    index = Path(tar_path).with_suffix(".parquet")
    if index.exists():
        return [str(k) for k in pq.read_table(index, columns=["key"]).column("key").to_pylist()]
    keys: list[str] = []
    with tarfile.open(tar_path) as tar:
        for member in tar:
            stem, _, ext = member.name.partition(".")
            if ext == "mp4":
                keys.append(stem)
    return keys


def existing_video_ids(partition_dir: Path) -> set[tuple[str, str]]:
    """(video_id, sha256) pairs already embedded in a model partition (video-level rows)."""
    done: set[tuple[str, str]] = set()
    for part in sorted(partition_dir.glob("part-*.parquet")):
        table = pq.read_table(part, columns=["video_id", "sha256", "clip_index"])
        columns = (table.column(c).to_pylist() for c in ("video_id", "sha256", "clip_index"))
        for vid, sha, clip in zip(*columns):
            if clip == VIDEO_ROW:
                done.add((vid, sha))
    return done


def plan_shards(tar_paths: Sequence[str], partition_dir: Path) -> list[ShardWork]:
    """Which shards still need work: a shard with a finished part file is done; in a new shard, videos
    already embedded from another shard (same video id and content hash) are skipped."""
    labels = [shard_label(p) for p in tar_paths]
    if len(set(labels)) != len(labels):
        raise ValueError("two input shards map to the same label; give shard dirs with distinct names")
    done_ids = existing_video_ids(partition_dir) if partition_dir.exists() else set()
    work = []
    for path, label in zip(tar_paths, labels):
        if (partition_dir / f"part-{label}.parquet").exists():
            continue
        keys = shard_keys(path)
        todo = keys
        if done_ids:
            index = Path(path).with_suffix(".parquet")
            if index.exists():
                meta = pq.read_table(index, columns=["key", "video_id", "sha256"]).to_pylist()
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


class EncodeClipsStage:
    """Ray Data ``map_batches`` class: decoded clips → one row per clip plus one video-level row.

    Input: the columns of :class:`pipeline.datasets.DecodeClipsStage` plus ``shard``. Output: flat rows with
    the embedding schema (``embedding`` as ``[R, D]``). A row that arrives with a decode error, or without a
    single valid frame, is an input failure: under ``on_error="record"`` (the default) it comes out as one
    row with ``error`` set and an empty embedding, so the driver can record it and nothing is lost; under
    ``"raise"`` it raises :class:`runtime.errors.DecodeFailure` naming the key. Anything that goes wrong in
    the model itself is a bug and always raises.

    ``threads``: torch threads of this process (the workflow passes it; default every core of the node).
    Without ``pretrained`` the random init is seeded (seed 0), so the driver and every encoder actor hold
    the same weights and reruns keep the same model id.
    """

    def __init__(self, model_name: str, pretrained: str | None = None, device: str | None = None,
                 dtype: str = "float32", threads: int | None = None, on_error: ErrorPolicy = "record"):
        self.on_error = check_policy(on_error)
        # Ray pins actor threads to the CPUs they asked for; an encoder that owns the node's compute
        # should use every core (decode actors ask for fractions and mostly wait on I/O).
        torch.set_num_threads(int(threads or os.cpu_count() or 1))
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, transform, _ = create_model(model_name, pretrained=pretrained, seed=0)
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
                                                 "error", "error_message")}
        times = np.asarray(batch["times"], dtype=np.float64)
        j = 0
        for i, key in enumerate(batch["key"]):
            record = json.loads(batch["json"][i]) if batch["json"][i] else {}
            common = {"video_id": str(batch["video_id"][i]), "key": str(key), "shard": str(batch["shard"][i]),
                      "model_id": self.model_id, "sha256": str(record.get("sha256", "")),
                      "captions": str(batch["captions"][i])}
            if not ok[i]:
                reason = errors[i] or "no_valid_frames"
                message = str(batch["error_message"][i]) or "no frame of this video could be decoded"
                if self.on_error == "raise":
                    raise DecodeFailure(f"{key} (shard {common['shard']}): {reason}: {message}")
                self._append(rows, common, -2, 0.0, 0.0, np.zeros(dim, np.float32), reason, message)
                continue
            valid_clips = mask[i].any(axis=1)
            for c in np.flatnonzero(valid_clips):
                start, end = _clip_span(times[i, c], mask[i, c])
                self._append(rows, common, int(c), start, end, clip_emb[j, c], "", "")
            start, end = _clip_span(times[i].ravel(), mask[i].ravel())
            self._append(rows, common, VIDEO_ROW, start, end, video_emb[j], "", "")
            j += 1
        out = {k: np.array(v, dtype=object) for k, v in rows.items() if k != "embedding"}
        out["id"] = np.array(rows["id"], dtype=np.int64)
        out["clip_index"] = np.array(rows["clip_index"], dtype=np.int64)
        out["start_s"] = np.array(rows["start_s"], dtype=np.float64)
        out["end_s"] = np.array(rows["end_s"], dtype=np.float64)
        out["embedding"] = (np.stack(rows["embedding"]).astype(self.dtype) if rows["embedding"]
                            else np.zeros((0, dim), self.dtype))
        return out

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


# ---------------------------------------------------------------------------------------------- writer


def _atomic_write_table(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


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


class ShardPartWriter:
    """Collects encoded rows per shard on the driver and writes ``part-<shard>.parquet`` (and the shard's
    error rows) atomically as soon as every pending key of that shard has come back."""

    def __init__(
        self, partition_dir: Path, work: Sequence[ShardWork], dim: int | None, dtype: str = "float32"
    ):
        self.partition_dir = partition_dir
        self.errors_dir = partition_dir / "errors"
        self.errors_dir.mkdir(parents=True, exist_ok=True)
        self.pending = {w.label: set(w.todo_keys) for w in work}
        self.rows: dict[str, list[dict]] = {w.label: [] for w in work}
        self.errors: dict[str, list[dict]] = {w.label: [] for w in work}
        self.dim = dim
        self.dtype = dtype
        self.videos = self.clips = self.error_count = 0
        for w in work:
            if not w.todo_keys:
                self._flush(w.label)

    def add_batch(self, batch: Mapping[str, Any]) -> None:
        """Take one output batch of :class:`EncodeClipsStage`; flush shards that are now complete."""
        touched = set()
        emb = np.asarray(batch["embedding"])
        for r in range(len(batch["key"])):
            shard, key = str(batch["shard"][r]), str(batch["key"][r])
            touched.add(shard)
            if batch["error"][r]:
                self.errors[shard].append({"key": key, "shard": shard, "video_id": str(batch["video_id"][r]),
                                           "reason": str(batch["error"][r]),
                                           "message": str(batch["error_message"][r])})
                self.pending[shard].discard(key)
                self.error_count += 1
                continue
            clip_index = int(batch["clip_index"][r])
            if self.dim is None:
                self.dim = int(emb.shape[1])
            self.rows[shard].append({
                "id": int(batch["id"][r]), "video_id": str(batch["video_id"][r]), "key": key, "shard": shard,
                "clip_index": clip_index, "start_s": float(batch["start_s"][r]),
                "end_s": float(batch["end_s"][r]), "model_id": str(batch["model_id"][r]),
                "sha256": str(batch["sha256"][r]), "captions": list(json.loads(batch["captions"][r] or "[]")),
                "embedding": emb[r],
            })
            if clip_index == VIDEO_ROW:
                self.pending[shard].discard(key)
                self.videos += 1
            else:
                self.clips += 1
        for shard in touched:
            if not self.pending[shard]:
                self._flush(shard)

    def _flush(self, shard: str) -> None:
        rows = sorted(self.rows.pop(shard, []), key=lambda r: (r["video_id"], r["clip_index"]))
        errors = self.errors.pop(shard, [])
        self.pending.pop(shard, None)
        dim = self.dim or 0
        schema = embedding_schema(dim, self.dtype)
        columns = {name: [r[name] for r in rows] for name in schema.names if name != "embedding"}
        value_type = schema.field("embedding").type.value_type
        flat = (np.stack([r["embedding"] for r in rows]).reshape(-1) if rows else np.zeros(0, np.float32))
        values = pa.array(flat.astype(value_type.to_pandas_dtype()))
        emb_array = pa.FixedSizeListArray.from_arrays(values, dim)
        arrays = [pa.array(columns[n], type=schema.field(n).type) for n in schema.names if n != "embedding"]
        table = pa.Table.from_arrays([*arrays, emb_array], schema=schema)
        # Errors first: a part file marks the shard done, so its errors must already be on disk.
        _atomic_write_table(pa.Table.from_pylist(errors, schema=ERROR_SCHEMA),
                            self.errors_dir / f"part-{shard}.parquet")
        _atomic_write_table(table, self.partition_dir / f"part-{shard}.parquet")

    @property
    def unfinished(self) -> list[str]:
        """Shards still waiting for rows (non-empty only if the pipeline lost rows — a bug)."""
        return sorted(s for s, keys in self.pending.items() if keys)


def consolidate_errors(partition_dir: Path) -> int:
    """Merge per-shard error parts into ``errors.parquet`` beside the parts; returns the error count."""
    parts = sorted((partition_dir / "errors").glob("part-*.parquet"))
    tables = [pq.read_table(p) for p in parts] or [ERROR_SCHEMA.empty_table()]
    table = pa.concat_tables([t.cast(ERROR_SCHEMA) for t in tables])
    _atomic_write_table(table, partition_dir / "errors.parquet")
    return table.num_rows


def write_model_card(partition_dir: Path, card: Mapping[str, Any]) -> None:
    """``_model.json``: which model (name, checkpoint, id) and sampling produced this partition."""
    path = partition_dir / "_model.json"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(dict(card), indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_embeddings(partition_dir: str | os.PathLike, video_level: bool | None = None) -> pa.Table:
    """All embedding rows of a model partition (optionally only video-level or only clip rows)."""
    parts = sorted(Path(partition_dir).glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"no embedding parts under {os.fspath(partition_dir)!r}")
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    if video_level is None:
        return table
    is_video = pc.equal(table.column("clip_index"), VIDEO_ROW)
    return table.filter(is_video if video_level else pc.invert(is_video))


def iter_partition_dirs(output: str | os.PathLike) -> Iterable[Path]:
    """Model partitions under an embeddings output folder."""
    return sorted(p for p in Path(output).glob("model_id=*") if p.is_dir())

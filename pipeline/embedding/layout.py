"""Where an embeddings output keeps what (see the package docstring for the tree): row kinds, column
names, partition and sidecar folders, part names, the model card, the embeddings schema, stable row ids."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa

from runtime import storage

VIDEO_ROW = -1  # clip_index of the video-level row
ERROR_ROW = -2  # clip_index of the one row an input failure leaves (never in a part file)
# clip_index of sliding-window rows = WINDOW_CLIP_BASE + window number (docs/moments.md); index/moments.py
# reads the same constant (pipeline/ and index/ do not import each other; tests/test_moments.py checks it).
WINDOW_CLIP_BASE = 1_000_000

# shard_uri: lineage, the absolute path / URI of the shard tar a row was embedded from (index.json records
# them; the service finds previews and metadata through them). Parts written before it lack the column.
EMBEDDING_COLUMNS = ("id", "video_id", "key", "shard", "shard_uri", "clip_index", "start_s", "end_s",
                     "model_id", "sha256", "captions", "embedding")
LINEAGE_COLUMNS = ("shard_uri",)  # added by finalize_shard: the workers' fragments do not carry them
ERROR_COLUMNS = ("key", "shard", "video_id", "reason", "message")

PART_PREFIX = "part-"  # the only data files of a partition: part-<shard>.parquet
MODEL_CARD = "_model.json"
ERRORS_ROOT = "_errors"  # OUT/_errors/model_id=<id>/part-<shard>.parquet
TEXT_ROOT = "_text"  # OUT/_text/model_id=<id>/part-<shard>.parquet
STAGING_ROOT = "_staging"  # OUT/_staging/model_id=<id>/<shard>/frag-<digest>.parquet
ERROR_SCHEMA = pa.schema([(c, pa.string()) for c in ERROR_COLUMNS])


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


def write_model_card(partition: str | os.PathLike, card: Mapping[str, Any]) -> None:
    """``_model.json``: which model (name, checkpoint, id) and sampling produced this partition."""
    storage.write_json(storage.join(partition, MODEL_CARD), dict(card))


def iter_partition_dirs(output: str | os.PathLike) -> Iterable[str]:
    """Model partitions (URIs) under an embeddings output folder."""
    return [u for u in storage.list_dirs(output) if storage.name(u).startswith("model_id=")]


def embedding_schema(dim: int, dtype: str = "float32") -> pa.Schema:
    """The embeddings Parquet schema (docs/interfaces.md) for ``dim``-dimensional vectors."""
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema([
        ("id", pa.int64()), ("video_id", pa.string()), ("key", pa.string()), ("shard", pa.string()),
        ("shard_uri", pa.string()), ("clip_index", pa.int64()), ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("model_id", pa.string()), ("sha256", pa.string()), ("captions", pa.list_(pa.string())),
        ("embedding", pa.list_(value, dim)),
    ])

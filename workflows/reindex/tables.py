"""Table operations of a run: the embedding rows of (video, content) pairs gathered from the model
partition (any store), written as a local embeddings dir for the index, embed error records, and index
version copies between the published index (any store) and a run's local scratch index."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from index import store
from pipeline.embedding import read_embed_errors
from runtime import storage

MODEL_CARD = "_model.json"


def _pair_keys(table: pa.Table) -> pa.Array:
    return pc.binary_join_element_wise(table.column("video_id"), table.column("sha256"), "\x00")


def part_files(partition: str) -> list[str]:
    """The embedding part files of ``partition``, oldest run first: reindex names them
    ``part-run-<seq>-<shard>.parquet`` (zero-padded), so name order is run order."""
    return [f for f in storage.list_files(partition, ".parquet") if storage.name(f).startswith("part-")]


def collect_rows(partition: str | os.PathLike, pairs: Iterable[tuple[str, str]]) -> pa.Table | None:
    """Every embedding row (video + clip rows) of the given (video_id, sha256) pairs, from all part files
    of ``partition``, one row per id (the newest part wins). None when no part holds any of them."""
    wanted = pa.array(sorted(f"{v}\x00{s}" for v, s in pairs), pa.string())
    if len(wanted) == 0:
        return None
    tables = []
    for part in part_files(os.fspath(partition)):
        meta = storage.read_parquet(part, columns=["video_id", "sha256"])
        mask = pc.is_in(_pair_keys(meta), value_set=wanted)
        if pc.any(mask).as_py():
            tables.append(storage.read_parquet(part).filter(mask))
    if not tables:
        return None
    table = pa.concat_tables(tables, promote_options="default")
    ids = table.column("id").to_numpy()
    _, last = np.unique(ids[::-1], return_index=True)  # newest occurrence of each id
    keep = np.sort(len(ids) - 1 - last)
    return table.take(pa.array(keep))


def live_captions(text_folder: str, live_videos: set[str]) -> pa.Table | None:
    """The caption text embeddings (``jobs.embed --with-text`` parts of every run) of the live videos, one
    row per distinct (video, caption): what a hand build of the live corpus tunes on. None when none."""
    wanted = pa.array(sorted(live_videos), pa.string())
    tables = []
    for part in storage.list_files(text_folder, ".parquet"):
        table = storage.read_parquet(part, columns=["video_id", "caption", "embedding"])
        tables.append(table.filter(pc.is_in(table.column("video_id"), value_set=wanted)))
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return None
    table = pa.concat_tables(tables)
    keys = pc.binary_join_element_wise(table.column("video_id"), table.column("caption"), "\x00")
    _, last = np.unique(keys.to_numpy(zero_copy_only=False)[::-1], return_index=True)  # the newest run's
    return table.take(pa.array(np.sort(len(keys) - 1 - last)))


def write_embeddings_dir(table: pa.Table, partition: str | os.PathLike, out_dir: Path, name: str) -> Path:
    """Write ``table`` as ``out_dir/part-<name>.parquet`` beside a copy of the partition's ``_model.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    card = storage.join(os.fspath(partition), MODEL_CARD)
    if storage.exists(card):
        storage.write_bytes(str(out_dir / MODEL_CARD), storage.read_bytes(card))
    storage.write_parquet(table, str(out_dir / f"part-{name}.parquet"))
    return out_dir


def embed_errors(partition: str | os.PathLike, label_prefix: str) -> dict[str, dict[str, str]]:
    """Embed error records (by video id) of the shards whose label starts with ``label_prefix``."""
    rows = read_embed_errors(partition, label_prefix).to_pylist()
    return {row["video_id"]: {"reason": row["reason"], "message": row["message"]} for row in rows}


def copy_current(live_root: str, scratch_root: Path) -> str:
    """Copy the CURRENT version of ``live_root`` (any store) into a fresh local ``scratch_root``."""
    version = store.read_current(live_root)
    vdir = store.version_dir(live_root, version)
    meta = store.read_meta(vdir)
    storage.remove(str(scratch_root), recursive=True)
    stage = store.staging_dir(str(scratch_root), version)
    for name in store.version_files(vdir, meta):
        storage.upload(store.local_file(vdir, meta, name), str(stage / name))
    store.write_json(str(stage / store.META_FILE), store.without_file_references(meta))  # all copied here
    storage.write_text(str(scratch_root / store.CURRENT_FILE), version + "\n")
    return version


def stamped_meta(scratch_root: Path, extra: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The CURRENT scratch version and its index.json with the run that made it under ``reindex``."""
    vdir = store.version_dir(str(scratch_root))
    meta = store.read_meta(vdir)
    meta["reindex"] = extra
    return vdir, meta

"""Table operations of a run: the embedding rows of (video, content) pairs gathered from the model
partition, written as an embeddings dir for the index, embed error records, and index version copies."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from index import store


def _pair_keys(table: pa.Table) -> pa.Array:
    return pc.binary_join_element_wise(table.column("video_id"), table.column("sha256"), "\x00")


def collect_rows(partition: Path, pairs: Iterable[tuple[str, str]]) -> pa.Table | None:
    """Every embedding row (video + clip rows) of the given (video_id, sha256) pairs, from all part files
    of ``partition``, one row per id (the newest part wins). None when no part holds any of them."""
    wanted = pa.array(sorted(f"{v}\x00{s}" for v, s in pairs), pa.string())
    if len(wanted) == 0:
        return None
    tables = []
    for part in sorted(partition.glob("part-*.parquet"), key=lambda p: p.stat().st_mtime_ns):
        meta = pq.read_table(part, columns=["video_id", "sha256"])
        mask = pc.is_in(_pair_keys(meta), value_set=wanted)
        if pc.any(mask).as_py():
            tables.append(pq.read_table(part).filter(mask))
    if not tables:
        return None
    table = pa.concat_tables(tables, promote_options="default")
    ids = table.column("id").to_numpy()
    _, last = np.unique(ids[::-1], return_index=True)  # newest occurrence of each id
    keep = np.sort(len(ids) - 1 - last)
    return table.take(pa.array(keep))


def write_embeddings_dir(table: pa.Table, partition: Path, out_dir: Path, name: str) -> Path:
    """Write ``table`` as ``out_dir/part-<name>.parquet`` beside a copy of the partition's ``_model.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if (partition / "_model.json").exists():
        shutil.copyfile(partition / "_model.json", out_dir / "_model.json")
    target = out_dir / f"part-{name}.parquet"
    tmp = target.with_name(f".{target.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, target)
    return out_dir


def embed_errors(partition: Path, label_prefix: str) -> dict[str, dict[str, str]]:
    """Embed error records (by video id) of the part files whose shard label starts with ``label_prefix``."""
    out: dict[str, dict[str, str]] = {}
    for part in sorted((partition / "errors").glob(f"part-{label_prefix}*.parquet")):
        for row in pq.read_table(part).to_pylist():
            out[row["video_id"]] = {"reason": row["reason"], "message": row["message"]}
    return out


def copy_current(live_root: Path, scratch_root: Path) -> str:
    """Copy the CURRENT version of ``live_root`` into a fresh ``scratch_root`` (as its CURRENT)."""
    version = store.read_current(live_root)
    shutil.rmtree(scratch_root, ignore_errors=True)
    (scratch_root / store.VERSIONS_DIR).mkdir(parents=True)
    shutil.copytree(live_root / store.VERSIONS_DIR / version, scratch_root / store.VERSIONS_DIR / version)
    (scratch_root / store.CURRENT_FILE).write_text(version + "\n")
    return version


def stamp_meta(version_dir: Path, extra: dict[str, Any]) -> None:
    """Record the run that made a version under ``reindex`` in its index.json."""
    meta = json.loads((version_dir / store.META_FILE).read_text())
    meta["reindex"] = extra
    store.write_json_atomic(version_dir / store.META_FILE, meta)

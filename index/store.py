"""Versioned on-disk layout: ``NAME/versions/VERSION/{index.faiss, ids.parquet, index.json, probe.npz}``
plus ``NAME/CURRENT`` naming the live version.

Publishing is atomic: a version is written under ``versions/.tmp-*``, renamed into place, and only then
``CURRENT`` is swapped (``CURRENT.tmp`` + ``os.replace``), so readers never see a half-written version.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
META_FILE = "index.json"
PROBE_FILE = "probe.npz"
ERRORS_FILE = "errors.parquet"
CURRENT_FILE = "CURRENT"
VERSIONS_DIR = "versions"
FORMAT = "vidsift-index-v1"
MMAP_THRESHOLD_BYTES = 256 * 1024**2
_VERSION_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class IndexNotFoundError(FileNotFoundError):
    """The index directory, its CURRENT pointer or the version it names does not exist."""


class CorruptIndexError(ValueError):
    """A version exists but one of its files cannot be read or is inconsistent."""


def shard_file(i: int, num_shards: int) -> str:
    return INDEX_FILE if num_shards == 1 else f"shard-{i:05d}.faiss"


def new_version_name(root: str | os.PathLike) -> str:
    """Next version name: a sequence number (so names sort by age) + UTC timestamp + random suffix."""
    seqs = [int(v.split("-", 1)[0]) for v in list_versions(root) if v.split("-", 1)[0].isdigit()]
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return f"{max(seqs, default=0) + 1:06d}-{stamp}-{uuid.uuid4().hex[:4]}"


def staging_dir(root: str | os.PathLike) -> Path:
    """A fresh hidden directory under ``root/versions`` to write a version into before publishing."""
    path = Path(root) / VERSIONS_DIR / f".tmp-{uuid.uuid4().hex}"
    path.mkdir(parents=True)
    return path


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_json_default))
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_version_files(
    stage: Path,
    indexes: list[faiss.Index | None],
    ids_table: pa.Table,
    meta: dict[str, Any],
    probe: dict[str, np.ndarray] | None = None,
    errors: pa.Table | None = None,
) -> None:
    """Write a complete version into the staging dir ``stage`` (not yet visible to readers)."""
    for i, index in enumerate(indexes):
        if index is None:  # already written into the staging dir by a (Ray) shard builder
            continue
        faiss.write_index(index, str(stage / shard_file(i, len(indexes))))
    pq.write_table(ids_table, stage / IDS_FILE)
    if probe is not None:
        with open(stage / PROBE_FILE, "wb") as fh:
            np.savez(fh, **probe)
    if errors is not None and errors.num_rows:
        pq.write_table(errors, stage / ERRORS_FILE)
    write_json_atomic(stage / META_FILE, {"format": FORMAT, **meta})


def publish(root: str | os.PathLike, stage: Path, version: str | None = None, keep: int = 3) -> str:
    """Rename ``stage`` to ``versions/VERSION``, swap CURRENT to it, prune to ``keep`` versions."""
    root = Path(root)
    version = version or new_version_name(root)
    if not _VERSION_RE.match(version) or version.startswith("."):
        raise ValueError(f"version name {version!r} must match [A-Za-z0-9_.-]+ and not start with '.'")
    final = root / VERSIONS_DIR / version
    if final.exists():
        raise FileExistsError(f"index version {str(final)!r} already exists")
    os.replace(stage, final)
    tmp = root / (CURRENT_FILE + f".tmp{os.getpid()}")
    tmp.write_text(version + "\n")
    os.replace(tmp, root / CURRENT_FILE)
    prune(root, keep=keep)
    return version


def list_versions(root: str | os.PathLike) -> list[str]:
    """Published versions, oldest first (names sort by creation time)."""
    vdir = Path(root) / VERSIONS_DIR
    if not vdir.is_dir():
        return []
    names = [p.name for p in vdir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(names, key=lambda n: (int(n.split("-", 1)[0]) if n.split("-", 1)[0].isdigit() else -1, n))


def prune(root: str | os.PathLike, keep: int = 3) -> list[str]:
    """Delete the oldest versions beyond ``keep`` (never CURRENT) and stale staging dirs over an hour old."""
    root = Path(root)
    keep = max(1, int(keep))
    current = read_current(root, missing_ok=True)
    removed = []
    versions = list_versions(root)
    for name in versions[: max(0, len(versions) - keep)]:
        if name != current:
            shutil.rmtree(root / VERSIONS_DIR / name, ignore_errors=True)
            removed.append(name)
    for stale in (root / VERSIONS_DIR).glob(".tmp-*"):
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    return removed


def read_current(root: str | os.PathLike, missing_ok: bool = False) -> str | None:
    """The version name in ``root/CURRENT``."""
    path = Path(root) / CURRENT_FILE
    if not path.is_file():
        if missing_ok:
            return None
        if not Path(root).exists():
            raise IndexNotFoundError(f"index directory {str(root)!r} does not exist")
        raise IndexNotFoundError(f"{str(root)!r} is not a vidsift index: no {CURRENT_FILE} file")
    version = path.read_text().strip()
    if not _VERSION_RE.match(version) or version.startswith("."):
        raise CorruptIndexError(f"{str(path)!r} holds an invalid version name {version!r}")
    return version


def version_dir(root: str | os.PathLike, version: str | None = None) -> Path:
    """Directory of ``version`` (CURRENT when None); a clear error when it is missing."""
    version = version or read_current(root)
    path = Path(root) / VERSIONS_DIR / version
    if not path.is_dir():
        raise IndexNotFoundError(f"index version {version!r} named by {str(root)!r} does not exist at {path}")
    return path


def describe(root: str | os.PathLike) -> dict[str, Any]:
    """The CURRENT version's name, the list of retained versions and its index.json (``jobs.index info``)."""
    vdir = version_dir(root)
    return {"version": vdir.name, "versions": list_versions(root), **read_meta(vdir)}


def read_meta(vdir: Path) -> dict[str, Any]:
    path = vdir / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CorruptIndexError(f"index version {str(vdir)!r} has no {META_FILE}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptIndexError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorruptIndexError(f"{str(path)!r} is not a {FORMAT} index description")
    for field in ("dim", "count", "shards"):
        if field not in meta:
            raise CorruptIndexError(f"{str(path)!r} lacks the field {field!r}")
    return meta


def read_faiss(path: Path, mmap: bool | None = None) -> faiss.Index:
    """Read one FAISS file; memory-mapped when ``mmap`` or (None) when larger than the threshold."""
    if not path.is_file():
        raise CorruptIndexError(f"index file {str(path)!r} is missing")
    use_mmap = path.stat().st_size >= MMAP_THRESHOLD_BYTES if mmap is None else bool(mmap)
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if use_mmap else 0
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        raise CorruptIndexError(f"index file {str(path)!r} could not be read: {exc}") from exc


def read_ids(vdir: Path) -> pa.Table:
    path = vdir / IDS_FILE
    try:
        return pq.read_table(path)
    except FileNotFoundError as exc:
        raise CorruptIndexError(f"index version {str(vdir)!r} has no {IDS_FILE}") from exc
    except (pa.ArrowInvalid, OSError) as exc:
        raise CorruptIndexError(f"{str(path)!r} could not be read: {exc}") from exc


def read_probe(vdir: Path) -> dict[str, np.ndarray] | None:
    path = vdir / PROBE_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def load_version(root: str | os.PathLike, version: str | None = None, mmap: bool | None = None):
    """``(version_dir, meta, [faiss indexes], ids table)`` of a published version, validated."""
    vdir = version_dir(root, version)
    meta = read_meta(vdir)
    shards = meta["shards"]
    indexes = [read_faiss(vdir / s["file"], mmap=mmap) for s in shards]
    ids = read_ids(vdir)
    total = sum(int(ix.ntotal) for ix in indexes)
    if total != int(meta["count"]) or ids.num_rows != total:
        raise CorruptIndexError(
            f"index version {str(vdir)!r} is inconsistent: index.json count "
            f"{meta['count']}, faiss holds {total}, ids.parquet has {ids.num_rows} rows"
        )
    for ix in indexes:
        if ix.d != int(meta["dim"]):
            raise CorruptIndexError(
                f"index version {str(vdir)!r}: faiss dim {ix.d} != index.json dim {meta['dim']}"
            )
    return vdir, meta, indexes, ids

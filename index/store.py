"""Versioned index layout on any store (a local folder, ``s3://``, ``gs://``: :mod:`runtime.storage`):
``NAME/versions/VERSION/{index.faiss | shard-NNNNN.faiss, ids.arrow (older versions: ids.parquet), probe.npz,
errors.parquet, tombstones.parquet, index.json}`` plus ``NAME/CURRENT`` naming the live version.

A version may use files of an older version of the same index (a delete publishes only its tombstones and
refers to the unchanged FAISS / ids files): index.json records such a file with ``"version": OLDER``, and
:func:`prune` keeps every version whose files a retained version uses (:func:`referenced_versions`).

Publishing (docs/index.md, "Storage"): a version's files are written (FAISS writes local files) into a
staging folder, then each is put under ``versions/VERSION/`` as one complete object; ``index.json``, which
records every file's sha256 and size, is written after them, and the single ``CURRENT`` object LAST. A
version is complete when its ``index.json`` exists; readers only follow ``CURRENT``, so they never see a
partial version. For a local index the staging folder *is* the version folder (nothing is copied).

Readers (:func:`load_version`) read ``CURRENT`` and ``index.json``, then take local copies of the files
(:func:`runtime.storage.cached_copy`, verified against the recorded sha256 for remote stores), so FAISS
reads or memory-maps local files.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from index import ondisk
from index.rows import (
    HELPER_COLUMNS,
    ROWS_FILE,
    SUPERSEDED_FILE,
    TOMBSTONES_FILE,
    ColumnParts,
    RowParts,
    RowTable,
    hidden_in_shard,
    read_rows_table,
    read_tombstones,
    superseded_mask,
    write_rows,
)
from index.rows import read_superseded as read_superseded_file
from runtime import storage

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
META_FILE = "index.json"
PROBE_FILE = "probe.npz"
ERRORS_FILE = "errors.parquet"
CURRENT_FILE = "CURRENT"
VERSIONS_DIR = "versions"
FORMAT = "vidsift-index-v1"
T = TypeVar("T")
_VERSION_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class IndexNotFoundError(FileNotFoundError):
    """The index directory, its CURRENT pointer or the version it names does not exist."""


class PublishConflict(RuntimeError):
    """``CURRENT`` no longer names the version a writer read before building on it: another writer published
    in between. Nothing of the loser's was published; it may re-read ``CURRENT`` and retry."""


ConditionalWriteUnsupported = storage.ConditionalWriteUnsupported  # what publish raises on such a store


# A publish refused for a reason the caller can act on (retry; use a store with conditional writes).
PUBLISH_REFUSALS = (PublishConflict, ConditionalWriteUnsupported)


class CorruptIndexError(ValueError):
    """A version exists but one of its files cannot be read, fails its checksum or is inconsistent."""


def shard_file(i: int, num_shards: int) -> str:
    return INDEX_FILE if num_shards == 1 else f"shard-{i:05d}.faiss"


def _seq(name: str) -> int:
    head = name.split("-", 1)[0]
    return int(head) if head.isdigit() else -1


def new_version_name(root: str | os.PathLike) -> str:
    """Next version name: a sequence number (so names sort by age) + UTC timestamp + random suffix."""
    seqs = [_seq(v) for v in list_versions(root)]
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return f"{max(seqs, default=0) + 1:06d}-{stamp}-{uuid.uuid4().hex[:4]}"


def check_version_name(version: str) -> str:
    if not _VERSION_RE.match(version) or version.startswith("."):
        raise ValueError(f"version name {version!r} must match [A-Za-z0-9_.-]+ and not start with '.'")
    return version


def version_uri(root: str | os.PathLike, version: str) -> str:
    return storage.join(storage.normalize(root), VERSIONS_DIR, version)


def staging_dir(root: str | os.PathLike, version: str) -> Path:
    """The local folder a new ``version`` is written into before :func:`publish`.

    A local index stages in the version folder itself (big FAISS files are never copied; the folder stays
    invisible until its index.json and CURRENT are written); an object store stages in a local temp folder.
    """
    target = version_uri(root, check_version_name(version))
    if storage.is_local(target):
        path = storage.local_path(target)
        if (path / META_FILE).exists():
            raise FileExistsError(f"index version {str(path)!r} already exists")
        path.mkdir(parents=True, exist_ok=True)
        return path
    return Path(tempfile.mkdtemp(prefix=f"vidsift-index-{version}-"))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _clean(payload: Any) -> Any:
    """``payload`` with numpy scalars / paths turned into JSON types (storage.write_json sorts keys)."""
    if isinstance(payload, dict):
        return {k: _clean(v) for k, v in payload.items()}
    if isinstance(payload, (list, tuple)):
        return [_clean(v) for v in payload]
    if isinstance(payload, (np.generic, Path)):
        return _json_default(payload)
    return payload


def write_json(uri: str | os.PathLike, payload: dict[str, Any]) -> None:
    storage.write_json(uri, _clean(payload))


write_json_atomic = write_json  # the pre-URI name


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """``{"sha256", "size"}`` of a finished local file (recorded in index.json)."""
    return {"sha256": storage.sha256_file(path), "size": os.path.getsize(path)}


def write_version_files(
    stage: Path,
    indexes: list[faiss.Index | None],
    ids_table: pa.Table | ColumnParts,
    meta: dict[str, Any],
    probe: dict[str, np.ndarray] | None = None,
    errors: pa.Table | None = None,
) -> None:
    """Write the data files of a version into the local staging folder ``stage`` (not index.json: the
    metadata is written by :func:`publish`, after the files it describes)."""
    for i, index in enumerate(indexes):
        if index is None:  # already uploaded by a (Ray) shard builder
            continue
        faiss.write_index(index, str(stage / shard_file(i, len(indexes))))
    write_rows(ids_table, stage / ROWS_FILE)
    if probe is not None:
        with open(stage / PROBE_FILE, "wb") as fh:
            np.savez(fh, **probe)
    if errors is not None and errors.num_rows:
        pq.write_table(errors, stage / ERRORS_FILE)
    meta["format"] = FORMAT


def upload_file(local: str | os.PathLike, root: str | os.PathLike, version: str, name: str) -> dict:
    """Put one finished local file into ``versions/VERSION/NAME`` (a complete object); returns its record.

    Nothing is copied when ``local`` already is that file (a local index stages in place)."""
    record = file_record(local)
    if not _is_version_dir(Path(local).parent, storage.normalize(root), version):
        storage.upload(local, storage.join(version_uri(root, version), name))
    return record


_UNSET: Any = object()
STAGING_RETENTION_S = 24 * 3600.0  # an unfinished version untouched this long is a dead writer's leftover


def publish(
    root: str | os.PathLike,
    stage: Path,
    meta: dict[str, Any],
    version: str,
    keep: int = 3,
    uploaded: dict[str, dict[str, Any]] | None = None,
    expected_current: str | None = _UNSET,
    before_swap: Callable[[], None] | None = None,
) -> str:
    """Publish the staged ``version``: every file of ``stage`` → ``versions/VERSION/``, then index.json
    (``meta`` + each file's sha256/size, with ``uploaded`` = files already put there by shard tasks), then
    ``CURRENT``; finally prune to ``keep`` versions. Returns the version name.

    ``expected_current`` (required; recorded as ``meta["parent_version"]``) is the version the writer read
    before it started (None: the index had none). ``CURRENT`` is swapped with one conditional write
    (:func:`runtime.storage.compare_and_swap`: a flock on a local folder, ``If-Match`` on S3), so of writers
    that read the same CURRENT exactly one wins; the others get :class:`PublishConflict` and their version
    is removed. ``before_swap`` runs just before the swap (the reindex re-checks its lock there). Every
    writer publishes through here and never writes ``CURRENT`` itself (docs/architecture.md, "Seams")."""
    if expected_current is _UNSET:
        raise TypeError("publish() needs expected_current: the version read before the writer started "
                        "(store.read_current(root, missing_ok=True))")
    root = storage.normalize(root)
    check_version_name(version)
    if not storage.supports_conditional_writes(root):
        raise ConditionalWriteUnsupported(
            f"index {root!r}: cannot publish: the {storage.scheme(root)!r} store has no conditional "
            "writes in vidsift, so two writers could both replace CURRENT (docs/storage.md); use a local "
            "folder or S3")
    _current_bytes(root, expected_current, version)  # fail before uploading anything when it already moved
    files = dict(uploaded or {})
    for path in sorted(Path(stage).iterdir()):
        if path.is_file() and path.name not in files and path.name != META_FILE and path.name[0] != ".":
            files[path.name] = upload_file(path, root, version, path.name)
    meta["parent_version"] = expected_current  # the version this one replaces: the history stays linear
    meta = {k: v for k, v in meta.items() if k != "version"}
    meta_uri = storage.join(version_uri(root, version), META_FILE)
    write_json(meta_uri, {**meta, "format": FORMAT, "files": files})
    _check_complete(root, version, files)
    if before_swap is not None:
        before_swap()
    _swap_current(root, expected_current, version)
    if not _is_version_dir(stage, root, version):
        shutil.rmtree(stage, ignore_errors=True)
    prune(root, keep=keep)
    return version


def retry_on_conflict(retries: int, operation: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``operation(*args, **kwargs)`` (a build / add / delete: each call reads CURRENT and applies its change
    to it); on :class:`PublishConflict` call it again, at most ``retries`` more times, then let it raise."""
    for attempt in range(max(0, int(retries)) + 1):
        try:
            return operation(*args, **kwargs)
        except PublishConflict as exc:
            if attempt >= retries:
                raise
            print(f"[index] {exc}; retrying ({attempt + 1}/{retries})", file=sys.stderr, flush=True)
    raise AssertionError("unreachable")


def _current_bytes(root: str, expected: str | None, version: str) -> bytes | None:
    """The raw CURRENT object when it names ``expected``; else :class:`PublishConflict`."""
    try:
        raw = storage.read_bytes(storage.join(root, CURRENT_FILE))
    except FileNotFoundError:
        raw = None
    found = raw.decode("utf-8", "replace").strip() if raw is not None else None
    if found != expected:
        raise PublishConflict(
            f"index {root!r}: CURRENT moved from {expected!r} to {found!r} (another writer published) while "
            f"version {version!r} was built on {expected!r}; nothing was published: retry (re-read CURRENT "
            "and re-apply the change)")
    return raw


def _swap_current(root: str, expected: str | None, version: str) -> None:
    """CURRENT: ``expected`` → ``version``, atomically; a loser's (complete) version is removed."""
    pointer = storage.join(root, CURRENT_FILE)
    try:
        old = _current_bytes(root, expected, version)
        if storage.compare_and_swap(pointer, old, f"{version}\n".encode()):
            return
        if read_current(root, missing_ok=True) == version:  # the PUT landed, its reply was lost and retried
            return
        _current_bytes(root, expected, version)  # raises the conflict, naming the new CURRENT
        raise PublishConflict(f"index {root!r}: CURRENT changed during the swap to {version!r}; nothing was "
                              "published: retry")
    except PublishConflict:
        storage.remove(version_uri(root, version), recursive=True)
        raise


def _check_complete(root: str, version: str, files: dict[str, Any]) -> None:
    """Every file index.json records exists: under ``versions/VERSION/``, or under the older version a
    shared file's record names (else no CURRENT may name it)."""
    own = {storage.name(u) for u in storage.list_files(version_uri(root, version))}
    shared = {name: rec for name, rec in files.items() if isinstance(rec, dict) and rec.get("version")}
    missing = sorted(name for name in set(files) - own if name not in shared)
    missing += sorted(name for name, rec in shared.items()
                      if not storage.exists(storage.join(file_dir(version_uri(root, version), rec), name)))
    if missing:
        raise CorruptIndexError(f"index version {version!r} of {root!r} lost {missing} before it was "
                                "published (removed as a dead writer's leftover?); not publishing")


def publish_copy(
    src_vdir: str,
    meta: dict[str, Any],
    root: str | os.PathLike,
    keep: int = 3,
    expected_current: str | None = _UNSET,
    before_swap: Callable[[], None] | None = None,
) -> str:
    """Publish the files of an existing version ``src_vdir`` (any store) with ``meta`` as a new version of
    ``root`` (the reindex publishes its validated scratch version this way); see :func:`publish`."""
    root = storage.normalize(root)
    with staged_version(root) as (version, stage):
        uploaded = {
            name: upload_file(local_file(src_vdir, meta, name), root, version, name)
            for name in version_files(src_vdir, meta)
        }
        return publish(root, stage, meta, version, keep=keep, uploaded=uploaded,
                       expected_current=expected_current, before_swap=before_swap)


def version_files(vdir: str, meta: dict[str, Any]) -> list[str]:
    """The data files of a version: those index.json records (older local versions: those listed)."""
    if meta.get("files") is not None:
        return sorted(meta["files"])
    names = [storage.name(u) for u in storage.list_files(vdir)]
    return sorted(n for n in names if n != META_FILE and not n.startswith("."))


def _is_version_dir(stage: Path, root: str, version: str) -> bool:
    target = version_uri(root, version)
    return storage.is_local(target) and Path(stage).resolve() == storage.local_path(target).resolve()


def discard_stage(root: str | os.PathLike, stage: Path, version: str) -> None:
    """Remove a failed publish's staging folder and whatever it already put under ``versions/VERSION``."""
    shutil.rmtree(stage, ignore_errors=True)
    if not storage.exists(storage.join(version_uri(root, version), META_FILE)):
        storage.remove(version_uri(root, version), recursive=True)


@contextlib.contextmanager
def staged_version(root: str | os.PathLike, version: str | None = None) -> Iterator[tuple[str, Path]]:
    """``(version, stage)`` of a writer's new version: a fresh name (or ``version``, checked) and its staging
    folder. Whatever raises inside, :func:`publish` included (a lost ``CURRENT`` race), removes the staging
    folder and anything already put under ``versions/VERSION`` (:func:`discard_stage`): every writer (build,
    add, delete, upsert, compaction, the reindex's copy) stages and cleans up through here."""
    version = check_version_name(version or new_version_name(root))
    stage = staging_dir(root, version)
    try:
        yield version, stage
    except BaseException:
        discard_stage(root, stage, version)
        raise


def list_versions(root: str | os.PathLike, complete: bool = True) -> list[str]:
    """Published versions (those with an index.json; all folders with ``complete=False``), oldest first."""
    base = storage.join(storage.normalize(root), VERSIONS_DIR)
    names = [storage.name(d) for d in storage.list_dirs(base)]
    names = [n for n in names if not n.startswith(".")]
    if complete:
        names = [n for n in names if storage.exists(storage.join(base, n, META_FILE))]
    return sorted(names, key=lambda n: (_seq(n), n))


def prune(
    root: str | os.PathLike, keep: int = 3, min_age_s: float = 0.0, staging_age_s: float = STAGING_RETENTION_S
) -> list[str]:
    """Delete versions no reader or writer can still need; returns their names.

    * complete versions: the oldest beyond the newest ``keep``, ordered before CURRENT (never CURRENT, never
      one published after it: that is another writer's publish in flight) and whose index.json is older
      than ``min_age_s``;
    * unfinished versions (no index.json): only when nothing in them changed for ``staging_age_s``, whatever
      their number, since another writer may be staging there right now."""
    root = storage.normalize(root)
    keep = max(1, int(keep))
    current = read_current(root, missing_ok=True)
    if current is None:
        return []
    now = time.time()
    versions = list_versions(root)
    order = {name: i for i, name in enumerate(versions)}
    # A retained version may share files of an older one (a tombstone delete): those stay too.
    used = referenced_versions(root, versions[max(0, len(versions) - keep):] + [current])
    removed = []
    for name in versions[: max(0, len(versions) - keep)]:
        if name == current or name in used or current not in order or order[name] > order[current]:
            continue
        if now - _newest_change(root, name, META_FILE) >= min_age_s:
            storage.remove(version_uri(root, name), recursive=True)
            removed.append(name)
    for name in sorted(set(list_versions(root, complete=False)) - set(versions)):
        if now - _newest_change(root, name) >= staging_age_s:
            storage.remove(version_uri(root, name), recursive=True)
            removed.append(name)
    return removed


def referenced_versions(root: str, versions: list[str]) -> set[str]:
    """The versions whose files the given ``versions`` use (index.json file records with ``"version"``)."""
    used = set()
    for name in versions:
        try:
            files = storage.read_json(storage.join(version_uri(root, name), META_FILE)).get("files") or {}
        except FileNotFoundError:
            continue
        except (ValueError, UnicodeDecodeError, AttributeError):
            # A damaged index.json hides which files it shares: keep every version rather than guess.
            return set(list_versions(root))
        used.update(str(r["version"]) for r in files.values() if isinstance(r, dict) and r.get("version"))
    return used


def _newest_change(root: str, version: str, name: str | None = None) -> float:
    """Last modification of a version's file ``name`` (else of any of its files / its local folder)."""
    vuri = version_uri(root, version)
    uris = [storage.join(vuri, name)] if name else storage.list_files(vuri)
    times = [float("-inf")]
    if storage.is_local(vuri) and name is None:
        uris.append(vuri)
    for uri in uris:
        try:
            times.append(storage.modified(uri))
        except FileNotFoundError:  # removed since it was listed (another prune): it has no age to count
            pass
    return max(times)


def read_current(root: str | os.PathLike, missing_ok: bool = False) -> str | None:
    """The version name in ``root/CURRENT``."""
    root = storage.normalize(root)
    try:
        version = storage.read_text(storage.join(root, CURRENT_FILE)).strip()
    except FileNotFoundError:
        if missing_ok:
            return None
        if not storage.exists(root):
            raise IndexNotFoundError(f"index directory {root!r} does not exist") from None
        raise IndexNotFoundError(f"{root!r} is not a vidsift index: no {CURRENT_FILE} file") from None
    if not _VERSION_RE.match(version) or version.startswith("."):
        pointer = storage.join(root, CURRENT_FILE)
        raise CorruptIndexError(f"{pointer!r} holds an invalid version name {version!r}")
    return version


def version_dir(root: str | os.PathLike, version: str | None = None) -> str:
    """URI of ``version`` (CURRENT when None); a clear error when it does not exist."""
    version = version or read_current(root)
    uri = version_uri(root, version)
    if not storage.exists(uri):
        raise IndexNotFoundError(f"index version {version!r} named by {str(root)!r} does not exist at {uri}")
    return uri


SUMMARY_FIELDS = ("version", "factory", "count", "dim", "model_id", "search_params", "recall", "recall_k",
                  "tuning_queries", "video_probe_recall", "build_time_s", "training_size", "errors",
                  "operation", "last_operation", "num_shards")


def summary(meta: dict[str, Any]) -> dict[str, Any]:
    """The main fields of a version's index.json: what a build / add / delete reports (``jobs.index``)."""
    return {k: meta[k] for k in SUMMARY_FIELDS if k in meta}


def describe(root: str | os.PathLike) -> dict[str, Any]:
    """The CURRENT version's name, the list of retained versions and its index.json (``jobs.index info``)."""
    vdir = version_dir(root)
    return {"version": storage.name(vdir), "versions": list_versions(root), **read_meta(vdir)}


def read_meta(vdir: str | os.PathLike) -> dict[str, Any]:
    uri = storage.join(vdir, META_FILE)
    try:
        meta = storage.read_json(uri)
    except FileNotFoundError as exc:
        raise CorruptIndexError(f"index version {str(vdir)!r} has no {META_FILE}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptIndexError(f"{uri!r} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorruptIndexError(f"{uri!r} is not a {FORMAT} index description")
    for field in ("dim", "count", "shards"):
        if field not in meta:
            raise CorruptIndexError(f"{uri!r} lacks the field {field!r}")
    return meta


def local_file(vdir: str, meta: dict[str, Any], name: str, verify: bool | None = None) -> Path:
    """A local path holding the version's file ``name``: the file itself for a local index, else a cached
    copy verified against the sha256 in index.json (``verify``: None = remote copies only)."""
    record = (meta.get("files") or {}).get(name) or {}
    uri = storage.join(file_dir(vdir, record), name)
    check = (not storage.is_local(uri)) if verify is None else verify
    try:
        return storage.cached_copy(uri, sha256=record.get("sha256") if check else None)
    except FileNotFoundError as exc:
        raise CorruptIndexError(f"index file {uri!r} is missing") from exc
    except ValueError as exc:  # sha256 mismatch
        raise CorruptIndexError(f"index file {uri!r} is corrupt: {exc}") from exc


def file_dir(vdir: str, record: dict[str, Any]) -> str:
    """The folder holding a version's file: ``vdir``, or the older version named by its ``"version"``."""
    other = record.get("version")
    if not other:
        return vdir
    return storage.join(storage.parent(vdir), check_version_name(str(other)))


def without_file_references(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` for a copy of the version that holds every file itself (no ``"version"`` references)."""
    files = meta.get("files")
    if files is None:
        return meta
    return {**meta, "files": {n: {k: v for k, v in r.items() if k != "version"} for n, r in files.items()}}


def read_faiss(path: Path, mmap: bool | None = None) -> faiss.Index:
    """Read one FAISS file, memory-mapped unless ``mmap`` is False (a writer that changes it in memory).

    A published file never changes, so mapping it costs nothing and keeps the inverted lists / codes out of
    the process's own memory: the page cache holds them, shared by every process that opens the version."""
    if not path.is_file():
        raise CorruptIndexError(f"index file {str(path)!r} is missing")
    use_mmap = True if mmap is None else bool(mmap)
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if use_mmap else 0
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        raise CorruptIndexError(f"index file {str(path)!r} could not be read: {exc}") from exc


def read_shard(vdir: str, meta: dict[str, Any], info: dict[str, Any], mmap: bool | None = None,
               verify: bool | None = None) -> faiss.Index:
    """One shard's index; an on-disk one (``info["ivfdata"]``: :mod:`index.ondisk`) is always memory-mapped
    read-only, or copied into RAM when ``mmap`` is False (writers change a copy, never published lists)."""
    path = local_file(vdir, meta, info["file"], verify)
    if not info.get("ivfdata"):
        return read_faiss(path, mmap=mmap)
    data = local_file(vdir, meta, info["ivfdata"], verify)
    try:
        return ondisk.read_ondisk(path, data, writable=mmap is False)
    except RuntimeError as exc:
        pair = f"{str(path)!r} + {str(data)!r}"
        raise CorruptIndexError(f"on-disk index {pair} could not be read: {exc}") from exc


def _ids_file(vdir: str, meta: dict[str, Any]) -> str:
    """``ids.arrow``, or the ``ids.parquet`` of a version published before it existed."""
    files = meta.get("files")
    if files is not None:
        return ROWS_FILE if ROWS_FILE in files else IDS_FILE
    return ROWS_FILE if storage.exists(storage.join(vdir, ROWS_FILE)) else IDS_FILE


def read_row_table(vdir: str, meta: dict[str, Any] | None = None, verify: bool | None = None) -> RowTable:
    """Every row of the version (tombstoned and superseded ones too) for id lookups; ``ids.arrow`` is
    memory-mapped. A version with upsert deltas has several parts (``row_parts``): a :class:`RowParts`."""
    meta = meta or {}
    names = meta.get("row_parts") or [_ids_file(vdir, meta)]
    parts = []
    for name in names:
        path = local_file(vdir, meta, name, verify)
        try:
            parts.append(RowTable(read_rows_table(path)))
        except FileNotFoundError as exc:
            raise CorruptIndexError(f"index version {str(vdir)!r} has no {name}") from exc
        except (pa.ArrowInvalid, OSError) as exc:
            raise CorruptIndexError(f"{str(path)!r} could not be read: {exc}") from exc
    return parts[0] if len(parts) == 1 else RowParts(parts)


def read_superseded(vdir: str, meta: dict[str, Any] | None = None,
                    verify: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, before_shard)``: rows an upsert delta replaced (empty when the version has none)."""
    meta = meta or {}
    if SUPERSEDED_FILE not in (meta.get("files") or {}):
        return np.zeros(0, np.int64), np.zeros(0, np.int32)
    path = local_file(vdir, meta, SUPERSEDED_FILE, verify)
    try:
        return read_superseded_file(path)
    except (pa.ArrowInvalid, OSError, KeyError) as exc:
        raise CorruptIndexError(f"{str(path)!r} could not be read: {exc}") from exc


def shard_hidden_ids(vdir: str, meta: dict[str, Any], verify: bool | None = None) -> list[np.ndarray]:
    """Per shard, the sorted ids a search of it skips: tombstoned, or superseded by a later (delta) shard."""
    dead = read_dead_ids(vdir, meta, verify)
    superseded = read_superseded(vdir, meta, verify)
    return [hidden_in_shard(dead, superseded, i) for i in range(len(meta["shards"]))]


def read_dead_ids(vdir: str, meta: dict[str, Any] | None = None, verify: bool | None = None) -> np.ndarray:
    """Sorted ids the version's deletes tombstoned (empty when it has none)."""
    meta = meta or {}
    if TOMBSTONES_FILE not in (meta.get("files") or {}):
        return np.zeros(0, np.int64)
    path = local_file(vdir, meta, TOMBSTONES_FILE, verify)
    try:
        return read_tombstones(path)
    except (pa.ArrowInvalid, OSError, KeyError) as exc:
        raise CorruptIndexError(f"{str(path)!r} could not be read: {exc}") from exc


def read_ids(vdir: str, meta: dict[str, Any] | None = None, verify: bool | None = None) -> pa.Table:
    """The live rows of the version (tombstoned ones left out), without the lookup helper columns."""
    table = read_row_table(vdir, meta, verify).table
    table = table.drop_columns([c for c in HELPER_COLUMNS if c in table.column_names])
    dead = read_dead_ids(vdir, meta, verify)
    if len(dead):
        table = table.filter(pc.invert(pc.is_in(table.column("id"), value_set=pa.array(dead, pa.int64()))))
    superseded = read_superseded(vdir, meta, verify)
    if len(superseded[0]):
        gone = superseded_mask(table.column("id").to_numpy(), table.column("shard").to_numpy(), superseded)
        table = table.filter(pa.array(~gone))
    return table


def read_probe(
    vdir: str, meta: dict[str, Any] | None = None, verify: bool | None = None
) -> dict[str, np.ndarray] | None:
    files = (meta or {}).get("files")
    if files is not None and PROBE_FILE not in files:
        return None
    if files is None and not storage.exists(storage.join(vdir, PROBE_FILE)):
        return None
    with np.load(local_file(vdir, meta or {}, PROBE_FILE, verify), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def read_stable(root: str | os.PathLike, read: Callable[[str], T], attempts: int = 3) -> T:
    """``read(version)`` of the version CURRENT names; done again on the new CURRENT when that version
    vanished under the read (superseded, then pruned), never when CURRENT still names it (damage raises)."""
    for attempt in range(attempts):
        version = read_current(root)
        try:
            return read(version)
        except (FileNotFoundError, CorruptIndexError):  # IndexNotFoundError is a FileNotFoundError
            if attempt + 1 >= attempts or read_current(root, missing_ok=True) == version:
                raise
    raise AssertionError("unreachable")


def load_version(
    root: str | os.PathLike, version: str | None = None, mmap: bool | None = None, verify: bool | None = None
):
    """``(version URI, meta, [faiss indexes], ids table)`` of a published version (CURRENT's when None:
    :func:`read_stable`), validated; the files are read from local (cached, checksum-verified) copies."""
    if version is None:
        return read_stable(root, lambda current: load_version(root, current, mmap, verify))
    vdir = version_dir(root, version)
    meta = read_meta(vdir)
    indexes = [read_shard(vdir, meta, info, mmap=mmap, verify=verify) for info in meta["shards"]]
    rows = read_row_table(vdir, meta, verify)
    check_counts(vdir, meta, sum(int(ix.ntotal) for ix in indexes), len(rows))
    for ix in indexes:
        if ix.d != int(meta["dim"]):
            raise CorruptIndexError(
                f"index version {vdir!r}: faiss dim {ix.d} != index.json dim {meta['dim']}"
            )
    return vdir, meta, indexes, read_ids(vdir, meta, verify)


def check_counts(vdir: str, meta: dict[str, Any], in_faiss: int, in_rows: int) -> None:
    """FAISS and the ids table hold the same rows (``stored_count``: tombstoned ones too), and index.json's
    ``count`` is that less its tombstones."""
    dead = int((meta.get("tombstones") or {}).get("count", 0))
    superseded = int((meta.get("superseded") or {}).get("count", 0))
    stored = int(meta.get("stored_count", meta["count"]))
    if in_faiss != stored or in_rows != stored or stored - dead - superseded != int(meta["count"]):
        raise CorruptIndexError(
            f"index version {vdir!r} is inconsistent: index.json count {meta['count']} + {dead} tombstoned "
            f"+ {superseded} superseded, stored {stored}; faiss holds {in_faiss}, the ids table has "
            f"{in_rows} rows"
        )

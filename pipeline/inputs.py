"""Reading ingest inputs: manifests (CSV/TSV/JSONL/Parquet), directories and globs, as fsspec URIs.

Every input row becomes one ``InputRow`` dict; nothing is dropped here. Under the error policy ``"record"``
(default) rows whose URI cannot be opened by any fsspec filesystem are flagged with
``error=("bad_uri", message)`` and malformed rows (e.g. a captions cell that is a number) with
``error=("invalid_metadata", message)``, so the caller records them as errors; under ``"raise"`` they raise
:class:`BadURI` / :class:`BadManifestRow` (named input failures, see :mod:`runtime.errors`). An input that
cannot be read as a whole raises :class:`UnusableInput` under either policy.

An optional ``segments`` column (timed captions, docs/moments.md) becomes ``row["segments"]`` (a list; JSON
text in CSV); its items are checked one by one at ingest against the probed duration
(:mod:`pipeline.ingest.segments`), so one bad item does not cost the video.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa

from runtime import storage
from runtime.errors import ErrorPolicy, InvalidMetadata, UnreadableInput, check_policy, should_record

PATH_COLUMNS = ("path", "uri", "url", "source")
ID_COLUMNS = ("video_id", "id")
PASSTHROUGH_COLUMNS = ("split", "caption_class", "hard_group")
SIZE_COLUMNS = ("bytes", "size", "file_size")
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet", ".pq")
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".wmv")


class UnusableInput(UnreadableInput, ValueError):
    """The input as a whole cannot be read (missing manifest, no path column, empty glob): the job stops."""


InputError = UnusableInput  # the old name (jobs and tests catch ``pipeline.inputs.InputError``)


class BadURI(UnreadableInput, ValueError):
    """One row's path/URI cannot be opened by any fsspec filesystem (reason ``bad_uri`` in error tables)."""


class BadManifestRow(InvalidMetadata, ValueError):
    """One manifest row is malformed (reason ``invalid_metadata`` in error tables)."""


def split_protocol(uri: str) -> tuple[str, str]:
    """``("s3", "bucket/key")`` for ``s3://bucket/key``; ``("file", path)`` for plain paths."""
    if "://" in uri:
        protocol, rest = uri.split("://", 1)
        return protocol.lower(), rest
    return "file", uri


def check_uri(uri: str) -> str | None:
    """None when fsspec can open ``uri``'s scheme, else a message saying why not."""
    if not uri:
        return "empty path/URI"
    if any(ord(ch) < 32 for ch in uri):
        return f"control character in URI {uri!r}"
    protocol, _ = split_protocol(uri)
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError as exc:
        return f"unknown URI scheme {protocol!r} in {uri!r}: {exc}"
    except ImportError as exc:
        return f"no fsspec driver installed for scheme {protocol!r} in {uri!r}: {exc}"
    return None


def resolve_uri(value: str, base_dir: str | None) -> str:
    """Absolute URI for a manifest cell: relative local paths resolve against the manifest's folder."""
    value = str(value).strip()
    if "://" in value or value.startswith("/") or base_dir is None:
        return value
    if "://" in base_dir:
        return base_dir.rstrip("/") + "/" + value
    return os.path.normpath(os.path.join(base_dir, value))


def declared_size(uri: str) -> int | None:
    """File size for local files (cheap stat), None when unknown or missing (no request per remote row)."""
    if not storage.is_local(uri):
        return None
    try:
        return os.stat(storage.local_path(uri)).st_size
    except OSError:
        return None


def _parse_captions(row: dict[str, Any]) -> list[str]:
    value = row.get("captions")
    if value is None or (isinstance(value, float) and value != value):
        caption = row.get("caption")
        if caption is None or (isinstance(caption, float) and caption != caption):
            return []
        return [str(caption)]
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                return [value]
            return [str(c) for c in parsed]
        return [value] if text else []
    try:
        items = list(value)
    except TypeError as exc:  # a number, a bool: not captions
        message = f"captions must be a list or a string, got {type(value).__name__} {value!r}"
        raise BadManifestRow(message) from exc
    return [str(c) for c in items]


def _parse_segments(value: Any) -> list[Any]:
    """A ``segments`` cell as a list of items (checked per item at ingest, against the probed duration):
    a list / array, or JSON text of one (CSV); empty / null is ``[]``. Anything else is a bad row."""
    if value is None or (isinstance(value, float) and value != value):
        return []
    if isinstance(value, str):
        if not value.strip():
            return []
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise BadManifestRow(f"segments is not JSON: {exc}: {value[:200]!r}") from exc
    if isinstance(value, (dict, bytes, int, float, bool)) or not hasattr(value, "__iter__"):
        raise BadManifestRow(f"segments must be a list of {{start_s, end_s, caption}}, got {value!r}")
    return [_plain(item) for item in value]


def _plain(item: Any) -> Any:
    """A segment item with numpy scalars as Python values (it is hashed as JSON when planning)."""
    if isinstance(item, dict):
        return {str(k): (v.item() if hasattr(v, "item") else v) for k, v in item.items()}
    return item.item() if hasattr(item, "item") else item


def _clean(value: Any) -> Any:
    if value is None or (isinstance(value, float) and value != value):
        return None
    return value


def _read_table(uri: str):
    import pandas as pd

    lower = uri.lower()
    with storage.open_input(uri) as f:
        if lower.endswith((".parquet", ".pq")):
            return pd.read_parquet(f)
        if lower.endswith((".jsonl", ".ndjson")):
            return pd.read_json(f, lines=True, dtype=False)
        sep = "\t" if lower.endswith(".tsv") else ","
        return pd.read_csv(f, sep=sep, dtype=str, keep_default_na=False)


@dataclass(frozen=True)
class _Columns:
    """Which manifest columns hold the path, id and size (found once per manifest)."""

    names: tuple[str, ...]
    path: str
    id: str | None
    size: str | None
    base_dir: str | None


def _manifest_row(
    index: int, record: dict[str, Any], cols: _Columns, on_error: ErrorPolicy
) -> dict[str, Any]:
    """One input row of a manifest record; a cell that cannot be used is the row's ``error`` (``"record"``)
    or raises :class:`BadManifestRow` (``"raise"``)."""
    raw_path = _clean(record.get(cols.path))
    source = resolve_uri(str(raw_path), cols.base_dir) if raw_path is not None else ""
    video_id = _clean(record.get(cols.id)) if cols.id else None
    if video_id is None or str(video_id) == "":
        video_id = Path(source.rsplit("/", 1)[-1]).stem if source else f"row-{index}"
    row: dict[str, Any] = {
        "input_index": index,
        "video_id": str(video_id),
        "source": source,
        "captions": [],
        "declared_bytes": None,
    }
    for column in PASSTHROUGH_COLUMNS:
        if column in cols.names:
            value = _clean(record.get(column))
            row[column] = None if value is None else str(value)
    if cols.size is not None:
        try:
            row["declared_bytes"] = int(float(record[cols.size]))
        except (TypeError, ValueError):
            pass
    try:
        row["captions"] = _parse_captions(record)
        if "segments" in cols.names:  # only then: manifests without the column behave as before
            row["segments"] = _parse_segments(record.get("segments"))
    except BadManifestRow as exc:
        named = BadManifestRow(f"manifest row {index} ({source or video_id}): {exc}")
        if not should_record(named, on_error):
            raise named from exc
        row["error"] = ("invalid_metadata", str(named))
    return row


def rows_from_manifest(uri: str, on_error: ErrorPolicy = "record") -> list[dict[str, Any]]:
    """Input rows of one manifest file (paths resolved against its folder).

    A malformed row becomes a row with ``error=("invalid_metadata", message)`` under ``on_error="record"``
    and raises :class:`BadManifestRow` under ``"raise"``.
    """
    if storage.is_local(uri) and not storage.local_path(uri).exists():
        raise InputError(f"input manifest not found: {uri}")
    try:
        table = _read_table(uri)
    except FileNotFoundError as exc:
        raise InputError(f"input manifest not found: {uri}") from exc
    except (ValueError, OSError, pa.ArrowException) as exc:  # parser/format errors: the manifest is unusable
        raise InputError(f"cannot read manifest {uri}: {type(exc).__name__}: {exc}") from exc
    columns = list(table.columns)
    path_col = next((c for c in PATH_COLUMNS if c in columns), None)
    if path_col is None:
        raise InputError(f"manifest {uri} has no path column (one of {PATH_COLUMNS}); columns: {columns}")
    cols = _Columns(
        names=tuple(columns),
        path=path_col,
        id=next((c for c in ID_COLUMNS if c in columns), None),
        size=next((c for c in SIZE_COLUMNS if c in columns), None),
        base_dir=storage.parent(uri),
    )
    records = table.to_dict(orient="records")
    return [_manifest_row(index, record, cols, on_error) for index, record in enumerate(records)]


def rows_from_files(pattern: str) -> list[dict[str, Any]]:
    """Input rows for a directory (its video files, recursively) or a glob (every match)."""
    if storage.is_local(pattern):
        path = str(storage.local_path(pattern))
        if os.path.isdir(path):
            matches = [
                os.path.join(root, name)
                for root, _, names in os.walk(path)
                for name in names
                if name.lower().endswith(VIDEO_SUFFIXES)
            ]
        else:
            matches = [m for m in glob.glob(path, recursive=True) if os.path.isfile(m)]
        sources = sorted(matches)
    else:
        fs, root = storage.filesystem(pattern)
        found = fs.find(root) if fs.isdir(root) else fs.glob(root)
        sources = sorted(
            fs.unstrip_protocol(p)
            for p in found
            if str(p).lower().endswith(VIDEO_SUFFIXES) or not fs.isdir(root)
        )
    if not sources:
        raise InputError(f"no input files match {pattern}")
    return [
        {
            "input_index": i,
            "video_id": Path(src.rsplit("/", 1)[-1]).stem,
            "source": src,
            "captions": [],
            "declared_bytes": None,
        }
        for i, src in enumerate(sources)
    ]


def read_inputs(input: str | os.PathLike, on_error: ErrorPolicy = "record") -> list[dict[str, Any]]:
    """All rows of a manifest, directory or glob; ``InputError`` when the input itself is unusable.

    ``on_error="record"`` flags bad rows (``error`` key, see the module docstring); ``"raise"`` raises
    :class:`BadURI` / :class:`BadManifestRow` at the first one.
    """
    check_policy(on_error)
    uri = os.fspath(input)
    if uri.lower().endswith(MANIFEST_SUFFIXES) and not any(ch in uri for ch in "*?["):
        rows = rows_from_manifest(uri, on_error)
    else:
        if storage.is_local(uri) and not any(ch in uri for ch in "*?[") and not storage.exists(uri):
            raise InputError(f"input not found: {uri}")
        rows = rows_from_files(uri)
    for row in rows:
        if "error" in row:
            continue
        message = check_uri(row["source"])
        if message is not None:
            named = BadURI(f"input row {row['input_index']}: {message}")
            if not should_record(named, on_error):
                raise named
            row["error"] = ("bad_uri", message)
        elif row["declared_bytes"] is None:
            row["declared_bytes"] = declared_size(row["source"])
    return rows

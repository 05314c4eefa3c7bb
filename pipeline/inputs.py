"""Reading ingest inputs: manifests (CSV/TSV/JSONL/Parquet), directories and globs, as fsspec URIs.

Every input row becomes one ``InputRow`` dict; nothing is dropped here. Rows whose URI cannot be opened by any
fsspec filesystem are flagged with ``error=("bad_uri", message)`` so the caller records them as errors.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any

import fsspec

PATH_COLUMNS = ("path", "uri", "url", "source")
ID_COLUMNS = ("video_id", "id")
PASSTHROUGH_COLUMNS = ("split", "caption_class", "hard_group")
SIZE_COLUMNS = ("bytes", "size", "file_size")
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet", ".pq")
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".wmv")


class InputError(ValueError):
    """The input as a whole cannot be read (missing manifest, no path column, empty glob)."""


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
    """File size for local files (cheap stat), None when unknown or missing."""
    protocol, path = split_protocol(uri)
    if protocol not in ("file", "local"):
        return None
    try:
        return os.stat(path).st_size
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
    return [str(c) for c in list(value)]


def _clean(value: Any) -> Any:
    if value is None or (isinstance(value, float) and value != value):
        return None
    return value


def _read_table(uri: str):
    import pandas as pd

    lower = uri.lower()
    with fsspec.open(uri, "rb") as f:
        if lower.endswith((".parquet", ".pq")):
            return pd.read_parquet(f)
        if lower.endswith((".jsonl", ".ndjson")):
            return pd.read_json(f, lines=True, dtype=False)
        sep = "\t" if lower.endswith(".tsv") else ","
        return pd.read_csv(f, sep=sep, dtype=str, keep_default_na=False)


def rows_from_manifest(uri: str) -> list[dict[str, Any]]:
    """Input rows of one manifest file (paths resolved against its folder)."""
    protocol, path = split_protocol(uri)
    if protocol in ("file", "local") and not os.path.exists(path):
        raise InputError(f"input manifest not found: {uri}")
    try:
        table = _read_table(uri)
    except FileNotFoundError as exc:
        raise InputError(f"input manifest not found: {uri}") from exc
    except Exception as exc:  # noqa: BLE001 - any parser error means the manifest is unusable
        raise InputError(f"cannot read manifest {uri}: {type(exc).__name__}: {exc}") from exc
    columns = list(table.columns)
    path_col = next((c for c in PATH_COLUMNS if c in columns), None)
    if path_col is None:
        raise InputError(f"manifest {uri} has no path column (one of {PATH_COLUMNS}); columns: {columns}")
    id_col = next((c for c in ID_COLUMNS if c in columns), None)
    size_col = next((c for c in SIZE_COLUMNS if c in columns), None)
    base_dir = os.path.dirname(path) if protocol in ("file", "local") else uri.rsplit("/", 1)[0]
    rows = []
    for index, record in enumerate(table.to_dict(orient="records")):
        raw_path = _clean(record.get(path_col))
        source = resolve_uri(str(raw_path), base_dir) if raw_path is not None else ""
        video_id = _clean(record.get(id_col)) if id_col else None
        if video_id is None or str(video_id) == "":
            video_id = Path(source.rsplit("/", 1)[-1]).stem if source else f"row-{index}"
        row: dict[str, Any] = {
            "input_index": index,
            "video_id": str(video_id),
            "source": source,
            "captions": _parse_captions(record),
            "declared_bytes": None,
        }
        for column in PASSTHROUGH_COLUMNS:
            if column in columns:
                value = _clean(record.get(column))
                row[column] = None if value is None else str(value)
        if size_col is not None:
            try:
                row["declared_bytes"] = int(float(record[size_col]))
            except (TypeError, ValueError):
                pass
        rows.append(row)
    return rows


def rows_from_files(pattern: str) -> list[dict[str, Any]]:
    """Input rows for a directory (its video files, recursively) or a glob (every match)."""
    protocol, path = split_protocol(pattern)
    if protocol in ("file", "local"):
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
        fs, root = fsspec.core.url_to_fs(pattern)
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


def read_inputs(input: str | os.PathLike) -> list[dict[str, Any]]:
    """All rows of a manifest, directory or glob; ``InputError`` when the input itself is unusable."""
    uri = os.fspath(input)
    if uri.lower().endswith(MANIFEST_SUFFIXES) and not any(ch in uri for ch in "*?["):
        rows = rows_from_manifest(uri)
    else:
        protocol, path = split_protocol(uri)
        if protocol in ("file", "local") and not any(ch in path for ch in "*?[") and not os.path.exists(path):
            raise InputError(f"input not found: {uri}")
        rows = rows_from_files(uri)
    for row in rows:
        message = check_uri(row["source"])
        if message is not None:
            row["error"] = ("bad_uri", message)
        elif row["declared_bytes"] is None:
            row["declared_bytes"] = declared_size(row["source"])
    return rows

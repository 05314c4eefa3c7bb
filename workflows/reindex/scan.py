"""Read a video source (manifest / directory / glob) and content-hash every video, reusing a hash cache
keyed by (path, size, mtime) so unchanged files are never read again."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec

from pipeline.inputs import read_inputs, split_protocol
from runtime import storage
from runtime.progress import Progress

HASH_CHUNK = 8 << 20


def _log(message: str) -> None:
    print(f"[reindex] {message}", flush=True)


def file_signature(uri: str) -> tuple[int, str] | None:
    """(size, mtime) of a source file for the hash cache; None when it cannot be stat'ed."""
    protocol, path = split_protocol(uri)
    try:
        if protocol in ("file", "local"):
            st = os.stat(path)
            return st.st_size, str(st.st_mtime_ns)
        fs, p = fsspec.core.url_to_fs(uri)
        info = fs.info(p)
        stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("etag")
        return int(info.get("size") or 0), str(stamp)
    except (OSError, ValueError):
        return None


def hash_file(uri: str) -> str:
    """sha256 of the bytes of ``uri`` (streamed)."""
    digest = hashlib.sha256()
    with storage.open_input(uri) as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _problem(row: dict[str, Any], reason: str, message: str) -> dict[str, Any]:
    return {"video_id": row["video_id"], "source": row["source"], "reason": reason, "message": message}


def read_videos(rows: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Input rows by video id, plus problem rows for unreadable URIs and duplicate ids."""
    videos: dict[str, dict[str, Any]] = {}
    problems: list[dict[str, Any]] = []
    for row in rows:
        if "error" in row:
            problems.append(_problem(row, row["error"][0], row["error"][1]))
        elif row["video_id"] in videos:
            message = f"video id also used by {videos[row['video_id']]['source']}"
            problems.append(_problem(row, "duplicate_id", message))
        else:
            videos[row["video_id"]] = row
    return videos, problems


def reuse_cached(
    videos: dict[str, dict[str, Any]], cache: dict[str, dict[str, Any]], new_cache: dict[str, dict[str, Any]]
) -> list[tuple[str, tuple[int, str]]]:
    """Take the hash of every video whose (size, mtime) matches its cache entry; returns the rest as
    ``(video_id, signature)`` to hash (videos that cannot be stat'ed are in neither)."""
    todo = []
    for vid, row in videos.items():
        sig = file_signature(row["source"])
        if sig is None:
            continue
        entry = cache.get(row["source"])
        if entry and entry.get("size") == sig[0] and entry.get("mtime") == sig[1]:
            row["source_sha256"] = entry["sha256"]
            new_cache[row["source"]] = entry
        else:
            todo.append((vid, sig))
    return todo


def hash_videos(
    videos: dict[str, dict[str, Any]],
    todo: list[tuple[str, tuple[int, str]]],
    new_cache: dict[str, dict[str, Any]],
    workers: int,
    progress: bool,
) -> dict[str, str]:
    """Hash the ``todo`` files in ``workers`` threads (files/s + ETA lines); returns errors by video id."""

    def work(item):
        vid, sig = item
        try:
            return vid, sig, hash_file(videos[vid]["source"]), None
        except (OSError, ValueError) as exc:
            return vid, sig, None, f"{type(exc).__name__}: {exc}"

    errors: dict[str, str] = {}
    bar = Progress("reindex hash", len(todo), unit="files", enabled=progress)
    with ThreadPoolExecutor(max(1, int(workers))) as pool:
        for vid, sig, digest, error in pool.map(work, todo):
            if error is not None:
                errors[vid] = error
            if digest is not None:
                videos[vid]["source_sha256"] = digest
                new_cache[videos[vid]["source"]] = {"size": sig[0], "mtime": sig[1], "sha256": digest}
            bar.update()
    return errors


def scan_source(
    source: str, cache: dict[str, dict[str, Any]], workers: int = 4, progress: bool = True
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], dict]:
    """Read the source (manifest/dir/glob) and content-hash every video, reusing ``cache`` entries whose
    (size, mtime) still match. Returns ``(videos by id, problem rows, new cache)``; each video dict is the
    ingest input row plus ``source_sha256``. Problem rows (bad URI, unreadable, duplicate id) say why."""
    rows = read_inputs(source)
    videos, problems = read_videos(rows)
    new_cache: dict[str, dict[str, Any]] = {}
    todo = reuse_cached(videos, cache, new_cache)
    hits = sum("source_sha256" in row for row in videos.values())
    hash_errors = hash_videos(videos, todo, new_cache, workers, progress)
    for vid in [v for v, row in videos.items() if "source_sha256" not in row]:
        row = videos.pop(vid)
        problems.append(_problem(row, "unreadable", hash_errors.get(vid, f"cannot stat {row['source']}")))
    if progress:
        _log(
            f"scanned {len(rows)} source rows: {len(videos)} videos ({hits} hashes from cache, "
            f"{len(todo)} hashed), {len(problems)} problems"
        )
    return videos, problems, new_cache

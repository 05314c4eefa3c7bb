"""Outputs made from an index's videos after its build, recorded beside its versions so that a reader of the
index finds them from the index alone (the lineage of ``index.json`` points the other way: at the inputs).

Today one kind: ``jobs.caption --index NAME`` records its output folder (``captions.parquet``: a generated
caption per video) as ``NAME/annotations/captions-<digest>.json``, and ``jobs.serve --index NAME`` shows
those captions on its hits unless ``--captions`` flags override them::

    {"kind": "captions", "output": "<absolute URI of the caption run's folder>", "model_id": ..., ...}

Each record is one complete object named by a digest of its output URI: a rerun into the same folder
rewrites its own record (idempotent), and two caption runs into different folders never write the same
object, so concurrent writers need no lock and lose nothing. Versions, ``CURRENT`` and pruning never touch
``annotations/``: a record is about videos, and the service keeps the captions of the videos it serves.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

from index.store import CURRENT_FILE
from runtime import storage

ANNOTATIONS_DIR = "annotations"


def _record_uri(root: str, kind: str, output: str) -> str:
    digest = hashlib.sha256(output.encode("utf-8")).hexdigest()[:16]
    return storage.join(root, ANNOTATIONS_DIR, f"{kind}-{digest}.json")


def check_index_root(root: str | os.PathLike) -> str:
    """``root`` normalised, or ``FileNotFoundError`` naming it when it holds no published index (a mistyped
    ``--index`` must fail before the run, not after it)."""
    text = storage.normalize(root)
    if not storage.is_file(storage.join(text, CURRENT_FILE)):
        raise FileNotFoundError(
            f"--index {os.fspath(root)!r}: no {CURRENT_FILE} there (not a jobs.index output)")
    return text


def record_captions(root: str | os.PathLike, output: str, details: dict[str, Any]) -> str:
    """Record the caption run whose folder is ``output`` under index ``root``; ``details`` (model, shards,
    counts) go into the record. Returns the record's URI."""
    root, output = check_index_root(root), storage.normalize(output)
    record = {**details, "kind": "captions", "output": output, "recorded_at": time.time()}
    uri = _record_uri(root, "captions", output)
    storage.write_json(uri, record)
    return uri


def recorded_captions(root: str | os.PathLike) -> list[str]:
    """The caption output folders recorded under index ``root``, oldest record first (a later one's caption
    of a video wins where two caption runs covered it)."""
    records = [storage.read_json(uri) for uri in
               storage.list_files(storage.join(storage.normalize(root), ANNOTATIONS_DIR), ".json")]
    captions = [r for r in records if r.get("kind") == "captions" and r.get("output")]
    return [r["output"] for r in sorted(captions, key=lambda r: (r.get("recorded_at", 0), r["output"]))]

"""Layout of a reindex working directory on any store (a local folder, ``s3://``, ``gs://``: via
:mod:`runtime.storage`), its state file and how it is read."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from pipeline.embedding import remove_shard_outputs
from runtime import storage
from workflows.reindex.config import ReindexError

STATE_FORMAT = "vidsift-reindex-1"
LOCK_FILE = "reindex.lock"


def read_json(uri: str | os.PathLike, default: Any = None) -> Any:
    try:
        return storage.read_json(uri, default=default)
    except ValueError as exc:
        raise ReindexError(f"{uri} is not valid JSON ({exc}); fix or remove it") from exc


class Workdir:
    """Layout of a reindex working directory (every attribute is a URI string on the workdir's store).

    State, hash cache, lock, ingest shards, embeddings, the published index and the delta manifests live
    on the workdir's store; the scratch index of a run (rebuilt from scratch by every run) is a local
    folder: ``staging/run-<seq>`` for a local workdir, under ``$VIDSIFT_CACHE`` for a remote one."""

    def __init__(self, root: str | os.PathLike):
        self.root = storage.normalize(os.fspath(root).removeprefix("file://"))
        self.lock = storage.join(self.root, LOCK_FILE)
        self.state = storage.join(self.root, "state", "state.json")
        self.hash_cache = storage.join(self.root, "state", "hash_cache.json")
        self.runs = storage.join(self.root, "state", "runs")
        self.ingest = storage.join(self.root, "ingest")
        self.embeddings = storage.join(self.root, "embeddings")
        self.index = storage.join(self.root, "index")
        self.staging = storage.join(self.root, "staging")

    def run_ingest_dir(self, seq: int) -> str:
        return storage.join(self.ingest, f"run-{seq:06d}")

    def run_staging(self, seq: int) -> Path:
        """Local scratch of run ``seq`` (scratch index, delta/live embeddings); removed after publish."""
        if storage.is_local(self.staging):
            return storage.local_path(self.staging) / f"run-{seq:06d}"
        key = hashlib.sha256(self.root.encode()).hexdigest()[:16]
        return storage.cache_dir() / "reindex-scratch" / key / f"run-{seq:06d}"

    def read_state(self) -> dict[str, Any]:
        """The state of the last successful run (an empty one before the first)."""
        state = read_json(self.state, default=None) or {
            "format": STATE_FORMAT,
            "seq": 0,
            "videos": {},
            "failed": {},
        }
        if state.get("format") != STATE_FORMAT:
            raise ReindexError(f"{self.state} is not a {STATE_FORMAT} state file")
        return state

    def reset_run(self, seq: int, partition: str) -> None:
        """Forget a crashed run's outputs when its delta differs from this run's (embed trusts parts)."""
        run_dir = self.run_ingest_dir(seq)
        storage.remove(run_dir, recursive=True)
        remove_shard_outputs(partition, f"{storage.name(run_dir)}-")

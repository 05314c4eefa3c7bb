"""Layout of a reindex working directory, its state file and the atomic JSON writes every step uses."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from workflows.reindex.config import ReindexError, ReindexInputError

STATE_FORMAT = "vidsift-reindex-1"
LOCK_FILE = "reindex.lock"


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to ``path`` via a temp file + fsync + ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except json.JSONDecodeError as exc:
        raise ReindexError(f"{path} is not valid JSON ({exc}); fix or remove it") from exc


class Workdir:
    """Layout of a reindex working directory."""

    def __init__(self, root: str | os.PathLike):
        root_s = os.fspath(root)
        if "://" in root_s and not root_s.startswith("file://"):
            raise ReindexInputError(
                f"--workdir {root_s!r}: the reindex workdir must be a POSIX filesystem path (a local disk or "
                "a shared volume mounted on every node, e.g. EFS/NFS/PVC); object stores cannot do O_EXCL "
                "locks or atomic renames"
            )
        self.root = Path(root_s.removeprefix("file://")).resolve()
        self.lock = self.root / LOCK_FILE
        self.state = self.root / "state" / "state.json"
        self.hash_cache = self.root / "state" / "hash_cache.json"
        self.runs = self.root / "state" / "runs"
        self.ingest = self.root / "ingest"
        self.embeddings = self.root / "embeddings"
        self.index = self.root / "index"
        self.staging = self.root / "staging"

    def run_ingest_dir(self, seq: int) -> Path:
        return self.ingest / f"run-{seq:06d}"

    def run_staging(self, seq: int) -> Path:
        """Scratch space of run ``seq`` (scratch index, delta/live embeddings); removed after publish."""
        return self.staging / f"run-{seq:06d}"

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

    def reset_run(self, seq: int, partition: Path) -> None:
        """Forget a crashed run's outputs when its delta differs from this run's (embed trusts parts)."""
        run_dir = self.run_ingest_dir(seq)
        label = f"{run_dir.name}-"
        shutil.rmtree(run_dir, ignore_errors=True)
        for folder in (partition, partition / "errors"):
            for part in folder.glob(f"part-{label}*.parquet"):
                part.unlink(missing_ok=True)

"""The run lock ``WORKDIR/reindex.lock``: one reindex at a time per workdir, stale locks taken over."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from workflows.reindex.config import ReindexError
from workflows.reindex.workdir import write_json_atomic


class LockHeldError(ReindexError):
    """Another live run holds ``WORKDIR/reindex.lock``."""


def _log(message: str) -> None:
    print(f"[reindex] {message}", flush=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """``WORKDIR/reindex.lock`` created with ``O_EXCL``: pid, hostname, start time, heartbeat.

    A background thread refreshes the heartbeat (atomic rewrite, the file never disappears). A lock whose
    pid is gone on this host, or whose heartbeat is older than ``ttl_s``, is stale and is taken over
    (renamed away atomically first, so two runs can never both take it over)."""

    def __init__(self, path: str | os.PathLike, ttl_s: float = 3600.0, heartbeat_s: float = 30.0):
        self.path = Path(path)
        self.ttl_s, self.heartbeat_s = float(ttl_s), float(heartbeat_s)
        self.token = uuid.uuid4().hex
        self.record: dict[str, Any] | None = None
        self.took_over: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> dict[str, Any] | None:
        """The lock file's contents (None when absent; ``{}`` when unreadable, e.g. half-written)."""
        return _read_lock_file(self.path)

    def stale_reason(self, info: dict[str, Any]) -> str | None:
        """Why the lock ``info`` is stale, or None when its holder looks alive."""
        now = time.time()
        heartbeat = float(info.get("heartbeat") or info.get("started") or 0)
        if not info:
            age = now - self.path.stat().st_mtime if self.path.exists() else float("inf")
            return f"unreadable lock file, {age:.0f}s old" if age > self.ttl_s else None
        if info.get("hostname") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1))):
            return f"pid {info.get('pid')} is not running on {info.get('hostname')}"
        if now - heartbeat > self.ttl_s:
            return f"heartbeat {now - heartbeat:.0f}s old > ttl {self.ttl_s:.0f}s"
        return None

    def acquire(self) -> None:
        """Take the lock or raise :class:`LockHeldError` naming the live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            now = time.time()
            record = {"pid": os.getpid(), "hostname": socket.gethostname(), "started": now, "heartbeat": now,
                      "token": self.token, "argv": sys.argv}
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
                f.flush()
                os.fsync(f.fileno())
            self.record = record
            self._thread = threading.Thread(target=self._beat, name="reindex-lock-heartbeat", daemon=True)
            self._thread.start()
            return
        raise LockHeldError(f"could not acquire {self.path}: it keeps changing hands")

    def _take_over_if_stale(self) -> None:
        """Move a stale lock out of the way (atomic rename); raise :class:`LockHeldError` for a live one."""
        info = self.read()
        if info is None:
            return  # released between our open and read: race again
        reason = self.stale_reason(info)
        if reason is None:
            raise LockHeldError(
                f"another reindex is running: {self.path} is held by pid {info.get('pid')} on "
                f"{info.get('hostname')} since {_iso(info.get('started'))} (heartbeat "
                f"{time.time() - float(info.get('heartbeat', 0)):.0f}s ago); exiting"
            )
        graveyard = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, graveyard)
        except FileNotFoundError:
            return  # someone else moved it first; race again for the fresh lock
        if _read_lock_file(graveyard) != info:
            # Between our read and rename another run took the stale lock over and wrote its own: put that
            # one back (link fails if yet another lock appeared meanwhile) and back off.
            try:
                os.link(graveyard, self.path)
            except FileExistsError:
                pass
            graveyard.unlink(missing_ok=True)
            raise LockHeldError(f"{self.path} changed hands while taking over a stale lock; exiting")
        _log(f"taking over stale lock ({reason}): {info}")
        self.took_over = {**info, "reason": reason}
        graveyard.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.heartbeat()

    def heartbeat(self) -> None:
        """Refresh the heartbeat, only while the lock is still ours."""
        info = self.read()
        if not info or info.get("token") != self.token or self.record is None:
            return
        self.record["heartbeat"] = time.time()
        write_json_atomic(self.path, self.record)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        info = self.read()
        if info and info.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self.record = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_lock_file(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return {}


def _iso(ts: Any) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(ts)))
    except (TypeError, ValueError):
        return "?"

"""The run lock ``WORKDIR/reindex.lock`` (any store): one reindex at a time per workdir, stale locks taken
over."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

from runtime import storage
from workflows.reindex.config import ReindexError


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


class LockLostError(ReindexError):
    """This run's lock was taken over by another run (it stalled past ``ttl_s``): stop before publishing."""


class RunLock:
    """``WORKDIR/reindex.lock`` on any store, created with :func:`runtime.storage.create_exclusive` (local
    ``O_EXCL``; S3 ``If-None-Match: *``; GCS generation match): pid, hostname, start time, heartbeat, token.

    A background thread refreshes the heartbeat by rewriting the lock (one complete write: it never
    disappears). A lock whose pid is gone on this host, or whose heartbeat is older than ``ttl_s``, is stale
    and is taken over: deleted only if it still holds the record judged stale, then created exclusively
    again. Object stores have no compare-and-delete, so that check-then-delete is a small race (docs/ops.md,
    "The lock on object stores"); :meth:`check_held` before publishing makes a run that lost it stop."""

    def __init__(self, path: str | os.PathLike, ttl_s: float = 3600.0, heartbeat_s: float = 30.0):
        self.path = storage.normalize(path)
        self.ttl_s, self.heartbeat_s = float(ttl_s), float(heartbeat_s)
        self.token = uuid.uuid4().hex
        self.record: dict[str, Any] | None = None
        self.took_over: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> dict[str, Any] | None:
        """The lock's contents (None when absent; ``{}`` when unreadable, e.g. half-written)."""
        return _read_lock_file(self.path)

    def stale_reason(self, info: dict[str, Any]) -> str | None:
        """Why the lock ``info`` is stale, or None when its holder looks alive."""
        now = time.time()
        heartbeat = float(info.get("heartbeat") or info.get("started") or 0)
        if not info:
            age = now - _modified(self.path)
            return f"unreadable lock file, {age:.0f}s old" if age > self.ttl_s else None
        if info.get("hostname") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1))):
            return f"pid {info.get('pid')} is not running on {info.get('hostname')}"
        if now - heartbeat > self.ttl_s:
            return f"heartbeat {now - heartbeat:.0f}s old > ttl {self.ttl_s:.0f}s"
        return None

    def acquire(self) -> None:
        """Take the lock or raise :class:`LockHeldError` naming the live holder."""
        storage.makedirs(storage.parent(self.path))
        for _ in range(5):
            now = time.time()
            record = {"pid": os.getpid(), "hostname": socket.gethostname(), "started": now, "heartbeat": now,
                      "token": self.token, "argv": sys.argv}
            if not storage.create_exclusive(self.path, json.dumps(record).encode()):
                self._take_over_if_stale()
                continue
            self.record = record
            self._thread = threading.Thread(target=self._beat, name="reindex-lock-heartbeat", daemon=True)
            self._thread.start()
            return
        raise LockHeldError(f"could not acquire {self.path}: it keeps changing hands")

    def _take_over_if_stale(self) -> None:
        """Remove a stale lock (if it is still the one judged stale); raise :class:`LockHeldError` for a live
        one. The re-read + delete is not atomic on object stores: see the class docstring."""
        info = self.read()
        if info is None:
            return  # released between our create and read: race again
        reason = self.stale_reason(info)
        if reason is None:
            raise LockHeldError(
                f"another reindex is running: {self.path} is held by pid {info.get('pid')} on "
                f"{info.get('hostname')} since {_iso(info.get('started'))} (heartbeat "
                f"{time.time() - float(info.get('heartbeat', 0)):.0f}s ago); exiting"
            )
        if self.read() != info:
            raise LockHeldError(f"{self.path} changed hands while taking over a stale lock; exiting")
        storage.remove(self.path)
        _log(f"taking over stale lock ({reason}): {info}")
        self.took_over = {**info, "reason": reason}

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.heartbeat()

    def heartbeat(self) -> None:
        """Refresh the heartbeat, only while the lock is still ours."""
        info = self.read()
        if not info or info.get("token") != self.token or self.record is None:
            return
        self.record["heartbeat"] = time.time()
        storage.write_json(self.path, self.record, fsync=True)

    def check_held(self) -> None:
        """Raise :class:`LockLostError` when the lock no longer holds our token (another run took it over)."""
        info = self.read()
        if self.record is not None and (not info or info.get("token") != self.token):
            holder = f"pid {info.get('pid')} on {info.get('hostname')}" if info else "nobody"
            raise LockLostError(f"{self.path} was taken over (now held by {holder}); not publishing")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        info = self.read()
        if info and info.get("token") == self.token:
            storage.remove(self.path)
        self.record = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_lock_file(uri: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return {}


def _modified(uri: str) -> float:
    """The lock's last-modified time (unix seconds); ``-inf`` when it is gone (so it counts as stale)."""
    fs, path = storage.filesystem(uri)
    try:
        return fs.modified(path).timestamp()
    except (FileNotFoundError, NotImplementedError, OSError):
        return float("-inf")


def _iso(ts: Any) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(ts)))
    except (TypeError, ValueError):
        return "?"

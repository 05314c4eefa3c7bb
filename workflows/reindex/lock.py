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
    """``WORKDIR/reindex.lock`` on any store with conditional writes (a local folder, S3): pid, hostname,
    start time, heartbeat, token.

    Every change is conditional on the exact bytes last seen (:mod:`runtime.storage`): it is created with
    :func:`~runtime.storage.create_exclusive`; a stale lock (its pid gone on this host, or its heartbeat
    older than ``ttl_s``) is taken over by swapping our record in place of the very record judged stale
    (:func:`~runtime.storage.compare_and_swap`), so of two runs taking it over one wins; the heartbeat
    thread swaps our previous record for a fresher one, so it can never overwrite a successor's lock (it
    notices the loss and stops); release deletes only our own record (:func:`~runtime.storage.remove_if`).
    :meth:`check_held` before publishing, and again just before CURRENT is swapped, makes a run that lost
    it stop; the conditional CURRENT swap covers the rest (docs/storage.md, "Locks")."""

    def __init__(self, path: str | os.PathLike, ttl_s: float = 3600.0, heartbeat_s: float = 30.0):
        self.path = storage.normalize(path)
        self.ttl_s, self.heartbeat_s = float(ttl_s), float(heartbeat_s)
        self.token = uuid.uuid4().hex
        self.record: dict[str, Any] | None = None
        self.took_over: dict[str, Any] | None = None
        self.lost = False
        self._written: bytes | None = None  # our last write: every change is conditional on these bytes
        self._mutex = threading.Lock()  # the heartbeat thread vs release
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> dict[str, Any] | None:
        """The lock's contents (None when absent; ``{}`` when unreadable)."""
        return _parse_lock(_read_raw(self.path))

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
            data = json.dumps(record).encode()
            if storage.create_exclusive(self.path, data) or self._take_over_if_stale(data):
                self.record, self._written, self.lost = record, data, False
                if self.heartbeat_s > 0:  # 0: no thread, the caller beats (tests race heartbeat() itself)
                    self._thread = threading.Thread(target=self._beat, name="reindex-lock-heartbeat",
                                                    daemon=True)
                    self._thread.start()
                return
        raise LockHeldError(f"could not acquire {self.path}: it keeps changing hands")

    def _take_over_if_stale(self, data: bytes) -> bool:
        """Swap ``data`` in for a stale lock; False when the lock vanished or changed meanwhile (try again);
        :class:`LockHeldError` for a live one."""
        raw = _read_raw(self.path)
        if raw is None:
            return False  # released between our create and read: race again
        if raw == data:
            return True  # our own create landed, but its reply was lost and the retried PUT got 412
        info = _parse_lock(raw)
        reason = self.stale_reason(info)
        if reason is None:
            raise LockHeldError(
                f"another reindex is running: {self.path} is held by pid {info.get('pid')} on "
                f"{info.get('hostname')} since {_iso(info.get('started'))} (heartbeat "
                f"{time.time() - float(info.get('heartbeat', 0)):.0f}s ago); exiting"
            )
        if not storage.compare_and_swap(self.path, raw, data):
            return False  # its holder beat, or another run took it over first
        _log(f"took over stale lock ({reason}): {info}")
        self.took_over = {**info, "reason": reason}
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self.heartbeat():
                return

    def heartbeat(self) -> bool:
        """Refresh the heartbeat, only while the lock still holds our last write; False once it is lost."""
        with self._mutex:
            if self._written is None or self.record is None:
                return False
            record = {**self.record, "heartbeat": time.time()}
            data = json.dumps(record).encode()
            if not storage.compare_and_swap(self.path, self._written, data):
                self.lost, self._written = True, None
                _log(f"lost {self.path}: another run took it over; this run will not publish")
                return False
            self.record, self._written = record, data
            return True

    def check_held(self) -> None:
        """Raise :class:`LockLostError` when the lock no longer holds our token (another run took it over)."""
        info = self.read()
        if self.record is not None and (self.lost or not info or info.get("token") != self.token):
            holder = f"pid {info.get('pid')} on {info.get('hostname')}" if info else "nobody"
            raise LockLostError(f"{self.path} was taken over (now held by {holder}); not publishing")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._mutex:
            if self._written is not None:
                storage.remove_if(self.path, self._written)  # never someone else's lock
            self.record, self._written = None, None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_raw(uri: str) -> bytes | None:
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError:
        return None


def _parse_lock(raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        info = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


def _modified(uri: str) -> float:
    """The lock's last-modified time (unix seconds); ``-inf`` when it is gone (so it counts as stale)."""
    try:
        return storage.modified(uri)
    except (FileNotFoundError, NotImplementedError, OSError):
        return float("-inf")


def _iso(ts: Any) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(ts)))
    except (TypeError, ValueError):
        return "?"

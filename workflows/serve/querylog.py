"""The service's query log: the texts users search for, as JSONL the index build tunes nprobe / efSearch on
(``jobs.index build --query-log URI``, :func:`index.tuning.read_query_log`).

Each answered search appends ``{"q": TEXT, "t": unix seconds, "version": index version}`` lines to an
in-memory buffer; a background thread writes the buffer every ``flush_s`` seconds as ONE new complete object
``URI/queries-<start>-<pid>-<random>-<seq>.jsonl`` (any store: object stores cannot append, and a reader
never sees half a file). Replicas and restarts never write the same name, so any number of them can log into
one folder. It is bounded: at most ``max_pending`` lines wait in memory and at most ``max_bytes`` are written
per process; queries beyond either are counted as ``dropped``, never block a request.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

from runtime import storage
from runtime.periodic import PeriodicThread

log = logging.getLogger(__name__)
DEFAULT_FLUSH_S = 30.0
DEFAULT_MAX_PENDING = 10_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


class QueryLog:
    """Buffered, bounded JSONL log of the query texts a service answers (see the module docstring)."""

    def __init__(self, uri: str, flush_s: float = DEFAULT_FLUSH_S, max_pending: int = DEFAULT_MAX_PENDING,
                 max_bytes: int = DEFAULT_MAX_BYTES):
        if flush_s <= 0 or max_pending < 1 or max_bytes < 1:
            raise ValueError(f"query log {uri!r}: flush_s, max_pending and max_bytes must be > 0, got "
                             f"{flush_s}, {max_pending}, {max_bytes}")
        self.uri = storage.normalize(uri)
        if storage.is_file(self.uri):
            raise ValueError(f"query log {uri!r} is a file; pass a folder (each flush writes a new .jsonl)")
        storage.makedirs(self.uri)
        self.flush_s, self.max_pending, self.max_bytes = float(flush_s), int(max_pending), int(max_bytes)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        self._prefix = f"queries-{stamp}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._pending: list[str] = []
        self._lock = threading.Lock()  # record() runs on request threads, flush() on the writer thread
        self._flush_lock = threading.Lock()
        self._writer = PeriodicThread(self.flush, self.flush_s, "vidsift-query-log")
        self.files = self.logged = self.dropped = self.written_bytes = 0
        self.last_error: str | None = None

    def record(self, queries: Sequence[str], version: str) -> None:
        """Queue one answered search's texts (never blocks on the store; drops beyond the bounds)."""
        now = round(time.time(), 3)
        with self._lock:
            room = self.max_pending - len(self._pending) if self.written_bytes < self.max_bytes else 0
            kept = list(queries)[:max(room, 0)]
            self.dropped += len(queries) - len(kept)
            self._pending.extend(json.dumps({"q": q, "t": now, "version": version}) for q in kept)

    def flush(self) -> int:
        """Write what is queued as one new object; returns the lines written."""
        with self._flush_lock:
            with self._lock:
                lines, self._pending = self._pending, []
            chunks, size = [], self.written_bytes
            for line in lines:  # the byte budget cuts at whole lines
                encoded = line.encode("utf-8") + b"\n"
                if size + len(encoded) > self.max_bytes:
                    break
                chunks.append(encoded)
                size += len(encoded)
            data, kept = b"".join(chunks), len(chunks)
            self.dropped += len(lines) - kept
            if not kept:
                return 0
            target = storage.join(self.uri, f"{self._prefix}-{self.files:06d}.jsonl")
            try:
                storage.write_bytes(target, data)
            except Exception as exc:  # noqa: BLE001 — a store hiccup loses these lines, never a request
                self.dropped += kept
                self.last_error = f"writing {target} failed: {type(exc).__name__}: {exc}"
                log.error("%s", self.last_error)
                return 0
            self.files += 1
            self.logged += kept
            self.written_bytes += len(data)
            return kept

    def start(self) -> QueryLog:
        self._writer.start()
        return self

    def stop(self) -> None:
        """Stop the writer thread and write what is still queued."""
        self._writer.stop()
        self.flush()

    def status(self) -> dict[str, Any]:
        with self._lock:
            pending = len(self._pending)
        return {"uri": self.uri, "files": self.files, "logged": self.logged, "pending": pending,
                "dropped": self.dropped, "last_error": self.last_error}

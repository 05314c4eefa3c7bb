"""One background thread that calls a function every few seconds until stopped (the service's index poller
and query-log writer)."""

from __future__ import annotations

import threading
from collections.abc import Callable


class PeriodicThread:
    """Calls ``fn()`` every ``interval_s`` seconds on a daemon thread named ``name``; ``stop`` wakes it at
    once (an Event, not a sleep) and waits up to ``join_s`` for the call in flight. ``fn`` handles its own
    errors: one that escapes ends the thread."""

    def __init__(self, fn: Callable[[], object], interval_s: float, name: str, join_s: float = 30.0):
        self.fn, self.interval_s, self.name, self.join_s = fn, float(interval_s), name, float(join_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.join_s)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.fn()

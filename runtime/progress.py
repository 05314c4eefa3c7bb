"""One progress reporter (items/s, ETA) and one end-of-run summary printer for every long job."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO


def format_eta(seconds: float) -> str:
    """``1h02m03s`` / ``4m05s`` / ``12s``; ``?`` when unknown."""
    if seconds != seconds or seconds == float("inf") or seconds < 0:  # NaN, inf
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Counts items and prints ``[label] done/total unit  rate unit/s  ETA`` at most every ``every_s``.

    ``update(n)`` adds ``n`` done items; ``set_done(done)`` sets the absolute count. The first output
    time is kept so that :meth:`steady_rate` excludes start-up (cluster join, model load, pipeline fill).
    """

    def __init__(
        self,
        label: str,
        total: int,
        unit: str = "items",
        every_s: float = 5.0,
        enabled: bool = True,
        stream: TextIO | None = None,
    ):
        self.label, self.total, self.unit, self.every_s, self.enabled = label, total, unit, every_s, enabled
        self.stream = stream
        self.start = self.last_print = self.last_update = time.monotonic()
        self.first: tuple[float, int] | None = None  # (time, items done) at the first output
        self.done = 0

    def update(self, n: int = 1, extra: str = "") -> None:
        self.set_done(self.done + n, extra)

    def set_done(self, done: int, extra: str = "") -> None:
        now = time.monotonic()
        if self.first is None and done > 0:
            self.first = (now, done)
        self.done, self.last_update = done, now
        if now - self.last_print < self.every_s and done < self.total:
            return
        self.last_print = now
        if self.enabled:
            print(self.line(extra), file=self.stream or sys.stdout, flush=True)

    def line(self, extra: str = "") -> str:
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        text = (f"[{self.label}] {self.done}/{self.total} {self.unit}  {rate:,.2f} {self.unit}/s  "
                f"ETA {format_eta(eta)}")
        return f"{text} {extra}".rstrip()

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.start, 1e-9)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def startup_s(self) -> float:
        """Seconds until the first output."""
        return (self.first[0] - self.start) if self.first else 0.0

    def steady_rate(self) -> float:
        """Items/s after the first output: the throughput a long run converges to."""
        if self.first is None:
            return 0.0
        span = self.last_update - self.first[0]
        return (self.done - self.first[1]) / span if span > 0 and self.done > self.first[1] else 0.0


def print_summary(stage: str, summary: dict[str, Any], stream: TextIO | None = None) -> None:
    """The end-of-run summary every job prints: an aligned table, then the same as one JSON line."""
    out = stream or sys.stdout
    print(f"[{stage}] summary", file=out)
    for key, value in summary.items():
        print(f"  {key:<16} {value}", file=out)
    print(json.dumps(summary, default=str), file=out, flush=True)

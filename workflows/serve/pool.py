"""Where searches run: bounded thread pools off the event loop, each request with a deadline.

A search (text encode, FAISS, building the JSON) never runs on the event loop, so one slow request cannot
stall every other connection. Two lanes keep heavy requests from taking the cheap ones' threads: a request
whose ranking is small (``queries × (offset + k)`` ≤ ``light_ranked``: every search the page sends) runs in
the light lane, anything bigger in the heavy lane, which has one thread and a short queue. A lane holds at
most ``workers + queue`` requests; one more is refused at once with :class:`Overloaded` (HTTP 503 with
``Retry-After``) instead of waiting in an unbounded queue. A request still queued or running after its
deadline is answered with :class:`DeadlineExceeded` (503); one still queued is cancelled and never runs,
one already running keeps its thread (Python threads cannot be stopped) and its place in the lane until it
ends, so the bound holds.

The heavy lane also has a time budget (:class:`TimeBudget`): it may be busy at most ``heavy_share`` of the
time. A heavy search holds the GIL for much of its run (collapsing clips, building thousands of hit dicts,
JSON) and a core for all of it, so one client looping the heaviest accepted request would otherwise slow
every small search in the process. After a heavy search that ran ``d`` seconds the lane refuses new heavy
searches (503, ``Retry-After``) for about ``d × (1 / heavy_share − 1)``; an idle service answers one at once.
A refused request gets its 503 when the refusal ends (1 s at most), so a client looping on 503s cannot make
them a busy loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import math
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
MAX_REFUSAL_DELAY_S = 1.0  # the longest a heavy search refused by the time budget waits for its 503


class Overloaded(Exception):
    """The lane is full: HTTP 503 with ``Retry-After``."""

    status = 503

    def __init__(self, message: str, retry_after_s: int = 1, wait_s: float = 0.0):
        super().__init__(message)
        self.retry_after_s, self.wait_s = retry_after_s, wait_s  # wait_s: until the refusal ends


class DeadlineExceeded(Exception):
    """The search did not finish within the service's deadline: HTTP 503 with ``Retry-After``."""

    status = 503
    retry_after_s = 1


@dataclasses.dataclass(frozen=True)
class PoolConfig:
    """Threads and queue places of each lane, the light lane's size bound and the deadline of a search."""

    light_workers: int = 2
    light_queue: int = 64
    heavy_workers: int = 1
    heavy_queue: int = 2
    light_ranked: int = 200
    deadline_s: float = 10.0
    heavy_share: float = 0.25  # the most of the time the heavy lane may be busy (1: no budget)
    heavy_burst_s: float = 0.5  # heavy-lane seconds an idle service lets through back to back

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if name == "deadline_s":
                if not value > 0:
                    raise ValueError(f"search pool deadline_s must be > 0, got {value!r}")
            elif name == "heavy_share":
                if not 0 < value <= 1:
                    raise ValueError(f"search pool heavy_share must be in (0, 1], got {value!r}")
            elif name == "heavy_burst_s":
                if not value > 0:
                    raise ValueError(f"search pool heavy_burst_s must be > 0, got {value!r}")
            elif not isinstance(value, int) or value < (0 if name.endswith("_queue") else 1):
                raise ValueError(f"search pool {name} must be an integer >= "
                                 f"{0 if name.endswith('_queue') else 1}, got {value!r}")


class TimeBudget:
    """A token bucket of lane time: credit fills at ``share`` seconds per second up to ``burst_s``; a request
    is admitted while there is credit, and pays the seconds it ran when it ends (credit may go below 0).

    With one thread and no burst that is the rule "after a request of ``d`` seconds, refuse for
    ``d × (1 / share − 1)``": it earned ``d × share`` while it ran. Requests admitted together (queued in
    the lane) pay once they ran, so a burst is at most the lane's capacity; over time the share holds.
    ``busy_s`` counts every second paid."""

    def __init__(self, share: float, burst_s: float, clock: Callable[[], float] = time.monotonic):
        self.share, self.burst_s, self._clock = float(share), float(burst_s), clock
        self._lock = threading.Lock()
        self._credit, self._at = self.burst_s, clock()
        self.busy_s = 0.0
        self.throttled = 0

    def _refill(self, spent_s: float = 0.0) -> float:
        """The credit now, less ``spent_s``; what was earned since the last call counts before the cap, so a
        request's run earns its ``d × share`` even when it started with a full bucket."""
        now = self._clock()
        self._credit = min(self.burst_s, self._credit + (now - self._at) * self.share - spent_s)
        self._at = now
        return self._credit

    def admit(self) -> None:
        """Return if there is credit, else count a refusal and raise :class:`Overloaded` saying when."""
        with self._lock:
            credit = self._refill()
            if credit > 0:
                return
            self.throttled += 1
        wait_s = -credit / self.share
        raise Overloaded(f"the service is busy: heavy searches (many queries or a deep page) may use "
                         f"{self.share:.0%} of its time and used it, so they are refused for {wait_s:.1f} s; "
                         "retry then, or ask for fewer results", retry_after_s=max(1, math.ceil(wait_s)),
                         wait_s=wait_s)

    def pay(self, seconds: float) -> None:
        with self._lock:
            self._refill(seconds)
            self.busy_s += seconds

    def status(self) -> dict[str, float | int]:
        with self._lock:
            return {"share": self.share, "burst_s": self.burst_s, "credit_s": round(self._refill(), 3),
                    "busy_s": round(self.busy_s, 3), "throttled": self.throttled}


class Lane:
    """A thread pool that holds at most ``workers + queue`` requests (running or waiting), and admits them
    only while its ``budget`` (if any) has credit."""

    def __init__(self, name: str, workers: int, queue: int, budget: TimeBudget | None = None):
        self.name, self.capacity, self.budget = name, int(workers) + int(queue), budget
        self._executor = concurrent.futures.ThreadPoolExecutor(int(workers),
                                                               thread_name_prefix=f"vidsift-search-{name}")
        self._lock = threading.Lock()
        self.in_flight = 0
        self.refused = 0
        self.expired = 0

    async def run(self, fn: Callable[..., T], deadline: float, *args: Any) -> T:
        """``fn(*args)`` on a lane thread, awaited until the monotonic ``deadline``."""
        if self.budget is not None:
            await self._admit_by_budget()
        with self._lock:
            if self.in_flight >= self.capacity:
                self.refused += 1
                raise Overloaded(f"the service is busy: {self.in_flight} {self.name} searches are running or "
                                 f"queued (the limit is {self.capacity}); retry in a moment")
            self.in_flight += 1
        try:
            future = self._executor.submit(self._timed, fn, *args)
        except BaseException:
            self._release(None)
            raise
        future.add_done_callback(self._release)  # a place is freed when the work ends, not the answer
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), max(deadline - time.monotonic(), 0))
        except TimeoutError:
            future.cancel()  # still queued: it never runs
            with self._lock:
                self.expired += 1
            raise DeadlineExceeded("the search did not finish within the service's deadline; retry with "
                                   "a smaller k or fewer queries, or later") from None

    async def _admit_by_budget(self) -> None:
        """Return if the budget admits a request; else answer its refusal only once the refusal is over
        (:data:`MAX_REFUSAL_DELAY_S` at most): a client that retries at once, ignoring ``Retry-After``,
        waits anyway instead of making the service answer refusals in a busy loop. The wait is a timer on
        the event loop: no thread, no CPU."""
        try:
            self.budget.admit()
        except Overloaded as refused:
            delay = min(refused.wait_s, MAX_REFUSAL_DELAY_S)
            await asyncio.sleep(delay)
            refused.retry_after_s = max(1, math.ceil(refused.wait_s - delay))
            raise

    def _timed(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, its run time (on this thread, wall clock) paid to the budget however it ends."""
        start = time.monotonic()
        try:
            return fn(*args)
        finally:
            if self.budget is not None:
                self.budget.pay(time.monotonic() - start)

    def _release(self, _future) -> None:
        with self._lock:
            self.in_flight -= 1

    def status(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {"in_flight": self.in_flight, "capacity": self.capacity,
                                   "refused": self.refused, "expired": self.expired}
        if self.budget is not None:
            out["budget"] = self.budget.status()
        return out

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class SearchPool:
    """The light and heavy lanes (module docstring) and the deadline every search gets."""

    def __init__(self, config: PoolConfig = PoolConfig()):
        self.config = config
        self.light = Lane("light", config.light_workers, config.light_queue)
        budget = TimeBudget(config.heavy_share, config.heavy_burst_s) if config.heavy_share < 1 else None
        self.heavy = Lane("heavy", config.heavy_workers, config.heavy_queue, budget)

    async def run(self, ranked: int, fn: Callable[..., T], *args: Any) -> T:
        """``fn(deadline, *args)`` in the lane for a request ranking ``ranked`` videos; ``deadline`` is the
        monotonic time by which it must be done (a fan-out searcher gives it to its shards)."""
        deadline = time.monotonic() + self.config.deadline_s
        lane = self.light if ranked <= self.config.light_ranked else self.heavy
        return await lane.run(fn, deadline, deadline, *args)

    def status(self) -> dict[str, Any]:
        return {"deadline_s": self.config.deadline_s, "light": self.light.status(),
                "heavy": self.heavy.status()}

    def shutdown(self) -> None:
        self.light.shutdown()
        self.heavy.shutdown()

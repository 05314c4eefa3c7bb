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
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class Overloaded(Exception):
    """The lane is full: HTTP 503 with ``Retry-After``."""

    status = 503

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


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

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if name == "deadline_s":
                if not value > 0:
                    raise ValueError(f"search pool deadline_s must be > 0, got {value!r}")
            elif not isinstance(value, int) or value < (0 if name.endswith("_queue") else 1):
                raise ValueError(f"search pool {name} must be an integer >= "
                                 f"{0 if name.endswith('_queue') else 1}, got {value!r}")


class Lane:
    """A thread pool that holds at most ``workers + queue`` requests (running or waiting)."""

    def __init__(self, name: str, workers: int, queue: int):
        self.name, self.capacity = name, int(workers) + int(queue)
        self._executor = concurrent.futures.ThreadPoolExecutor(int(workers),
                                                               thread_name_prefix=f"vidsift-search-{name}")
        self._lock = threading.Lock()
        self.in_flight = 0
        self.refused = 0
        self.expired = 0

    async def run(self, fn: Callable[..., T], deadline: float, *args: Any) -> T:
        """``fn(*args)`` on a lane thread, awaited until the monotonic ``deadline``."""
        with self._lock:
            if self.in_flight >= self.capacity:
                self.refused += 1
                raise Overloaded(f"the service is busy: {self.in_flight} {self.name} searches are running or "
                                 f"queued (the limit is {self.capacity}); retry in a moment")
            self.in_flight += 1
        try:
            future = self._executor.submit(fn, *args)
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

    def _release(self, _future) -> None:
        with self._lock:
            self.in_flight -= 1

    def status(self) -> dict[str, int]:
        with self._lock:
            return {"in_flight": self.in_flight, "capacity": self.capacity, "refused": self.refused,
                    "expired": self.expired}

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class SearchPool:
    """The light and heavy lanes (module docstring) and the deadline every search gets."""

    def __init__(self, config: PoolConfig = PoolConfig()):
        self.config = config
        self.light = Lane("light", config.light_workers, config.light_queue)
        self.heavy = Lane("heavy", config.heavy_workers, config.heavy_queue)

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

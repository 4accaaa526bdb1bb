"""The one clock of a session: every timestamp in its metrics, and all pacing of its audio, read this clock.

`SessionClock()` runs in real time. `SessionClock(fast=True)` is a virtual clock that runs as fast as the compute
allows with the same timestamps: it follows the wall clock while anything registered as work is running (so
compute takes as long as it really takes), and when nothing is (every task is waiting for a later time: the next
input frame, the end of playout) it jumps straight to the earliest time someone waits for. A session replayed on it
produces the timeline it would have produced in real time, minus the idle waiting; tests and `chat --fast` use it.

Work is registered with `busy()` (a context manager, or `begin_work()` / `end_work()` around background jobs).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from contextlib import contextmanager
from collections.abc import Iterator

# How often the driver looks at the sleepers in real time, and how many idle looks in a row it needs before it
# jumps (each look yields to the event loop, so callbacks already scheduled run before time moves).
POLL_S = 0.001
IDLE_LOOKS = 3


class SessionClock:
    def __init__(self, fast: bool = False):
        self.fast = fast
        self._t0 = time.perf_counter()
        self._skipped = 0.0  # idle time jumped over (fast mode)
        self._work = 0
        self._lock = threading.Lock()  # work is registered from worker threads too
        self._sleepers: list[tuple[float, int, asyncio.Future]] = []
        self._seq = itertools.count()
        self._driver: asyncio.Task | None = None

    def now(self) -> float:
        """Seconds since the clock was made (plus the idle time skipped, on a fast clock)."""
        return time.perf_counter() - self._t0 + self._skipped

    # ---- work -----------------------------------------------------------------------------------------------
    def begin_work(self) -> None:
        with self._lock:
            self._work += 1

    def end_work(self) -> None:
        with self._lock:
            self._work -= 1
            if self._work < 0:  # pragma: no cover - a bug in the caller
                self._work = 0
                raise RuntimeError("end_work() without begin_work()")

    @contextmanager
    def busy(self) -> Iterator[None]:
        self.begin_work()
        try:
            yield
        finally:
            self.end_work()

    @property
    def working(self) -> bool:
        return self._work > 0

    # ---- waiting --------------------------------------------------------------------------------------------
    async def sleep_until(self, t: float) -> None:
        """Return once now() >= t."""
        if t <= self.now():
            await asyncio.sleep(0)
            return
        if not self.fast:
            await asyncio.sleep(t - self.now())
            return
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (t, next(self._seq), fut))
        if self._driver is None or self._driver.done():
            self._driver = asyncio.get_running_loop().create_task(self._drive())
        await fut

    async def sleep(self, seconds: float) -> None:
        await self.sleep_until(self.now() + seconds)

    async def _drive(self) -> None:
        idle = 0
        while True:
            while self._sleepers and self._sleepers[0][2].done():  # cancelled waiters
                heapq.heappop(self._sleepers)
            if not self._sleepers:
                return
            now = self.now()
            while self._sleepers and self._sleepers[0][0] <= now:
                _, _, fut = heapq.heappop(self._sleepers)
                if not fut.done():
                    fut.set_result(None)
                idle = 0
            if not self._sleepers:
                await asyncio.sleep(0)
                continue
            idle = 0 if self._work else idle + 1
            if idle >= IDLE_LOOKS:
                self._skipped += max(0.0, self._sleepers[0][0] - self.now())
                idle = 0
                continue
            await asyncio.sleep(0 if idle else min(POLL_S, self._sleepers[0][0] - now))

"""A clock for the request path's tests: time passes only when every task waits on it.

:class:`VirtualClock` is a :class:`genflow.engine.requesting.Clock` whose ``sleep`` ends when
virtual time reaches its end, and virtual time jumps to the earliest end once the event
loop has run every task that was ready. A test of backoffs, rate limits and timeouts
then checks what the runner did at which (virtual) time, exactly, whatever the
machine's load: nothing is measured by the wall clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator
from typing import Any

from genflow.engine.requesting import Clock

SETTLE = 200
"""Loop iterations let run before time moves on: far more than any chain of callbacks the
request path makes between two waits (a task ending, its slot handed on, the next one started)."""


class VirtualClock(Clock):
    def __init__(self) -> None:
        self.t = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._ticker: asyncio.Task[None] | None = None
        self.slept: list[float] = []
        """Every sleep asked for, in order (not the timeouts)."""

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        await self._wait(seconds)

    async def _wait(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.t + max(0.0, seconds), next(self._order), future))
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.ensure_future(self._tick())
        await future

    async def _tick(self) -> None:
        while self._sleepers:
            for _ in range(SETTLE):
                await asyncio.sleep(0)
            while self._sleepers and self._sleepers[0][2].done():  # a cancelled sleep
                heapq.heappop(self._sleepers)
            if not self._sleepers:
                return
            end, _, future = heapq.heappop(self._sleepers)
            self.t = max(self.t, end)
            future.set_result(None)

    @contextlib.asynccontextmanager
    async def timeout(self, seconds: float) -> AsyncIterator[Any]:
        async with asyncio.timeout(None) as deadline:
            async def expire() -> None:
                await self._wait(seconds)
                deadline.reschedule(asyncio.get_running_loop().time())

            watcher = asyncio.ensure_future(expire())
            try:
                yield deadline
            finally:
                watcher.cancel()


def run(coroutine: Any) -> Any:
    """``asyncio.run`` for a test's coroutine."""
    return asyncio.run(coroutine)

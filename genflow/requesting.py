"""The request path: an async plugin's calls on one event loop, with limits, retries and timeouts.

A request plugin (``async def generate(request)`` / ``async def score(item)``) talks
to an inference server or a hosted API. Its calls cost the worker almost no CPU, so
one event loop holds hundreds in flight; what bounds them is the server. This module
sends them the way a careful client does:

- at most ``concurrency`` in flight, an :class:`AdaptiveLimit` that halves on a 429
  and grows back by one per window of successes (additive increase, multiplicative
  decrease), so a server with a concurrency cap is used at its cap, not hammered;
- ``rpm`` and ``tpm`` as token buckets (:class:`RateLimit`);
- each attempt under ``timeout_s``; a :class:`~genflow.api.TransientError` (or a
  timeout) is sent again after an exponential backoff with full jitter, the
  server's ``Retry-After`` first, up to ``max_retries``;
- results come back one by one, as they are answered.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from genflow.api import Generator, RowError, TransientError
from genflow.config import RequestsSpec
from genflow.secrets import Scrubber, plugin_secrets
from genflow.secrets import install as install_secrets
from genflow.worker import Failure


class AdaptiveLimit:
    """A semaphore whose size moves: halved on a rate-limit answer, +1 per ``size`` successes.

    A 429 halves the size at most once per window of requests already in flight when it
    came, so a burst of 429s from one overload counts once. One event loop owns it, so it
    needs no lock: a request that finds room takes it without waiting, and a freed slot
    is handed straight to the longest waiter."""

    def __init__(self, ceiling: int) -> None:
        self.ceiling = ceiling
        self.size = ceiling
        self.in_flight = 0
        self._credit = 0
        self._sent = 0
        self._no_cut_before = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.rejections = 0
        self.smallest = ceiling

    async def acquire(self) -> int:
        """Wait for a slot; returns the request's ordinal (to tell which window a 429 belongs to)."""
        if self.in_flight >= self.size or self._waiters:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter  # the slot is ours once woken: release() counted it
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self.in_flight -= 1  # woken and cancelled at once: give the slot back
                    self._wake()
                elif waiter in self._waiters:
                    self._waiters.remove(waiter)
                raise
        else:
            self.in_flight += 1
        self._sent += 1
        return self._sent

    def _wake(self) -> None:
        while self._waiters and self.in_flight < self.size:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)

    async def release(self, ordinal: int, outcome: str) -> None:
        """``outcome``: ``ok``, ``rate_limited`` or ``other``."""
        self.in_flight -= 1
        if outcome == "rate_limited":
            self.rejections += 1
            if ordinal > self._no_cut_before:
                self.size = max(1, self.size // 2)
                self.smallest = min(self.smallest, self.size)
                self._credit = 0
                self._no_cut_before = self._sent
        elif outcome == "ok" and self.size < self.ceiling:
            self._credit += 1
            if self._credit >= self.size:
                self.size += 1
                self._credit = 0
        self._wake()


class RateLimit:
    """A token bucket of ``per_minute`` units, refilled continuously; it may go into debt when
    the cost is known only after the fact (tokens), and then holds new requests until repaid."""

    def __init__(self, per_minute: float) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, per_minute / 60.0)  # a second's worth: no burst of a minute at once
        self.level = self.capacity
        self.stamp = time.monotonic()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    async def take(self, units: float = 1.0) -> None:
        async with self._lock:
            while True:
                self._refill()
                if self.level >= min(units, self.capacity):
                    self.level -= units
                    return
                await asyncio.sleep((min(units, self.capacity) - self.level) / self.rate)

    def charge(self, units: float) -> None:
        """Units spent that were not taken up front (a request's tokens, known from its answer)."""
        self._refill()
        self.level -= units


@dataclass
class Answer:
    """One request's result (or :class:`Failure`), how long its last attempt took and its attempts."""

    index: int
    result: Any
    seconds: float
    attempts: int


def backoff(attempt: int, spec: RequestsSpec, retry_after: float | None, rng: random.Random) -> float:
    """Seconds before attempt ``attempt + 1``: full jitter over an exponential cap, at least
    what the server asked for."""
    cap = min(spec.max_backoff_s, spec.backoff_s * (2 ** attempt))
    delay = rng.uniform(0, cap)
    if retry_after is not None:
        delay = max(delay, min(retry_after, spec.max_backoff_s * 4))
    return delay


class RequestRunner:
    """Sends one stage's requests through a plugin's async call, within the stage's limits."""

    def __init__(self, call: Callable[[Any], Awaitable[Any]], spec: RequestsSpec, seed: int = 0) -> None:
        self.call, self.spec = call, spec
        self.limit = AdaptiveLimit(spec.concurrency)
        self.rpm = RateLimit(spec.rpm) if spec.rpm else None
        self.tpm = RateLimit(spec.tpm) if spec.tpm else None
        self.rng = random.Random(seed)
        self.retries = 0
        self.backing_off = 0
        self.stopped = False
        """Set by :meth:`stop_sending`: requests in flight finish, no new one starts."""

    def stop_sending(self) -> None:
        self.stopped = True

    async def one(self, index: int, item: Any) -> Answer:
        attempt = 0
        while True:
            if self.rpm is not None:
                await self.rpm.take()
            if self.tpm is not None:
                await self.tpm.take(0)  # waits while the bucket is in debt
            ordinal = await self.limit.acquire()
            started = time.perf_counter()
            outcome, retry_after = "other", None
            try:
                async with asyncio.timeout(self.spec.timeout_s):
                    result = await self.call(item)
                outcome = "ok"
                if self.tpm is not None:
                    self.tpm.charge(_tokens(result))
                return Answer(index, _as_result(result), time.perf_counter() - started, attempt + 1)
            except TransientError as exc:
                outcome = "rate_limited" if exc.rate_limited else "other"
                retry_after, error = exc.retry_after, f"{type(exc).__name__}: {exc}"
            except TimeoutError:
                error = f"TimeoutError: no answer within {self.spec.timeout_s:g}s"
            except RowError as exc:
                return Answer(index, Failure(str(exc), ""), time.perf_counter() - started, attempt + 1)
            except Exception as exc:
                return Answer(index, Failure(f"{type(exc).__name__}: {exc}", traceback.format_exc()),
                              time.perf_counter() - started, attempt + 1)
            finally:
                await self.limit.release(ordinal, outcome)
            if attempt >= self.spec.max_retries:
                return Answer(index, Failure(f"{error} (after {attempt + 1} attempts)", "", transient=True),
                              time.perf_counter() - started, attempt + 1)  # the next run sends it again
            attempt += 1
            self.retries += 1
            self.backing_off += 1  # holds no slot while it waits: another request may start
            try:
                await asyncio.sleep(backoff(attempt - 1, self.spec, retry_after, self.rng))
            finally:
                self.backing_off -= 1

    async def run(self, items: list[Any], most: int = 256) -> AsyncIterator[list[Answer]]:
        """Every item's answer as it arrives, in lists of what arrived together (at most
        ``most``): the caller waits for no more than the next answer. All items are answered
        exactly once, unless :meth:`stop_sending` ends the run early: then those started
        are answered and no other."""
        arrived: asyncio.Queue[Answer] = asyncio.Queue()
        waiting = iter(enumerate(items))
        tasks: set[asyncio.Task[Answer]] = set()
        started = 0
        self.stopped = False

        def start_more() -> None:
            """Start requests while the limit has room (plus those waiting out a backoff): a
            few more tasks than slots, not one per item, so a free slot wakes no crowd."""
            nonlocal started
            while not self.stopped and len(tasks) < self.limit.size + self.backing_off:
                try:
                    index, item = next(waiting)
                except StopIteration:
                    return
                started += 1
                task = asyncio.ensure_future(self.one(index, item))
                tasks.add(task)
                task.add_done_callback(deliver)

        def deliver(task: asyncio.Task[Answer]) -> None:
            tasks.discard(task)
            if not task.cancelled():
                arrived.put_nowait(task.result())
                start_more()

        start_more()
        answered = 0
        try:
            while answered < len(items) and not (self.stopped and answered == started):
                batch = [await arrived.get()]
                while not arrived.empty() and len(batch) < most:
                    batch.append(arrived.get_nowait())
                answered += len(batch)
                yield batch
        finally:
            for task in list(tasks):
                task.cancel()


def _as_result(result: Any) -> Any:
    return Failure(str(result), "") if isinstance(result, RowError) else result


def _tokens(result: Any) -> int:
    return sum(int(getattr(result, k, None) or 0) for k in ("prompt_tokens", "num_tokens", "completion_tokens"))


class RequestWorker:
    """Ray actor body for a request plugin (``async def generate`` / ``score``): one event loop,
    up to the stage's concurrency in flight, answers streamed back as they arrive.

    The actor reserves no CPU: waiting on a server costs none. One actor serves a stage for
    the whole job, so its limits (concurrency, rpm, tpm) hold across shards."""

    def __init__(self, factory: Any, model: str | None, params: dict[str, Any], requests: dict[str, Any],
                 seed: int = 0) -> None:
        self._parent = os.getppid()
        self._watching: asyncio.Task[None] | None = None
        install_secrets(Scrubber(plugin_secrets(factory, params)))  # this process's log lines quote servers
        self.plugin = factory(model, factory.Params.model_validate(params), "cpu")
        call = self.plugin.generate if issubclass(factory, Generator) else self.plugin.score
        self.runner = RequestRunner(call, RequestsSpec.model_validate(requests), seed)

    def describe(self) -> dict[str, Any]:
        return self.plugin.describe()

    async def run(self, items: list[Any]) -> Any:
        """Answers streamed back in lists of those that arrived together."""
        if self._watching is None:
            self._watching = asyncio.ensure_future(self._watch_parent())
        async for batch in self.runner.run(items):
            yield batch

    async def _watch_parent(self) -> None:
        """A worker whose raylet died (a local job killed with SIGKILL takes its Ray with it)
        stops at once: its answers would reach no one, and every request it sent would be
        paid for twice when the job runs again."""
        while True:
            await asyncio.sleep(0.1)
            if os.getppid() != self._parent:
                os._exit(1)

    def stop_sending(self) -> None:
        """Let the requests in flight finish and start no other (the job's budget is spent)."""
        self.runner.stop_sending()

    def stats(self) -> dict[str, Any]:
        limit = self.runner.limit
        return {"concurrency": limit.ceiling, "concurrency_now": limit.size, "concurrency_lowest": limit.smallest,
                "rate_limited": limit.rejections, "retries": self.runner.retries}

    async def close(self) -> None:
        closing = getattr(self.plugin, "aclose", None)
        if closing is not None:
            await closing()

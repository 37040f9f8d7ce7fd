"""The request path: an async plugin's calls on one event loop, with limits, retries and timeouts.

A request plugin (``async def generate(request)`` / ``async def score(item)``) talks
to an inference server or a hosted API. Its calls cost the worker almost no CPU, so
one event loop holds hundreds in flight; what bounds them is the server. This module
sends them the way a careful client does:

- at most ``concurrency`` in flight, an :class:`AdaptiveLimit` that halves on a 429
  and grows back by one per window of successes (additive increase, multiplicative
  decrease), so a server with a concurrency cap is used at its cap, not hammered;
- ``rpm`` and ``tpm`` as token buckets (:class:`RateLimit`);
- a plugin whose call sends several HTTP requests enters :func:`genflow.api.request_slot`
  around each, and the limits count those requests, not its calls;
- each attempt under ``timeout_s``; a :class:`~genflow.api.TransientError` (or a
  timeout) is sent again after an exponential backoff with full jitter, at least the
  server's ``Retry-After`` but never more than ``max_backoff_s`` (a longer, negative or
  unreadable one is capped and said once), up to ``max_retries``;
- under ``max_cost``, fewer requests in flight as the budget nears its end
  (:meth:`genflow.engine.budget.Budget.room`), none once it is spent;
- results come back one by one, as they are answered;
- an episode (:mod:`genflow.engine.episodes`) sends each of its turns as a request of its
  own, within the same limits, and hands back each answered turn as it comes (a *partial*
  :class:`Answer`) before its result; while its tools run it holds no slot, so more
  episodes than ``concurrency`` are in flight.

Time comes from a :class:`Clock`, so tests run the path on a fake one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import os
import random
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from genflow.api import _REQUEST_SLOTS, _RESPONSE_CACHE, Generator, RowError, TransientError
from genflow.config import PriceSpec, RequestsSpec
from genflow.data.results import Failure, failure_of
from genflow.data.turns import EpisodeRequest, Turn
from genflow.engine.batches import BatchRunner
from genflow.engine.budget import Budget, request_cost
from genflow.engine.cache import ResponseCache
from genflow.engine.episodes import EpisodeLoop, EpisodeSettings
from genflow.engine.tools import Toolbox, load_tools
from genflow.engine.users import UserSimulator
from genflow.registry import get_registry
from genflow.secrets import Scrubber, plugin_secrets
from genflow.secrets import install as install_secrets

log = logging.getLogger(__name__)


class Clock:
    """Time as the request path reads it; a test passes one whose ``sleep`` moves ``now`` by hand."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def timeout(self, seconds: float) -> contextlib.AbstractAsyncContextManager[Any]:
        """Cancels what it holds after ``seconds``, raising ``TimeoutError``."""
        return asyncio.timeout(seconds)


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

    def __init__(self, per_minute: float, clock: Clock | None = None) -> None:
        self.clock = clock or Clock()
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, per_minute / 60.0)  # a second's worth: no burst of a minute at once
        self.level = self.capacity
        self.stamp = self.clock.now()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self.clock.now()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    async def take(self, units: float = 1.0) -> None:
        async with self._lock:
            while True:
                self._refill()
                if self.level >= min(units, self.capacity):
                    self.level -= units
                    return
                await self.clock.sleep((min(units, self.capacity) - self.level) / self.rate)

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
    posts: int = 1
    """HTTP requests its answered attempt made (those the plugin held :func:`~genflow.api.request_slot`
    for; one for a plugin that holds none): what an answer without usage is priced by."""
    partial: bool = False
    """An episode's answered turn (``result`` a :class:`~genflow.data.turns.Turn`), not yet its result:
    the item is answered by a later, whole answer."""


def backoff(attempt: int, spec: RequestsSpec, retry_after: float | None, rng: random.Random) -> tuple[float, str]:
    """Seconds before attempt ``attempt + 1``, and what was done with the server's ``Retry-After``.

    Full jitter over an exponential cap (``backoff_s`` doubled per attempt, at most
    ``max_backoff_s``), at least what the server asked for, but never more than
    ``max_backoff_s``: a server asking for minutes (or a negative, infinite or unreadable
    wait) would park the row at no progress. The second value is ``""`` when the
    ``Retry-After`` (if any) was honoured as given, ``capped`` or ``ignored``."""
    cap = min(spec.max_backoff_s, spec.backoff_s * (2 ** attempt))
    delay = rng.uniform(0, cap)
    if retry_after is None:
        return delay, ""
    if not isinstance(retry_after, (int, float)) or not math.isfinite(retry_after) or retry_after < 0:
        return delay, "ignored"
    if retry_after > spec.max_backoff_s:
        return max(delay, spec.max_backoff_s), "capped"
    return max(delay, float(retry_after)), ""


class _CallSlots:
    """One call's share of the limits, for the HTTP requests it sends (:func:`genflow.api.request_slot`).

    The call holds one slot (and took one ``rpm`` unit) when it starts; its first request
    takes that slot over, and every other request waits for one of its own."""

    def __init__(self, runner: RequestRunner, ordinal: int) -> None:
        self.runner, self.ordinal = runner, ordinal
        self.holds = True
        """The call still holds the slot it started in (no request has taken it over)."""
        self.requests = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        runner = self.runner
        self.requests += 1
        if self.holds:
            self.holds = False
            ordinal = self.ordinal
        else:
            await runner._admit()
            ordinal = await runner.limit.acquire()
        outcome = "other"
        try:
            yield
            outcome = "ok"
        except TransientError as exc:
            outcome = "rate_limited" if exc.rate_limited else "other"
            raise
        finally:
            await runner.limit.release(ordinal, outcome)


class RequestRunner:
    """Sends one stage's requests through a plugin's async call, within the stage's limits."""

    def __init__(self, call: Callable[[Any], Awaitable[Any]], spec: RequestsSpec, seed: int = 0,
                 clock: Clock | None = None) -> None:
        self.call, self.spec = call, spec
        self.clock = clock or Clock()
        self.limit = AdaptiveLimit(spec.concurrency)
        self.rpm = RateLimit(spec.rpm, self.clock) if spec.rpm else None
        self.tpm = RateLimit(spec.tpm, self.clock) if spec.tpm else None
        self.rng = random.Random(seed)
        self.retries = 0
        self.backing_off = 0
        self.retry_after_capped = 0
        """Waits the server asked for that were longer than ``max_backoff_s``, or unreadable."""
        self.stopped = False
        """Set by :meth:`stop_sending`, or by a spent budget: requests in flight finish, no new one starts."""
        self.episodes: EpisodeLoop | None = None
        """Set for a generator whose items are episodes: each item's turns are sent by it."""
        self.tooling = 0
        """Episodes running their tools: they hold no slot, so others may start."""
        self._start_more: Callable[[], None] | None = None
        self.cache: ResponseCache | None = None
        """The job's response cache, handed to the plugin's calls (:func:`genflow.api.response_cache`)."""

    def stop_sending(self) -> None:
        self.stopped = True

    async def _admit(self) -> None:
        """Wait for the rate limits: an ``rpm`` unit, and the ``tpm`` bucket out of debt."""
        if self.rpm is not None:
            await self.rpm.take()
        if self.tpm is not None:
            await self.tpm.take(0)  # waits while the bucket is in debt

    @contextlib.contextmanager
    def off_slot(self) -> Iterator[None]:
        """An episode between two turns (running its tools): another item may start meanwhile."""
        self.tooling += 1
        if self._start_more is not None:
            self._start_more()
        try:
            yield
        finally:
            self.tooling -= 1

    async def episode(self, index: int, item: EpisodeRequest, emit: Callable[[Answer], None]) -> Answer:
        """An episode's turns, each sent as :meth:`one` sends a request and emitted as it is
        answered (a partial :class:`Answer`), then its result."""
        assert self.episodes is not None
        started, sent = self.clock.now(), 0
        chat = self.episodes.plugin.chat

        async def send_turn(request: Any, call: Callable[[Any], Awaitable[Any]] = chat) -> tuple[Any, float]:
            nonlocal sent  # ``call``: a simulated user's chat sends the user's turns the same way
            answer = await self.one(index, request, call)
            sent += answer.posts
            return answer.result, answer.seconds

        def turn_done(turn: Turn) -> None:
            emit(Answer(index, turn, turn.seconds, 1, partial=True))

        try:
            result = await self.episodes.run(item, send_turn, turn_done, self.off_slot)
        except Exception as exc:
            result = Failure(f"{type(exc).__name__}: {exc}", traceback.format_exc())
        return Answer(index, result, self.clock.now() - started, 1, max(1, sent))

    async def one(self, index: int, item: Any, call: Callable[[Any], Awaitable[Any]] | None = None) -> Answer:
        """One request's answer (``call``: the plugin's method to send it, by default the stage's)."""
        call = call or self.call
        attempt = 0
        while True:
            await self._admit()
            ordinal = await self.limit.acquire()
            started = self.clock.now()
            outcome, retry_after = "other", None
            slots = _CallSlots(self, ordinal)
            token = _REQUEST_SLOTS.set(slots)
            cache_token = _RESPONSE_CACHE.set(self.cache)
            try:
                async with self.clock.timeout(self.spec.timeout_s):
                    result = await call(item)
                outcome = "ok"
                if self.tpm is not None:
                    self.tpm.charge(_tokens(result))
                return Answer(index, _as_result(result), self.clock.now() - started, attempt + 1,
                              max(1, slots.requests))
            except TransientError as exc:
                outcome = "rate_limited" if exc.rate_limited else "other"
                retry_after, error = exc.retry_after, f"{type(exc).__name__}: {exc}"
            except TimeoutError:
                error = f"TimeoutError: no answer within {self.spec.timeout_s:g}s"
            except RowError as exc:
                return Answer(index, failure_of(exc), self.clock.now() - started, attempt + 1, max(1, slots.requests))
            except Exception as exc:
                return Answer(index, Failure(f"{type(exc).__name__}: {exc}", traceback.format_exc()),
                              self.clock.now() - started, attempt + 1)
            finally:
                _RESPONSE_CACHE.reset(cache_token)
                _REQUEST_SLOTS.reset(token)
                if slots.holds:
                    await self.limit.release(ordinal, outcome)
            if attempt >= self.spec.max_retries:
                return Answer(index, Failure(f"{error} (after {attempt + 1} attempts)", "", transient=True),
                              self.clock.now() - started, attempt + 1)  # the next run sends it again
            attempt += 1
            self.retries += 1
            delay, said = backoff(attempt - 1, self.spec, retry_after, self.rng)
            if said:
                self._say_retry_after(retry_after, said)
            self.backing_off += 1  # holds no slot while it waits: another request may start
            try:
                await self.clock.sleep(delay)
            finally:
                self.backing_off -= 1

    def _say_retry_after(self, asked: Any, what: str) -> None:
        self.retry_after_capped += 1
        if self.retry_after_capped == 1:
            log.warning("the server asked to wait %r s before sending again (Retry-After); %s: waiting at most "
                        "max_backoff_s (%g s), as every later such answer", asked,
                        "longer than max_backoff_s" if what == "capped" else "not a wait in seconds",
                        self.spec.max_backoff_s)

    async def run(self, items: list[Any], most: int = 256, budget: Budget | None = None,
                  price: PriceSpec | None = None) -> AsyncIterator[list[Answer]]:
        """Every item's answer as it arrives, in lists of what arrived together (at most
        ``most``): the caller waits for no more than the next answer. All items are answered
        exactly once, unless :meth:`stop_sending` or a spent ``budget`` ends the run early:
        then those started are answered and no other. An episode's turns come before its
        answer, as partial answers (:attr:`Answer.partial`).

        ``budget`` (the job's, as the driver counted it when it sent these items) gets each
        answer's cost with ``price`` as it arrives, and holds back requests as it nears its
        end (:meth:`~genflow.engine.budget.Budget.room`); the driver adds the same costs in the same
        order, so both find it spent at the same answer."""
        arrived: asyncio.Queue[Answer] = asyncio.Queue()
        waiting = iter(enumerate(items))
        tasks: set[asyncio.Task[Answer]] = set()
        started = 0
        self.stopped = False

        def start_more() -> None:
            """Start requests while the limit has room (plus those waiting out a backoff): a
            few more tasks than slots, not one per item, so a free slot wakes no crowd."""
            nonlocal started
            while (not self.stopped and len(tasks) < self.limit.size + self.backing_off + self.tooling
                   and (budget is None or budget.room(len(tasks)))):
                try:
                    index, item = next(waiting)
                except StopIteration:
                    return
                started += 1
                if self.episodes is not None and isinstance(item, EpisodeRequest):
                    task = asyncio.ensure_future(self.episode(index, item, arrived.put_nowait))
                else:
                    task = asyncio.ensure_future(self.one(index, item))
                tasks.add(task)
                task.add_done_callback(deliver)

        def deliver(task: asyncio.Task[Answer]) -> None:
            tasks.discard(task)
            if not task.cancelled():
                answer = task.result()
                if budget is not None:
                    cost, _ = request_cost(items[answer.index], answer.result, price, answer.posts)
                    budget.add(cost, sample=not isinstance(answer.result, Failure))
                arrived.put_nowait(answer)
                start_more()

        self._start_more = start_more
        start_more()
        answered = 0

        def more_to_come() -> bool:
            """An answer is on its way (with none in flight, whatever may start now is started:
            none may, once every item is sent, the sending is stopped or the budget spent)."""
            if answered == started:
                start_more()
            return answered < started

        try:
            while more_to_come():
                batch = [await arrived.get()]
                while not arrived.empty() and len(batch) < most:
                    batch.append(arrived.get_nowait())
                answered += sum(1 for answer in batch if not answer.partial)
                yield batch
        finally:
            self._start_more = None
            for task in list(tasks):
                task.cancel()


def load_toolbox(specs: Any) -> Toolbox | None:
    """The tools a generator's ``tools:`` names, from the installed tool plugins (None: no tools)."""
    return load_tools(specs, get_registry()) if specs else None


def _as_result(result: Any) -> Any:
    return failure_of(result) if isinstance(result, RowError) else result


def _tokens(result: Any) -> int:
    return sum(int(getattr(result, k, None) or 0) for k in ("prompt_tokens", "num_tokens", "completion_tokens"))


class RequestWorker:
    """Ray actor body for a request plugin (``async def generate`` / ``score``): one event loop,
    up to the stage's concurrency in flight, answers streamed back as they arrive.

    The actor reserves no CPU: waiting on a server costs none. One actor serves a stage for
    the whole job, so its limits (concurrency, rpm, tpm) hold across shards."""

    def __init__(self, factory: Any, model: str | None, params: dict[str, Any], requests: dict[str, Any],
                 seed: int = 0, episode: dict[str, Any] | None = None) -> None:
        self._parent = os.getppid()
        self._watching: asyncio.Task[None] | None = None
        install_secrets(Scrubber(plugin_secrets(factory, params)))  # this process's log lines quote servers
        self.plugin = factory(model, factory.Params.model_validate(params), "cpu")
        call = self.plugin.generate if issubclass(factory, Generator) else self.plugin.score
        self.runner = RequestRunner(call, RequestsSpec.model_validate(requests), seed)
        if self.runner.spec.cache:
            self.runner.cache = ResponseCache.open(self.runner.spec.cache)
        self.batches: BatchRunner | None = None
        """``requests.mode: batch``: the streams go through the provider's Batch API instead."""
        if self.runner.spec.mode == "batch":
            self.batches = BatchRunner(self.plugin, self.runner.spec,
                                       os.path.basename(self.runner.spec.batch_journal or ""), self.runner.cache)
        if episode is not None:  # {max_turns, max_episode_tokens, tools}: the stage's items are episodes
            self.runner.episodes = EpisodeLoop(self.plugin, load_toolbox(episode.get("tools")), EpisodeSettings(
                episode["max_turns"], episode.get("max_episode_tokens")),
                UserSimulator.load(episode["user"]) if episode.get("user") else None)

    def describe(self) -> dict[str, Any]:
        return self.plugin.describe()

    async def run(self, items: list[Any], budget: Budget | None = None, price: PriceSpec | None = None) -> Any:
        """Answers streamed back in lists of those that arrived together (``budget``: see
        :meth:`RequestRunner.run`)."""
        if self._watching is None:
            self._watching = asyncio.ensure_future(self._watch_parent())
        if self.batches is not None:  # the driver counts the budget; a batch is sent whole
            async for answers in self.batches.run(items):
                yield [Answer(*answer) for answer in answers]
            return
        async for batch in self.runner.run(items, budget=budget, price=price):
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

    def batch_progress(self) -> str:
        """Batch mode: the batches and their counts (the progress line's note)."""
        return self.batches.progress() if self.batches is not None else ""

    def stats(self) -> dict[str, Any]:
        limit = self.runner.limit
        stats = {"concurrency": limit.ceiling, "concurrency_now": limit.size, "concurrency_lowest": limit.smallest,
                 "rate_limited": limit.rejections, "retries": self.runner.retries}
        if self.runner.retry_after_capped:
            stats["retry_after_capped"] = self.runner.retry_after_capped
        if self.runner.cache is not None:  # answers not sent, and answers kept for later jobs
            stats["cache_hits"], stats["cache_writes"] = self.runner.cache.hits, self.runner.cache.writes
        if self.batches is not None:
            stats.update(self.batches.stats())
        return stats

    async def close(self) -> None:
        if self._watching is not None:  # else its loop, ended by ray.kill, logs "Task was destroyed but it is pending!"
            self._watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watching
            self._watching = None
        closing = getattr(self.plugin, "aclose", None)
        if closing is not None:
            await closing()

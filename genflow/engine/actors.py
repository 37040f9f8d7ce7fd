"""Scheduling on Ray: a job's fixed set of actors, hosting one plugin at a time, fed batches
from the driver, and the blame for a worker that dies.

Each actor (:class:`genflow.engine.worker.PluginWorker`) loads a stage's plugin once (its
model) and then answers that stage's batches; the next stage's plugin is loaded into
the same actors (:class:`Workers`). A batch whose call raises is split and retried
inside the actor until the failing rows are isolated, so one bad row costs an
``errors/`` row, not a batch. Ray itself is started by :mod:`genflow.engine.ray_cluster`.

A worker process that dies (segfault, ``os._exit``, out of memory, a lost node)
cannot isolate anything itself, so the pool does it: it starts a fresh actor in the
dead one's place and sends the batch again in two halves. The half holding the
row that kills the worker keeps dying and keeps being split until that row is
alone; a row alone in a batch whose worker has died more than ``ray.max_restarts``
times becomes an ``errors/`` row and the job goes on. A crash that does not repeat
(a one-off out-of-memory) costs one restart and no rows. Restarts are bounded per
pool by ``ray.max_worker_deaths``: past it the plugin is crashing on everything and
the stage stops with :class:`PluginCrashed` instead of grinding through restarts.
The pool restarts actors itself (Ray's own ``max_restarts`` is 0) so that every
death is seen, counted and blamed on the batch that was running.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from genflow.config import RaySpec, stable_hash
from genflow.data.results import Failure
from genflow.data.turns import add_turn
from genflow.engine import ray_cluster
from genflow.engine.errors import PoolStopped
from genflow.engine.worker import PluginWorker
from genflow.registry import PluginError

log = logging.getLogger(__name__)


@dataclass
class BatchResult:
    index: int
    """Which of the batches given to ``submit`` these items come from (a part of it after a split)."""
    items: list[Any]
    results: list[Any]
    seconds: float


class PluginCrashed(PluginError):
    """A plugin's worker processes died more often than ``ray.max_worker_deaths`` allows."""


class Ticket:
    """The answers to one :meth:`WorkerPool.submit`, as its batches (or parts of them) finish.

    The pool's pump fills it from its own thread; ``results`` hands them over in the
    order they finish and ends once every item is answered."""

    def __init__(self, items: int) -> None:
        self.left = items
        self.cancelled = False
        """The caller stopped listening: batches of this ticket not yet sent are dropped."""
        self._answers: queue.SimpleQueue[BatchResult | BaseException] = queue.SimpleQueue()

    def put(self, answer: BatchResult | BaseException) -> None:
        self._answers.put(answer)

    def results(self) -> Iterator[BatchResult]:
        try:
            while self.left > 0:
                answer = self._answers.get()
                if isinstance(answer, BaseException):
                    raise answer
                self.left -= len(answer.items)
                yield answer
        finally:
            if self.left > 0:
                self.cancelled = True


@dataclass
class _Work:
    """Items of one batch (or a part of one) and the worker deaths they were blamed for."""

    index: int
    items: list[Any]
    ticket: Ticket
    deaths: int = 0
    suspect: bool = False
    """Runs alone on its actor, so that if the actor dies it is certain who killed it."""


@dataclass
class _Call:
    work: _Work
    slot: int
    actor: Any
    started: float = field(default_factory=time.perf_counter)


def _death_reason(exc: BaseException) -> str:
    """The informative line of a Ray actor error (the constructor's exception, or why it died)."""
    text = str(exc)
    if "creation task" in text:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return lines[-1] if lines else text
    return text.split("\t")[0].split("\n")[0].strip()


def plugin_key(factory: type, model: str | None, params: dict[str, Any]) -> str:
    """What makes two loads of a plugin the same: its class, model and params."""
    return stable_hash([f"{factory.__module__}.{factory.__qualname__}", model, params])


class Workers:
    """A job's Ray actors: worker processes that host one plugin at a time.

    The stages of a job take turns on the same processes: a stage's plugin is loaded
    where the previous stage's was, whose model is freed first. A job so starts its
    worker processes, and imports torch in them, once rather than once per stage.
    Started on first use, or launched early (``genflow.runtime.session.JobSession.launch_workers``)."""

    def __init__(self, spec: RaySpec, size: int | None = None) -> None:
        self.spec, self.size = spec, size or spec.workers
        self.actors: list[Any] = []
        self.hosting: str | None = None
        """:func:`plugin_key` of the plugin the workers host (or are loading)."""
        self.description: dict[str, Any] | None = None
        self._plugin: tuple[type, str | None, dict[str, Any]] | None = None
        self._loading: list[Any] = []
        """Each worker's answer once it has loaded the plugin (its ``describe()``)."""
        self._actor_cls: Any = None

    def load(self, factory: type, model: str | None, params: dict[str, Any]) -> None:
        """Have every worker load this plugin, starting Ray and the workers if needed; returns at once."""
        key = plugin_key(factory, model, params)
        if self.actors and key == self.hosting:
            return
        self._plugin, self.hosting, self.description = (factory, model, params), key, None
        if self.actors:
            self._loading = [actor.load.remote(factory, model, params) for actor in self.actors]
            return
        ray_cluster.init_ray(self.spec)
        cpus = ray.available_resources().get("CPU", 1.0)
        per_actor = max(0.01, min(1.0, cpus / self.size)) if not self.spec.address else 1.0
        self._actor_cls = ray.remote(PluginWorker).options(
            num_cpus=per_actor, num_gpus=self.spec.gpus_per_worker, max_restarts=0, max_task_retries=0,
            **({"runtime_env": {"env_vars": ray_cluster.worker_env_vars()}} if self.spec.address else {}),
        )
        self.actors = [self.new_actor() for _ in range(self.size)]
        self._loading = [actor.describe.remote() for actor in self.actors]

    def wait_loaded(self) -> dict[str, Any]:
        """Block until every worker has loaded the plugin; its ``describe()``.

        Raises Ray's error when a worker failed to (its plugin's exception inside)."""
        if self._loading:
            loading, self._loading = self._loading, []
            try:
                self.description = ray.get(loading)[0]
            except (RayTaskError, RayActorError):
                self.hosting = None
                raise
        assert self.description is not None
        return self.description

    def new_actor(self) -> Any:
        """A fresh worker process hosting the current plugin (in a dead one's place)."""
        assert self._plugin is not None
        return self._actor_cls.remote(*self._plugin)

    def stop(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors, self._loading, self.hosting, self.description = [], [], None, None

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class WorkerPool:
    """One plugin on a job's :class:`Workers`: batches in, results out, dead workers replaced.

    Batches are sent by a pump thread of the pool's own, which keeps every worker at
    ``in_flight_per_actor`` calls: batches of several :meth:`submit` calls queue behind
    each other, so a stage hands the next shards' batches over before it writes the
    current shards' parts, and the workers never wait at a shard's boundary."""

    in_flight_per_actor = 2

    def __init__(self, factory: type, model: str | None, params: dict[str, Any], spec: RaySpec,
                 name: str, workers: Workers | None = None) -> None:
        self.factory, self.model, self.params, self.spec, self.name = factory, model, params, spec, name
        self.workers = workers or Workers(spec)
        self._own_workers = workers is None
        self.description: dict[str, Any] | None = None
        self.deaths = 0
        """Worker processes that died under this pool (each one replaced)."""
        self.start_seconds = 0.0
        """How long the stage waited in ``start`` for its plugin to load (for the first stage also
        Ray's start and the worker processes', unless they were launched early)."""
        self._ready = False
        self._lock = threading.Lock()
        """Guards the queue of batches not sent yet and the actors' replacement."""
        self._queue: deque[_Work] = deque()
        self._wake = threading.Event()
        self._pump: threading.Thread | None = None
        self._closing = False
        self._broken: BaseException | None = None
        self._stopped = False

    @property
    def actors(self) -> list[Any]:
        return self.workers.actors

    def launch(self) -> None:
        """Have the workers load this plugin, without waiting."""
        self.workers.load(self.factory, self.model, self.params)

    def start(self) -> None:
        """Launch if needed and wait until every worker has loaded this plugin."""
        if self._ready:
            return
        if self._stopped:
            raise PoolStopped(f"{self.name}: the stage stopped")
        started = time.perf_counter()
        self.launch()
        try:  # a model that cannot load fails here
            self.description = self.workers.wait_loaded()
        except (RayTaskError, RayActorError) as exc:
            self.workers.stop()
            cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause else _death_reason(exc)
            raise PluginError(f"{self.name}: the plugin failed to load: {cause}") from None
        self._ready = True
        self.start_seconds = time.perf_counter() - started

    def batch_keys(self, items: Sequence[Any]) -> list[Any] | None:
        """The plugin's ``batch_keys`` for ``items``, worked out on the workers, a share each.

        None when the plugin raises or its worker dies: the caller then keeps its own
        order (the calls still run; a row that breaks the plugin fails there, alone)."""
        if not items:
            return []
        self.start()
        with self._lock:
            actors = list(self.actors)
        share = -(-len(items) // len(actors))
        shares = [list(items[i:i + share]) for i in range(0, len(items), share)]
        refs = [actor.keys.remote(part) for actor, part in zip(actors, shares, strict=False)]
        keys: list[Any] = []
        problem = None
        for slot, (ref, part) in enumerate(zip(refs, shares, strict=False)):
            try:
                got = ray.get(ref)
            except RayActorError as exc:
                with self._lock:
                    self._replace(slot, actors[slot], exc, len(part))
                problem = f"its worker died ({_death_reason(exc)})"
                continue
            except RayTaskError as exc:
                problem = f"{type(exc.cause).__name__}: {exc.cause}" if exc.cause else str(exc)
                continue
            if len(got) != len(part):
                problem = f"it returned {len(got)} keys for {len(part)} items"
            keys += got
        if problem:
            log.warning("%s: batch_keys failed (%s); batching in the shard's own order", self.name, problem)
            return None
        return keys

    def stop(self) -> None:
        """The stage is done: the pump ends; workers of the pool's own stop, a job's stay for its next stage."""
        self._ready = False
        self._closing = True
        self._stopped = True  # a pack's task still sending gets PoolStopped, not a model loaded again
        self._wake.set()
        if self._pump is not None:
            self._pump.join(timeout=30)
            self._pump = None
        if self._own_workers:
            self.workers.stop()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _replace(self, slot: int, dead: Any, exc: BaseException, batch_rows: int) -> None:
        """Start a fresh actor in a dead one's place (called holding ``_lock``); a death counts once."""
        if self.actors[slot] is not dead:
            return  # already replaced (seen dying by the pump and by batch_keys)
        self.deaths += 1
        if self.deaths > self.spec.max_worker_deaths:
            self.workers.stop()
            raise PluginCrashed(
                f"{self.name}: worker processes died {self.deaths} times (last on a batch of {batch_rows} "
                f"rows: {_death_reason(exc)}); the plugin keeps crashing. Fix it, or raise "
                f"ray.max_worker_deaths ({self.spec.max_worker_deaths}) and rerun to go on.")
        ray.kill(dead, no_restart=True)
        self.actors[slot] = self.workers.new_actor()

    def submit(self, batches: Sequence[list[Any]]) -> Ticket:
        """Queue every batch for the workers at once and return; the :class:`Ticket` has the answers,
        as batches (or parts of them) finish: every item exactly once, a result or a :class:`Failure`."""
        ticket = Ticket(sum(len(b) for b in batches))
        if not ticket.left:
            return ticket
        self.start()
        with self._lock:
            if self._broken is not None:
                raise self._broken
            self._queue.extend(_Work(i, list(b), ticket) for i, b in enumerate(batches))
            if self._pump is None:
                self._closing = False
                self._pump = threading.Thread(target=self._run_pump, name=f"genflow-pump-{self.name}",
                                              daemon=True)
                self._pump.start()
        self._wake.set()
        return ticket

    def _run_pump(self) -> None:
        running: dict[Any, _Call] = {}
        try:
            self._pumping(running)
            stopped: BaseException = PoolStopped(f"{self.name}: the stage stopped before these calls were answered")
        except BaseException as exc:  # PluginCrashed, a plugin that cannot load again, Ray gone
            stopped = exc
            with self._lock:
                self._broken = exc
        with self._lock:  # what is still queued or running gets no answer now: its ticket ends
            waiting = {id(w.ticket): w.ticket for w in self._queue}
            waiting.update({id(c.work.ticket): c.work.ticket for c in running.values()})
            self._queue.clear()
        for ticket in waiting.values():
            ticket.put(stopped)

    def _pumping(self, running: dict[Any, _Call]) -> None:
        load = [0] * len(self.actors)
        alone = [False] * len(self.actors)  # the actor runs a suspect batch: send it nothing else

        def send() -> None:
            with self._lock:
                while self._queue:
                    work = self._queue[0]
                    if work.ticket.cancelled:
                        self._queue.popleft()
                        continue
                    cap = 1 if work.suspect else self.in_flight_per_actor
                    free = [i for i in range(len(self.actors)) if not alone[i] and load[i] < cap]
                    if not free:
                        return
                    slot = min(free, key=lambda i: load[i])
                    self._queue.popleft()
                    actor = self.actors[slot]
                    running[actor.call.remote(work.items)] = _Call(work, slot, actor)
                    load[slot] += 1
                    alone[slot] = work.suspect

        def finish(ref: Any) -> _Call:
            call = running.pop(ref)
            load[call.slot] -= 1
            alone[call.slot] = False
            return call

        while not self._closing:
            send()
            if not running:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            # Short waits, so that batches queued meanwhile reach a worker with a free slot soon.
            done, _ = ray.wait(list(running), num_returns=1, timeout=0.02)
            if not done:
                continue
            call = finish(done[0])
            try:
                results = ray.get(done[0])
            except RayActorError as exc:
                self._after_death(call, exc, running, finish)
                continue
            except RayTaskError as exc:  # the call itself broke (e.g. results that cannot be pickled)
                cause = exc.cause if exc.cause else exc
                results = [Failure(f"{type(cause).__name__}: {cause}", str(exc)) for _ in call.work.items]
            _answer(call, results)

    def _after_death(self, call: _Call, exc: RayActorError, running: dict[Any, _Call],
                     finish: Callable[[Any], _Call]) -> None:
        """An actor died: settle every call it had, blame the batch that killed it, replace it.

        With one batch on the actor the blame is certain: the batch is split in halves (or,
        alone, retried or given up). With several it is not, so they all go back to the
        queue unblamed, to run one per actor; the next death then names its batch.
        """
        if getattr(exc, "actor_init_failed", False):
            self.workers.stop()
            raise PluginError(f"{self.name}: the plugin failed to load on a restarted worker: "
                              f"{_death_reason(exc)}") from None
        mine = [ref for ref, c in running.items() if c.actor is call.actor]
        failed = [call]
        if mine:  # calls the actor finished before dying still count; the rest died with it
            ray.wait(mine, num_returns=len(mine), timeout=30)
            for ref in mine:
                other = finish(ref)
                try:
                    results = ray.get(ref, timeout=0)
                except (RayActorError, GetTimeoutError):
                    failed.append(other)
                    continue
                _answer(other, results)
        with self._lock:
            self._replace(call.slot, call.actor, exc, sum(len(c.work.items) for c in failed))
        reason = _death_reason(exc)
        retry: list[_Work]
        if len(failed) > 1:
            log.warning("%s: a worker died with %d batches on it (%s); retrying them one at a time",
                        self.name, len(failed), reason)
            retry = [dataclasses.replace(c.work, suspect=True) for c in failed]
        else:
            work = call.work
            work.deaths += 1
            if len(work.items) > 1:
                log.warning("%s: a worker died on a batch of %d rows (%s); retrying it in halves",
                            self.name, len(work.items), reason)
                half = len(work.items) // 2
                retry = [dataclasses.replace(work, items=work.items[:half], suspect=True),
                         dataclasses.replace(work, items=work.items[half:], suspect=True)]
            elif work.deaths <= self.spec.max_restarts:
                log.warning("%s: a worker died on a single row (%s); retrying it", self.name, reason)
                retry = [dataclasses.replace(work, suspect=True)]
            else:
                msg = f"WorkerDied: the worker process died {work.deaths} times on this row ({reason})"
                work.ticket.put(BatchResult(work.index, work.items, [Failure(msg, str(exc))],
                                            time.perf_counter() - call.started))
                return
        with self._lock:
            self._queue.extendleft(reversed(retry))


def _answer(call: _Call, results: list[Any]) -> None:
    work = call.work
    work.ticket.put(BatchResult(work.index, work.items, results, time.perf_counter() - call.started))



def request_key(pool: RequestPool) -> str:
    """What makes two request workers the same: their stage, plugin, model, params and limits
    (a job's session hands a stage the one it launched early only if it is the same)."""
    return stable_hash([pool.name, plugin_key(pool.factory, pool.model, pool.params), pool.requests,
                        pool.spec.model_dump(mode="json"), pool.episode])


def chunked(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


class RequestPool:
    """A request plugin's stage on one low-CPU actor: requests in, answers streamed back.

    The actor (:class:`genflow.engine.requesting.RequestWorker`) lives for the stage, across its
    shards, so the stage's limits hold for the whole job. A worker that dies is replaced
    and sent the requests it had not answered, up to ``ray.max_worker_deaths`` times."""

    def __init__(self, factory: type[Any], model: str | None, params: dict[str, Any], spec: RaySpec,
                 name: str, requests: dict[str, Any], seed: int = 0, episode: dict[str, Any] | None = None) -> None:
        self.factory, self.model, self.params, self.spec, self.name = factory, model, params, spec, name
        self.requests, self.seed = requests, seed
        self.episode = episode
        """A multi-turn generator's episode settings (``max_turns``, ``max_episode_tokens``, ``tools``)."""
        self.actor: Any = None
        self.description: dict[str, Any] | None = None
        self.deaths = 0
        self.start_seconds = 0.0
        self.stats: dict[str, Any] = {}
        self.stopping = False
        self._ready: Any = None
        self._lock = threading.Lock()

    def _new_actor(self) -> Any:
        from genflow.engine.requesting import RequestWorker

        env = {}
        if self.spec.address:  # a cluster's workers do not share the driver's environment
            secret_names = self.factory.secret_env(self.factory.Params.model_validate(self.params))
            env = {**ray_cluster.worker_env_vars(), **{k: os.environ[k] for k in secret_names if k in os.environ}}
        actor_cls = ray.remote(RequestWorker).options(
            num_cpus=0, max_restarts=0, max_task_retries=0, max_concurrency=4,
            **({"runtime_env": {"env_vars": env}} if env else {}))
        return actor_cls.remote(self.factory, self.model, self.params, self.requests, self.seed, self.episode)

    def launch(self) -> None:
        """Start Ray and the request worker without waiting for it to be ready."""
        if self.actor is None:
            ray_cluster.init_ray(self.spec)
            self.actor = self._new_actor()
            self._ready = self.actor.describe.remote()

    def start(self) -> None:
        if self.description is not None:
            return
        started = time.perf_counter()
        self.launch()
        try:
            self.description = ray.get(self._ready)
        except (RayTaskError, RayActorError) as exc:
            self.actor = None
            cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause else _death_reason(exc)
            raise PluginError(f"{self.name}: the plugin failed to load: {cause}") from None
        self.start_seconds = time.perf_counter() - started

    def submit(self, items: list[Any], budget: Any = None, price: Any = None) -> RequestTicket:
        """Send ``items`` to the request worker now; the ticket streams their answers, lists of
        :class:`genflow.engine.requesting.Answer` (``index`` into ``items``), every item exactly once.

        The worker runs every stream it is given under the stage's one set of limits, so
        the next shards' requests start while the current shards' answers are written.
        ``budget`` (a :class:`genflow.engine.budget.Budget` the caller keeps counting) and ``price``
        go with each stream, as the budget stands then: the worker slows and stops by it."""
        return RequestTicket(self, items, budget, price)

    def _stream(self, items: list[Any], budget: Any = None, price: Any = None) -> tuple[Any, Any]:
        """A streaming ``run`` of ``items`` on the current worker: (the worker, the stream)."""
        actor = self.actor
        return actor, actor.run.options(num_returns="streaming").remote(items, budget, price)

    def _died(self, actor: Any, exc: RayActorError, unanswered: int) -> None:
        """A stream's worker died: replace it (once, whichever of its streams saw it first)."""
        with self._lock:
            if self.actor is not actor:
                return
            self.deaths += 1
            if self.deaths > self.spec.max_worker_deaths:
                raise PluginCrashed(f"{self.name}: its request worker died {self.deaths} times "
                                    f"({_death_reason(exc)})") from None
            log.warning("%s: the request worker died (%s); sending its %d unanswered requests again",
                        self.name, _death_reason(exc), unanswered)
            self.actor = self._new_actor()
            self._ready = self.actor.describe.remote()

    def batch_progress(self) -> str:
        """Batch mode: the worker's batches and their counts, for the progress line ("" otherwise)."""
        if self.requests.get("mode") != "batch" or self.actor is None:
            return ""
        return str(ray.get(self.actor.batch_progress.remote(), timeout=10))

    def stop_sending(self) -> None:
        """The requests in flight finish (``answers`` still yields them), no new one is sent."""
        self.stopping = True
        if self.actor is not None:
            ray.get(self.actor.stop_sending.remote(), timeout=30)

    def stop(self) -> None:
        self.stopping = True  # a stream still read ends instead of sending again to a new worker
        if self.actor is None:
            return
        try:
            self.stats = ray.get(self.actor.stats.remote(), timeout=10)
            ray.get(self.actor.close.remote(), timeout=10)
        except (RayTaskError, RayActorError, GetTimeoutError):
            pass
        ray.kill(self.actor)
        self.actor, self.description, self._ready = None, None, None

    def __enter__(self) -> RequestPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RequestTicket:
    """The answers to one :meth:`RequestPool.submit`: its requests are on their way from the
    start; ``results`` streams the answers and sends what a dying worker left unanswered again."""

    def __init__(self, pool: RequestPool, items: list[Any], budget: Any = None, price: Any = None) -> None:
        self.pool, self.budget, self.price = pool, budget, price
        self.left = dict(enumerate(items))
        self._first: tuple[list[int], Any, Any] | None = None
        if self.left:
            pool.start()
            pool.stopping = False
            order = list(self.left)
            self._first = (order, *pool._stream([self.left[i] for i in order], budget, price))

    def results(self) -> Iterator[list[Any]]:
        """Lists of answers as they arrive; an episode's answered turns (partial answers) come
        before its answer, and a worker that dies sends each episode on from its last one."""
        pool, left = self.pool, self.left
        while left and not pool.stopping:
            if self._first is not None:
                (order, actor, stream), self._first = self._first, None
            else:
                order = list(left)
                actor, stream = pool._stream([left[i] for i in order], self.budget, self.price)
            try:
                for ref in stream:
                    batch = ray.get(ref)
                    for answer in batch:
                        answer.index = order[answer.index]
                        if answer.partial:
                            left[answer.index] = add_turn(left[answer.index], answer.result)
                        else:
                            del left[answer.index]
                    yield batch
                if left and not pool.stopping:
                    raise RuntimeError(f"{pool.name}: the request worker's stream ended with {len(left)} "
                                       "requests unanswered")
            except RayActorError as exc:
                pool._died(actor, exc, len(left))
            finally:
                if left:  # the caller stopped early (a spent budget) or the worker died: stop sending
                    try:
                        ray.cancel(stream)
                    except Exception as exc:  # a dead actor's stream has nothing left to cancel
                        log.debug("%s: cancelling the request stream: %s", pool.name, exc)

"""Ray execution: a fixed pool of actors per plugin, fed batches from the driver.

Each actor builds its plugin once (the model loads in the constructor) and then
answers batches. A batch whose call raises is split and retried inside the actor
until the failing rows are isolated, so one bad row costs an ``errors/`` row, not
a batch. An actor that dies (segfault, out of memory) is restarted by Ray, up to
``max_restarts`` times, and its batch is sent again.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from genflow.api import RowError
from genflow.config import RaySpec

log = logging.getLogger(__name__)


@dataclass
class Failure:
    """A row that could not be processed: the error and where it came from."""

    error: str
    traceback: str


def init_ray(spec: RaySpec) -> None:
    """Start Ray locally, or connect to ``spec.address`` (``auto``, ``ray://host:port``)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                              "log_to_driver": True}
    if spec.address:
        try:
            ray.init(address=spec.address, **kwargs)
        except ConnectionError as exc:
            raise ConnectionError(f"cannot connect to the Ray cluster at {spec.address!r}: {exc}") from None
    else:
        ray.init(**kwargs)


class PluginWorker:
    """Ray actor body: one plugin instance, many batches."""

    def __init__(self, factory: Any, model: str | None, params: dict[str, Any]) -> None:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
        gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
        device = "cuda" if gpu_ids else "cpu"
        self.kind = "generator" if hasattr(factory, "generate") else "scorer"
        self.plugin = factory(model, factory.Params.model_validate(params), device)

    def describe(self) -> dict[str, Any]:
        return self.plugin.describe()

    def call(self, items: list[Any]) -> list[Any]:
        return self._call(items)

    def _call(self, items: list[Any]) -> list[Any]:
        method = self.plugin.generate if self.kind == "generator" else self.plugin.score
        try:
            results = method(items)
            if len(results) != len(items):
                raise RuntimeError(f"{type(self.plugin).__name__} returned {len(results)} results "
                                   f"for {len(items)} inputs")
        except Exception as exc:
            if len(items) == 1:
                return [Failure(f"{type(exc).__name__}: {exc}", traceback.format_exc())]
            half = len(items) // 2
            return self._call(items[:half]) + self._call(items[half:])
        return [Failure(str(r), "") if isinstance(r, RowError) else r for r in results]


@dataclass
class BatchResult:
    index: int
    items: list[Any]
    results: list[Any]
    seconds: float


class WorkerPool:
    """A fixed pool of ``PluginWorker`` actors, started on first use."""

    def __init__(self, factory: type, model: str | None, params: dict[str, Any], spec: RaySpec,
                 name: str, workers: int | None = None) -> None:
        self.factory, self.model, self.params, self.spec, self.name = factory, model, params, spec, name
        self.size = workers or spec.workers
        self.actors: list[Any] = []
        self.description: dict[str, Any] | None = None

    @property
    def started(self) -> bool:
        return bool(self.actors)

    def start(self) -> None:
        if self.actors:
            return
        init_ray(self.spec)
        cpus = ray.available_resources().get("CPU", 1.0)
        per_actor = max(0.01, min(1.0, cpus / self.size)) if not self.spec.address else 1.0
        actor_cls = ray.remote(PluginWorker).options(
            num_cpus=per_actor, num_gpus=self.spec.gpus_per_worker,
            max_restarts=self.spec.max_restarts, max_task_retries=0,
        )
        self.actors = [actor_cls.remote(self.factory, self.model, self.params) for _ in range(self.size)]
        try:
            self.description = ray.get(self.actors[0].describe.remote())
        except RayTaskError as exc:
            self.stop()
            cause = exc.cause if getattr(exc, "cause", None) else exc
            raise RuntimeError(f"{self.name}: the plugin failed to load: {cause}") from None

    def stop(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def map(self, batches: Sequence[list[Any]], in_flight_per_actor: int = 2) -> Iterator[BatchResult]:
        """Run every batch on the pool; yield results as batches finish."""
        if not batches:
            return
        self.start()
        queue = list(range(len(batches)))[::-1]
        attempts = [0] * len(batches)
        running: dict[Any, tuple[int, int, float]] = {}  # ref -> (batch index, actor index, start)
        load = [0] * len(self.actors)

        def submit() -> None:
            while queue:
                actor_i = min(range(len(self.actors)), key=lambda i: load[i])
                if load[actor_i] >= in_flight_per_actor:
                    return
                b = queue.pop()
                ref = self.actors[actor_i].call.remote(batches[b])
                running[ref] = (b, actor_i, time.perf_counter())
                load[actor_i] += 1

        submit()
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            ref = done[0]
            b, actor_i, started = running.pop(ref)
            load[actor_i] -= 1
            try:
                results = ray.get(ref)
            except RayActorError as exc:  # the actor died: Ray restarts it; send the batch again
                attempts[b] += 1
                if attempts[b] > self.spec.max_restarts:
                    msg = f"worker died {attempts[b]} times on this batch: {exc}"
                    results = [Failure(msg, "") for _ in batches[b]]
                else:
                    log.warning("%s: a worker died (%s); retrying its batch", self.name, exc)
                    queue.append(b)
                    submit()
                    continue
            yield BatchResult(b, batches[b], results, time.perf_counter() - started)
            submit()


def chunked(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


PoolFactory = Callable[[], WorkerPool]

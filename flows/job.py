"""The genflow job flow: plan shards, generate, score, rank and export.

Prefect sees coarse tasks, one per (stage, pack of shards); inside each task the
pack's rows stream through a Ray actor pool that holds the plugin's model. A pack
is one shard, or consecutive small shards whose items share calls (shards are the
unit of resume, not of a call). Stages run one after another so only one model
pool is alive at a time.

What Prefect records is the work as it ran. A pack's task run reads its shards'
inputs, sends their calls and writes their parts: it starts when its calls are
sent and ends when its last part is written. The flow starts the next pack's task
(``task.submit``, the flow's thread pool) as soon as the current one's calls are
out, before it waits for the current one, so the workers (or a server's request
slots) never wait at a pack's boundary, and the two task runs overlap in the
timeline exactly as their work does (none overlap where a budget is counted from
the answers). A task run waits for (``wait_for``) the task runs that wrote what it
reads: generate for ``plan-shards``, score for the generate task runs of its
shards, rank for their score task runs; shards finished by an earlier run have
none. No other argument links tasks: the job's context goes to Prefect quoted
(it holds the input's folder, a value ``plan-shards`` returned), so the run graph
draws plan-shards -> generate -> score -> rank. Flow runs carry the tags
``genflow``, ``job:<name>`` and ``plugin:<name>`` (:func:`job_tags`), task runs
``stage:<stage>`` and ``plugin:<name>`` of their stage.

Resume. What a (stage, shard) has done is recorded with its output: a marker under
``<output>/_state/`` holding the stage fingerprint (the shard's rows plus the stage
config) and the parts it wrote (see :mod:`genflow.stages`). The flow reads the
marker before it submits a task, so finished work costs no task run, no Ray and
no model load, and a changed config redoes exactly the stages whose fingerprint
changed (new scorer params: scores and rankings, not generations).

Prefect's own result cache is deliberately off (``NO_CACHE``), although a cache
key from the fingerprint would be easy to write:

- its records live in Prefect's result store (a folder on the machine that ran the
  task, or a storage block), not with the outputs. A record outlives the parts it
  stands for, so a cache hit could skip a task whose output was deleted; a rerun
  on another machine, or one that writes to a new output, would not see it.
  A marker is checked against the parts themselves.
- a cache hit is still a task run: resuming a job of thousands of shards would
  create thousands of runs to learn nothing. Skipping in the flow creates none.
- a task's inputs hold an actor pool and a progress bar, which Prefect cannot
  hash; a hand-written key would repeat the fingerprint logic in a second place.

Task runs are named ``<stage>-<shard>-<fingerprint>`` (a pack:
``<stage>-<first>-<last>-<fingerprint of the first>``) so a run in the Prefect UI
matches its markers. Every task takes its arguments in one order: the job's context,
the stage, the shard (or pack), the fingerprint its marker will hold, then what runs it.
``retries`` cover what may pass (a storage hiccup); bad input, a plugin that
cannot load or keeps crashing fail at once. A job that fails or is stopped (Ctrl-C)
mid-stage stops its packs under way and their pool before it ends: no task thread is
left sending.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from prefect import Task, flow, get_client, get_run_logger, tags, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.context import FlowRunContext
from prefect.futures import PrefectConcurrentFuture
from prefect.states import State
from prefect.utilities.annotations import quote

from genflow.api import Scorer
from genflow.config import ConfigError, JobConfig, job_secrets, redacted_urls
from genflow.data import layout
from genflow.data.layout import Shard, ShardPlan, Stage
from genflow.data.prompts import InputError, open_input
from genflow.data.resume import DoneIndex, StageOutcome, drop_unused_parts, finished
from genflow.data.storage import Storage, disk_full
from genflow.engine.actors import RequestPool, Workers
from genflow.engine.errors import JobFailed, PoolStopped
from genflow.engine.ray_cluster import RayUnreachable
from genflow.engine.tools import tool_columns
from genflow.labelling import labels as human_labels
from genflow.outputs.agreement import scorer_agreement
from genflow.outputs.artifacts import publish_job_artifacts, stage_tags
from genflow.outputs.dataset_card import write_card_safely
from genflow.outputs.events import on_job_failure
from genflow.outputs.manifest import build_manifest, rows_of
from genflow.outputs.report import write_report_safely
from genflow.registry import PluginError, Registry, get_registry
from genflow.runtime.progress import StageProgress
from genflow.runtime.session import JobSession, flow_session
from genflow.runtime.shutdown import lost_api_reported, prefect_api_busy, prefect_api_lost, shown_api_url
from genflow.secrets import install as install_secrets
from genflow.stages import (
    JobContext,
    ModelStage,
    Pack,
    generate_work,
    input_candidates_shard,
    job_exporters,
    plan_shards,
    rank_shard,
    score_work,
)
from genflow.stages.common import Budget, Pool
from genflow.stages.filter import filter_candidates, filter_prompts

NOT_PREFECTS = (ConfigError, InputError, PluginError, RayUnreachable, JobFailed, PoolStopped)
"""A task's errors that are the job's, not Prefect's: no retry fixes them, nor running without Prefect."""


def worth_retrying(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry what may pass (storage, network); not what a retry cannot fix."""
    if isinstance(state.data, BaseException) and disk_full(state.data):
        return False  # a full disk stays full for the next attempt
    return not isinstance(state.data, NOT_PREFECTS)


TASK_OPTIONS: dict[str, Any] = {"cache_policy": NO_CACHE, "retries": 2, "retry_delay_seconds": 1,
                                "retry_condition_fn": worth_retrying}
PACK_NAME = "{stage.run_name}-{shards}-{fingerprint}"
"""A task's consecutive shards (``3``, or ``3-9``) and its first shard's fingerprint."""


@task(name="plan-shards", cache_policy=NO_CACHE)
def plan_task(config: JobConfig, storage: Storage, resume: bool, part_folders: list[str]) -> tuple[list[Shard], str]:
    source = open_input(config.input, **config.storage.model_dump())
    shards = plan_shards(config, source, storage, resume, part_folders)
    get_run_logger().info("%d prompts in %d shards of up to %d", sum(s.rows for s in shards), len(shards),
                          config.shard_rows)
    return shards, source.base_dir


@task(name="generate", task_run_name=PACK_NAME, **TASK_OPTIONS)
def generate_task(job: JobContext, stage: ModelStage, shards: str, fingerprint: str, pack: Pack) -> list[StageOutcome]:
    return [_logged(stage.stage, o) for o in pack.collect()]


@task(name="score", task_run_name=PACK_NAME, **TASK_OPTIONS)
def score_task(job: JobContext, stage: ModelStage, shards: str, fingerprint: str, pack: Pack) -> list[StageOutcome]:
    return [_logged(stage.stage, o) for o in pack.collect()]


@task(name="input-candidates", task_run_name=PACK_NAME, **TASK_OPTIONS)
def input_task(job: JobContext, stage: Stage, shards: str, fingerprint: str,
               group: list[tuple[Shard, str]]) -> list[StageOutcome]:
    return [input_candidates_shard(job, shard, fp) for shard, fp in group]


@task(name="rank", task_run_name=PACK_NAME, **TASK_OPTIONS)
def rank_task(job: JobContext, stage: Stage, shards: str, fingerprint: str, group: list[tuple[Shard, str]],
              exporters: dict[str, dict[str, Any]]) -> list[StageOutcome]:
    registry = get_registry()
    return [rank_shard(job, shard, fp, exporters, registry) for shard, fp in group]


CHEAP_ROWS = 1024
"""Prompts a task of a stage without a model (input candidates, rank) takes at least: small
shards share a task run, each still written and marked on its own."""


Runs = dict[int, list[State[Any]]]
"""By shard: the completed task runs that wrote it in a stage (what a later stage's task waits for)."""


def _run_cheap_stage(lost: threading.Event, job: JobContext, stage: Stage, plans: list[tuple[Shard, str]], done: Any,
                     run: Task[Any, Any], *extra: Any, upstream: Runs) -> tuple[list[StageOutcome], Runs]:
    outcomes: dict[int, StageOutcome] = {}
    runs: Runs = {}
    todo = _undone(stage, plans, done, outcomes)
    for group in pack_shards(todo, 1, CHEAP_ROWS):
        call = TaskCall(lost, run, job, stage, pack_name(group), group[0][1], group, *extra,
                        wait_for=_upstream(upstream, group))
        for outcome in call.result():
            outcomes[outcome.shard] = outcome
        runs.update(call.runs(shard for shard, _ in group))
    return [outcomes[shard.index] for shard, _ in plans], runs


def _upstream(upstream: Runs, group: list[tuple[Shard, str]]) -> list[State[Any]]:
    """The task runs that wrote what a group of shards reads (none for shards finished before)."""
    return [state for shard, _ in group for state in upstream.get(shard.index, ())]


def _joined(into: Runs, runs: Runs) -> None:
    for shard, states in runs.items():
        into.setdefault(shard, []).extend(states)


def _undone(stage: Stage, plans: list[tuple[Shard, str]], done: Any,
            outcomes: dict[int, StageOutcome]) -> list[tuple[Shard, str]]:
    """The (shard, fingerprint) pairs not finished before; the outcomes of those that were go into ``outcomes``."""
    todo = []
    for shard, fp in plans:
        finished_before = done(stage, shard, fp)
        if finished_before:
            outcomes[shard.index] = finished_before
        else:
            todo.append((shard, fp))
    return todo


def pack_name(group: list[tuple[Shard, str]]) -> str:
    """``3``, or ``3-9`` for consecutive shards 3 to 9: the ``{shards}`` of a task run's name."""
    first, last = group[0][0].index, group[-1][0].index
    return f"{first}" if first == last else f"{first}-{last}"


def _logged(stage: Stage, outcome: StageOutcome) -> StageOutcome:
    """A line per shard written, naming its stage (a pack's shard's seconds: its share of the pack's)."""
    rows = ", ".join(f"{n} {folder}" for folder, n in outcome.rows.items())
    get_run_logger().info("%s shard %d: %s, %d errors in %.1fs", stage.name, outcome.shard, rows, outcome.errors,
                          outcome.seconds)
    return outcome


def model_stages(config: JobConfig, registry: Registry) -> list[ModelStage]:
    """The job's generators, then its scorers: the stages that run a plugin on the workers."""
    stages = [ModelStage(layout.generate_stage(g.label), g, registry.get("generator", g.plugin))
              for g in config.generators]
    return stages + [ModelStage(layout.score_stage(s.name), s, registry.get("scorer", s.plugin))
                     for s in config.scorers]


def run_stages(session: JobSession) -> dict[str, Any]:
    """The job's recipe; returns the manifest. Its model stages take turns on one set of workers
    (those the session launched early, or new ones)."""
    with session.take_workers() as workers:
        return _run_stages(session, workers)


def _run_stages(session: JobSession, workers: Workers) -> dict[str, Any]:
    t0 = time.perf_counter()
    config, storage, resume, lost = session.config, session.storage, session.resume, session.api_lost
    registry = get_registry()
    stages = model_stages(config, registry)
    exporters = job_exporters(config, registry) if config.scorers else {}
    every_exporter = {p.name for p in registry.all() if p.kind == "exporter"}
    timings: dict[str, float] = {}

    # Plan: the input cut into shards; what this config no longer has is removed.
    folders = [*layout.CORE_FOLDERS, *sorted(every_exporter | set(exporters)), layout.ERRORS]
    planning = TaskCall(lost, plan_task, config, storage, resume, folders)
    shards, base_dir = planning.result()
    planned: Runs = planning.runs(shards)  # what a generate task waits for: the prompts' parts it wrote
    drop_unused_parts(storage, set(layout.generator_labels(config)), {s.name for s in config.scorers},
                      set(exporters), every_exporter)
    read = frozenset(c for s in stages for c in s.factory.input_columns)
    read |= frozenset(c for g in config.generators if g.max_turns > 1 for c in tool_columns(g.tools, registry))
    job = JobContext(config, storage, base_dir, read, Budget(config.max_cost))
    index = DoneIndex(storage) if resume else None  # what earlier runs finished, listed once
    unhashed = {s.stage.name: s.factory.unhashed_params for s in stages}
    # Filters of prompts: what they leave out is not generated for (genflow.stages.filter).
    kept, prompt_filtering = filter_prompts(job, shards, index, registry)
    plans = [layout.plan_shard(shard, config, exporters, unhashed) for shard in kept]
    outcomes: list[StageOutcome] = list(prompt_filtering.outcomes)
    timings["plan"] = time.perf_counter() - t0

    def done(stage: Stage, shard: Shard, fingerprint: str) -> StageOutcome | None:
        return finished(storage, stage, shard, fingerprint, index) if index else None

    # Generate, then score: a stage at a time on the workers, a task per shard not done yet.
    plugins: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    written: Runs = {}  # by shard, the task runs that wrote its candidates: its score tasks wait for them
    scored: Runs = {}  # and those that scored them: its rank task waits for them
    if not config.generators:  # the rows' own candidates
        own = layout.generate_stage(layout.INPUT_LABEL)
        with tags(*stage_tags(own.name)):
            own_outcomes, written = _run_cheap_stage(lost, job, own, [(p.shard, p.generate[0][1]) for p in plans],
                                                     done, input_task, upstream=planned)
            outcomes += own_outcomes
    candidate_filtering = None
    for stage in stages:
        if stage.stage.kind == "score" and candidate_filtering is None:  # filters of candidates, before scoring
            plans, candidate_filtering = filter_candidates(job, plans, index, registry)
            outcomes += candidate_filtering.outcomes
        t = time.perf_counter()
        pool = stage.pool(config, workers)
        if isinstance(pool, RequestPool):
            pool = session.request_pool(pool)  # the one launched early for the job's first stage, if it is
        generating = stage.stage.kind == "generate"
        stage_outcomes, runs = _run_model_stage(lost, job, stage, plans, outcomes, pool, done,
                                                planned if generating else written)
        outcomes += stage_outcomes
        _joined(written if generating else scored, runs)
        plugins[stage.label] = stage_manifest(stage, pool.description)
        if isinstance(pool, RequestPool) and pool.stats:
            plugins[stage.label]["requests"] = pool.stats
        if stage.plugin.kind == "scorer":
            metrics.update(_summarize(storage, stage))
        timings[stage.stage.name] = time.perf_counter() - t
        if pool.start_seconds:
            timings[f"start/{stage.stage.name}"] = pool.start_seconds  # waiting for the model loads

    if candidate_filtering is None:  # a job without scorers: its candidates are still filtered
        plans, candidate_filtering = filter_candidates(job, plans, index, registry)
        outcomes += candidate_filtering.outcomes

    # Rank and export: cheap, no Ray.
    if config.scorers:
        t = time.perf_counter()
        with tags(*stage_tags(layout.RANK_STAGE.name, exporters)):
            ranks = [(p.shard, p.rank[1]) for p in plans if p.rank is not None]
            outcomes += _run_cheap_stage(lost, job, layout.RANK_STAGE, ranks, done, rank_task, exporters,
                                         upstream=scored)[0]
        timings["rank"] = time.perf_counter() - t

    timings["total"] = time.perf_counter() - t0
    errors = sum(o.errors for o in outcomes)
    work = sum(o.work_items for o in outcomes if o.stage != layout.RANK_STAGE.name)
    fraction = errors / work if work else 0.0
    status = "failed" if fraction > config.max_error_fraction else "completed"
    manifest = build_manifest(config, storage, outcomes, plugins, metrics, timings, status,
                              rows=rows_of(outcomes, sum(s.rows for s in shards), exporters),
                              requires=sorted({d for s in stages for d in s.factory.requires}))
    manifest["errors"] = {"rows": errors, "work_items": work, "fraction": round(fraction, 6),
                          "max_error_fraction": config.max_error_fraction,
                          "transient": sum(o.transient for o in outcomes)}  # the next run sends these again
    manifest["output"] = storage.uri
    manifest["input_dir"] = base_dir  # what relative paths in the rows are relative to
    manifest["exporters"] = {name: {"source": (info := registry.get("exporter", name)).source,
                                    "version": info.version, "params": params}
                             for name, params in exporters.items()}
    if len(config.scorers) > 1:  # how the scorers' rankings of each prompt agree, read shard by shard
        manifest["agreement"] = scorer_agreement(storage, [s.index for s in shards],
                                                 {s.name: s.weight for s in config.scorers})
    manifest = human_labels.refresh(storage, manifest)  # people's rows and agreement, from what was pulled
    manifest = redacted_urls(manifest)  # a URL's user:password, wherever a plugin or the config put one
    storage.write_json(layout.MANIFEST, manifest)
    report = write_report_safely(storage, manifest)  # logs a warning on failure; never fails the job
    write_card_safely(storage, manifest)  # README.md: the folder as a Hugging Face dataset, one config a folder
    publish_job_artifacts(storage, manifest, report)  # the run's counts, summary and report link in Prefect
    return manifest


def _run_model_stage(lost: threading.Event, job: JobContext, stage: ModelStage, plans: list[ShardPlan],
                     before: list[StageOutcome], pool: Pool, done: Any,
                     upstream: Runs) -> tuple[list[StageOutcome], Runs]:
    """One generator's or scorer's tasks, a pack of shards each; shards finished before are skipped.
    Returns the outcomes and, by shard, the task run that wrote it.

    The next pack's task starts as soon as the current one's calls are out, before the
    current one is waited for, so the workers never wait for a shard's parts to be written;
    at most one pack is ahead (none where a budget is counted from the answers)."""
    generating = stage.stage.kind == "generate"
    run = generate_task if generating else score_task
    per_row = _items_per_row(job.config, stage)
    if generating:
        total = sum(p.shard.rows for p in plans) * per_row
    else:
        total = sum(o.rows.get(layout.GENERATIONS, 0) for o in before if o.stage.startswith("generate/"))
    outcomes: dict[int, StageOutcome] = {}
    runs: Runs = {}
    cost = (lambda: job.budget.spent) if stage.spec.price is not None else None
    size = stage.call_size(job.config)
    make = generate_work if generating else score_work
    note = pool.batch_progress if isinstance(pool, RequestPool) and pool.requests.get("mode") == "batch" else None
    with pool, StageProgress(f"{stage.stage.kind} {stage.label}", total, cost=cost, note=note) as bar, \
            tags(*stage_tags(stage.stage.name, [stage.spec.plugin])):  # on each task run of the stage
        todo = _undone(stage.stage, [(p.shard, dict(p.stages())[stage.stage]) for p in plans], done, outcomes)
        job.budget.add(sum(o.cost for o in outcomes.values()), sample=False)  # max_cost covers the output
        for plan in plans:
            if plan.shard.index in outcomes:  # finished before
                bar.skip(plan.shard.rows * per_row if generating else outcomes[plan.shard.index].work_items)
        groups = pack_shards(todo, per_row, pack_items(stage, job.config, pool))

        def works(group: list[tuple[Shard, str]]) -> Any:
            return lambda: [make(job, stage, shard, fp) for shard, fp in group]  # read in the pack's task

        def finish(pack: Pack, call: TaskCall) -> None:
            for outcome in call.result():
                outcomes[outcome.shard] = outcome
            runs.update(call.runs(w.shard for w in pack.works))

        ahead = 0 if isinstance(pool, RequestPool) and job.budget.max_cost is not None else 1
        under_way: deque[tuple[Pack, TaskCall]] = deque()
        try:
            for group in groups:
                pack = Pack(stage, works(group), pool, size, bar.advance, job.budget)
                call = TaskCall(lost, run, job, stage, pack_name(group), group[0][1], pack,
                                wait_for=_upstream(upstream, group))
                under_way.append((pack, call))
                if not _sent(pack, call):  # its task run ended before it began (a busy API): tried again now
                    finish(*under_way.pop())
                    continue
                while len(under_way) > ahead:
                    finish(*under_way.popleft())
            while under_way:
                finish(*under_way.popleft())
        except BaseException:
            _stop(under_way, pool)
            raise
    return [outcomes[p.shard.index] for p in plans], runs


def _sent(pack: Pack, call: TaskCall) -> bool:
    """Wait until the pack's calls are out, from its task run (without Prefect, sent here and collected
    at its turn); False if its task run ended without beginning its work."""
    if call.future is None:
        pack.send()
        return True
    while not pack.sent.wait(0.05):
        if call.ended():
            return pack.sent.is_set()
    return True


STOP_WAIT_S = 30.0
"""How long a stage that failed or was interrupted waits for its packs' task runs to end, once their
pool is stopped (each ends at its next answer, or at once)."""


def _stop(under_way: deque[tuple[Pack, TaskCall]], pool: Pool) -> None:
    """A stage that failed or was interrupted: its packs under way send nothing more, its pool stops
    (which ends what waits on the workers), and their task runs end before the stage does."""
    for pack, _ in under_way:
        pack.cancel()
    pool.stop()
    for _, call in under_way:
        call.wait_ended(STOP_WAIT_S)


def _items_per_row(config: JobConfig, stage: ModelStage) -> int:
    """About how many items a prompt makes for the stage: its samples, or the candidates scored."""
    if stage.stage.kind == "generate":
        return stage.spec.samples  # type: ignore[union-attr]
    return max(1, sum(g.samples for g in config.generators)) if config.generators else 1


PACK_CALLS_PER_WORKER = 4
"""Calls a pack holds per worker: the two in flight on each worker, and two more waiting in the
pool's queue while the next pack's ``batch_keys`` come back from behind those in flight."""


def pack_items(stage: ModelStage, config: JobConfig, pool: Pool) -> int:
    """Items a pack of shards should hold: enough to keep every worker's calls queued while the
    next pack is made (:data:`PACK_CALLS_PER_WORKER`), or every request slot of a server stage busy."""
    if isinstance(pool, RequestPool):
        return int(stage.spec.requests.concurrency)
    return stage.call_size(config) * max(1, config.ray.workers) * PACK_CALLS_PER_WORKER


def pack_shards(todo: list[tuple[Shard, str]], per_row: int, items: int) -> list[list[tuple[Shard, str]]]:
    """Consecutive shards grouped until a group holds ``items`` (a larger shard is a group alone)."""
    groups: list[list[tuple[Shard, str]]] = []
    held = items
    for entry in todo:
        if held >= items:
            groups.append([])
            held = 0
        groups[-1].append(entry)
        held += entry[0].rows * per_row
    return groups


API_BUSY_PAUSES_S = (2.0, 4.0, 8.0)
"""Pauses before each new try of a task that the Prefect API failed with a 5xx (busy: its SQLite
locked under load answers 503 to a task's concurrency slots). Prefect's client has retried the
request itself by then (``PREFECT_CLIENT_MAX_RETRIES``)."""


class TaskCall:
    """One task run of the flow, started at once beside the flow (``task.submit``, the flow's thread
    pool) and waited for by :meth:`result`; once the Prefect API is gone, its function runs
    without Prefect instead.

    A shared Prefect server that restarts, or a local API that dies, then costs Prefect's
    record of the rest of the run (one line says so), not the job: the work is genflow's.
    A busy API (a 5xx) gets the task tried again after each of ``API_BUSY_PAUSES_S``; one
    still busy then is left as a lost one is. Trying again is safe: a task's function skips
    the shards it has finished, and has run no further than Prefect let it. ``lost`` is the
    session's flag (``JobSession.api_lost``): set, the job's remaining tasks run without Prefect.

    ``wait_for``: the completed task runs whose output this one reads, Prefect's record of
    what it waited on. The job's context goes to Prefect quoted: it holds the input's folder,
    a value ``plan-shards`` returned, which would link every task to plan-shards."""

    def __init__(self, lost: threading.Event, run: Task[Any, Any], *args: Any,
                 wait_for: Sequence[State[Any]] = ()) -> None:
        self.lost, self.run, self.args = lost, run, args
        self.wait_for = list({s.state_details.task_run_id: s for s in wait_for}.values())  # once each
        self.state: State[Any] | None = None
        """Its final state, once it completed under Prefect: what a task reading its output waits for."""
        self.future: PrefectConcurrentFuture[Any] | None = None if lost.is_set() else self._submit()

    def _submit(self) -> PrefectConcurrentFuture[Any]:
        args = [quote(a) if isinstance(a, JobContext) else a for a in self.args]
        future = self.run.submit(*args, wait_for=self.wait_for)
        assert isinstance(future, PrefectConcurrentFuture)  # the flow's task runner: a thread pool
        return future

    def ended(self) -> bool:
        """Whether its task run is over (or it has none yet: it runs in :meth:`result`)."""
        return self.future is None or self.future.wrapped_future.done()

    def wait_ended(self, timeout: float) -> None:
        if self.future is not None:
            concurrent.futures.wait([self.future.wrapped_future], timeout)

    def runs(self, shards: Any) -> Runs:
        """Its completed task run for each of ``shards`` (none without Prefect)."""
        return {shard.index: [self.state] for shard in shards} if self.state is not None else {}

    def result(self) -> Any:
        future, self.future = self.future, None
        for pause in (*API_BUSY_PAUSES_S, None):
            if self.lost.is_set():
                break
            try:
                future = future or self._submit()
                value = future.result()
                self.state = future.state
                return value
            except NOT_PREFECTS:
                raise
            except Exception as exc:
                future = None
                busy = prefect_api_busy(exc)
                if busy is None and not prefect_api_lost():
                    raise
                if busy is not None and pause is not None:
                    logging.getLogger(__name__).info("the Prefect API (%s) is busy (HTTP %d): task %s tried again "
                                                     "in %g s", shown_api_url(), busy, self.run.name, pause)
                    time.sleep(pause)
                    continue
                _go_on_without_prefect(self.lost, busy)
        return self.run.fn(*self.args)


def _go_on_without_prefect(lost: threading.Event, busy: int | None) -> None:
    """Run the rest of the job's tasks without Prefect, saying why in one line."""
    lost.set()
    message = "the job goes on without Prefect; Prefect's record of this run stops here"
    if busy is None:
        logging.getLogger(__name__).warning(lost_api_reported(message))
    else:
        logging.getLogger(__name__).warning("the Prefect API (%s) stayed busy (HTTP %d on %d tries of a task): %s",
                                            shown_api_url(), busy, len(API_BUSY_PAUSES_S) + 1, message)


def stage_manifest(stage: ModelStage, description: dict[str, Any] | None) -> dict[str, Any]:
    """What the manifest records of a generator or scorer: its plugin, where it came from, its model
    (``description``: the plugin's ``describe()``, None when no shard needed it loaded)."""
    info, spec = stage.plugin, stage.spec
    entry: dict[str, Any] = {"kind": info.kind, "plugin": spec.plugin, "source": info.source,
                             "version": info.version}
    if info.kind == "scorer":
        entry["weight"] = spec.weight  # type: ignore[union-attr]
    entry["loaded"] = description is not None
    default = info.factory.default_model if info.kind == "scorer" else None  # as the stage loads it
    entry["model"] = description or {"model": spec.model or default}
    return entry


def _summarize(storage: Storage, stage: ModelStage) -> dict[str, Any]:
    factory: type[Scorer] = stage.factory
    if factory.summarize.__func__ is Scorer.summarize.__func__:  # type: ignore[attr-defined]
        return {}
    import pyarrow as pa

    parts = [p for p in storage.list(layout.SCORES, ".parquet")
             if (name := layout.parse_part(p)) is not None and name.label == stage.label]
    if not parts:
        return {}
    table = pa.concat_tables([storage.read_table(p) for p in parts])
    if "generator" not in table.column_names:  # which generator made each candidate (pass@k of each)
        made_by: dict[str, str] = {}
        for part in storage.list(layout.GENERATIONS, ".parquet"):
            made = storage.read_table(part).select(["generation_id", "generator"]).to_pydict()
            made_by.update(zip(made["generation_id"], made["generator"], strict=True))
        table = table.append_column("generator", pa.array([made_by.get(g) for g in
                                                            table["generation_id"].to_pylist()], pa.string()))
    return {stage.label: factory.summarize(table, factory.Params.model_validate(stage.spec.params))}


def job_tags(config: JobConfig) -> list[str]:
    """The tags of a job's flow runs and deployment, to filter them on in Prefect: ``genflow``,
    ``job:<name>`` and ``plugin:<name>`` for each of its generators' and scorers' plugins."""
    plugins = sorted({g.plugin for g in config.generators} | {s.plugin for s in config.scorers})
    return ["genflow", f"job:{config.name}", *(f"plugin:{p}" for p in plugins)]


def _tag_flow_run(config: JobConfig) -> None:
    """Give this flow run the job's tags (:func:`job_tags`): ``genflow run`` and a sweep's runs start
    it with none, a deployment's with the deployment's. A task run's tags stay its stage's."""
    context = FlowRunContext.get()
    run = context.flow_run if context is not None else None
    if run is None:
        return
    wanted = sorted(set(run.tags) | set(job_tags(config)))
    if wanted == sorted(run.tags):
        return
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(run.id, tags=wanted)
    except Exception as exc:  # a lost or busy API: its tasks say so
        logging.getLogger(__name__).debug("the flow run's tags were not set: %s", exc)


@flow(name="genflow-job", log_prints=False, validate_parameters=False, on_failure=[on_job_failure])
def genflow_job(config: dict[str, Any], resume: bool = True, config_source: dict[str, Any] | None = None,
                session: str | None = None) -> dict[str, Any]:
    """Run one genflow job from its config mapping (as in the YAML file).

    Prefect records the parameters, so ``config`` may have its secrets hidden (``***``):
    ``session`` is then the key of the job's session in this process (``genflow run``, a sweep),
    which holds the real config, validated, with its storage and lease; a deployment's run has
    none here, and builds its own from ``config`` and ``config_source`` (the config file to read
    the secrets back from). See ``genflow.runtime.session``."""
    with flow_session(config, resume, config_source, session) as job:
        install_secrets(job_secrets(job.config))  # what servers send back is scrubbed of them: rows, logs, Prefect
        _tag_flow_run(job.config)
        manifest = run_stages(job)
    errors = manifest["errors"]
    if manifest["status"] == "failed":
        raise JobFailed(f"{errors['rows']} of {errors['work_items']} rows failed "
                        f"({errors['fraction']:.1%} > max_error_fraction {job.config.max_error_fraction:.1%}); "
                        f"see {job.storage.uri_of(layout.ERRORS)}", manifest)
    return manifest

"""What every stage of a shard does alike: read its inputs, call the plugin, write parts and a marker."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyarrow as pa

from genflow.api import GenerationRequest, Plugin, RowError, ScoreItem, sends_requests
from genflow.config import GeneratorSpec, JobConfig, PriceSpec, ScorerSpec, request_settings
from genflow.data import layout
from genflow.data.filtered import without_left_out
from genflow.data.journal import Journal
from genflow.data.layout import Shard, Stage, resolve_input_path
from genflow.data.results import Failure, failure_of, scrub_result
from genflow.data.resume import StageOutcome, mark_finished
from genflow.data.schemas import ERRORS, GENERATIONS, SCORES
from genflow.data.storage import Storage
from genflow.data.turns import Turn, turn_key, with_turns
from genflow.engine.actors import RequestPool, WorkerPool, chunked
from genflow.engine.budget import Budget, priced, reported_tokens, request_cost
from genflow.engine.errors import BudgetSpent, PoolStopped
from genflow.registry import PluginInfo, Registry

log = logging.getLogger(__name__)

Advance = Callable[[int], None]
Item = TypeVar("Item", GenerationRequest, ScoreItem)
Pool = WorkerPool | RequestPool
COUNTING = threading.Lock()
"""Held while a pack adds to the job's :class:`Budget`: a stage's packs run in task threads of their own."""


@dataclass(frozen=True)
class JobContext:
    """What every (stage, shard) of a job reads: its config, its storage and its input's place."""

    config: JobConfig
    storage: Storage
    base_dir: str
    """The input's folder: relative paths in the rows' path columns are relative to it."""
    read_columns: frozenset[str] = frozenset()
    """Input columns the job's plugins read: not carried through to ``generations/``."""
    budget: Budget = field(default_factory=lambda: Budget(None), compare=False)


@dataclass(frozen=True)
class ModelStage:
    """A generator or scorer of the job: its stage, its config entry and its plugin."""

    stage: Stage
    spec: GeneratorSpec | ScorerSpec
    plugin: PluginInfo = field(compare=False)

    @property
    def factory(self) -> type[Any]:
        """The class that does the stage's work (the plugin's ``implementation`` for its params)."""
        return self.plugin.factory.implementation(self.spec.params)

    @property
    def per_prompt(self) -> bool:
        return bool(getattr(self.factory, "per_prompt", False))

    @property
    def label(self) -> str:
        return self.stage.label

    @property
    def run_name(self) -> str:
        return self.stage.run_name

    @property
    def sends_requests(self) -> bool:
        """On the request path: a request plugin, or a local model's episodes (its turns journaled)."""
        return sends_requests(self.factory) or episode_settings(self.spec) is not None

    def pool(self, config: JobConfig, workers: Any) -> Pool:
        """Where the stage runs: the job's workers (a local model), or a request worker of its own
        (not started yet: the job's session may hand over one it launched early instead)."""
        spec = self.spec
        if self.sends_requests:
            return RequestPool(self.factory, spec.model, spec.params, config.ray, self.label,
                               request_settings(spec, config.output), config.seed, episode_settings(spec))
        return WorkerPool(self.factory, spec.model, spec.params, config.ray, self.label, workers)

    def call_size(self, config: JobConfig) -> int:
        """Items per Ray call: the stage's ``batch_size``, else ``ray.batch_size``, else the plugin's own."""
        return call_size(self.spec.batch_size, config, self.factory)


def episode_settings(spec: GeneratorSpec | ScorerSpec) -> dict[str, Any] | None:
    """A multi-turn generator's episode settings for its request worker (None: one answer a request)."""
    if not isinstance(spec, GeneratorSpec) or spec.max_turns < 2:
        return None
    return {"max_turns": spec.max_turns, "max_episode_tokens": spec.max_episode_tokens,
            "tools": [tool.model_dump() for tool in spec.tools],
            **({"user": spec.user.model_dump()} if spec.user is not None else {})}


def unhashed_params_of(config: JobConfig, registry: Registry) -> dict[str, tuple[str, ...]]:
    """Each generator's and scorer's plugin's ``unhashed_params``, by stage name (for fingerprints)."""
    out = {layout.generate_stage(g.label).name:
           registry.get("generator", g.plugin).factory.implementation(g.params).unhashed_params
           for g in config.generators}
    out.update({layout.score_stage(s.name).name:
                registry.get("scorer", s.plugin).factory.implementation(s.params).unhashed_params
                for s in config.scorers})
    return out


def retry_sources(config: JobConfig, registry: Registry) -> tuple[list[Stage], list[Stage]]:
    """The generate and score stages whose shards a rerun may redo to send rows again
    (:func:`genflow.data.resume.awaiting_retries`): those that send requests, and every scorer once
    a generator does (it is redone after it). A job of local models has none: its stages read
    no marker for it."""
    generators = [layout.generate_stage(g.label) for g in config.generators  # a local model's episodes too
                  if sends_requests(registry.get("generator", g.plugin).factory.implementation(g.params))
                  or episode_settings(g) is not None]
    scorers = [layout.score_stage(s.name) for s in config.scorers
               if generators or sends_requests(registry.get("scorer", s.plugin).factory.implementation(s.params))]
    return generators, scorers


def call_size(stage_batch_size: int | None, config: JobConfig, factory: type) -> int:
    """Items per Ray call: the stage's ``batch_size``, else ``ray.batch_size``, else the plugin's own."""
    plugin_default: int = getattr(factory, "batch_size", 16)
    return stage_batch_size or config.ray.batch_size or plugin_default


# -- reading --------------------------------------------------------------------

def read_prompts(storage: Storage, shard: Shard) -> pa.Table:
    """The shard's prompts, less those the job's filters left out (``filtered/``)."""
    return without_left_out(storage, shard, "prompts", storage.read_table(layout.PROMPTS_STAGE.part(shard.index)),
                            "prompt_id")


def read_generations(storage: Storage, shard: Shard, labels: list[str]) -> pa.Table:
    """The shard's candidates from every generator (found by name: listing the folder
    for every shard would cost a job quadratic time on a bucket)."""
    parts = [p for p in (layout.generate_stage(label).part(shard.index) for label in labels) if storage.exists(p)]
    if not parts:
        return GENERATIONS.empty_table()
    tables = [storage.read_table(p) for p in parts]  # an episode's part has its conversation too
    tables = [t.select([c for c in (*GENERATIONS.names, "messages") if c in t.column_names]) for t in tables]
    table = pa.concat_tables(tables, promote_options="permissive")
    return without_left_out(storage, shard, "candidates", table, "generation_id")  # filtered/: not scored nor ranked


def read_scores(storage: Storage, shard: Shard, scorers: list[str]) -> pa.Table:
    tables = [storage.read_table(p, SCORES.names) for p in (layout.score_stage(s).part(shard.index)  # fixed columns
              for s in scorers) if storage.exists(p)]
    return pa.concat_tables(tables) if tables else SCORES.empty_table()


def plugin_inputs(row: dict[str, Any], factory: type[Plugin], base_dir: str) -> dict[str, Any]:
    """The row's values of the columns the plugin reads (where it has one), paths resolved."""
    return {k: resolve_input_path(row[k], base_dir) if k in factory.path_columns else row[k]
            for k in factory.input_columns if row.get(k) is not None}


# -- calling the plugin ---------------------------------------------------------

def call_batches(items: list[Item], keys: list[Any] | None, size: int) -> list[list[Item]]:
    """Items sorted by their keys, largest first (ties by ``generation_id``), ``size`` a call.

    Neighbouring keys share a call, so a plugin that keys on its own token counts
    gets batches that pad little; the costliest calls go first and the smallest,
    last, so the shard's tail is short. Without keys (or with keys that do not
    compare), the items keep their order."""
    if keys is not None:
        try:
            order = sorted(range(len(items)), key=lambda i: (keys[i], items[i].generation_id), reverse=True)
            items = [items[i] for i in order]
        except TypeError as exc:
            log.warning("batch_keys returned keys that do not compare (%s); batching in the shard's order", exc)
    return chunked(items, size)


def _request_answers(pool: RequestPool, items: list[Item], advance: Advance, journals: Journals,
                     price: PriceSpec | None, budget: Budget | None,
                     per_prompt: bool) -> Iterator[tuple[Item, Any, float]]:
    """A request stage's answers: those the journals hold first (sent by an earlier run), then
    the rest as the server answers, each one journaled; stops once the budget is spent.
    A request is one item, or (``per_prompt``) the list of a prompt's items. The requests
    not journaled are sent before this returns, unless the budget is spent already: the
    journal's answers were paid for by an earlier run of the output, and count."""
    answered: dict[str, tuple[Any, float]] = {}
    for journal in journals.unique():
        answered.update(journal.load())
    units: list[list[Item]] = prompt_groups(items) if per_prompt else [[item] for item in items]
    todo = [[with_turns(i, answered) for i in unit] for unit in units  # an episode goes on from its last turn
            if not all(i.generation_id in answered for i in unit)]
    if budget is not None:
        if budget.max_cost is not None and todo and not priced(price) and budget.say("unpriced"):
            log.warning("max_cost does not bound a stage that has no price: its requests are counted as free "
                        "(give the stage `price:`)")
        for unit in units:
            if all(i.generation_id in answered for i in unit):
                for item in unit:
                    result = answered[item.generation_id][0]
                    with COUNTING:
                        budget.add(request_cost(item, result, price)[0], sample=not isinstance(result, Failure))
    spent = budget is not None and budget.exhausted
    ticket = None
    if todo and not spent:
        ticket = pool.submit([unit if per_prompt else unit[0] for unit in todo], budget, price)
    return _journaled_answers(pool, ticket, units, todo, answered, advance, journals, price, budget, per_prompt)


def _journaled_answers(pool: RequestPool, ticket: Any, units: list[list[Item]], todo: list[list[Item]],
                       answered: dict[str, tuple[Any, float]], advance: Advance, journals: Journals,
                       price: PriceSpec | None, budget: Budget | None,
                       per_prompt: bool) -> Iterator[tuple[Item, Any, float]]:
    """The journals' answers, then the ticket's as they arrive: each journaled, and counted on
    ``budget`` as the request worker counts it (the same costs in the same order)."""
    replayed = 0
    for unit in units:
        if all(i.generation_id in answered for i in unit):
            for item in unit:
                result, seconds = answered[item.generation_id]
                replayed += 1
                yield item, result, seconds
    if replayed:
        advance(replayed)
    stopping = False
    unanswered = len(todo)
    for batch in ticket.results() if ticket is not None else ():
        moved = 0
        for answer in batch:
            unit = todo[answer.index]
            if answer.partial:  # an episode's answered turn: kept for a rerun to go on from
                journals.add_turn(unit[0].generation_id, answer.result, answer.seconds)
                continue
            if budget is not None:
                cost, estimated = request_cost(unit if per_prompt else unit[0], answer.result, price, answer.posts)
                with COUNTING:  # the next pack's task counts its answers at the same time
                    budget.add(cost, sample=not isinstance(answer.result, Failure))
                    budget.estimated += estimated
                if estimated and budget.say("estimated"):
                    log.warning("the server reported no token usage: its requests are priced from their "
                                "characters (about 4 a token) for max_cost and the stage's cost")
            results = _fan_out(answer.result, len(unit)) if per_prompt else [answer.result]
            for item, result in zip(unit, results, strict=True):
                journals.add(item.generation_id, result, answer.seconds)
                yield item, result, answer.seconds
            moved += len(unit)
            unanswered -= 1
        journals.flush()  # the answers are durable before the next ones are waited for
        advance(moved)
        if budget is not None and budget.exhausted and not stopping:
            stopping = True  # what is in flight is paid for: take its answers, send nothing more
            pool.stop_sending()
    journals.flush()
    if budget is not None and budget.exhausted and unanswered:
        raise BudgetSpent(f"the job's requests have cost {budget.spent:.4f} (every run of this output together), "
                          f"its max_cost is {budget.max_cost:g}: stopped with every answer kept, {unanswered} "
                          f"requests of the shards under way not sent (nor any of the shards after them); "
                          f"raise max_cost and run it again to go on")


class Journals:
    """The request journals of a pack's shards, each item's answer going to its own shard's."""

    def __init__(self) -> None:
        self.of: dict[str, Journal] = {}
        self._touched: dict[int, Journal] = {}

    def unique(self) -> list[Journal]:
        return list({id(j): j for j in self.of.values()}.values())

    def add(self, generation_id: str, result: Any, seconds: float) -> None:
        journal = self.of.get(generation_id)
        if journal is not None:
            journal.add(generation_id, scrub_result(result), seconds)  # no secret a server sent back
            self._touched[id(journal)] = journal

    def add_turn(self, generation_id: str, turn: Turn, seconds: float) -> None:
        """An episode's answered turn, under ``<generation_id>/<turn>``."""
        journal = self.of.get(generation_id)
        if journal is not None:
            journal.add(turn_key(generation_id, turn.turn), scrub_result(turn), seconds)
            self._touched[id(journal)] = journal

    def flush(self) -> None:
        for journal in self._touched.values():
            journal.flush()
        self._touched.clear()


def _fan_out(result: Any, n: int) -> list[Any]:
    """A per-prompt request's answer as one result per item: its list, or its failure n times
    (the tokens it paid for on the first only, so that they are counted once)."""
    if isinstance(result, list) and len(result) == n:
        return [failure_of(r) if isinstance(r, RowError) else r for r in result]
    if isinstance(result, Failure):
        return [result] + [dataclasses.replace(result, prompt_tokens=None, completion_tokens=None)] * (n - 1)
    return [Failure(f"the scorer answered {len(result) if isinstance(result, list) else type(result).__name__} "
                    f"results for a prompt of {n} candidates", "")] * n


def plan_calls(pool: WorkerPool, items: list[Item], size: int) -> list[list[Item]]:
    """A shard's calls, cut by the plugin's ``batch_keys`` (worked out on its workers).

    A shard that fits in one call needs no keys: the plugin sorts inside the call."""
    if len(items) <= size:
        return [items] if items else []
    return call_batches(items, pool.batch_keys([_keys_view(i) for i in items]), size)


def _keys_view(item: GenerationRequest | ScoreItem) -> GenerationRequest | ScoreItem:
    """An item as ``batch_keys`` sees it: a score item without its image bytes."""
    if isinstance(item, ScoreItem) and item.image is not None:
        return dataclasses.replace(item, image=None)
    return item


def prompt_groups(items: list[Item]) -> list[list[Item]]:
    """Items grouped by prompt (in the order prompts first appear), for a per-prompt scorer."""
    groups: dict[str, list[Item]] = {}
    for item in items:
        groups.setdefault(item.prompt_id, []).append(item)
    return list(groups.values())


def prompt_calls(items: list[Item], size: int) -> list[list[Item]]:
    """Whole prompts packed into calls of about ``size`` items (a larger prompt is a call alone)."""
    calls: list[list[Item]] = []
    for group in prompt_groups(items):
        if calls and len(calls[-1]) + len(group) <= size:
            calls[-1].extend(group)
        else:
            calls.append(list(group))
    return calls


def send(pool: Pool, items: list[Item], size: int, advance: Advance, journals: Journals | None = None,
         price: PriceSpec | None = None, budget: Budget | None = None,
         per_prompt: bool = False) -> Iterator[tuple[Item, Any, float]]:
    """Send ``items`` to the plugin now; iterate each with its result (or :class:`Failure`) and the
    seconds its call spent per item, as calls finish. The progress bar moves per call.
    ``per_prompt``: calls (and requests) hold a prompt's candidates together."""
    if isinstance(pool, RequestPool):
        return _request_answers(pool, items, advance, journals or Journals(), price, budget, per_prompt)
    calls = prompt_calls(items, size) if per_prompt else plan_calls(pool, items, size)
    return _call_answers(pool.submit(calls), advance)


def _call_answers(ticket: Any, advance: Advance) -> Iterator[tuple[Item, Any, float]]:
    for batch in ticket.results():
        per_item = batch.seconds / max(1, len(batch.items))
        yield from ((item, result, per_item) for item, result in zip(batch.items, batch.results, strict=True))
        advance(len(batch.items))


# -- a pack of shards -----------------------------------------------------------

Answered = list[tuple[Any, Any, float]]


@dataclass
class ShardWork:
    """A shard's share of a :class:`Pack`: its items, its journal, and how its parts are written."""

    shard: Shard
    fingerprint: str
    items: list[Any]
    finish: Callable[[Answered], StageOutcome]
    """Writes the shard's parts and marker from every item's answer."""
    journal: Journal | None = None
    answered: Answered = field(default_factory=list)
    seconds: float | None = None
    """Its share of its pack's time, set by the pack as the shard is finished (None: its own time)."""


class Pack:
    """Consecutive shards of one stage whose items go to the plugin together.

    Shards are the unit of resume, not of a call: a pack's items are cut into calls of
    the plugin's batch size together, so small shards do not make small calls. The pack
    is made in the flow and does its work in its task run: :meth:`send` reads the shards'
    inputs and sends their calls, :meth:`collect` writes each shard's parts and marker as
    soon as its last item is answered (so a kill loses no finished shard). A stage sends
    its next pack before it waits for the current one: the workers (or the server) have
    the next shards' work queued while the current shards' parts are written.

    A shard's ``seconds`` are its items' share of the pack's time (from :meth:`send` to
    the shard's parts written): the shards of a pack add up to the pack's time."""

    def __init__(self, stage: ModelStage, works: list[ShardWork] | Callable[[], list[ShardWork]], pool: Pool,
                 size: int, advance: Advance, budget: Budget | None) -> None:
        """``works``: the shards' works, or what makes them (their inputs read in the pack's task)."""
        self.stage, self.pool, self.size, self.advance = stage, pool, size, advance
        self.budget = budget
        self._make = works if callable(works) else None
        self._works: list[ShardWork] | None = None if callable(works) else list(works)
        self.outcomes: dict[int, StageOutcome] = {}
        """What is written, by shard: a retried collect sends only the rest again."""
        self.started: float | None = None
        """When the pack's work began (its first :meth:`send`)."""
        self.sent = threading.Event()
        """Set once the pack's calls are out (or sending failed): the stage may send the next pack."""
        self.cancelled = False
        self._answers: Iterator[tuple[Any, Any, float]] | None = None

    @property
    def works(self) -> list[ShardWork]:
        if self._works is None:
            assert self._make is not None
            self._works = self._make()
        return self._works

    @property
    def shards(self) -> list[Shard]:
        return [w.shard for w in self.works]

    def cancel(self) -> None:
        """The stage stopped (a failure, Ctrl-C): a pack not sent yet sends nothing, one under way stops."""
        self.cancelled = True

    def send(self) -> None:
        """Read the inputs (once) and send the calls of the shards not written yet, unless they are
        on their way already (sent and not collected)."""
        try:
            if self._answers is not None:
                return
            self._stopped_if_cancelled()
            if self.started is None:
                self.started = time.perf_counter()
            journals = Journals()
            items: list[Any] = []
            for work in self.works:
                if work.shard.index in self.outcomes:
                    continue
                work.answered = []
                items += work.items
                if work.journal is not None:
                    journals.of.update((i.generation_id, work.journal) for i in work.items)
            self._stopped_if_cancelled()
            self._answers = send(self.pool, items, self.size, self.advance, journals, self.stage.spec.price,
                                 self.budget, self.stage.per_prompt)
        finally:
            self.sent.set()

    def collect(self) -> list[StageOutcome]:
        """Every shard's outcome, its parts and marker written as its answers complete (sent first
        unless they are on their way)."""
        self.send()
        answers, self._answers = self._answers, None
        assert answers is not None
        owner = {i.generation_id: w for w in self.works if w.shard.index not in self.outcomes for i in w.items}
        total = sum(len(w.items) for w in self.works)
        for work in self.works:
            if not work.items and work.shard.index not in self.outcomes:
                self._finish(work, total)
        try:
            for item, result, seconds in answers:
                work = owner[item.generation_id]
                work.answered.append((item, result, seconds))
                if len(work.answered) == len(work.items):
                    self._finish(work, total)
                self._stopped_if_cancelled()
        except PoolStopped:
            raise
        except Exception as exc:
            if self.cancelled:  # the pool was stopped under it
                raise PoolStopped(f"{self._name}: the stage stopped ({type(exc).__name__})") from None
            raise
        self._stopped_if_cancelled()
        missing = [w.shard.index for w in self.works if w.shard.index not in self.outcomes]
        if missing:
            raise RuntimeError(f"{self._name}: shards {missing} were not answered in full")
        return [self.outcomes[w.shard.index] for w in self.works]

    def _finish(self, work: ShardWork, total: int) -> None:
        assert self.started is not None
        work.seconds = (time.perf_counter() - self.started) * len(work.items) / max(1, total)
        self.outcomes[work.shard.index] = work.finish(work.answered)

    @property
    def _name(self) -> str:
        return str(getattr(self.stage, "run_name", "the stage"))

    def _stopped_if_cancelled(self) -> None:
        if self.cancelled:
            raise PoolStopped(f"{self._name}: the stage stopped before this pack finished")


# -- writing --------------------------------------------------------------------

def error_row(prompt_id: str, stage: str, plugin: str, failure: Failure, generation_id: str | None = None) -> dict:
    return {"prompt_id": prompt_id, "stage": stage, "plugin": plugin, "error": failure.error,
            "traceback": failure.traceback, "generation_id": generation_id, "transient": failure.transient}


def write_part(storage: Storage, rel: str, table: pa.Table, parts: list[str]) -> int:
    """Write a part (atomically; nothing when it has no rows) and note it in ``parts``."""
    if storage.write_table(rel, table):
        parts.append(rel)
    return table.num_rows


def open_journal(job: JobContext, stage: ModelStage, shard: Shard, fingerprint: str) -> Journal | None:
    """A request stage's journal for this shard (None for a stage of local models)."""
    return Journal(job.storage, stage.stage, shard, fingerprint) if stage.sends_requests else None


@dataclass
class Usage:
    """Tokens and cost of a (stage, shard)'s rows."""

    prompt: int = 0
    completion: int = 0
    cost: float = 0.0

    def add(self, result: Any, price: PriceSpec | None, item: Any = None) -> None:
        """A row's result: its tokens (a failure's too: they were paid for) and its cost, priced
        from characters where the server reported no usage (as ``max_cost`` counts it)."""
        prompt, completion = reported_tokens(result)
        self.prompt += prompt
        self.completion += completion
        self.cost += request_cost(item, result, price)[0]


def finish_model_stage(storage: Storage, stage: Stage, shard: Shard, fingerprint: str, folder: str,
                       table: pa.Table, errors: list[dict[str, Any]], work_items: int,
                       started: float, usage: Usage | None = None, journal: Journal | None = None,
                       awaiting: list[str] | None = None, seconds: float | None = None) -> StageOutcome:
    """Write a generate or score stage's part and errors, then its marker: the stage is done
    (and its request journal, now in the parts, goes). Unless a rerun has work left in it:
    rows that failed transiently, or ``awaiting`` stages it read from that have some
    (:func:`genflow.data.resume.awaiting_retries`); then the marker says so, and the journal
    stays for the rerun to send only what has no answer. ``seconds``: the shard's share of its
    pack's time (:class:`Pack`); without it, the time since ``started``."""
    parts: list[str] = []
    write_part(storage, stage.part(shard.index), table, parts)
    n_err = write_part(storage, stage.errors_part(shard.index), pa.Table.from_pylist(errors, schema=ERRORS), parts)
    outcome = StageOutcome(stage.name, shard.index, fingerprint, {folder: table.num_rows}, n_err, work_items,
                           time.perf_counter() - started if seconds is None else seconds, parts=parts,
                           transient=sum(1 for e in errors if e.get("transient")), awaiting=list(awaiting or []))
    if usage is not None and (usage.prompt or usage.completion or usage.cost):
        outcome.tokens = {"prompt": usage.prompt, "completion": usage.completion}
        outcome.cost = round(usage.cost, 8)
    mark_finished(storage, outcome)
    if journal is not None and not outcome.retried_later:
        journal.discard()
    return outcome


"""What a plugin sees, and how genflow calls it: the execution contract.

A plugin is a class deriving from :class:`Generator`, :class:`Scorer`,
:class:`Exporter`, :class:`Labeller`, :class:`Tool`, :class:`Trainer` or :class:`Filter`; the base
class, not the methods it happens to have, says which kind it is. A class declares
what it needs and genflow does the rest:

- ``Params``: a pydantic model of its ``params``. genflow validates a job's params
  against it before any work starts (``genflow validate``), so a typo fails with
  the key path named and no model loads. Give each field ``Field(description=...)``:
  ``genflow plugins --params NAME`` prints them.
- ``input_columns``: the input columns it reads. The engine hands it exactly those
  of a row (``inputs``), where the row has a value; a column no plugin of the job
  reads is carried through to ``generations/``. ``path_columns`` are the ones
  whose string values are paths or URIs: genflow resolves a relative path against
  the input's folder, once, before the plugin sees it.
- ``requires`` and ``extra``: the distributions it imports and the extra that
  installs them (genflow's for a built-in, its own distribution's otherwise). A
  plugin whose requirements are missing is listed by ``genflow plugins`` as
  unavailable with that pip command, and a job naming it fails at validation. The
  manifest records the versions of what the job's plugins require.

How a model plugin is called (generators and scorers):

- **Construction**: once per Ray worker process, never per batch. ``__init__``
  loads the model; an exception there fails the stage at once (the model cannot
  load, so no row could succeed). A worker hosts one plugin at a time: the job's
  stages take turns on the same processes, the previous plugin's object dropped
  first.
- **Calls**: ``generate(requests)`` / ``score(items)`` take a list of up to the
  stage's ``batch_size`` items (``ray.batch_size``, else the class's
  ``batch_size``) and return one result per item, in order. A worker runs one call
  at a time. Items of a call come from one shard, cut by ``batch_keys``.
- **A result may be a** :class:`RowError`: that item alone becomes an ``errors/``
  row (its message, no traceback) and the job goes on.
- **An exception** from a call makes genflow split the call in halves and call
  again until the failing items are alone; each item that still raises on its
  own becomes an ``errors/`` row with its traceback. A worker process that dies
  (segfault, out of memory) is replaced and its call retried in halves the same
  way, up to ``ray.max_restarts`` deaths per item.
- **What is written**: a :class:`Generation`'s text or image (PNG, under
  ``images/``), ``num_tokens`` and ``finish_reason`` go to ``generations/`` with
  the request's ids, seed and the stage's params; a :class:`Score`'s value and its
  ``details`` (as JSON) go to ``scores/``, and so do the values of the columns the
  scorer declares in :attr:`Scorer.extra_columns` (typed, one per key of
  ``Score.columns``). Nothing else a plugin holds is written.
- **Job-level figures**: after its stage, a scorer's :meth:`Scorer.summarize` gets
  all of its rows and returns the job's metrics for it (``manifest.json``), and
  :meth:`Scorer.report_sections` turns those into tables for ``report.html``.

How a request plugin is called (a client of an inference server or a hosted API):
a plugin whose ``generate`` / ``score`` is ``async def`` takes **one** request (a
:class:`GenerationRequest` or a :class:`ScoreItem`) and returns one result.

- The engine runs its calls on one event loop in a worker that reserves little CPU,
  with up to the stage's ``requests.concurrency`` in flight across the job, each
  under ``requests.timeout_s``. Answers are handled as they arrive, not per batch.
- :class:`TransientError` (429, 5xx, timeout, dropped connection) sends the request
  again after an exponential backoff with jitter (its ``retry_after`` first), up to
  ``requests.max_retries``; a 429 also halves the concurrency, which grows back with
  successes. A :class:`RowError`, returned or raised, is permanent: an ``errors/``
  row, with the ``raw`` answer when the plugin gives one. Any other exception is an
  ``errors/`` row with its traceback.
- Every answer goes to the stage's request journal within seconds, so a job killed
  mid-shard sends again only the requests that had no answer.
- ``prompt_tokens`` and ``num_tokens`` (or a score's token counts) price the request
  with the stage's ``price``; the job stops cleanly at ``max_cost``. Report every paid
  request's tokens (a schema's retries, a judge's questions) in the result, or as
  ``prompt_tokens`` / ``completion_tokens`` attributes of a :class:`RowError`; an answer
  that reports none is priced from its characters (``genflow.engine.budget``).
- A call that sends several HTTP requests enters :func:`request_slot` around each, so
  that ``concurrency``, ``rpm`` and ``tpm`` count requests rather than calls.
- Params named in ``unhashed_params`` (where requests go, which variable holds the
  key) change no id and no fingerprint; ``secret_env`` names the environment
  variables a worker needs (sent to a cluster's workers, never written anywhere).

A generator that overrides :meth:`Generator.chat` (a served model's client) also runs **episodes**:
a generator with ``max_turns`` above 1 makes each request a conversation. genflow calls
``chat`` once per turn (a :class:`ChatRequest`: the messages so far, the tools' schemas, the
turn's seed) under the same limits and retries, runs the :class:`ToolCall` s of each
:class:`ChatTurn` through the generator's tools, journals every answered turn, and writes the
episode as one ``generations/`` row (``docs/episodes.md``).

Exporters run on the driver, once per shard, after ranking, and again on what people
labelled after ``genflow label pull`` (see :class:`Exporter`).
Everything passed to a model plugin is plain data, so batches travel cheaply to workers.
"""

from __future__ import annotations

import contextlib
import json
from abc import ABC, abstractmethod
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import pyarrow as pa

class PluginParams(BaseModel):
    """Base for a plugin's ``params``: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class TransientError(Exception):
    """A request failed in a way that may pass if sent again: a 429, a 5xx, a timeout, a
    dropped connection. Raised by an async plugin's ``generate``/``score``; the engine sends
    the request again after a backoff (``retry_after`` seconds when the server said how
    long), up to the stage's ``requests.max_retries``, then writes an ``errors/`` row.
    ``rate_limited`` (a 429) also halves the stage's concurrency for a while."""

    def __init__(self, message: str, retry_after: float | None = None, rate_limited: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.rate_limited = rate_limited


class RowError(Exception):
    """A failure that concerns one request only (bad image, missing tests...).

    A plugin may return an instance in place of a result; genflow writes it to
    ``errors/`` and goes on. Any other exception raised for a batch makes genflow
    retry the batch's rows one by one to find the rows that fail.
    """


_REQUEST_SLOTS: ContextVar[Any] = ContextVar("genflow_request_slots", default=None)
"""The engine's limits for the call in progress (set by ``genflow.engine.requesting`` around each call)."""


def request_slot() -> AbstractAsyncContextManager[Any]:
    """Enter around each HTTP request a request plugin sends (``async with request_slot(): ...``).

    The stage's ``concurrency``, ``rpm`` and ``tpm`` then count that request, not the call:
    a call that sends several requests at once (a judge's aspects or pairs) waits for a
    slot per request, and a 429 inside one halves the concurrency as the call's own would.
    A call's first request uses the slot the call was started in. Outside the engine's
    request path (a test calling the plugin) it limits nothing."""
    slots = _REQUEST_SLOTS.get()
    return slots.slot() if slots is not None else contextlib.nullcontext()


_RESPONSE_CACHE: ContextVar[Any] = ContextVar("genflow_response_cache", default=None)
"""The stage's response cache (set by ``genflow.engine.requesting`` around each call; None: none)."""


def response_cache() -> Any:
    """The job's response cache for the call in progress, or None (``docs/batch-and-cache.md``).

    A request plugin that knows the exact request it sends (its endpoint and JSON body)
    looks it up before sending (``await cache.aget(endpoint, body)``: the stored answer or
    None) and keeps what the server answered (``await cache.aput(endpoint, body, answer)``).
    A result built from a stored answer sets ``cached = True`` (:class:`Generation`): it
    cost nothing. Outside the engine's request path, or in a job without a cache, None."""
    return _RESPONSE_CACHE.get()


@dataclass(frozen=True)
class GenerationRequest:
    """One candidate to generate: a prompt row, a sample index and its seed."""

    generation_id: str
    prompt_id: str
    prompt: str
    sample: int
    seed: int
    task: str | None = None
    system: str | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    """The row's values of the input columns the plugin declares in ``input_columns``."""


@dataclass
class Generation:
    """A generated candidate. Exactly one of ``text`` and ``image`` is set."""

    text: str | None = None
    image: bytes | None = None
    """PNG bytes; genflow stores them under ``images/<prompt_id>/<generation_id>.png``."""
    num_tokens: int | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    """Tokens of the prompt as the model counted them (a server's ``usage``), for costs."""
    raw: str | None = None
    """What the model answered, when ``text`` is derived from it (kept in ``errors/`` when unusable)."""
    messages: list[dict[str, Any]] | None = None
    """An episode's whole conversation (a generator with ``max_turns`` above 1), in OpenAI's
    format: the opening messages, then each assistant turn and its ``tool`` results. ``text``
    is then the final answer, and the token counts are summed over the turns."""
    turns: int | None = None
    """An episode's assistant turns (each one request)."""
    tool_calls: int | None = None
    """An episode's tool calls, malformed ones included."""
    cached: bool = False
    """Answered from the job's response cache (:func:`response_cache`): not sent, so it cost nothing."""


@dataclass(frozen=True)
class ScoreItem:
    """A prompt and one of its candidates, as a scorer sees it."""

    generation_id: str
    prompt_id: str
    prompt: str
    modality: str
    text: str | None = None
    image: bytes | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, Any]] | None = None
    """The episode behind the candidate, in OpenAI's format (None for a one-answer candidate):
    ``text`` is its final answer; a judge or reward model may read the whole conversation."""


@dataclass
class Score:
    """A candidate's score; ``details`` (JSON-able) go to ``scores/``. A ``details["outcome"]``,
    a short verdict such as ``passed`` or ``timed out``, is shown beside the candidate in ``report.html``."""

    value: float
    details: dict[str, Any] = field(default_factory=dict)
    prompt_tokens: int | None = None
    """Tokens a model-backed scorer (a judge) spent reading, and writing (``completion_tokens``): for costs."""
    completion_tokens: int | None = None
    columns: dict[str, Any] = field(default_factory=dict)
    """Values of the scorer's :attr:`Scorer.extra_columns`, by column name: each goes to its own
    typed column of ``scores/`` (a column left out is null). A key the scorer did not declare
    is an error of the row."""
    cached: bool = False
    """Built from the job's response cache's answers only (:func:`response_cache`): it cost nothing."""


class Plugin(ABC):
    """What every plugin class declares: its params, what it reads and what it needs installed."""

    Params: ClassVar[type[PluginParams]] = PluginParams
    description: ClassVar[str] = ""
    input_columns: ClassVar[tuple[str, ...]] = ()
    """Input columns the plugin reads; a row's values of these arrive in ``inputs``."""
    path_columns: ClassVar[tuple[str, ...]] = ()
    """Those of ``input_columns`` that may hold a path or URI; a relative path is resolved
    against the input's folder before the plugin sees it."""
    requires: ClassVar[tuple[str, ...]] = ()
    """Distributions the plugin imports (``("torch", "transformers")``): missing ones make it
    unavailable, and the manifest records their versions."""
    extra: ClassVar[str | None] = None
    """The extra that installs ``requires``: of genflow for a built-in (``hf`` for
    ``pip install 'genflow[hf]'``), of its own distribution for a third-party plugin."""
    unhashed_params: ClassVar[tuple[str, ...]] = ()
    """Params that do not change what the plugin computes (a server's URL, the name of the
    variable holding a key): left out of ``generation_id`` and the stage fingerprints."""

    @classmethod
    def implementation(cls, params: dict[str, Any]) -> type[Plugin]:
        """The class that does the work for these params: a plugin with two backends (a local
        model, a served one) registers one name and picks here. Same ``Params``; default: itself."""
        return cls

    @classmethod
    def secret_env(cls, params: PluginParams) -> list[str]:
        """Environment variables the plugin reads in its workers (an API key's): a cluster's
        workers get them through their runtime environment; no output records their values."""
        return []


class _ModelPlugin(Plugin):
    default_model: ClassVar[str | None] = None
    batch_size: ClassVar[int] = 16
    """Items per call when the job sets none (``ray.batch_size``, or the stage's ``batch_size``).
    A call is the unit of work a worker takes at a time: big enough for the model to batch
    well, small enough that the workers share a shard's work evenly."""

    def __init__(self, model: str | None, params: PluginParams, device: str = "cpu") -> None:
        self.model_name = model or self.default_model
        self.params = params
        self.device = device

    def describe(self) -> dict[str, Any]:
        """Model facts for the manifest (path or id, revision, sizes)."""
        return {"model": self.model_name}


class Generator(_ModelPlugin):
    modality: ClassVar[str] = "text"
    """What its candidates are. The generate stage and ``genflow validate`` know the modalities
    the installed plugins declare; a row's ``task`` of one of them goes to the generators of that
    modality (rows marked ``image`` go to image generators only)."""
    media_columns: ClassVar[tuple[str, ...]] = ()
    """Those of its ``input_columns`` that hold a picture (bytes, a ``datasets`` image or a path):
    ``report.html`` shows them as thumbnails beside the prompt (an image-to-image source, a mask)."""

    @classmethod
    def derived_media(cls, inputs: dict[str, Any], params: PluginParams) -> dict[str, bytes]:
        """Pictures the plugin makes from a row before generating (an outpainting mask), by name, as
        image bytes: ``report.html`` shows them beside the media columns. ``inputs``: the row's
        ``input_columns``, paths resolved; an exception shows nothing. Default: none."""
        return {}

    @abstractmethod
    def generate(self, requests: list[GenerationRequest]) -> list[Generation | RowError]:
        """Return one result per request, in the same order."""

    def opening(self, request: GenerationRequest) -> list[dict[str, Any]] | RowError:
        """The messages an episode of ``request`` starts from (OpenAI format): by default the
        row's ``system`` and the prompt as the user's message. A plugin that reads a
        conversation from the row (a ``messages`` column) returns it."""
        messages: list[dict[str, Any]] = []
        if request.system:
            messages.append({"role": "system", "content": request.system})
        messages.append({"role": "user", "content": request.prompt})
        return messages

    async def chat(self, request: ChatRequest) -> ChatTurn:
        """One assistant turn of an episode (a request plugin that runs episodes overrides it).

        genflow owns the loop: it calls ``chat`` once per turn with the conversation so far
        and the tools' schemas, under the stage's limits and retries as a ``generate`` call
        (raise :class:`TransientError` or :class:`RowError` as ``generate`` does), runs the
        tool calls of the answer and calls again with their results, until the episode ends."""
        raise NotImplementedError(f"{type(self).__name__} does not run episodes (it has no `chat`)")

    def batch_keys(self, requests: list[GenerationRequest]) -> list[Any]:
        """One sort key per request, saying which requests should share a call.

        The generate stage sorts a shard's requests by key (largest first) and cuts them
        into calls, so requests with neighbouring keys are batched together. It runs on
        a worker, once per shard, before the shard's first call: a plugin can key on
        what makes requests cost alike, such as prompt length in its own tokens (padding
        a batch to its longest prompt is the waste that sorting avoids). Keys of one
        shard must be comparable with each other. Default: the prompt's length in characters.
        """
        return [len(r.prompt) for r in requests]


class Scorer(_ModelPlugin):
    modalities: ClassVar[tuple[str, ...]] = ("text", "code")
    extra_columns: ClassVar[dict[str, pa.DataType]] = {}
    """Columns of its own the scorer writes to ``scores/`` beside ``details``, with their Arrow
    types (``{"verdict": pa.string(), "tokens": pa.int64()}``). A :class:`Score` gives their
    values in ``columns``; they follow the fixed columns of ``genflow.data.schemas.SCORES``, may
    not share a name with one, and are null in the rows of the job's other scorers."""
    per_prompt: ClassVar[bool] = False
    """Scores a prompt's candidates together (a pairwise judge). A call then holds whole
    prompts only: a sync ``score(items)`` gets one or more prompts' candidates, and an
    exception splits the call at prompt boundaries; an async ``score(items)`` gets one
    prompt's candidates per request."""

    @abstractmethod
    def score(self, items: list[ScoreItem]) -> list[Score | RowError]:
        """Return one score per item, in the same order (higher is better)."""

    @classmethod
    def summarize(cls, scores: pa.Table, params: PluginParams) -> dict[str, Any]:
        """Job-level metrics from all of this scorer's rows (``scores/`` columns, and ``generator``:
        the label of the generator that made each candidate), for the manifest's ``metrics``. Runs
        on the driver after the scorer's stage; JSON-able values."""
        return {}

    @classmethod
    def report_sections(cls, name: str, metrics: dict[str, Any]) -> list[ReportSection]:
        """Tables for ``report.html`` from this scorer's :meth:`summarize` metrics.

        ``name`` is the scorer's name in the job. The default shows every number in
        ``metrics`` as one row; a scorer with figures of its own shape returns its own.
        The report escapes every cell."""
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not numbers:
            return []
        return [ReportSection(f"{name} metrics", ["scorer", *numbers], [[name, *numbers.values()]])]

    def batch_keys(self, items: list[ScoreItem]) -> list[Any]:
        """One sort key per item, saying which items should share a ``score`` call.

        As :meth:`Generator.batch_keys`: runs on a worker once per shard, before its first
        call. The items come without their image bytes (``image`` is None), which would
        otherwise travel to the workers twice. By default a prompt's candidates stay
        together (a scorer that embeds the prompt does it once per call) and prompts of
        similar length share a call. A scorer that reads prompt and candidate as one
        sequence should key on their joint length in its own tokens, so its batches pad little.
        """
        return [(len(i.prompt), i.prompt_id, len(i.text or "")) for i in items]


def runs_episodes(factory: type) -> bool:
    """Whether a generator class answers episode turns (it overrides :meth:`Generator.chat`)."""
    import inspect

    method = getattr(factory, "chat", None)
    return method is not None and method is not Generator.chat and inspect.iscoroutinefunction(method)


def sends_requests(factory: type) -> bool:
    """Whether a generator or scorer class is a request plugin (its call is ``async def``)."""
    import inspect

    method = getattr(factory, "generate", None) or getattr(factory, "score", None)
    return inspect.iscoroutinefunction(method)


def missing_distributions(names: tuple[str, ...], found: dict[str, bool] | None = None) -> tuple[str, ...]:
    """Those of ``names`` that are not installed, read from installed metadata (importing nothing).

    ``found`` caches the answers across plugins that share requirements."""
    import importlib.metadata as md

    found = {} if found is None else found
    for name in names:
        if name not in found:
            try:
                md.distribution(name)
                found[name] = True
            except md.PackageNotFoundError:
                found[name] = False
    return tuple(name for name in names if not found[name])


@dataclass(frozen=True)
class ReportSection:
    """A table in ``report.html``, from a plugin: a title, column names and rows of cells."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""


class Exporter(Plugin):
    """A training-data format made from each shard's ranked candidates, and from what people
    labelled.

    Its registered name is the folder it writes (``<output>/<name>/part-*.parquet``).
    ``export`` runs on the driver, once per shard after ranking; an exception fails
    that shard's rank task (Prefect retries it), so an exporter validates what it can
    in ``Params``. A job runs the exporters whose :meth:`job_params` say they run by
    default, and those named under ``exporters:`` in its config, each with the params
    given there (``exporters: {NAME: {KEY: VALUE}}``; ``NAME: false`` turns a default one off).

    After ``genflow label pull`` (and after each run of a job people labelled),
    :meth:`export_human` turns the people's rankings and demonstrations into rows of the
    same format, written to ``<name>/part-human.parquet`` beside the shards' parts."""

    modality: ClassVar[str] = "any"
    schema: ClassVar[pa.Schema | None] = None
    """The columns of the rows it writes, when they are fixed."""
    human_kinds: ClassVar[tuple[str, ...]] = ()
    """The kinds of labels (:data:`LABEL_KINDS`) its :meth:`export_human` makes rows of. With
    ``labelling.human_rows: instead``, the prompts people labelled in these kinds (and those of
    its human rows) leave the rows :meth:`export` made."""
    ranking_keys: ClassVar[dict[str, str]] = {}
    """Deprecated keys of a config's ``ranking`` section that :meth:`job_params` still reads
    (where its params lived before they moved under ``exporters``), each with the text that says
    where it went: a config that sets one validates with a warning naming the new key."""

    def __init__(self, params: PluginParams) -> None:
        self.params = params

    @classmethod
    def job_params(cls, ranking: Any) -> dict[str, Any] | None:
        """Params when this exporter runs in every job with scorers; None: only when the config
        names it under ``exporters``. ``ranking`` is the job's ``ranking`` section, whose keys
        are those of :attr:`ranking_keys` a config still sets (``ranking.get(key)``)."""
        return None

    def export_human(self, labels: HumanLabels) -> pa.Table | None:
        """Rows of this format from what people labelled (every tool's pulls), or None when the
        format has no rows made by people (the default).

        Return a table, even an empty one, to own ``<name>/part-human.parquet``: it is
        rewritten whole from ``labels`` at every pull and every run, and deleted when empty.
        Mark the rows as people's (TRL-style formats add a ``source`` column) if they join
        rows :meth:`export` made."""
        return None

    @abstractmethod
    def export(self, ranked: pa.Table) -> pa.Table | None:
        """Rows of this format from one shard's ranked candidates.

        ``ranked`` has the columns of ``genflow.data.schemas.RANKED``; return ``None``
        or an empty table when the shard yields nothing.
        """


# -- labelling tools: people in the loop ----------------------------------------

LABEL_KINDS = ("rankings", "demonstrations")
"""What a labelling task asks of a person: order a prompt's candidates, or write the answer."""


@dataclass(frozen=True)
class LabelCandidate:
    """One candidate of a ranking task, as a labeller sees it: its text, or its image (PNG)."""

    generation_id: str
    modality: str
    text: str | None = None
    image: bytes | None = None


@dataclass(frozen=True)
class LabelTask:
    """One prompt to label. ``key`` is genflow's name for the task, stable across pushes (the
    prompt and its candidates): a tool keeps it with the task, so pushing again adds nothing.
    ``candidates`` is empty for a demonstration task."""

    key: str
    kind: str
    prompt_id: str
    prompt: str
    candidates: tuple[LabelCandidate, ...] = ()


@dataclass(frozen=True)
class Annotation:
    """A finished annotation of one task by one person.

    ``ranking``: the candidates' generation ids from best to worst (a ranking task; a
    judgement of a pair, "A better than B", is the ranking ``[A, B]``). ``completion``: the
    answer written for a demonstration task. ``annotation_id`` is the tool's id for it,
    unique within the project."""

    key: str
    kind: str
    prompt_id: str
    annotator: str
    created_at: str
    annotation_id: str
    ranking: tuple[str, ...] = ()
    completion: str | None = None


@dataclass(frozen=True)
class HumanRanking:
    """One person's order of some of a prompt's candidates (generation ids), best first."""

    prompt_id: str
    annotator: str
    ranking_id: str
    """``<tool>:<the tool's annotation id>``, unique in the output."""
    order: tuple[str, ...]


@dataclass(frozen=True)
class HumanLabels:
    """What people labelled in a job's output, as :meth:`Exporter.export_human` sees it.

    ``rankings``: every annotation of ``human_rankings/`` (all tools), in a fixed order, of
    candidates the job still has. ``candidates``: those candidates' ``generations/`` rows by
    ``generation_id`` (``prompt_id``, ``prompt``, ``modality``, ``text``, ``image_path``).
    ``demonstrations``: the rows of ``demonstrations/`` (``genflow.data.schemas.DEMONSTRATIONS``)."""

    rankings: tuple[HumanRanking, ...]
    candidates: dict[str, dict[str, Any]]
    demonstrations: pa.Table


@dataclass(frozen=True)
class PushResult:
    """What a push did: tasks created, tasks the project already had, and where people label them."""

    project: str
    created: int
    existing: int
    url: str


class ToolError(Exception):
    """A tool call that cannot be carried out as asked (bad arguments, a program that would
    not start): its message goes back to the model as the call's result, marked an error,
    and the episode goes on, as a real agent's does."""


@dataclass(frozen=True)
class ToolCall:
    """A call the model made in a turn of an episode: OpenAI's ``tool_calls`` entry, its
    ``arguments`` parsed from JSON."""

    id: str
    name: str
    arguments: dict[str, Any]
    raw_arguments: str | None = None
    """The arguments' JSON text as the model wrote it (what the conversation keeps). When it
    is not a JSON object, ``arguments`` is empty and the call is answered as an error."""

    def message(self) -> dict[str, Any]:
        """The call as an entry of an assistant message's ``tool_calls`` (OpenAI format)."""
        raw = self.raw_arguments if self.raw_arguments is not None else json.dumps(self.arguments)
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": raw}}


@dataclass(frozen=True)
class ChatRequest:
    """One turn of an episode, as a request plugin's :meth:`Generator.chat` gets it.

    ``messages`` is the conversation so far in OpenAI's format (the opening, then every
    assistant turn and ``tool`` result); ``tools`` the OpenAI ``tools`` entries the model may
    call (empty: none). ``seed`` is the turn's own, derived from the episode's seed and
    ``turn`` (counted from 1), so an episode replays the same on a deterministic server.
    ``max_tokens``: the most the answer may take, when the episode's token budget is nearer
    than the plugin's own limit (None: no such bound)."""

    generation_id: str
    prompt_id: str
    turn: int
    seed: int
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] = field(default_factory=list)
    max_tokens: int | None = None
    inputs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChatTurn:
    """A model's answer to a :class:`ChatRequest`: its text, the tools it calls, why it stopped
    and the tokens it took (the server's ``usage``)."""

    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    num_tokens: int | None = None

    def message(self) -> dict[str, Any]:
        """The turn as an assistant message of the conversation (OpenAI format)."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [call.message() for call in self.tool_calls]
        return message


@dataclass(frozen=True)
class ToolContext:
    """What a tool knows of the episode it serves: the row's ids and the values of the input
    columns the tool declares in ``input_columns`` (``visible_tests``...)."""

    prompt_id: str
    generation_id: str
    inputs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ToolResult:
    """What a tool call answers: ``content`` is what the model reads as the ``tool`` message
    (genflow cuts it to the episode's bound). ``final`` ends the episode with that answer (the
    ``submit`` tool's code); ``details`` (JSON-able) are kept in the episode's record."""

    content: str
    is_error: bool = False
    final: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


class NoArguments(BaseModel):
    """The arguments of a tool that takes none (a call may send ``{}`` or nothing)."""

    model_config = ConfigDict(extra="forbid")


class Tool(Plugin):
    """A function the model of an episode may call (a generator with ``max_turns`` above 1 and
    a ``tools:`` list naming it).

    ``Arguments`` is a pydantic model of the call's arguments: its JSON schema is what the
    model is shown (OpenAI ``tools``), and a call's arguments are validated against it before
    :meth:`run` sees them (a call that does not fit is answered as an error). :meth:`run` is
    synchronous and may take CPU: genflow runs it off the request loop, on a worker thread,
    under ``timeout_s``. An exception it raises (or a :class:`ToolError`) is answered to the
    model as the call's error; the episode goes on."""

    Arguments: ClassVar[type[BaseModel]] = NoArguments
    timeout_s: ClassVar[float] = 30.0
    ends_episode: ClassVar[bool] = False
    """Whether a call of it ends the episode (``submit``): its result's ``final`` is the answer."""

    def __init__(self, params: PluginParams) -> None:
        self.params = params

    @classmethod
    def schema(cls, name: str) -> dict[str, Any]:
        """The OpenAI ``tools`` entry the model is shown for this tool, registered as ``name``."""
        return {"type": "function", "function": {
            "name": name, "description": (cls.description or (cls.__doc__ or "")).strip().split("\n\n")[0],
            "parameters": cls.Arguments.model_json_schema()}}

    @abstractmethod
    def run(self, arguments: BaseModel, context: ToolContext) -> ToolResult:
        """Carry out one call: ``arguments`` validated as :attr:`Arguments`."""


# -- filters: rows a job leaves out (duplicates, benchmark items) -----------------

FILTER_TARGETS = ("prompts", "candidates")
"""What a job's ``filters:`` entry applies to (its ``applies_to``): the input's prompts, after
they are read and before any generation, or the generated candidates, before scoring."""


@dataclass(frozen=True)
class Removal:
    """A row a :class:`Filter` leaves out: its position in the rows :meth:`Filter.decide` got,
    why (``reason``, a short phrase a person reads in ``filtered/``) and, for a duplicate, the
    position of the row it duplicates (a row that is kept, earlier in the order)."""

    row: int
    reason: str
    duplicate_of: int | None = None


class Filter(Plugin):
    """Leaves rows out of a job: duplicates, near-duplicates, benchmark items.

    A filter works in two steps so it scales to millions of rows with memory bounded by
    signatures, not texts:

    - :meth:`signatures` runs on the Ray workers, a shard's texts at a time, and returns one
      small, Arrow-typed value per text (:attr:`signature_type`): a hash, a MinHash
      signature, an embedding, a set of n-gram hashes. genflow writes them with a marker per
      shard, so a killed job computes again only the shards it had not finished.
    - :meth:`decide` runs once on the driver over every shard's signatures (never the texts)
      and returns the rows to leave out. The rows come in a fixed order, by ``group`` then by
      id, so the first of two duplicates is the one kept, whatever the shards or the workers.

    A filter's object is built once per worker process (``__init__`` may load a model) and
    once on the driver for :meth:`decide`."""

    signature_type: ClassVar[Any] = None
    """The Arrow type of one signature (``pa.uint64()``, ``pa.list_(pa.uint32())``); None lets
    Arrow infer it from the values."""
    batch_size: ClassVar[int] = 4096
    """Texts per :meth:`signatures` call."""

    def __init__(self, params: PluginParams) -> None:
        self.params = params

    @abstractmethod
    def signatures(self, texts: list[str]) -> list[Any] | pa.Array:
        """One signature per text, in order (runs on a Ray worker)."""

    @abstractmethod
    def decide(self, signatures: pa.Array, groups: pa.Array | None) -> list[Removal]:
        """The rows to leave out, given every row's signature in the job's order (the first of
        duplicates is kept). ``groups``, when not None, holds each row's group (a candidate's
        prompt): rows of different groups are never duplicates of each other. Rows with a null
        signature (no text: an image candidate) are never left out."""

    def describe(self) -> dict[str, Any]:
        """What the manifest records of the filter beyond its params (the model it embeds with)."""
        return {}


# -- training: the policy and reward models a job's rankings make ----------------

TRAINING_FORMATS = ("preference", "prompt-completion")
"""The tables a :class:`Trainer` reads, in TRL's column names: ``preference`` rows are
(``prompt``, ``chosen``, ``rejected``), one pair each; ``prompt-completion`` rows are
(``prompt``, ``completion``). Both have a ``prompt_id`` column too."""

TRAINED_KINDS = ("policy", "reward-model")
"""What a trainer's checkpoint is: a policy the job's generator loads by path (its ``model``),
or a reward model that a scorer loads by path (the trainer's :attr:`Trainer.scorer`)."""

TRAINER_ROLES = ("reward-model", "dpo", "best-of-n-sft", "supervised")
"""What a config's ``rounds:`` section trains when it names no trainer: the reward model, a
round's policy by method (``dpo``, ``best-of-n-sft``), the supervised start. A trainer
declares the roles it is the default for in :attr:`Trainer.default_for`."""


class Trainer(Plugin):
    """Trains a model from a job's training data: a reward model from ranked pairs, a policy
    from pairs (DPO) or from best answers (SFT). The name is what a config's ``rounds:``
    section names (``train.trainer``, ``reward.trainer``, ``supervised.trainer``).

    :meth:`train` runs in a Ray worker (a task that reserves the cluster's GPU when it has
    one), never on the driver: it reads the rows of ``data`` (a parquet file or folder in the
    columns of :attr:`data_format`), starts from ``model`` (a path or id that
    ``from_pretrained`` reads) and writes a checkpoint that ``from_pretrained`` reads into
    ``output_dir``, tokenizer included. It returns its metrics (JSON-able numbers), which
    genflow keeps in the round's ``lineage.json``. Training with the same data, model, params
    and ``seed`` on the same hardware should write the same weights: resume relies on it
    where it can."""

    data_format: ClassVar[str] = "preference"
    """Which of :data:`TRAINING_FORMATS` the trainer reads."""
    trains: ClassVar[str] = "policy"
    """Which of :data:`TRAINED_KINDS` its checkpoint is."""
    default_for: ClassVar[tuple[str, ...]] = ()
    """The :data:`TRAINER_ROLES` it fills when a config names no trainer for them."""
    scorer: ClassVar[str | None] = None
    """A reward-model trainer: the scorer plugin that scores with its checkpoints (``model:``
    the checkpoint's path)."""

    def __init__(self, params: PluginParams) -> None:
        self.params = params

    @abstractmethod
    def train(self, data: str, model: str, output_dir: str, seed: int, device: str = "cpu") -> dict[str, Any]:
        """Train from ``data`` starting at ``model``; write the checkpoint to ``output_dir``.

        ``device`` is ``cuda`` where the worker holds a GPU, else ``cpu``. Raise on failure:
        the round fails and a rerun trains again."""


class Labeller(Plugin):
    """A labelling tool (Label Studio...): sends tasks to people and reads back what they did.

    ``genflow label push`` builds :class:`LabelTask` s from a job's output and calls
    :meth:`push`; ``genflow label pull`` calls :meth:`pull` and writes what comes back
    (``human_rankings/``, ``demonstrations/``, and the exporters' human rows, see
    :meth:`Exporter.export_human`). A plugin talks to its tool; it writes nothing to the job's output.
    Its ``Params`` are where the tool is and which environment variable holds the key
    (``secret_env``); ``genflow label --param key=value`` sets them."""

    modality: ClassVar[str] = "any"

    def __init__(self, params: PluginParams) -> None:
        self.params = params

    @abstractmethod
    def push(self, project: str, kind: str, tasks: list[LabelTask]) -> PushResult:
        """Create the project called ``project`` for ``kind`` tasks (see :data:`LABEL_KINDS`), or
        update the one there is, and add the tasks whose ``key`` it does not hold yet."""

    @abstractmethod
    def pull(self, project: str, kind: str) -> list[Annotation]:
        """Every finished (submitted, not skipped) annotation of the project's tasks; a project
        that does not exist is an error naming it."""

"""Job configuration: YAML validated by pydantic before any work starts."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import jinja2
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from genflow.secrets import (
    STORAGE_SECRET_ENV,
    URL_QUERY_VALUE,
    Scrubber,
    data_secrets,
    env_secrets,
    is_secret_key,
    plugin_secrets,
    redact_url,
)


class ConfigError(ValueError):
    """A job config that cannot run; the message names the key and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RequestsSpec(_Strict):
    """How an async (request) plugin's calls are sent: the engine's limits, not the model's params.

    None of these change what is generated, so none is hashed into ids or fingerprints."""

    concurrency: int = Field(64, ge=1, description="Requests in flight at most, across the job; halved on "
                             "429s and grown back on successes.")
    max_retries: int = Field(6, ge=0, description="Times a request that failed transiently (429, 5xx, a "
                             "timeout, a dropped connection) is sent again before it becomes an errors/ row.")
    timeout_s: float = Field(60.0, gt=0, description="Seconds one attempt may take.")
    backoff_s: float = Field(0.5, ge=0, description="First retry's delay; doubles per attempt, with jitter.")
    max_backoff_s: float = Field(30.0, ge=0, description="Longest delay between two attempts.")
    rpm: float | None = Field(None, gt=0, description="Requests per minute at most, for the whole job.")
    tpm: float | None = Field(None, gt=0, description="Tokens (prompt + completion) per minute at most, "
                              "for the whole job.")
    cache: str | None = Field(None, description="The response cache's folder or s3:// prefix for this stage: "
                              "the job's cache.path (or $GENFLOW_CACHE) unless set here (docs/batch-and-cache.md).")
    mode: Literal["live", "batch"] = Field("live", description="live: each request sent as it comes; batch: a "
                                           "pack's requests through the provider's Batch API, at its batch "
                                           "price, answered within completion_window (docs/batch-and-cache.md).")
    poll_s: float = Field(60.0, gt=0, description="batch: the longest wait between two looks at a running batch "
                          "(the first is within 2 s, then the waits grow to this).")
    completion_window: str = Field("24h", description="batch: the provider's completion window.")
    max_resubmits: int = Field(2, ge=0, description="batch: times failed and expired lines are sent again in a "
                               "new batch before they become errors/ rows.")
    max_batch_requests: int = Field(50_000, ge=1, description="batch: requests per batch at most (the "
                                    "provider's limit); more are split over several batches.")
    max_batch_bytes: int = Field(200_000_000, ge=1024, description="batch: bytes per input file at most.")
    batch_journal: str | None = Field(None, description="batch: where the ids of the stage's batches are "
                                      "journaled; unset: the output's _state/batches/<label>.")


class PriceSpec(_Strict):
    """What a model's tokens cost, in the currency of the user's choice, per million tokens."""

    input_per_mtok: float = Field(0.0, ge=0)
    output_per_mtok: float = Field(0.0, ge=0)
    batch_input_per_mtok: float | None = Field(None, ge=0)
    """The price through the provider's Batch API (``requests.mode: batch``); None: half ``input_per_mtok``."""
    batch_output_per_mtok: float | None = Field(None, ge=0)
    batch: bool = Field(False, exclude=True)
    """Set by genflow on a stage in batch mode: :meth:`cost` uses the batch prices."""

    def rates(self) -> tuple[float, float]:
        """(input, output) per million tokens, as this stage's requests are sent."""
        if not self.batch:
            return self.input_per_mtok, self.output_per_mtok
        return (self.input_per_mtok / 2 if self.batch_input_per_mtok is None else self.batch_input_per_mtok,
                self.output_per_mtok / 2 if self.batch_output_per_mtok is None else self.batch_output_per_mtok)

    def cost(self, prompt_tokens: int | None, completion_tokens: int | None) -> float:
        rate_in, rate_out = self.rates()
        return ((prompt_tokens or 0) * rate_in + (completion_tokens or 0) * rate_out) / 1e6


UNHASHED_SPEC_KEYS = {"requests", "price"}
"""Keys of a generator's or scorer's entry that change no output: left out of its fingerprint."""


LABEL_CHARACTERS = "letters, digits, '.', '_' and '-' (no '..')"
_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")


def is_safe_name(value: str) -> bool:
    """Letters, digits, ``.``, ``_`` and ``-`` only, with no ``..``: a name that stays one path
    component on every filesystem and bucket, and can never climb out of its folder. A config's
    labels must be such names; :func:`genflow.data.names.path_component` hashes any other value."""
    return bool(_SAFE_NAME.fullmatch(value)) and ".." not in value and value != "."


def _label_name(value: str) -> str:
    """A label names files and folders of the output (``scores/part-00000-<label>.parquet``):
    an allow-list of characters, so none can climb out of the job's folder."""
    if not is_safe_name(value):
        raise ValueError(f"label {value!r} must be a name of {LABEL_CHARACTERS}")
    return value


class FilterSpec(_Strict):
    """A filter of a job's ``filters:`` list: a filter plugin and what it leaves out of
    (``applies_to``). Filters of one ``applies_to`` run in the list's order, each on what the
    ones before it kept (docs/filters.md)."""

    plugin: str
    applies_to: Literal["prompts", "candidates"]
    label: str | None = None
    """Names the filter in ``filtered/`` and its stage (default: the plugin's name)."""
    params: dict[str, Any] = Field(default_factory=dict)
    column: str | None = None
    """The column whose text the filter reads: default ``prompt`` for prompts, ``text`` for candidates."""
    across_prompts: bool = False
    """On candidates: compare candidates of different prompts too (default: a prompt's own only)."""

    @field_validator("label")
    @classmethod
    def _label_is_a_name(cls, v: str | None) -> str | None:
        return _label_name(v) if v is not None else v

    @property
    def name(self) -> str:
        return self.label or self.plugin

    @property
    def text_column(self) -> str:
        return self.column or ("prompt" if self.applies_to == "prompts" else "text")


class ToolSpec(_Strict):
    """A tool a generator's episodes may call: a registered tool's name, and its params."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class UserSpec(_Strict):
    """A simulated user (a generator's ``user``): a second model that writes the next user turn of
    a conversation, given a persona or goal and the conversation with the roles swapped
    (:mod:`genflow.engine.users`). Exactly one of ``persona``, ``persona_column`` and ``template``."""

    plugin: str
    model: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    persona: str | None = None
    """The same persona or goal for every row."""
    persona_column: str | None = None
    """The input column holding each row's persona."""
    template: str | None = None
    """A Jinja2 template of the persona, with the row's columns as variables."""
    turns: int = Field(2, ge=2)
    """User turns of a conversation, the opening prompt the first: it ends (``finish_reason:
    turns``) once the assistant answered the last."""

    @model_validator(mode="after")
    def _one_persona(self) -> UserSpec:
        given = [k for k in ("persona", "persona_column", "template") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a simulated user needs exactly one of persona (a text), persona_column (a column "
                             f"of the input) or template (Jinja2 over the row); got {', '.join(given) or 'none'}")
        if self.template is not None:
            try:
                jinja2.Environment().parse(self.template)
            except jinja2.TemplateSyntaxError as exc:
                raise ValueError(f"template: {exc}") from None
        return self

    def reads(self) -> set[str]:
        """The row's columns the persona is made of (its column, or its template's variables)."""
        if self.persona_column is not None:
            return {self.persona_column}
        if self.template is not None:
            from jinja2 import meta

            return set(meta.find_undeclared_variables(jinja2.Environment().parse(self.template)))
        return set()


SINGLE_TURN = {"tools": [], "max_turns": 1, "max_episode_tokens": None, "user": None}
"""Keys of a generator's entry that make it run episodes, at the values of one answer per
request: left out of its fingerprint while they hold them, so an output made before episodes
existed is still the output of the same config."""


class GeneratorSpec(_Strict):
    label: str
    plugin: str
    model: str | None = None
    samples: int = Field(1, ge=1)
    seed: int | None = None
    template: str | None = None
    """Jinja2 template for the prompt, with the row's columns as variables."""
    batch_size: int | None = Field(None, ge=1)
    params: dict[str, Any] = Field(default_factory=dict)
    requests: RequestsSpec = Field(default_factory=RequestsSpec)
    """For plugins that send requests (``async def generate``): concurrency, retries, rate limits."""
    price: PriceSpec | None = None
    max_turns: int = Field(1, ge=1)
    """Assistant turns an episode may take: above 1, each request is a conversation whose
    model may call ``tools`` and read their results before it answers."""
    tools: list[ToolSpec] = Field(default_factory=list)
    """Tools the episodes may call: names of registered tools (``genflow plugins`` lists
    them), or ``{name, params}``."""
    max_episode_tokens: int | None = Field(None, ge=1)
    """Completion tokens an episode may spend over all its turns: the turn that reaches it
    ends the episode (``finish_reason: length``). null = no bound but ``max_turns``."""
    user: UserSpec | None = None
    """A simulated user: each episode is a conversation of ``user.turns`` user turns, the
    next one written by this model after each answer without tool calls."""

    @field_validator("label")
    @classmethod
    def _label_is_a_name(cls, v: str) -> str:
        if v == "input":
            raise ValueError("label 'input' is taken: it names the candidates the input rows carry")
        return _label_name(v)

    @field_validator("tools", mode="before")
    @classmethod
    def _tool_names(cls, v: Any) -> Any:
        """A tool given by its name alone takes its default params."""
        return [{"name": t} if isinstance(t, str) else t for t in v] if isinstance(v, list) else v

    @field_validator("tools")
    @classmethod
    def _tools_need_turns(cls, v: list[ToolSpec], info: ValidationInfo) -> list[ToolSpec]:
        max_turns = info.data.get("max_turns")  # validated first (declared first); None: it was invalid
        if v and max_turns is not None and max_turns < 2:
            raise ValueError(f"{', '.join(t.name for t in v)} would never be called: a tool's result is read "
                             f"in the turn after the call, and max_turns is {max_turns}; give the generator "
                             f"max_turns above 1 (e.g. max_turns: 8)")
        names = [t.name for t in v]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} named twice; the model calls a tool by its name, so each "
                             f"may be offered once")
        return v


class ScorerSpec(_Strict):
    plugin: str
    label: str | None = None
    model: str | None = None
    weight: float = 1.0
    batch_size: int | None = Field(None, ge=1)
    params: dict[str, Any] = Field(default_factory=dict)
    requests: RequestsSpec = Field(default_factory=RequestsSpec)
    price: PriceSpec | None = None

    @field_validator("label")
    @classmethod
    def _label_is_a_name(cls, v: str | None) -> str | None:
        return None if v is None else _label_name(v)

    @property
    def name(self) -> str:
        return self.label or self.plugin


class RankingSpec(BaseModel):
    """Deprecated: where exporters' params lived before they moved under ``exporters``.

    Candidates are ranked by the scorers' weighted scores; what is made of the ranking is the
    exporters' business, with their params under ``exporters: {NAME: {...}}``. A key set here
    is one an exporter still reads (its ``ranking_keys``, through its ``job_params``); a config
    that sets one validates with a warning naming the key that replaces it, and a key no
    exporter reads is an error."""

    model_config = ConfigDict(extra="allow")

    def get(self, key: str, default: Any = None) -> Any:
        """The value of a deprecated key, as the config gave it."""
        return (self.model_extra or {}).get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in (self.model_extra or {})


class LabellingSpec(_Strict):
    """What people's labels (``genflow label pull``) do to the training data."""

    human_rows: Literal["beside", "instead"] = "beside"
    """``beside``: the exporters' human rows join their model-made ones; ``instead``: for a
    prompt people labelled, theirs are its only rows in an exporter's folder."""


class RaySpec(_Strict):
    address: str | None = None
    workers: int = Field(2, ge=1)
    batch_size: int | None = Field(None, ge=1)
    """Items per Ray call for every stage that sets none itself; None = each plugin's own
    ``batch_size`` (a class attribute the plugin declares; ``genflow plugins --params NAME`` shows it)."""
    gpus_per_worker: float = Field(0.0, ge=0.0)
    max_restarts: int = Field(2, ge=0)
    """How many worker-process deaths a row may be part of before it becomes an ``errors/`` row.
    The worker is restarted after each death, and a batch that kills its worker is retried in
    halves, so the row doing it is isolated first and never given up on while it shares a batch."""
    max_worker_deaths: int = Field(100, ge=0)
    """Worker restarts one plugin may need in one run before the stage stops: past it the
    plugin is crashing on everything, not on a few rows."""


class StorageSpec(_Strict):
    """How ``s3://`` inputs and outputs are reached; the fields are ``Storage.open``'s keywords."""

    endpoint_url: str | None = None
    region: str | None = None
    anonymous: bool = False
    """Unsigned requests (a public bucket): no credentials are sent."""


def _absolute(path: str) -> str:
    """A local path as a worker elsewhere reads it (a URI as it is)."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


class CacheSpec(_Strict):
    """The response cache a job's request stages share with other jobs (docs/batch-and-cache.md)."""

    path: str = Field(description="A folder or an s3:// prefix; the same one for every job that may reuse "
                      "answers. Unset: $GENFLOW_CACHE, else no cache.")


class ScheduleSpec(_Strict):
    cron: str
    timezone: str = "UTC"


class TrainSpec(_Strict):
    """A trainer and its params (``genflow plugins --params NAME`` lists them); no trainer: the
    one installed for the role (a trainer's ``default_for``)."""

    trainer: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class RewardSpec(TrainSpec):
    """The reward model of a job's rounds: trained from the job's rankings, or one that exists
    (``model``: a path or id its scorer loads)."""

    model: str | None = None
    base: str | None = None
    """The model the reward model starts from (a head is added): default, the policy's."""
    scorer: str | None = None
    """The scorer plugin that scores with it: default, the one its trainer names."""
    scorer_params: dict[str, Any] = Field(default_factory=dict)
    weight: float = 1.0
    """Its weight among the scorers that rank each round's candidates."""

    @model_validator(mode="after")
    def _trained_or_given(self) -> RewardSpec:
        if self.model is not None and (self.trainer is not None or self.params or self.base is not None):
            raise ValueError("give either model (an existing reward model) or trainer/params/base (one to train)")
        return self


class SupervisedSpec(TrainSpec):
    """A supervised start before the rounds: the policy trained on people's ``demonstrations/``
    (``data: demonstrations``), on the best candidate of each ranking of the reward model's data
    (``best-of-n``), or on the first of these there is (``auto``)."""

    data: Literal["auto", "demonstrations", "best-of-n"] = "auto"


ROUND_METHODS = {"dpo": ("iterative-dpo", "preference"), "best-of-n-sft": ("best-of-n-sft", "prompt-completion")}
"""A round's ``method``: the name written in the outputs (none of these is PPO) and the rows its
trainer reads. The method is also the trainer's role (``genflow.api.TRAINER_ROLES``)."""


class RoundsSpec(_Strict):
    """Rounds of policy optimisation (docs/rounds.md): a reward model from the job's rankings,
    an optional supervised start, then ``count`` rounds in which policy k generates on fresh
    prompts, the reward model (and the job's scorers) rank its candidates, and policy k+1 is
    trained on them."""

    count: int = Field(3, ge=1)
    """Policies trained after the first; one more round only generates, for its held-out figures."""
    per_run: int | None = Field(None, ge=1)
    """At most this many new rounds a run (a scheduled deployment's nightly round): rounds already
    in ``rounds.parquet`` are not counted; the first run's also trains the reward model (and the
    supervised start). None: a run does every round up to ``count``."""
    method: Literal["dpo", "best-of-n-sft"] = "dpo"
    prompts_per_round: int = Field(32, ge=1)
    heldout_prompts: int = Field(16, ge=1)
    """Prompts kept out of every training set: the reward model's accuracy and each policy's
    held-out reward are measured on them."""
    pairs: Literal["all", "best-worst"] = "best-worst"
    """A round's pairs per ranking of K candidates: its best and worst, or all K choose 2."""
    job_scorers: bool = True
    """Whether the job's own scorers rank each round's candidates beside the reward model."""
    reward: RewardSpec = Field(default_factory=RewardSpec)
    supervised: SupervisedSpec | None = None
    train: TrainSpec = Field(default_factory=TrainSpec)

    @property
    def method_name(self) -> str:
        return ROUND_METHODS[self.method][0]


def exporter_switches(value: Any) -> Any:
    """``exporters``' values as the config means them: ``true`` and null run the exporter with its
    default params (``{}``), ``false`` turns it off, a mapping gives its params."""
    if isinstance(value, dict):
        return {name: {} if params is None or params is True else params for name, params in value.items()}
    return value


class JobConfig(_Strict):
    name: str
    input: str
    output: str
    shard_rows: int = Field(1024, ge=1)
    """Prompts per shard: the unit of resume and of Prefect task runs (one per stage and shard).
    1024 keeps a job at a few dozen task runs per 10k prompts (Prefect is slow with thousands)
    while a kill loses at most one shard's work per stage."""
    seed: int = 0
    generators: list[GeneratorSpec] = Field(default_factory=list)
    scorers: list[ScorerSpec] = Field(default_factory=list)
    ranking: RankingSpec = Field(default_factory=RankingSpec)
    labelling: LabellingSpec = Field(default_factory=LabellingSpec)
    exporters: dict[str, dict[str, Any] | Literal[False]] = Field(default_factory=dict)
    """Exporters by name, with their params: those that run by default (``genflow plugins`` lists
    the exporters) take their params from here, others run when named. ``NAME: {}`` (or ``true``,
    or null) runs one with its default params; ``NAME: false`` turns off one that runs by default."""
    ray: RaySpec = Field(default_factory=RaySpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    max_error_fraction: float = Field(0.1, ge=0.0, le=1.0)
    max_cost: float | None = Field(None, ge=0)
    """The job stops cleanly once its requests have cost this much (with each stage's ``price``)."""
    sweep: dict[str, list[Any]] = Field(default_factory=dict)
    schedule: ScheduleSpec | None = None
    rounds: RoundsSpec | None = None
    """Rounds of policy optimisation against a reward model (docs/rounds.md); None: one job."""
    filters: list[FilterSpec] = Field(default_factory=list)
    """Filters that leave prompts out before generation, or candidates out before scoring (docs/filters.md)."""
    cache: CacheSpec | None = None
    """The response cache of the job's request stages (else ``$GENFLOW_CACHE``; docs/batch-and-cache.md)."""

    @field_validator("exporters", mode="before")
    @classmethod
    def _exporter_switches(cls, v: Any) -> Any:
        return exporter_switches(v)

    @model_validator(mode="after")
    def _cache_everywhere(self) -> JobConfig:
        """Each request stage's ``requests.cache``: its own, else the job's, else ``$GENFLOW_CACHE``."""
        path = self.cache.path if self.cache is not None else os.environ.get("GENFLOW_CACHE", "").strip()
        specs: list[GeneratorSpec | ScorerSpec] = [*self.generators, *self.scorers]
        for spec in specs:
            if path and spec.requests.cache is None:
                spec.requests.cache = _absolute(path)
            if spec.requests.mode == "batch":
                label = spec.label if isinstance(spec, GeneratorSpec) else spec.name
                if isinstance(spec, GeneratorSpec) and spec.max_turns > 1:
                    raise ValueError(f"generator {label}: requests.mode batch sends one answer per request; an "
                                     "episode's turns (max_turns above 1) wait on each other: use mode: live")
                if spec.price is not None:
                    spec.price.batch = True
        return self

    @model_validator(mode="after")
    def _unique_labels(self) -> JobConfig:
        for what, names in (("generators", [g.label for g in self.generators]),
                            ("scorers", [s.name for s in self.scorers])):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{what} labels must be unique; repeated: {', '.join(dupes)}")
        for target in ("prompts", "candidates"):
            names = [f.name for f in self.filters if f.applies_to == target]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"filters: two filters of {target} are named {', '.join(dupes)}; give them labels")
        for i, f in enumerate(self.filters):
            if f.label is None and not is_safe_name(f.plugin):
                raise ValueError(f"filters.{i}: plugin {f.plugin!r} cannot name the filter's files; give it a "
                                 f"label of {LABEL_CHARACTERS}")
            if f.across_prompts and f.applies_to == "prompts":
                raise ValueError(f"filters.{i}.across_prompts: only a filter of candidates compares across prompts")
        for i, s in enumerate(self.scorers):
            if s.label is None and not is_safe_name(s.plugin):
                raise ValueError(f"scorers.{i}: plugin {s.plugin!r} cannot name the scorer's files; give it a "
                                 f"label of {LABEL_CHARACTERS}")
        if self.scorers and sum(s.weight for s in self.scorers) == 0:
            raise ValueError("scorers: the weights sum to zero, so every candidate would get the same combined "
                             "score; give the scorers weights that do not cancel out")
        return self

    def stage_dict(self, *keys: str) -> dict[str, Any]:
        return {k: _jsonable(getattr(self, k)) for k in keys}


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def request_settings(spec: GeneratorSpec | ScorerSpec, output: str) -> dict[str, Any]:
    """What a stage's request worker is given: its ``requests``, and in batch mode where its
    batches are journaled, ``_state/batches/<label>`` of the run's output (``output``, resolved)."""
    settings = spec.requests.model_dump()
    if spec.requests.mode == "batch" and not settings.get("batch_journal"):
        label = spec.label if isinstance(spec, GeneratorSpec) else spec.name
        settings["batch_journal"] = f"{_absolute(output).rstrip('/')}/_state/batches/{label}"
    return settings


def resolve_output(output: str, now: datetime | None = None) -> str:
    """Fill ``{date}`` / ``{datetime}`` in an output path (scheduled jobs)."""
    now = now or datetime.now(timezone.utc)
    return output.replace("{date}", now.strftime("%Y-%m-%d")).replace("{datetime}", now.strftime("%Y-%m-%dT%H%M%S"))


def stable_hash(value: Any, length: int = 16) -> str:
    """Hash of a JSON-able value, independent of dict order."""
    data = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(data.encode()).hexdigest()[:length]


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.0.c`` in nested dicts/lists (used by --set and sweeps)."""
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            try:
                idx = int(part)
                node[idx]
            except (ValueError, IndexError):
                raise ConfigError(f"{dotted}: {part!r} is not an index of a list of {len(node)}") from None
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"{dotted}: cannot descend into {'.'.join(parts[:i])}, it is a {type(node).__name__}")


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(f"--set {text}: the value is not valid YAML ({problem}); quote it to set a "
                          f"string: --set '{key.strip()}=\"...\"'") from None


def load_raw(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a job config is a YAML mapping, got {type(data).__name__}")
    return data


def build_config(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = (),
                 source: str = "config") -> JobConfig:
    data = copy.deepcopy(data)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(data, key, value)
    try:
        config = JobConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source} is not a valid genflow job:\n{_format_errors(exc)}") from None
    validate_plugins(config, source)
    return config


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    return build_config(load_raw(path), overrides, source=str(path))


def validate_plugins(config: JobConfig, source: str = "config") -> None:
    """Check each plugin name exists, is installed with what it requires, and its params fit
    its ``Params`` model."""
    from genflow.registry import PluginError, get_registry

    registry = get_registry()
    problems = []
    # (kind, the key naming the plugin, the key holding its params, plugin, params); an
    # exporter is named by its key under ``exporters`` and its params sit right below it.
    specs: list[tuple[str, str, str, str, dict[str, Any]]] = [
        ("generator", f"generators.{i}.plugin", f"generators.{i}.params", g.plugin, g.params)
        for i, g in enumerate(config.generators)]
    specs += [("generator", f"generators.{i}.user.plugin", f"generators.{i}.user.params", g.user.plugin,
               g.user.params) for i, g in enumerate(config.generators) if g.user is not None]  # a simulated user
    specs += [("scorer", f"scorers.{i}.plugin", f"scorers.{i}.params", s.plugin, s.params)
              for i, s in enumerate(config.scorers)]
    specs += [("filter", f"filters.{i}.plugin", f"filters.{i}.params", f.plugin, f.params)
              for i, f in enumerate(config.filters)]
    specs += [("exporter", f"exporters.{name}", f"exporters.{name}", name, params)
              for name, params in config.exporters.items() if params is not False]
    for kind, plugin_key, params_key, name, params in specs:
        try:
            info = registry.get(kind, name)
        except PluginError as exc:
            problems.append(f"  {plugin_key}: {exc}")
            continue
        if not info.available:  # its Params may import what is missing
            problems.append(f"  {plugin_key}: {info.unavailable_reason()}")
            continue
        try:
            validated = info.factory.Params.model_validate(params)
        except ValidationError as exc:
            for line in _format_errors(exc).splitlines():
                problems.append(f"  {params_key}.{line.strip()}")
            continue
        if (problem := _two_credentials(info.factory, validated, params)) is not None:
            problems.append(f"  {params_key}: {problem}")
        if kind != "exporter":  # a plugin with two backends: what the one these params pick needs
            import dataclasses

            from genflow.registry import missing_distributions

            chosen = info.factory.implementation(params)
            missing = missing_distributions(tuple(chosen.requires)) if chosen is not info.factory else ()
            if missing:
                problems.append(f"  {plugin_key}: "
                                f"{dataclasses.replace(info, factory=chosen, missing=missing).unavailable_reason()}")
    problems += _episode_problems(config, registry) if not problems else []
    problems += _ranking_problems(config, registry, check_params=not problems)
    problems += _rounds_problems(config, registry) if config.rounds is not None and not problems else []
    if problems:
        raise ConfigError(f"{source} is not a valid genflow job:\n" + "\n".join(problems))


def _episode_problems(config: JobConfig, registry: Any) -> list[str]:
    """A generator with ``max_turns`` above 1 runs episodes: its plugin must answer turns."""
    from genflow.api import runs_episodes

    problems = []
    for i, g in enumerate(config.generators):
        if g.max_turns > 1 and not runs_episodes(registry.get("generator", g.plugin).factory.implementation(g.params)):
            problems.append(f"  generators.{i}.max_turns: the {g.plugin!r} plugin answers one request at a time; "
                            "episodes need a plugin that answers turns (one with `chat`: a server's client, or a "
                            "local model's with a chat template): set max_turns: 1 "
                            "or use one")
        if g.user is not None:
            problems += _user_problems(i, g, registry)
    return problems


def _user_problems(i: int, g: GeneratorSpec, registry: Any) -> list[str]:
    """A simulated user's model must answer turns, and the episode must have room for its turns."""
    from genflow.api import runs_episodes

    assert g.user is not None
    problems = []
    if not runs_episodes(registry.get("generator", g.user.plugin).factory.implementation(g.user.params)):
        problems.append(f"  generators.{i}.user.plugin: the {g.user.plugin!r} plugin answers one request at a "
                        "time; a simulated user needs a plugin that answers turns (one with `chat`: a server's "
                        "client, or a local model's with a chat template)")
    if g.max_turns < g.user.turns:
        problems.append(f"  generators.{i}.max_turns: {g.user.turns} user turns (user.turns) need at least "
                        f"{g.user.turns} assistant turns, one answer each, and max_turns is {g.max_turns}; set "
                        f"max_turns: {g.user.turns} (more when the assistant calls tools)")
    return problems


def round_trainers(rounds: RoundsSpec, registry: Any) -> dict[str, tuple[str, dict[str, Any]]]:
    """The trainers a job's rounds run, by config key (``rounds.train``, ``rounds.reward``,
    ``rounds.supervised``): (the trainer's name, its params). A key that names no trainer
    takes the one installed for its role (raises ``PluginError`` when there is none)."""
    wanted: list[tuple[str, TrainSpec, str]] = [("rounds.train", rounds.train, rounds.method)]
    if rounds.reward.model is None:
        wanted.append(("rounds.reward", rounds.reward, "reward-model"))
    if rounds.supervised is not None:
        wanted.append(("rounds.supervised", rounds.supervised, "supervised"))
    return {key: (spec.trainer or registry.default_trainer(role).name, spec.params) for key, spec, role in wanted}


def _rounds_problems(config: JobConfig, registry: Any) -> list[str]:
    """What makes a job's ``rounds`` unrunnable: its trainers (each known, installed, its params
    valid, training the right kind from the method's rows), one generator whose model the rounds
    replace, rankings to train the reward model from, and an output on a filesystem."""
    from genflow.registry import PluginError

    rounds = config.rounds
    assert rounds is not None
    problems = []
    if len(config.generators) != 1:
        problems.append(f"  generators: rounds train one policy, so the job has one generator "
                        f"(it has {len(config.generators)})")
    elif not config.generators[0].model:
        problems.append("  generators.0.model: rounds start from the generator's model: give its path")
    if "://" in config.output:
        problems.append("  output: rounds write checkpoints into the output folder, which must be a path on a "
                        "(shared) filesystem, not a URI")
    if "{date}" in config.output:
        problems.append("  output: rounds add to one output run after run (rounds.per_run, a schedule): "
                        "give it without {date}")
    if rounds.reward.model is None and not config.scorers:
        problems.append("  rounds.reward: training a reward model needs the job's rankings: give the job scorers, "
                        "or an existing reward model as rounds.reward.model")
    needs = {"rounds.train": ("policy", ROUND_METHODS[rounds.method][1]),
             "rounds.reward": ("reward-model", "preference"), "rounds.supervised": ("policy", "prompt-completion")}
    try:
        trainers = round_trainers(rounds, registry)
    except PluginError as exc:
        return [*problems, f"  rounds: {exc}"]
    for key, (name, params) in trainers.items():
        try:
            info = registry.get("trainer", name)
        except PluginError as exc:
            problems.append(f"  {key}.trainer: {exc}")
            continue
        if not info.available:
            problems.append(f"  {key}.trainer: {info.unavailable_reason()}")
            continue
        trains, rows = needs[key]
        if (info.factory.trains, info.factory.data_format) != (trains, rows):
            problems.append(f"  {key}.trainer: {name!r} trains a {info.factory.trains} from "
                            f"{info.factory.data_format} rows; {key} needs a {trains} trained from {rows} rows"
                            + (f" (method {rounds.method})" if key == "rounds.train" else ""))
            continue
        try:
            info.factory.Params.model_validate(params)
        except ValidationError as exc:
            problems += [f"  {key}.params.{line.strip()}" for line in _format_errors(exc).splitlines()]
        if key == "rounds.reward" and rounds.reward.scorer is None and info.factory.scorer is None:
            problems.append(f"  rounds.reward.scorer: trainer {name!r} names no scorer for its checkpoints: "
                            "name the scorer plugin that loads them")
    scorer = rounds.reward.scorer
    if scorer is not None:
        try:
            registry.get("scorer", scorer)
        except PluginError as exc:
            problems.append(f"  rounds.reward.scorer: {exc}")
    elif rounds.reward.model is not None:
        problems.append("  rounds.reward.scorer: an existing reward model needs the scorer plugin that loads it")
    return problems


def job_exporters(config: JobConfig | dict[str, Any], registry: Any = None) -> dict[str, dict[str, Any]]:
    """The exporters a job runs, with their params as their ``Params`` read them (defaults filled
    in): each whose ``job_params`` says it runs by default, unless ``exporters`` turns it off,
    then the others ``exporters`` names; params from ``exporters`` first, else ``job_params``'s
    (from the deprecated ``ranking`` keys). ``config`` may be a job's config as its manifest
    holds it (labelling reads it)."""
    if registry is None:
        from genflow.registry import get_registry

        registry = get_registry()
    if isinstance(config, dict):
        ranking = RankingSpec.model_validate(config.get("ranking") or {})
        chosen = exporter_switches(config.get("exporters") or {})
    else:
        ranking, chosen = config.ranking, config.exporters
    found: dict[str, dict[str, Any]] = {}
    for info in registry.all():
        if info.kind == "exporter" and info.name not in chosen:
            params = info.factory.job_params(ranking)
            if params is not None:
                found[info.name] = params
    found.update({name: params for name, params in chosen.items() if params is not False})
    out = {}
    for name, params in found.items():
        factory = registry.get("exporter", name).factory
        out[name] = factory.Params.model_validate(params).model_dump()
    return out


def _ranking_problems(config: JobConfig, registry: Any, check_params: bool) -> list[str]:
    """The deprecated ``ranking`` keys: each still read, with a warning naming where it went (and
    ignored, with another, when its exporter's params are set under ``exporters``); a key no
    exporter reads, or a value its exporter's ``Params`` refuse, is a problem."""
    import logging

    log = logging.getLogger(__name__)
    problems = []
    readers = {key: (info, moved) for info in registry.all() if info.kind == "exporter"
               for key, moved in info.factory.ranking_keys.items()}
    for key, value in (config.ranking.model_extra or {}).items():
        if key not in readers:
            problems.append(f"  ranking.{key}: unknown key")
            continue
        info, moved = readers[key]
        if info.name in config.exporters:
            log.warning("ranking.%s is deprecated, and ignored: exporters.%s is set", key, info.name)
        else:
            log.warning("ranking.%s is deprecated: %s", key, moved)
        params = info.factory.job_params(RankingSpec.model_validate({key: value})) if check_params else None
        try:
            info.factory.Params.model_validate(params or {})
        except ValidationError as exc:
            inside = isinstance(value, dict)  # a section of its own: the problem's path goes on inside it
            for err in exc.errors():
                path = ".".join(str(p) for p in err["loc"]) if inside else ""
                msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
                problems.append(f"  ranking.{key}{'.' + path if path else ''}: {msg}")
    return problems


def _two_credentials(factory: Any, validated: Any, params: dict[str, Any]) -> str | None:
    """Why params that give a key twice cannot run: a URL's ``user:password@`` beside a key the
    plugin reads from the environment (``api_key_env``); the request could carry only one."""
    names = factory.secret_env(validated)
    urls = sorted({key for key, value in _strings(params) if _URL_USER_INFO.search(value)})
    if not names or not urls:
        return None
    return (f"{urls[0]} holds credentials (user:password@) and the key in ${names[0]} is sent too, but a request "
            "carries one: keep the URL without its user-info, or the key variable out")


def _strings(data: Any, where: str = "") -> list[tuple[str, str]]:
    """Every string in ``data`` with its dotted key (``base_url.1``)."""
    if isinstance(data, dict):
        return [s for k, v in data.items() for s in _strings(v, f"{where}.{k}" if where else str(k))]
    if isinstance(data, list | tuple):
        return [s for i, v in enumerate(data) for s in _strings(v, f"{where}.{i}" if where else str(i))]
    return [(where, data)] if isinstance(data, str) else []


_URL_USER_INFO = re.compile(r"(?<=://)[^/?#@\s]+@")


def redacted(data: Any) -> Any:
    """The config as JSON-able data with secret-looking values replaced by ``***``, and the
    user-info of every URL in it (``http://user:pass@host``) by ``***``."""
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    if isinstance(data, dict):
        return {k: ("***" if is_secret_key(str(k)) else redacted(v)) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [redacted(v) for v in data]
    if isinstance(data, str):
        return redact_url(data)
    return data


def hides_secrets(data: Any) -> bool:
    """Whether ``redacted`` data hides something: a secret-named ``***``, a URL's ``***@`` or ``?api_key=***``."""
    if isinstance(data, dict):
        return any((is_secret_key(str(k)) and v == "***") or hides_secrets(v) for k, v in data.items())
    if isinstance(data, list | tuple):
        return any(hides_secrets(v) for v in data)
    return isinstance(data, str) and ("://***@" in data or any(
        m.group(2) == "***" and is_secret_key(m.group(1)) for m in URL_QUERY_VALUE.finditer(data)))


def redacted_urls(data: Any) -> Any:
    """JSON-able data with the user-info of every URL in its strings hidden (keys kept)."""
    if isinstance(data, dict):
        return {k: redacted_urls(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [redacted_urls(v) for v in data]
    return redact_url(data) if isinstance(data, str) else data


def job_secrets(config: JobConfig, environ: Mapping[str, str] | None = None) -> Scrubber:
    """Every secret a job holds: its config's (each plugin's params, URLs anywhere), its plugins'
    ``secret_env`` values and the storage's keys."""
    from genflow.registry import PluginError, get_registry

    secrets = data_secrets(config.model_dump(mode="json"))
    registry = get_registry()
    specs = [("generator", f"generators.{i}.params", g.plugin, g.params) for i, g in enumerate(config.generators)]
    specs += [("scorer", f"scorers.{i}.params", s.plugin, s.params) for i, s in enumerate(config.scorers)]
    specs += [("exporter", f"exporters.{name}", name, params) for name, params in config.exporters.items()
              if params is not False]
    for kind, where, name, params in specs:
        try:
            factory = registry.get(kind, name).factory
            factory = factory.implementation(params) if kind != "exporter" else factory
        except PluginError:
            continue
        secrets += plugin_secrets(factory, params, where, environ)
    return Scrubber(secrets + env_secrets(STORAGE_SECRET_ENV, environ))

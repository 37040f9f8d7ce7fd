"""Where a job's files live and what vouches for them: the one owner of the output layout.

Every name below an output folder is built here, and parsed back here: the stages
of a job (a :class:`Stage` per generator, scorer and the rank step), the part files
each (stage, shard) writes, the ``_state/`` marker that records it finished, and
the fingerprint that says whether a marker still holds for the job as configured.
The flow, resume, sweeps and the report all go through this module; nothing else
writes a part name with an f-string or slices one apart.

```
prompts/part-00000.parquet               the shard's input rows
generations/part-00000-<label>.parquet   one per generator (label ``input``: the rows' own candidates)
scores/part-00000-<scorer>.parquet       one per scorer
rankings/part-00000.parquet              and ``<exporter>/part-00000.parquet`` per exporter
errors/part-<stage kind>-<label>-00000.parquet
filtered/part-00000-<prompts|candidates>.parquet   rows the job's filters left out, and why
_signatures/<target>.<filter>/part-00000.parquet   a filter's signatures of a shard's rows
images/<prompt_id>/<generation_id>.png   (an id that is no safe name: its hash, see ``path_component``)
human_rankings/part-<tool>.parquet       what people ranked, pulled from a labelling tool
demonstrations/part-<tool>.parquet       what people wrote
<exporter>/part-human.parquet            an exporter's rows made from people's labels
_labelling/<tool>.json                   the projects pushed to a labelling tool
_state/<stage>/00000.json                the marker of a finished (stage, shard)
_state/filtered/<prompts|candidates>.json   the record of the filters' decision over every shard
_state/lease.json                        the job writing the folder now (genflow.data.lease)
_journal/<stage>/00000-<fingerprint>/    answered requests of a shard not finished yet
```
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from genflow.api import sends_requests
from genflow.config import SINGLE_TURN, UNHASHED_SPEC_KEYS, GeneratorSpec, stable_hash
from genflow.data.model_identity import model_identity
from genflow.data.names import is_safe_name, path_component
from genflow.data.storage import Storage, is_remote, read_bytes
from genflow.registry import PluginError, get_registry

if TYPE_CHECKING:
    from genflow.config import JobConfig, ScorerSpec

PROMPTS = "prompts"
GENERATIONS = "generations"
SCORES = "scores"
RANKINGS = "rankings"
ERRORS = "errors"
IMAGES = "images"
STATE = "_state"
LEASE = f"{STATE}/lease.json"
JOURNAL = "_journal"
MANIFEST = "manifest.json"
HUMAN_RANKINGS = "human_rankings"
DEMONSTRATIONS = "demonstrations"
LABELLING = "_labelling"
FILTERED = "filtered"
SIGNATURES = "_signatures"
HUMAN_FOLDERS = (HUMAN_RANKINGS, DEMONSTRATIONS)
"""The folders ``genflow label pull`` writes; no job stage writes or removes them."""
HUMAN_PART = "part-human.parquet"
"""The name of the human-made part in an exporter's folder: not a shard's, so no stage
overwrites it."""
EXPORT_FORMAT = 2
"""Version of the exporters' columns, in the rank fingerprint: 2 added ``source``."""
CORE_FOLDERS = (PROMPTS, GENERATIONS, SCORES, RANKINGS)
"""The folders of parts every job may write, before its exporters' folders and ``errors/``."""

INPUT_LABEL = "input"
"""The generator label of candidates the input rows carry (``response`` / ``responses``)."""

SHARD_DIGITS = 5
_PART = re.compile(r"^part-(?P<body>.+)\.parquet$")
@dataclass(frozen=True)
class Shard:
    """A slice of the input, ``shard_rows`` prompts: the unit of resume."""

    index: int
    fingerprint: str
    rows: int

    @property
    def name(self) -> str:
        return f"{self.index:0{SHARD_DIGITS}d}"


def shard_name(index: int) -> str:
    return f"{index:0{SHARD_DIGITS}d}"


@dataclass(frozen=True)
class Stage:
    """A step of a job that writes parts per shard: ``prompts``, ``generate/<label>``,
    ``score/<scorer>`` or ``rank``."""

    kind: str
    label: str = ""

    def __post_init__(self) -> None:
        # Labels come from the config (checked there with a message); this is the last line of defence.
        for part in (self.kind, self.label):
            if part and not is_safe_name(part):
                raise ValueError(f"{part!r} cannot name a stage: use letters, digits, '.', '_' and '-'")

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.label}" if self.label else self.kind

    @property
    def run_name(self) -> str:
        """The stage in a Prefect task run's name: ``generate-<label>``, ``rank``."""
        return f"{self.kind}-{self.label}" if self.label else self.kind

    @classmethod
    def parse(cls, name: str) -> Stage:
        kind, _, label = name.partition("/")
        return cls(kind, label)

    def marker(self, index: int) -> str:
        return f"{STATE}/{self.name}/{shard_name(index)}.json"

    def marker_folder(self) -> str:
        return f"{STATE}/{self.name}"

    def journal_folder(self, index: int, fingerprint: str) -> str:
        """Where a request stage's answers for a shard wait until its parts are written."""
        return f"{JOURNAL}/{self.name}/{shard_name(index)}-{fingerprint}"

    def part(self, index: int, folder: str | None = None) -> str:
        """The main part this stage writes for a shard (``folder``: an exporter's, for ``rank``)."""
        shard = shard_name(index)
        if self.kind == "prompts":
            return f"{PROMPTS}/part-{shard}.parquet"
        if self.kind == "generate":
            return f"{GENERATIONS}/part-{shard}-{self.label}.parquet"
        if self.kind == "score":
            return f"{SCORES}/part-{shard}-{self.label}.parquet"
        if self.kind == "filter":
            return f"{SIGNATURES}/{self.label}/part-{shard}.parquet"
        return f"{folder or RANKINGS}/part-{shard}.parquet"

    def errors_part(self, index: int) -> str:
        return f"{ERRORS}/part-{self.kind}-{self.label}-{shard_name(index)}.parquet"

    def own_parts(self, index: int) -> list[str]:
        """Every part name a generate or score stage may write for a shard."""
        return [self.part(index), self.errors_part(index)]


PROMPTS_STAGE = Stage("prompts")
RANK_STAGE = Stage("rank")


def generate_stage(label: str) -> Stage:
    return Stage("generate", label)


def score_stage(name: str) -> Stage:
    return Stage("score", name)


def filter_stage(applies_to: str, label: str) -> Stage:
    """``filter/<prompts|candidates>.<label>``: a filter's signatures of each shard's rows."""
    return Stage("filter", f"{applies_to}.{label}")


def filtered_part(index: int, applies_to: str) -> str:
    """``filtered/part-00000-prompts.parquet``: the rows of a shard the filters of ``applies_to`` left out."""
    return f"{FILTERED}/part-{shard_name(index)}-{applies_to}.parquet"


def filter_record(applies_to: str) -> str:
    """``_state/filtered/prompts.json``: the filters' decision over every shard, with its counts."""
    return f"{STATE}/{FILTERED}/{applies_to}.json"


@dataclass(frozen=True)
class PartName:
    """A part file's name taken apart: its folder, shard and the label in it (if any)."""

    folder: str
    shard: int
    label: str = ""
    stage_kind: str = ""
    """For ``errors/`` parts: the kind of stage that wrote it."""


def parse_part(rel: str) -> PartName | None:
    """``generations/part-00003-tiny.parquet`` -> (generations, 3, tiny); None for other files."""
    folder, base = posixpath.split(rel)
    found = _PART.match(base)
    if not found:
        return None
    body = found["body"]
    if folder == ERRORS:
        kind, _, rest = body.partition("-")
        label, _, shard = rest.rpartition("-")
        return PartName(folder, int(shard), label, kind) if _is_shard(shard) else None
    shard, _, label = body.partition("-")
    return PartName(folder, int(shard), label) if _is_shard(shard) else None


def _is_shard(text: str) -> bool:
    return len(text) == SHARD_DIGITS and text.isdigit()


def parse_marker(rel: str) -> int | None:
    """The shard index of a marker file's name, or None for another file."""
    base = posixpath.basename(rel)
    stem = base[:-len(".json")] if base.endswith(".json") else ""
    return int(stem) if stem.isdigit() else None


def labelled_part(folder: str, tool: str) -> str:
    """``human_rankings/part-<tool>.parquet``: what one labelling tool's projects gave."""
    return f"{folder}/part-{path_component(tool)}.parquet"


def human_part(folder: str) -> str:
    """``<exporter>/part-human.parquet``: an exporter's rows made from people's labels."""
    return f"{folder}/{HUMAN_PART}"


def labelling_record(tool: str) -> str:
    """``_labelling/<tool>.json``: the projects this output was pushed to."""
    return f"{LABELLING}/{path_component(tool)}.json"


def image_path(prompt_id: str, generation_id: str) -> str:
    """Where a generated image lies: ids from the dataset never become a path unescaped."""
    return f"{IMAGES}/{path_component(prompt_id)}/{path_component(generation_id)}.png"


def is_job_file(path: str) -> bool:
    """A path inside the job's output (an image a generator wrote), not one of the input's."""
    return path.startswith(f"{IMAGES}/")


def resolve_input_path(value: Any, base_dir: str) -> Any:
    """A relative path in an input row is relative to the input's folder; URIs and absolute paths stay."""
    if isinstance(value, str) and value and not is_remote(value) and not posixpath.isabs(value):
        return posixpath.join(base_dir, value)
    return value


def overlapping(input_uri: str, output_uri: str) -> bool:
    """Whether the input and the output share files: one is the other, or lies inside it (a job
    would read its own outputs back as prompts, or write over its input). Local paths are
    compared resolved (links, ``..``); ``s3://`` prefixes by their folders."""
    def place(uri: str) -> tuple[str, tuple[str, ...]]:
        if uri.startswith("file://"):
            uri = uri[len("file://"):]
        if is_remote(uri):
            scheme, _, rest = uri.partition("://")
            return scheme, tuple(p for p in rest.split("/") if p)
        return "file", tuple(p for p in os.path.realpath(os.path.expanduser(uri)).split(os.sep) if p)

    (fs_in, a), (fs_out, b) = place(input_uri), place(output_uri)
    shorter = min(len(a), len(b))
    return fs_in == fs_out and a[:shorter] == b[:shorter]


def candidate_image(storage: Storage, path: str, base_dir: str) -> bytes:
    """The PNG of an image candidate: one a generator wrote lies in the job's ``images/``; one
    the input carried is a path relative to the input's folder, or a URI."""
    if is_job_file(path):
        return storage.read_bytes(path)
    return read_bytes(resolve_input_path(path, base_dir))


# -- fingerprints: what a marker vouches for ------------------------------------

def hashed_spec(spec: GeneratorSpec | ScorerSpec, unhashed_params: tuple[str, ...] = (),
                exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A generator's or scorer's entry as it counts for fingerprints: without what changes no
    output (its request limits and price, the plugin's ``unhashed_params``), its model by what
    it is rather than how its path is spelt (:func:`genflow.data.model_identity.model_identity`),
    and its episode keys while they say one answer a request (``SINGLE_TURN``)."""
    data = spec.model_dump(mode="json", exclude=set(UNHASHED_SPEC_KEYS | exclude))
    for key, one_answer in SINGLE_TURN.items():  # a generator of one answer a request hashes as before episodes
        if key in data and data[key] == one_answer:
            del data[key]
    data["params"] = hashed_params(spec.params, unhashed_params)
    data["model"] = model_identity(spec.model, served=serves_model_by_name(spec))
    return data


def serves_model_by_name(spec: GeneratorSpec | ScorerSpec) -> bool:
    """Whether the spec's plugin sends requests: its ``model`` is a name a server knows, not a
    folder here (:func:`genflow.data.model_identity.model_identity`). A plugin not installed
    here has no shards to plan: its model counts as a folder when there is one."""
    kind = "generator" if isinstance(spec, GeneratorSpec) else "scorer"
    try:
        factory = get_registry().get(kind, spec.plugin).factory.implementation(spec.params)
    except PluginError:
        return False
    return sends_requests(factory)


def hashed_params(params: dict[str, Any], unhashed_params: tuple[str, ...] = ()) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k not in unhashed_params}


def generation_fingerprint(shard: Shard, spec: GeneratorSpec, config: JobConfig,
                           unhashed_params: tuple[str, ...] = ()) -> str:
    return stable_hash([shard.fingerprint, hashed_spec(spec, unhashed_params), config.seed])


def input_candidates_fingerprint(shard: Shard) -> str:
    return stable_hash([shard.fingerprint, "input-candidates"])


def score_fingerprint(generation_fps: list[str], spec: ScorerSpec, unhashed_params: tuple[str, ...] = ()) -> str:
    return stable_hash([generation_fps, hashed_spec(spec, unhashed_params, frozenset({"weight"}))])


def rank_fingerprint(generation_fps: list[str], score_fps: list[str], weights: dict[str, float],
                     exporters: dict[str, Any], human_rows: str = "beside") -> str:
    """``human_rows``: ``instead`` leaves the prompts people labelled out of the exporters'
    parts, so going back to ``beside`` must write them whole again."""
    return stable_hash([generation_fps, score_fps, weights, exporters, EXPORT_FORMAT, human_rows])


@dataclass(frozen=True)
class ShardPlan:
    """The stages of a job for one shard, each with the fingerprint its marker must hold."""

    shard: Shard
    generate: list[tuple[Stage, str]]
    score: list[tuple[Stage, str]]
    rank: tuple[Stage, str] | None

    def stages(self) -> list[tuple[Stage, str]]:
        return [*self.generate, *self.score, *([self.rank] if self.rank else [])]


def plan_shard(shard: Shard, config: JobConfig, exporters: dict[str, Any],
               unhashed: dict[str, tuple[str, ...]] | None = None) -> ShardPlan:
    """Every (stage, fingerprint) of a shard for this config: a stage's fingerprint chains
    the fingerprints of the stages it reads, so a change redoes exactly what depends on it.
    ``unhashed``: each stage's plugin's ``unhashed_params``, by stage name."""
    unhashed = unhashed or {}
    if config.generators:
        generate = [(stage := generate_stage(g.label),
                     generation_fingerprint(shard, g, config, unhashed.get(stage.name, ())))
                    for g in config.generators]
    else:
        generate = [(generate_stage(INPUT_LABEL), input_candidates_fingerprint(shard))]
    gen_fps = [fp for _, fp in generate]
    score = [(stage := score_stage(s.name), score_fingerprint(gen_fps, s, unhashed.get(stage.name, ())))
             for s in config.scorers]
    rank = None
    if config.scorers:
        weights = {s.name: s.weight for s in config.scorers}
        rank = (RANK_STAGE, rank_fingerprint(gen_fps, [fp for _, fp in score], weights, exporters,
                                             config.labelling.human_rows))
    return ShardPlan(shard, generate, score, rank)


def generator_labels(config: JobConfig) -> list[str]:
    """Labels of the generations a job's shards hold (``input`` when it has no generators)."""
    return [g.label for g in config.generators] or [INPUT_LABEL]


def params_key(params: dict[str, Any], unhashed_params: tuple[str, ...] = ()) -> str:
    """A generator's params as they are written to ``generations/`` (all of them) and hashed
    into ids (without the plugin's ``unhashed_params``)."""
    return json.dumps(hashed_params(params, unhashed_params), sort_keys=True)

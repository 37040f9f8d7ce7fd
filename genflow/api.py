"""What a plugin sees: requests in, candidates and scores out.

Generators, scorers and exporters are classes. genflow validates a job's
``params`` against the class's ``Params`` model before any work starts, then builds
one instance per Ray worker (the constructor loads the model) and calls it with
batches. Everything here is plain data so batches travel cheaply to workers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import pyarrow as pa

MODALITIES = ("text", "code", "image")


class PluginParams(BaseModel):
    """Base for a plugin's ``params``: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class RowError(Exception):
    """A failure that concerns one request only (bad image, missing tests...).

    A plugin may return an instance in place of a result; genflow writes it to
    ``errors/`` and goes on. Any other exception raised for a batch makes genflow
    retry the batch's rows one by one to find the rows that fail.
    """


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
    """Other known input columns of the row: tests, entry_point, image, mask, reference..."""


@dataclass
class Generation:
    """A generated candidate. Exactly one of ``text`` and ``image`` is set."""

    text: str | None = None
    image: bytes | None = None
    """PNG bytes; genflow stores them under ``images/<prompt_id>/<generation_id>.png``."""
    num_tokens: int | None = None
    finish_reason: str | None = None


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


@dataclass
class Score:
    value: float
    details: dict[str, Any] = field(default_factory=dict)


class _Plugin(ABC):
    Params: ClassVar[type[PluginParams]] = PluginParams
    description: ClassVar[str] = ""
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


class Generator(_Plugin):
    modality: ClassVar[str] = "text"

    @abstractmethod
    def generate(self, requests: list[GenerationRequest]) -> list[Generation | RowError]:
        """Return one result per request, in the same order."""

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


class Scorer(_Plugin):
    modalities: ClassVar[tuple[str, ...]] = ("text", "code")

    @abstractmethod
    def score(self, items: list[ScoreItem]) -> list[Score | RowError]:
        """Return one score per item, in the same order (higher is better)."""

    @classmethod
    def summarize(cls, scores: pa.Table, params: PluginParams) -> dict[str, Any]:
        """Job-level metrics from all of this scorer's rows (e.g. pass@k)."""
        return {}

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


class Exporter(ABC):
    Params: ClassVar[type[PluginParams]] = PluginParams
    description: ClassVar[str] = ""
    modality: ClassVar[str] = "any"

    def __init__(self, params: PluginParams) -> None:
        self.params = params

    @abstractmethod
    def export(self, ranked: pa.Table) -> pa.Table | None:
        """Rows of this format from one shard's ranked candidates.

        ``ranked`` has the columns of ``genflow.schemas.RANKED``; return ``None``
        or an empty table when the shard yields nothing.
        """

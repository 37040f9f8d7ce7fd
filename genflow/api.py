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


class Scorer(_Plugin):
    modalities: ClassVar[tuple[str, ...]] = ("text", "code")

    @abstractmethod
    def score(self, items: list[ScoreItem]) -> list[Score | RowError]:
        """Return one score per item, in the same order (higher is better)."""

    @classmethod
    def summarize(cls, scores: pa.Table, params: PluginParams) -> dict[str, Any]:
        """Job-level metrics from all of this scorer's rows (e.g. pass@k)."""
        return {}

    @staticmethod
    def batch_key(item: ScoreItem) -> Any:
        """Where an item goes when a shard is cut into ``score`` calls: items whose keys sort
        close together share a call. By default a prompt's candidates stay together (a scorer
        that embeds the prompt does it once per call) and prompts of similar length share one.
        A scorer that reads prompt and candidate as one sequence should key on their joint
        length, so that its batches pad little."""
        return (len(item.prompt), item.prompt_id, len(item.text or ""))


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

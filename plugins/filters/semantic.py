"""``semantic-dedup``: leaves out a text whose embedding is within a cosine ``threshold`` of an earlier one's.

Embeddings come from any sentence-transformers model (the bundled MiniLM by default), computed
on the workers. The decision finds each row's nearest neighbours in a faiss HNSW index (an
approximate-nearest-neighbour graph: near-linear in rows, where comparing every pair is
quadratic), or exactly for small sets and within a prompt's candidates. Why faiss:
benchmarks/README.md (bench_dedup).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field

from genflow import hookimpl
from genflow.api import Filter, PluginParams, Removal
from genflow.hookspecs import Register
from genflow.plugins.filters.clusters import first_of_clusters
from genflow.plugins.shared.sentence_embedding import BUNDLED_MINILM, SENTENCE_REQUIRES, embed, sentence_encoder

EXACT_BELOW = 20_000
"""Rows under which the decision compares every pair (a matrix product) rather than build an index."""


class SemanticParams(PluginParams):
    threshold: float = Field(0.95, gt=0.0, le=1.0, description="Cosine similarity of the embeddings at or "
                             "above which a text is a duplicate of an earlier one.")
    model: str = Field(BUNDLED_MINILM, description="A sentence-transformers model (path or id); default: the "
                       "bundled MiniLM.")
    neighbours: int = Field(16, ge=1, description="Neighbours the index returns per row (more: slower, and "
                            "finds more of a large cluster's members).")
    micro_batch: int | None = Field(None, ge=1, description="Texts per forward pass; null = 16 on a CPU.")
    device: str = Field("cpu", description="Where the model runs on a worker: cpu or cuda.")


class SemanticDedup(Filter):
    """Leaves out a text whose embedding has cosine similarity >= threshold with an earlier one's."""

    Params: ClassVar[type[PluginParams]] = SemanticParams
    description: ClassVar[str] = "semantic duplicates: cosine similarity of sentence embeddings, ANN index"
    requires: ClassVar[tuple[str, ...]] = (*SENTENCE_REQUIRES, "faiss-cpu", "numpy")
    extra: ClassVar[str | None] = "dedup"
    batch_size: ClassVar[int] = 256
    params: SemanticParams

    def __init__(self, params: SemanticParams) -> None:
        super().__init__(params)
        self._encoder: Any = None

    def describe(self) -> dict[str, Any]:
        return {"model": self.params.model}

    def signatures(self, texts: list[str]) -> list[Any] | pa.Array:
        if self._encoder is None:
            self._encoder = sentence_encoder(self.params.model, self.params.device)
        vectors = np.asarray(embed(self._encoder, texts, self.params.micro_batch), np.float32)
        return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1])

    def decide(self, signatures: pa.Array, groups: pa.Array | None) -> list[Removal]:
        valid = np.asarray(signatures.is_valid().to_numpy(zero_copy_only=False), bool)
        rows = np.flatnonzero(valid)
        if len(rows) < 2:
            return []
        present = signatures.filter(pa.array(valid)) if len(rows) < len(signatures) else signatures
        vectors = np.array(present.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(len(rows), -1)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        if groups is not None:
            codes = np.asarray(groups.dictionary_encode().indices.to_numpy(zero_copy_only=False))[rows]
            pairs = _pairs_within_groups(vectors, codes, self.params.threshold)
        elif len(rows) < EXACT_BELOW:
            pairs = _pairs_exact(vectors, np.arange(len(rows)), self.params.threshold)
        else:
            pairs = _pairs_ann(vectors, self.params.threshold, self.params.neighbours)
        kept = first_of_clusters(pairs)
        out = []
        for row in sorted(kept):
            root = kept[row]
            sim = float(vectors[row] @ vectors[root])
            out.append(Removal(int(rows[row]), f"semantic duplicate: cosine {sim:.3f} >= {self.params.threshold}",
                               int(rows[root])))
        return out


def _pairs_exact(vectors: np.ndarray, members: np.ndarray, threshold: float,
                 chunk: int = 2048) -> list[tuple[int, int]]:
    """Every pair (earlier, later) of ``members`` at or above the threshold, by matrix products."""
    pairs = []
    sub = vectors[members]
    for start in range(0, len(members), chunk):
        sims = sub[start:start + chunk] @ sub.T
        a, b = np.nonzero(sims >= threshold)
        a = a + start
        keep = b < a
        pairs += list(zip(members[b[keep]].tolist(), members[a[keep]].tolist(), strict=True))
    return pairs


def _pairs_within_groups(vectors: np.ndarray, codes: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    pairs: list[tuple[int, int]] = []
    for members in np.split(order, bounds):
        if len(members) > 1:
            pairs += _pairs_exact(vectors, np.sort(members), threshold)
    return pairs


def _pairs_ann(vectors: np.ndarray, threshold: float, neighbours: int) -> list[tuple[int, int]]:
    """Pairs found among each row's ``neighbours`` nearest in a faiss HNSW index (inner product of
    unit vectors: cosine)."""
    import faiss

    index = faiss.IndexHNSWFlat(vectors.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 80
    index.hnsw.efSearch = max(64, 2 * neighbours)
    index.add(vectors)
    sims, found = index.search(vectors, min(neighbours + 1, len(vectors)))
    similar = (sims >= threshold) & (found >= 0)
    a = np.repeat(np.arange(len(vectors)), found.shape[1])[similar.reshape(-1)]
    b = found.reshape(-1)[similar.reshape(-1)].astype(np.int64)
    keep = a != b
    return list(zip(np.minimum(a, b)[keep].tolist(), np.maximum(a, b)[keep].tolist(), strict=True))


@hookimpl
def register_filters(register: Register) -> None:
    register("semantic-dedup", SemanticDedup)

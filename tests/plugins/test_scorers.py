"""hf-reward and embedding-sim: batched scores equal one-by-one scores; keys in the model's tokens."""

from __future__ import annotations

import math
from typing import Any

import pytest

from genflow.api import RowError, Score, ScoreItem
from genflow.plugins.text.embedding import EmbeddingSimParams, EmbeddingSimScorer
from genflow.plugins.text.reward import HFRewardParams, HFRewardScorer

PROMPTS = ["Hello", "Write a short poem about the sea", "Why is the sky blue at noon?"]
ANSWERS = ["Hi there.", "Waves roll in under a pale moon, and the gulls sleep.", "Rayleigh scattering.",
           "", "Because blue light scatters more than red light does in the air, at every hour."]


def items(**inputs: Any) -> list[ScoreItem]:
    return [ScoreItem(f"g{p}-{a}", f"p{p}", prompt, "text", answer, inputs=dict(inputs))
            for p, prompt in enumerate(PROMPTS) for a, answer in enumerate(ANSWERS)]


def values(scores: list[Score | RowError]) -> list[float]:
    assert all(isinstance(s, Score) for s in scores)
    return [s.value for s in scores if isinstance(s, Score)]


@pytest.fixture(scope="module")
def reward(tiny_models: dict[str, str]) -> HFRewardScorer:
    return HFRewardScorer(tiny_models["tiny-reward"], HFRewardParams(micro_batch=4))


def test_reward_batched_equals_one_by_one(reward: HFRewardScorer) -> None:
    batch = items()
    batched = values(reward.score(batch))
    alone = [values(reward.score([i]))[0] for i in batch]
    assert batched == pytest.approx(alone, abs=1e-5)
    assert len(set(batched)) > len(PROMPTS)  # real scores, not a constant


def test_reward_keys_are_joint_token_lengths(reward: HFRewardScorer) -> None:
    batch = items()
    lengths = [len(reward.tokenizer(i.prompt + (i.text or ""))["input_ids"]) for i in batch]
    assert reward.batch_keys(batch) == lengths


def test_reward_truncates_long_sequences_and_says_so(tiny_models: dict[str, str]) -> None:
    short = HFRewardScorer(tiny_models["tiny-reward"], HFRewardParams(max_length=12))
    batch = items()
    scores = short.score(batch)
    tokens = [short.tokenizer(short.text_of(i))["input_ids"] for i in batch]
    flags = [s.details["truncated"] for s in scores if isinstance(s, Score)]
    assert flags == [len(t) > 12 for t in tokens] and any(flags) and not all(flags)
    assert short.batch_keys(batch) == [min(len(t), 12) for t in tokens]
    # A truncated sequence scores as its first 12 tokens do.
    cut = next(i for i, flag in enumerate(flags) if flag)
    head = short.tokenizer.decode(tokens[cut][:12])
    alone = values(short.score([ScoreItem("x", "x", head, "text", "")]))[0]
    assert values(scores)[cut] == pytest.approx(alone, abs=1e-5)


@pytest.fixture(scope="module")
def embedding() -> EmbeddingSimScorer:
    return EmbeddingSimScorer(None, EmbeddingSimParams(micro_batch=3))


def test_embedding_batched_equals_one_by_one_cosines(embedding: EmbeddingSimScorer) -> None:
    import numpy as np

    batch = items()
    batched = values(embedding.score(batch))

    def vector(text: str) -> Any:
        return embedding.encoder.encode([text], normalize_embeddings=True, convert_to_numpy=True,
                                        show_progress_bar=False)[0]

    alone = [float(np.dot(vector(i.prompt), vector(i.text or ""))) for i in batch]
    assert batched == pytest.approx(alone, abs=1e-5)
    assert all(-1.0 - 1e-6 <= v <= 1.0 + 1e-6 for v in batched) and not all(math.isclose(v, 0) for v in batched)


def test_embedding_against_reference_needs_one(embedding: EmbeddingSimScorer) -> None:
    scorer = EmbeddingSimScorer(None, EmbeddingSimParams(against="reference"))
    scorer.encoder = embedding.encoder  # the same model, loaded once
    reference = "The sky is blue because of scattering."
    batch = items(reference=reference)
    with_ref = values(scorer.score(batch))

    def vector(text: str) -> Any:
        return scorer.encoder.encode([text], normalize_embeddings=True, convert_to_numpy=True,
                                     show_progress_bar=False)[0]

    # Scored against the reference, not the prompt: equal prompts' rows differ only by their answers.
    assert with_ref == pytest.approx([float(vector(reference) @ vector(i.text or "")) for i in batch], abs=1e-5)
    missing = scorer.score(items())
    assert all(isinstance(s, RowError) and "no reference" in str(s) for s in missing)


def test_default_keys_keep_a_prompts_candidates_together(embedding: EmbeddingSimScorer) -> None:
    from genflow.stages import call_batches

    batch = items()
    calls = call_batches(batch, embedding.batch_keys(batch), len(ANSWERS))
    assert [{i.prompt_id for i in call} for call in calls] == [{"p1"}, {"p2"}, {"p0"}]  # longest prompt first

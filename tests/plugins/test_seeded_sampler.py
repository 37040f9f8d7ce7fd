"""hf-text's per-row seeded sampling: the batched draw is torch.multinomial's, row by row."""

from __future__ import annotations

import pytest
import torch

from genflow.plugins.shared.causal_lm import SeededSampler, seeded_draws


def _probs(rows: int, vocab: int, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    probs = torch.softmax(torch.randn(rows, vocab, generator=gen) * 3, dim=-1)
    probs[1] = 0.0
    probs[1, 7] = 1.0  # one certain token
    probs[2, : vocab // 2] = 0.0  # a truncated (top-p style) row
    return probs


def test_seeded_draws_match_multinomial_per_row_over_many_steps() -> None:
    seeds = [11, 12, 13, 14, 15]
    ours = [torch.Generator().manual_seed(s) for s in seeds]
    reference = [torch.Generator().manual_seed(s) for s in seeds]
    for step in range(200):
        probs = _probs(len(seeds), 97, step)
        expected = torch.stack([torch.multinomial(probs[i], 1, generator=g)[0] for i, g in enumerate(reference)])
        assert torch.equal(seeded_draws(probs, ours), expected), f"step {step}"


def test_a_rows_draws_do_not_depend_on_its_batch() -> None:
    alone = SeededSampler([5], temperature=0.8, top_p=0.9, top_k=0)
    batched = SeededSampler([3, 5, 9], temperature=0.8, top_p=0.9, top_k=0)
    for step in range(50):
        scores = torch.randn(3, 64, generator=torch.Generator().manual_seed(step))
        one = alone(torch.zeros(1, 1, dtype=torch.long), scores[1:2]).argmax(dim=-1)
        three = batched(torch.zeros(3, 1, dtype=torch.long), scores).argmax(dim=-1)
        assert one[0] == three[1]


def test_invalid_probabilities_raise_like_multinomial() -> None:
    probs = torch.full((2, 8), 0.125)
    probs[0, 3] = float("nan")
    with pytest.raises(RuntimeError, match="probability tensor"):
        seeded_draws(probs, [torch.Generator(), torch.Generator()])

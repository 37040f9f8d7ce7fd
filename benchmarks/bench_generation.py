"""Tokens/s: genflow's batched hf-text generator vs a per-prompt ``model.generate`` loop.

Both sides use the same model object, the same prompts, the same sampling
(temperature 0.8, top-p 0.95, one seed per prompt) and produce exactly
``--new-tokens`` tokens per prompt: EOS (and the pad token, which a random tiny
model sometimes samples) is banned on both through the model's
``generation_config`` (``min_new_tokens``, ``suppress_tokens``). genflow's side is
what the generate stage does: the plugin's ``batch_keys`` (token lengths), calls
cut from the sorted prompts (``genflow.stages.call_batches``), one ``generate``
per call, all prompts three times; the baseline's single pass is cut into three chunks that alternate with
them, so both sides see the same stretch of machine noise; genflow's median pass
counts. Torch uses the same thread count on both sides (``--threads``, default 1: what
each of two Ray workers gets on a 2-core machine).

Also reported: padding efficiency of genflow's batches (real prompt tokens /
padded tokens), the same for unsorted batches and for calls cut by character
length, and whether greedy decoding gives the same text batched and one by one.

    python -m benchmarks.bench_generation [--quick] [--prompts 1000] [--new-tokens 32]
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Comparison,
    at_least,
    base_parser,
    causal_lm,
    emit,
    log,
    quiet_environment,
    run_as_genflow_worker,
    synthetic_prompts,
    timer,
)

TARGETS = {"tiny-gpt2": 8.0, "gpt2-4x256": 3.0}
PADDING_TARGET = 0.85
PASSES = 3
TEMPERATURE, TOP_P = 0.8, 0.95


def padding_efficiency(batches: list[list[int]]) -> float:
    """Real prompt tokens / tokens after left-padding each batch to its longest prompt."""
    real = sum(sum(b) for b in batches)
    padded = sum(max(b) * len(b) for b in batches if b)
    return real / padded if padded else 1.0


def one_by_one(model: Any, tokenizer: Any, prompts: list[str], seeds: list[int], new_tokens: int,
               greedy: bool = False) -> tuple[int, list[str]]:
    """The bare loop: one ``generate`` call per prompt, seeded with ``torch.manual_seed``."""
    import torch

    tokens, texts = 0, []
    sampling: dict[str, Any] = ({"do_sample": False} if greedy else
                                {"do_sample": True, "temperature": TEMPERATURE, "top_p": TOP_P})
    with torch.inference_mode():
        for prompt, seed in zip(prompts, seeds, strict=True):
            encoded = tokenizer(prompt, return_tensors="pt")
            torch.manual_seed(seed)
            out = model.generate(**encoded, max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 **sampling)
            new = out[0, encoded["input_ids"].shape[1]:]
            tokens += int(new.shape[0])
            texts.append(tokenizer.decode(new, skip_special_tokens=True))
    return tokens, texts


def compare(model_name: str, model_path: str, prompts: list[str], new_tokens: int, threads: int,
            check_greedy: int) -> Comparison:
    import torch

    from genflow.api import Generation, GenerationRequest, RowError
    from genflow.plugins.text.generator import HFTextGenerator, HFTextParams
    from genflow.stages import call_batches

    generator = HFTextGenerator(model_path, HFTextParams(max_new_tokens=new_tokens, temperature=TEMPERATURE,
                                                         top_p=TOP_P))
    torch.set_num_threads(threads)  # the constructor sets the worker's share; both sides get the same
    model, tokenizer = generator.model, generator.tokenizer
    # Equal token counts: no EOS before new_tokens on either side, and no pad token either (genflow
    # strips trailing pads when it decodes; a random tiny model samples one now and then).
    model.generation_config.min_new_tokens = new_tokens
    model.generation_config.suppress_tokens = [tokenizer.pad_token_id]

    batches: list[list[int]] = []
    run_batch = generator._generate_batch

    def recording(ids: list[list[int]], seeds: list[int]) -> list[tuple[str, int, str]]:
        batches.append([len(i) for i in ids])
        return run_batch(ids, seeds)

    setattr(generator, "_generate_batch", recording)  # noqa: B010 - count the padding genflow really does

    requests = [GenerationRequest(f"g{i}", f"p{i}", p, 0, 1000 + i) for i, p in enumerate(prompts)]
    seeds = [r.seed for r in requests]
    generator.generate(requests[:4])  # warm-up, both sides share the model
    one_by_one(model, tokenizer, prompts[:2], seeds[:2], new_tokens)
    batches.clear()
    calls = type(generator).batch_size

    def as_a_job(reqs: list[GenerationRequest]) -> list[Generation | RowError]:
        """The generate stage's way: calls cut by the plugin's batch_keys, one generate() each."""
        out: list[Generation | RowError] = []
        for call in call_batches(reqs, generator.batch_keys(reqs), calls):
            out += generator.generate(call)
        return out

    # genflow: all prompts through the generate stage's calls, PASSES times;
    # baseline: one pass, cut into PASSES chunks that alternate with genflow's passes, so both
    # sides see the same stretch of machine noise. genflow's median pass counts.
    ours_s: list[float] = []
    base_s = 0.0
    base_tokens = 0
    chunk_size = -(-len(requests) // PASSES)
    for n, start in enumerate(range(0, len(requests), chunk_size)):
        batches.clear()
        with timer() as t:
            results = as_a_job(requests)
        ours_s.append(t[0])
        ours_tokens = sum(r.num_tokens or 0 for r in results if isinstance(r, Generation))
        chunk = requests[start:start + chunk_size]
        with timer() as t:
            tokens, _ = one_by_one(model, tokenizer, [r.prompt for r in chunk], [r.seed for r in chunk],
                                   new_tokens)
        base_s += t[0]
        base_tokens += tokens
        log(f"{model_name}: pass {n + 1}/{PASSES}: genflow {ours_tokens / ours_s[-1]:,.0f} tokens/s; "
            f"baseline {base_tokens / base_s:,.0f} tokens/s so far")
    expected = len(requests) * new_tokens
    if ours_tokens != expected or base_tokens != expected:
        raise RuntimeError(f"unequal token counts: genflow {ours_tokens}, baseline {base_tokens}, "
                           f"expected {expected}")
    ours_median = statistics.median(ours_s)

    sorted_efficiency = padding_efficiency(batches)
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    micro = generator.params.micro_batch
    unsorted_efficiency = padding_efficiency([lengths[i:i + micro] for i in range(0, len(lengths), micro)])
    by_chars = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # calls cut by character length
    chars_efficiency = padding_efficiency([[lengths[i] for i in by_chars[j:j + calls]]
                                           for j in range(0, len(by_chars), calls)])

    details: dict[str, Any] = {
        "model": model_name, "parameters": sum(p.numel() for p in model.parameters()),
        "prompts": len(prompts), "new_tokens_per_prompt": new_tokens, "tokens_each_side": expected,
        "torch_threads": threads, "micro_batch": micro, "call_size": calls,
        "genflow_s": [round(x, 3) for x in ours_s], "baseline_s": round(base_s, 3),
        "padding_efficiency": round(sorted_efficiency, 4),
        "padding_efficiency_unsorted": round(unsorted_efficiency, 4),
        "padding_efficiency_calls_by_characters": round(chars_efficiency, 4),
        "padding_target": f">= {PADDING_TARGET}", "padding_met": sorted_efficiency >= PADDING_TARGET,
    }
    if check_greedy:
        generator.params = HFTextParams(max_new_tokens=new_tokens, temperature=0)
        sample = requests[:check_greedy]
        ours_text = [r.text for r in as_a_job(sample) if isinstance(r, Generation)]
        _, base_text = one_by_one(model, tokenizer, [r.prompt for r in sample], [r.seed for r in sample],
                                  new_tokens, greedy=True)
        details["greedy_identical"] = f"{sum(a == b for a, b in zip(ours_text, base_text, strict=True))}" \
                                      f"/{len(sample)}"
    ours, base = expected / ours_median, base_tokens / base_s
    target, met = at_least(ours / base, TARGETS[model_name])
    return Comparison(f"generate batched vs one-by-one ({model_name})", "tokens/s", round(ours, 1),
                      round(base, 1), round(ours / base, 2), target, met, details)


def padding_row(comparisons: list[Comparison]) -> Comparison:
    tiny = comparisons[0].details
    value = tiny["padding_efficiency"]
    return Comparison(f"padding efficiency, length-sorted ({tiny['model']})", "real/padded prompt tokens",
                      value, tiny["padding_efficiency_unsorted"], round(value, 3),
                      f">= {PADDING_TARGET}", value >= PADDING_TARGET,
                      {"baseline_is": "the same prompts in unsorted batches of the same size",
                       "calls_cut_by_characters": tiny["padding_efficiency_calls_by_characters"],
                       "micro_batch": tiny["micro_batch"]}, ratio_is="genflow efficiency")


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, help="prompts per model (default 1000, --quick 200)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same on both sides")
    parser.add_argument("--models", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--greedy-check", type=int, default=64, help="prompts compared under greedy decoding")
    args = parser.parse_args()
    run_as_genflow_worker("benchmarks.bench_generation")
    quiet_environment()
    count = args.prompts or (200 if args.quick else 1000)
    prompts = synthetic_prompts(count, min_words=2, max_words=16)
    workdir: Path = args.workdir
    comparisons = [compare(name, causal_lm(workdir, name), prompts, args.new_tokens, args.threads,
                           check_greedy=args.greedy_check) for name in args.models]
    comparisons.append(padding_row(comparisons))
    emit(comparisons, args.json)


if __name__ == "__main__":
    main()

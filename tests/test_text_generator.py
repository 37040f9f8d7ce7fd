"""hf-text on a tiny GPT-2: batching, seeds, stops, chat templates, token counts."""

from __future__ import annotations

import pytest

from genflow.api import GenerationRequest
from genflow.plugins.text import HFTextGenerator, HFTextParams, cut_at_stop

PROMPTS = ["Hello", "Write a short poem about the sea and the sky at night", "Why?",
           "Explain why the sky is blue.", "Once upon a time there was a small village near a river and"]


def requests(seed0: int = 100, samples: int = 2) -> list[GenerationRequest]:
    return [GenerationRequest(f"g{i}-{s}", f"p{i}", p, s, seed0 + 10 * i + s)
            for i, p in enumerate(PROMPTS) for s in range(samples)]


@pytest.fixture(scope="module")
def generator(tiny_models: dict[str, str]) -> HFTextGenerator:
    return HFTextGenerator(tiny_models["tiny-gpt2"], HFTextParams(max_new_tokens=12, temperature=0.9, top_p=0.95))


def test_batched_equals_one_by_one_for_the_same_seeds(generator: HFTextGenerator) -> None:
    reqs = requests()
    batched = generator.generate(reqs)
    single = [generator.generate([r])[0] for r in reqs]
    assert [b.text for b in batched] == [s.text for s in single]  # type: ignore[union-attr]
    assert [b.num_tokens for b in batched] == [s.num_tokens for s in single]  # type: ignore[union-attr]


def test_order_of_the_batch_does_not_change_a_candidate(generator: HFTextGenerator) -> None:
    reqs = requests()
    forward = {r.generation_id: g.text for r, g in zip(reqs, generator.generate(reqs), strict=True)}  # type: ignore[union-attr]
    backward = {r.generation_id: g.text for r, g in zip(reqs[::-1], generator.generate(reqs[::-1]), strict=True)}  # type: ignore[union-attr]
    assert forward == backward


def test_seeds_decide_the_sample(generator: HFTextGenerator) -> None:
    a = [g.text for g in generator.generate(requests(seed0=1))]  # type: ignore[union-attr]
    b = [g.text for g in generator.generate(requests(seed0=1))]  # type: ignore[union-attr]
    c = [g.text for g in generator.generate(requests(seed0=2))]  # type: ignore[union-attr]
    assert a == b
    assert sum(x != y for x, y in zip(a, c, strict=True)) >= len(a) // 2


def test_token_counts_and_finish_reasons(generator: HFTextGenerator) -> None:
    out = generator.generate(requests())
    for g in out:
        assert 0 < g.num_tokens <= 12  # type: ignore[union-attr, operator]
        assert g.finish_reason in {"length", "stop"}  # type: ignore[union-attr]
        if g.finish_reason == "length":  # type: ignore[union-attr]
            assert g.num_tokens == 12  # type: ignore[union-attr]


def test_greedy_is_independent_of_seed(tiny_models: dict[str, str]) -> None:
    gen = HFTextGenerator(tiny_models["tiny-gpt2"], HFTextParams(max_new_tokens=8, temperature=0))
    r1 = GenerationRequest("a", "p", "Hello there", 0, 1)
    r2 = GenerationRequest("b", "p", "Hello there", 1, 2)
    assert gen.generate([r1])[0].text == gen.generate([r2])[0].text  # type: ignore[union-attr]


def test_stop_strings_cut_the_text(tiny_models: dict[str, str]) -> None:
    free = HFTextGenerator(tiny_models["tiny-gpt2"], HFTextParams(max_new_tokens=16, temperature=0))
    text = free.generate([GenerationRequest("a", "p", "Hello there", 0, 1)])[0].text
    assert text and len(text) > 4
    stop = text[3:5]
    stopped = HFTextGenerator(tiny_models["tiny-gpt2"], HFTextParams(max_new_tokens=16, temperature=0, stop=[stop]))
    out = stopped.generate([GenerationRequest("a", "p", "Hello there", 0, 1)])[0]
    assert out.text == text[: text.index(stop)]  # type: ignore[union-attr]
    assert out.finish_reason == "stop"  # type: ignore[union-attr]


def test_cut_at_stop_takes_the_earliest() -> None:
    assert cut_at_stop("abc\n\ndef END x", ["END", "\n\n"]) == ("abc", True)
    assert cut_at_stop("abc", ["zz"]) == ("abc", False)


def test_chat_template_is_used_when_the_tokenizer_has_one(tiny_models: dict[str, str]) -> None:
    gen = HFTextGenerator(tiny_models["tiny-gpt2"], HFTextParams(max_new_tokens=4))
    assert not gen.use_chat
    gen.tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    gen.use_chat = True
    rendered = gen.render(GenerationRequest("a", "p", "Hi", 0, 1, system="Be brief."))
    assert rendered == "<|system|>Be brief.\n<|user|>Hi\n<|assistant|>"
    with pytest.raises(ValueError, match="has none"):
        HFTextGenerator(tiny_models["tiny-gpt2"], HFTextParams(chat_template=True))


def test_system_prompt_without_chat_template(generator: HFTextGenerator) -> None:
    assert generator.render(GenerationRequest("a", "p", "Hi", 0, 1, system="Sys")) == "Sys\n\nHi"

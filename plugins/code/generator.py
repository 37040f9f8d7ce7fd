"""``hf-code``: code generation with a transformers causal LM.

Everything ``hf-text`` does (the causal-LM core of :mod:`genflow.plugins.shared.causal_lm`:
length-sorted left-padded batches, seeded samples, chat templates), plus what code
needs: a prompt template per task, stops that end a function cleanly, and code pulled
out of Markdown answers.

Tasks (the row's ``task`` when it names one, else the ``mode`` param):

- ``generate``: complete a function from its signature and docstring (HumanEval
  style); the prompt is used as is and the completion is the function's body.
- ``explain``: describe the code in prose.
- ``fix``: correct the code, given the error it raised (``code`` and ``error`` inputs).
- ``refactor``: rewrite the code more clearly, same behaviour.
- ``tests``: write pytest unit tests for the code.

The code of ``explain``/``fix``/``refactor``/``tests`` is the row's ``code`` input
when present, else its prompt. Templates are Jinja2 with ``prompt``, ``code``,
``error``, ``entry_point`` and the other columns the plugin reads (``input_columns``)
as variables; ``templates`` in the params replaces any of them. Without a chat
template the model is primed with an opening ```python fence, so a base model
answers in code right away.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Literal

import jinja2
from pydantic import Field, field_validator

from genflow import hookimpl
from genflow.api import Generation, GenerationRequest, PluginParams, RowError
from genflow.hookspecs import Register
from genflow.plugins.code.execution import extract_code
from genflow.plugins.shared.causal_lm import CausalLMGenerator, CausalLMParams, write_tiny_causal_lm
from genflow.plugins.shared.hf import can_write_tiny_model

Mode = Literal["generate", "explain", "fix", "refactor", "tests"]
MODES: tuple[str, ...] = ("generate", "explain", "fix", "refactor", "tests")
CODE_ANSWER_MODES = ("fix", "refactor", "tests")
"""Modes whose answer is code in a fenced block."""

TINY_CODE = "tiny-code"

FUNCTION_STOPS = ["\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#", "\nassert ", "\n@", "\n```"]
"""A function body ends at the next top-level statement (the Codex paper's stops, widened)."""
FENCE_STOPS = ["```"]

TEMPLATES: dict[str, str] = {
    "generate": "{{ prompt }}",
    "explain": (
        "Explain what this Python code does: its purpose, its inputs and outputs, and its edge cases.\n\n"
        "```python\n{{ code }}\n```\n\nExplanation:"
    ),
    "fix": (
        "This Python code has a bug.\n\n```python\n{{ code }}\n```\n"
        "{% if error %}\nRunning it fails with:\n\n```\n{{ error }}\n```\n{% endif %}"
        "\nWrite the corrected code.\n\nCorrected code:"
    ),
    "refactor": (
        "Refactor this Python code to be clearer and more idiomatic without changing its behaviour.\n\n"
        "```python\n{{ code }}\n```\n\nRefactored code:"
    ),
    "tests": (
        "Write pytest unit tests for this Python code{% if entry_point %}, testing `{{ entry_point }}`"
        "{% endif %}. Cover normal and edge cases.\n\n```python\n{{ code }}\n```\n\nTests:"
    ),
}
_TOP_LEVEL_LINE = re.compile(r"\n(?=[^\s#])")


class HFCodeParams(CausalLMParams):
    max_new_tokens: int = Field(256, ge=1, description="Tokens to generate at most per candidate.")
    mode: Mode = Field("generate", description="Task for rows whose `task` is not one of the modes.")
    templates: dict[str, str] = Field(default_factory=dict, description="Replace the Jinja2 template of a "
                                      "mode: {fix: \"...\"}.")
    extract_code: bool = Field(True, description="Return only the code of a Markdown answer "
                               "(its ```python block).")

    @field_validator("templates")
    @classmethod
    def _known_modes(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(MODES))
        if unknown:
            raise ValueError(f"no such mode: {', '.join(unknown)} (modes: {', '.join(MODES)})")
        for mode, source in value.items():
            try:
                jinja2.Environment().parse(source)
            except jinja2.TemplateSyntaxError as exc:
                raise ValueError(f"template for {mode!r} is not valid Jinja2: {exc}") from None
        return value


class HFCodeGenerator(CausalLMGenerator):
    """Code generation with a causal LM: generate, explain, fix, refactor, write tests."""

    Params: ClassVar[type[PluginParams]] = HFCodeParams
    modality: ClassVar[str] = "code"
    description: ClassVar[str] = (
        "transformers causal LM for code: generate/explain/fix/refactor/tests, code-aware stops")
    input_columns: ClassVar[tuple[str, ...]] = (
        "code", "error", "entry_point", "task_id", "tests", "test", "canonical_solution")
    """Template variables; HumanEval's ``test`` and ``canonical_solution`` among them (e.g. a
    ``tests`` template that shows the reference solution)."""
    params: HFCodeParams
    stop: list[str]

    def __init__(self, model: str | None, params: HFCodeParams, device: str = "cpu") -> None:
        super().__init__(model, params, device)
        env = jinja2.Environment(keep_trailing_newline=True, undefined=jinja2.ChainableUndefined)
        self.templates = {mode: env.from_string(params.templates.get(mode, TEMPLATES[mode]))
                          for mode in MODES}
        self._user_stops = list(params.stop)

    def mode_of(self, request: GenerationRequest) -> str:
        return request.task if request.task in MODES else self.params.mode

    def batch_keys(self, requests: list[GenerationRequest]) -> list[Any]:
        """Mode first (a call generates mode by mode, each with its own stops), then prompt tokens."""
        return [(self.mode_of(r), n) for r, n in zip(requests, super().batch_keys(requests), strict=True)]

    def stops_for(self, mode: str) -> list[str]:
        """Stop strings for a mode: the user's, plus code-aware ones for base models."""
        if self.use_chat:  # a chat model answers in Markdown; extraction finds the code
            return self._user_stops
        if mode == "generate":
            return self._user_stops + FUNCTION_STOPS
        if mode in CODE_ANSWER_MODES:
            return self._user_stops + FENCE_STOPS
        return self._user_stops

    def render(self, request: GenerationRequest) -> str:
        mode = self.mode_of(request)
        inputs = dict(request.inputs)
        variables = {**inputs, "prompt": request.prompt,
                     "code": inputs.get("code") or request.prompt,
                     "error": inputs.get("error") or "",
                     "entry_point": inputs.get("entry_point") or ""}
        text = self.templates[mode].render(**variables)
        rendered = super().render(dataclasses.replace(request, prompt=text))
        if mode in CODE_ANSWER_MODES and not self.use_chat:
            rendered += "\n```python\n"
        return rendered

    def postprocess(self, request: GenerationRequest, text: str) -> str:
        mode = self.mode_of(request)
        if mode == "explain":
            return text.strip()
        if self.params.extract_code and "```" in text:
            return extract_code(text, request.inputs.get("entry_point"))
        if mode == "generate" and text[:1] in (" ", "\t"):
            # A function body continues until the first line back at column 0.
            found = _TOP_LEVEL_LINE.search(text)
            return text[:found.start() + 1] if found else text
        return text

    def generate(self, requests: list[GenerationRequest]) -> list[Generation | RowError]:
        """Generate mode by mode: each mode has its own stop strings."""
        results: list[Generation | RowError | None] = [None] * len(requests)
        by_mode: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            by_mode.setdefault(self.mode_of(request), []).append(i)
        for mode, idx in by_mode.items():
            with self._stopping_at(self.stops_for(mode)):
                for i, result in zip(idx, super().generate([requests[i] for i in idx]), strict=True):
                    results[i] = result
        return [r if r is not None else RowError("not generated") for r in results]

    @contextmanager
    def _stopping_at(self, stops: list[str]) -> Iterator[None]:
        saved, self.stop = self.stop, stops
        try:
            yield
        finally:
            self.stop = saved


@hookimpl
def register_generators(register: Register) -> None:
    register("hf-code", HFCodeGenerator)


@hookimpl
def init_tiny_models(directory: Path) -> dict[str, str]:
    if not can_write_tiny_model(TINY_CODE, HFCodeGenerator):
        return {}
    path = write_tiny_causal_lm(Path(directory) / TINY_CODE, seed=1)
    return {TINY_CODE: str(path)}

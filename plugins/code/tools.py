"""The code family's tools for agent episodes: ``run_python``, ``run_tests`` and ``submit``.

A coding agent writes code, runs it and the task's visible tests, reads what failed and
fixes it, then submits. The model's code only ever runs in the family's sandbox
(:mod:`genflow.plugins.code.sandbox`), under its isolation level and limits:

- ``run_python`` runs a program and answers its exit status, stdout and stderr (each cut);
- ``run_tests`` runs the row's visible tests (the ``visible_tests`` column, or ``column``)
  against the given code, each test on its own, and answers which passed and why the
  others failed (``add(2, 2) returned 4, expected 5``). The tests run in a process of
  their own that gets only plain data from the code's (:meth:`Sandbox.check`);
- ``submit`` ends the episode: its ``code`` (or ``answer``) is the episode's final answer,
  the candidate the job's scorers judge (``code-exec`` against the hidden tests).
"""

from __future__ import annotations

import ast
import functools
import json
import os
import secrets
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from genflow import hookimpl
from genflow.api import PluginParams, Tool, ToolContext, ToolError, ToolResult
from genflow.hookspecs import Register
from genflow.plugins.code.execution import _used_not_defined, extract_code
from genflow.plugins.code.sandbox import Limits, Sandbox, SandboxError, SandboxResult

START_MARGIN_S = 30.0
"""Seconds a call may take beyond the program's own limit before the episode stops waiting
(starting the sandbox, writing the files): the sandbox kills the program at its limit."""


def cut(text: str, most: int) -> str:
    """``text`` in about ``most`` characters: head and tail, saying how much was cut between them."""
    if len(text) <= most:
        return text
    tail = most // 3
    head = most - tail
    return f"{text[:head]}\n[... {len(text) - head - tail} characters cut ...]\n{text[len(text) - tail:]}"


class _Arguments(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CodeArguments(_Arguments):
    code: str = Field(description="A complete Python program (standard library only).")


class SandboxParams(PluginParams):
    timeout_s: float = Field(10.0, gt=0, le=600, description="Wall-clock seconds one run may take; the "
                             "program's whole process group is killed after it.")
    memory_mb: int = Field(1024, ge=64, description="Address-space limit per process, in MiB.")
    max_processes: int = Field(16, ge=1, description="Processes and threads the program may run at once.")
    isolation: Literal["auto", "bwrap", "unshare", "rlimits"] = Field(
        "auto", description="auto uses the strongest level that works here; name one to require it.")
    python: str | None = Field(None, description="Interpreter for the programs; null = genflow's, or the "
                               "system python3.")
    max_output_chars: int = Field(2000, ge=100, description="stdout and stderr are each cut to about this "
                                  "many characters (head and tail) in the answer.")


class _SandboxTool(Tool):
    """A tool that runs the model's code in the family's sandbox (one sandbox per worker)."""

    Params: ClassVar[type[PluginParams]] = SandboxParams
    Arguments: ClassVar[type[BaseModel]] = CodeArguments
    timeout_s: ClassVar[float] = SandboxParams.model_fields["timeout_s"].default + START_MARGIN_S
    extra: ClassVar[str | None] = "code"
    params: SandboxParams

    def __init__(self, params: PluginParams) -> None:
        super().__init__(params)
        p = self.params
        limits = Limits(timeout_s=p.timeout_s, memory_mb=p.memory_mb, max_processes=p.max_processes)
        # Many episodes' calls run at once, one per core of the toolbox's threads.
        self.sandbox = Sandbox(limits, isolation=p.isolation, python=p.python, concurrency=os.cpu_count() or 1)

    @classmethod
    def implementation(cls, params: dict[str, Any]) -> type[Tool]:
        """Waited on as long as its program may run, and a margin to start it."""
        p = cls.Params.model_validate(params)
        assert isinstance(p, SandboxParams)
        return variant(cls, p.timeout_s + START_MARGIN_S, cls.input_columns)

    def _stream(self, text: str) -> str:
        text = text.rstrip("\n")
        return cut(text, self.params.max_output_chars) if text else "(empty)"

    def _ended(self, result: SandboxResult) -> str | None:
        """How a run ended when it did not end by itself: ``timed out after 10 s``, ``killed: memory``."""
        if result.outcome == "timed out":
            return f"timed out after {self.params.timeout_s:g} s: the program was killed"
        if result.outcome.startswith("killed"):
            return result.outcome
        return None


@functools.cache
def variant(base: type[Tool], timeout_s: float, columns: tuple[str, ...]) -> type[Tool]:
    """``base`` waited on for ``timeout_s`` and reading ``columns`` (the same class for the same values)."""
    if timeout_s == base.timeout_s and columns == base.input_columns:
        return base
    return type(base.__name__, (base,), {
        "timeout_s": timeout_s, "input_columns": columns, "__module__": base.__module__,
        "__qualname__": f"{base.__qualname__}[{timeout_s:g}s,{','.join(columns)}]"})


# -- run_python --------------------------------------------------------------------------

class RunPython(_SandboxTool):
    """Run a Python program in a sandbox and get its exit status, stdout and stderr."""

    description: ClassVar[str] = ("Run a Python program (standard library only; no file is kept between runs) "
                                  "and get its exit status, stdout and stderr.")

    def run(self, arguments: BaseModel, context: ToolContext) -> ToolResult:
        assert isinstance(arguments, CodeArguments)
        try:
            result = self.sandbox.run(extract_code(arguments.code))
        except SandboxError as exc:
            raise ToolError(f"the sandbox could not run the program: {exc}") from None
        status = exit_status(result)
        ended = self._ended(result)
        head = ended if ended is not None else f"exit status: {status}"
        content = f"{head}\nstdout:\n{self._stream(result.stdout)}\nstderr:\n{self._stream(result.stderr)}"
        return ToolResult(content, details={"outcome": result.outcome, "exit_status": status,
                                            "duration_s": result.duration_s, "isolation": result.isolation})


def exit_status(result: SandboxResult) -> int | None:
    """The program's exit status as its author means it: 0 when it ran to its end, the code it
    gave ``sys.exit``, else the process's (None when it was killed)."""
    if result.passed:
        return 0
    if result.outcome in ("timed out",) or result.outcome.startswith("killed"):
        return None
    if "SystemExit" in result.outcome:  # the runner turns sys.exit(n) into a report and exits 1
        said = result.outcome.split("SystemExit", 1)[1].lstrip(":) ").rstrip(")").strip()
        if not said or said == "None":
            return 0
        return int(said) if said.lstrip("-").isdigit() else 1
    return result.returncode


# -- run_tests ---------------------------------------------------------------------------

class RunTestsParams(SandboxParams):
    column: str = Field("visible_tests", min_length=1, description="The input column holding the tests the "
                        "model may run: Python code (each top-level statement that tests is a test) or a list "
                        "of assert statements. HumanEval's `def check(candidate)` runs as one test with the "
                        "row's entry_point.")
    max_failures: int = Field(5, ge=1, description="Failed tests whose message is shown; the others are "
                              "listed by name only.")


class RunTests(_SandboxTool):
    """Run the task's visible tests against a program and get which passed and why the others failed."""

    Params: ClassVar[type[PluginParams]] = RunTestsParams
    description: ClassVar[str] = ("Run the task's visible tests against your code (a complete program that "
                                  "defines what the tests call) and get which passed and why the others failed.")
    input_columns: ClassVar[tuple[str, ...]] = ("visible_tests", "entry_point")
    params: RunTestsParams

    @classmethod
    def implementation(cls, params: dict[str, Any]) -> type[Tool]:
        p = RunTestsParams.model_validate(params)
        return variant(cls, p.timeout_s + START_MARGIN_S, (p.column, "entry_point"))

    def run(self, arguments: BaseModel, context: ToolContext) -> ToolResult:
        assert isinstance(arguments, CodeArguments)
        entry_point = context.inputs.get("entry_point") or None
        steps = test_steps(context.inputs.get(self.params.column), entry_point)
        if not any(step.is_test for step in steps):
            raise ToolError(f"this task has no visible tests to run (its {self.params.column!r} column is empty)")
        code = extract_code(arguments.code, entry_point)
        nonce = secrets.token_hex(12)
        names = set().union(*(_used_not_defined(step.source) for step in steps))
        if entry_point and entry_point.isidentifier():
            names.add(entry_point)
        try:
            # No setup: nothing the model wrote runs in the tests' process; a module the tests use
            # and do not import comes from the code's, by name (Sandbox.check).
            result = self.sandbox.check(code, harness(steps, nonce, self.params.max_failures), sorted(names))
        except SandboxError as exc:
            raise ToolError(f"the sandbox could not run the tests: {exc}") from None
        return self._answer(steps, result, nonce)

    def _answer(self, steps: list[TestStep], result: SandboxResult, nonce: str) -> ToolResult:
        verdicts, messages, lines = read_verdicts(result.stderr, nonce)
        tests = [i for i, step in enumerate(steps) if step.is_test]
        passed = [i for i in tests if verdicts.get(i) == "passed"]
        failed = [i for i, step in enumerate(steps) if verdicts.get(i) == "failed"]
        not_run = [i for i in tests if i not in verdicts]
        ended = self._ended(result)
        if not verdicts and result.outcome not in ("passed", "timed out") and ended is None:
            ended = f"the code failed before any test ran: {result.outcome.removeprefix('failed: ')}"
        out = [f"{len(passed)} of {len(tests)} tests passed."]
        out += [f"passed: {steps[i].label}" for i in passed]
        for i in failed:
            out.append(f"FAILED: {steps[i].label}" if steps[i].is_test else f"FAILED (setup): {steps[i].label}")
            if messages.get(i):
                out.append(f"  {messages[i]}")
        if ended:
            out.append(ended)
        if not_run:
            out.append(f"{'these tests' if len(not_run) > 1 else 'this test'} did not run to a verdict:")
            out += [f"  {steps[i].label}" for i in not_run]
        stdout = result.stdout.rstrip("\n")
        stderr = "\n".join(lines).rstrip("\n")
        if stdout:
            out.append(f"stdout:\n{cut(stdout, self.params.max_output_chars)}")
        if stderr and (not verdicts or failed):  # a traceback says more than the message when nothing ran
            out.append(f"stderr:\n{cut(stderr, self.params.max_output_chars)}")
        details = {"passed": len(passed), "failed": len([i for i in failed if steps[i].is_test]),
                   "tests": len(tests), "outcome": result.outcome, "duration_s": result.duration_s,
                   "isolation": result.isolation,
                   "failures": [{"test": steps[i].label, "message": messages.get(i, "")} for i in failed]}
        return ToolResult("\n".join(out), details=details)


class TestStep:
    """A statement of the visible tests: a test (an assert, ``check(...)``) or what the tests need
    first (an import, a helper's definition), run in order."""

    __slots__ = ("is_test", "label", "source")

    def __init__(self, source: str, label: str, is_test: bool) -> None:
        self.source, self.label, self.is_test = source, label, is_test


_CHECK_CALL = "check({})"
_LABEL_CHARS = 160


_SETUP = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign,
          ast.AnnAssign, ast.AugAssign, ast.Pass)
"""Top-level statements of the tests that prepare the tests rather than test anything."""


def test_steps(tests: Any, entry_point: str | None) -> list[TestStep]:
    """The steps of a row's tests: a list holds one test per item; code, one per top-level
    statement that tests (an ``assert``, a loop of asserts, ``check(f)``), its imports,
    definitions and assignments run before the tests after them. HumanEval's
    ``def check(candidate)`` with an entry point adds ``check(<entry_point>)`` as a test."""
    if tests is None:
        return []
    if isinstance(tests, str):
        pieces = [tests]
    elif hasattr(tests, "__iter__"):  # a list (or an array) of statements
        pieces = [str(t) for t in tests if t is not None and str(t).strip()]
        if len(pieces) > 1 or not pieces:
            return [_step(p, is_test=True) for p in pieces]
    else:
        raise ToolError(f"the visible tests are a {type(tests).__name__}, not code or a list of statements")
    source = pieces[0]
    if not source.strip():
        return []
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise ToolError(f"the visible tests are not valid Python ({exc.msg}, line {exc.lineno})") from None
    steps = []
    defines_check = False
    for node in tree.body:
        text = ast.get_source_segment(source, node) or ast.unparse(node)
        steps.append(_step(text, is_test=not isinstance(node, _SETUP)))
        defines_check |= isinstance(node, ast.FunctionDef) and node.name == "check"
    if entry_point and entry_point.isidentifier() and defines_check:
        steps.append(_step(_CHECK_CALL.format(entry_point), is_test=True))
    return steps


def _step(source: str, is_test: bool) -> TestStep:
    first = source.strip().splitlines()[0] if source.strip() else source
    label = first if len(first) <= _LABEL_CHARS else first[:_LABEL_CHARS] + "..."
    if len(source.strip().splitlines()) > 1:
        label += " ..."
    return TestStep(source, label, is_test)


class _Explained(ast.NodeTransformer):
    """Asserts without a message get one saying what the values were: ``assert f(2) == 5``
    fails with ``f(2) returned 4, expected 5``. Each side is evaluated once, as before."""

    def visit_Assert(self, node: ast.Assert) -> Any:
        test = node.test
        if node.msg is not None:
            return node
        if isinstance(test, ast.Compare) and len(test.ops) == 1:
            left, right = ast.Name("_genflow_left", ast.Load()), ast.Name("_genflow_right", ast.Load())
            explain = ast.Call(ast.Name("_genflow_explain", ast.Load()), [
                ast.Constant(ast.unparse(test.left)), ast.Constant(_SYMBOLS.get(type(test.ops[0]), "?")),
                left, right, ast.Constant(isinstance(test.left, ast.Call))], [])
            return [ast.Assign([ast.Name("_genflow_left", ast.Store())], test.left, lineno=node.lineno),
                    ast.Assign([ast.Name("_genflow_right", ast.Store())], test.comparators[0], lineno=node.lineno),
                    ast.Assert(ast.Compare(left, test.ops, [right]), explain, lineno=node.lineno)]
        if isinstance(test, ast.Call):
            value = ast.Name("_genflow_value", ast.Load())
            explain = ast.Call(ast.Name("_genflow_returned", ast.Load()), [ast.Constant(ast.unparse(test)), value], [])
            return [ast.Assign([ast.Name("_genflow_value", ast.Store())], test, lineno=node.lineno),
                    ast.Assert(value, explain, lineno=node.lineno)]
        return node


_SYMBOLS: dict[type, str] = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">",
                             ast.GtE: ">=", ast.Is: "is", ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in"}


def explained(source: str) -> str:
    """``source`` with its asserts explaining their failures (as it is when it does not parse)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return source
    return ast.unparse(ast.fix_missing_locations(_Explained().visit(tree)))


_HARNESS = """\
import json as _genflow_json, sys as _genflow_sys


def _genflow_repr(value):
    try:
        text = repr(value)
    except Exception:
        text = "<a %s>" % type(value).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _genflow_explain(source, symbol, left, right, called):
    if called and symbol == "==":
        return "%s returned %s, expected %s" % (source, _genflow_repr(left), _genflow_repr(right))
    if called:
        return "%s returned %s, not %s %s" % (source, _genflow_repr(left), symbol, _genflow_repr(right))
    return "%s %s %s is false" % (_genflow_repr(left), symbol, _genflow_repr(right))


def _genflow_returned(source, value):
    return "%s returned %s" % (source, _genflow_repr(value))


def _genflow_say(line):
    _genflow_sys.stderr.write(NONCE + " " + line + "\\n")
    _genflow_sys.stderr.flush()


_genflow_verdicts = []
for _genflow_i, (_genflow_source, _genflow_is_test) in enumerate(STEPS):
    try:
        exec(compile(_genflow_source, "<test %d>" % (_genflow_i + 1), "exec"), globals())
    except BaseException as _genflow_exc:  # one test's failure, whatever it is, is that test's alone
        _genflow_kind = type(_genflow_exc).__name__
        if _genflow_kind == "_GenflowGone":
            _genflow_text = "the program ended before this test finished"
        elif isinstance(_genflow_exc, AssertionError):
            _genflow_text = str(_genflow_exc) or "assertion failed"
        else:
            _genflow_text = ("%s: %s" % (_genflow_kind, _genflow_exc)) if str(_genflow_exc) else _genflow_kind
        _genflow_say("%d failed" % _genflow_i)
        _genflow_verdicts.append([_genflow_i, "failed", _genflow_text[:300]])
    else:
        if _genflow_is_test:
            _genflow_say("%d passed" % _genflow_i)
            _genflow_verdicts.append([_genflow_i, "passed", ""])
_genflow_shown = 0
for _genflow_verdict in _genflow_verdicts:
    if _genflow_verdict[1] == "failed":
        _genflow_shown += 1
        if _genflow_shown > MAX_FAILURES:
            _genflow_verdict[2] = ""
_genflow_say("all " + _genflow_json.dumps(_genflow_verdicts))
"""


def harness(steps: list[TestStep], nonce: str, max_failures: int) -> str:
    """The tests' program: each step on its own, each test's verdict reported on stderr after
    ``nonce`` (the code under test never sees it), then all of them on one line."""
    listed = repr([(explained(step.source), step.is_test) for step in steps])
    return (_HARNESS.replace("NONCE", repr(nonce)).replace("MAX_FAILURES", str(max_failures))
            .replace("STEPS", listed, 1))


def read_verdicts(stderr: str, nonce: str) -> tuple[dict[int, str], dict[int, str], list[str]]:
    """The tests' verdicts and failure messages from the run's stderr, and its other lines (the
    code's own): the summary line when it is there, else the verdicts said one by one."""
    verdicts: dict[int, str] = {}
    messages: dict[int, str] = {}
    others = []
    for line in stderr.splitlines():
        if not line.startswith(nonce + " "):
            others.append(line)
            continue
        said = line[len(nonce) + 1:]
        if said.startswith("all "):
            try:
                summary = json.loads(said[4:])
            except ValueError:
                continue
            for index, verdict, message in summary:
                verdicts[int(index)] = str(verdict)
                if message:
                    messages[int(index)] = str(message)
        else:
            index, _, verdict = said.partition(" ")
            if index.isdigit():
                verdicts.setdefault(int(index), verdict)
    return verdicts, messages, others


# -- submit ------------------------------------------------------------------------------

class SubmitArguments(_Arguments):
    code: str | None = Field(None, description="The final program, for a coding task.")
    answer: str | None = Field(None, description="The final answer, for any other task.")

    @model_validator(mode="after")
    def _one_given(self) -> SubmitArguments:
        if self.code is None and self.answer is None:
            raise ValueError("give the final `code` (or `answer`)")
        return self


class Submit(Tool):
    """Submit the final code (or answer): this ends the task."""

    Arguments: ClassVar[type[BaseModel]] = SubmitArguments
    description: ClassVar[str] = ("Submit your final code (or answer). This ends the task: it is judged "
                                  "against hidden tests.")
    ends_episode: ClassVar[bool] = True
    timeout_s: ClassVar[float] = 5.0

    def run(self, arguments: BaseModel, context: ToolContext) -> ToolResult:
        assert isinstance(arguments, SubmitArguments)
        final = arguments.code if arguments.code is not None else arguments.answer
        return ToolResult("submitted", final=final, details={"chars": len(final or "")})


@hookimpl
def register_tools(register: Register) -> None:
    register("run_python", RunPython)
    register("run_tests", RunTests)
    register("submit", Submit)

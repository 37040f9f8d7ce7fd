"""Tools of episodes: the code family's built-ins run the model's code in the real sandbox,
every malformed call is answered to the model as an error (and the toolbox goes on), a
third-party tool runs through the same toolbox, and a config's tools are checked at
``genflow validate``."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from genflow import hookimpl
from genflow.api import GenerationRequest, PluginParams, Tool, ToolCall, ToolContext, ToolError, ToolResult
from genflow.cli import app
from genflow.engine.tools import Toolbox, cut, load_tools, tool_columns
from genflow.registry import get_registry, registry_with

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 2.0
MAX_CHARS = 1500
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(-1, 1) == 0"]
RIGHT = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return a * b\n"  # 1*2 != 3, 2*2 == 4, -1*1 != 0


def call(name: str, arguments: Any, call_id: str = "call_1") -> dict[str, Any]:
    """A ``tool_calls`` entry as an OpenAI server sends it: the arguments as JSON text."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": text}}


def context(**inputs: Any) -> ToolContext:
    return ToolContext("p1", "g1", {"visible_tests": ADD_TESTS, **inputs})


@pytest.fixture(scope="module")
def toolbox() -> Iterator[Toolbox]:
    tools: list[Any] = [{"name": "run_python", "params": {"timeout_s": TIMEOUT_S, "max_output_chars": 600}},
             {"name": "run_tests", "params": {"timeout_s": TIMEOUT_S}}, "submit"]
    box = load_tools(tools, get_registry(), max_chars=MAX_CHARS)
    yield box
    box.close()


def answer(box: Toolbox, raw: dict[str, Any] | ToolCall, ctx: ToolContext | None = None) -> ToolResult:
    return asyncio.run(box.call(raw, ctx or context()))


# -- run_python ---------------------------------------------------------------------------

def test_run_python_answers_what_the_program_printed_and_its_exit_status(toolbox: Toolbox) -> None:
    result = answer(toolbox, call("run_python", {"code": "import sys\nprint(6 * 7)\nprint('warn', file=sys.stderr)"}))
    assert not result.is_error and result.final is None
    assert result.content == "exit status: 0\nstdout:\n42\nstderr:\nwarn"
    assert result.details["exit_status"] == 0 and result.details["outcome"] == "passed"


def test_run_python_shows_a_failing_programs_traceback_and_status(toolbox: Toolbox) -> None:
    raised = answer(toolbox, call("run_python", {"code": "print('before')\n1 / 0\n"}))
    assert not raised.is_error  # the tool worked: the program failed, which the model reads
    assert raised.content.startswith("exit status: 1\nstdout:\nbefore\nstderr:\n")
    assert "ZeroDivisionError: division by zero" in raised.content and 'line 2' in raised.content
    exited = answer(toolbox, call("run_python", {"code": "import sys\nsys.exit(3)"}))
    assert exited.content.startswith("exit status: 3\n") and exited.details["exit_status"] == 3


def test_run_python_reads_code_in_a_markdown_fence(toolbox: Toolbox) -> None:
    result = answer(toolbox, call("run_python", {"code": "```python\nprint('fenced')\n```"}))
    assert result.content.startswith("exit status: 0\nstdout:\nfenced\n")


def test_a_program_that_never_ends_is_cut_by_its_time_limit(toolbox: Toolbox) -> None:
    result = answer(toolbox, call("run_python", {"code": "print('started', flush=True)\nwhile True:\n    pass\n"}))
    assert not result.is_error
    assert result.content.startswith(f"timed out after {TIMEOUT_S:g} s: the program was killed\nstdout:\nstarted")
    assert result.details["outcome"] == "timed out" and result.details["exit_status"] is None
    # The toolbox waits longer than the program may run: the sandbox's limit answered, not the toolbox's.
    assert toolbox.tools["run_python"].timeout_s > TIMEOUT_S


def test_output_over_the_bound_is_cut_keeping_its_head_and_tail(toolbox: Toolbox) -> None:
    code = "print('HEAD')\nfor i in range(300):\n    print('line', i)\nprint('TAIL')\n"
    result = answer(toolbox, call("run_python", {"code": code}))
    stdout = result.content.split("stdout:\n", 1)[1].split("\nstderr:\n", 1)[0]
    assert "characters cut ...]" in stdout and stdout.rstrip().endswith("TAIL")
    assert len(stdout) < 700  # max_output_chars 600, and the marker
    # The whole answer is bounded too: a tool that says too much is cut to max_chars.
    assert len(cut("x" * 10_000, MAX_CHARS)) < MAX_CHARS + 50
    assert cut("short", MAX_CHARS) == "short"


# -- run_tests ----------------------------------------------------------------------------

def test_run_tests_passes_a_right_program(toolbox: Toolbox) -> None:
    result = answer(toolbox, call("run_tests", {"code": RIGHT}))
    assert not result.is_error
    assert result.content.splitlines() == ["3 of 3 tests passed.", *(f"passed: {t}" for t in ADD_TESTS)]
    assert (result.details["passed"], result.details["failed"], result.details["tests"]) == (3, 0, 3)


def test_run_tests_says_which_failed_and_why(toolbox: Toolbox) -> None:
    result = answer(toolbox, call("run_tests", {"code": WRONG}))
    lines = result.content.splitlines()
    assert lines[0] == "1 of 3 tests passed."
    assert "passed: assert add(2, 2) == 4" in lines
    assert lines[lines.index("FAILED: assert add(1, 2) == 3") + 1] == "  add(1, 2) returned 2, expected 3"
    assert lines[lines.index("FAILED: assert add(-1, 1) == 0") + 1] == "  add(-1, 1) returned -1, expected 0"
    assert [f["message"] for f in result.details["failures"]] == [
        "add(1, 2) returned 2, expected 3", "add(-1, 1) returned -1, expected 0"]


def test_run_tests_reports_an_exception_as_that_tests_failure(toolbox: Toolbox) -> None:
    code = "def add(a, b):\n    if a < 0:\n        raise ValueError('no negatives')\n    return a + b\n"
    result = answer(toolbox, call("run_tests", {"code": code}))
    assert result.content.splitlines()[0] == "2 of 3 tests passed."
    assert "FAILED: assert add(-1, 1) == 0\n  ValueError: no negatives" in result.content


def test_run_tests_reads_code_with_asserts_and_humaneval_check(toolbox: Toolbox) -> None:
    tests = ("import math\n\n"
             "assert math.isclose(add(0.1, 0.2), 0.3)\n"
             "assert add(1, 1) == 2\n"
             "for a in range(3):\n    assert add(a, 0) == a + 1\n")
    result = answer(toolbox, call("run_tests", {"code": RIGHT}), context(visible_tests=tests))
    assert result.content.splitlines() == ["2 of 3 tests passed.", "passed: assert math.isclose(add(0.1, 0.2), 0.3)",
                                           "passed: assert add(1, 1) == 2", "FAILED: for a in range(3): ...",
                                           "  add(a, 0) returned 0, expected 1"]
    humaneval = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(5, 5) == 11\n"
    result = answer(toolbox, call("run_tests", {"code": RIGHT}), context(visible_tests=humaneval, entry_point="add"))
    assert result.content.splitlines()[:3] == ["0 of 1 tests passed.", "FAILED: check(add)",
                                               "  candidate(5, 5) returned 10, expected 11"]


def test_run_tests_when_the_code_breaks_before_the_tests(toolbox: Toolbox) -> None:
    result = answer(toolbox, call("run_tests", {"code": RIGHT + "raise RuntimeError('at import')\n"}))
    assert result.content.startswith("0 of 3 tests passed.\nthe code failed before any test ran: "
                                     "RuntimeError: at import\nthese tests did not run to a verdict:\n")
    assert "stderr:\nTraceback" in result.content


def test_run_tests_cuts_code_that_never_returns(toolbox: Toolbox) -> None:
    code = "def add(a, b):\n    while True:\n        pass\n"
    result = answer(toolbox, call("run_tests", {"code": code}))
    assert result.content.startswith(f"0 of 3 tests passed.\ntimed out after {TIMEOUT_S:g} s: the program was "
                                     "killed\nthese tests did not run to a verdict:\n  assert add(1, 2) == 3")
    assert result.details["outcome"] == "timed out"


def test_run_tests_without_visible_tests_is_an_error(toolbox: Toolbox) -> None:
    result = answer(toolbox, call("run_tests", {"code": RIGHT}), ToolContext("p1", "g1", {}))
    assert result.is_error and result.content == (
        "error: this task has no visible tests to run (its 'visible_tests' column is empty)")


def test_run_tests_reads_the_column_its_params_name() -> None:
    registry = get_registry()
    specs = [{"name": "run_tests", "params": {"column": "public_tests", "timeout_s": TIMEOUT_S}}]
    assert tool_columns(specs, registry) == {"public_tests", "entry_point"}
    box = load_tools(specs, registry)
    try:
        request = GenerationRequest("g1", "p1", "add two numbers", 0, 0,
                                    inputs={"public_tests": ["assert add(2, 3) == 5"], "rubric": "unrelated"})
        ctx = box.context(request)
        assert ctx.inputs == {"public_tests": ["assert add(2, 3) == 5"]}  # only what its tools read
        result = asyncio.run(box.call(call("run_tests", {"code": RIGHT}), ctx))
        assert result.content == "1 of 1 tests passed.\npassed: assert add(2, 3) == 5"
    finally:
        box.close()


# -- submit -------------------------------------------------------------------------------

def test_submit_ends_the_episode_with_the_code(toolbox: Toolbox) -> None:
    result = answer(toolbox, call("submit", {"code": RIGHT}))
    assert (result.content, result.final, result.is_error) == ("submitted", RIGHT, False)
    assert toolbox.ends_episode("submit") and not toolbox.ends_episode("run_python")
    assert answer(toolbox, call("submit", {"answer": "42"})).final == "42"
    empty = answer(toolbox, call("submit", {}))
    assert empty.is_error and empty.final is None and "give the final `code`" in empty.content


# -- malformed calls ----------------------------------------------------------------------

class Raises(Tool):
    """Raises what its argument says."""

    class Arguments(BaseModel):
        kind: str

    def run(self, arguments: BaseModel, context: ToolContext) -> ToolResult:
        kind = getattr(arguments, "kind", "")
        if kind == "tool-error":
            raise ToolError("the file is not there")
        if kind == "not-a-result":
            return "plain text"  # type: ignore[return-value]  # a tool's bug, answered as an error
        raise KeyError("missing")


class Waits(Tool):
    """Waits until the test lets it go (or its time limit)."""

    timeout_s: ClassVar[float] = 0.5
    released = threading.Event()

    def run(self, arguments: BaseModel, context: ToolContext) -> ToolResult:
        Waits.released.wait(60)
        return ToolResult("released")


@pytest.fixture
def faulty() -> Iterator[Toolbox]:
    Waits.released.clear()
    box = Toolbox({"raises": Raises(PluginParams()), "waits": Waits(PluginParams()),
                   "echo": Echo(PluginParams())}, max_chars=200, workers=4)  # room beside two that wait
    yield box
    Waits.released.set()
    box.close()


class Echo(Tool):
    """Says its text back."""

    class Arguments(BaseModel):
        text: str

    def run(self, arguments: BaseModel, context: ToolContext) -> ToolResult:
        return ToolResult(getattr(arguments, "text", ""))


MALFORMED = [
    (call("echo", "{not json"), r"error: the arguments of 'echo' are not valid JSON \(Expecting property name"),
    (call("echo", "[1, 2]"), r"error: the arguments of 'echo' are a JSON list, not an object"),
    (call("echo", {"text": 3}), r"error: the arguments do not fit 'echo': text: Input should be a valid string"),
    (call("echo", {}), r"error: the arguments do not fit 'echo': text: Field required"),
    (call("nope", {}), r"error: there is no tool named 'nope'; the tools are: raises, waits, echo"),
    ({"id": "x", "type": "function"}, r"error: the call names no function"),
    (call("raises", {"kind": "tool-error"}), r"error: the file is not there"),
    (call("raises", {"kind": "other"}), r"error: raises failed: KeyError: 'missing'"),
    (call("raises", {"kind": "not-a-result"}), r"error: raises answered a str, not a ToolResult"),
]


@pytest.mark.parametrize("raw, said", MALFORMED)
def test_a_malformed_call_is_answered_as_an_error_and_the_toolbox_goes_on(faulty: Toolbox, raw: dict[str, Any],
                                                                         said: str) -> None:
    for result in (answer(faulty, raw), faulty.call_sync(raw, context())):
        assert result.is_error and result.final is None
        assert re.match(said, result.content), result.content
        assert "Traceback" not in result.content
    assert answer(faulty, call("echo", {"text": "still here"})).content == "still here"


def test_a_tool_that_outlives_its_time_limit_is_answered_as_timed_out(faulty: Toolbox) -> None:
    result = answer(faulty, call("waits", {}))
    assert result.is_error and result.content == "error: waits did not answer within 0.5 s"
    assert result.details == {"timed_out": True}
    synced = faulty.call_sync(call("waits", {}), context())
    assert synced.content == result.content
    assert answer(faulty, call("echo", {"text": "after"})).content == "after"


def test_a_tool_call_object_with_its_raw_arguments_is_read_from_them(faulty: Toolbox) -> None:
    parsed = ToolCall("c1", "echo", {"text": "from the dict"})
    assert answer(faulty, parsed).content == "from the dict"
    if "raw_arguments" in ToolCall.__dataclass_fields__:  # the text as the model wrote it wins
        raw = ToolCall("c2", "echo", {}, raw_arguments='{"text": ')
        assert answer(faulty, raw).content.startswith("error: the arguments of 'echo' are not valid JSON")


class Patient(Waits):
    """Waits like Waits, with a limit no busy machine reaches before the test lets it go."""

    timeout_s: ClassVar[float] = 60


def test_tools_run_off_the_event_loop() -> None:
    """A tool blocks its thread, never the loop: the loop lets it go while it waits."""
    Waits.released.clear()
    box = Toolbox({"waits": Patient(PluginParams()), "echo": Echo(PluginParams())}, workers=2)

    async def episode() -> tuple[ToolResult, ToolResult]:
        waiting = asyncio.create_task(box.call(call("waits", {}), context()))
        echoed = await box.call(call("echo", {"text": "meanwhile"}), context())  # answered while it waits
        Waits.released.set()
        return await waiting, echoed

    try:
        waited, echoed = asyncio.run(episode())
    finally:
        Waits.released.set()
        box.close()
    assert echoed.content == "meanwhile"
    assert (waited.content, waited.is_error) == ("released", False)


def test_an_answer_over_the_bound_is_cut_with_its_head_and_tail(faulty: Toolbox) -> None:
    text = "BEGIN " + "x" * 1000 + " END"
    result = answer(faulty, call("echo", {"text": text}))
    assert result.content.startswith("BEGIN ") and result.content.endswith(" END")
    assert "characters cut ...]" in result.content and len(result.content) < 250
    assert result.details["content_chars"] == len(text)


# -- schemas ------------------------------------------------------------------------------

def test_the_schemas_are_openai_tool_entries(toolbox: Toolbox) -> None:
    schemas = toolbox.schemas()
    assert [s["function"]["name"] for s in schemas] == ["run_python", "run_tests", "submit"]
    for entry in schemas:
        assert set(entry) == {"type", "function"} and entry["type"] == "function"
        function = entry["function"]
        assert set(function) == {"name", "description", "parameters"}
        assert re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", function["name"])
        assert function["description"] and "\n" not in function["description"]
        parameters = function["parameters"]
        jsonschema.Draft202012Validator.check_schema(parameters)
        assert parameters["type"] == "object" and parameters["additionalProperties"] is False
    code = schemas[0]["function"]["parameters"]
    assert code["required"] == ["code"] and code["properties"]["code"]["type"] == "string"
    jsonschema.validate({"code": "print(1)"}, code)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"code": "print(1)", "other": 1}, code)


# -- a third-party tool -------------------------------------------------------------------

@pytest.fixture(scope="module")
def rubric_module() -> Any:
    """The third-party distribution's module (``tests/data/third_party_plugin``), imported as pip would install it."""
    path = ROOT / "tests/data/third_party_plugin/genflow_rubric.py"
    spec = importlib.util.spec_from_file_location("genflow_rubric", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("genflow_rubric", module)
    spec.loader.exec_module(module)
    return module


def test_a_third_party_tool_runs_through_the_toolbox(rubric_module: Any, tmp_path: Path) -> None:
    corpus = tmp_path / "notes.txt"
    corpus.write_text("Ravens are black birds.\n\nThe sea is deep and blue.\n\nBlue birds sing at dawn.\n")
    registry = registry_with(rubric_module)
    info = registry.get("tool", "search-corpus")
    assert info.kind == "tool" and info.description.startswith("Search the reference notes")
    box = load_tools([{"name": "search-corpus", "params": {"corpus": str(corpus), "top_k": 2}}, "submit"], registry)
    try:
        assert [s["function"]["name"] for s in box.schemas()] == ["search-corpus", "submit"]
        found = answer(box, call("search-corpus", {"query": "blue birds"}))
        assert found.content == "[3] Blue birds sing at dawn.\n\n[1] Ravens are black birds."
        assert found.details == {"found": [3, 1]}
        assert answer(box, call("search-corpus", {"query": "zebra"})).content == "no passage holds any of: zebra"
        empty = answer(box, call("search-corpus", {"query": "  ?! "}))
        assert empty.is_error and empty.content == "error: the query has no words to look for"
    finally:
        box.close()


# -- a job's config -----------------------------------------------------------------------

def _validate(tmp_path: Path, tools: Any, max_turns: int = 4, columns: tuple[str, ...] = ("visible_tests",),
              ) -> tuple[int, str]:
    rows = [{"prompt": "add two numbers", **{c: "assert add(1, 2) == 3" for c in columns}}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "prompts.parquet")
    config = {"name": "agent", "input": str(tmp_path / "prompts.parquet"), "output": str(tmp_path / "out"),
              "generators": [{"label": "agent", "plugin": "openai", "model": "m", "max_turns": max_turns,
                              "params": {"base_url": "http://127.0.0.1:9/v1"}, "tools": tools}]}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["validate", str(path)])
    return result.exit_code, " ".join((result.stdout + result.stderr).split())


@pytest.mark.parametrize("tools, max_turns, columns, said", [
    (["run_python", "run_test"], 4, ("visible_tests",),
     "generators.0.tools.1: unknown tool plugin 'run_test' (installed: run_python, run_tests, submit)"),
    ([{"name": "run_python", "params": {"timeout_s": -1, "memroy_mb": 5}}], 4, ("visible_tests",),
     "generators.0.tools.0.params.timeout_s: Input should be greater than 0 "
     "generators.0.tools.0.params.memroy_mb: unknown key"),
    (["run_python", "submit"], 1, ("visible_tests",),
     "generators.0.tools: Value error, run_python, submit would never be called: a tool's result is read in the "
     "turn after the call, and max_turns is 1; give the generator max_turns above 1"),
    (["submit", {"name": "submit"}], 4, ("visible_tests",), "generators.0.tools: Value error, submit named twice"),
    ([{"name": "run_tests", "params": {"column": "public_tests"}}], 4, ("visible_tests",),
     "generators.0.tools.0 (run_tests) reads 'public_tests', 'entry_point', which the input"),
])
def test_genflow_validate_refuses_tools_that_cannot_run(tmp_path: Path, tools: Any, max_turns: int,
                                                       columns: tuple[str, ...], said: str) -> None:
    code, out = _validate(tmp_path, tools, max_turns, columns)
    assert code == 2, out
    assert said in out, out


def test_genflow_validate_accepts_a_generator_with_tools(tmp_path: Path) -> None:
    tools = ["run_python", {"name": "run_tests", "params": {"column": "public_tests"}}, "submit"]
    code, out = _validate(tmp_path, tools, columns=("public_tests",))
    assert code == 0, out
    assert "ok:" in out


def test_genflow_plugins_lists_the_tools_and_their_params() -> None:
    listed = CliRunner().invoke(app, ["plugins"], env={"COLUMNS": "200"})
    assert listed.exit_code == 0, listed.stdout
    rows = {tuple(c.strip() for c in re.split(r"[│|┃]", line)[1:3]) for line in listed.stdout.splitlines()}
    assert {("run_python", "tool"), ("run_tests", "tool"), ("submit", "tool")} <= rows
    shown = CliRunner().invoke(app, ["plugins", "--params", "run_python"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.stdout
    assert shown.stdout.startswith("run_python (tool): Run a Python program")
    options = {line.split("│")[1].strip() for line in shown.stdout.splitlines() if line.count("│") > 3}
    assert {"timeout_s", "memory_mb", "max_processes", "isolation", "python", "max_output_chars"} <= options
    arguments = shown.stdout.split("arguments (what the model sends each call):\n", 1)[1]
    assert [[c.strip() for c in line.split("│")[1:3]] for line in arguments.splitlines()
            if line.count("│") > 3] == [["code", "string"]]


def test_a_registered_tool_plugin_object_is_found_by_the_hook() -> None:
    """``register_tools`` is a hook as the others are: a plugin object registers a tool."""

    class Plugin:
        @hookimpl
        def register_tools(self, register: Any) -> None:
            register("echo-back", Echo)

    registry = registry_with(Plugin())
    assert registry.get("tool", "echo-back").factory is Echo


class Quick(Tool):
    """Answers at once, within a short limit."""

    timeout_s: ClassVar[float] = 0.5

    def run(self, arguments: BaseModel, context: ToolContext) -> ToolResult:
        return ToolResult("quick")


def test_a_call_waiting_for_a_thread_has_used_none_of_its_time_limit() -> None:
    Waits.released.clear()
    box = Toolbox({"waits": Waits(PluginParams()), "quick": Quick(PluginParams())}, workers=1)

    async def scenario() -> tuple[ToolResult, ToolResult]:
        waiting = asyncio.create_task(box.call(call("waits", {}), context()))
        await asyncio.sleep(0)  # it takes the only thread
        queued = asyncio.create_task(box.call(call("quick", {}), context()))
        timed_out = await waiting  # answered at its limit; its thread still waits, the quick call with it
        Waits.released.set()
        return timed_out, await queued

    try:
        timed_out, quick = asyncio.run(scenario())
    finally:
        Waits.released.set()
        box.close()
    assert timed_out.content == "error: waits did not answer within 0.5 s"
    assert (quick.content, quick.is_error) == ("quick", False)


def test_a_generator_of_one_answer_a_request_keeps_its_fingerprint_from_before_episodes() -> None:
    from genflow.config import GeneratorSpec
    from genflow.data.layout import hashed_spec

    one = GeneratorSpec(label="g", plugin="openai", model="m", params={"base_url": "http://127.0.0.1:9/v1"})
    assert set(hashed_spec(one)) == {"label", "plugin", "model", "samples", "seed", "template", "batch_size",
                                     "params"}  # the keys it was hashed by before episodes existed
    agent = one.model_copy(update={"max_turns": 4, "tools": GeneratorSpec.model_validate(
        {"label": "g", "plugin": "openai", "max_turns": 4, "tools": ["run_python"]}).tools})
    hashed = hashed_spec(agent)
    assert hashed["max_turns"] == 4 and hashed["tools"] == [{"name": "run_python", "params": {}}]


def test_the_code_under_test_cannot_touch_the_tests_verdicts(toolbox: Toolbox) -> None:
    """The model's code runs in a process of its own: patching builtins or printing lines that
    look like verdicts changes nothing of what the tests' process reports."""
    code = ("import builtins, sys\n"
            "builtins.AssertionError = type('Nope', (Exception,), {})\n"
            "builtins.exec = lambda *args, **kwargs: None\n"
            "for i in range(3):\n"
            "    print(i, 'passed', file=sys.stderr)\n"
            + WRONG)
    result = answer(toolbox, call("run_tests", {"code": code}))
    assert result.content.splitlines()[0] == "1 of 3 tests passed."
    assert (result.details["passed"], result.details["failed"]) == (1, 2)

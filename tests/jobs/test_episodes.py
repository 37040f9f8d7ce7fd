"""Episodes on the request path: a code agent through the ``openai`` generator against a scripted
agent server on 127.0.0.1 (``tests/support/agent_server.py``), the tools run in the sandbox.

The server's agent calls ``run_tests`` with a first attempt, reads the failure in the
``tool`` message and submits a fix; asked for one answer (no tools), it gives the first
attempt. The input is the bundled HumanEval sample with two of each task's hidden asserts as
its ``visible_tests`` (``configs/data/humaneval_agent.parquet``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from support.agent_server import AgentServer, Task
from support.jobs import ROOT

from genflow.engine.episodes import turn_seed

pytestmark = pytest.mark.slow

AGENT_INPUT = ROOT / "configs/data/humaneval_agent.parquet"
FIRST_RIGHT = 3
"""Every third task's first attempt is already right (the script submits it after its tests pass)."""


def _tasks() -> dict[str, Task]:
    """Each HumanEval task's scripted attempts: its solution, and a first attempt that returns None
    (or the solution, for every third task)."""
    solutions = {r["task_id"]: r["prompt"] + r["canonical_solution"]
                 for r in pq.read_table(ROOT / "configs/data/humaneval_sample.parquet").to_pylist()}
    tasks = {}
    for i, row in enumerate(pq.read_table(AGENT_INPUT).to_pylist()):
        fix = solutions[row["task_id"]]
        tasks[row["prompt"]] = Task(first=fix if i % FIRST_RIGHT == 0 else row["prompt"] + "    return None\n",
                                    fix=fix)
    return tasks


@pytest.fixture
def make_agent_server():
    started: list[AgentServer] = []

    def make(**kwargs: Any) -> AgentServer:
        started.append(AgentServer(_tasks(), **kwargs).start())
        return started[-1]

    yield make
    for server in started:
        server.stop()


def _generator(label: str, url: str, max_turns: int = 1, tools: list[str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "label": label, "plugin": "openai", "model": "scripted-agent", "samples": 1,
        "params": {"base_url": url, "temperature": 0.0},
        "requests": {"concurrency": 32, "timeout_s": 60.0, "backoff_s": 0.01, "max_retries": 2},
        "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}
    if max_turns > 1:
        spec.update(max_turns=max_turns, tools=tools or ["run_tests", "submit"])
    return spec


def _job(tmp_path: Path, generators: list[dict[str, Any]], name: str = "out", **extra: Any) -> dict[str, Any]:
    return {"name": "agent", "input": str(AGENT_INPUT), "output": str(tmp_path / name), "shard_rows": 10,
            "seed": 0, "generators": generators,
            "scorers": [{"plugin": "code-exec", "params": {"timeout_s": 10, "k": [1]}}],
            "ray": {"workers": 1}, **extra}


def _rows(out: Path, folder: str) -> list[dict[str, Any]]:
    return ds.dataset(str(out / folder)).to_table().to_pylist() if (out / folder).exists() else []


def _pass_at_1(out: Path) -> dict[str, float]:
    """The share of each generator's candidates that pass the hidden tests."""
    generator = {g["generation_id"]: g["generator"] for g in _rows(out, "generations")}
    passed: dict[str, list[float]] = {}
    for s in _rows(out, "scores"):
        passed.setdefault(generator[s["generation_id"]], []).append(s["score"])
    return {label: sum(v) / len(v) for label, v in sorted(passed.items())}


def test_a_code_agent_fixes_what_its_visible_tests_caught_and_passes_more_than_one_answer(
        tmp_path, job_runner, make_agent_server):
    server = make_agent_server()
    config = _job(tmp_path, [_generator("single", server.url), _generator("agent", server.url, max_turns=4)])
    manifest = job_runner(config)
    out = Path(config["output"])
    assert not _rows(out, "errors")
    gens = {(g["generator"], g["prompt"]): g for g in _rows(out, "generations")}
    tasks = _tasks()
    for i, (prompt, task) in enumerate(tasks.items()):
        single, agent = gens["single", prompt], gens["agent", prompt]
        assert single["messages"] is None and single["turns"] is None  # one answer: no episode columns
        assert agent["text"] == task.fix and agent["finish_reason"] == "submit"
        assert agent["turns"] == 2 and agent["tool_calls"] == 2
        messages = json.loads(agent["messages"])
        assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant", "tool"]
        assert messages[0]["content"] == prompt
        run_tests, submit = messages[1]["tool_calls"][0], messages[3]["tool_calls"][0]
        assert run_tests["function"]["name"] == "run_tests" and submit["function"]["name"] == "submit"
        assert json.loads(run_tests["function"]["arguments"]) == {"code": task.first}
        assert messages[2]["tool_call_id"] == run_tests["id"] and messages[4]["content"] == "submitted"
        if i % 3 == 0:
            assert messages[2]["content"].startswith("2 of 2 tests passed.")
        else:  # the failure the model read, then the fix it submitted
            assert messages[2]["content"].startswith("0 of 2 tests passed.") and "FAILED" in messages[2]["content"]
        # Tokens and cost over both turns, as the server counted them.
        assert agent["num_tokens"] == sum(len(m["tool_calls"][0]["function"]["arguments"].split())
                                          for m in messages if m["role"] == "assistant")
        assert agent["cost"] == pytest.approx((agent["prompt_tokens"] * 1.0 + agent["num_tokens"] * 2.0) / 1e6)
    pass_at_1 = _pass_at_1(out)
    assert pass_at_1 == {"agent": 1.0, "single": 4 / 10}
    print(f"\npass@1 on the HumanEval sample: {pass_at_1}")
    report = (out / "report.html").read_text()  # each sampled episode's turns, escaped
    by_generator = manifest["metrics"]["code-exec"]["by_generator"]  # and pass@1 of each generator
    assert {g: figures["pass@1"] for g, figures in by_generator.items()} == pass_at_1
    assert "code-exec / agent" in report and "code-exec / single" in report  # the pass@k table, a row each
    assert "episode: 2 turns, 2 tool calls" in report and "-&gt; run_tests({&#34;code&#34;: " in report
    assert "0 of 2 tests passed." in report and "-&gt; submit(" in report
    stage = manifest["stages"]["generate/agent"]
    assert stage["tokens"]["completion"] == sum(g["num_tokens"] for g in gens.values() if g["generator"] == "agent")

    sent = server.received
    assert sent == 10 + 10 * 2  # one request a single answer, one a turn
    job_runner(config)  # finished: not one request
    assert server.received == sent


def test_malformed_calls_are_answered_as_errors_and_the_episode_goes_on(tmp_path, job_runner, make_agent_server):
    server = make_agent_server(malformed=True)
    config = _job(tmp_path, [_generator("agent", server.url, max_turns=6),
                             _generator("short", server.url, max_turns=2)])
    config["scorers"] = []
    job_runner(config)
    gens = {(g["generator"], g["prompt"]): g for g in _rows(Path(config["output"]), "generations")}
    for prompt, task in _tasks().items():
        agent = gens["agent", prompt]
        messages = json.loads(agent["messages"])
        tools = [m["content"] for m in messages if m["role"] == "tool"]
        assert tools[0].startswith("error: the arguments of 'run_tests' are not valid JSON")
        assert tools[1].startswith("error: there is no tool named 'search_web'; the tools are: run_tests, submit")
        assert messages[1]["tool_calls"][0]["function"]["arguments"] == '{"code": "def broken(:'  # as written
        assert agent["finish_reason"] == "submit" and agent["text"] == task.fix
        assert agent["turns"] == 4 and agent["tool_calls"] == 4
        short = gens["short", prompt]  # two turns, both spent on calls that could not run
        assert short["finish_reason"] == "max_turns" and short["turns"] == 2 and short["text"] == ""
        assert [m["role"] for m in json.loads(short["messages"])] == ["user", "assistant", "tool", "assistant",
                                                                      "tool"]


def _journaled_turns(out: Path) -> set[str]:
    from genflow.data.storage import TEMPORARY_PREFIX

    parts = [p for p in (out / "_journal").rglob("*.parquet") if not p.name.startswith(TEMPORARY_PREFIX)]
    return {key for part in parts for key in pq.read_table(part)["key"].to_pylist() if "/" in key}


def _comparable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows as two runs against two servers should make them: all but the time taken and the server's URL."""
    return sorted(({**{k: v for k, v in r.items() if k != "latency_s"}, "params": {
        k: v for k, v in json.loads(r["params"]).items() if k != "base_url"}} for r in rows),
        key=lambda r: r["generation_id"])


def test_an_episode_job_killed_mid_episode_resends_only_the_turns_in_flight(tmp_path, job_runner,
                                                                             make_agent_server):
    answered_first = 12  # every first turn, then two second turns: eight episodes wait on their second
    server = make_agent_server(hold_after=answered_first)
    config = _job(tmp_path, [_generator("agent", server.url, max_turns=4)])
    config["scorers"] = []
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "genflow.cli", "run", str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    out = Path(config["output"])
    deadline = time.monotonic() + 300  # a failsafe: the kill waits for events, not for a time
    # Killed once every answered turn is journaled and every unfinished episode waits on the server:
    # then exactly those waiting turns are in flight.
    while time.monotonic() < deadline and proc.poll() is None and not (
            server.answered == answered_first and server.held == 10 - len(server.submitted)
            and len(_journaled_turns(out)) == answered_first):
        time.sleep(0.05)
    assert proc.poll() is None, "the job must still be running when it is killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    in_flight = set(server.held_seeds)
    before = list(server.seeds)
    assert len(in_flight) == 8 and len(before) == answered_first + 8
    journaled = _journaled_turns(out)
    server.release()  # the dead job's held requests are answered to no one

    done = subprocess.run([sys.executable, "-m", "genflow.cli", "run", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    again = server.seeds[len(before):]
    rows = _rows(out, "generations")
    seeds = {r["generation_id"]: r["seed"] for r in rows}
    journaled_seeds = {turn_seed(seeds[key.split("/")[0]], int(key.split("/")[1])) for key in journaled}
    # The rerun sent each turn that was in flight once, no journaled turn, and nothing else:
    # the journaled turns' tools were not run again either (the episodes went on after them).
    assert sorted(again) == sorted(in_flight) and not journaled_seeds & set(again)
    assert len(rows) == 10 and all(r["finish_reason"] == "submit" for r in rows)

    fresh = make_agent_server()  # the same job, uninterrupted, gives the same rows
    job_runner(_job(tmp_path, [_generator("agent", fresh.url, max_turns=4)], name="fresh", scorers=[]))
    assert _comparable(rows) == _comparable(_rows(tmp_path / "fresh", "generations"))
    sent = server.received
    done = subprocess.run([sys.executable, "-m", "genflow.cli", "run", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and server.received == sent  # finished: not one request

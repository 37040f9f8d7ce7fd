"""The request path: an async plugin's requests with retries, timeouts, a journal and costs.

The ``echo-async`` test plugin logs every attempt it receives (``request <generation_id>``):
the count a server would see.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pytest
from support.jobs import ROOT
from support.plugins_for_tests import calls

pytestmark = pytest.mark.slow

PROMPTS = str(ROOT / "configs/data/quickstart_prompts.parquet")


def _job(tmp_path: Path, **params: Any) -> dict[str, Any]:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    return {
        "name": "requests", "input": PROMPTS, "output": str(tmp_path / "out"), "shard_rows": 8,
        "generators": [{"label": "api", "plugin": "echo-async", "samples": 2,
                        "params": {"state_dir": str(state), **params},
                        "requests": {"concurrency": 8, "timeout_s": 1.0, "backoff_s": 0.01, "max_retries": 3},
                        "price": {"input_per_mtok": 1000.0, "output_per_mtok": 2000.0}}],
        "scorers": [{"plugin": "length"}],
        "ray": {"workers": 1},
    }


def _requests(state: Path) -> collections.Counter[str]:
    return collections.Counter(line.split()[1] for line in calls(state) if line.startswith("request "))


def _rows(out: Path, folder: str) -> list[dict[str, Any]]:
    return ds.dataset(str(out / folder)).to_table().to_pylist()


def test_a_request_job_retries_what_may_pass_and_records_what_cannot(tmp_path, job_runner, test_plugins):
    config = _job(tmp_path, transient_on=["dog"], transient_times=2, fail_on=["France"], hang_on=["cat"])
    manifest = job_runner(config)
    out, state = Path(config["output"]), tmp_path / "state"
    gens = _rows(out, "generations")
    prompts = {r["prompt_id"]: r["prompt"] for r in _rows(out, "prompts")}
    refused = [pid for pid, p in prompts.items() if "France" in p]
    assert refused, "a quickstart prompt names France"
    assert len(gens) == 2 * (len(prompts) - len(refused))
    for g in gens:  # every answer is the one for its own request
        assert g["text"] == " " + prompts[g["prompt_id"]][::-1] + "!" * g["sample"]
        assert g["prompt_tokens"] == len(prompts[g["prompt_id"]]) and g["num_tokens"] >= 1
    # Only the permanent failures reach errors/; the 429s and the hang were retried away.
    errors = _rows(out, "errors")
    assert sorted(e["prompt_id"] for e in errors) == sorted(refused * 2)
    assert all("400 Bad Request" in e["error"] for e in errors)
    sent = _requests(state)
    by_prompt = {g["generation_id"]: prompts[g["prompt_id"]] for g in gens}
    for gid, prompt in by_prompt.items():
        expected = (3 if "dog" in prompt else 1) + (1 if "cat" in prompt and "dog" not in prompt else 0)
        assert sent[gid] >= expected if "cat" in prompt else sent[gid] == expected, (prompt, sent[gid])
    # Tokens and cost per stage, from the rows' usage and the price.
    stage = manifest["stages"]["generate/api"]
    prompt_tokens = sum(g["prompt_tokens"] for g in gens)
    completion_tokens = sum(g["num_tokens"] for g in gens)
    assert stage["tokens"] == {"prompt": prompt_tokens, "completion": completion_tokens}
    assert stage["cost"] == pytest.approx((prompt_tokens * 1000 + completion_tokens * 2000) / 1e6)
    assert manifest["plugins"]["api"]["requests"]["rate_limited"] >= 2
    assert not (out / "_journal").exists() or not any((out / "_journal").rglob("*.parquet"))

    # A rerun of the finished job sends no request.
    before = sum(sent.values())
    job_runner(config)
    assert sum(_requests(state).values()) == before


def test_the_endpoint_changes_no_id_and_the_key_is_never_written(tmp_path, job_runner, test_plugins):
    config = _job(tmp_path)
    job_runner(config)
    out = Path(config["output"])
    first = sorted(g["generation_id"] for g in _rows(out, "generations"))
    sent = sum(_requests(tmp_path / "state").values())
    config["generators"][0]["params"]["endpoint"] = "http://elsewhere.invalid"
    job_runner(config)  # another server for the same model: nothing to redo
    assert sum(_requests(tmp_path / "state").values()) == sent
    assert sorted(g["generation_id"] for g in _rows(out, "generations")) == first


def _request_cost(prompt: str) -> float:
    """What the job's price makes of one echo-async request (its usage: the prompt's characters
    as prompt tokens, its words as completion tokens)."""
    return (len(prompt) * 1000.0 + len(prompt.split()) * 2000.0) / 1e6


def test_max_cost_stops_within_one_request_and_a_rerun_spends_it_no_more(tmp_path, job_runner, test_plugins):
    from genflow.engine.errors import BudgetSpent

    config = _job(tmp_path, delay_s=0.05)
    prompts = ds.dataset(PROMPTS).to_table().column("prompt").to_pylist()
    shard = [2 * sum(_request_cost(p) for p in prompts[i:i + 8]) for i in (0, 8)]
    # The first shard's requests, and about half of the second's: the budget runs out mid-shard.
    config["max_cost"] = shard[0] + shard[1] / 2
    with pytest.raises(BudgetSpent, match="max_cost"):
        job_runner(config)
    state = tmp_path / "state"
    first = _requests(state)
    assert 16 < sum(first.values()) < 32

    # Run again with the same max_cost: the output's finished shard and journal have spent it.
    with pytest.raises(BudgetSpent, match="max_cost"):
        job_runner(config)
    assert _requests(state) == first, "a rerun under the same max_cost sent requests"

    config["max_cost"] = None
    job_runner(config)
    second = _requests(state)
    assert len(second) == 32 and all(n == 1 for n in second.values()), "every answer kept: none sent twice"
    cost = {g["generation_id"]: _request_cost(g["prompt"]) for g in _rows(Path(config["output"]), "generations")}
    spent = sum(cost[gid] for gid in first)  # counted at the server: what the first run's requests cost
    assert shard[0] + shard[1] / 2 <= spent <= shard[0] + shard[1] / 2 + max(cost.values())


def _running(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie waiting to be reaped does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _journaled(out: Path) -> set[str]:
    """The generation ids in the output's request journal (what a killed run had written)."""
    import pyarrow.parquet as pq

    from genflow.data.storage import TEMPORARY_PREFIX

    parts = [p for p in (out / "_journal").rglob("*.parquet") if not p.name.startswith(TEMPORARY_PREFIX)]
    return {key for part in parts for key in pq.read_table(part)["key"].to_pylist()}


def test_a_job_killed_mid_shard_resends_only_what_was_in_flight(tmp_path, test_plugins):
    config = _job(tmp_path, delay_s=0.05, hold_after=12)  # the 13th request on waits for state/release
    config["shard_rows"] = 16  # one shard: the kill lands mid-shard
    config["generators"][0]["requests"].update(concurrency=4, timeout_s=600.0)
    config["scorers"] = []
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(config))
    env = {**os.environ, **test_plugins, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "genflow.cli", "run", str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state, out = tmp_path / "state", Path(config["output"])
    deadline = time.monotonic() + 300  # a failsafe: the kill waits for an event, not for a time
    while not _journaled(out) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the job must still be running when it is killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # The killed job's request worker stops on its own once its raylet is gone: wait for that,
    # so that the log holds all it sent before the rerun starts.
    workers = {int(line.split("pid=")[1].split()[0]) for line in calls(state) if line.startswith("request ")}
    while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_running(pid) for pid in workers), "the request worker outlived its job"
    before = _requests(state)
    journaled = _journaled(out)
    assert journaled and sum(before.values()) < 32, "the kill must land mid-shard"
    (state / "release").write_text("")
    done = subprocess.run([sys.executable, "-m", "genflow.cli", "run", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    after = _requests(state)
    assert len(after) == 32
    # Bound by what happened, not by the clock: the rerun sends exactly what had no journaled
    # answer (what was in flight, answered but not yet written, or never sent), each once.
    again = after - before
    assert set(again) == set(after) - journaled and all(n == 1 for n in again.values())
    assert not journaled & set(again), "a journaled answer was paid for twice"
    gens = _rows(out, "generations")
    assert len(gens) == 32 and len({g["generation_id"] for g in gens}) == 32

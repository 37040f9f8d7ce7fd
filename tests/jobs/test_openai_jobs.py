"""Whole jobs through the ``openai`` generator against real servers on 127.0.0.1:
``transformers serve``, the stand-in, and the fault proxy in front of it."""

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
import pytest
from support.jobs import ROOT

pytestmark = pytest.mark.slow

PROMPTS = str(ROOT / "configs/data/quickstart_prompts.parquet")
SENTINEL = "sk-genflow-sentinel-7c1f9e42d3"


def _rows(out: Path, folder: str) -> list[dict[str, Any]]:
    return ds.dataset(str(out / folder)).to_table().to_pylist() if (out / folder).exists() else []


def _job(tmp_path: Path, base_url: str | list[str], model: str = "stand-in", **params: Any) -> dict[str, Any]:
    return {
        "name": "served", "input": PROMPTS, "output": str(tmp_path / "out"), "shard_rows": 8,
        "generators": [{"label": "served", "plugin": "openai", "model": model, "samples": 2,
                        "params": {"base_url": base_url, "max_tokens": 12, "temperature": 0.7, **params},
                        "requests": {"concurrency": 16, "timeout_s": 5.0, "backoff_s": 0.02, "max_retries": 8},
                        "price": {"input_per_mtok": 0.5, "output_per_mtok": 1.5}}],
        "scorers": [{"plugin": "length"}],
        "ranking": {"pairs": {"min_margin": 0.0, "per_prompt": 1}, "best_of_n": True},
        "ray": {"workers": 1},
    }


def test_a_job_against_transformers_serve_ranks_and_pairs_and_a_rerun_sends_nothing(
        tmp_path, job_runner, test_plugins, transformers_server):
    config = _job(tmp_path, transformers_server.url, transformers_server.model)
    completions = dict(config["generators"][0], label="completions")
    completions["params"] = {**completions["params"], "endpoint": "completions"}
    config["generators"].append(completions)
    sent_before = transformers_server.requests()
    manifest = job_runner(config)
    out = Path(config["output"])
    gens = _rows(out, "generations")
    assert {g["generator"] for g in gens} == {"served", "completions"}
    assert len(gens) == 16 * 2 * 2 and all(isinstance(g["text"], str) for g in gens)
    assert all(g["prompt_tokens"] and g["prompt_tokens"] > 0 for g in gens)
    assert all(g["latency_s"] > 0 for g in gens)
    assert len(_rows(out, "rankings")) == len(gens) and len(_rows(out, "preferences")) <= 16
    assert len(_rows(out, "sft")) == 16 and not _rows(out, "errors")
    sent = transformers_server.requests() - sent_before
    assert sent == len(gens)  # one request per candidate, no retry needed
    for label in ("served", "completions"):
        stage = manifest["stages"][f"generate/{label}"]
        tokens = [g for g in gens if g["generator"] == label]
        assert stage["tokens"]["prompt"] == sum(g["prompt_tokens"] for g in tokens)
        assert stage["tokens"]["completion"] == sum(g["num_tokens"] for g in tokens)
        assert stage["cost"] == pytest.approx((stage["tokens"]["prompt"] * 0.5 + stage["tokens"]["completion"]
                                               * 1.5) / 1e6)
    assert "completion tokens" in (out / "report.html").read_text()

    job_runner(config)  # finished: not one request
    assert transformers_server.requests() - sent_before == sent


def test_through_a_faulty_proxy_every_row_arrives_once_and_rejections_fall(
        tmp_path, job_runner, test_plugins, make_standin_server, make_fault_proxy):
    server = make_standin_server(latency=0.05)
    proxy = make_fault_proxy(server.url, rate=0.15, kinds=(429, 500, "drop", "malformed", "disconnect"), seed=3,
                             faults={5: "hang"}, hang_s=30.0, max_in_flight=6)
    config = _job(tmp_path, proxy.url)
    config["generators"][0]["samples"] = 4
    config["generators"][0]["requests"].update(concurrency=32, timeout_s=2.0)
    manifest = job_runner(config)
    out = Path(config["output"])
    gens = _rows(out, "generations")
    assert len(gens) == 64 and len({g["generation_id"] for g in gens}) == 64
    assert not _rows(out, "errors")  # every fault was transient
    prompts = {r["prompt_id"]: r["prompt"] for r in _rows(out, "prompts")}
    for g in gens:  # each row holds the answer to its own request (the stand-in echoes it, max_tokens words)
        expected = " ".join(f"echo: {prompts[g['prompt_id']]} (seed {g['seed']})".split()[:12])
        assert g["text"] == expected
    assert proxy.injected["hang"] == 1 and proxy.injected["cap"] > 0
    stats = manifest["plugins"]["served"]["requests"]
    assert stats["rate_limited"] > 0 and stats["concurrency_lowest"] < 32
    assert proxy.max_in_flight_seen <= 32
    # Rejections fall as the concurrency adapts: the cap's 429s come early, not all along.
    cap_429s = [at for at, outcome in proxy.events if outcome == "cap"]
    half = proxy.events[len(proxy.events) // 2][0]
    assert sum(at < half for at in cap_429s) > sum(at >= half for at in cap_429s)


def _scan(root: Path, needle: bytes) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            try:
                if needle in path.read_bytes():
                    found.append(str(path))
            except OSError:
                pass
    return found


def test_the_api_key_reaches_the_server_and_nothing_else(tmp_path, make_standin_server, make_fault_proxy):
    server = make_standin_server()
    # One request is refused with an error that repeats the Authorization header back.
    proxy = make_fault_proxy(server.url, faults={3: "echo_auth"})
    config = _job(tmp_path, proxy.url, api_key_env="GENFLOW_TEST_API_KEY")
    config["scorers"] = [{"plugin": "embedding-sim"}]
    config["max_error_fraction"] = 0.5
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(config))
    home = tmp_path / "prefect-home"
    env = {**os.environ, "GENFLOW_TEST_API_KEY": SENTINEL, "PREFECT_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([sys.executable, "-m", "genflow.cli", "-v", "run", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert any(r.authorization == f"Bearer {SENTINEL}" for r in server.requests), "the key was sent"
    errors = _rows(Path(config["output"]), "errors")
    assert len(errors) == 1 and "401" in errors[0]["error"]
    assert SENTINEL not in done.stdout + done.stderr
    leaks = _scan(Path(config["output"]), SENTINEL.encode()) + _scan(home, SENTINEL.encode())
    leaks += _scan(Path("/tmp/ray"), SENTINEL.encode()) if Path("/tmp/ray").exists() else []
    assert not leaks, leaks
    assert list(home.rglob("*.db")), "the Prefect database was searched"


def _asked(server: Any) -> list[tuple[str, int]]:
    """Each request the stand-in received, as (prompt, seed): what names a candidate's request."""
    return [(r.body["messages"][-1]["content"], r.body["seed"]) for r in list(server.requests)]


def _segments(out: Path) -> list[Path]:
    """The output's request journal segments (not a write the kill left half done)."""
    from genflow.data.storage import TEMPORARY_PREFIX

    return [p for p in (out / "_journal").rglob("*.parquet") if not p.name.startswith(TEMPORARY_PREFIX)]


def _journaled(out: Path) -> set[str]:
    """The generation ids in the output's request journal (answers a killed run had written)."""
    import pyarrow.parquet as pq

    return {key for part in _segments(out) for key in pq.read_table(part)["key"].to_pylist()}


def test_a_kill_mid_shard_resends_only_what_was_in_flight_and_the_rows_match(tmp_path, make_standin_server):
    import itertools
    import threading

    from support.servers import echo_answer

    release, ordinals = threading.Event(), itertools.count(1)

    def held(path: str, body: dict[str, Any]) -> str:
        """The first 8 answers; then the server stops answering until released (the job cannot end)."""
        if next(ordinals) > 8:
            release.wait(timeout=600)
        return echo_answer(path, body)

    first_server, second_server = make_standin_server(latency=0.25, answer=held), make_standin_server(latency=0.25)
    config = _job(tmp_path, first_server.url)
    config["shard_rows"] = 16
    config["scorers"] = []
    config["generators"][0]["requests"].update(concurrency=4, timeout_s=600.0)
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "genflow.cli", "run", str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    out = Path(config["output"])
    deadline = time.monotonic() + 300  # a failsafe: the kill waits for an event, not for a time
    while not _segments(out) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the job must still be running when it is killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    journaled = _journaled(out)  # what the killed run kept: nothing writes it any more
    assert journaled, "answers are journaled as they arrive"
    release.set()  # the first server answers again (to no one)

    # The rerun goes to a second server of the same model (base_url changes no id): what the
    # killed run's worker still sent on its way out stays with the first, and cannot be
    # mistaken for the rerun's.
    config["generators"][0]["params"]["base_url"] = second_server.url
    path.write_text(json.dumps(config))
    done = subprocess.run([sys.executable, "-m", "genflow.cli", "run", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    gens = _rows(out, "generations")
    assert len(gens) == 32 and len({g["generation_id"] for g in gens}) == 32
    ids = {(g["prompt"], g["seed"]): g["generation_id"] for g in gens}
    before = [ids[key] for key in _asked(first_server)]
    again = [ids[key] for key in _asked(second_server)]
    # Bound by what happened, not by the clock: the rerun asks exactly for what had no journaled
    # answer, each once; every request the killed run sent and journaled is never paid for twice.
    assert sorted(again) == sorted(set(ids.values()) - journaled)
    resent = set(before) & set(again)
    assert resent == set(before) - journaled, "a request answered and journaled was sent again"
    killed = sorted((g["generation_id"], g["text"]) for g in gens)

    # The same job, never interrupted, writes the same rows.
    config["output"] = str(tmp_path / "clean")
    path.write_text(json.dumps(config))
    again_run = subprocess.run([sys.executable, "-m", "genflow.cli", "run", str(path)], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=300)
    assert again_run.returncode == 0, again_run.stderr[-3000:]
    assert killed == sorted((g["generation_id"], g["text"]) for g in _rows(tmp_path / "clean", "generations"))

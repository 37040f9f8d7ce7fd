"""Batch mode (``requests: {mode: batch}``) against the stand-in Batch API (``support.batch_server``).

The server counts what a client asked for: live requests (``received``), batches created
and each request's lines over every batch (``lines``): what the job would have paid.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from support.batch_server import BatchServer
from support.jobs import ROOT
from typer.testing import CliRunner

pytestmark = pytest.mark.slow

PROMPTS = str(ROOT / "configs/data/quickstart_prompts.parquet")
PRICE = {"input_per_mtok": 0.5, "output_per_mtok": 1.5, "batch_input_per_mtok": 0.25, "batch_output_per_mtok": 0.75}


@pytest.fixture
def batch_server():
    server = BatchServer().start()
    yield server
    server.stop()


def _job(tmp_path: Path, out: str, server: BatchServer, mode: str = "batch", **requests: Any) -> dict[str, Any]:
    return {
        "name": "batched", "input": PROMPTS, "output": str(tmp_path / out), "shard_rows": 16,
        "generators": [{"label": "served", "plugin": "openai", "model": "stand-in", "samples": 2,
                        "params": {"base_url": server.url, "max_tokens": 8, "temperature": 0.7},
                        "requests": {"mode": mode, "poll_s": 0.05, "timeout_s": 120.0, "backoff_s": 0.02,
                                     **requests},
                        "price": PRICE}],
        "scorers": [{"plugin": "length"}],
        "ray": {"workers": 1},
    }


def _rows(out: Path, folder: str) -> list[dict[str, Any]]:
    return ds.dataset(str(out / folder)).to_table().to_pylist() if (out / folder).exists() else []


def _generations(out: Path) -> dict[str, tuple[str, int, int, str]]:
    return {r["generation_id"]: (r["text"], r["prompt_tokens"], r["num_tokens"], r["finish_reason"])
            for r in _rows(out, "generations")}


def test_batch_mode_writes_the_rows_live_mode_writes_at_the_batch_price(tmp_path, job_runner, test_plugins,
                                                                       batch_server):
    live = job_runner(_job(tmp_path, "live", batch_server, mode="live"))
    assert batch_server.received == 32 and batch_server.batches_created == 0
    batch = job_runner(_job(tmp_path, "batch", batch_server))
    assert batch_server.received == 32, "batch mode sent live requests"
    assert batch_server.batches_created == 1 and batch_server.uploads_purposes == ["batch"]
    rows = _generations(tmp_path / "batch")
    assert rows == _generations(tmp_path / "live") and len(rows) == 32
    assert set(batch_server.lines) == set(rows) and set(batch_server.lines.values()) == {1}
    stage = batch["stages"]["generate/served"]
    tokens = stage["tokens"]
    assert tokens == live["stages"]["generate/served"]["tokens"]
    assert stage["cost"] == pytest.approx((tokens["prompt"] * 0.25 + tokens["completion"] * 0.75) / 1e6)
    assert live["stages"]["generate/served"]["cost"] == pytest.approx(2 * stage["cost"])
    assert batch["plugins"]["served"]["requests"]["batches"] == 1
    assert not _rows(tmp_path / "batch", "errors")


def test_expired_and_failed_lines_go_in_a_new_batch_then_to_errors(tmp_path, job_runner, test_plugins,
                                                                  batch_server):
    poisoned: set[str] = set()

    def fail_line(custom_id: str, ordinal: int) -> bool:
        if not poisoned:
            poisoned.update(sorted(batch_server.lines)[:3])  # three requests fail in every batch
        return custom_id in poisoned

    batch_server.fail_line = fail_line
    batch_server.expire_after = {1: 20}  # the first batch expires with 20 of its 32 lines done
    job_runner(_job(tmp_path, "out", batch_server, max_resubmits=1))
    out = tmp_path / "out"
    first = batch_server.batches[min(batch_server.batches, key=lambda b: batch_server.batches[b].ordinal)]
    assert first.status == "expired"
    assert batch_server.batches_created == 2  # the failed and expired lines, sent again once
    expired = {line["custom_id"] for line in first.lines[20:]}
    again = {c for c, n in batch_server.lines.items() if n == 2}
    assert again == expired | poisoned
    gens = _generations(out)
    errors = _rows(out, "errors")
    assert sorted(e["generation_id"] for e in errors) == sorted(poisoned)
    assert all("after 2 batches" in e["error"] and "status 500" in e["error"] for e in errors)
    assert set(gens) | poisoned == set(batch_server.lines) and not set(gens) & poisoned


def _batch_journal(out: Path) -> list[dict[str, Any]]:
    folder = out / "_state" / "batches" / "served"
    return [json.loads(p.read_text()) for p in folder.glob("*.json")] if folder.exists() else []


def test_a_job_killed_while_its_batch_runs_reattaches_and_pays_once(tmp_path, job_runner, test_plugins,
                                                                   batch_server):
    batch_server.hold = True  # the batch stays in_progress until the job is killed
    config = _job(tmp_path, "out", batch_server)
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(config))
    env = {**os.environ, **test_plugins, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "genflow.cli", "run", str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    out = tmp_path / "out"
    deadline = time.monotonic() + 300  # a failsafe: the kill waits for an event, not for a time
    while not (_batch_journal(out) and any(b.status == "in_progress" for b in batch_server.batches.values())) \
            and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the job must still be running when it is killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    [record] = _batch_journal(out)
    assert batch_server.batches_created == 1 and record["batch_id"] in batch_server.batches
    assert not _rows(out, "generations")
    batch_server.hold = False
    job_runner(config)  # the rerun finds the batch in the journal and waits for it
    assert batch_server.batches_created == 1, "the rerun created a second batch for the same requests"
    assert set(batch_server.lines.values()) == {1} and batch_server.received == 0
    gens = _rows(out, "generations")
    assert len(gens) == 32 and len({g["generation_id"] for g in gens}) == 32
    assert {g["generation_id"] for g in gens} == set(record["custom_ids"])


def test_batch_answers_fill_the_cache_a_live_job_then_reads(tmp_path, job_runner, test_plugins, batch_server):
    cache = {"path": str(tmp_path / "cache")}
    job_runner({**_job(tmp_path, "batch", batch_server), "cache": cache})
    assert batch_server.batches_created == 1
    live = job_runner({**_job(tmp_path, "live", batch_server, mode="live"), "cache": cache})
    assert batch_server.received == 0 and live["plugins"]["served"]["requests"]["cache_hits"] == 32
    assert _generations(tmp_path / "live") == _generations(tmp_path / "batch")
    again = job_runner({**_job(tmp_path, "batch-again", batch_server), "cache": cache})
    assert batch_server.batches_created == 1, "a batch was created for answers the cache holds"
    assert not again["stages"]["generate/served"].get("cost")


def _verdict_by_length(path: str, body: dict[str, Any]) -> str:
    """A judge preferring the longer response, rating by length (deterministic, from the request)."""
    user = str(body["messages"][-1]["content"])
    pair = re.search(r"<response-A-(\w+)>\n(.*?)\n</response-A-\1>.*?<response-B-\1>\n(.*?)\n</response-B-\1>",
                     user, re.S)
    if pair:
        winner = "A" if len(pair.group(2)) > len(pair.group(3)) else "B"
        return f"Response {winner} says more.\nVerdict: {winner}"
    return json.dumps({"reasoning": "by length", "score": 1 + len(user) % 5})


def _judge_job(tmp_path: Path, out: str, server: BatchServer, mode: str) -> dict[str, Any]:
    source = tmp_path / "responses.parquet"
    if not source.exists():
        rows = [{"id": f"q{p}", "prompt": f"Describe thing {p}.",
                 "responses": [f"answer{p} " + "word " * n for n in ([3, 9, 1, 6] if p % 2 else [7, 2, 10, 4])]}
                for p in range(4)]
        pq.write_table(pa.Table.from_pylist(rows), source)
    requests = {"mode": mode, "poll_s": 0.05, "timeout_s": 120.0, "backoff_s": 0.02}
    judge = {"model": "judge-model", "requests": requests, "price": PRICE}
    return {"name": "judged", "input": str(source), "output": str(tmp_path / out), "shard_rows": 4,
            "scorers": [{**judge, "plugin": "llm-judge", "label": "pairs",
                         "params": {"base_url": server.url, "max_tokens": 64, "mode": "pairwise"}},
                        {**judge, "plugin": "llm-judge", "label": "rater",
                         "params": {"base_url": server.url, "max_tokens": 64, "scale": [1, 5],
                                    "score_from": "json"}}],
            "ray": {"workers": 1}}


def _scores(out: Path) -> dict[tuple[str, str], tuple[float, str]]:
    return {(r["scorer"], r["generation_id"]): (r["score"], r["details"]) for r in _rows(out, "scores")}


def test_a_served_judge_in_batch_mode_scores_as_live_and_reads_the_cache(tmp_path, job_runner, batch_server):
    batch_server.answer = _verdict_by_length
    live = job_runner(_judge_job(tmp_path, "live", batch_server, "live"))
    sent = batch_server.received
    assert sent == 4 * 6 * 2 + 16  # every pair in both orders, and a rating per candidate
    config = _judge_job(tmp_path, "batch", batch_server, "batch")
    config["cache"] = {"path": str(tmp_path / "cache")}
    batch = job_runner(config)
    assert batch_server.received == sent and batch_server.batches_created == 2  # one per judge
    assert sum(batch_server.lines.values()) == sent
    assert _scores(tmp_path / "batch") == _scores(tmp_path / "live") and len(_scores(tmp_path / "live")) == 32
    for label in ("pairs", "rater"):
        tokens = batch["stages"][f"score/{label}"]["tokens"]
        assert tokens == live["stages"][f"score/{label}"]["tokens"]
        assert batch["stages"][f"score/{label}"]["cost"] == pytest.approx(
            (tokens["prompt"] * 0.25 + tokens["completion"] * 0.75) / 1e6)
    again = job_runner({**_judge_job(tmp_path, "again", batch_server, "live"), "cache": config["cache"]})
    assert batch_server.received == sent, "the judge sent questions the cache holds"
    assert again["plugins"]["rater"]["requests"]["cache_hits"] == 16
    assert _scores(tmp_path / "again") == _scores(tmp_path / "live")
    assert not again["stages"]["score/rater"].get("cost") and not again["stages"]["score/pairs"].get("cost")


# -- the runner alone, against the stand-in (no job) ----------------------------------

def _run(runner: Any, items: list[Any]) -> list[tuple[Any, ...]]:
    async def collect() -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        try:
            async for answers in runner.run(items):
                out += answers
        finally:
            await runner.plugin.aclose()
        return out

    return asyncio.run(collect())


def _runner(tmp_path: Path, server: BatchServer, **spec: Any) -> Any:
    from genflow.config import RequestsSpec
    from genflow.engine.batches import BatchRunner
    from genflow.plugins.served.openai_api import OpenAIGenerator, OpenAIParams

    plugin = OpenAIGenerator("stand-in", OpenAIParams(base_url=server.url, max_tokens=8), "cpu")
    requests = RequestsSpec(mode="batch", poll_s=0.01, batch_journal=str(tmp_path / "journal"), **spec)
    return BatchRunner(plugin, requests, "served", sleep=lambda s: asyncio.sleep(0))


def _items(n: int) -> list[Any]:
    from genflow.api import GenerationRequest

    return [GenerationRequest(f"g{i:03d}", f"p{i}", f"prompt number {i}", 0, i) for i in range(n)]


def test_requests_over_a_batchs_limits_are_split(tmp_path, batch_server):
    runner = _runner(tmp_path, batch_server, max_batch_requests=10)
    answers = _run(runner, _items(25))
    assert batch_server.batches_created == 3
    assert runner.progress() == "batches: 0 running, 3 ended; 25/25 answered"
    assert sorted(len(b.lines) for b in batch_server.batches.values()) == [5, 10, 10]
    assert sorted(a[0] for a in answers) == list(range(25))
    assert all(a[1].text.startswith(f"echo: prompt number {a[0]} ") for a in answers)
    _run(_runner(tmp_path / "bytes", batch_server, max_batch_bytes=1024), _items(25))  # about 5 lines a file
    split = [b for b in batch_server.batches.values() if b.ordinal > 3]
    assert len(split) >= 4 and sum(len(b.lines) for b in split) == 25
    assert all(len(batch_server.files[b.input_file_id][0]) <= 1024 for b in split)

def test_a_journaled_batch_the_provider_no_longer_has_is_sent_again(tmp_path, batch_server):
    from genflow.engine.batches import BatchJournal, BatchRecord

    BatchJournal(str(tmp_path / "journal")).record(BatchRecord("batch_gone", [f"g{i:03d}" for i in range(5)]))
    answers = _run(_runner(tmp_path, batch_server), _items(5))
    assert batch_server.batches_created == 1 and len(answers) == 5
    assert all(a[1].text.startswith("echo: prompt number") for a in answers)


def test_genflow_cancel_batches_cancels_the_batches_still_running(tmp_path, batch_server):
    from genflow.cli import app
    from genflow.engine.batches import BatchJournal, BatchRecord
    from genflow.plugins.shared.openai_client import OpenAIClient

    async def create() -> str:
        client = OpenAIClient(batch_server.url, None, "/chat/completions")
        try:
            line = {"custom_id": "g1", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "stand-in", "messages": [{"role": "user", "content": "hi"}]}}
            file_id = await client.batch_upload(json.dumps(line).encode() + b"\n", "in.jsonl")
            return str((await client.batch_create(file_id, "/v1/chat/completions", "24h", {}))["id"])
        finally:
            await client.aclose()

    batch_server.hold = True
    running, done = asyncio.run(create()), asyncio.run(create())
    batch_server.batches[done].status = "completed"
    journal = BatchJournal(str(tmp_path / "out" / "_state" / "batches" / "served"))
    journal.record(BatchRecord(running, ["g1"]))
    journal.record(BatchRecord(done, ["g1"], round=1))
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps({**_job(tmp_path, "out", batch_server), "scorers": []}))
    result = CliRunner().invoke(app, ["cancel-batches", str(path)])
    assert result.exit_code == 0, result.output
    assert f"served {running}: cancelling" in result.output and f"served {done}: completed" in result.output
    assert batch_server.batches[running].status == "cancelling"
    assert batch_server.batches[done].status == "completed"


def test_the_progress_line_shows_the_batches_and_their_counts(caplog, monkeypatch):
    from genflow.runtime import progress
    from genflow.runtime.progress import StageProgress

    monkeypatch.setattr(progress, "NOTE_EVERY_S", 3600.0)  # the test refreshes by hand

    notes = iter(["", "batches: 1 running, 0 ended; 0/32 answered", "batches: 1 running, 0 ended; 0/32 answered",
                  "batches: 0 running, 1 ended; 32/32 answered"])
    caplog.set_level(logging.INFO, logger="genflow")
    with StageProgress("generate served", 32, note=lambda: next(notes)) as bar:
        for _ in range(4):
            bar.refresh()  # what its thread does every NOTE_EVERY_S
    said = [r.getMessage() for r in caplog.records if "batches:" in r.getMessage()]
    assert said == ["generate served: 0/32 rows, batches: 1 running, 0 ended; 0/32 answered",
                    "generate served: 0/32 rows, batches: 0 running, 1 ended; 32/32 answered"]

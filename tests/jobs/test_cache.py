"""The response cache: jobs sharing answers (``genflow.engine.cache``), and ``genflow cache``.

The job tests run the ``openai`` generator against the stand-in server, which counts the
requests it answers: a second job into a new output with the same prompts and params
sends none, one with another sampling param sends them all, and one allowing more tokens
sends only the requests whose answers were cut.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pytest
from support.jobs import ROOT
from typer.testing import CliRunner

from genflow.cli import app
from genflow.engine.cache import ResponseCache, cache_key, parse_age

PROMPTS = str(ROOT / "configs/data/quickstart_prompts.parquet")
CHAT = "/chat/completions"


def _answer(text: str, finish_reason: str = "stop", completion_tokens: int = 3) -> dict[str, Any]:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": 5, "completion_tokens": completion_tokens}}


def _body(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": 7, **extra}


# -- the key and what is a hit ------------------------------------------------------

def test_the_key_is_the_request_and_never_the_length_bound():
    assert cache_key(CHAT, _body()) == cache_key(CHAT, _body(max_tokens=10))
    assert cache_key(CHAT, _body()) != cache_key(CHAT, _body(seed=8))
    assert cache_key(CHAT, _body()) != cache_key(CHAT, _body(temperature=0.5))
    assert cache_key(CHAT, _body()) != cache_key("/completions", _body())
    assert cache_key(CHAT, _body(model="a")) != cache_key(CHAT, _body(model="b"))


def test_a_cut_answer_is_no_hit_for_a_request_allowing_more(tmp_path):
    cache = ResponseCache.open(str(tmp_path / "c"))
    assert cache.put(CHAT, _body(max_tokens=3), _answer("a b c", "length", 3))
    assert cache.get(CHAT, _body(max_tokens=3)) == _answer("a b c", "length", 3)
    assert cache.get(CHAT, _body(max_tokens=10)) is None  # would be longer
    assert cache.get(CHAT, _body(max_tokens=2)) is None  # would be cut elsewhere
    assert cache.get(CHAT, _body()) is None
    # An answer that ended by itself answers any request allowing at least its tokens.
    assert cache.put(CHAT, _body(max_tokens=10), _answer("a b c", "stop", 3))
    assert cache.get(CHAT, _body(max_tokens=50)) is not None and cache.get(CHAT, _body()) is not None
    assert cache.get(CHAT, _body(max_tokens=3)) is not None
    assert cache.get(CHAT, _body(max_tokens=2)) is None
    assert (cache.hits, cache.misses) == (4, 4)


def test_failed_answers_are_never_kept(tmp_path):
    cache = ResponseCache.open(str(tmp_path / "c"))
    assert not cache.put(CHAT, _body(), {"error": {"message": "overloaded"}})
    assert not cache.put(CHAT, _body(), {"choices": []})
    assert cache.get(CHAT, _body()) is None and cache.stats().entries == 0


def test_an_answer_holding_a_secret_of_the_job_is_never_kept(tmp_path, monkeypatch):
    from genflow import secrets

    key = "sk-proj-cache0123456789abcdefXYZ"
    monkeypatch.setattr(secrets, "_installed", secrets.Scrubber([secrets.Secret(key, "$OPENAI_API_KEY")]))
    cache = ResponseCache.open(str(tmp_path / "c"))
    assert not cache.put(CHAT, _body(), _answer(f"your key is {key}"))
    assert cache.get(CHAT, _body()) is None and cache.stats().entries == 0
    assert not any(key in p.read_text() for p in (tmp_path / "c").rglob("*") if p.is_file())
    assert cache.put(CHAT, _body(), _answer("no secret here")) and cache.stats().entries == 1


def test_an_unreadable_entry_is_a_miss_and_is_written_again(tmp_path):
    cache = ResponseCache.open(str(tmp_path / "c"))
    cache.put(CHAT, _body(), _answer("x"))
    [entry] = list((tmp_path / "c").rglob("*.json"))
    entry.write_text('{"key": "cut sh')
    assert cache.get(CHAT, _body()) is None
    cache.put(CHAT, _body(), _answer("y"))
    assert cache.get(CHAT, _body())["choices"][0]["message"]["content"] == "y"


def _write_many(path: str, writer: int, keys: int) -> None:
    cache = ResponseCache.open(path)
    for i in range(keys):  # every writer writes every key (the same request), and keys of its own
        cache.put(CHAT, _body(seed=i), _answer(f"shared {i}"))
        cache.put(CHAT, _body(seed=1000 * (writer + 1) + i), _answer(f"own {writer} {i}"))
        assert cache.get(CHAT, _body(seed=i)) == _answer(f"shared {i}")


def test_jobs_writing_one_cache_at_once_leave_every_entry_whole(tmp_path):
    path, keys, writers = str(tmp_path / "c"), 40, 4
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(path, w, keys)) for w in range(writers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * writers
    cache = ResponseCache.open(path)
    assert cache.stats().entries == keys * (writers + 1)
    for i in range(keys):
        assert cache.get(CHAT, _body(seed=i)) == _answer(f"shared {i}")
        for w in range(writers):
            assert cache.get(CHAT, _body(seed=1000 * (w + 1) + i)) == _answer(f"own {w} {i}")
    assert not [p for p in Path(path).rglob("*") if p.name.startswith(".tmp-")]


def test_genflow_cache_stats_and_prune(tmp_path, monkeypatch):
    path = tmp_path / "c"
    cache = ResponseCache.open(str(path))
    for seed in range(5):
        cache.put(CHAT, _body(seed=seed), _answer(f"answer {seed}"))
    old = time.time() - 40 * 86400
    for entry in sorted(path.rglob("*.json"))[:3]:
        os.utime(entry, (old, old))
    runner = CliRunner()
    result = runner.invoke(app, ["cache", "stats", str(path)])
    assert result.exit_code == 0, result.output
    assert f"{path}: 5 answers" in result.output
    result = runner.invoke(app, ["cache", "prune", str(path), "--older-than", "30d"])
    assert result.exit_code == 0, result.output
    assert "deleted 3 answers older than 30d" in result.output
    monkeypatch.setenv("GENFLOW_CACHE", str(path))  # the default cache
    result = runner.invoke(app, ["cache", "stats"])
    assert f"{path}: 2 answers" in result.output
    result = runner.invoke(app, ["cache", "prune", "--older-than", "soon"])
    assert result.exit_code == 2 and "not an age" in result.output
    assert parse_age("12h") == 12 * 3600 and parse_age("2w") == 14 * 86400


# -- jobs sharing a cache -------------------------------------------------------------

def _job(tmp_path: Path, out: str, base_url: str, cache: Path, **params: Any) -> dict[str, Any]:
    return {
        "name": "cached", "input": PROMPTS, "output": str(tmp_path / out), "shard_rows": 8,
        "cache": {"path": str(cache)},
        "generators": [{"label": "served", "plugin": "openai", "model": "stand-in", "samples": 2,
                        "params": {"base_url": base_url, "max_tokens": 8, "temperature": 0.7, **params},
                        "requests": {"concurrency": 8, "timeout_s": 120.0, "backoff_s": 0.02},
                        "price": {"input_per_mtok": 0.5, "output_per_mtok": 1.5}}],
        "scorers": [{"plugin": "length"}],
        "ray": {"workers": 1},
    }


def _generations(out: Path) -> dict[str, tuple[str, int, str]]:
    rows = ds.dataset(str(out / "generations")).to_table().to_pylist()
    return {r["generation_id"]: (r["text"], r["num_tokens"], r["finish_reason"]) for r in rows}


@pytest.mark.slow
def test_a_second_job_sends_nothing_and_a_changed_param_sends_everything(
        tmp_path, job_runner, test_plugins, make_standin_server):
    server = make_standin_server()
    cache = tmp_path / "cache"
    first = job_runner(_job(tmp_path, "first", server.url, cache))
    rows = _generations(tmp_path / "first")
    sent = server.received
    assert sent == len(rows) == 32
    assert first["plugins"]["served"]["requests"]["cache_hits"] == 0
    assert first["plugins"]["served"]["requests"]["cache_writes"] == sent
    assert first["stages"]["generate/served"]["cost"] > 0

    second = job_runner(_job(tmp_path, "second", server.url, cache))  # a new output, the same requests
    assert server.received == sent, "the second job sent requests the cache holds"
    assert _generations(tmp_path / "second") == rows
    assert second["plugins"]["served"]["requests"]["cache_hits"] == sent
    assert not second["stages"]["generate/served"].get("cost")  # the answers were paid for once

    job_runner(_job(tmp_path, "hotter", server.url, cache, temperature=0.9))  # another sampling param
    assert server.received == 2 * sent
    assert {r.body["temperature"] for r in server.requests[sent:]} == {0.9}

    # Allowing more tokens: only the answers cut by max_tokens are sent again.
    cut = sum(1 for _, _, reason in rows.values() if reason == "length")
    assert 0 < cut < sent
    longer = job_runner(_job(tmp_path, "longer", server.url, cache, max_tokens=64))
    assert server.received == 2 * sent + cut
    assert longer["plugins"]["served"]["requests"]["cache_hits"] == sent - cut
    assert all(reason == "stop" for _, _, reason in _generations(tmp_path / "longer").values())


@pytest.mark.slow
def test_genflow_cache_names_a_cache_for_every_job(tmp_path, job_runner, test_plugins, make_standin_server,
                                                   monkeypatch):
    server = make_standin_server()
    monkeypatch.setenv("GENFLOW_CACHE", str(tmp_path / "shared"))
    for out in ("a", "b"):
        config = _job(tmp_path, out, server.url, tmp_path / "unused")
        del config["cache"]
        job_runner(config)
    assert server.received == 32
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["plugins"]["served"]["requests"][
        "cache_hits"] == 32

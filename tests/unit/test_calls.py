"""How a stage cuts a shard into Ray calls: the plugin's ``batch_keys``, worked out on its workers,
and the first stage's workers launched before the flow."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from support.plugins_for_tests import calls

from genflow.api import GenerationRequest
from genflow.config import build_config
from genflow.stages import call_batches, call_size


def _requests(n: int) -> list[GenerationRequest]:
    return [GenerationRequest(f"g{i}", f"p{i}", "x", 0, i) for i in range(n)]


def test_calls_take_neighbouring_keys_largest_first_ties_by_generation_id() -> None:
    items = _requests(7)
    batches = call_batches(items, [3, 1, 3, 2, 1, 0, 2], 3)
    assert [[i.generation_id for i in b] for b in batches] == [["g2", "g0", "g6"], ["g3", "g4", "g1"], ["g5"]]


def test_without_keys_or_with_keys_that_do_not_compare_the_order_is_kept(caplog: pytest.LogCaptureFixture) -> None:
    items = _requests(5)
    in_order = [items[:2], items[2:4], items[4:]]
    assert call_batches(items, None, 2) == in_order
    with caplog.at_level(logging.WARNING, logger="genflow.stages"):
        assert call_batches(items, [1, "a", 2, None, 0], 2) == in_order
    assert "do not compare" in caplog.text


def test_call_size_is_the_stages_then_the_jobs_then_the_plugins() -> None:
    class Plugin:
        batch_size = 48

    base = {"name": "x", "input": "in.parquet", "output": "out"}
    assert call_size(None, build_config(base), Plugin) == 48
    assert call_size(None, build_config({**base, "ray": {"batch_size": 8}}), Plugin) == 8
    assert call_size(3, build_config({**base, "ray": {"batch_size": 8}}), Plugin) == 3
    from genflow.plugins.image.generator import DiffusersImageGenerator
    from genflow.plugins.text.embedding import EmbeddingSimScorer

    assert EmbeddingSimScorer.batch_size > DiffusersImageGenerator.batch_size  # text embeds by the hundred


def _echo_job(tmp_path: Path, prompts: list[str], **params: Any) -> dict[str, Any]:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    pq.write_table(pa.table({"prompt": prompts}), tmp_path / "prompts.parquet")
    return {"name": "calls", "input": str(tmp_path / "prompts.parquet"), "output": str(tmp_path / "out"),
            "generators": [{"label": "echo", "plugin": "echo", "params": {"state_dir": str(state), **params}}],
            "ray": {"workers": 2, "batch_size": 4}}


# 24 prompts of 1 to 6 words, 4 of each, in an order that mixes the word counts up.
WORDY = [" ".join(["word"] * (1 + (i * 5) % 6)) for i in range(24)]


@pytest.mark.slow
def test_the_generate_stage_batches_by_the_plugins_keys(tmp_path: Path, job_runner: Any,
                                                        test_plugins: dict[str, str]) -> None:
    prompts = [f"{w} {i}" for i, w in enumerate(WORDY)]  # distinct rows; the number adds one word to each
    config = _echo_job(tmp_path, prompts, keys="words")
    manifest = job_runner(config)
    assert manifest["rows"]["generations"] == 24
    words = [line.split()[1] for line in calls(tmp_path / "state") if line.startswith("words ")]
    # Keyed on word count, every call of 4 holds prompts of one word count: 6 calls, one per count.
    assert sorted(words) == sorted(",".join([str(n)] * 4) for n in range(2, 8))


@pytest.mark.slow
def test_a_plugin_whose_keys_fail_still_gets_every_row(tmp_path: Path, job_runner: Any,
                                                       test_plugins: dict[str, str]) -> None:
    prompts = [f"prompt number {i}" for i in range(10)]
    manifest = job_runner(_echo_job(tmp_path, prompts, keys="broken"))
    assert manifest["status"] == "completed" and manifest["errors"]["rows"] == 0
    texts = ds.dataset(tmp_path / "out" / "generations").to_table(columns=["text"])["text"].to_pylist()
    assert sorted(texts) == sorted(" " + p[::-1] for p in prompts)


@pytest.mark.slow
def test_a_new_job_launches_its_workers_before_the_flow_and_its_stages_share_them(
        tmp_path: Path, job_runner: Any, test_plugins: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from genflow.runtime.session import JobSession

    launched: list[str] = []
    left: list[Any] = []
    real_launch = JobSession.launch_workers

    def recording(session: JobSession) -> type | None:
        factory = real_launch(session)
        launched.append(getattr(factory, "__name__", ""))
        left.append(session)
        return factory

    monkeypatch.setattr(JobSession, "launch_workers", recording)
    config = _echo_job(tmp_path, [f"prompt {i}" for i in range(6)])
    config["scorers"] = [{"plugin": "length", "params": {"state_dir": str(tmp_path / "state")}}]
    first = job_runner(config)
    assert launched == ["Echo"] and first["rows"]["scores"] == 6
    assert left[0].early_workers is None  # the flow took the workers launched for it

    def pids(kind: str) -> set[str]:
        return {line.split("pid=")[1].split()[0] for line in calls(tmp_path / "state") if line.startswith(kind)}

    # Two worker processes, each loaded the generator once, then the scorer in its place.
    assert len(pids("init echo")) == 2 and pids("init length") == pids("init echo")
    assert pids("call length") <= pids("init echo")

    second = job_runner(config)  # finished: nothing to launch, nothing to run
    assert launched == ["Echo"] and second["rows"] == first["rows"]
    assert len([line for line in calls(tmp_path / "state") if line.startswith("init")]) == 4


# -- packs: small shards share calls -----------------------------------------------

def _shard_rows(out: Path, folder: str, n: int) -> list[list[dict[str, Any]]]:
    from genflow.data import layout

    stage = layout.generate_stage("echo") if folder == "generations" else layout.score_stage("length")
    return [pq.read_table(out / stage.part(i)).to_pylist() for i in range(n)]


@pytest.mark.slow
def test_calls_span_small_shards_and_every_row_lands_in_its_own_shards_part(
        tmp_path: Path, job_runner: Any, test_plugins: dict[str, str]) -> None:
    from genflow.data import layout

    prompts = [f"prompt {i}" for i in range(22)]  # 8 shards of 3 (the last of 1), 2 samples: 6 items a shard
    config = _echo_job(tmp_path, prompts)
    config.update(shard_rows=3)
    config["generators"][0]["samples"] = 2
    config["scorers"] = [{"plugin": "length", "params": {"state_dir": str(tmp_path / "state")}}]
    manifest = job_runner(config)
    assert manifest["status"] == "completed" and manifest["rows"]["generations"] == 44
    assert manifest["rows"]["scores"] == 44

    # Calls of the batch size (4) although a shard has 6 items: 11 calls of 4, not 8 of 4 and 8 of 2.
    sizes = [int(line.split()[2]) for line in calls(tmp_path / "state") if line.startswith("call echo")]
    assert sum(sizes) == 44 and sizes.count(4) >= 10 and len(sizes) <= 12

    # Each shard's parts hold exactly its own prompts' rows, each once; its marker vouches for them.
    out = Path(config["output"])
    generations, scores = _shard_rows(out, "generations", 8), _shard_rows(out, "scores", 8)
    for i in range(8):
        own = {r["prompt_id"] for r in pq.read_table(out / layout.PROMPTS_STAGE.part(i)).to_pylist()}
        assert len(own) == (3 if i < 7 else 1)
        assert sorted(r["prompt_id"] for r in generations[i]) == sorted([*own, *own])
        ids = [r["generation_id"] for r in generations[i]]
        assert len(set(ids)) == len(ids) == 2 * len(own)
        assert sorted(r["generation_id"] for r in scores[i]) == sorted(ids)
        assert all(r["text"] == " " + r["prompt"][::-1] + "!" * r["sample"] for r in generations[i])
        assert (out / layout.generate_stage("echo").marker(i)).exists()

    # A rerun finds every shard done: no task, no call.
    before = len(calls(tmp_path / "state"))
    again = job_runner(config)
    assert again["rows"] == manifest["rows"] and len(calls(tmp_path / "state")) == before


@pytest.mark.slow
def test_a_request_stage_packs_small_shards_and_journals_each_answer_in_its_own_shard(
        tmp_path: Path, job_runner: Any, test_plugins: dict[str, str]) -> None:
    from genflow.data import layout

    pq.write_table(pa.table({"prompt": [f"ask {i}" for i in range(20)]}), tmp_path / "prompts.parquet")
    config = {"name": "requests", "input": str(tmp_path / "prompts.parquet"), "output": str(tmp_path / "out"),
              "shard_rows": 2, "generators": [{"label": "api", "plugin": "echo-async", "samples": 3,
                                               "requests": {"concurrency": 16}}]}
    manifest = job_runner(config)
    assert manifest["status"] == "completed" and manifest["rows"]["generations"] == 60
    out = Path(config["output"])
    seen: set[str] = set()
    for i in range(10):
        own = {r["prompt_id"] for r in pq.read_table(out / layout.PROMPTS_STAGE.part(i)).to_pylist()}
        rows = pq.read_table(out / layout.generate_stage("api").part(i)).to_pylist()
        assert {r["prompt_id"] for r in rows} == own and len(rows) == 3 * len(own)
        ids = {r["generation_id"] for r in rows}
        assert len(ids) == len(rows) and not ids & seen
        seen |= ids
    journals = out / layout.JOURNAL  # every shard's journal went into its parts
    assert not journals.exists() or not [p for p in journals.rglob("*") if p.is_file()]

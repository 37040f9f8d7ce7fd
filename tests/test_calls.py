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
from plugins_for_tests import calls

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
    from genflow.plugins.embedding import EmbeddingSimScorer
    from genflow.plugins.image import DiffusersImageGenerator

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
    import genflow.execution as execution

    launched: list[str] = []
    real_launch = execution.launch_early

    def recording(spec: Any, factory: type, model: str | None, params: dict[str, Any]) -> None:
        launched.append(factory.__name__)
        real_launch(spec, factory, model, params)

    monkeypatch.setattr(execution, "launch_early", recording)
    config = _echo_job(tmp_path, [f"prompt {i}" for i in range(6)])
    config["scorers"] = [{"plugin": "length", "params": {"state_dir": str(tmp_path / "state")}}]
    first = job_runner(config)
    assert launched == ["Echo"] and first["rows"]["scores"] == 6
    assert not execution._launched_early  # the flow took the workers launched for it

    def pids(kind: str) -> set[str]:
        return {line.split("pid=")[1].split()[0] for line in calls(tmp_path / "state") if line.startswith(kind)}

    # Two worker processes, each loaded the generator once, then the scorer in its place.
    assert len(pids("init echo")) == 2 and pids("init length") == pids("init echo")
    assert pids("call length") <= pids("init echo")

    second = job_runner(config)  # finished: nothing to launch, nothing to run
    assert launched == ["Echo"] and second["rows"] == first["rows"]
    assert len([line for line in calls(tmp_path / "state") if line.startswith("init")]) == 4

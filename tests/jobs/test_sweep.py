"""Prompt sweeps: grid expansion and run names, then a real sweep through Prefect and Ray."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from support.jobs import run_genflow, text_job

from genflow.config import ConfigError
from genflow.grid import MAX_NAME_CHARS, plan_sweep, short_names

SAFE = re.compile(r"^[A-Za-z0-9._+=-]+$")


def base_config(tmp_path: Path, models: dict[str, str] | None = None, **overrides: Any) -> dict[str, Any]:
    models = models or {"tiny-gpt2": "models/tiny-gpt2", "tiny-reward": "models/tiny-reward"}
    return text_job(tmp_path, models, **overrides)


def test_grid_is_the_cartesian_product_with_readable_run_names(tmp_path: Path) -> None:
    config = base_config(tmp_path, sweep={
        "generators.0.model": ["models/tiny-gpt2", "models/tiny-code"],
        "generators.0.params.temperature": [0.2, 0.7, 1.0],
    }, output=str(tmp_path / "out/{date}"))
    plan = plan_sweep(config)
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    assert plan.output == str(tmp_path / "out" / today)
    assert plan.columns == {"generators.0.model": "model", "generators.0.params.temperature": "temperature"}
    assert [r.name for r in plan.runs] == [
        f"model={m}__temperature={t}" for m in ("tiny-gpt2", "tiny-code") for t in ("0.2", "0.7", "1.0")]
    for run in plan.runs:
        generator = run.config["generators"][0]
        assert (generator["model"], generator["params"]["temperature"]) == tuple(run.values.values())
        assert generator["params"]["max_new_tokens"] == 8  # the rest of the base config is kept
        assert run.config["output"] == f"{plan.output}/{run.name}"
        assert run.config["name"] == f"test-text/{run.name}"
        assert "sweep" not in run.config


def test_run_names_are_file_safe_short_and_distinct(tmp_path: Path) -> None:
    long_template = "You are a careful assistant.\n" * 10 + "Question: {{ prompt }}\nAnswer:"
    config = base_config(tmp_path, sweep={
        "generators.0.template": ["{{ prompt }}", long_template, "Q: {{ prompt }} / A:"],
        "generators.0.model": ["a/tiny", "b/tiny"],  # same last path part: told apart by a hash
        "scorers.0.weight": [1, 2.5],
    })
    names = [r.name for r in plan_sweep(config).runs]
    assert len(names) == len(set(names)) == 12
    for name in names:
        assert SAFE.match(name) and len(name) <= MAX_NAME_CHARS, name
    assert names[0].startswith("template=prompt__model=tiny-")
    assert len({n.split("__")[1] for n in names}) == 2


def test_short_names_lengthen_only_where_keys_would_collide() -> None:
    assert short_names(["generators.0.model", "generators.1.model", "scorers.0.weight"]) == {
        "generators.0.model": "0.model", "generators.1.model": "1.model", "scorers.0.weight": "weight"}


@pytest.mark.parametrize(("sweep", "message"), [
    ({"generators.3.model": ["x"]}, "'3' is not an index of a list of 1"),
    ({"generators.0.samples": [2, 0]}, "sweep run samples=0"),
    ({"generators.0.params.temperature": []}, "non-empty list"),
    ({"generators.0.params.temperature": [0.5, 0.5]}, "listed twice"),
])
def test_a_bad_grid_fails_before_any_work(tmp_path: Path, sweep: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        plan_sweep(base_config(tmp_path, sweep=sweep))


def test_cli_refuses_a_config_without_a_grid(tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(base_config(tmp_path)))
    result = run_genflow("sweep", str(path))
    assert result.returncode == 2
    assert "has no `sweep:` grid" in result.stderr
    assert not (tmp_path / "out").exists()


TEMPLATE = "Topic: {{ topic }}\nQ: {{ prompt }}\nA:"


@pytest.mark.slow
def test_sweep_runs_the_grid_shares_work_and_a_rerun_recomputes_nothing(
        tmp_path: Path, tiny_models: dict[str, str], prefect_harness: None, ray_local: None) -> None:
    from genflow.flows.run import run_sweep

    config = base_config(tmp_path, tiny_models, ray={"workers": 1, "batch_size": 16}, sweep={
        "generators.0.template": ["{{ prompt }}", TEMPLATE],
        "scorers.0.weight": [1.0, 2.0],
    })
    plan, rows = run_sweep(config)
    out = tmp_path / "out"
    table = pq.read_table(out / "sweep.parquet")
    assert table.to_pylist() == rows
    assert table["run"].to_pylist() == [r.name for r in plan.runs] == [
        "template=prompt__weight=1.0", "template=prompt__weight=2.0",
        "template=Topic-topic-Q-prompt-A__weight=1.0", "template=Topic-topic-Q-prompt-A__weight=2.0"]
    assert table["template"].to_pylist() == ["{{ prompt }}", "{{ prompt }}", TEMPLATE, TEMPLATE]
    assert table["weight"].to_pylist() == [1.0, 2.0, 1.0, 2.0]
    assert set(table["status"].to_pylist()) == {"completed"}
    for r in rows:
        folder = out / r["run"]
        assert r["folder"] == str(folder)
        assert r["prompts"] == 16 and r["generations"] == 48 and r["errors"] == 0
        ranked = pq.read_table(folder / "rankings")["score"].to_pylist()
        assert r["score_mean"] == pytest.approx(sum(ranked) / len(ranked))
        assert r["hf-reward_mean"] == pytest.approx(r["score_mean"] / r["weight"])
        gens = ds.dataset(folder / "generations").to_table()
        assert r["tokens_per_s"] == pytest.approx(sum(gens["num_tokens"].to_pylist()) /
                                                  sum(gens["latency_s"].to_pylist()))
        assert (folder / "report.html").is_file()

    # The template was rendered with each row's columns.
    templated = ds.dataset(out / rows[2]["run"] / "generations").to_table().to_pylist()
    prompts = {p["prompt_id"]: p for p in pq.read_table(out / rows[2]["run"] / "prompts").to_pylist()}
    for g in templated:
        p = prompts[g["prompt_id"]]
        assert g["prompt"] == f"Topic: {p['topic']}\nQ: {p['prompt']}\nA:"

    # Runs that differ only in the scorer's weight generated and scored once: same data, nothing computed.
    for first, second in ((rows[0], rows[1]), (rows[2], rows[3])):
        m = json.loads((out / second["run"] / "manifest.json").read_text())
        assert m["stages"]["generate/tiny"]["skipped"] == m["stages"]["generate/tiny"]["shards"] == 2
        assert m["stages"]["score/hf-reward"]["skipped"] == 2
        assert m["stages"]["rank"]["skipped"] == 0
        assert _rows(out / first["run"], "generations") == _rows(out / second["run"], "generations")
        assert _rows(out / first["run"], "scores") == _rows(out / second["run"], "scores")
    assert _rows(out / rows[0]["run"], "generations") != _rows(out / rows[2]["run"], "generations")

    html = (out / "sweep.html").read_text()
    for r in rows:
        assert f'href="{r["run"]}/report.html"' in html

    # A rerun finds every (stage, shard) done and recomputes nothing.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet") if p.name != "sweep.parquet"}
    _, again = run_sweep(config)
    for r in rows:
        m = json.loads((out / r["run"] / "manifest.json").read_text())
        assert all(s["skipped"] == s["shards"] for s in m["stages"].values()), m["stages"]
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert [a["score_mean"] for a in again] == [r["score_mean"] for r in rows]


def _rows(folder: Path, name: str) -> list[dict[str, Any]]:
    table = ds.dataset(folder / name).to_table()
    drop = [c for c in ("latency_s",) if c in table.column_names]
    return sorted(table.drop_columns(drop).to_pylist(), key=lambda r: json.dumps(r, sort_keys=True, default=str))

"""Config and input validation: clear messages before any model loads, non-zero exit codes."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.jobs import ROOT, run_genflow

from genflow.config import ConfigError, build_config, job_exporters, load_config, set_dotted
from genflow.data.prompts import InputError, open_input, shard_tables

PROMPTS = str(ROOT / "configs/data/quickstart_prompts.parquet")


def base(**overrides: object) -> dict[str, Any]:
    data: dict[str, Any] = {"name": "t", "input": PROMPTS, "output": "/tmp/unused",
            "generators": [{"label": "g", "plugin": "hf-text", "model": "m", "params": {"max_new_tokens": 4}}],
            "scorers": [{"plugin": "hf-reward", "model": "r"}]}
    data.update(overrides)
    return data


def test_a_valid_config_has_defaults() -> None:
    config = build_config(base())
    assert config.shard_rows == 1024 and config.ray.workers == 2 and config.ray.address is None
    assert config.generators[0].samples == 1 and config.scorers[0].weight == 1.0
    assert job_exporters(config) == {"preferences": {"min_margin": 0.0, "per_prompt": 1}, "sft": {"min_score": None}}


@pytest.mark.parametrize("data, message", [
    (base(shard_row=5), r"shard_row: unknown key"),
    (base(ray={"workers": "many"}), r"ray\.workers: Input should be a valid integer"),
    (base(generators=[{"label": "g", "plugin": "hf-text", "model": "m", "temprature": 1}]),
     r"generators\.0\.temprature: unknown key"),
    (base(generators=[{"label": "g", "plugin": "hf-text", "model": "m", "params": {"temprature": 1}}]),
     r"generators\.0\.params\.temprature: unknown key"),
    (base(generators=[{"label": "g", "plugin": "hf-txt", "model": "m"}]),
     r"generators\.0\.plugin: unknown generator plugin 'hf-txt'"),
    (base(scorers=[{"plugin": "hf-reward", "params": {"max_length": "long"}}]),
     r"scorers\.0\.params\.max_length: Input should be a valid integer"),
    (base(scorers=[{"plugin": "hf-reward"}, {"plugin": "hf-reward"}]), r"labels must be unique; repeated: hf-reward"),
    ({"name": "t", "input": PROMPTS}, r"output: Field required"),
])
def test_config_errors_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(data)


def test_overrides_set_nested_keys_and_list_items() -> None:
    config = build_config(base(), ["generators.0.params.temperature=0.3", "ray.workers=1", "shard_rows=7"])
    assert config.generators[0].params["temperature"] == 0.3
    assert (config.ray.workers, config.shard_rows) == (1, 7)
    with pytest.raises(ConfigError, match="is not an index"):
        build_config(base(), ["generators.3.samples=2"])
    with pytest.raises(ConfigError, match="key=value"):
        build_config(base(), ["shard_rows"])


def test_set_dotted_creates_missing_mappings() -> None:
    data: dict = {}
    set_dotted(data, "ray.address", "auto")
    assert data == {"ray": {"address": "auto"}}


def test_yaml_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="a YAML mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def _write(path: Path, table: pa.Table) -> Path:
    pq.write_table(table, path)
    return path


def test_input_problems_are_named(tmp_path: Path) -> None:
    no_prompt = _write(tmp_path / "no_prompt.parquet", pa.table({"text": ["a"]}))
    with pytest.raises(InputError, match=r"no_prompt\.parquet: no 'prompt' column \(columns: text\)"):
        open_input(str(no_prompt))
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError, match=r"garbage\.parquet: not a readable Parquet file"):
        open_input(str(tmp_path / "garbage.parquet"))
    with pytest.raises(InputError, match="input not found"):
        open_input(str(tmp_path / "nothing.parquet"))
    int_prompt = _write(tmp_path / "int.parquet", pa.table({"prompt": [1, 2]}))
    with pytest.raises(InputError, match="column 'prompt' must be strings"):
        open_input(str(int_prompt))


@pytest.mark.parametrize("prompts", [["ok", None, "fine"], ["ok", "fine", "   "]])
def test_null_or_empty_prompts_are_rejected_with_the_row(tmp_path: Path, prompts: list) -> None:
    path = _write(tmp_path / "p.parquet", pa.table({"prompt": pa.array(prompts, pa.string())}))
    source = open_input(str(path))
    bad_row = next(i for i, p in enumerate(prompts) if not (p or "").strip())
    with pytest.raises(InputError, match=rf"row {bad_row}: the prompt is null or empty"):
        list(shard_tables(source, 2))


def test_shards_stream_in_order_with_stable_ids(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.parquet", pa.table({"prompt": [f"p{i}" for i in range(10)], "extra": list(range(10))}))
    shards = list(shard_tables(open_input(str(path)), 4))
    assert [s.num_rows for s in shards] == [4, 4, 2]
    ids = [pid for s in shards for pid in s["prompt_id"].to_pylist()]
    assert len(set(ids)) == 10
    again = [pid for s in shard_tables(open_input(str(path)), 3) for pid in s["prompt_id"].to_pylist()]
    assert again == ids  # ids are a hash of the row, independent of sharding
    assert shards[0].column_names[:2] == ["prompt_id", "prompt"] and "extra" in shards[0].column_names


def test_humaneval_rows_are_code_prompts_with_task_ids(tmp_path: Path) -> None:
    path = _write(tmp_path / "he.parquet", pa.table({"task_id": ["HumanEval/0"], "prompt": ["def f():\n"],
                                                   "test": ["def check(c): pass"], "entry_point": ["f"]}))
    shard = next(shard_tables(open_input(str(path)), 10))
    assert shard["prompt_id"].to_pylist() == ["HumanEval/0"]
    assert shard["task"].to_pylist() == ["code"]


@pytest.mark.cli
def test_cli_validate_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(textwrap.dedent(f"""
        name: v
        input: {PROMPTS}
        output: {tmp_path / 'out'}
        shard_rows: 5
        generators: [{{label: g, plugin: hf-text, model: nowhere}}]
    """))
    result = run_genflow("validate", str(good))
    assert result.returncode == 0, result.stderr
    assert "16 prompts in 1 file(s), 4 shard(s)" in result.stdout
    assert not (tmp_path / "out").exists()  # validation writes nothing

    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("shard_rows: 5", "shard_rows: 5\nbatch: 3"))
    result = run_genflow("validate", str(bad))
    assert result.returncode == 2
    assert "batch: unknown key" in result.stderr

    no_prompt = _write(tmp_path / "np.parquet", pa.table({"question": ["q"]}))
    bad.write_text(good.read_text().replace(PROMPTS, str(no_prompt)))
    result = run_genflow("run", str(bad))
    assert result.returncode == 2
    assert "no 'prompt' column" in result.stderr
    assert "Traceback" not in result.stderr


def test_redaction_hides_secrets_but_keeps_generation_params() -> None:
    from genflow.config import redacted

    data = {"params": {"max_new_tokens": 32, "api_key": "k", "aws_secret_access_key": "s"},
            "storage": {"session_token": "t", "endpoint_url": "http://x"}, "token": "t"}
    assert redacted(data) == {"params": {"max_new_tokens": 32, "api_key": "***", "aws_secret_access_key": "***"},
                              "storage": {"session_token": "***", "endpoint_url": "http://x"}, "token": "***"}

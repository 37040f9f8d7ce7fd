"""The output folder's README.md: a Hugging Face dataset card whose configs `datasets` loads by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml

from genflow.outputs.dataset_card import CARD, features_yaml

datasets = pytest.importorskip("datasets")

SCHEMAS = pa.schema([
    ("text", pa.string()), ("big", pa.large_string()), ("n", pa.int32()), ("seed", pa.int64()),
    ("score", pa.float64()), ("half", pa.float16()), ("ok", pa.bool_()), ("png", pa.binary()),
    ("tags", pa.list_(pa.string())), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ("turns", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("vec", pa.list_(pa.float32(), 4)), ("nested", pa.list_(pa.list_(pa.int64()))),
    ("long", pa.large_list(pa.int8())), ("when", pa.timestamp("us", tz="UTC")), ("day", pa.date32()),
    ("label", pa.dictionary(pa.int32(), pa.string())), ("price", pa.decimal128(10, 2)), ("nothing", pa.null()),
])


def test_features_are_written_as_datasets_writes_them() -> None:
    assert features_yaml(SCHEMAS) == datasets.Features.from_arrow_schema(SCHEMAS)._to_yaml_list()


def _job(tmp_path: Path, samples: int = 2) -> dict[str, Any]:
    pq.write_table(pa.table({"prompt": [f"prompt number {i}" for i in range(10)],
                             "topics": [[f"t{i % 3}", "all"] for i in range(10)]}), tmp_path / "prompts.parquet")
    return {"name": "Card Job", "input": str(tmp_path / "prompts.parquet"), "output": str(tmp_path / "out"),
            "shard_rows": 4, "seed": 7,
            "generators": [{"label": "echo", "plugin": "echo", "samples": samples}],
            "scorers": [{"plugin": "length"}],
            "ranking": {"pairs": {"min_margin": 0.0, "per_prompt": 1}, "best_of_n": True},
            "ray": {"workers": 1}}


def _front_matter(output: Path) -> dict[str, Any]:
    text = (output / CARD).read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def _records(table: pa.Table) -> list[tuple[Any, ...]]:
    return sorted(tuple(str(v) for v in row.values()) for row in table.to_pylist())


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``datasets``' cache in the test's folder, not the user's."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return tmp_path / "hf-cache"


@pytest.mark.slow
def test_every_folder_loads_by_name_with_its_rows(tmp_path: Path, job_runner: Any, test_plugins: dict[str, str],
                                                  hf_cache: Path) -> None:
    manifest = job_runner(_job(tmp_path))
    output = tmp_path / "out"
    meta = _front_matter(output)
    names = [c["config_name"] for c in meta["configs"]]
    expected = [f for f, n in manifest["rows"].items() if n]  # every folder of parts with rows, from the manifest
    assert sorted(names) == sorted(expected)
    assert {"generations", "scores", "rankings", "preferences", "sft"} <= set(names)
    assert [c["config_name"] for c in meta["configs"] if c.get("default")] == ["generations"]

    pairs = datasets.load_dataset(str(output), "preferences")  # the call the README shows
    assert pairs["train"].num_rows == manifest["rows"]["preferences"] > 0
    assert {"prompt", "chosen", "rejected"} <= set(pairs["train"].column_names)

    infos = {i["config_name"]: i for i in meta["dataset_info"]}
    for name in names:
        loaded = datasets.load_dataset(str(output), name, split="train")
        folder = ds.dataset(str(output / name), format="parquet").to_table()
        assert loaded.num_rows == folder.num_rows == manifest["rows"][name] == infos[name]["splits"][0]["num_examples"]
        assert loaded.column_names == folder.column_names
        assert _records(loaded.data.table) == _records(folder), name
        assert [f["name"] for f in infos[name]["features"]] == folder.column_names
    generations = {f["name"]: f for f in infos["generations"]["features"]}
    assert generations["topics"] == {"name": "topics", "list": "string"}  # a carried input column, typed

    assert meta["genflow"]["config_hash"] == manifest["config_hash"]
    assert meta["genflow"]["seeds"] == manifest["seeds"] == {"job": 7, "echo": 7}
    assert meta["genflow"]["rows"] == {f: n for f, n in manifest["rows"].items() if n}
    assert meta["genflow"]["models"]["echo"]["plugin"] == "echo"
    assert meta["genflow"]["models"]["length"]["plugin_version"] == manifest["plugins"]["length"]["version"]
    assert meta["genflow"]["versions"]["genflow"] == manifest["versions"]["genflow"]
    body = (output / CARD).read_text().split("---\n", 2)[2]
    assert manifest["config_hash"] in body and 'load_dataset("path/to/this/folder", "preferences"' in body
    assert not list(output.glob(".tmp-*"))  # written through an atomic rename

    from huggingface_hub import DatasetCard  # the Hub's own parser reads it

    card = DatasetCard.load(output / CARD)
    assert [c["config_name"] for c in card.data.configs] == names


@pytest.mark.slow
def test_a_rerun_brings_the_card_up_to_date(tmp_path: Path, job_runner: Any, test_plugins: dict[str, str],
                                            hf_cache: Path) -> None:
    first = job_runner(_job(tmp_path, samples=2))
    assert datasets.load_dataset(str(tmp_path / "out"), "generations", split="train").num_rows == 20
    second = job_runner(_job(tmp_path, samples=3))  # one more candidate a prompt: new generations, scores, pairs
    assert second["rows"]["generations"] == 30 != first["rows"]["generations"]
    meta = _front_matter(tmp_path / "out")
    counts = {i["config_name"]: i["splits"][0]["num_examples"] for i in meta["dataset_info"]}
    assert counts == {f: n for f, n in second["rows"].items() if n}
    assert datasets.load_dataset(str(tmp_path / "out"), "generations", split="train").num_rows == 30

    generate_only = {**_job(tmp_path, samples=3), "scorers": []}
    job_runner(generate_only)  # no scorer: scores, rankings and exporter folders are dropped, and so are their configs
    names = [c["config_name"] for c in _front_matter(tmp_path / "out")["configs"]]
    assert names == ["prompts", "generations"]


def test_genflow_report_rebuilds_the_card(tmp_path: Path) -> None:
    from genflow.data.storage import Storage
    from genflow.outputs.dataset_card import rebuild_cards

    out = tmp_path / "out"
    (out / "sft").mkdir(parents=True)
    pq.write_table(pa.table({"prompt": ["p"], "completion": ["c"]}), out / "sft" / "part-00000.parquet")
    manifest = {"name": "x", "rows": {"prompts": 0, "sft": 1, "errors": 0}, "config_hash": "abc", "plugins": {},
                "versions": {"genflow": "0"}, "seeds": {"job": 0}}
    Storage.open(str(out)).write_json("manifest.json", manifest)
    assert rebuild_cards(str(out)) == [str(out / CARD)]
    meta = _front_matter(out)
    assert meta["configs"] == [{"config_name": "sft", "data_files": [{"split": "train", "path": "sft/part-*.parquet"}],
                                "default": True}]

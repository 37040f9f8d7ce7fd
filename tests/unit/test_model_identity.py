"""A model's identity in ids and fingerprints: one local folder however its path is spelt, a
different one for different weights, a hub id or a server's model name as written (fast)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from genflow.config import GeneratorSpec, ScorerSpec, build_config
from genflow.data import layout
from genflow.data.layout import Shard
from genflow.data.model_identity import SMALL_FILE_BYTES, folder_fingerprint, model_identity
from genflow.registry import get_registry
from genflow.stages.generate import build_requests

WEIGHTS = 3 * SMALL_FILE_BYTES  # a "large" file: hashed by its size and three sampled blocks


def _model(folder: Path) -> Path:
    """A model folder as transformers and diffusers write them: configs, weights, a subfolder."""
    (folder / "unet").mkdir(parents=True)
    (folder / "config.json").write_text('{"n_layer": 2}')
    (folder / "tokenizer.json").write_text('{"vocab": {"a": 0}}')
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * (WEIGHTS // 256))
    (folder / "unet" / "config.json").write_text('{"block": 1}')
    return folder


def _poke(path: Path, offset: int, value: bytes) -> None:
    """Rewrite bytes in place, keeping the size; the mtime moves on explicitly."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(value)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_every_spelling_of_one_folder_has_one_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(tmp_path / "models" / "tiny")
    (tmp_path / "configs").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "models")
    monkeypatch.chdir(tmp_path)
    relative = model_identity("models/tiny")
    assert relative is not None and relative.startswith("folder-sha256:")
    assert model_identity(str(model)) == relative
    assert model_identity("./models/tiny/") == relative
    assert model_identity(str(tmp_path / "link" / "tiny")) == relative
    monkeypatch.chdir(tmp_path / "configs")
    assert model_identity("../models/tiny") == relative
    monkeypatch.setenv("HOME", str(tmp_path))
    assert model_identity("~/models/tiny") == relative


def test_a_copy_elsewhere_has_the_same_identity_and_a_download_s_bookkeeping_does_not_count(tmp_path: Path) -> None:
    model = _model(tmp_path / "a" / "tiny")
    copy = Path(shutil.copytree(model, tmp_path / "b" / "renamed"))
    (copy / ".cache").mkdir()
    (copy / ".cache" / "download.lock").write_text("written at 12:00")
    assert folder_fingerprint(str(copy)) == folder_fingerprint(str(model))


@pytest.mark.parametrize("change", ["middle of the weights", "end of the weights", "a config", "a new file",
                                    "a file in a subfolder"])
def test_changed_weights_or_configs_change_the_identity(tmp_path: Path, change: str) -> None:
    model = _model(tmp_path / "tiny")
    before = model_identity(str(model))
    if change == "middle of the weights":  # a fine-tuned checkpoint: same size, same header
        _poke(model / "model.safetensors", WEIGHTS // 2, b"\xff\xfe")
    elif change == "end of the weights":
        _poke(model / "model.safetensors", WEIGHTS - 2, b"\xff\xfe")
    elif change == "a config":
        _poke(model / "config.json", 11, b"3")
    elif change == "a new file":
        (model / "generation_config.json").write_text("{}")
    else:
        _poke(model / "unet" / "config.json", 10, b"2")
    assert model_identity(str(model)) != before


def test_names_that_are_no_folder_here_are_kept_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _model(tmp_path / "Qwen" / "Qwen2.5-0.5B")
    monkeypatch.chdir(tmp_path)
    assert model_identity("sshleifer/tiny-gpt2") == "sshleifer/tiny-gpt2"  # a hub id
    assert model_identity("models/missing") == "models/missing"
    assert model_identity("s3://bucket/models/tiny") == "s3://bucket/models/tiny"
    assert model_identity(None) is None  # the plugin's default model
    # A served plugin's model is the server's name for it, even where a folder here is called so.
    assert model_identity("Qwen/Qwen2.5-0.5B", served=True) == "Qwen/Qwen2.5-0.5B"


def _job(model: str, **generator: Any) -> dict[str, Any]:
    return {"name": "ids", "input": "prompts.parquet", "output": "out",
            "generators": [{"label": "tiny", "plugin": "hf-text", "model": model, "samples": 2, **generator}],
            "scorers": [{"plugin": "hf-reward", "model": model}]}


def _ids_and_fingerprints(raw: dict[str, Any]) -> tuple[list[str], list[str]]:
    config = build_config(raw)
    spec = config.generators[0]
    factory = get_registry().get("generator", spec.plugin).factory.implementation(spec.params)
    prompts = pa.table({"prompt_id": ["p1", "p2"], "prompt": ["Say hi.", "Count."]})
    ids = [r.generation_id for r in build_requests(prompts, spec, config, ".", factory)]
    plan = layout.plan_shard(Shard(0, "rows", 2), config, {})
    return ids, [fp for _, fp in plan.stages()]


def test_generation_ids_and_stage_fingerprints_follow_the_folder_not_its_spelling(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path)
    relative = _ids_and_fingerprints(_job("models/tiny"))
    assert _ids_and_fingerprints(_job(str(model))) == relative
    _poke(model / "model.safetensors", WEIGHTS // 2, b"\xff\xfe")  # other weights
    ids, fps = _ids_and_fingerprints(_job("models/tiny"))
    assert not set(ids) & set(relative[0]) and not set(fps) & set(relative[1])


def test_a_served_plugin_s_model_name_enters_ids_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _model(tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path)
    served = GeneratorSpec(label="api", plugin="openai", model="models/tiny", params={"base_url": "http://x/v1"})
    assert layout.hashed_spec(served)["model"] == "models/tiny"
    local = ScorerSpec(plugin="hf-reward", model="models/tiny")
    assert layout.hashed_spec(local)["model"] == model_identity(str(tmp_path / "models" / "tiny"))


def test_a_deployment_anchors_a_model_folder_but_keeps_a_served_model_s_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from genflow.runtime.session import anchor_paths

    _model(tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path)
    raw = _job("models/tiny")
    raw["generators"].append({"label": "api", "plugin": "openai", "model": "models/tiny",  # `vllm serve models/tiny`
                              "params": {"base_url": "http://127.0.0.1:8000/v1"}})
    anchored = anchor_paths(raw)
    assert [g["model"] for g in anchored["generators"]] == [str(tmp_path / "models" / "tiny"), "models/tiny"]
    assert anchored["scorers"][0]["model"] == str(tmp_path / "models" / "tiny")


def test_a_deployment_anchors_a_rounds_job_s_reward_model_folders(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from genflow.runtime.session import anchor_paths

    _model(tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path)
    raw = {**_job("models/tiny"), "rounds": {"reward": {"base": "models/tiny"}}}
    assert anchor_paths(raw)["rounds"]["reward"]["base"] == str(tmp_path / "models" / "tiny")
    given = {**_job("models/tiny"), "rounds": {"reward": {"model": "org/reward-model"}}}  # a hub id stays
    assert anchor_paths(given)["rounds"]["reward"]["model"] == "org/reward-model"

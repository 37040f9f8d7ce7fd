"""The trainer plugins: registered like any plugin, run as a Ray task, TRL's trainers inside.

The TRL trainers train a few steps on the tiny GPT-2 and write checkpoints that the
``hf-text`` and ``hf-reward`` plugins load by path; a third-party trainer (``copy-train``
of ``support.plugins_for_tests``) reaches the registry through its entry point.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genflow.api import Trainer
from genflow.config import RaySpec
from genflow.registry import get_registry

PAIRS = [{"prompt_id": f"p{i}", "prompt": f"Say something about {topic}.", "chosen": " the sea is calm and blue",
          "rejected": " xx xx xx", "source": "model"} for i, topic in enumerate(["sea", "sky", "tea", "rain"])]


def _write(path: Path, rows: list[dict[str, Any]]) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _weights(folder: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def test_built_in_trainers_are_registered_with_what_they_train() -> None:
    registry = get_registry()
    found = {p.name: p.factory for p in registry.all() if p.kind == "trainer"}
    assert {"trl-reward", "trl-dpo", "trl-sft"} <= set(found)
    assert all(issubclass(f, Trainer) for f in found.values())
    assert (found["trl-reward"].trains, found["trl-reward"].data_format) == ("reward-model", "preference")
    assert found["trl-reward"].scorer == "hf-reward" and found["trl-reward"].default_for == ("reward-model",)
    assert (found["trl-dpo"].trains, found["trl-dpo"].data_format) == ("policy", "preference")
    assert (found["trl-sft"].trains, found["trl-sft"].data_format) == ("policy", "prompt-completion")
    assert registry.get("trainer", "trl-dpo").source == "built-in"
    assert registry.default_trainer("best-of-n-sft").name == "trl-sft"


def test_a_third_party_trainer_runs_on_ray_and_its_failure_is_named(
        test_plugins: dict[str, str], ray_local: None, tiny_models: dict[str, str], tmp_path: Path) -> None:
    from genflow.engine.training import TrainingFailed, train_on_ray

    info = get_registry().get("trainer", "copy-train")
    assert info.source == "genflow-test-plugins"
    data = _write(tmp_path / "pairs.parquet", PAIRS)
    out = tmp_path / "ckpt"
    metrics = train_on_ray(RaySpec(), "copy-train", info.factory, {}, data, tiny_models["tiny-gpt2"], str(out), 3)
    assert metrics["rows"] == 4 and metrics["device"] == "cpu"
    assert json.loads((out / "trained_on.json").read_text()) == {"rows": 4, "seed": 3}
    assert (out / "config.json").exists() and not Path(f"{out}.partial").exists()

    marker = tmp_path / "failed-once"
    with pytest.raises(TrainingFailed, match=r"copy-train.*fails its first training"):
        train_on_ray(RaySpec(), "copy-train", info.factory, {"fail_once_marker": str(marker)}, data,
                     tiny_models["tiny-gpt2"], str(tmp_path / "other"), 0)
    assert not (tmp_path / "other").exists()


def test_trl_trainers_write_checkpoints_the_model_plugins_load(
        ray_local: None, tiny_models: dict[str, str], tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from genflow.engine.training import train_on_ray

    registry = get_registry()
    pairs = _write(tmp_path / "pairs.parquet", PAIRS * 2)
    completions = _write(tmp_path / "sft.parquet", [{"prompt_id": r["prompt_id"], "prompt": r["prompt"],
                                                     "completion": r["chosen"], "source": "model"} for r in PAIRS])
    base = tiny_models["tiny-gpt2"]
    small = {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-3}
    runs = {"trl-reward": pairs, "trl-dpo": pairs, "trl-sft": completions}
    for name, data in runs.items():
        out = str(tmp_path / name)
        metrics = train_on_ray(RaySpec(), name, registry.get("trainer", name).factory, small, data, base, out, 0)
        assert metrics["steps"] == 2, name
        assert (Path(out) / "tokenizer.json").exists() and not (Path(out) / "training_args.bin").exists()
    reward = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "trl-reward"))
    assert reward.config.num_labels == 1
    start = _weights(base)
    for name in ("trl-dpo", "trl-sft"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / name))
        trained = _weights(str(tmp_path / name))
        moved = [k for k in start if k in trained and not torch.equal(start[k], trained[k])]
        assert moved, f"{name} changed no weight"


def test_a_trl_trainer_prints_no_line_per_step(tiny_models: dict[str, str], tmp_path: Path,
                                               capfd: pytest.CaptureFixture[str]) -> None:
    """On Ray a worker's prints reach the job's terminal: a step's figures go to the metrics, not there."""
    info = get_registry().get("trainer", "trl-sft")
    completions = _write(tmp_path / "sft.parquet", [{"prompt_id": r["prompt_id"], "prompt": r["prompt"],
                                                     "completion": r["chosen"], "source": "model"} for r in PAIRS])
    trainer = info.factory(info.factory.Params.model_validate({"max_steps": 2, "batch_size": 4}))
    metrics = trainer.train(completions, tiny_models["tiny-gpt2"], str(tmp_path / "out"), 0)
    assert metrics["steps"] == 2 and "last_loss" in metrics
    printed = capfd.readouterr().out
    assert "'loss'" not in printed and "train_runtime" not in printed, printed[-500:]

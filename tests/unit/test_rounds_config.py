"""A config's ``rounds:`` section: its defaults, and the messages (exit code 2) that say what
to fix before any job or training starts."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
from support.jobs import ROOT, run_genflow

from genflow.config import ConfigError, build_config, round_trainers
from genflow.registry import get_registry

PROMPTS = str(ROOT / "configs/data/quickstart_prompts.parquet")


def job(rounds: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "t", "input": PROMPTS, "output": "/tmp/unused",
        "generators": [{"label": "g", "plugin": "hf-text", "model": "m", "params": {"max_new_tokens": 4}}],
        "scorers": [{"plugin": "hf-reward", "model": "r"}], "rounds": rounds if rounds is not None else {}}
    data.update(overrides)
    return data


def test_rounds_default_to_iterative_dpo_against_a_trained_reward_model() -> None:
    config = build_config(job())
    rounds = config.rounds
    assert rounds is not None
    assert (rounds.count, rounds.method, rounds.method_name, rounds.pairs) == (3, "dpo", "iterative-dpo", "best-worst")
    assert rounds.supervised is None and rounds.reward.model is None
    assert round_trainers(rounds, get_registry()) == {"rounds.train": ("trl-dpo", {}),
                                                      "rounds.reward": ("trl-reward", {})}
    other = build_config(job({"method": "best-of-n-sft", "supervised": {"data": "best-of-n"},
                              "reward": {"model": "r", "scorer": "hf-reward"}})).rounds
    assert other is not None and other.method_name == "best-of-n-sft"
    assert round_trainers(other, get_registry()) == {"rounds.train": ("trl-sft", {}),
                                                     "rounds.supervised": ("trl-sft", {})}
    assert build_config(job(), ["rounds.count=5"]).rounds.count == 5  # type: ignore[union-attr]


@pytest.mark.parametrize("data, message", [
    (job(generators=[{"label": "a", "plugin": "hf-text", "model": "m"}, {"label": "b", "plugin": "hf-text",
                                                                         "model": "m"}]),
     r"generators: rounds train one policy, so the job has one generator \(it has 2\)"),
    (job(generators=[{"label": "a", "plugin": "hf-text"}]), r"generators\.0\.model: rounds start from"),
    (job(output="s3://bucket/out"), r"output: rounds write checkpoints into the output folder"),
    (job(scorers=[]), r"rounds\.reward: training a reward model needs the job's rankings"),
    (job({"reward": {"model": "r", "trainer": "trl-reward"}}), r"rounds\.reward: Value error, give either model"),
    (job({"reward": {"model": "r"}}), r"rounds\.reward\.scorer: an existing reward model needs the scorer"),
    (job({"train": {"trainer": "trl-reward"}}),
     r"rounds\.train\.trainer: 'trl-reward' trains a reward-model from preference rows; rounds\.train needs a "
     r"policy trained from preference rows \(method dpo\)"),
    (job({"method": "best-of-n-sft", "train": {"trainer": "trl-dpo"}}),
     r"rounds\.train\.trainer: 'trl-dpo' trains a policy from preference rows; rounds\.train needs a policy "
     r"trained from prompt-completion rows"),
    (job({"train": {"params": {"max_step": 3}}}), r"rounds\.train\.params\.max_step: unknown key"),
    (job({"reward": {"params": {"learning_rate": -1}}}), r"rounds\.reward\.params\.learning_rate: Input should be"),
    (job({"train": {"trainer": "nope"}}),
     r"rounds\.train\.trainer: unknown trainer plugin 'nope' \(installed: .*trl-dpo"),
    (job({"method": "ppo"}), r"rounds\.method: Input should be 'dpo' or 'best-of-n-sft'"),
    (job({"count": 0}), r"rounds\.count: Input should be greater than or equal to 1"),
    (job({"sft": {}}), r"rounds\.sft: unknown key"),
])
def test_rounds_errors_name_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(data)


def test_genflow_validate_exits_2_on_a_bad_rounds_section(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent(f"""
        name: bad
        input: {PROMPTS}
        output: {tmp_path / 'out'}
        generators: [{{label: g, plugin: hf-text, model: m}}]
        scorers: [{{plugin: hf-reward, model: r}}]
        rounds: {{method: dpo, train: {{trainer: trl-sft}}}}
    """))
    result = run_genflow("validate", str(path))
    assert result.returncode == 2, result.stderr
    shown = result.stdout + result.stderr
    assert "rounds.train.trainer: 'trl-sft' trains a policy from prompt-completion rows" in shown

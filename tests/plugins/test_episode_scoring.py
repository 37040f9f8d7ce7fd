"""Scoring episodes: ``hf-reward`` reads the whole conversation (through the reward model's chat
template, or a plain rendering), and ``llm-judge`` is shown the conversation, its turns delimited
so that nothing a turn or a tool result says is taken for the judge's verdict."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from genflow.api import RowError, Score, ScoreItem
from genflow.plugins.text.generator import TINY_CHAT_TEMPLATE
from genflow.plugins.text.reward import HFRewardParams, HFRewardScorer, plain_conversation

PROMPT = "Write add(a, b) that returns the sum of a and b."
FINAL = "def add(a, b):\n    return a + b"


def episode(final: str = FINAL, tool_result: str = "1 of 2 tests failed: add(2, 2) gave 0, expected 4",
            first: str = "I will write it and run the tests.") -> list[dict[str, Any]]:
    """A coding agent's episode: a first attempt, the tests' result, the fixed final answer."""
    return [{"role": "system", "content": "You are a careful programmer."},
            {"role": "user", "content": PROMPT},
            {"role": "assistant", "content": first,
             "tool_calls": [{"id": "call-1-1", "type": "function", "function": {
                 "name": "run_tests", "arguments": json.dumps({"code": "def add(a, b):\n    return a - b"})}}]},
            {"role": "tool", "tool_call_id": "call-1-1", "content": tool_result},
            {"role": "assistant", "content": final}]


def one(scores: list[Score | RowError]) -> Score:
    assert len(scores) == 1 and isinstance(scores[0], Score), scores
    return scores[0]


def logit_of(scorer: HFRewardScorer, ids: list[int]) -> float:
    """The reward model's logit for these tokens, computed here without the scorer's batching."""
    import torch

    with torch.inference_mode():
        return float(scorer.model(input_ids=torch.tensor([ids])).logits[0, 0])


# -- hf-reward -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_reward_path(tiny_models: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """tiny-reward with tiny-chat's ChatML template (tool calls in the Hermes format)."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("chat-reward") / "tiny-chat-reward"
    shutil.copytree(tiny_models["tiny-reward"], directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_reward_scores_the_episode_through_the_chat_template(chat_reward_path: str) -> None:
    reward = HFRewardScorer(chat_reward_path, HFRewardParams())
    messages = episode()
    rendered = str(reward.tokenizer.apply_chat_template(messages, tokenize=False))
    assert reward.text_of(ScoreItem("g", "p", PROMPT, "code", FINAL, messages=messages)) == rendered
    # the tool call and the tool's result are in the scored text, as the template writes them
    assert '<tool_call>{"name": "run_tests"' in rendered and "<tool_response>1 of 2 tests failed" in rendered
    scored = one(reward.score([ScoreItem("g", "p", PROMPT, "code", FINAL, messages=messages)]))
    assert scored.value == pytest.approx(logit_of(reward, reward.tokenizer(rendered)["input_ids"]), abs=1e-5)
    assert scored.details == {"truncated": False}
    alone = one(reward.score([ScoreItem("g", "p", PROMPT, "code", FINAL)]))
    assert abs(scored.value - alone.value) > 1e-4  # the conversation, not the final answer alone
    # another episode with the same final answer scores differently: the turns count
    other = one(reward.score([ScoreItem("g", "p", PROMPT, "code", FINAL,
                                        messages=episode(tool_result="all 2 tests passed"))]))
    assert abs(other.value - scored.value) > 1e-4


def test_reward_without_a_template_scores_the_plain_rendering(tiny_models: dict[str, str]) -> None:
    reward = HFRewardScorer(tiny_models["tiny-reward"], HFRewardParams())
    assert not reward.tokenizer.chat_template
    messages = episode()
    text = plain_conversation(messages)
    assert text.splitlines()[:4] == [
        "system: You are a careful programmer.", f"user: {PROMPT}", "assistant: I will write it and run the tests.",
        'tool_call: {"name": "run_tests", "arguments": {"code": "def add(a, b):\\n    return a - b"}}']
    assert "tool: 1 of 2 tests failed" in text and text.endswith(f"assistant: {FINAL}")
    item = ScoreItem("g", "p", PROMPT, "code", FINAL, messages=messages)
    assert reward.text_of(item) == text
    scored = one(reward.score([item]))
    assert scored.value == pytest.approx(logit_of(reward, reward.tokenizer(text)["input_ids"]), abs=1e-5)
    alone = one(reward.score([ScoreItem("g", "p", PROMPT, "code", FINAL)]))
    assert abs(scored.value - alone.value) > 1e-4


def test_reward_keeps_the_end_of_a_long_conversation(tiny_models: dict[str, str]) -> None:
    short = HFRewardScorer(tiny_models["tiny-reward"], HFRewardParams(max_length=16))
    messages = episode()
    ids = short.tokenizer(plain_conversation(messages))["input_ids"]
    assert len(ids) > 16
    scored = one(short.score([ScoreItem("g", "p", PROMPT, "code", FINAL, messages=messages)]))
    assert scored.details == {"truncated": True}
    assert scored.value == pytest.approx(logit_of(short, ids[-16:]), abs=1e-5)  # the final answer's end read
    assert short.batch_keys([ScoreItem("g", "p", PROMPT, "code", FINAL, messages=messages)]) == [16]


def test_reward_one_answer_candidates_score_as_before(tiny_models: dict[str, str]) -> None:
    """A candidate without a conversation is prompt + answer, its start kept when too long."""
    for max_length in (512, 12):
        reward = HFRewardScorer(tiny_models["tiny-reward"], HFRewardParams(max_length=max_length))
        items = [ScoreItem("g", "p", PROMPT, "code", FINAL), ScoreItem("h", "p", PROMPT, "code", FINAL,
                                                                       messages=episode())]
        scored = reward.score(items)
        ids = reward.tokenizer(PROMPT + FINAL)["input_ids"][:max_length]
        assert isinstance(scored[0], Score)
        assert scored[0].value == pytest.approx(logit_of(reward, ids), abs=1e-5)


def test_reward_a_template_that_cannot_render_the_episode_is_a_row_error(chat_reward_path: str,
                                                                         tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    directory = tmp_path / "strict"
    shutil.copytree(chat_reward_path, directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = ("{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}"
                               "{{ raise_exception('roles must be user or assistant') }}{% endif %}"
                               "{{ m.role }}: {{ m.content }}\n{% endfor %}")
    tokenizer.save_pretrained(directory)
    reward = HFRewardScorer(str(directory), HFRewardParams())
    scored = reward.score([ScoreItem("g", "p", PROMPT, "code", FINAL, messages=episode()),
                           ScoreItem("h", "p", PROMPT, "code", FINAL)])
    assert isinstance(scored[0], RowError) and "roles must be user or assistant" in str(scored[0])
    assert isinstance(scored[1], Score)

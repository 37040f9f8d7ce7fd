"""Episodes through the ``openai`` generator against a real ``transformers serve`` on 127.0.0.1.

The server serves a tiny random GPT-2 whose chat template renders the request's ``tools``
(their names, before the conversation), so the prompt tokens the server counts tell that it
was sent the tools and rendered them. ``transformers serve`` accepts ``tools`` and hands
them to ``apply_chat_template``; it parses tool calls out of an answer only for models with
a response template (Qwen, Gemma...), which GPT-2 has not, and the random model writes
gibberish anyway: its answers never call a tool. So these tests hold the mechanics, not
the agent's skill: every episode ends at its first answer (``stop``, or ``length`` at
``max_tokens``) and its ``messages`` are the prompt and that answer; with a simulated user
(the same server) a conversation runs its three assistant turns. The tool-calling path
itself is tested against the scripted agent server (``test_episodes.py``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pytest
from support.jobs import ROOT, free_port

pytestmark = pytest.mark.slow

PROMPTS = ROOT / "configs/data/quickstart_prompts.parquet"
TOOLS = ["run_python", "submit"]
MAX_TOKENS = 8
TOOLS_TEMPLATE = (
    "{% if tools %}tools:{% for tool in tools %} {{ tool['function']['name'] }}{% endfor %}\n{% endif %}"
    "{% for message in messages %}{{ message['role'] }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% endif %}"
    "{% for call in message.get('tool_calls') or [] %} call {{ call['function']['name'] }}{% endfor %}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
"""A chat template that shows the model the tools' names (as real ones show their schemas)."""


@pytest.fixture(scope="module")
def tools_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``transformers serve`` with a tiny GPT-2 whose chat template renders ``tools``."""
    from support.servers import TransformersServe
    from transformers import AutoTokenizer

    from genflow.plugins.text.generator import write_tiny_causal_lm

    directory = tmp_path_factory.mktemp("episodes-serve")
    model = write_tiny_causal_lm(directory / "tiny-gpt2-tools")
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = TOOLS_TEMPLATE
    tokenizer.save_pretrained(model)
    server = TransformersServe(model, directory / "server.log", free_port()).start()
    yield server
    server.stop()


def _rows(out: Path, folder: str) -> list[dict[str, Any]]:
    return ds.dataset(str(out / folder)).to_table().to_pylist() if (out / folder).exists() else []


def _generator(label: str, server: Any, **extra: Any) -> dict[str, Any]:
    return {"label": label, "plugin": "openai", "model": server.model, "samples": 1,
            "params": {"base_url": server.url, "max_tokens": MAX_TOKENS, "temperature": 0.8},
            "max_turns": 3, "tools": TOOLS,
            "requests": {"concurrency": 8, "timeout_s": 60.0, "backoff_s": 0.05, "max_retries": 2}, **extra}


def _prompt_tokens(server: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
    """What the server's chat template makes of ``messages`` (and ``tools``), in tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(server.model)
    return len(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"])


def test_episodes_against_transformers_serve_end_with_valid_conversations_and_a_rerun_sends_nothing(
        tmp_path, job_runner, tools_server):
    from genflow.engine.tools import load_tools
    from genflow.registry import get_registry

    user = {"plugin": "openai", "model": tools_server.model, "params": {"base_url": tools_server.url,
            "max_tokens": MAX_TOKENS, "temperature": 0.8}, "persona": "a student asking short questions", "turns": 3}
    config = {"name": "served-episodes", "input": str(PROMPTS), "output": str(tmp_path / "out"), "shard_rows": 8,
              "seed": 0, "generators": [_generator("agent", tools_server), _generator("chat", tools_server, user=user)],
              "scorers": [], "ray": {"workers": 1}}
    before = tools_server.requests()
    job_runner(config)
    out = Path(config["output"])
    assert not _rows(out, "errors")
    rows = _rows(out, "generations")
    prompts = {r["id"]: r["prompt"] for r in ds.dataset(str(PROMPTS)).to_table().to_pylist()}
    assert sorted(r["generator"] for r in rows) == sorted(["agent", "chat"] * len(prompts))
    schemas = load_tools(TOOLS, get_registry()).schemas()
    sent = 0
    for row in rows:
        messages = json.loads(row["messages"])
        assert messages[0] == {"role": "user", "content": prompts[row["prompt_id"]]}
        for message in messages:  # OpenAI's format: a role and a text, no tool call from this model
            assert set(message) <= {"role", "content"} and isinstance(message["content"], str)
        assert row["tool_calls"] == 0 and row["turns"] == sum(m["role"] == "assistant" for m in messages)
        assert row["text"] == messages[-1]["content"] and messages[-1]["role"] == "assistant"
        assert row["num_tokens"] and row["prompt_tokens"] and row["finish_reason"] is not None
        if row["generator"] == "agent":  # its first answer calls no tool: the episode ends there
            assert [m["role"] for m in messages] == ["user", "assistant"] and row["turns"] == 1
            assert row["finish_reason"] in ("stop", "length")
            assert row["finish_reason"] == "stop" or row["num_tokens"] == MAX_TOKENS
            # The server was sent the tools and its chat template rendered them: it counted their tokens.
            assert row["prompt_tokens"] == _prompt_tokens(tools_server, messages[:1], schemas)
            assert row["prompt_tokens"] > _prompt_tokens(tools_server, messages[:1], None)
            sent += 1
        else:  # the simulated user writes the next user turn after each answer, for three user turns
            roles = [m["role"] for m in messages]
            assert roles == ["user", "assistant"] * row["turns"]
            if row["finish_reason"] == "turns":
                assert row["turns"] == 3
            else:  # the user model wrote nothing (only whitespace): the conversation stops there
                assert row["finish_reason"] == "stop" and row["turns"] < 3
            sent += row["turns"] + (row["turns"] - 1) + (row["finish_reason"] == "stop")
    assert sum(r["finish_reason"] == "turns" for r in rows) >= len(prompts) // 2
    assert tools_server.requests("/v1/chat/completions") - before == sent  # one request a turn, no retry

    job_runner(config)  # finished: not one request
    assert tools_server.requests("/v1/chat/completions") - before == sent

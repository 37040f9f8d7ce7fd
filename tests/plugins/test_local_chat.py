"""Episode turns of a local transformers model (hf-text on tiny-chat): the conversation through
the chat template, seeds, the turn's token bound, and the tool calls read from the text."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from genflow.api import ChatRequest, RowError, ToolCall, ToolContext
from genflow.engine.tools import load_tools
from genflow.plugins.shared.local_chat import parse_tool_calls, template_messages, tool_format
from genflow.plugins.text.generator import TINY_CHAT_TEMPLATE, HFTextGenerator, HFTextParams
from genflow.registry import get_registry

TOOLS = [{"type": "function", "function": {
    "name": "run_python", "description": "Runs Python code.",
    "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}}}]
HERMES = "{% for m in messages %}{{ m.content }}{% endfor %}{% if tools %}<tool_call>{% endif %}"
MISTRAL = "{% if tools %}[AVAILABLE_TOOLS]{% endif %}{% for m in messages %}[TOOL_CALLS]{{ m.content }}{% endfor %}"


def test_the_tool_format_is_read_from_the_chat_template() -> None:
    assert tool_format(TINY_CHAT_TEMPLATE) == "hermes"
    assert tool_format(HERMES) == "hermes"
    assert tool_format(MISTRAL) == "mistral"
    assert tool_format("{% for m in messages %}{{ m.content }}{% endfor %}") is None  # no tools: the convention
    assert tool_format(None) is None


def test_hermes_tool_calls_are_read_with_the_text_around_them() -> None:
    text = ('Let me check.\n<tool_call>{"name": "run_python", "arguments": {"code": "print(1)"}}</tool_call>\n'
            '<tool_call>\n{"name": "submit", "arguments": "{\\"code\\": \\"x = 1\\"}"}\n</tool_call>')
    content, calls = parse_tool_calls(text, "hermes", turn=3)
    assert content == "Let me check."
    assert [(c.id, c.name, c.arguments) for c in calls] == [
        ("call-3-1", "run_python", {"code": "print(1)"}), ("call-3-2", "submit", {"code": "x = 1"})]
    assert json.loads(calls[0].message()["function"]["arguments"]) == {"code": "print(1)"}


def test_the_text_convention_is_the_same_tag_and_an_answer_without_one_has_no_calls() -> None:
    content, calls = parse_tool_calls('<tool_call>{"name": "run_python", "parameters": {"code": "1"}}', None, 1)
    assert content is None and [(c.name, c.arguments) for c in calls] == [("run_python", {"code": "1"})]
    assert parse_tool_calls("  just an answer ", None, 1) == ("  just an answer ", [])


def test_mistral_tool_calls() -> None:
    content, calls = parse_tool_calls('[TOOL_CALLS][{"name": "run_python", "arguments": {"code": "2"}}]',
                                      "mistral", 2)
    assert content is None and [(c.id, c.name, c.arguments) for c in calls] == [
        ("call-2-1", "run_python", {"code": "2"})]


def test_a_malformed_call_is_kept_and_the_toolbox_answers_it_with_an_error() -> None:
    broken = '<tool_call>{"name": "run_python", "arguments": {"code": "print(1)"</tool_call>'
    content, calls = parse_tool_calls(broken, "hermes", 1)
    assert content is None and len(calls) == 1
    call = calls[0]
    assert call.name == "run_python" and call.arguments == {}
    assert call.raw_arguments == '{"code": "print(1)"'  # as written, in the conversation too
    unclosed = parse_tool_calls('<tool_call>{"name": "submit", "arguments": {"code": 1}</tool_call>', None, 1)[1][0]
    assert (unclosed.name, unclosed.arguments) == ("submit", {"code": 1})  # only the call's brace is missing
    nameless = parse_tool_calls("<tool_call>run it</tool_call>", None, 1)[1][0]
    assert (nameless.name, nameless.raw_arguments) == ("", "run it")
    _, (listed,) = parse_tool_calls('<tool_call>{"name": "run_python", "arguments": [1]}</tool_call>', "hermes", 1)
    toolbox = load_tools(["run_python"], get_registry())
    for bad, said in ((call, "are not valid JSON"), (listed, "are a JSON list, not an object")):
        result = asyncio.run(toolbox.call(bad, ToolContext("p", "g")))
        assert result.is_error and said in result.content


def test_without_a_template_tool_format_calls_and_results_are_written_in_the_convention() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 1 and 1."},
                {"role": "assistant", "content": None, "tool_calls": [ToolCall("c1", "run_python", {"code": "1+1"},
                                                                               '{"code": "1+1"}').message()]},
                {"role": "tool", "tool_call_id": "c1", "content": "2"}]
    rendered = template_messages(messages, TOOLS, None)
    assert [m["role"] for m in rendered] == ["system", "user", "assistant", "user"]
    assert rendered[0]["content"].startswith("Be brief.\n\nYou may call these tools:")
    assert '"name": "run_python"' in rendered[0]["content"] and "<tool_call>" in rendered[0]["content"]
    assert rendered[2]["content"] == '<tool_call>{"name": "run_python", "arguments": {"code": "1+1"}}</tool_call>'
    assert rendered[3]["content"] == "<tool_response>2</tool_response>"
    with_format = template_messages(messages, TOOLS, "hermes")  # the template writes calls: arguments as objects
    assert with_format[2]["tool_calls"][0]["function"]["arguments"] == {"code": "1+1"}
    assert with_format[2]["content"] == "" and with_format[3]["role"] == "tool"


@pytest.fixture(scope="module")
def chat_model(tiny_models: dict[str, str]) -> HFTextGenerator:
    return HFTextGenerator(tiny_models["tiny-chat"], HFTextParams(max_new_tokens=10, temperature=0.9))


def _turn(seed: int, messages: list[dict[str, Any]] | None = None, max_tokens: int | None = None,
          tools: list[dict[str, Any]] | None = None) -> ChatRequest:
    return ChatRequest("g", "p", 1, seed, messages or [{"role": "user", "content": "Hello there"}],
                       tools or [], max_tokens)


def test_a_turn_is_the_conversation_through_the_chat_template_with_the_tools(chat_model: HFTextGenerator) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 1 and 1."},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"id": "c1", "type": "function",
                                 "function": {"name": "run_python", "arguments": '{"code": "1+1"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "2"}]
    prompt = chat_model.tokenizer.decode(chat_model.chat_ids(_turn(1, messages, tools=TOOLS)))
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\nYou may call these tools:\n<tools>\n")
    assert '"name": "run_python"' in prompt
    assert ('<|im_start|>assistant\n<tool_call>{"name": "run_python", "arguments": {"code": "1+1"}}</tool_call>'
            '<|im_end|>\n<|im_start|>tool\n<tool_response>2</tool_response><|im_end|>\n') in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_turns_follow_their_seeds_alone_and_the_token_bound(chat_model: HFTextGenerator) -> None:
    turns = [_turn(seed) for seed in (1, 2, 3, 4)] + [_turn(5, max_tokens=3)]

    async def together() -> list[Any]:  # asked at once: they share the model's calls
        return list(await asyncio.gather(*[chat_model.chat(t) for t in turns]))

    async def one_by_one() -> list[Any]:
        return [await chat_model.chat(t) for t in turns]

    batched, alone = asyncio.run(together()), asyncio.run(one_by_one())
    assert [(t.content, t.num_tokens) for t in batched] == [(t.content, t.num_tokens) for t in alone]
    assert len({t.content for t in batched[:4]}) == 4  # each seed its own sample
    assert batched[4].num_tokens <= 3 and all(t.num_tokens <= 10 for t in batched)
    assert batched[4].finish_reason in ("stop", "length")
    assert all(t.prompt_tokens == len(chat_model.chat_ids(turns[0])) for t in batched)


def test_a_model_without_a_chat_template_says_so(tiny_models: dict[str, str]) -> None:
    plain = HFTextGenerator(tiny_models["tiny-gpt2"], HFTextParams(max_new_tokens=4))
    with pytest.raises(RowError, match="has no chat template"):
        asyncio.run(plain.chat(_turn(1)))


def test_a_local_models_tool_call_is_run_and_read_back_in_its_next_turn(chat_model: HFTextGenerator,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The episode loop with hf-text: the call written in the template's format runs in the sandbox,
    and the next turn's prompt holds the call and its result as the template writes them."""
    from genflow.data.turns import EpisodeRequest
    from genflow.engine.episodes import EpisodeLoop, EpisodeSettings

    answers = iter(['Let me run it.<tool_call>{"name": "run_python", "arguments": {"code": "print(6 * 7)"}}'
                    "</tool_call>", "It prints 42."])
    prompts: list[str] = []

    def scripted(ids: list[list[int]], seeds: list[int], limits: list[int]) -> list[tuple[str, int, str]]:
        prompts.extend(chat_model.tokenizer.decode(p) for p in ids)
        return [(next(answers), 7, "stop") for _ in ids]

    monkeypatch.setattr(chat_model._turns, "run", scripted)  # the model's text, scripted; the rest is hf-text's
    monkeypatch.setattr(chat_model, "too_long", lambda n: None)  # run_python's schema is past tiny-chat's context
    loop = EpisodeLoop(chat_model, load_tools(["run_python"], get_registry()), EpisodeSettings(4))

    async def send_turn(chat: ChatRequest, call: Any = None) -> tuple[Any, float]:
        return await chat_model.chat(chat), 0.0

    result = asyncio.run(loop.run(EpisodeRequest("g", "p", "What does print(6 * 7) print?", 0, 3), send_turn,
                                  lambda turn: None))
    messages = result.messages  # type: ignore[union-attr]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[1]["content"] == "Let me run it."
    assert messages[1]["tool_calls"][0]["function"] == {"name": "run_python", "arguments": '{"code": "print(6 * 7)"}'}
    assert "42" in messages[2]["content"] and messages[3]["content"] == "It prints 42."
    assert result.finish_reason == "stop" and result.tool_calls == 1  # type: ignore[union-attr]
    assert '"name": "run_python"' in prompts[0]  # the tools offered through the template
    assert ('<tool_call>{"name": "run_python", "arguments": {"code": "print(6 * 7)"}}</tool_call><|im_end|>\n'
            "<|im_start|>tool\n<tool_response>") in prompts[1] and "42" in prompts[1]

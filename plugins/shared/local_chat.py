"""Episode turns of a local transformers model: the conversation rendered with the tokenizer's
chat template, and the tool calls read back out of the text the model wrote.

A served model's tool calls come as OpenAI ``tool_calls``; a local model writes them as text,
in the format its chat template taught it. :func:`tool_format` reads which from the template:

- ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Hermes, Qwen 2.5/3
  and most templates with tools). This is also genflow's convention for a template that has
  no tool format of its own: the tools are then described to the model in a system message
  (:func:`convention_prompt`) and earlier calls and results are written into the text the
  same way, so the model sees one format throughout;
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``.

A call whose JSON cannot be read is kept as a call with arguments that are not a JSON object
(its ``raw_arguments``): the episode's toolbox answers it with an error, as a real agent sees it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from genflow.api import ToolCall

TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
MISTRAL_CALLS = "[TOOL_CALLS]"
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
"""End-of-turn markers a chat template may write after an answer: a stop for the turn when the
template has one (a model that does not end on its EOS token ends its turn there)."""
_NAME = re.compile(r'"name"\s*:\s*"([^"]*)"')
_ARGUMENTS = re.compile(r'"(?:arguments|parameters)"\s*:(.*)$', re.DOTALL)


def tool_format(template: str | None) -> str | None:
    """The tool-call format the chat template writes (``hermes``, ``mistral``), or None when
    it has none of its own (genflow's convention then applies: ``<tool_call>`` tags)."""
    if not template or "tools" not in template:
        return None
    if MISTRAL_CALLS in template:
        return "mistral"
    if "<tool_call>" in template:
        return "hermes"
    return None


def convention_prompt(tools: list[dict[str, Any]]) -> str:
    """The system text that offers ``tools`` to a model whose template has no tool format."""
    signatures = "\n".join(json.dumps(t.get("function", t), sort_keys=True) for t in tools)
    return ("You may call these tools:\n<tools>\n" + signatures + "\n</tools>\n"
            'To call one, write <tool_call>{"name": "<tool name>", "arguments": {<its arguments>}}</tool_call>; '
            "its result comes back in <tool_response></tool_response>.")


def template_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                      fmt: str | None) -> list[dict[str, Any]]:
    """The conversation as the chat template reads it.

    With a template tool format, calls' arguments become objects (templates write them with
    ``tojson``) and a ``None`` content an empty one. Without one, the tools are offered in the
    system message, an assistant's calls are written into its text as ``<tool_call>`` tags and a
    tool's result becomes a user message in ``<tool_response>`` tags (many templates know only
    the system, user and assistant roles)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        message = dict(message)
        calls = message.pop("tool_calls", None) or []
        if message.get("content") is None:
            message["content"] = ""
        if fmt is not None:
            if calls:
                message["tool_calls"] = [{**c, "function": {**c["function"],
                                                            "arguments": _as_object(c["function"].get("arguments"))}}
                                         for c in calls]
            out.append(message)
            continue
        if calls:
            message["content"] = message["content"] + "".join(
                f'<tool_call>{{"name": {json.dumps(c["function"]["name"])}, "arguments": '
                f'{_arguments_text(c["function"].get("arguments"))}}}</tool_call>' for c in calls)
        if message.get("role") == "tool":
            message = {"role": "user", "content": f"<tool_response>{message['content']}</tool_response>"}
        out.append(message)
    if fmt is None and tools:
        offer = convention_prompt(tools)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{offer}"}
        else:
            out.insert(0, {"role": "system", "content": offer})
    return out


def _as_object(arguments: Any) -> Any:
    """A call's arguments as an object where their text is one (else the text, as written)."""
    if isinstance(arguments, str):
        try:
            value = json.loads(arguments)
        except ValueError:
            return arguments
        return value if isinstance(value, dict) else arguments
    return arguments


def _arguments_text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments)


def parse_tool_calls(text: str, fmt: str | None, turn: int) -> tuple[str | None, list[ToolCall]]:
    """The answer's text without its tool calls (None when nothing else is left), and the calls,
    with ids unique in the episode (``call-<turn>-<n>``)."""
    if fmt == "mistral" and MISTRAL_CALLS in text:
        content, _, rest = text.partition(MISTRAL_CALLS)
        bodies = _mistral_bodies(rest.strip())
    else:
        bodies = [m.group(1).strip() for m in TOOL_CALL.finditer(text)]
        content = TOOL_CALL.sub("", text)
    calls = [_call(body, f"call-{turn}-{i}") for i, body in enumerate(bodies, 1)]
    content = content.strip() if calls else content
    return (content or None) if calls else content, calls


def _mistral_bodies(rest: str) -> list[str]:
    """Each call of a ``[TOOL_CALLS]`` list as JSON text (the whole rest when it is no list)."""
    try:
        value = json.loads(rest)
    except ValueError:
        return [rest]
    if isinstance(value, list):
        return [json.dumps(v) for v in value]
    return [json.dumps(value)]


def _call(body: str, call_id: str) -> ToolCall:
    """One call from its JSON text: ``{"name", "arguments"}`` (``parameters`` taken too).

    Text that is no such object is a call of the name it shows (or ``""``) whose arguments are
    the text after ``"arguments":`` (else all of it): when that is no JSON object the toolbox
    answers it with an error the model can read. The conversation keeps them as written."""
    try:
        value = json.loads(body)
    except ValueError:
        value = None
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        arguments = value.get("arguments", value.get("parameters", {}))
        if isinstance(arguments, str):  # some models write the arguments as JSON text
            raw = arguments
            parsed = _as_object(arguments)
            return ToolCall(call_id, value["name"], parsed if isinstance(parsed, dict) else {}, raw)
        raw = json.dumps(arguments)
        return ToolCall(call_id, value["name"], arguments if isinstance(arguments, dict) else {}, raw)
    found = _NAME.search(body)
    arguments = _ARGUMENTS.search(body)
    raw = arguments.group(1).strip() if arguments else body
    if arguments and body.rstrip().endswith("}") and raw.count("}") > raw.count("{"):
        raw = raw.rstrip()[:-1].rstrip()  # the brace that closed the call, not the arguments
    parsed = _as_object(raw)  # an object left unclosed around whole arguments: they are read
    return ToolCall(call_id, found.group(1) if found else "", parsed if isinstance(parsed, dict) else {}, raw)

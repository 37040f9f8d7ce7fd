"""``hf-text``: batched text generation with a transformers causal LM.

Requests are sorted by token length and generated in left-padded batches. Each
request samples with its own seeded ``torch.Generator`` (through a logits
processor), so a candidate's text depends only on its prompt, seed and params —
not on which other prompts shared its batch. The generator itself is the causal-LM
core in :mod:`genflow.plugins.shared.causal_lm`, which ``hf-code`` builds on too.

It runs episodes as well (``max_turns`` above 1, a simulated ``user``): each turn is the
conversation rendered with the tokenizer's chat template. ``genflow models init-tiny`` writes
``tiny-chat`` for them: the tiny GPT-2 with a short chat template that offers tools in the
Hermes format (``<tool_call>{"name": ..., "arguments": ...}</tool_call>``).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from genflow import hookimpl
from genflow.api import PluginParams
from genflow.hookspecs import Register
from genflow.plugins.shared.causal_lm import CausalLMGenerator, CausalLMParams, write_tiny_causal_lm
from genflow.plugins.shared.hf import can_write_tiny_model

TINY_GPT2 = "tiny-gpt2"
TINY_CHAT = "tiny-chat"
TINY_CHAT_TEMPLATE = (
    "{%- set system = messages[0].content if messages and messages[0].role == 'system' else '' -%}"
    "{%- if system or tools %}<|im_start|>system\n{{ system }}"
    "{%- if tools %}{{ '\\n\\n' if system }}You may call these tools:\n<tools>\n"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}</tools>\n"
    "To call one, write <tool_call>{\"name\": <tool name>, \"arguments\": <its arguments>}</tool_call>"
    "{%- endif %}<|im_end|>{{ '\\n' }}{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' %}<|im_start|>tool\n<tool_response>{{ message.content }}</tool_response>"
    "<|im_end|>{{ '\\n' }}"
    "{%- elif message.role != 'system' %}<|im_start|>{{ message.role }}\n{{ message.content or '' }}"
    "{%- for call in message.tool_calls or [] %}<tool_call>{\"name\": {{ call.function.name | tojson }}, "
    "\"arguments\": {{ call.function.arguments if call.function.arguments is string "
    "else call.function.arguments | tojson }}}</tool_call>{% endfor %}<|im_end|>{{ '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""tiny-chat's chat template: ChatML turns, tools offered and called in the Hermes format."""


class HFTextParams(CausalLMParams):  # the core's params as they are (a docstring would enter their schema)
    pass


class HFTextGenerator(CausalLMGenerator):
    """Causal LM generation with transformers (GPT-style models)."""

    Params: ClassVar[type[PluginParams]] = HFTextParams
    params: HFTextParams


@hookimpl
def register_generators(register: Register) -> None:
    register("hf-text", HFTextGenerator)


@hookimpl
def init_tiny_models(directory: Path) -> dict[str, str]:
    if not can_write_tiny_model(TINY_GPT2, HFTextGenerator):
        return {}
    path = write_tiny_causal_lm(directory / TINY_GPT2)
    return {TINY_GPT2: str(path), TINY_CHAT: str(write_tiny_chat(directory / TINY_CHAT, path))}


def write_tiny_chat(directory: Path, source: Path | None = None) -> Path:
    """The tiny GPT-2 of the quickstart (a copy of ``source``'s, else a new one) with
    :data:`TINY_CHAT_TEMPLATE` in its tokenizer: a local chat model for episodes and simulated
    users (it writes noise, in turns)."""
    import shutil

    from transformers import AutoTokenizer

    if source is not None:
        shutil.copytree(source, directory, dirs_exist_ok=True)
    else:
        write_tiny_causal_lm(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory

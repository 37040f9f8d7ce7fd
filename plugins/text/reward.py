"""``hf-reward``: score (prompt, response) with a sequence-classification reward model.

Works with TRL reward models (one logit per sequence): the score is that logit.

An episode's candidate (``ScoreItem.messages`` set) is scored as its whole conversation: the
messages through the tokenizer's chat template (the assistant's tool calls and the tools'
results as the template writes them; a template without a tool format gets them as genflow's
local models do, :func:`template_messages`), or, without a template, :func:`plain_conversation`.
A conversation longer than ``max_length`` keeps its end (the final answer matters most); a
one-answer candidate keeps its start, as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from genflow import hookimpl
from genflow.api import PluginParams, RowError, Score, ScoreItem, Scorer
from genflow.hookspecs import Register
from genflow.plugins.shared.batching import map_sorted
from genflow.plugins.shared.causal_lm import write_tiny_gpt2
from genflow.plugins.shared.hf import HF_REQUIRES, can_write_tiny_model, describe_model, load_tokenizer, prepare_torch
from genflow.plugins.shared.local_chat import template_messages, tool_format

TINY_REWARD = "tiny-reward"


class HFRewardParams(PluginParams):
    max_length: int = Field(512, ge=8, description="Tokens of (prompt, response) the model reads at most; "
                            "longer ones are truncated (details.truncated): a one-answer "
                            "candidate keeps its start, an episode's conversation its end.")
    micro_batch: int = Field(32, ge=1, description="Sequences per forward pass inside one call.")
    chat_template: bool | None = Field(None, description="Join prompt and response with the tokenizer's chat "
                                       "template (an episode: its whole conversation): null = when it has one.")
    label_index: int = Field(0, ge=0, description="Which logit of the classification head is the score.")


class HFRewardScorer(Scorer):
    """Reward model score: the classification head's logit for (prompt, response)."""

    Params: ClassVar[type[PluginParams]] = HFRewardParams
    modalities: ClassVar[tuple[str, ...]] = ("text", "code")
    description: ClassVar[str] = "reward model (sequence classification head) logit per (prompt, response)"
    input_columns: ClassVar[tuple[str, ...]] = ()  # the prompt and the candidate come with every item
    requires: ClassVar[tuple[str, ...]] = HF_REQUIRES
    extra: ClassVar[str | None] = "hf"
    batch_size: ClassVar[int] = 32
    params: HFRewardParams

    def __init__(self, model: str | None, params: HFRewardParams, device: str = "cpu") -> None:
        super().__init__(model, params, device)
        if not self.model_name:
            raise ValueError("hf-reward needs a model path or id")
        from transformers import AutoModelForSequenceClassification

        self.torch_device = prepare_torch(device)
        self.tokenizer = load_tokenizer(self.model_name, padding_side="right")
        self.model = AutoModelForSequenceClassification.from_pretrained(self.model_name).to(self.torch_device)
        self.model.eval()
        self.model.config.use_cache = False  # one forward per sequence: a key/value cache is wasted work
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.use_chat = bool(self.tokenizer.chat_template) if params.chat_template is None else params.chat_template

    def describe(self) -> dict[str, Any]:
        return describe_model(self.model_name, self.model)

    def text_of(self, item: ScoreItem) -> str:
        if item.messages is not None:
            return self.conversation_text(item.messages)
        if self.use_chat:
            messages = [{"role": "user", "content": item.prompt},
                        {"role": "assistant", "content": item.text or ""}]
            return str(self.tokenizer.apply_chat_template(messages, tokenize=False))
        return item.prompt + (item.text or "")

    def conversation_text(self, messages: list[dict[str, Any]]) -> str:
        """An episode's whole conversation as the model reads it: through the chat template (the
        tools' schemas are not in a scored row, so none are offered), or the plain rendering."""
        if not self.use_chat:
            return plain_conversation(messages)
        template = self.tokenizer.chat_template if isinstance(self.tokenizer.chat_template, str) else None
        return str(self.tokenizer.apply_chat_template(template_messages(messages, [], tool_format(template)),
                                                      tools=None, tokenize=False))

    def _texts(self, items: list[ScoreItem]) -> list[str | RowError]:
        out: list[str | RowError] = []
        for item in items:
            try:
                out.append(self.text_of(item))
            except Exception as exc:  # a template that cannot render a role or a tool call (jinja2 errors)
                out.append(RowError(f"hf-reward: the chat template of {self.model_name} cannot render this "
                                    f"episode's conversation: {exc}"))
        return out

    def _encode_texts(self, texts: list[str | RowError]) -> list[list[int]]:
        """Each text's tokens, before truncation, in one tokenizer call (an error: none)."""
        ok = [t for t in texts if isinstance(t, str)]
        ids = iter(list(self.tokenizer(ok)["input_ids"]) if ok else [])
        return [next(ids) if isinstance(t, str) else [] for t in texts]

    def encode(self, items: list[ScoreItem]) -> list[list[int]]:
        """Each (prompt, response) as the model reads it, before truncation: one tokenizer call."""
        return self._encode_texts(self._texts(items))

    def batch_keys(self, items: list[ScoreItem]) -> list[Any]:
        """Prompt and response are one sequence: calls of equal token lengths pad nothing."""
        return [min(len(ids), self.params.max_length) for ids in self.encode(items)]

    def score(self, items: list[ScoreItem]) -> list[Score | RowError]:
        texts = self._texts(items)
        encoded = self._encode_texts(texts)
        truncated = [len(ids) > self.params.max_length for ids in encoded]
        model_ids = list(encoded)
        for side in ("right", "left"):  # a one-answer candidate keeps its start, an episode its end
            too_long = [i for i, cut in enumerate(truncated)
                        if cut and (items[i].messages is not None) == (side == "left")]
            if too_long:  # the tokenizer truncates (keeping its special tokens); only these few are redone
                for i, ids in zip(too_long, self._truncated([str(texts[i]) for i in too_long], side), strict=True):
                    model_ids[i] = ids
        ok = [i for i, t in enumerate(texts) if isinstance(t, str)]
        values = map_sorted([model_ids[i] for i in ok], [len(model_ids[i]) for i in ok], self.params.micro_batch,
                            self._logits)
        scores = iter(Score(v, {"truncated": truncated[i]}) for i, v in zip(ok, values, strict=True))
        return [t if isinstance(t, RowError) else next(scores) for t in texts]

    def _truncated(self, texts: list[str], side: str) -> list[list[int]]:
        before = self.tokenizer.truncation_side
        self.tokenizer.truncation_side = side
        try:
            return list(self.tokenizer(texts, truncation=True, max_length=self.params.max_length)["input_ids"])
        finally:
            self.tokenizer.truncation_side = before

    def _logits(self, batch_ids: list[list[int]]) -> list[float]:
        import torch

        batch = self.tokenizer.pad({"input_ids": batch_ids}, return_tensors="pt").to(self.torch_device)
        with torch.inference_mode():
            logits = self.model(**batch).logits
        return [float(v) for v in logits[:, self.params.label_index].float().cpu()]


def plain_conversation(messages: list[dict[str, Any]]) -> str:
    """A conversation for a tokenizer without a chat template: a ``role: content`` line (or lines)
    per message, each tool call a line ``tool_call: {"name": ..., "arguments": ...}`` (its arguments
    an object where their text is JSON, else the text as written)."""
    lines: list[str] = []
    for message in messages:
        lines.append(f"{message.get('role', 'user')}: {_content_text(message.get('content'))}")
        for call in message.get("tool_calls") or []:
            function = call.get("function", {})
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except ValueError:
                    pass
            lines.append("tool_call: " + json.dumps({"name": function.get("name"), "arguments": arguments}))
    return "\n".join(lines)


def _content_text(content: Any) -> str:
    """A message's content as text: a list of parts gives its text parts."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(content)


def write_tiny_reward_model(directory: Path, seed: int = 1) -> Path:
    """A tiny GPT-2 with a one-label classification head, like a TRL reward model."""
    return write_tiny_gpt2(directory, "GPT2ForSequenceClassification", seed=seed, num_labels=1)


@hookimpl
def register_scorers(register: Register) -> None:
    register("hf-reward", HFRewardScorer)


@hookimpl
def init_tiny_models(directory: Path) -> dict[str, str]:
    if not can_write_tiny_model(TINY_REWARD, HFRewardScorer):
        return {}
    return {TINY_REWARD: str(write_tiny_reward_model(directory / TINY_REWARD))}

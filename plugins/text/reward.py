"""``hf-reward``: score (prompt, response) with a sequence-classification reward model.

Works with TRL reward models (one logit per sequence): the score is that logit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from genflow import hookimpl
from genflow.api import PluginParams, RowError, Score, ScoreItem, Scorer
from genflow.hookspecs import Register
from genflow.plugins.shared.batching import map_sorted
from genflow.plugins.shared.causal_lm import write_tiny_gpt2
from genflow.plugins.shared.hf import HF_REQUIRES, can_write_tiny_model, describe_model, load_tokenizer, prepare_torch

TINY_REWARD = "tiny-reward"


class HFRewardParams(PluginParams):
    max_length: int = Field(512, ge=8, description="Tokens of (prompt, response) the model reads at most; "
                            "longer ones are truncated (details.truncated).")
    micro_batch: int = Field(32, ge=1, description="Sequences per forward pass inside one call.")
    chat_template: bool | None = Field(None, description="Join prompt and response with the tokenizer's chat "
                                       "template: null = when it has one.")
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
        if self.use_chat:
            messages = [{"role": "user", "content": item.prompt},
                        {"role": "assistant", "content": item.text or ""}]
            return str(self.tokenizer.apply_chat_template(messages, tokenize=False))
        return item.prompt + (item.text or "")

    def encode(self, items: list[ScoreItem]) -> list[list[int]]:
        """Each (prompt, response) as the model reads it, before truncation: one tokenizer call."""
        return list(self.tokenizer([self.text_of(i) for i in items])["input_ids"])

    def batch_keys(self, items: list[ScoreItem]) -> list[Any]:
        """Prompt and response are one sequence: calls of equal token lengths pad nothing."""
        return [min(len(ids), self.params.max_length) for ids in self.encode(items)]

    def score(self, items: list[ScoreItem]) -> list[Score | RowError]:
        encoded = self.encode(items)
        truncated = [len(ids) > self.params.max_length for ids in encoded]
        model_ids = list(encoded)
        too_long = [i for i, cut in enumerate(truncated) if cut]
        if too_long:  # the tokenizer truncates (keeping its special tokens); only these few are redone
            again = self.tokenizer([self.text_of(items[i]) for i in too_long], truncation=True,
                                   max_length=self.params.max_length)["input_ids"]
            for i, ids in zip(too_long, again, strict=True):
                model_ids[i] = ids
        values = map_sorted(model_ids, [len(ids) for ids in model_ids], self.params.micro_batch, self._logits)
        return [Score(v, {"truncated": cut}) for v, cut in zip(values, truncated, strict=True)]

    def _logits(self, batch_ids: list[list[int]]) -> list[float]:
        import torch

        batch = self.tokenizer.pad({"input_ids": batch_ids}, return_tensors="pt").to(self.torch_device)
        with torch.inference_mode():
            logits = self.model(**batch).logits
        return [float(v) for v in logits[:, self.params.label_index].float().cpu()]


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

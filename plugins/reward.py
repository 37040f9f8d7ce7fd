"""``hf-reward``: score (prompt, response) with a sequence-classification reward model.

Works with TRL reward models (one logit per sequence): the score is that logit.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pydantic import Field

from genflow import hookimpl
from genflow.api import PluginParams, RowError, Score, ScoreItem, Scorer
from genflow.hookspecs import Register
from genflow.plugins.batching import map_sorted, torch_threads_for_worker
from genflow.plugins.text import resolve_device, write_tiny_gpt2


class HFRewardParams(PluginParams):
    max_length: int = Field(512, ge=8)
    micro_batch: int = Field(32, ge=1)
    chat_template: bool | None = None
    """Join prompt and response with the tokenizer's chat template: None = when it has one."""
    label_index: int = Field(0, ge=0)


class HFRewardScorer(Scorer):
    """Reward model score: the classification head's logit for (prompt, response)."""

    modalities = ("text", "code")
    Params = HFRewardParams
    description = "reward model (sequence classification head) logit per (prompt, response)"
    params: HFRewardParams

    def __init__(self, model: str | None, params: HFRewardParams, device: str = "cpu") -> None:
        super().__init__(model, params, device)
        if not self.model_name:
            raise ValueError("hf-reward needs a model path or id")
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.set_num_threads(torch_threads_for_worker())
        self.torch_device = resolve_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_name, padding_side="right")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(self.model_name).to(self.torch_device)
        self.model.eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.use_chat = bool(self.tokenizer.chat_template) if params.chat_template is None else params.chat_template

    def describe(self) -> dict[str, Any]:
        cfg = self.model.config.to_json_string(use_diff=False)
        return {"model": self.model_name, "architecture": type(self.model).__name__,
                "config_sha256": hashlib.sha256(cfg.encode()).hexdigest()[:16]}

    @staticmethod
    def batch_key(item: ScoreItem) -> Any:
        """Prompt and response are one sequence: batches by their joint length pad least."""
        return len(item.prompt) + len(item.text or "")

    def text_of(self, item: ScoreItem) -> str:
        if self.use_chat:
            messages = [{"role": "user", "content": item.prompt},
                        {"role": "assistant", "content": item.text or ""}]
            return str(self.tokenizer.apply_chat_template(messages, tokenize=False))
        return item.prompt + (item.text or "")

    def score(self, items: list[ScoreItem]) -> list[Score | RowError]:
        texts = [self.text_of(i) for i in items]
        lengths = [len(t) for t in texts]
        values = map_sorted(texts, lengths, self.params.micro_batch, self._score_batch)
        untruncated = self.tokenizer(texts)["input_ids"]  # one call for all the truncation flags
        return [Score(v, {"truncated": len(ids) > self.params.max_length})
                for v, ids in zip(values, untruncated, strict=True)]

    def _score_batch(self, texts: list[str]) -> list[float]:
        import torch

        with torch.inference_mode():
            return self._logits(texts)

    def _logits(self, texts: list[str]) -> list[float]:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.params.max_length,
                               return_tensors="pt").to(self.torch_device)
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
    return {"tiny-reward": str(write_tiny_reward_model(directory / "tiny-reward"))}

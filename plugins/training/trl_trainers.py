"""The built-in trainers, on TRL's own trainers: ``trl-reward``, ``trl-dpo`` and ``trl-sft``.

- ``trl-reward``: a sequence-classification reward model (one logit, as ``hf-reward`` reads it)
  from preference pairs, with ``trl.RewardTrainer`` (the Bradley-Terry loss of InstructGPT).
- ``trl-dpo``: a policy from preference pairs with ``trl.DPOTrainer`` (iterative DPO when a
  round's pairs come from the policy it trains).
- ``trl-sft``: a policy from prompt-completion rows with ``trl.SFTTrainer``: people's
  demonstrations, or a round's best-of-n answers (rejection sampling, expert iteration).

Each writes its checkpoint, tokenizer included, with ``save_pretrained``, so ``hf-text`` and
``hf-reward`` load it by path. TRL, transformers and torch are imported only in ``train``,
which runs in a Ray worker.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, Literal

from pydantic import Field

from genflow import hookimpl
from genflow.api import PluginParams, Trainer
from genflow.hookspecs import Register

TRL_REQUIRES = ("trl", "transformers", "torch", "datasets")


class TRLParams(PluginParams):
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate (linear decay to zero).")
    max_steps: int = Field(20, ge=1, description="Optimiser steps.")
    batch_size: int = Field(8, ge=1, description="Rows per device per step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Steps whose gradients are summed per update.")
    max_length: int = Field(256, ge=8, description="Tokens of prompt and answer kept at most.")
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warm-up.")


class DPOParams(TRLParams):
    beta: float = Field(0.1, gt=0, description="How far the policy may move from the reference (the policy "
                        "the round starts from): smaller moves further.")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field("sigmoid", description="TRL's DPO loss.")


def _training_args(params: TRLParams, output_dir: str, seed: int, device: str) -> dict[str, Any]:
    """Keywords every TRL config takes: the params, the seed, no logging services, no saves
    mid-run (genflow keeps one checkpoint per training)."""
    return {"output_dir": output_dir, "learning_rate": params.learning_rate, "max_steps": params.max_steps,
            "per_device_train_batch_size": params.batch_size,
            "gradient_accumulation_steps": params.gradient_accumulation_steps,
            "warmup_steps": params.warmup_steps, "seed": seed, "data_seed": seed,
            "use_cpu": device == "cpu", "report_to": [], "save_strategy": "no", "logging_steps": 1,
            "disable_tqdm": True}


def _dataset(data: str, columns: tuple[str, ...]) -> Any:
    """The rows of a parquet file or folder as a ``datasets.Dataset`` of ``columns``, in a fixed
    order (the folder's parts sorted by name)."""
    import pyarrow.parquet as pq
    from datasets import Dataset

    table = pq.read_table(data, columns=list(columns))
    if table.num_rows == 0:
        raise ValueError(f"{data}: no training rows")
    return Dataset(table.combine_chunks())


def _tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _chat_ids(tokenizer: Any, prompt: str, answer: str, max_length: int) -> list[int]:
    """Prompt and answer as a user's and an assistant's message of the tokenizer's chat template."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": answer}], tokenize=False)
    return list(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])


def _train_quietly(trainer: Any) -> Any:
    """Train without the line per step transformers prints when its progress bar is off: Ray
    echoes a worker's prints to the job's terminal. The log history (the figures kept) stays."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer.train()


def _metrics(result: Any, trainer: Any) -> dict[str, Any]:
    """The run's figures: TRL's train metrics and the last logged values of its own (loss, accuracy)."""
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    if logged:
        metrics.update({f"last_{k.replace('/', '_')}": float(v) for k, v in logged[-1].items()
                        if isinstance(v, (int, float)) and k != "epoch"})
    metrics["steps"] = int(trainer.state.global_step)
    return metrics


def _fit_and_save(trainer: Any, tokenizer: Any, output_dir: str) -> dict[str, Any]:
    """Train, then write the checkpoint and its tokenizer to ``output_dir``; returns the run's figures."""
    metrics = _metrics(_train_quietly(trainer), trainer)
    trainer.save_model(output_dir)
    tokenizer.save_pretrained(output_dir)
    return metrics


def _quiet() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()


class RewardModelTrainer(Trainer):
    """A reward model (one-logit sequence classifier) from preference pairs, with TRL's RewardTrainer."""

    Params: ClassVar[type[PluginParams]] = TRLParams
    description: ClassVar[str] = "reward model from preference pairs (trl.RewardTrainer, Bradley-Terry loss)"
    data_format: ClassVar[str] = "preference"
    trains: ClassVar[str] = "reward-model"
    default_for: ClassVar[tuple[str, ...]] = ("reward-model",)
    scorer: ClassVar[str | None] = "hf-reward"
    requires: ClassVar[tuple[str, ...]] = TRL_REQUIRES
    extra: ClassVar[str | None] = "train"
    params: TRLParams

    def tokenized(self, rows: Any, tokenizer: Any) -> Any:
        """Each pair as token ids of prompt and answer joined, as ``hf-reward`` reads a candidate
        (no chat template on a tokenizer without one, no EOS appended). TRL appends an EOS to
        text it tokenizes itself: a model trained so scores ``hf-reward``'s sequences, which end
        without it, barely better than chance (held-out pairwise accuracy 0.44 against 0.78
        on configs/rounds.yaml's rankings)."""

        def encode(text: str) -> list[int]:
            return list(tokenizer(text, truncation=True, max_length=self.params.max_length)["input_ids"])

        def pair(row: dict[str, Any]) -> dict[str, Any]:
            prompt = row["prompt"]
            if tokenizer.chat_template:
                return {"chosen_ids": _chat_ids(tokenizer, prompt, row["chosen"], self.params.max_length),
                        "rejected_ids": _chat_ids(tokenizer, prompt, row["rejected"], self.params.max_length)}
            return {"chosen_ids": encode(prompt + row["chosen"]), "rejected_ids": encode(prompt + row["rejected"])}

        return rows.map(pair, remove_columns=rows.column_names)

    def train(self, data: str, model: str, output_dir: str, seed: int, device: str = "cpu") -> dict[str, Any]:
        _quiet()
        from transformers import AutoModelForSequenceClassification, set_seed
        from trl import RewardConfig, RewardTrainer

        set_seed(seed)
        tokenizer = _tokenizer(model)
        net = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1)
        net.config.pad_token_id = tokenizer.pad_token_id
        args = RewardConfig(**_training_args(self.params, output_dir, seed, device), max_length=self.params.max_length)
        pairs = self.tokenized(_dataset(data, ("prompt", "chosen", "rejected")), tokenizer)
        trainer = RewardTrainer(model=net, args=args, processing_class=tokenizer, train_dataset=pairs)
        return _fit_and_save(trainer, tokenizer, output_dir)


class DPOPolicyTrainer(Trainer):
    """A policy from preference pairs with TRL's DPOTrainer; the reference is the starting policy."""

    Params: ClassVar[type[PluginParams]] = DPOParams
    description: ClassVar[str] = "policy from preference pairs (trl.DPOTrainer); each round: iterative DPO"
    data_format: ClassVar[str] = "preference"
    trains: ClassVar[str] = "policy"
    requires: ClassVar[tuple[str, ...]] = TRL_REQUIRES
    extra: ClassVar[str | None] = "train"
    default_for: ClassVar[tuple[str, ...]] = ("dpo",)
    params: DPOParams

    def train(self, data: str, model: str, output_dir: str, seed: int, device: str = "cpu") -> dict[str, Any]:
        _quiet()
        from transformers import AutoModelForCausalLM, set_seed
        from trl import DPOConfig, DPOTrainer

        set_seed(seed)
        tokenizer = _tokenizer(model)
        net = AutoModelForCausalLM.from_pretrained(model)
        args = DPOConfig(**_training_args(self.params, output_dir, seed, device), beta=self.params.beta,
                         loss_type=[self.params.loss_type], max_length=self.params.max_length)
        trainer = DPOTrainer(model=net, args=args, processing_class=tokenizer,
                             train_dataset=_dataset(data, ("prompt", "chosen", "rejected")))
        return _fit_and_save(trainer, tokenizer, output_dir)


class SFTPolicyTrainer(Trainer):
    """A policy from prompt-completion rows with TRL's SFTTrainer (loss on the completion only)."""

    Params: ClassVar[type[PluginParams]] = TRLParams
    description: ClassVar[str] = "policy from prompt-completion rows (trl.SFTTrainer): demonstrations, best-of-n"
    data_format: ClassVar[str] = "prompt-completion"
    trains: ClassVar[str] = "policy"
    default_for: ClassVar[tuple[str, ...]] = ("best-of-n-sft", "supervised")
    requires: ClassVar[tuple[str, ...]] = TRL_REQUIRES
    extra: ClassVar[str | None] = "train"
    params: TRLParams

    def train(self, data: str, model: str, output_dir: str, seed: int, device: str = "cpu") -> dict[str, Any]:
        _quiet()
        from transformers import AutoModelForCausalLM, set_seed
        from trl import SFTConfig, SFTTrainer

        set_seed(seed)
        tokenizer = _tokenizer(model)
        net = AutoModelForCausalLM.from_pretrained(model)
        args = SFTConfig(**_training_args(self.params, output_dir, seed, device), max_length=self.params.max_length)
        trainer = SFTTrainer(model=net, args=args, processing_class=tokenizer,
                             train_dataset=_dataset(data, ("prompt", "completion")))
        return _fit_and_save(trainer, tokenizer, output_dir)


@hookimpl
def register_trainers(register: Register) -> None:
    register("trl-reward", RewardModelTrainer)
    register("trl-dpo", DPOPolicyTrainer)
    register("trl-sft", SFTPolicyTrainer)

"""``hf-text``: batched text generation with a transformers causal LM.

Requests are sorted by token length and generated in left-padded batches. Each
request samples with its own seeded ``torch.Generator`` (through a logits
processor), so a candidate's text depends only on its prompt, seed and params —
not on which other prompts shared its batch. The generator itself is the causal-LM
core in :mod:`genflow.plugins.shared.causal_lm`, which ``hf-code`` builds on too.
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
    return {TINY_GPT2: str(path)}

"""Hugging Face set-up shared by the model plugins: torch threads, device, tokenizer, describe().

torch and transformers are imported inside the functions, never here: plugin modules
import this one when genflow lists its plugins, where those may not be installed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import TYPE_CHECKING, Any, Literal

from genflow.api import missing_distributions

if TYPE_CHECKING:
    import torch

    from genflow.api import Plugin

log = logging.getLogger(__name__)

HF_REQUIRES = ("torch", "transformers")
"""What a transformers plugin imports (``requires``); ``pip install 'genflow[hf]'`` installs them."""


def torch_threads_for_worker() -> int:
    """CPU threads a worker's torch should use: Ray sets OMP_NUM_THREADS from its CPU share."""
    return max(1, int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or (os.cpu_count() or 1))


def resolve_device(device: str) -> torch.device:
    """The device to run on: the CPU when CUDA is asked for but this machine has none."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(device)


def prepare_torch(device: str) -> torch.device:
    """Set up torch in a plugin's worker: its share of CPU threads, and the device to use."""
    import torch

    torch.set_num_threads(torch_threads_for_worker())
    return resolve_device(device)


def load_tokenizer(name: str, padding_side: Literal["left", "right"]) -> Any:
    """A tokenizer that can pad batches: one without a pad token pads with its end-of-sequence token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name, padding_side=padding_side)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def describe_model(name: str | None, model: Any, **facts: Any) -> dict[str, Any]:
    """Model facts for the manifest: path or id, class, parameter count and a hash of its
    config (two runs with the same figures ran the same model), plus ``facts``."""
    described: dict[str, Any] = {"model": name, "architecture": type(model).__name__}
    if hasattr(model, "parameters"):
        described["parameters"] = sum(p.numel() for p in model.parameters())
    to_json = getattr(getattr(model, "config", None), "to_json_string", None)
    if to_json is not None:
        text = to_json(use_diff=False)
        described["config_sha256"] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return {**described, **facts}


def can_write_tiny_model(name: str, plugin: type[Plugin]) -> bool:
    """Whether ``plugin``'s requirements are installed, so ``genflow models init-tiny`` can write
    its tiny model ``name``; when not, says which extra to install (the other models are still written)."""
    missing = missing_distributions(plugin.requires)
    if missing:
        log.warning("%s not written: it needs %s (pip install 'genflow[%s]')", name, ", ".join(missing), plugin.extra)
    return not missing

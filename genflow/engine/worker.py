"""The body of a Ray worker: one plugin at a time, called with batches, failures isolated inside.

A row it cannot do becomes a :class:`~genflow.data.results.Failure`."""

from __future__ import annotations

import gc
import os
import sys
import traceback
from typing import Any

import ray

from genflow.api import Generator, RowError
from genflow.data.results import Failure, failure_of
from genflow.secrets import Scrubber, plugin_secrets
from genflow.secrets import install as install_secrets


class PluginWorker:
    """Ray actor body: one plugin instance at a time, many batches."""

    def __init__(self, factory: Any, model: str | None, params: dict[str, Any]) -> None:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' loading bars
        gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
        self.device = "cuda" if gpu_ids else "cpu"
        self._build(factory, model, params)

    def _build(self, factory: Any, model: str | None, params: dict[str, Any]) -> None:
        self.kind = "generator" if issubclass(factory, Generator) else "scorer"
        install_secrets(Scrubber(plugin_secrets(factory, params)))  # a plugin's log lines may quote its server
        self.plugin = factory(model, factory.Params.model_validate(params), self.device)

    def load(self, factory: Any, model: str | None, params: dict[str, Any]) -> dict[str, Any]:
        """Host another plugin in this process, the current one's model freed first."""
        self.plugin = None
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()  # the next model gets the memory back
        self._build(factory, model, params)
        return self.describe()

    def describe(self) -> dict[str, Any]:
        return self.plugin.describe()

    def keys(self, items: list[Any]) -> list[Any]:
        return list(self.plugin.batch_keys(items))

    def call(self, items: list[Any]) -> list[Any]:
        return self._call(items)

    def _call(self, items: list[Any]) -> list[Any]:
        method = self.plugin.generate if self.kind == "generator" else self.plugin.score
        try:
            results = method(items)
            if len(results) != len(items):
                raise RuntimeError(f"{type(self.plugin).__name__} returned {len(results)} results "
                                   f"for {len(items)} inputs")
        except Exception as exc:
            groups = _prompt_groups(items) if getattr(self.plugin, "per_prompt", False) else None
            if len(items) == 1 or (groups is not None and len(groups) == 1):
                failure = Failure(f"{type(exc).__name__}: {exc}", traceback.format_exc())
                return [failure] * len(items)
            # A prompt's candidates are scored together or not at all.
            half = sum(len(g) for g in groups[:len(groups) // 2]) if groups is not None else len(items) // 2
            return self._call(items[:half]) + self._call(items[half:])
        return [failure_of(r) if isinstance(r, RowError) else r for r in results]


def _prompt_groups(items: list[Any]) -> list[list[Any]]:
    """Consecutive items of one prompt (a per-prompt scorer's calls hold whole prompts, in order)."""
    groups: list[list[Any]] = []
    for item in items:
        if groups and groups[-1][0].prompt_id == item.prompt_id:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups

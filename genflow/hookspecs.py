"""The hooks a genflow plugin implements.

A plugin is a module (or object) with functions marked ``@genflow.hookimpl``.
Each ``register_*`` hook receives a ``register(name, factory)`` callback, so one
module can offer many factories. Factories are classes deriving from
:class:`genflow.api.Generator`, :class:`genflow.api.Scorer`,
:class:`genflow.api.Exporter`, :class:`genflow.api.Labeller`, :class:`genflow.api.Tool`
or :class:`genflow.api.Trainer`; generators and
scorers are instantiated inside Ray workers, where their ``__init__`` loads the
model once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("genflow")
hookimpl = pluggy.HookimplMarker("genflow")

Register = Callable[[str, Any], None]


@hookspec
def register_generators(register: Register) -> None:
    """Register generator factories: ``register("my-model", MyGenerator)``.

    A generator turns a batch of :class:`genflow.api.GenerationRequest` into one
    :class:`genflow.api.Generation` (text, code or image) per request. The name is
    the value of ``plugin:`` in a job config's ``generators`` list.
    """


@hookspec
def register_scorers(register: Register) -> None:
    """Register scorer factories: ``register("my-judge", MyScorer)``.

    A scorer turns a batch of :class:`genflow.api.ScoreItem` (a prompt and one
    candidate) into one :class:`genflow.api.Score` per item: a float (higher is
    better) plus optional JSON-able details.
    """


@hookspec
def register_exporters(register: Register) -> None:
    """Register training-data exporters: ``register("my-format", MyExporter)``.

    An exporter turns one shard's ranked candidates, and what people labelled
    (``export_human``), into rows of a training-data format, written under
    ``<output>/<name>/``.
    """


@hookspec
def register_labellers(register: Register) -> None:
    """Register labelling tools: ``register("my-tool", MyLabeller)``.

    A labeller (a :class:`genflow.api.Labeller`) sends a job's prompts and candidates to
    people and reads back their rankings and demonstrations. The name is the value of
    ``genflow label push/pull --tool``.
    """


@hookspec
def register_tools(register: Register) -> None:
    """Register tools episodes may call: ``register("search-docs", MyTool)``.

    A tool (a :class:`genflow.api.Tool`) is a function the model of a multi-turn
    generator (``max_turns`` above 1) calls by name; a generator's ``tools:`` list names
    the ones its episodes are offered. Its result goes back to the model as a ``tool``
    message.
    """


@hookspec
def register_trainers(register: Register) -> None:
    """Register trainers: ``register("my-dpo", MyTrainer)``.

    A trainer (a :class:`genflow.api.Trainer`) trains a policy or a reward model from a
    job's rankings, in a Ray worker; a config's ``rounds:`` section names it
    (``train.trainer``, ``reward.trainer``, ``supervised.trainer``), or takes the one whose
    ``default_for`` holds the role.
    """


@hookspec
def register_filters(register: Register) -> None:
    """Register filters: ``register("my-dedup", MyFilter)``.

    A filter (a :class:`genflow.api.Filter`) leaves rows out of a job: a job's ``filters:``
    list names it, with ``applies_to: prompts`` (before generation) or ``candidates``
    (before scoring). What it leaves out goes to ``filtered/`` with its reason.
    """


@hookspec(firstresult=True)
def infer_task(columns: list[str]) -> str | None:
    """Name the ``task`` of the rows of a dataset that has these columns and no ``task`` column.

    A plugin family that knows a dataset format recognises it here (the code plugins
    make HumanEval rows, with ``test`` and ``entry_point``, ``code`` tasks). Return
    None for a format you do not know; the first answer that is not None wins.
    """


@hookspec
def init_tiny_models(directory: Path) -> dict[str, str] | None:
    """Write tiny, randomly initialised models for offline use into ``directory``.

    Called by ``genflow models init-tiny DIR``. Return ``{name: path}`` of what was
    written. Models are written with ``save_pretrained`` so the plugin's real
    ``from_pretrained`` loading code reads them.
    """

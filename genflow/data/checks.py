"""What can be checked of a job before anything starts: its input, templates and model folders.

``genflow validate`` runs :func:`check_job` alone; a job's session
(``genflow.runtime.session``) runs it before Prefect, Ray or any model starts, so a bad input
or a missing model folder is one message, not a failure minutes into the job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from genflow.config import ConfigError, JobConfig


def check_job(job: JobConfig, read_rows: bool = True) -> Any:
    """What can be checked of a job before anything starts: it lies apart from its output, and
    its input opens, has rows, and (``read_rows``) every row has a prompt, an id of its own and
    valid text. Streams the input once (as the plan does again): a bad row found by the plan
    would come after Ray and the first model had started. Returns the opened input.

    ``job.output`` is taken as resolved (``genflow.config.resolve_output``): a job's session
    resolves it once, and checks the folder it will write."""
    from genflow.data.layout import overlapping
    from genflow.data.prompts import open_input, shard_tables

    output = job.output
    if overlapping(job.input, output):
        raise ConfigError(f"input {job.input} and output {output} overlap: the job would read its own outputs "
                          f"back as prompts (or write over its input); give the output a folder of its own")
    _check_model_paths(job)
    _check_score_columns(job)
    _check_tools(job)
    source = open_input(job.input, **job.storage.model_dump())
    _check_templates(job, source.columns)
    _check_tool_columns(job, source.columns)
    _check_user_columns(job, source.columns)
    if read_rows:
        for _ in shard_tables(source, job.shard_rows):
            pass
    return source


def _check_model_paths(job: JobConfig) -> None:
    """A model named by a local path must be there: loading would take seconds before failing
    with a message about a model id. A name is taken for a path when it starts with ``/``,
    ``./``, ``../`` or ``~``, or when its first part is a folder here (``models/tiny``); a hub
    id (``org/name``) or a server's model name is left to the plugin."""
    from genflow.api import sends_requests
    from genflow.config import GeneratorSpec, ScorerSpec
    from genflow.registry import get_registry

    registry = get_registry()
    entries: list[tuple[str, str, int, GeneratorSpec | ScorerSpec]] = [
        ("generators", "generator", i, g) for i, g in enumerate(job.generators)]
    entries += [("scorers", "scorer", i, s) for i, s in enumerate(job.scorers)]
    for section, kind, i, spec in entries:
        if not spec.model or "://" in spec.model:
            continue
        factory = registry.get(kind, spec.plugin).factory.implementation(spec.params)
        if sends_requests(factory):  # the model is a name the server knows, not a folder
            continue
        path = Path(spec.model).expanduser()
        local = spec.model.startswith(("/", "./", "../", "~")) or (
            len(path.parts) > 1 and Path(path.parts[0]).is_dir())
        if local and not path.exists():
            raise ConfigError(f"{section}.{i}.model: {spec.model} does not exist (a local model folder; "
                              f"`genflow models init-tiny models` writes the tiny ones)")


def _check_score_columns(job: JobConfig) -> None:
    """The scorers' own ``scores/`` columns fit together: none takes a fixed column's name, and
    two scorers declaring one column give it one type (else every score stage would fail)."""
    from genflow.data.schemas import extra_score_columns, scores_schema
    from genflow.registry import get_registry

    try:
        scores_schema(extra_score_columns(job, get_registry()))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _check_templates(job: JobConfig, columns: list[str]) -> None:
    """A generator's template may only name the row's columns (as the input has them, plus
    ``prompt_id`` and ``task``): a missing one would fail every row after the model loaded."""
    import jinja2
    from jinja2 import meta

    environment = jinja2.Environment()
    known = {*columns, "prompt_id", "task", *environment.globals}
    for i, g in enumerate(job.generators):
        if not g.template:
            continue
        try:
            names = meta.find_undeclared_variables(environment.parse(g.template))
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError(f"generators.{i}.template: not a valid Jinja2 template: {exc}") from None
        missing = sorted(names - known)
        if missing:
            raise ConfigError(f"generators.{i}.template names {', '.join(map(repr, missing))}, which the input "
                              f"{job.input} has no column for (columns: {', '.join(columns)})")


def _check_tools(job: JobConfig) -> None:
    """Each tool a generator offers is installed, with what it requires, and its params fit its
    ``Params``: a typo would otherwise fail every episode's first call, after the model loaded."""
    from pydantic import ValidationError

    from genflow.registry import PluginError, get_registry

    registry = get_registry()
    problems = []
    for i, g in enumerate(job.generators):
        for j, tool in enumerate(g.tools):
            where = f"generators.{i}.tools.{j}"
            try:
                info = registry.get("tool", tool.name)
            except PluginError as exc:
                problems.append(f"  {where}: {exc}")
                continue
            if not info.available:
                problems.append(f"  {where}: {info.unavailable_reason()}")
                continue
            try:
                info.factory.Params.model_validate(tool.params)
            except ValidationError as exc:
                for err in exc.errors():
                    path = ".".join(str(p) for p in err["loc"])
                    msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
                    problems.append(f"  {where}.params{'.' + path if path else ''}: {msg}")
    if problems:
        raise ConfigError("the generators' tools cannot run:\n" + "\n".join(problems))


def _check_tool_columns(job: JobConfig, columns: list[str]) -> None:
    """A tool that reads the row's columns (a test runner's visible tests) has one of them in the
    input: else every call would be answered that the row has none."""
    from genflow.registry import get_registry

    registry = get_registry()
    for i, g in enumerate(job.generators):
        for j, tool in enumerate(g.tools):
            reads = registry.get("tool", tool.name).factory.implementation(tool.params).input_columns
            if reads and not set(reads) & set(columns):
                raise ConfigError(f"generators.{i}.tools.{j} ({tool.name}) reads {', '.join(map(repr, reads))}, "
                                  f"which the input {job.input} has no column for (columns: {', '.join(columns)})")


def _check_user_columns(job: JobConfig, columns: list[str]) -> None:
    """A simulated user's persona (its ``persona_column``, or its template's variables) is made of
    the input's columns: a missing one would fail every conversation after its first answer."""
    known = {*columns, "prompt", "prompt_id", "task"}
    for i, g in enumerate(job.generators):
        missing = sorted(g.user.reads() - known) if g.user is not None else []
        if missing:
            key = "persona_column" if g.user is not None and g.user.persona_column else "template"
            raise ConfigError(f"generators.{i}.user.{key} names {', '.join(map(repr, missing))}, which the input "
                              f"{job.input} has no column for (columns: {', '.join(columns)})")

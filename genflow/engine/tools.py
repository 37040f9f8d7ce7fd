"""The tools of a generator's episodes: loaded once per worker, run off the request loop.

:func:`load_tools` makes a :class:`Toolbox` of a generator's ``tools:`` (each registered
tool instantiated once, with its params). The episode loop shows the model
:meth:`Toolbox.schemas` (OpenAI ``tools``) and hands each call the model makes to
:meth:`Toolbox.call`, which always answers with a :class:`~genflow.api.ToolResult`: a call
that cannot be carried out is answered as the model should read it (``is_error``, a short
message starting ``error:``), never raised, so the episode goes on as a real agent's does:

- arguments that are not a JSON object, or do not fit the tool's ``Arguments``;
- a tool name the episode was not offered;
- a tool that raises (its message, no traceback; a :class:`~genflow.api.ToolError`'s as it is);
- a tool that takes longer than its ``timeout_s``.

A tool's :meth:`~genflow.api.Tool.run` is synchronous and may take CPU (the code family's
run the model's code in the sandbox, a subprocess): it runs on a thread pool sized to the
machine's cores, so the event loop carrying hundreds of episodes never waits on it and
the tools of many episodes run side by side. A call's time limit counts from when it starts
running, not while it waits for a thread. A thread that outlives its limit is not killed
(Python cannot): the model is answered at once, and the tool is expected to stop on its own
(the sandbox kills its program at its own, shorter limit); until it does, it holds one of
the pool's threads. Every answer's ``content`` is cut to ``max_chars`` characters, keeping
its head and tail.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from genflow.api import GenerationRequest, Tool, ToolCall, ToolContext, ToolError, ToolResult
from genflow.config import ToolSpec
from genflow.registry import PluginError, Registry

log = logging.getLogger(__name__)

MAX_CHARS = 4000
"""The most of a tool's answer the model reads, by default: the rest is cut, saying so."""

RawCall = Mapping[str, Any]
"""A ``tool_calls`` entry as an OpenAI server sends it: ``{"id", "type": "function",
"function": {"name", "arguments": "<JSON text>"}}``."""


def cut(text: str, most: int = MAX_CHARS) -> str:
    """``text`` in at most about ``most`` characters: its head and its tail, with a line saying
    how much was cut between them (a traceback's end or a test's summary is often the news)."""
    if len(text) <= most:
        return text
    tail = most // 3
    head = most - tail
    return f"{text[:head]}\n[... {len(text) - head - tail} characters cut ...]\n{text[len(text) - tail:]}"


def tool_specs(specs: Iterable[ToolSpec | str | Mapping[str, Any]]) -> list[ToolSpec]:
    """A ``tools:`` list as :class:`~genflow.config.ToolSpec` entries (a name alone takes no params)."""
    return [s if isinstance(s, ToolSpec) else ToolSpec.model_validate({"name": s} if isinstance(s, str) else s)
            for s in specs]


def tool_class(spec: ToolSpec, registry: Registry) -> type[Tool]:
    """The class that carries out ``spec``'s calls: the registered tool's ``implementation``
    for its params (a tool whose columns or time limit follow its params picks a subclass)."""
    info = registry.get("tool", spec.name)
    if not info.available:
        raise PluginError(info.unavailable_reason())
    chosen: type[Tool] = info.factory.implementation(spec.params)
    return chosen


def tool_columns(specs: Iterable[ToolSpec | str | Mapping[str, Any]], registry: Registry) -> frozenset[str]:
    """The input columns the tools read (``input_columns`` of each, for its params): a job
    hands their values to the episode (:meth:`Toolbox.context`) and does not carry them
    through to ``generations/``."""
    return frozenset(c for spec in tool_specs(specs) for c in tool_class(spec, registry).input_columns)


class Toolbox:
    """The tools one generator's episodes may call, each instantiated once (per worker).

    ``workers`` threads run the tools' calls (default: the cores this process may use)."""

    def __init__(self, tools: Mapping[str, Tool], max_chars: int = MAX_CHARS, workers: int | None = None) -> None:
        if max_chars < 100:
            raise ValueError(f"max_chars must be at least 100, got {max_chars}")
        self.tools = dict(tools)
        self.max_chars = max_chars
        self.workers = workers or available_cores()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def names(self) -> list[str]:
        return list(self.tools)

    @property
    def input_columns(self) -> tuple[str, ...]:
        """The row's columns the tools read, in the order they declare them."""
        return tuple(dict.fromkeys(c for tool in self.tools.values() for c in tool.input_columns))

    def schemas(self) -> list[dict[str, Any]]:
        """The OpenAI ``tools`` entries the model is shown, one per tool, by its registered name."""
        return [tool.schema(name) for name, tool in self.tools.items()]

    def ends_episode(self, name: str) -> bool:
        tool = self.tools.get(name)
        return tool is not None and tool.ends_episode

    def context(self, request: GenerationRequest) -> ToolContext:
        """What the tools know of ``request``'s episode: its ids and the row's values of their columns."""
        columns = set(self.input_columns)
        return ToolContext(request.prompt_id, request.generation_id,
                           {k: v for k, v in request.inputs.items() if k in columns})

    async def call(self, call: ToolCall | RawCall, context: ToolContext) -> ToolResult:
        """Carry out one call the model made, on the pool under the tool's ``timeout_s``; every
        failure is answered as an error result (see the module's docstring)."""
        ready = self._prepare(call)
        if isinstance(ready, ToolResult):
            return ready
        name, tool, arguments = ready
        loop = asyncio.get_running_loop()
        started: asyncio.Future[None] = loop.create_future()

        def job() -> ToolResult:
            loop.call_soon_threadsafe(_settle, started)
            return _run(name, tool, arguments, context)

        future = loop.run_in_executor(self._executor(), job)
        # The time limit counts from when the call starts running: a call waiting for a thread
        # while other episodes' tools run has not used any of it.
        either: list[asyncio.Future[Any]] = [future, started]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        try:
            result = await asyncio.wait_for(future, tool.timeout_s)
        except asyncio.TimeoutError:
            result = _timed_out(name, tool)
        return self._bounded(result)

    def call_sync(self, call: ToolCall | RawCall, context: ToolContext) -> ToolResult:
        """:meth:`call` for a loop without an event loop (a local model's episodes)."""
        ready = self._prepare(call)
        if isinstance(ready, ToolResult):
            return ready
        name, tool, arguments = ready
        started = threading.Event()

        def job() -> ToolResult:
            started.set()
            return _run(name, tool, arguments, context)

        future = self._executor().submit(job)
        started.wait()  # the time limit counts from when the call starts running
        try:
            result = future.result(tool.timeout_s)
        except concurrent.futures.TimeoutError:
            result = _timed_out(name, tool)
        return self._bounded(result)

    def close(self) -> None:
        """Stop taking calls; threads still running a tool finish on their own."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="genflow-tool")
        return self._pool

    def _prepare(self, call: ToolCall | RawCall) -> tuple[str, Tool, BaseModel] | ToolResult:
        """The tool and its validated arguments, or the error the model is answered with."""
        name, arguments, problem = read_call(call)
        if problem is not None:
            return self._error(problem)
        tool = self.tools.get(name)
        if tool is None:
            offered = ", ".join(self.tools) or "none"
            return self._error(f"there is no tool named {name!r}; the tools are: {offered}")
        try:
            return name, tool, tool.Arguments.model_validate(arguments)
        except ValidationError as exc:
            return self._error(f"the arguments do not fit {name!r}: {argument_problems(exc)}")

    def _error(self, message: str) -> ToolResult:
        return ToolResult(cut(f"error: {message}", self.max_chars), is_error=True)

    def _bounded(self, result: ToolResult) -> ToolResult:
        if len(result.content) <= self.max_chars:
            return result
        return dataclasses.replace(result, content=cut(result.content, self.max_chars),
                                   details={**result.details, "content_chars": len(result.content)})


def read_call(call: ToolCall | RawCall) -> tuple[str, dict[str, Any], str | None]:
    """A call's tool name and arguments, and why they cannot be used (None when they can).

    A :class:`~genflow.api.ToolCall` holding the arguments' text as the model wrote it
    (``raw_arguments``) is read from that text; an OpenAI ``tool_calls`` entry from its
    ``function``. Empty arguments are an empty object (a tool without arguments)."""
    if isinstance(call, ToolCall):
        raw = getattr(call, "raw_arguments", None)
        name = call.name
        if raw is None:
            return name, dict(call.arguments), None
    else:
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            return "", {}, "the call names no function: a tool call is {\"function\": {\"name\", \"arguments\"}}"
        name, raw = function["name"], function.get("arguments")
        if isinstance(raw, Mapping):  # a server that parsed them already
            return name, dict(raw), None
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return name, {}, None
    if not isinstance(raw, str):
        return name, {}, f"the arguments of {name!r} are a {type(raw).__name__}, not a JSON object's text"
    try:
        value = json.loads(raw)
    except ValueError as exc:
        return name, {}, f"the arguments of {name!r} are not valid JSON ({exc})"
    if not isinstance(value, dict):
        return name, {}, f"the arguments of {name!r} are a JSON {type(value).__name__}, not an object"
    return name, value, None


def argument_problems(exc: ValidationError, most: int = 5) -> str:
    """A validation error in a line, as the model can act on it: ``code: Field required``."""
    problems = []
    for err in exc.errors()[:most]:
        path = ".".join(str(p) for p in err["loc"]) or "(the arguments)"
        msg = "not an argument of this tool" if err["type"] == "extra_forbidden" else err["msg"]
        problems.append(f"{path}: {msg}")
    more = len(exc.errors()) - most
    return "; ".join(problems) + (f"; and {more} more" if more > 0 else "")


def _run(name: str, tool: Tool, arguments: BaseModel, context: ToolContext) -> ToolResult:
    """One call on a pool thread: what the tool answers, or what it raised as an error result."""
    try:
        result = tool.run(arguments, context)
    except ToolError as exc:
        return ToolResult(f"error: {exc}", is_error=True)
    except Exception as exc:  # the tool's own failure: the model reads what it says, the log has where
        log.warning("tool %r raised on a call of episode %s", name, context.generation_id, exc_info=True)
        text = str(exc).strip()
        return ToolResult(f"error: {name} failed: {type(exc).__name__}{': ' + text if text else ''}", is_error=True)
    if not isinstance(result, ToolResult):
        return ToolResult(f"error: {name} answered a {type(result).__name__}, not a ToolResult", is_error=True)
    return result


def _settle(started: asyncio.Future[None]) -> None:
    if not started.done():
        started.set_result(None)


def _timed_out(name: str, tool: Tool) -> ToolResult:
    return ToolResult(f"error: {name} did not answer within {tool.timeout_s:g} s", is_error=True,
                      details={"timed_out": True})


def load_tools(specs: Iterable[ToolSpec | str | Mapping[str, Any]], registry: Registry,
               max_chars: int = MAX_CHARS, workers: int | None = None) -> Toolbox:
    """A generator's ``tools:`` as a :class:`Toolbox`: each tool instantiated once, with its
    params validated by its ``Params``. Raises :class:`~genflow.registry.PluginError` for a
    tool that is not installed (``genflow validate`` refuses such a config first)."""
    tools: dict[str, Tool] = {}
    for spec in tool_specs(specs):
        info = registry.get("tool", spec.name)
        params = info.factory.Params.model_validate(spec.params)
        tools[spec.name] = tool_class(spec, registry)(params)
    return Toolbox(tools, max_chars, workers)


def available_cores() -> int:
    """The cores this process may run on (its affinity where the system says, else all)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1

"""A scripted coding agent behind the OpenAI protocol, for the episode tests: ``AgentServer``.

It answers ``POST /v1/chat/completions`` on 127.0.0.1 from a script, with no model:

- a request without ``tools`` (a one-answer generator) gets the task's **first attempt**
  as a fenced code block;
- a request with ``tools`` is a turn of an episode, read from the conversation it
  carries (the server keeps no state between turns, as a model would not):

  1. the opening (the last message is the user's): call ``run_tests`` with the first attempt;
  2. after a ``tool`` message that reports a failed test (``FAILED``): call ``submit`` with
     the **fix** (the task's solution);
  3. after one that reports every test passed (``N of N tests passed``): ``submit`` the
     code that passed;
  4. after any other tool message (an error): answer in plain text, without a tool call.

  With ``malformed=True`` an episode starts with two calls the toolbox must refuse: one
  whose arguments are not JSON, then (after reading the error) one of a tool that does
  not exist; then it goes on at step 1.

A task is found by its prompt (the first user message); ``tasks`` maps each prompt to its
``first`` attempt and its ``fix``. Each answer's ``usage`` counts words. Every request's
``seed`` is kept (``seeds``), so a test tells which turns were sent twice; with
``hold_after=N``, the requests after the first N answered wait until :meth:`release` (or
their client goes away): a job can be killed with exactly those turns in flight.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.standin_server import BackgroundServer  # noqa: E402

_ALL_PASSED = re.compile(r"^(\d+) of (\d+) tests passed", re.M)


@dataclass(frozen=True)
class Task:
    """What the script writes for one prompt: a first attempt, and the fix it submits after a failure."""

    first: str
    fix: str


def fenced(code: str) -> str:
    return f"```python\n{code}```"


def words(value: Any) -> int:
    return len(str(value or "").split())


class AgentServer:
    """The scripted agent (see the module's docstring); ``url`` ends in ``/v1`` once started."""

    def __init__(self, tasks: dict[str, Task], malformed: bool = False, hold_after: int | None = None) -> None:
        self.tasks, self.malformed, self.hold_after = tasks, malformed, hold_after
        self.received = 0
        self.answered = 0
        self.seeds: list[int] = []
        self.held = 0
        """Requests waiting now for :meth:`release`."""
        self.held_seeds: set[int] = set()
        self.submitted: set[str] = set()
        """Prompts whose episode the script ended (a ``submit`` or a plain answer)."""
        self._lock = threading.Lock()
        self._release: asyncio.Event | None = None
        self._background: BackgroundServer | None = None

    @property
    def url(self) -> str:
        if self._background is None:
            raise RuntimeError("the agent server is not started")
        return f"{self._background.origin}/v1"

    def start(self) -> AgentServer:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_post("/v1/chat/completions", self._complete)
        self._background = BackgroundServer(app).start()
        self._release = asyncio.run_coroutine_threadsafe(self._event(), self._background.loop).result(10)
        return self

    async def _event(self) -> asyncio.Event:
        return asyncio.Event()

    def stop(self) -> None:
        if self._background is not None:
            self.release()
            self._background.stop()
            self._background = None

    def release(self) -> None:
        """Answer the held requests, and hold no more."""
        self.hold_after = None
        if self._background is not None and self._release is not None:
            self._background.loop.call_soon_threadsafe(self._release.set)

    async def _complete(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        with self._lock:
            self.received += 1
            self.seeds.append(body.get("seed"))
            hold = self.hold_after is not None and self.answered >= self.hold_after
        if hold:
            assert self._release is not None
            self.held += 1
            self.held_seeds.add(body.get("seed"))
            try:
                await self._release.wait()
            finally:
                self.held -= 1
        message, prompt, ends = self._turn(body)
        with self._lock:
            self.answered += 1
            if ends:
                self.submitted.add(prompt)
        completion = sum(words(c["function"]["arguments"]) for c in message.get("tool_calls", [])) + words(
            message.get("content"))
        return web.json_response({
            "id": f"agent-{self.received}", "object": "chat.completion", "model": body.get("model"),
            "choices": [{"index": 0, "message": message,
                         "finish_reason": "tool_calls" if message.get("tool_calls") else "stop"}],
            "usage": {"prompt_tokens": sum(words(m.get("content")) for m in body["messages"]),
                      "completion_tokens": completion}})

    def _turn(self, body: dict[str, Any]) -> tuple[dict[str, Any], str, bool]:
        """The assistant message for this conversation, its task's prompt, and whether it ends the episode."""
        messages = body["messages"]
        prompt = next(str(m["content"]) for m in messages if m["role"] == "user")
        task = self.tasks[prompt]
        if not body.get("tools"):
            return {"role": "assistant", "content": fenced(task.first)}, prompt, True
        calls = [c for m in messages if m["role"] == "assistant" for c in m.get("tool_calls") or []]
        last = messages[-1]
        number = len(calls)

        def call(name: str, arguments: str) -> dict[str, Any]:
            return {"role": "assistant", "content": None, "tool_calls": [
                {"id": f"call_{number}", "type": "function", "function": {"name": name, "arguments": arguments}}]}

        def code(text: str) -> str:
            return json.dumps({"code": text})

        if last["role"] == "user":
            if self.malformed:
                return call("run_tests", '{"code": "def broken(:'), prompt, False
            return call("run_tests", code(task.first)), prompt, False
        if last["role"] != "tool":
            raise ValueError(f"a turn after a {last['role']} message")
        said = str(last["content"])
        previous = calls[-1]["function"]
        if said.startswith("error:") and self.malformed and previous["name"] == "run_tests" and number == 1:
            return call("search_web", json.dumps({"query": "how to fix"})), prompt, False
        if said.startswith("error:") and self.malformed and previous["name"] == "search_web":
            return call("run_tests", code(task.first)), prompt, False
        if "FAILED" in said:
            return call("submit", code(task.fix)), prompt, True
        passed = _ALL_PASSED.search(said)
        if passed and passed.group(1) == passed.group(2):
            tested = json.loads(previous["arguments"])["code"]
            return call("submit", code(tested)), prompt, True
        return {"role": "assistant", "content": f"I could not go on: {said[:200]}"}, prompt, True

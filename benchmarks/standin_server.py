"""An OpenAI-compatible stand-in server: a fixed latency and answers derived from the request.

It answers ``POST /v1/chat/completions`` and ``POST /v1/completions`` after
``latency`` seconds with a text made from the request alone — the prompt (the
last user message, for chat) and the seed: ``echo: <prompt> (seed 7)`` — cut at
``max_tokens`` words and at the first ``stop`` string. A request with a JSON
schema ``response_format`` gets ``{"answer": <that text>, "seed": <seed>}``.
Usage counts are word counts. Nothing is computed, so a client's request rate
against it is bound by the latency and by the client's own cost per request:
what ``benchmarks/bench_openai.py`` measures. The tests use it (and
:class:`BackgroundServer`, which runs any aiohttp app in a thread) through
``tests/support/servers.py``.

    python -m benchmarks.standin_server --port 8000 --latency 0.5     # serve until killed
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

Answer = Callable[[str, dict[str, Any]], str]
"""``answer(path, body) -> text``: what the stand-in says to a request (``path`` ends in
``/chat/completions`` or ``/completions``)."""


@dataclass(frozen=True)
class Received:
    """A request as the stand-in saw it."""

    path: str
    body: dict[str, Any]
    authorization: str | None


def prompt_of(path: str, body: dict[str, Any]) -> str:
    """The prompt of a request: ``prompt`` for completions, the last user message for chat."""
    if path.endswith("/chat/completions"):
        users = [m.get("content") for m in body.get("messages") or [] if m.get("role") == "user"]
        return str(users[-1]) if users else ""
    return str(body.get("prompt", ""))


def echo_answer(path: str, body: dict[str, Any]) -> str:
    """The default answer: the prompt and the seed; JSON when a schema is asked for."""
    text = f"echo: {prompt_of(path, body)} (seed {body.get('seed')})"
    if (body.get("response_format") or {}).get("type") == "json_schema":
        return json.dumps({"answer": text, "seed": body.get("seed")})
    return text


def words(text: str) -> int:
    return len(text.split())


def cut(text: str, body: dict[str, Any]) -> tuple[str, str]:
    """The answer cut at ``max_tokens`` words and the first ``stop`` string; its finish reason."""
    stops = body.get("stop") or []
    for stop in [stops] if isinstance(stops, str) else stops:
        if stop and stop in text:
            text = text[:text.index(stop)]
    limit = body.get("max_tokens")
    if isinstance(limit, int) and words(text) > limit:
        return " ".join(text.split()[:limit]), "length"
    return text, "stop"


class StandinServer:
    """An OpenAI-compatible server that sleeps ``latency`` seconds and echoes the request.

    ``received`` counts requests, ``in_flight``/``max_in_flight`` the ones being
    answered, and ``requests`` keeps each one (path, body, Authorization header)
    unless ``keep_requests`` is false (the benchmark's setting). ``answer`` replaces
    the default text. Start it in a thread with :meth:`start` (``url`` is then its
    base URL, ending in ``/v1``) or in the foreground with :meth:`run`.
    """

    def __init__(self, latency: float = 0.0, answer: Answer = echo_answer, keep_requests: bool = True) -> None:
        self.latency = latency
        self.answer = answer
        self.keep_requests = keep_requests
        self.received = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests: list[Received] = []
        self._background: BackgroundServer | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._complete)
        app.router.add_post("/v1/completions", self._complete)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        return app

    def start(self, port: int = 0) -> StandinServer:
        self._background = BackgroundServer(self.app(), port).start()
        return self

    def stop(self) -> None:
        if self._background is not None:
            self._background.stop()
            self._background = None

    @property
    def url(self) -> str:
        if self._background is None:
            raise RuntimeError("the stand-in server is not started")
        return f"{self._background.origin}/v1"

    def run(self, host: str, port: int) -> None:
        web.run_app(self.app(), host=host, port=port, access_log=None, print=None)

    def reset(self) -> None:
        self.received = self.max_in_flight = 0
        self.requests.clear()

    async def _complete(self, request: web.Request) -> web.Response:
        self.received += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            body = json.loads(await request.read())
            if self.keep_requests:
                self.requests.append(Received(request.path, body, request.headers.get("Authorization")))
            if self.latency:
                await asyncio.sleep(self.latency)
            return web.json_response(completion(request.path, body, self.answer(request.path, body)))
        finally:
            self.in_flight -= 1

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "standin", "object": "model"}]})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")


def completion(path: str, body: dict[str, Any], answer: str) -> dict[str, Any]:
    """An OpenAI response body for ``answer`` (chat or text completion), with word-count usage."""
    text, finish_reason = cut(answer, body)
    if path.endswith("/chat/completions"):
        prompt_words = sum(words(str(m.get("content", ""))) for m in body.get("messages") or [])
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": finish_reason}
        kind = "chat.completion"
    else:
        prompt_words = words(str(body.get("prompt", "")))
        choice = {"index": 0, "text": text, "finish_reason": finish_reason}
        kind = "text_completion"
    return {"id": "standin", "object": kind, "created": int(time.time()), "model": body.get("model"),
            "choices": [choice], "usage": {"prompt_tokens": prompt_words, "completion_tokens": words(text),
                                           "total_tokens": prompt_words + words(text)}}


class BackgroundServer:
    """An aiohttp application served on 127.0.0.1 from a thread with its own event loop.

    ``port=0`` takes a free port; ``origin`` is ``http://127.0.0.1:PORT``. A handler is
    cancelled when its client disconnects, as a real server frees a request's slot.
    """

    def __init__(self, app: web.Application, port: int = 0) -> None:
        self.app = app
        self.port = port
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="background-server", daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> BackgroundServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)
        return self

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, backlog=1024)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(timeout=30)
            self._runner = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--latency", type=float, default=0.5, help="seconds before each answer")
    args = parser.parse_args()
    StandinServer(args.latency, keep_requests=False).run(args.host, args.port)


if __name__ == "__main__":
    main()

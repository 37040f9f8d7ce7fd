"""Real OpenAI-protocol servers for the tests: ``transformers serve``, a stand-in and a fault proxy.

- :class:`TransformersServe`: ``transformers serve`` (from ``transformers[serving]``) in its
  own process group on 127.0.0.1, serving a tiny GPT-2 by path; the requests it answered
  are counted from its access log (one ``POST /v1/...`` line each).
- :class:`StandinServer` (from ``benchmarks/standin_server.py``, one copy for tests and
  benchmark): fixed latency, answers echoed from the request, every request kept.
- :class:`FaultProxy`: in front of either, it forwards requests and injects faults —
  429 with ``Retry-After``, any status, a hang, a connection dropped mid-answer or before
  it, a malformed 200 — by request ordinal, by a seeded rate or by a rule on the body,
  and can answer 429 past a concurrency cap. It counts what it forwarded and injected.

The fixtures in ``conftest.py`` start and stop them.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web
from yarl import URL

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # pytest started as `pytest`, not `python -m pytest`: benchmarks/ is not on the path
    sys.path.insert(0, str(ROOT))

from benchmarks.standin_server import BackgroundServer, Received, StandinServer, echo_answer  # noqa: E402

__all__ = ["FAULTS", "BackgroundServer", "FaultProxy", "Received", "StandinServer", "TransformersServe",
           "echo_answer", "write_chat_model"]

Fault = str | int
"""What the proxy does instead of forwarding: an HTTP status (``429`` comes with ``Retry-After``,
others with an OpenAI-style error body) or one of :data:`FAULTS`."""

FAULTS = {
    "hang": "answer nothing for `hang_s` seconds (past the client's timeout), then 504",
    "drop": "send the status line, headers and part of the body, then close the connection",
    "disconnect": "close the connection before answering anything",
    "malformed": "200 with a body that is not JSON",
    "no_choices": "200 with a JSON body without choices",
    "echo_auth": "401 whose error message repeats the request's Authorization header",
}

CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


class FaultProxy:
    """A proxy on 127.0.0.1 in front of ``upstream`` (a base URL such as ``http://host:port/v1``).

    Faults, checked in this order for each request (``ordinal`` counts requests from 1):

    - ``rule(body)``: a fault for this request, or None (e.g. a 400 for one poisoned prompt);
    - ``faults[ordinal]``: a fault at that request;
    - ``rate``: with this probability, one of ``kinds`` (drawn from ``random.Random(seed)``);
    - ``max_in_flight``: a request arriving while that many are in flight gets a 429 (``cap``).

    A 429 carries ``Retry-After: retry_after`` (seconds, or any string such as an HTTP
    date). ``received``, ``forwarded`` and ``injected`` (by kind, the cap's 429s as
    ``cap``) count the traffic; ``events`` lists ``(seconds since start, outcome)`` for
    every request, so a test can see rejections fall over time; ``max_in_flight_seen``
    is the most requests in flight at once.
    """

    def __init__(self, upstream: str, faults: dict[int, Fault] | None = None, rate: float = 0.0,
                 kinds: Sequence[Fault] = (429, 500, "drop", "malformed"), seed: int = 0,
                 rule: Callable[[dict[str, Any]], Fault | None] | None = None, max_in_flight: int | None = None,
                 retry_after: float | str = 0.05, hang_s: float = 30.0) -> None:
        unknown = [k for k in [*(faults or {}).values(), *kinds] if isinstance(k, str) and k not in FAULTS]
        if unknown:
            raise ValueError(f"unknown faults {unknown}; known: HTTP statuses and {sorted(FAULTS)}")
        self.upstream = URL(upstream).origin()
        self.faults = dict(faults or {})
        self.rate, self.kinds, self.rule = rate, list(kinds), rule
        self.max_in_flight = max_in_flight
        self.retry_after, self.hang_s = retry_after, hang_s
        self._random = random.Random(seed)
        self.received = 0
        self.forwarded = 0
        self.injected: Counter[str] = Counter()
        self.events: list[tuple[float, str]] = []
        self.in_flight = 0
        self.max_in_flight_seen = 0
        self._started = time.monotonic()
        self._session: ClientSession | None = None
        self._background: BackgroundServer | None = None

    @property
    def url(self) -> str:
        if self._background is None:
            raise RuntimeError("the fault proxy is not started")
        return f"{self._background.origin}/v1"

    def start(self) -> FaultProxy:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        app.on_cleanup.append(self._close_session)
        self._background = BackgroundServer(app).start()
        self._started = time.monotonic()
        return self

    def stop(self) -> None:
        if self._background is not None:
            self._background.stop()
            self._background = None

    def stats(self) -> dict[str, Any]:
        return {"received": self.received, "forwarded": self.forwarded, "injected": dict(self.injected),
                "max_in_flight_seen": self.max_in_flight_seen}

    def rejections_by_window(self, seconds: float) -> list[int]:
        """The cap's 429s per window of ``seconds`` since the proxy started."""
        if not self.events:
            return []
        counts = [0] * (int(self.events[-1][0] // seconds) + 1)
        for at, outcome in self.events:
            if outcome == "cap":
                counts[int(at // seconds)] += 1
        return counts

    def _fault_for(self, ordinal: int, body: dict[str, Any]) -> Fault | None:
        if self.rule is not None and (fault := self.rule(body)) is not None:
            return fault
        if ordinal in self.faults:
            return self.faults[ordinal]
        if self.rate and self._random.random() < self.rate:
            return self._random.choice(self.kinds)
        if self.max_in_flight is not None and self.in_flight > self.max_in_flight:
            return "cap"
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.received += 1
        ordinal = self.received
        self.in_flight += 1
        self.max_in_flight_seen = max(self.max_in_flight_seen, self.in_flight)
        try:
            data = await request.read()
            try:
                body = json.loads(data) if data else {}
            except ValueError:
                body = {}
            fault = self._fault_for(ordinal, body if isinstance(body, dict) else {})
            self.events.append((time.monotonic() - self._started, "forwarded" if fault is None else str(fault)))
            if fault is None:
                self.forwarded += 1
                return await self._forward(request, data)
            self.injected[str(fault)] += 1
            return await self._inject(request, fault)
        finally:
            self.in_flight -= 1

    async def _forward(self, request: web.Request, data: bytes) -> web.Response:
        if self._session is None:
            self._session = ClientSession(connector=TCPConnector(limit=0), timeout=ClientTimeout(total=None))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._session.request(request.method, self.upstream.join(URL(request.path_qs)), data=data,
                                         headers=headers) as upstream:
            payload = await upstream.read()
            return web.Response(status=upstream.status, body=payload,
                                content_type=upstream.content_type or "application/json")

    async def _inject(self, request: web.Request, fault: Fault) -> web.StreamResponse:
        if fault in (429, "cap"):
            return error_response(429, "rate limited (injected)", {"Retry-After": _seconds(self.retry_after)})
        if isinstance(fault, int):
            return error_response(fault, f"injected {fault}")
        if fault == "hang":
            await asyncio.sleep(self.hang_s)
            return error_response(504, "hung (injected)")
        if fault == "malformed":
            return web.Response(status=200, text='{"id": "x", "choices": [{"text": "cut sh',
                                content_type="application/json")
        if fault == "no_choices":
            return web.json_response({"id": "x", "object": "chat.completion", "choices": []})
        if fault == "echo_auth":
            return error_response(401, f"Incorrect API key provided: {request.headers.get('Authorization')}")
        transport = request.transport
        if fault == "drop":
            response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            response.content_length = 4096
            await response.prepare(request)
            await response.write(b'{"id": "x", "object": "chat.completion", "choices": [{"index": 0, ')
            await asyncio.sleep(0.01)
        if transport is not None:  # "drop" and "disconnect"
            transport.abort()
        raise asyncio.CancelledError  # nothing more to send on this connection

    async def _close_session(self, app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "injected", "code": status}}, status=status,
                             headers=headers)


def _seconds(value: float | str) -> str:
    if isinstance(value, str):
        return value
    return str(int(value)) if float(value).is_integer() else str(value)


# -- transformers serve --------------------------------------------------------

def write_chat_model(source: str | Path, target: Path) -> Path:
    """A copy of the causal LM at ``source`` whose tokenizer has a chat template (for /v1/chat/completions)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (target / "config.json").exists():
        return target
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.chat_template = CHAT_TEMPLATE
    AutoModelForCausalLM.from_pretrained(source).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


class TransformersServe:
    """``transformers serve MODEL --host 127.0.0.1 --port PORT --device cpu`` in its own process group.

    The model is preloaded and named by its path: requests send ``"model": <model>``.
    ``url`` is the base URL (``.../v1``); :meth:`requests` counts the ``POST /v1/...``
    lines of its access log, one per request it answered (``path`` narrows it).
    """

    def __init__(self, model: str | Path, log_path: Path, port: int) -> None:
        self.model = str(model)
        self.log_path = log_path
        self.port = port
        self.url = f"http://127.0.0.1:{port}/v1"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180.0) -> TransformersServe:
        executable = Path(sys.executable).with_name("transformers")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                [str(executable), "serve", self.model, "--host", "127.0.0.1", "--port", str(self.port),
                 "--device", "cpu", "--log-level", "info"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"transformers serve did not start:\n{self.log()[-3000:]}")
            time.sleep(0.5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def requests(self, path: str = "/v1/") -> int:
        """Requests answered so far (any status), counted from the access log."""
        return sum(f'"POST {path}' in line for line in self.log().splitlines())

    def stop(self) -> None:
        if self._process is None:
            return
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(self._process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self._process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self._process = None

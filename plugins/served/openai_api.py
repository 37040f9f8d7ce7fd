"""``openai``: a generator that sends each candidate to an OpenAI-protocol server or hosted API.

Anything that speaks the OpenAI wire protocol works: ``vllm serve``, SGLang, TGI,
llama.cpp's server, ``transformers serve``, hosted APIs. Each request asks for one
candidate (``samples`` become requests with their own seeds) at
``/chat/completions`` (messages from ``system`` + the templated prompt, or the row's
``messages`` column) or ``/completions`` (the prompt). It is a request plugin: the
engine calls ``generate`` with one request at a time, hundreds in flight on one
event loop, and owns the timeout, the retries and the limits (``genflow/api.py``);
this module maps the server's answers onto that contract:

- 429 -> :class:`TransientError` ``rate_limited``, with the server's ``Retry-After``
  (``retry-after-ms``, seconds or an HTTP date); 408/409/425 and 500/502/503/504,
  a refused, reset or dropped connection, and a malformed answer (not JSON, no
  choices) -> :class:`TransientError`;
- 401/403 -> :class:`RowError` saying the key in ``$api_key_env`` was refused; any
  other 4xx (400, 404, 422...) -> :class:`RowError` with the server's message;
- a redirect (3xx) -> :class:`RowError` naming where it points: requests go to
  ``base_url`` only, never on to another address with the key.

The client is a bare ``aiohttp`` session, not the ``openai`` package: on this
project's 2-core machines the per-request cost of the client decides throughput at
high concurrency (573 vs 68 req/s, ``MEASURED.md``). The API key is read from the
environment variable ``api_key_env`` names, in the worker, at each call (so a
rotated key is picked up); it is sent as ``Authorization: Bearer`` and removed from
any text this module builds (an error message that echoes it), as is the password of
a ``base_url`` (``http://user:password@host/v1``, sent as basic auth).
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import math
import os
import re
import time
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator

from genflow import hookimpl
from genflow.api import (
    Generation,
    GenerationRequest,
    Generator,
    PluginParams,
    RowError,
    TransientError,
    request_slot,
)
from genflow.config import redact_url
from genflow.hookspecs import Register
from genflow.secrets import Scrubber, Secret, url_secrets

if TYPE_CHECKING:
    import aiohttp
    from multidict import CIMultiDictProxy

PATHS = {"chat": "/chat/completions", "completions": "/completions"}
RATE_LIMITED = 429
TRANSIENT_STATUSES = frozenset({408, 409, 425, 500, 502, 503, 504})
"""Answers that may pass when sent again (409: OpenAI's "conflict, retry"; 425: too early)."""
KEY_REFUSED = frozenset({401, 403})
REDIRECTS = range(300, 400)
MESSAGE_CHARS = 500
"""How much of a server's error message goes into an ``errors/`` row."""
CONNECTIONS = 1024
"""Open connections per worker: more than the requests a stage keeps in flight."""
CONNECT_TIMEOUT_S = 10.0
MAX_ANSWER_BYTES = 32 * 1024 * 1024
"""The default ``max_answer_bytes``: far above any completion (a long answer with top
logprobs is a few MB), far below what would swamp a worker's memory."""
"""Seconds to open a connection; the request's own timeout is the engine's ``requests.timeout_s``."""
_FENCE = re.compile(r"^\s*```(?:json)?\s*\n(.*?)\n?```\s*$", re.S)


def check_base_url(value: str | list[str]) -> str | list[str]:
    """One server's ``/v1`` URL or a list of them (the params of every OpenAI-protocol plugin)."""
    urls = [value] if isinstance(value, str) else value
    if not urls:
        raise ValueError("base_url: give at least one server")
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"base_url {url!r}: expected http://... or https://...")
    return value


def check_key_env(value: str | None) -> str | None:
    """``api_key_env`` names a variable; a key pasted in its place is refused, and not echoed."""
    if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise ValueError("api_key_env is the NAME of an environment variable (such as OPENAI_API_KEY), "
                         "not the key")
    return value


class OpenAIParams(PluginParams):
    base_url: str | list[str] = Field(description="The server's base URL, ending in /v1 as OpenAI clients "
                                      "take it (http://127.0.0.1:8000/v1), or a list of servers of the same "
                                      "model: each request goes to the one with the fewest in flight.")
    api_key_env: str | None = Field(None, description="The environment variable holding the API key (sent as "
                                    "Authorization: Bearer); the key itself never goes in a config. null = "
                                    "no key (a local server).")
    endpoint: Literal["chat", "completions"] = Field("chat", description="chat: /chat/completions with "
                                                     "messages; completions: /completions with the prompt.")
    temperature: float | None = Field(None, ge=0, description="Sampling temperature; null = the server's default.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling; null = the server's default.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens per answer; null = the server's default.")
    stop: str | list[str] | None = Field(None, description="A string or strings that end an answer (not included "
                                        "in it).")
    response_format: dict[str, Any] | None = Field(None, description="A JSON schema the answer must meet: sent "
                                                   "as response_format json_schema and checked on the answer.")
    schema_retries: int = Field(2, ge=0, description="Requests sent again (with another seed) when an answer "
                                "does not meet response_format; then the row goes to errors/ with the answer.")
    extra_body: dict[str, Any] = Field(default_factory=dict, description="Merged into every request body, for "
                                       "server-specific parameters (vLLM's top_k, guided decoding...).")
    seed_requests: bool = Field(True, description="Send each request's seed, so a server that honours seeds "
                                "answers reproducibly.")
    max_answer_bytes: int = Field(MAX_ANSWER_BYTES, ge=1024, description="Largest answer body read from a "
                                  "server, in bytes; a larger one is not read on and the row goes to errors/.")

    @field_validator("base_url")
    @classmethod
    def _urls(cls, value: str | list[str]) -> str | list[str]:
        return check_base_url(value)

    @field_validator("api_key_env")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return check_key_env(value)

    @field_validator("response_format")
    @classmethod
    def _schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            import jsonschema

            try:
                jsonschema.validators.validator_for(value).check_schema(value)
            except jsonschema.SchemaError as exc:
                raise ValueError(f"response_format is not a valid JSON schema: {exc.message}") from None
        return value


class _Server:
    """One server of ``base_url``: where requests go and how many are in flight there."""

    def __init__(self, base_url: str) -> None:
        from yarl import URL

        self.base_url = base_url.rstrip("/")
        self.name = str(URL(self.base_url).with_user(None))  # never a password of the URL in a message
        self.in_flight = 0


class OpenAIClient:
    """Requests to one OpenAI-protocol server or a list of them, over one aiohttp session per event loop.

    Each request goes to the server with the fewest in flight; its answer is the JSON
    body, or a :class:`TransientError` / :class:`RowError` as the module docstring says.
    The key is read from ``$api_key_env`` at each request. Shared by the ``openai``
    generator and the ``llm-judge`` scorer's served backend."""

    def __init__(self, base_url: str | list[str], api_key_env: str | None, path: str,
                 max_answer_bytes: int = MAX_ANSWER_BYTES) -> None:
        urls = [base_url] if isinstance(base_url, str) else base_url
        self.servers = [_Server(url) for url in urls]
        self.api_key_env = api_key_env
        self.path = path
        self.max_answer_bytes = max_answer_bytes
        self._url_secrets = [secret for url in urls for secret in url_secrets(url, "base_url")]
        self._scrubbers: dict[str | None, Scrubber] = {}
        self._next = 0
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None

    async def aclose(self) -> None:
        """Close the HTTP session."""
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    def _client(self) -> aiohttp.ClientSession:
        """The session of the running event loop, made on first use there."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._session_loop is not loop or self._session.closed:
            import aiohttp

            connector = aiohttp.TCPConnector(limit=CONNECTIONS, limit_per_host=0, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S),
                raise_for_status=False, auto_decompress=True)
            self._session_loop = loop
        return self._session

    def _pick(self) -> _Server:
        """The server with the fewest requests in flight; ties go round the list."""
        count = len(self.servers)
        if count == 1:
            return self.servers[0]
        start = self._next
        self._next = (start + 1) % count
        return min((self.servers[(start + i) % count] for i in range(count)), key=lambda s: s.in_flight)

    async def post(self, body: dict[str, Any]) -> dict[str, Any]:
        """The server's answer as JSON; a failed request raises TransientError or RowError.

        Each post holds a slot of the engine's limits (:func:`genflow.api.request_slot`):
        a judge's parallel questions and a schema's retries count as the requests they are."""
        key = self._key()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        async with request_slot():  # the stage's concurrency, rpm and tpm count each HTTP request
            return await self._post(body, key, headers)

    async def _post(self, body: dict[str, Any], key: str | None, headers: dict[str, str]) -> dict[str, Any]:
        import aiohttp

        server = self._pick()
        server.in_flight += 1
        try:
            async with self._client().post(server.base_url + self.path, data=json.dumps(body).encode(),
                                           headers=headers, allow_redirects=False) as response:
                status, answer_headers = response.status, response.headers
                payload = await read_answer(response, self.max_answer_bytes, server.name)
        except aiohttp.InvalidURL as exc:
            raise RowError(self.scrub(f"invalid URL for {server.name}: {exc}", key)) from None
        except aiohttp.ClientError as exc:  # refused, reset, dropped mid-answer, unreadable HTTP
            raise TransientError(self.scrub(f"{type(exc).__name__} from {server.name}: {exc}", key)) from None
        finally:
            server.in_flight -= 1
        if not 200 <= status < 300:
            raise self._refusal(server, status, answer_headers, payload, key)
        try:
            answer = json.loads(payload)
        except ValueError:
            raise TransientError(self.scrub(f"malformed answer from {server.name} (not JSON): "
                                            f"{short(payload.decode(errors='replace'))}", key)) from None
        if not isinstance(answer, dict):
            raise TransientError(f"malformed answer from {server.name}: not a JSON object")
        return answer

    def scrub(self, text: str, key: str | None) -> str:
        """``text`` with the key and the password of any ``base_url`` blanked, should a server echo them."""
        scrubber = self._scrubbers.get(key)
        if scrubber is None:
            scrubber = Scrubber([*self._url_secrets, *([Secret(key, f"${self.api_key_env}")] if key else [])])
            self._scrubbers = {key: scrubber}  # one key at a time (a rotated key replaces the last)
        return scrub(scrubber.scrub(text), key)

    def _key(self) -> str | None:
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env, "").strip()
        if not key:
            raise RowError(f"the environment variable {self.api_key_env} (api_key_env) is not set")
        return key

    def _refusal(self, server: _Server, status: int, headers: CIMultiDictProxy[str], payload: bytes,
                 key: str | None) -> Exception:
        message = self.scrub(error_message(payload), key)
        if status in REDIRECTS:
            where = self.scrub(redact_location(headers.get("Location") or "(no Location)"), key)
            return RowError(f"{status} from {server.name}: the server redirects to {where}; requests are sent to "
                            "base_url only, never on to another address with the key: set base_url to where it "
                            "points")
        if status == RATE_LIMITED:
            return TransientError(f"429 from {server.name}: {message}", retry_after=retry_after(headers),
                                  rate_limited=True)
        if status in TRANSIENT_STATUSES or 520 <= status <= 529:
            return TransientError(f"{status} from {server.name}: {message}", retry_after=retry_after(headers))
        if status in KEY_REFUSED:
            if self.api_key_env:
                return RowError(f"{status} from {server.name}: the key in ${self.api_key_env} was refused "
                                f"({message})")
            return RowError(f"{status} from {server.name}: the server wants an API key; set api_key_env to the "
                            f"environment variable that holds it ({message})")
        hint = " (is base_url the server's /v1 URL?)" if status == 404 else ""
        return RowError(f"{status} from {server.name}{hint}: {message}")


class OpenAIGenerator(Generator):
    """Candidates from an OpenAI-protocol server or hosted API (chat or text completions)."""

    Params: ClassVar[type[PluginParams]] = OpenAIParams
    modality: ClassVar[str] = "text"
    description: ClassVar[str] = "OpenAI-protocol server or hosted API (vLLM, SGLang, TGI, transformers serve...)"
    input_columns: ClassVar[tuple[str, ...]] = ("messages",)
    requires: ClassVar[tuple[str, ...]] = ("aiohttp",)
    extra: ClassVar[str | None] = "openai"
    unhashed_params: ClassVar[tuple[str, ...]] = ("base_url", "api_key_env")
    params: OpenAIParams

    def __init__(self, model: str | None, params: OpenAIParams, device: str = "cpu") -> None:
        super().__init__(model, params, device)
        if not self.model_name:
            raise ValueError("the openai generator needs `model:`, the model name the server serves")
        if params.api_key_env and not os.environ.get(params.api_key_env, "").strip():
            raise ValueError(f"api_key_env: the environment variable {params.api_key_env} is not set where the "
                             "plugin runs")
        self.client = OpenAIClient(params.base_url, params.api_key_env, PATHS[params.endpoint],
                                   params.max_answer_bytes)
        self.servers = self.client.servers
        self._validator: Any = None
        if params.response_format is not None:
            import jsonschema

            self._validator = jsonschema.validators.validator_for(params.response_format)(params.response_format)

    @classmethod
    def secret_env(cls, params: PluginParams) -> list[str]:
        key_env = getattr(params, "api_key_env", None)
        return [key_env] if key_env else []

    def describe(self) -> dict[str, Any]:
        return {"model": self.model_name, "endpoint": self.params.endpoint, "servers": len(self.servers)}

    async def generate(self, request: GenerationRequest) -> Generation | RowError:  # type: ignore[override]
        """One candidate for ``request``: one request to a server (more when an answer misses the schema)."""
        body = self._body(request)
        if isinstance(body, RowError):
            return body
        paid = [0, 0]  # every answer's tokens, those that missed the schema too: each was paid for
        for attempt in range(self.params.schema_retries + 1 if self._validator is not None else 1):
            if attempt and self.params.seed_requests:
                body["seed"] = retry_seed(request.seed, attempt)
            generation = self._generation(await self.client.post(body))
            paid[0] += generation.prompt_tokens or 0
            paid[1] += generation.num_tokens or 0
            if attempt:
                generation.prompt_tokens, generation.num_tokens = paid[0] or None, paid[1] or None
            if self._validator is None:
                return generation
            problem = self._schema_problem(generation)
            if problem is None:
                return generation
        error = RowError(f"the answer does not meet response_format after {attempt + 1} requests ({problem}); "
                         f"the answer: {generation.raw}")
        error.raw = generation.raw  # type: ignore[attr-defined]
        error.prompt_tokens, error.completion_tokens = paid  # type: ignore[attr-defined]
        return error

    async def aclose(self) -> None:
        """Close the HTTP session (the engine calls it at the end of the stage)."""
        await self.client.aclose()

    # -- the request -------------------------------------------------------------

    def _body(self, request: GenerationRequest) -> dict[str, Any] | RowError:
        body: dict[str, Any] = {"model": self.model_name}
        if self.params.endpoint == "chat":
            messages = chat_messages(request)
            if isinstance(messages, RowError):
                return messages
            body["messages"] = messages
        else:
            body["prompt"] = request.prompt
        p = self.params
        for name, value in (("temperature", p.temperature), ("top_p", p.top_p), ("max_tokens", p.max_tokens),
                            ("stop", p.stop)):
            if value is not None:
                body[name] = value
        if p.seed_requests:
            body["seed"] = request.seed
        if p.response_format is not None:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "response", "schema": p.response_format,
                                                       "strict": True}}
        body.update(p.extra_body)
        return body

    # -- the answer --------------------------------------------------------------

    def _generation(self, answer: dict[str, Any]) -> Generation:
        choices = answer.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            detail = f": {short(error_message(json.dumps(answer).encode()))}" if "error" in answer else ""
            raise TransientError(f"malformed answer: no choices{detail}")
        choice = choices[0]
        if self.params.endpoint == "chat":
            message = choice.get("message")
            text = message_text(message.get("content")) if isinstance(message, dict) else None
        else:
            text = choice.get("text")
        finish_reason = choice.get("finish_reason")
        if not isinstance(text, str):
            raise TransientError(f"malformed answer: no text in the choice (finish_reason {finish_reason})")
        usage = answer.get("usage")
        if not isinstance(usage, dict):
            usage = {}
        return Generation(text=text, num_tokens=_int(usage.get("completion_tokens")),
                          prompt_tokens=_int(usage.get("prompt_tokens")), finish_reason=finish_reason)

    def _schema_problem(self, generation: Generation) -> str | None:
        """Why the answer misses ``response_format`` (None when it meets it); sets ``raw`` and the JSON text."""
        raw = generation.text or ""
        generation.raw = raw
        fenced = _FENCE.match(raw)
        text = fenced.group(1) if fenced else raw
        try:
            value = json.loads(text)
        except ValueError as exc:
            return f"not JSON: {exc}"
        error = next(iter(sorted(self._validator.iter_errors(value), key=lambda e: list(e.path))), None)
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "the answer"
            return f"{where}: {error.message}"
        generation.text = text
        return None


# -- helpers -----------------------------------------------------------------------

def chat_messages(request: GenerationRequest) -> list[dict[str, Any]] | RowError:
    """The row's ``messages`` column when it has one, else ``system`` + the prompt."""
    given = request.inputs.get("messages")
    if given is None:
        messages: list[dict[str, Any]] = []
        if request.system:
            messages.append({"role": "system", "content": request.system})
        messages.append({"role": "user", "content": request.prompt})
        return messages
    if isinstance(given, str):
        try:
            given = json.loads(given)
        except ValueError:
            return RowError("the messages column holds a string that is not JSON")
    if not isinstance(given, (list, tuple)) or not given:
        return RowError("the messages column must hold a non-empty list of {role, content}")
    out = []
    for i, message in enumerate(given):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
            return RowError(f"messages[{i}] is not a {{role, content}} message")
        out.append({k: v for k, v in message.items() if v is not None})
    return out


def message_text(content: Any) -> str | None:
    """A chat message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, list):
        parts = [str(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return "".join(parts) if parts else None
    return content if isinstance(content, str) else None


def retry_seed(seed: int, attempt: int) -> int:
    """The seed of a schema retry: another sample than the first request's, the same on every run."""
    digest = hashlib.blake2b(f"{seed}:{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % (2**31 - 1)


def retry_after(headers: CIMultiDictProxy[str] | dict[str, str]) -> float | None:
    """Seconds the server asks to wait: ``retry-after-ms``, or ``Retry-After`` in seconds or as an HTTP date.

    A negative wait is passed on as it is and an unreadable one as NaN, not as 0 or None: the
    engine ignores either for its usual backoff and says so once (``retry_after_capped``),
    as the user is told of a server that asks for too long. A date in the past is 0."""
    lower = {k.lower(): v for k, v in headers.items()}
    if (ms := lower.get("retry-after-ms")) is not None:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = lower.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return math.nan
    return max(0.0, when.timestamp() - time.time())


async def read_answer(response: Any, limit: int, where: str) -> bytes:
    """An answer's body, read in chunks: one past ``limit`` bytes (or announced so by its
    ``Content-Length``) is a :class:`RowError` as soon as that is known, not read on."""
    announced = response.content_length
    if announced is not None and announced > limit:
        raise RowError(f"the answer from {where} is {announced} bytes, more than max_answer_bytes ({limit}): "
                       "not read")
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            raise RowError(f"the answer from {where} is more than max_answer_bytes ({limit} bytes): not read on")
        chunks.append(chunk)
    return b"".join(chunks)


def error_message(payload: bytes) -> str:
    """The message of an error answer: OpenAI's ``error.message``, FastAPI's ``detail``, or the text."""
    text = payload.decode(errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        return short(text.strip()) or "(empty answer)"
    if isinstance(data, dict):
        error = data.get("error")
        for value in (error.get("message") if isinstance(error, dict) else error, data.get("detail"),
                      data.get("message")):
            if value:
                return short(value if isinstance(value, str) else json.dumps(value))
    return short(text)


def short(text: str) -> str:
    return text if len(text) <= MESSAGE_CHARS else text[:MESSAGE_CHARS] + "..."


def redact_location(location: str) -> str:
    """A redirect's ``Location`` as a message shows it: its user-info hidden, cut to one line."""
    return short(redact_url(" ".join(location.split())))


def scrub(text: str, key: str | None) -> str:
    """``text`` with the API key blanked out, should a server have echoed it."""
    return text.replace(key, "***") if key else text


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@hookimpl
def register_generators(register: Register) -> None:
    register("openai", OpenAIGenerator)

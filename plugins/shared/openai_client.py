"""The OpenAI-protocol HTTP client, shared by the ``openai`` generator (served family) and the
``llm-judge`` scorer's served backend (judge family), and the checks of their params.

Anything that speaks the OpenAI wire protocol works: ``vllm serve``, SGLang, TGI,
llama.cpp's server, ``transformers serve``, hosted APIs. The plugins using it are
request plugins: the engine calls them with one request at a time, hundreds in flight
on one event loop, and owns the timeout, the retries and the limits
(``genflow/api.py``); :class:`OpenAIClient` maps the server's answers onto that contract:

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
import json
import math
import os
import re
import time
from typing import TYPE_CHECKING, Any

from genflow.api import RowError, TransientError, request_slot, response_cache
from genflow.secrets import Scrubber, Secret, redact_url, url_secrets

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
"""Seconds to open a connection; the request's own timeout is the engine's ``requests.timeout_s``."""
MAX_ANSWER_BYTES = 32 * 1024 * 1024
"""The default ``max_answer_bytes``: far above any completion (a long answer with top
logprobs is a few MB), far below what would swamp a worker's memory."""


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

    async def post_cached(self, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """:meth:`post` through the job's response cache (:func:`genflow.api.response_cache`): the
        stored answer to the same request when there is one (not sent), else the server's, kept
        for later jobs. Returns (answer, whether it came from the cache). The key is the
        endpoint and the body, never the key or the server's URL (``genflow.engine.cache``)."""
        cache = response_cache()
        if cache is None:
            return await self.post(body), False
        stored = await cache.aget(self.path, body)
        if stored is not None:
            return stored, True
        answer = await self.post(body)
        await cache.aput(self.path, body, answer)
        return answer, False

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

    # -- the Batch API (requests.mode: batch; genflow.engine.batches drives it) ----------

    async def batch_upload(self, data: bytes, filename: str) -> str:
        """Upload a batch's JSONL input (``POST /files``, purpose ``batch``): its file id."""
        import aiohttp

        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", data, filename=filename, content_type="application/jsonl")
        answer = json.loads(await self._call("POST", "/files", data=form))
        return str(answer["id"])

    async def batch_create(self, input_file_id: str, endpoint: str, completion_window: str,
                           metadata: dict[str, str]) -> dict[str, Any]:
        """Create a batch (``POST /batches``): the provider's batch object."""
        body = {"input_file_id": input_file_id, "endpoint": endpoint, "completion_window": completion_window,
                "metadata": metadata}
        answer: dict[str, Any] = json.loads(await self._call("POST", "/batches", body=body))
        return answer

    async def batch_retrieve(self, batch_id: str) -> dict[str, Any]:
        answer: dict[str, Any] = json.loads(await self._call("GET", f"/batches/{batch_id}"))
        return answer

    async def batch_cancel(self, batch_id: str) -> dict[str, Any]:
        answer: dict[str, Any] = json.loads(await self._call("POST", f"/batches/{batch_id}/cancel"))
        return answer

    async def file_content(self, file_id: str) -> bytes:
        """A file's bytes (``GET /files/{id}/content``): a batch's output or error JSONL."""
        return await self._call("GET", f"/files/{file_id}/content", limit=None)

    def batch_url(self) -> str:
        """The ``url`` of a batch line and the batch's ``endpoint``: the path below the host."""
        from yarl import URL

        return URL(self.servers[0].base_url).path.rstrip("/") + self.path

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None, data: Any = None,
                    limit: int | None = MAX_ANSWER_BYTES) -> bytes:
        """One Batch API call to the first server: its body, or TransientError / RowError as for a completion."""
        import aiohttp

        key = self._key()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        server = self.servers[0]  # a batch lives on one provider: its files and batches are there
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            async with self._client().request(method, server.base_url + path, data=data, headers=headers,
                                              allow_redirects=False) as response:
                status, answer_headers = response.status, response.headers
                payload = await read_answer(response, limit or 2**62, server.name)
        except aiohttp.ClientError as exc:
            raise TransientError(self.scrub(f"{type(exc).__name__} from {server.name}: {exc}", key)) from None
        if not 200 <= status < 300:
            raise self._refusal(server, status, answer_headers, payload, key)
        return payload

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


def message_text(content: Any) -> str | None:
    """A chat message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, list):
        parts = [str(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return "".join(parts) if parts else None
    return content if isinstance(content, str) else None


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

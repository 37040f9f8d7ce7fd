"""``openai``: a generator that sends each candidate to an OpenAI-protocol server or hosted API.

Anything that speaks the OpenAI wire protocol works: ``vllm serve``, SGLang, TGI,
llama.cpp's server, ``transformers serve``, hosted APIs. Each request asks for one
candidate (``samples`` become requests with their own seeds) at
``/chat/completions`` (messages from ``system`` + the templated prompt, or the row's
``messages`` column) or ``/completions`` (the prompt). It is a request plugin: the
engine calls ``generate`` with one request at a time, hundreds in flight on one
event loop, and owns the timeout, the retries and the limits (``genflow/api.py``).
The HTTP client, :class:`~genflow.plugins.shared.openai_client.OpenAIClient` (shared
with the ``llm-judge`` scorer), maps the server's answers onto that contract (429 and
5xx are transient, other 4xx and redirects are the row's error; its module says
which is which) and keeps the API key out of every text it builds; an answer with no
choices or no text is transient too.

It runs episodes too (a generator with ``max_turns`` above 1, ``docs/episodes.md``): the
engine owns the loop and calls :meth:`OpenAIGenerator.chat` once per turn with the
conversation so far; the request sends the tools' schemas as OpenAI ``tools`` and the
answer's ``tool_calls`` come back with their arguments' text as the model wrote it.

A one-answer request goes through the job's response cache when it has one, and with
``requests.mode: batch`` through the provider's Batch API (``batch_request``,
``batch_result``, ``batch_api``; ``docs/batch-and-cache.md``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from genflow import hookimpl
from genflow.api import (
    ChatRequest,
    ChatTurn,
    Generation,
    GenerationRequest,
    Generator,
    PluginParams,
    RowError,
    ToolCall,
    TransientError,
)
from genflow.hookspecs import Register
from genflow.plugins.shared.openai_client import (
    MAX_ANSWER_BYTES,
    PATHS,
    OpenAIClient,
    check_base_url,
    check_key_env,
    error_message,
    message_text,
    short,
)

_FENCE = re.compile(r"^\s*```(?:json)?\s*\n(.*?)\n?```\s*$", re.S)


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
        sent = False  # a request went to the server (not every answer came from the response cache)
        for attempt in range(self.params.schema_retries + 1 if self._validator is not None else 1):
            if attempt and self.params.seed_requests:
                body["seed"] = retry_seed(request.seed, attempt)
            answer, cached = await self.client.post_cached(body)
            generation = self._generation(answer)
            sent = sent or not cached
            if not cached:
                paid[0] += generation.prompt_tokens or 0
                paid[1] += generation.num_tokens or 0
            if attempt and sent:
                generation.prompt_tokens, generation.num_tokens = paid[0] or None, paid[1] or None
            generation.cached = not sent
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

    # -- batch mode (requests.mode: batch, genflow.engine.batches) ----------------

    def batch_api(self) -> OpenAIClient:
        """The Batch API's calls: files and batches on the (first) server of ``base_url``."""
        return self.client

    def batch_request(self, request: GenerationRequest) -> dict[str, Any] | RowError:
        """The body of ``request``'s line in a batch: the body a live request sends."""
        return self._body(request)

    def batch_result(self, request: GenerationRequest, answer: dict[str, Any]) -> Generation | RowError:
        """A batch line's answer: its candidate, checked against ``response_format`` (a batch has
        no schema retries: an answer that misses it is the row's error)."""
        generation = self._generation(answer)
        if self._validator is not None and (problem := self._schema_problem(generation)) is not None:
            error = RowError(f"the answer does not meet response_format ({problem}); the answer: {generation.raw}")
            error.raw = generation.raw  # type: ignore[attr-defined]
            error.prompt_tokens = generation.prompt_tokens  # type: ignore[attr-defined]
            error.completion_tokens = generation.num_tokens  # type: ignore[attr-defined]
            return error
        return generation

    # -- episodes ----------------------------------------------------------------

    def opening(self, request: GenerationRequest) -> list[dict[str, Any]] | RowError:
        """An episode starts from the row's ``messages``, else ``system`` + the prompt."""
        return chat_messages(request)

    async def chat(self, request: ChatRequest) -> ChatTurn:
        """One assistant turn: the conversation and the tools' schemas to ``/chat/completions``."""
        if self.params.endpoint != "chat":
            raise RowError("an episode needs endpoint: chat (the completions endpoint takes no tools)")
        p = self.params
        body: dict[str, Any] = {"model": self.model_name, "messages": request.messages}
        if request.tools:
            body["tools"] = request.tools
        max_tokens = min((t for t in (p.max_tokens, request.max_tokens) if t is not None), default=None)
        for name, value in (("temperature", p.temperature), ("top_p", p.top_p), ("max_tokens", max_tokens),
                            ("stop", p.stop)):
            if value is not None:
                body[name] = value
        if p.seed_requests:
            body["seed"] = request.seed
        body.update(p.extra_body)
        return chat_turn(await self.client.post(body), request.turn)

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


def chat_turn(answer: dict[str, Any], turn: int) -> ChatTurn:
    """A chat answer as an episode's turn: its text, its tool calls (arguments' text kept as
    written; a call without an id gets one from its turn and place), its finish reason and usage."""
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        detail = f": {short(error_message(json.dumps(answer).encode()))}" if "error" in answer else ""
        raise TransientError(f"malformed answer: no choices{detail}")
    choice = choices[0]
    message: dict[str, Any] = choice["message"] if isinstance(choice.get("message"), dict) else {}
    content = message_text(message.get("content"))
    calls = []
    for i, entry in enumerate(message.get("tool_calls") or []):
        function = entry.get("function") if isinstance(entry, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise TransientError(f"malformed answer: tool_calls[{i}] has no function name")
        raw = function.get("arguments")
        raw = raw if isinstance(raw, str) else json.dumps(raw if raw is not None else {})
        try:
            arguments = json.loads(raw)
        except ValueError:
            arguments = None
        call_id = entry.get("id") if isinstance(entry.get("id"), str) and entry.get("id") else f"call_{turn}_{i}"
        calls.append(ToolCall(call_id, function["name"], arguments if isinstance(arguments, dict) else {}, raw))
    finish_reason = choice.get("finish_reason")
    if content is None and not calls:
        raise TransientError(f"malformed answer: no text and no tool call in the choice (finish_reason "
                             f"{finish_reason})")
    usage: dict[str, Any] = answer["usage"] if isinstance(answer.get("usage"), dict) else {}
    return ChatTurn(content, calls, finish_reason, _int(usage.get("prompt_tokens")),
                    _int(usage.get("completion_tokens")))


def retry_seed(seed: int, attempt: int) -> int:
    """The seed of a schema retry: another sample than the first request's, the same on every run."""
    digest = hashlib.blake2b(f"{seed}:{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % (2**31 - 1)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@hookimpl
def register_generators(register: Register) -> None:
    register("openai", OpenAIGenerator)

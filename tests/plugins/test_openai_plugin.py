"""The ``openai`` generator against real local servers: the stand-in, the fault proxy, ``transformers serve``.

Each test drives the plugin as the engine does — ``await plugin.generate(request)``,
one request a call, on one event loop — without Ray or Prefect, and checks what
the server received and what the plugin returned or raised.
"""

from __future__ import annotations

import asyncio
import json
import random
import traceback
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from typing import Any

import pytest
from pydantic import ValidationError

from genflow.api import Generation, GenerationRequest, RowError, TransientError
from genflow.config import RequestsSpec
from genflow.engine.requesting import backoff
from genflow.plugins.served.openai_api import OpenAIGenerator, OpenAIParams, retry_seed
from genflow.plugins.shared.openai_client import error_message, retry_after

SENTINEL_KEY = "sk-sentinel-5f0c1e9a7b3d"
KEY_ENV = "GENFLOW_TEST_OPENAI_KEY"
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}


def make_plugin(base_url: str | list[str], model: str = "standin-model", **params: Any) -> OpenAIGenerator:
    return OpenAIGenerator(model, OpenAIParams.model_validate({"base_url": base_url, **params}))


def req(prompt: str = "name a colour", seed: int = 7, system: str | None = None, **inputs: Any) -> GenerationRequest:
    return GenerationRequest(generation_id=f"g-{seed}", prompt_id="p", prompt=prompt, sample=0, seed=seed,
                             system=system, inputs=inputs)


def run(plugin: OpenAIGenerator, work: Callable[[], Awaitable[Any]]) -> Any:
    """``work()`` on a fresh event loop, then the plugin's session closed, as the engine does at a stage's end."""
    async def main() -> Any:
        try:
            return await work()
        finally:
            await plugin.aclose()

    return asyncio.run(main())


def outcome(plugin: OpenAIGenerator, request: GenerationRequest) -> Any:
    """What one call gives: its result, or the exception it raised."""
    async def call() -> Any:
        try:
            return await plugin.generate(request)
        except Exception as exc:  # the engine's view: a raised TransientError or RowError
            return exc

    return run(plugin, call)


# -- what is sent, what comes back -------------------------------------------------------

def test_chat_sends_system_and_prompt_with_the_sampling_params_and_reads_usage(standin_server) -> None:
    plugin = make_plugin(standin_server.url, temperature=0.7, top_p=0.9, max_tokens=50, stop=["\n\n"],
                         extra_body={"top_k": 20})
    result = outcome(plugin, req("name a colour", seed=11, system="be brief"))

    [got] = standin_server.requests
    assert got.path == "/v1/chat/completions"
    assert got.body == {"model": "standin-model", "messages": [{"role": "system", "content": "be brief"},
                                                               {"role": "user", "content": "name a colour"}],
                        "temperature": 0.7, "top_p": 0.9, "max_tokens": 50, "stop": ["\n\n"], "seed": 11,
                        "top_k": 20}
    assert got.authorization is None
    assert isinstance(result, Generation)
    assert result.text == "echo: name a colour (seed 11)"
    assert (result.num_tokens, result.prompt_tokens, result.finish_reason) == (6, 5, "stop")


def test_unset_params_are_not_sent_and_seed_requests_false_sends_no_seed(standin_server) -> None:
    # transformers serve answers 422 to fields it does not know: send only what the job set.
    outcome(make_plugin(standin_server.url, seed_requests=False), req())
    assert standin_server.requests[0].body == {"model": "standin-model",
                                               "messages": [{"role": "user", "content": "name a colour"}]}


def test_the_rows_messages_column_is_sent_in_place_of_system_and_prompt(standin_server) -> None:
    messages = [{"role": "system", "content": "you are terse", "name": None},
                {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                {"role": "user", "content": "a colour?"}]
    result = outcome(make_plugin(standin_server.url), req("ignored", system="ignored", messages=messages))
    assert standin_server.requests[0].body["messages"] == [{"role": "system", "content": "you are terse"},
                                                           *messages[1:]]
    assert result.text == "echo: a colour? (seed 7)"
    assert result.prompt_tokens == 7


@pytest.mark.parametrize("messages", ["not json", [], [{"content": "no role"}]])
def test_a_malformed_messages_column_is_a_row_error_and_sends_nothing(standin_server, messages) -> None:
    result = outcome(make_plugin(standin_server.url), req(messages=messages))
    assert isinstance(result, RowError) and "messages" in str(result)
    assert standin_server.received == 0


def test_completions_sends_the_prompt(standin_server) -> None:
    result = outcome(make_plugin(standin_server.url, endpoint="completions", max_tokens=3), req("one two three four"))
    [got] = standin_server.requests
    assert got.path == "/v1/completions"
    assert got.body == {"model": "standin-model", "prompt": "one two three four", "max_tokens": 3, "seed": 7}
    assert (result.text, result.num_tokens, result.prompt_tokens, result.finish_reason) == \
        ("echo: one two", 3, 4, "length")


def test_requests_share_one_loop_and_run_at_once(make_standin_server) -> None:
    server = make_standin_server(latency=0.3)
    plugin = make_plugin(server.url)

    async def many() -> list[Any]:
        return await asyncio.gather(*(plugin.generate(req(f"prompt {i}", seed=i)) for i in range(40)))

    results = run(plugin, many)
    assert [r.text for r in results] == [f"echo: prompt {i} (seed {i})" for i in range(40)]
    assert server.max_in_flight == 40


# -- servers ------------------------------------------------------------------------------

def test_a_list_of_servers_sends_each_request_to_the_one_with_fewest_in_flight(make_standin_server) -> None:
    slow, fast = make_standin_server(latency=1.0), make_standin_server()
    plugin = make_plugin([slow.url, fast.url])

    async def work() -> None:
        pending = asyncio.ensure_future(plugin.generate(req(seed=0)))  # both idle: the first server
        await asyncio.sleep(0.2)
        for seed in range(1, 5):  # the slow server still has one in flight: all go to the other
            await plugin.generate(req(seed=seed))
        await pending

    run(plugin, work)
    assert (slow.received, fast.received) == (1, 4)


def test_equal_servers_share_a_burst_evenly(make_standin_server) -> None:
    servers = [make_standin_server(latency=0.2) for _ in range(3)]
    plugin = make_plugin([s.url for s in servers])

    async def burst() -> list[Any]:
        return await asyncio.gather(*(plugin.generate(req(seed=i)) for i in range(12)))

    run(plugin, burst)
    assert [s.received for s in servers] == [4, 4, 4]


# -- faults -------------------------------------------------------------------------------

TRANSIENT = [429, 408, 500, 502, 503, 504, "drop", "disconnect", "malformed", "no_choices"]
PERMANENT = [400, 404, 422, 413]


@pytest.mark.parametrize("fault", TRANSIENT)
def test_a_fault_that_may_pass_raises_transient_error(standin_server, make_fault_proxy, fault) -> None:
    proxy = make_fault_proxy(standin_server.url, faults={1: fault}, retry_after=2)
    result = outcome(make_plugin(proxy.url), req())
    assert isinstance(result, TransientError), result
    assert result.rate_limited == (fault == 429)
    assert result.retry_after == (2.0 if fault == 429 else None)
    assert proxy.injected == {str(fault): 1} and standin_server.received == 0
    # and the next request, unfaulted, goes through
    assert outcome(make_plugin(proxy.url), req()).text == "echo: name a colour (seed 7)"


@pytest.mark.parametrize("fault", PERMANENT)
def test_a_client_error_is_a_row_error_with_the_servers_message(standin_server, make_fault_proxy, fault) -> None:
    proxy = make_fault_proxy(standin_server.url, faults={1: fault})
    result = outcome(make_plugin(proxy.url), req())
    assert type(result) is RowError
    assert str(result).startswith(f"{fault} from http://127.0.0.1:")
    assert f"injected {fault}" in str(result)


def test_a_404_hints_at_the_base_url(standin_server) -> None:
    result = outcome(make_plugin(standin_server.url.removesuffix("/v1")), req())
    assert isinstance(result, RowError) and "is base_url the server's /v1 URL?" in str(result)


def test_a_servers_error_message_is_read_and_cut() -> None:
    assert error_message(b'{"error": {"message": "bad temperature"}}') == "bad temperature"
    assert error_message(b'{"detail": "Unexpected fields"}') == "Unexpected fields"
    assert error_message(b"<html>gateway</html>") == "<html>gateway</html>"
    long = error_message(json.dumps({"error": {"message": "x" * 2000}}).encode())
    assert len(long) == 503 and long.endswith("...")


def test_a_refused_connection_is_transient(standin_server) -> None:
    url = standin_server.url
    standin_server.stop()
    result = outcome(make_plugin(url), req())
    assert isinstance(result, TransientError) and "ClientConnectorError" in str(result)


def test_retry_after_in_seconds_milliseconds_and_as_an_http_date() -> None:
    assert retry_after({"Retry-After": "3"}) == 3.0
    assert retry_after({"retry-after": "0.5"}) == 0.5
    assert retry_after({"retry-after-ms": "250", "Retry-After": "9"}) == 0.25
    in_a_minute = retry_after({"Retry-After": formatdate(timeout_s_from_now(60), usegmt=True)})
    assert in_a_minute is not None and 55 <= in_a_minute <= 61
    assert retry_after({"Retry-After": formatdate(timeout_s_from_now(-60), usegmt=True)}) == 0.0
    assert retry_after({}) is None


@pytest.mark.parametrize("headers", [{"Retry-After": "-1"}, {"Retry-After": "abc"}, {"Retry-After": "soon"},
                                     {"retry-after-ms": "-250"}, {"Retry-After": "inf"}])
def test_a_negative_or_unreadable_retry_after_is_ignored_and_said(headers: dict[str, str]) -> None:
    """Neither is read as "no wait asked" (0 s, or none at all): the engine's backoff must know the
    server sent something it ignored, to say so once and count it (issue 23)."""
    delay, said = backoff(0, RequestsSpec(backoff_s=0.5, max_backoff_s=30), retry_after(headers), random.Random(0))
    assert said == "ignored" and 0 <= delay <= 0.5


def timeout_s_from_now(seconds: float) -> float:
    import time

    return time.time() + seconds


def test_a_429_with_an_http_date_waits_until_then(standin_server, make_fault_proxy) -> None:
    proxy = make_fault_proxy(standin_server.url, faults={1: 429},
                             retry_after=formatdate(timeout_s_from_now(30), usegmt=True))
    result = outcome(make_plugin(proxy.url), req())
    assert isinstance(result, TransientError) and result.rate_limited and 25 <= result.retry_after <= 31


def test_a_hang_is_left_to_the_engines_timeout(standin_server, make_fault_proxy) -> None:
    """The plugin sets no request timeout of its own: it waits as long as the server takes,
    and the engine's timeout (``requests.timeout_s``) cancels it cleanly."""
    proxy = make_fault_proxy(standin_server.url, faults={1: "hang", 2: "hang"}, hang_s=1.5)
    plugin = make_plugin(proxy.url)

    async def work() -> tuple[Any, Any]:
        try:
            await asyncio.wait_for(plugin.generate(req()), timeout=0.3)
            cut: Any = None
        except TimeoutError as exc:
            cut = exc
        await asyncio.sleep(0.2)
        in_flight = proxy.in_flight  # the proxy saw the client go
        try:
            waited: Any = await asyncio.wait_for(plugin.generate(req()), timeout=5)
        except Exception as exc:
            waited = exc
        return cut, (in_flight, waited)

    cut, (in_flight, waited) = run(plugin, work)
    assert isinstance(cut, TimeoutError)
    assert in_flight == 0
    assert isinstance(waited, TransientError) and str(waited).startswith("504 ")  # after the 1.5 s hang
    assert plugin.servers[0].in_flight == 0


def test_a_seeded_rate_of_faults_is_the_same_on_every_run(standin_server, make_fault_proxy) -> None:
    def kinds(seed: int) -> list[str]:
        proxy = make_fault_proxy(standin_server.url, rate=0.5, seed=seed)
        plugin = make_plugin(proxy.url)

        async def work() -> list[str]:
            out = []
            for i in range(20):
                try:
                    await plugin.generate(req(seed=i))
                    out.append("ok")
                except TransientError as exc:
                    out.append(str(exc).split(" ")[0])
            return out

        return run(plugin, work)

    first = kinds(3)
    assert first == kinds(3) != kinds(4)
    assert 4 <= first.count("ok") <= 16


def test_the_concurrency_cap_answers_429_past_it(make_standin_server, make_fault_proxy) -> None:
    server = make_standin_server(latency=0.2)
    proxy = make_fault_proxy(server.url, max_in_flight=4)
    plugin = make_plugin(proxy.url)

    async def burst() -> list[Any]:
        return await asyncio.gather(*(plugin.generate(req(seed=i)) for i in range(10)), return_exceptions=True)

    results = run(plugin, burst)
    limited = [r for r in results if isinstance(r, TransientError)]
    assert len(limited) == 6 and all(r.rate_limited for r in limited)
    assert proxy.injected == {"cap": 6} and proxy.forwarded == 4 == server.received
    assert proxy.rejections_by_window(10.0) == [6]


# -- structured output ----------------------------------------------------------------------

def test_an_answer_meeting_the_schema_is_returned_with_its_raw_text(standin_server) -> None:
    result = outcome(make_plugin(standin_server.url, response_format=SCHEMA), req(seed=5))
    body = standin_server.requests[0].body
    assert body["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "response", "schema": SCHEMA, "strict": True}}
    assert json.loads(result.text) == {"answer": "echo: name a colour (seed 5)", "seed": 5}
    assert result.raw == result.text


def test_a_fenced_json_answer_is_unwrapped(make_standin_server) -> None:
    server = make_standin_server(answer=lambda path, body: '```json\n{"answer": "blue"}\n```')
    result = outcome(make_plugin(server.url, response_format=SCHEMA), req())
    assert result.text == '{"answer": "blue"}' and result.raw.startswith("```json")


def test_an_answer_missing_the_schema_is_asked_again_with_another_seed(make_standin_server) -> None:
    answers = iter(["not json at all", '{"colour": "blue"}', '{"answer": "blue"}'])
    server = make_standin_server(answer=lambda path, body: next(answers))
    result = outcome(make_plugin(server.url, response_format=SCHEMA, schema_retries=2), req(seed=9))
    assert json.loads(result.text) == {"answer": "blue"}
    seeds = [r.body["seed"] for r in server.requests]
    assert seeds == [9, retry_seed(9, 1), retry_seed(9, 2)] and len(set(seeds)) == 3


def test_an_answer_that_never_meets_the_schema_is_a_row_error_holding_the_raw_text(make_standin_server) -> None:
    server = make_standin_server(answer=lambda path, body: '{"colour": "blue"}')
    result = outcome(make_plugin(server.url, response_format=SCHEMA, schema_retries=2), req())
    assert type(result) is RowError
    assert server.received == 3
    assert "after 3 requests" in str(result) and "'answer' is a required property" in str(result)
    assert str(result).endswith('the answer: {"colour": "blue"}')
    assert result.raw == '{"colour": "blue"}'  # type: ignore[attr-defined]


def test_an_invalid_schema_fails_validation() -> None:
    with pytest.raises(ValidationError, match="not a valid JSON schema"):
        OpenAIParams(base_url="http://127.0.0.1:1/v1", response_format={"type": "objekt"})


@pytest.mark.parametrize("bad", [{"base_url": []}, {"base_url": "127.0.0.1:8000"}, {"base_url": ["ftp://x"]},
                                 {"base_url": "http://x/v1", "api_key_env": "sk-abc123-not-a-name!"}])
def test_bad_params_fail_validation(bad) -> None:
    with pytest.raises(ValidationError):
        OpenAIParams.model_validate(bad)


# -- the key --------------------------------------------------------------------------------

@pytest.fixture
def sentinel_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)
    return SENTINEL_KEY


def test_the_key_is_sent_as_a_bearer_token_and_is_never_in_params(standin_server, sentinel_key) -> None:
    plugin = make_plugin(standin_server.url, api_key_env=KEY_ENV)
    assert isinstance(outcome(plugin, req()), Generation)
    assert standin_server.requests[0].authorization == f"Bearer {sentinel_key}"
    assert sentinel_key not in plugin.params.model_dump_json()
    assert OpenAIGenerator.secret_env(plugin.params) == [KEY_ENV]
    assert OpenAIGenerator.secret_env(OpenAIParams(base_url="http://x/v1")) == []
    assert set(OpenAIGenerator.unhashed_params) == {"base_url", "api_key_env"}


def test_a_rotated_key_is_read_at_each_call(standin_server, sentinel_key, monkeypatch) -> None:
    plugin = make_plugin(standin_server.url, api_key_env=KEY_ENV)

    async def work() -> None:
        await plugin.generate(req())
        monkeypatch.setenv(KEY_ENV, "sk-rotated")
        await plugin.generate(req())

    run(plugin, work)
    assert [r.authorization for r in standin_server.requests] == [f"Bearer {sentinel_key}", "Bearer sk-rotated"]


@pytest.mark.parametrize("fault", [*TRANSIENT, *PERMANENT, 401, 403, "echo_auth"])
def test_the_key_is_in_no_error_message_or_traceback(standin_server, make_fault_proxy, sentinel_key, fault) -> None:
    proxy = make_fault_proxy(standin_server.url, faults={1: fault})
    result = outcome(make_plugin(proxy.url, api_key_env=KEY_ENV), req())
    assert isinstance(result, (TransientError, RowError))
    text = "".join(traceback.format_exception(result)) + repr(result) + repr(vars(result))
    assert sentinel_key not in text


@pytest.mark.parametrize("fault", [401, 403, "echo_auth"])
def test_a_refused_key_names_its_variable(standin_server, make_fault_proxy, sentinel_key, fault) -> None:
    proxy = make_fault_proxy(standin_server.url, faults={1: fault})
    result = outcome(make_plugin(proxy.url, api_key_env=KEY_ENV), req())
    assert type(result) is RowError
    assert f"the key in ${KEY_ENV} was refused" in str(result)
    if fault == "echo_auth":
        assert "Incorrect API key provided: Bearer ***" in str(result)


def test_a_missing_key_variable_stops_the_plugin_at_construction(standin_server, monkeypatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=f"{KEY_ENV} is not set"):
        make_plugin(standin_server.url, api_key_env=KEY_ENV)


def test_no_model_name_stops_the_plugin_at_construction(standin_server) -> None:
    with pytest.raises(ValueError, match="needs `model:`"):
        OpenAIGenerator(None, OpenAIParams(base_url=standin_server.url))


def test_it_is_registered_as_openai() -> None:
    from genflow.registry import get_registry

    info = get_registry().get("generator", "openai")
    assert info.factory is OpenAIGenerator


# -- a real server: transformers serve ------------------------------------------------------

def test_chat_and_completions_against_transformers_serve(transformers_server) -> None:
    before = transformers_server.requests()
    chat = make_plugin(transformers_server.url, model=transformers_server.model, max_tokens=6, temperature=0.8)
    text = make_plugin(transformers_server.url, model=transformers_server.model, endpoint="completions",
                       max_tokens=6, temperature=0.8)
    results = [outcome(chat, req("the cat", system="answer")), outcome(text, req("the cat")),
               outcome(text, req("the cat"))]
    for result in results:
        assert isinstance(result, Generation), result
        assert isinstance(result.text, str)
        assert 1 <= result.num_tokens <= 6 and result.prompt_tokens >= 2
        assert result.finish_reason in ("stop", "length")
    assert results[1].text == results[2].text  # the same seed, the same answer
    assert transformers_server.requests() - before == 3
    assert transformers_server.requests("/v1/chat/completions") >= 1


def test_transformers_serve_refuses_another_model_name_permanently(transformers_server) -> None:
    result = outcome(make_plugin(transformers_server.url, model="not-the-served-model"), req())
    assert type(result) is RowError and str(result).startswith("400 ") and "pinned" in str(result)


def test_the_fault_proxy_in_front_of_transformers_serve(transformers_server, make_fault_proxy) -> None:
    proxy = make_fault_proxy(transformers_server.url, faults={1: 429, 2: "drop"})
    plugin = make_plugin(proxy.url, model=transformers_server.model, endpoint="completions", max_tokens=4)
    before = transformers_server.requests()
    results = [outcome(plugin, req("the cat")) for _ in range(3)]
    assert [type(r) for r in results] == [TransientError, TransientError, Generation]
    assert proxy.stats() == {"received": 3, "forwarded": 1, "injected": {"429": 1, "drop": 1},
                             "max_in_flight_seen": 1}
    assert transformers_server.requests() - before == 1

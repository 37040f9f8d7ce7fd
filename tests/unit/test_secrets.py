"""Secrets: no key, URL password or secret-named value a job holds reaches an output, a log, the
terminal or Prefect, whatever a server sends back (issue 23). Fast tests of each rule first, then
one job against a server that echoes every secret it is sent in every way it can."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from aiohttp import web
from support.jobs import ROOT
from support.servers import BackgroundServer

from genflow.api import Generation, Score
from genflow.config import (
    ConfigError,
    GeneratorSpec,
    JobConfig,
    ScorerSpec,
    build_config,
    hides_secrets,
    job_secrets,
    redact_url,
    redacted,
)
from genflow.data import layout
from genflow.data.layout import Shard
from genflow.data.results import Failure, scrub_result
from genflow.data.storage import Storage
from genflow.registry import get_registry
from genflow.secrets import (
    MASK,
    Scrubber,
    Secret,
    data_secrets,
    install,
    scrub_record,
    url_secrets,
)

SENTINEL = "sk-proj-5b2e8d71c4aa90f3e6"
HEAD = 16
"""What identifies the key: its vendor prefix ``sk-proj-`` and 8 characters more."""
PASSWORD = "pw-sentinel-93af0c1e"
EXTRA = "xb-sentinel-4f6a1d0e77"
BASIC = base64.b64encode(f"genflow:{PASSWORD}".encode()).decode()
NEEDLES = (SENTINEL, PASSWORD, EXTRA, BASIC, SENTINEL[:HEAD] + "X")  # the last: a short prefix stays readable


def _leaks(text: str) -> list[str]:
    return [n for n in (SENTINEL, PASSWORD, EXTRA, BASIC) if n in text]


def _contents(root: Path) -> str:
    """Every file under ``root`` as text: Parquet parts decompressed to their rows, other files as bytes."""
    import pyarrow.parquet as pq

    texts = []
    for path in sorted(root.rglob("*")):
        if path.is_file():
            texts.append(json.dumps(pq.read_table(path).to_pylist(), default=str) if path.suffix == ".parquet"
                         else path.read_bytes().decode(errors="replace"))
    return "\n".join(texts)


# -- the scrubber -------------------------------------------------------------------------------

def test_a_secret_is_blanked_whole_from_what_identifies_it_and_as_a_server_spells_it() -> None:
    scrubber = Scrubber([Secret(SENTINEL, "$KEY"), Secret("p@ss/word-1", "base_url's password"),
                         Secret("admin", "too short")])
    text = (f"key {SENTINEL}; cut {SENTINEL[:HEAD + 4]}...; bare {SENTINEL[:HEAD]}; one short {SENTINEL[:HEAD - 1]}; "
            f"encoded p%40ss%2Fword-1; plain p@ss/word-1; admin")
    clean = scrubber.scrub(text)
    assert SENTINEL[:HEAD] not in clean and "p%40ss" not in clean and "p@ss" not in clean
    assert clean == (f"key {MASK}; cut {MASK}...; bare {MASK}; one short {SENTINEL[:HEAD - 1]}; encoded {MASK}; "
                     f"plain {MASK}; admin")
    assert scrubber.find(text) == Secret(SENTINEL, "$KEY")
    assert scrubber.scrub("nothing here") == "nothing here" and scrubber.find("nothing here") is None
    mention = Generation(text="OpenAI project keys look like sk-proj-... and sk-proj-XXXX")
    assert scrub_result(mention, scrubber) == mention, "a key's vendor prefix alone identifies no key"
    userinfo = Scrubber([Secret(f"genflow:{PASSWORD}", "base_url's user:password")])
    assert userinfo.scrub("genflow: the tool; genflow:pw-sentinel-9") == "genflow: the tool; genflow:pw-sentinel-9"
    assert userinfo.scrub(f"genflow:{PASSWORD}!") == MASK + "!"
    assert scrubber.scrub_data({"a": [SENTINEL], "b": 1}) == {"a": [MASK], "b": 1}


def test_a_job_holds_its_env_keys_url_passwords_and_secret_named_params_extra_body_included(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENFLOW_TEST_API_KEY", SENTINEL)
    config = JobConfig.model_validate({
        "name": "s", "input": "in.parquet", "output": "out",
        "generators": [{"label": "a", "plugin": "openai", "model": "m",
                        "params": {"base_url": "http://127.0.0.1:1/v1", "api_key_env": "GENFLOW_TEST_API_KEY",
                                   "extra_body": {"api_key": EXTRA}}},
                       {"label": "b", "plugin": "openai", "model": "m",
                        "params": {"base_url": f"http://genflow:{PASSWORD}@127.0.0.1:1/v1"}}]})
    scrubber = job_secrets(config)
    echoed = f"{SENTINEL} {EXTRA} {PASSWORD} Basic {BASIC} genflow:{PASSWORD}"
    assert not _leaks(scrubber.scrub(echoed))
    places = {s.where for s in scrubber.secrets.values()}
    assert {"$GENFLOW_TEST_API_KEY", "generators.0.params.extra_body.api_key",
            "generators.1.params.base_url's password"} <= places
    assert data_secrets({"token": 12345678}) == [Secret("12345678", "token")]
    headers = {"headers": {"Authorization": f"Bearer {SENTINEL}", "X-Api-Key": EXTRA, "Accept": "text/plain"},
               "max_new_tokens": 8, "author": "me"}
    assert redacted(headers) == {"headers": {"Authorization": "***", "X-Api-Key": "***", "Accept": "text/plain"},
                                 "max_new_tokens": 8, "author": "me"}
    assert {s.value for s in data_secrets(headers)} == {f"Bearer {SENTINEL}", EXTRA}
    assert [s.value for s in url_secrets("see http://u:p%40ssword@h/v1", "x")][:2] == ["p%40ssword", "p@ssword"]


# -- rows ---------------------------------------------------------------------------------------

def test_a_candidate_that_echoes_a_secret_becomes_a_failure_and_other_texts_are_blanked() -> None:
    scrubber = Scrubber([Secret(SENTINEL, "$GENFLOW_TEST_API_KEY")])
    fine = Generation(text="a fine answer")
    assert scrub_result(fine, scrubber) is fine
    echoed = scrub_result(Generation(text=f"your key is {SENTINEL}", num_tokens=4, prompt_tokens=9), scrubber)
    assert isinstance(echoed, Failure) and "$GENFLOW_TEST_API_KEY" in echoed.error and SENTINEL not in echoed.error
    if hasattr(echoed, "prompt_tokens"):  # a failure that carries what it cost
        assert (echoed.prompt_tokens, echoed.completion_tokens) == (9, 4)
    raw = scrub_result(Generation(text='{"a": 1}', raw=f"```{SENTINEL}```"), scrubber)
    assert isinstance(raw, Failure)
    failure = scrub_result(Failure(f"401: Incorrect API key provided: {SENTINEL[:HEAD + 2]}***", f"tb {SENTINEL}"),
                           scrubber)
    assert SENTINEL[:HEAD] not in failure.error + failure.traceback and "401" in failure.error
    score = scrub_result(Score(7.0, {"reasoning": f"the key {SENTINEL} is fine", "aspects": {"x": 1}}), scrubber)
    assert score.value == 7.0 and score.details == {"reasoning": f"the key {MASK} is fine", "aspects": {"x": 1}}


def _model_stage(kind: str, spec: GeneratorSpec | ScorerSpec) -> Any:
    from genflow.stages.common import ModelStage

    stage = layout.generate_stage(spec.label) if isinstance(spec, GeneratorSpec) else layout.score_stage(spec.name)
    return ModelStage(stage, spec, get_registry().get(kind, spec.plugin))


def test_generations_scores_errors_and_the_journal_hold_no_secret(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows a generate and a score stage write, and the request journal, from answers echoing every secret."""
    from genflow.stages.common import JobContext, Journals
    from genflow.stages.generate import generate_work
    from genflow.stages.score import score_work

    monkeypatch.setenv("GENFLOW_TEST_API_KEY", SENTINEL)
    config = JobConfig.model_validate({
        "name": "s", "input": str(tmp_path / "in.parquet"), "output": str(tmp_path / "out"),
        "generators": [{"label": "a", "plugin": "openai", "model": "m", "samples": 4,
                        "params": {"base_url": f"http://genflow:{PASSWORD}@127.0.0.1:1/v1",
                                   "extra_body": {"api_key": EXTRA}}},
                       {"label": "b", "plugin": "openai", "model": "m",
                        "params": {"base_url": "http://127.0.0.1:1/v1", "api_key_env": "GENFLOW_TEST_API_KEY"}}],
        "scorers": [{"plugin": "llm-judge", "params": {"base_url": "http://127.0.0.1:1/v1",
                                                       "api_key_env": "GENFLOW_TEST_API_KEY"}}]})
    install(job_secrets(config))
    storage = Storage.open(str(tmp_path / "out"))
    storage.makedirs()
    storage.write_table(layout.PROMPTS_STAGE.part(0), pa.table({
        "prompt_id": ["p0"], "prompt": ["say hello"], "task": pa.array([None], pa.string()),
        "system": pa.array([None], pa.string())}))
    job = JobContext(config, storage, str(tmp_path))
    shard = Shard(0, "fp", 1)
    stage = _model_stage("generator", config.generators[0])
    work = generate_work(job, stage, shard, "fp")
    answers = [Generation(text="hello there", num_tokens=2), Generation(text=f"hello {EXTRA} and {PASSWORD}"),
               Failure(f"400 from server: echo Basic {BASIC}", ""), Generation(text=f"hi {SENTINEL[:HEAD + 1]}")]
    journals = Journals()
    assert work.journal is not None  # a request stage's
    journals.of.update((r.generation_id, work.journal) for r in work.items)
    for request, answer in zip(work.items, answers, strict=True):
        journals.add(request.generation_id, answer, 0.1)
    journals.flush()
    journal = _contents(tmp_path / "out" / "_journal")
    assert "echo Basic ***" in journal and not _leaks(journal) and SENTINEL[:HEAD] not in journal

    outcome = work.finish([(r, a, 0.1) for r, a in zip(work.items, answers, strict=True)])
    assert outcome.rows == {layout.GENERATIONS: 1} and outcome.errors == 3
    gens = storage.read_table(stage.stage.part(0)).to_pylist()
    assert [g["text"] for g in gens] == ["hello there"]
    assert json.loads(gens[0]["params"]) == {"base_url": "http://***@127.0.0.1:1/v1", "extra_body": {"api_key": "***"}}
    errors = storage.read_table(stage.stage.errors_part(0)).to_pylist()
    assert sum("held a secret of this job" in e["error"] for e in errors) == 2

    scorer = _model_stage("scorer", config.scorers[0])
    scoring = score_work(job, scorer, shard, "fp")
    scoring.finish([(scoring.items[0], Score(2.0, {"raw": f"Rating: 2, your key {SENTINEL}"}), 0.1)])
    details = storage.read_table(scorer.stage.part(0)).to_pylist()[0]["details"]
    assert json.loads(details) == {"raw": f"Rating: 2, your key {MASK}"}
    written = _contents(tmp_path / "out")
    assert "Rating: 2" in written and not _leaks(written) and SENTINEL[:HEAD] not in written


# -- logs, the terminal -------------------------------------------------------------------------

def test_log_records_are_scrubbed_before_any_handler_sees_them() -> None:
    install(Scrubber([Secret(SENTINEL, "$GENFLOW_TEST_API_KEY")]))
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    logger = logging.getLogger("prefect.task_runs.secrets-test")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("the server said %s", f"key {SENTINEL}")
        try:
            raise RuntimeError(f"401: {SENTINEL}")
        except RuntimeError:
            logger.exception("request failed")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "the server said key ***" in text and "RuntimeError: 401: ***" in text and SENTINEL[:HEAD] not in text


@pytest.mark.parametrize("where", ["request worker", "model worker"])
def test_a_ray_workers_log_lines_are_scrubbed_of_its_plugins_secrets(where: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker process logs through its own loggers (a server's Retry-After, a plugin's lines):
    the worker installs its plugin's secrets when it loads it."""
    from genflow.engine.requesting import RequestWorker
    from genflow.engine.worker import PluginWorker

    key = f"sk-worker-{where.split()[0]}-0d9c2b7a"
    monkeypatch.setenv("GENFLOW_TEST_WORKER_KEY", key)
    factory = get_registry().get("generator", "openai").factory
    params = {"base_url": "http://127.0.0.1:1/v1", "api_key_env": "GENFLOW_TEST_WORKER_KEY"}
    if where == "request worker":
        RequestWorker(factory, "m", params, {})
    else:
        PluginWorker(factory, "m", params)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("genflow.engine.requesting")
    logger.addHandler(handler)
    try:
        logger.warning("the server asked to wait %r s", f"5 ({key})")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == "the server asked to wait '5 (***)' s\n"


def test_the_terminals_error_line_is_scrubbed(capsys: pytest.CaptureFixture[str]) -> None:
    import typer

    from genflow.cli import fail

    install(Scrubber([Secret(SENTINEL, "$GENFLOW_TEST_API_KEY")]))
    with pytest.raises(typer.Exit):
        fail(f"the plugin failed to load: the server said {SENTINEL}")
    assert "the server said ***" in capsys.readouterr().err


def test_a_record_made_before_any_secret_is_known_is_left_alone() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "plain %s", ("text",), None)
    scrub_record(record, Scrubber())
    assert record.getMessage() == "plain text" and record.args == ("text",)


# -- validation ---------------------------------------------------------------------------------

def test_a_urls_query_value_under_a_secrets_name_is_a_secret_and_hidden() -> None:
    """``?api_key=...`` in a base_url is a credential in a URL like ``user:password@`` (issue 23):
    hidden in the config shown (``generations/params``, the manifest, error lines) and scrubbed
    from what a server echoes."""
    url = f"http://127.0.0.1:9/v1?api_key={EXTRA}&mode=fast"
    shown = redacted({"base_url": url})
    assert shown == {"base_url": "http://127.0.0.1:9/v1?api_key=***&mode=fast"} and hides_secrets(shown)
    assert redact_url(f"404 from {url}: not found") == "404 from http://127.0.0.1:9/v1?api_key=***&mode=fast: not found"
    scrubber = Scrubber(data_secrets({"params": {"base_url": url}}))
    assert scrubber.scrub(f"you sent {EXTRA}") == f"you sent {MASK}"
    assert redact_url("http://h/v1?max_tokens=5&page=2") == "http://h/v1?max_tokens=5&page=2"


def test_a_url_with_credentials_beside_api_key_env_is_refused_at_validation() -> None:
    data: dict[str, Any] = {"name": "s", "input": "in.parquet", "output": "out",
            "generators": [{"label": "a", "plugin": "openai", "model": "m",
                            "params": {"base_url": ["http://127.0.0.1:1/v1", f"http://genflow:{PASSWORD}@h:1/v1"],
                                       "api_key_env": "GENFLOW_TEST_API_KEY"}}]}
    with pytest.raises(ConfigError) as refused:
        build_config(data, source="job.yaml")
    message = str(refused.value)
    assert "generators.0.params: base_url.1 holds credentials" in message and "$GENFLOW_TEST_API_KEY" in message
    assert PASSWORD not in message
    data["generators"][0]["params"]["base_url"] = f"http://genflow:{PASSWORD}@h:1/v1"
    del data["generators"][0]["params"]["api_key_env"]
    assert build_config(data).generators[0].params["base_url"].endswith("@h:1/v1")  # alone, the URL's fine


# -- the OpenAI client --------------------------------------------------------------------------

def _post(url: str, key_env: str | None = None) -> Exception | dict[str, Any]:
    from genflow.plugins.shared.openai_client import OpenAIClient

    client = OpenAIClient(url, key_env, "/chat/completions")

    async def go() -> Exception | dict[str, Any]:
        try:
            return await client.post({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        except Exception as exc:
            return exc
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_error_messages_name_the_server_without_its_url_password(make_standin_server, make_fault_proxy) -> None:
    proxy = make_fault_proxy(make_standin_server().url, faults={1: 400, 2: "echo_auth"})
    url = proxy.url.replace("http://", f"http://genflow:{PASSWORD}@")
    bad_request, echoed = _post(url), _post(url)
    host = proxy.url.removeprefix("http://").removesuffix("/v1")
    assert f"400 from http://{host}/v1" in str(bad_request) and not _leaks(str(bad_request))
    assert f"401 from http://{host}/v1" in str(echoed) and "Basic ***" in str(echoed)
    assert not _leaks(str(echoed)) and "genflow:" not in str(echoed)


def test_a_redirect_to_another_host_is_not_followed(make_standin_server, monkeypatch: pytest.MonkeyPatch) -> None:
    """The key goes to base_url only: a server that redirects elsewhere gets a row error, the other host nothing."""
    monkeypatch.setenv("GENFLOW_TEST_API_KEY", SENTINEL)
    elsewhere = make_standin_server()

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(f"{elsewhere.url}/chat/completions")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", redirect)
    mover = BackgroundServer(app).start()
    try:
        answer = _post(f"{mover.origin}/v1", "GENFLOW_TEST_API_KEY")
    finally:
        mover.stop()
    assert elsewhere.received == 0
    assert "307" in str(answer) and "redirects to http://127.0.0.1:" in str(answer) and SENTINEL not in str(answer)


# -- Prefect's and the report's views -----------------------------------------------------------

def test_a_sweep_runs_row_hides_secret_values_by_their_last_key() -> None:
    from genflow.outputs.artifacts import sweep_row

    row = sweep_row("run-1", {"generators.0.params.api_key": SENTINEL,
                              "generators.0.params.extra_body": {"password": EXTRA},
                              "generators.0.params.base_url": f"http://genflow:{PASSWORD}@h:1/v1",
                              "generators.0.params.temperature": 0.5}, {"status": "done"}, None)
    assert not _leaks(json.dumps(row)) and "temperature=0.5" in row["values"]
    assert 'generators.0.params.api_key="***"' in row["values"]


def test_the_manifest_redacts_the_config_and_scrubs_what_plugins_report(tmp_path: Path) -> None:
    from genflow.outputs.manifest import build_manifest

    install(Scrubber([Secret(SENTINEL, "$GENFLOW_TEST_API_KEY")]))
    config = JobConfig.model_validate({
        "name": "s", "input": "in.parquet", "output": str(tmp_path),
        "generators": [{"label": "a", "plugin": "openai", "model": "m",
                        "params": {"base_url": f"http://genflow:{PASSWORD}@h:1/v1",
                                   "extra_body": {"api_key": EXTRA}}}]})
    manifest = build_manifest(config, Storage.open(str(tmp_path)), [], {"a": {"describe": f"served with {SENTINEL}"}},
                              {}, {}, "done", rows={})
    text = json.dumps(manifest)
    assert not _leaks(text)
    assert manifest["config"]["generators"][0]["params"] == {"base_url": "http://***@h:1/v1",
                                                             "extra_body": {"api_key": "***"}}


def test_the_failure_event_prefect_records_quotes_no_secret() -> None:
    from genflow.outputs.events import failure_payload

    install(Scrubber([Secret(SENTINEL, "$GENFLOW_TEST_API_KEY")]))
    payload = failure_payload("s", RuntimeError(f"the plugin failed to load: the server said {SENTINEL}"))
    assert payload["message"] == "the plugin failed to load: the server said ***"


# -- Label Studio -------------------------------------------------------------------------------

def test_label_studio_error_bodies_reach_the_terminal_without_its_token(tmp_path: Path) -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"detail": f"bad token: {request.headers.get('Authorization')}"}, status=401)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    tool = BackgroundServer(app).start()
    storage = tmp_path / "out"
    storage.mkdir()
    (storage / "manifest.json").write_text(json.dumps({"name": "s"}))
    try:
        env = {**os.environ, "LABEL_STUDIO_TEST_TOKEN": SENTINEL}
        done = subprocess.run([sys.executable, "-m", "genflow.cli", "label", "pull", str(storage), "--url",
                               tool.origin, "--api-key-env", "LABEL_STUDIO_TEST_TOKEN", "--project", "p"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    finally:
        tool.stop()
    assert done.returncode == 1 and "HTTP 401" in done.stderr, done.stderr
    assert "bad token: Token ***" in " ".join(done.stderr.split()) and SENTINEL[:HEAD] not in done.stdout + done.stderr


# -- one job against servers that echo every secret back ----------------------------------------

def _echo_server() -> tuple[BackgroundServer, Counter[str]]:
    """An OpenAI-protocol server that sends back what authenticated the request (the bearer key, or
    the basic auth and the user:password it decodes to) and a secret-named body value: in answers
    (by the request's seed: echoed, a 400, a 500 or a plain answer), in every answer that was to
    meet a JSON schema, and in every judgement (``/judge/v1``)."""
    from benchmarks.standin_server import completion

    seen: Counter[str] = Counter()

    async def complete(request: web.Request) -> web.Response:
        body = await request.json()
        auth = request.headers.get("Authorization", "")
        seen[auth] += 1
        echo = auth + (f" = {base64.b64decode(auth[6:]).decode()}" if auth.startswith("Basic ") else "")
        echo += f" and {body['api_key']}" if body.get("api_key") else ""
        if request.path.startswith("/judge/"):
            return web.json_response(completion(request.path, body, f"It was sent {echo}.\nRating: 7"))
        if body.get("response_format"):
            return web.json_response(completion(request.path, body, f"not JSON: {echo}"))
        kind = body["seed"] % 4
        if kind in (1, 2):
            status = 400 if kind == 1 else 500
            return web.json_response({"error": {"message": f"refused {echo}"}}, status=status)
        return web.json_response(completion(request.path, body, f"echo: {echo}" if kind == 0 else "a fine answer"))

    app = web.Application()
    app.router.add_post("/v1/chat/completions", complete)
    app.router.add_post("/judge/v1/chat/completions", complete)
    return BackgroundServer(app).start(), seen


@pytest.mark.slow
def test_a_job_whose_servers_echo_every_secret_writes_logs_and_records_none(tmp_path: Path) -> None:
    server, seen = _echo_server()
    origin = server.origin
    requests = {"max_retries": 0, "timeout_s": 10.0, "backoff_s": 0.01}
    keyed = {"base_url": f"{origin}/v1", "api_key_env": "GENFLOW_TEST_API_KEY", "max_tokens": 64}
    config: dict[str, Any] = {
        "name": "secrets", "input": str(ROOT / "configs/data/quickstart_prompts.parquet"),
        "output": str(tmp_path / "out"), "shard_rows": 8, "max_error_fraction": 1.0,
        "generators": [
            {"label": "keyed", "plugin": "openai", "model": "m", "samples": 2, "requests": requests,
             "params": {**keyed, "extra_body": {"api_key": EXTRA}}},
            {"label": "basic", "plugin": "openai", "model": "m", "samples": 2, "requests": requests,
             "params": {"base_url": origin.replace("http://", f"http://genflow:{PASSWORD}@") + "/v1",
                        "max_tokens": 64}},
            {"label": "schema", "plugin": "openai", "model": "m", "requests": requests,
             "params": {**keyed, "schema_retries": 1, "response_format": {
                 "type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}}}],
        "scorers": [{"plugin": "llm-judge", "model": "judge", "requests": requests,
                     "params": {"base_url": f"{origin}/judge/v1", "api_key_env": "GENFLOW_TEST_API_KEY",
                                "max_parse_retries": 0}}],
        "ray": {"workers": 1},
    }
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(config))
    home = tmp_path / "prefect-home"
    env = {**os.environ, "GENFLOW_TEST_API_KEY": SENTINEL, "PREFECT_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("PREFECT_API_URL", None)
    started = os.path.getmtime(path)
    try:
        done = subprocess.run([sys.executable, "-m", "genflow.cli", "-v", "run", str(path)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=900)
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    assert seen[f"Bearer {SENTINEL}"] and seen[f"Basic {BASIC}"], "the key and the URL's user:password were sent"

    out = Path(config["output"])
    rows = {f: ds.dataset(str(out / f)).to_table().to_pylist() for f in ("generations", "errors", "scores")}
    assert rows["generations"] and {g["text"] for g in rows["generations"]} == {"a fine answer"}
    errors = " | ".join(e["error"] for e in rows["errors"])
    for kind in ("held a secret of this job ($GENFLOW_TEST_API_KEY)", "held a secret of this job (generators.1",
                 "400 from", "500 from", "does not meet response_format"):
        assert kind in errors, kind
    assert "refused Bearer ***" in errors and "Basic *** = ***" in errors
    assert rows["scores"] and all(s["score"] == 7.0 for s in rows["scores"])
    assert any("It was sent Bearer ***" in s["details"] for s in rows["scores"])

    terminal = done.stdout + done.stderr
    written = _contents(out)
    prefect = "\n".join(p.read_bytes().decode(errors="replace") for p in home.rglob("*") if p.is_file())
    assert list(home.rglob("*.db")), "the Prefect database was searched"
    ray_logs = "\n".join(p.read_bytes().decode(errors="replace") for p in Path("/tmp/ray").rglob("*")
                         if p.is_file() and not p.is_symlink() and p.stat().st_mtime >= started) \
        if Path("/tmp/ray").exists() else ""
    for where, text in (("terminal", terminal), ("output", written), ("Prefect", prefect), ("Ray's logs", ray_logs)):
        assert not _leaks(text), (where, _leaks(text))
        assert SENTINEL[:HEAD] not in text and "genflow:" + PASSWORD[:8] not in text, where

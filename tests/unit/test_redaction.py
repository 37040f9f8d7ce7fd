"""Redaction, rule by rule: which secrets a job holds and where, how much of a text is blanked,
and what a sweep's row and a config error show (fast). ``test_secrets.py`` follows the
secrets through a job; these pin the edges it does not reach: a secret's spellings, the
prefix that identifies it, two secrets that start alike, the places a message names."""

from __future__ import annotations

import datetime
import io
import json
import logging
import math
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from genflow.api import Generation, PluginParams, Score
from genflow.config import ConfigError, JobConfig, build_config, job_secrets, redacted
from genflow.data.results import Failure, scrub_result
from genflow.outputs.artifacts import sweep_row
from genflow.registry import PluginError
from genflow.secrets import (
    MASK,
    Scrubber,
    Secret,
    data_secrets,
    install,
    plugin_secrets,
    scrub_record,
    url_secrets,
)

KEY = "sk-redact-7d41c09ab2e6f5"
"""Installed by no other test: scrub_result must use the scrubber it is given."""


def _where(scrubber: Scrubber, text: str) -> str:
    found = scrubber.find(text)
    assert found is not None, text
    return found.where


# -- what is blanked ----------------------------------------------------------------------------

def test_a_short_key_is_blanked_from_eight_characters_past_its_vendor_prefix_not_before() -> None:
    short = Scrubber([Secret("sk-proj-abcdefgh12", "$K")])
    mention = "keys look like sk-proj-... and sk-proj-abcdefg"
    assert short.scrub(mention) == mention
    assert short.scrub("cut at sk-proj-abcdefgh.") == f"cut at {MASK}."
    one_letter = Scrubber([Secret("x-abcdefgh12", "$K")])  # a one-letter vendor word is a prefix too
    assert one_letter.scrub("x-abcdefg x-abcdefgh") == f"x-abcdefg {MASK}"


def test_a_six_character_secret_is_searched_for_and_a_five_character_one_is_not() -> None:
    scrubber = Scrubber([Secret("abc123", "password"), Secret("admin", "user")])
    assert scrubber.scrub("login admin abc123") == f"login admin {MASK}"


def test_a_secret_escaped_in_a_json_string_is_blanked_whole() -> None:
    secret = 'pa"ss\\word-1'
    text = json.dumps({"error": f"bad credentials {secret}"})
    assert Scrubber([Secret(secret, "password")]).scrub(text) == json.dumps({"error": f"bad credentials {MASK}"})


def test_of_two_secrets_that_start_alike_the_one_the_text_holds_is_blanked_whole() -> None:
    one, two = "sk-proj-abcdefgh-ONE-1111", "sk-proj-abcdefgh-TWO-2222"  # the same identifying prefix
    scrubber = Scrubber([Secret(one, "$ONE"), Secret(two, "$TWO")])
    assert scrubber.scrub(f"a {one} b {two} c") == f"a {MASK} b {MASK} c"
    assert scrubber.find(f"echo {two}") == Secret(two, "$TWO")
    assert scrubber.find(f"echo {one}") == Secret(one, "$ONE")


def test_a_secret_that_extends_a_shorter_one_is_blanked_whole() -> None:
    scrubber = Scrubber([Secret("abcdefgh", "password"), Secret("abcdefghij-long-key", "$KEY")])
    assert scrubber.scrub("abcdefghij-long-key!") == f"{MASK}!"
    assert scrubber.find("abcdefghij-long-key") == Secret("abcdefghij-long-key", "$KEY")


def test_data_with_a_non_ascii_secret_is_scrubbed() -> None:
    scrubber = Scrubber([Secret("pässwörd-9", "password")])
    assert scrubber.scrub_data({"reason": "the pässwörd-9 was wrong", "n": 1}) == {"reason": f"the {MASK} was wrong",
                                                                                  "n": 1}


# -- where a job holds secrets ------------------------------------------------------------------

def test_a_urls_password_user_info_and_basic_header_are_each_named_by_the_url() -> None:
    found = url_secrets("http://bob:pw:with-colon@h/v1", "base_url")
    assert Secret("pw:with-colon", "base_url's password") in found
    scrubber = Scrubber(found)
    assert scrubber.scrub("echo pw:with-colon") == f"echo {MASK}"
    assert _where(scrubber, "bob:pw:with-colon") == "base_url's user-info"
    assert _where(scrubber, "Basic Ym9iOnB3OndpdGgtY29sb24=") == "base_url's user-info"


def test_every_value_under_a_secret_named_key_is_a_secret_nested_or_listed() -> None:
    found = data_secrets({"credentials": {"client": "client-id-1", "inner": {"secret": "deep-secret-2"}},
                          "token": ["tok-aaaaaaaa", "tok-bbbbbbbb"], "auth": True, "api_key": None})
    assert [(s.value, s.where) for s in found] == [("client-id-1", "credentials"), ("deep-secret-2", "credentials"),
                                                   ("tok-aaaaaaaa", "token"), ("tok-bbbbbbbb", "token")]


def test_credentials_in_a_sweeps_urls_are_the_jobs_secrets() -> None:
    config = JobConfig.model_validate({
        "name": "s", "input": "in.parquet", "output": "out",
        "generators": [{"label": "a", "plugin": "openai", "model": "m", "params": {"base_url": "http://h/v1"}}],
        "sweep": {"generators.0.params.base_url": ["http://u:first-pass-1@h/v1", "http://u:second-pass-2@h/v1"]},
        "storage": {"endpoint_url": "http://minio:storage-pass-3@s3.local"}})
    scrubber = job_secrets(config, environ={})
    assert _where(scrubber, "first-pass-1") == "sweep.generators.0.params.base_url.0's password"
    assert _where(scrubber, "second-pass-2") == "sweep.generators.0.params.base_url.1's password"
    assert _where(scrubber, "storage-pass-3") == "storage.endpoint_url's password"


class _Params(PluginParams):
    api_key_env: str = "REDACT_KEY"
    api_key: str | None = None
    backend: str = "local"


class _Plugin:
    Params: ClassVar[type[PluginParams]] = _Params
    reads: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def implementation(cls, params: dict[str, Any]) -> type[_Plugin]:
        return cls

    @classmethod
    def secret_env(cls, params: PluginParams) -> list[str]:
        return [f"{params.api_key_env}{suffix}" for suffix in cls.reads]  # type: ignore[attr-defined]


class _Served(_Plugin):
    reads = ("_SERVED",)


class _TwoBackends(_Plugin):
    """A plugin whose served backend reads a key and whose local one reads none."""

    @classmethod
    def implementation(cls, params: dict[str, Any]) -> type[_Plugin]:
        return _Served if params.get("backend") == "openai" else cls


class _Scorer(_Plugin):
    reads = ("_SCORER",)


class _Exporter(_Plugin):
    reads = ("_EXPORTER",)


@dataclass
class _Info:
    factory: Any


class _Registry:
    plugins: ClassVar[dict[tuple[str, str], Any]] = {("generator", "two"): _TwoBackends,
                                                      ("scorer", "judge"): _Scorer, ("exporter", "crm"): _Exporter}

    def get(self, kind: str, name: str) -> _Info:
        if (kind, name) not in self.plugins:
            raise PluginError(f"no {kind} {name!r}")
        return _Info(self.plugins[kind, name])


def test_each_plugins_key_variables_are_read_from_the_environment_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("genflow.registry.get_registry", lambda: _Registry())
    config = JobConfig.model_validate({
        "name": "s", "input": "in.parquet", "output": "out",
        "generators": [{"label": "gone", "plugin": "uninstalled", "model": "m"},
                       {"label": "a", "plugin": "two", "model": "m", "params": {"backend": "openai"}}],
        "scorers": [{"plugin": "judge"}], "exporters": {"crm": {}}})
    environ = {"REDACT_KEY_SERVED": "served-key-1", "REDACT_KEY_SCORER": "scorer-key-2",
               "REDACT_KEY_EXPORTER": "exporter-key-3", "AWS_SECRET_ACCESS_KEY": "aws-secret-4"}
    scrubber = job_secrets(config, environ=environ)
    assert {s.value: s.where for s in scrubber.secrets.values()} == {
        "served-key-1": "$REDACT_KEY_SERVED", "scorer-key-2": "$REDACT_KEY_SCORER",
        "exporter-key-3": "$REDACT_KEY_EXPORTER", "aws-secret-4": "$AWS_SECRET_ACCESS_KEY"}


def test_a_plugins_own_secrets_are_named_by_its_params(monkeypatch: pytest.MonkeyPatch) -> None:
    found = plugin_secrets(_Scorer, {"api_key": "param-key-5", "api_key_env": "REDACT_KEY"},
                           environ={"REDACT_KEY_SCORER": "env-key-6"})
    assert [(s.value, s.where) for s in found] == [("param-key-5", "params.api_key"),
                                                   ("env-key-6", "$REDACT_KEY_SCORER")]
    refused = plugin_secrets(_Scorer, {"api_key_env": 12, "token": "param-token-7"}, "scorers.0.params")
    assert refused == [Secret("param-token-7", "scorers.0.params.token")], "params that do not validate read no env"


# -- what each view shows -----------------------------------------------------------------------

def test_a_failure_and_an_echoing_candidate_are_scrubbed_with_the_scrubber_given() -> None:
    scrubber = Scrubber([Secret(KEY, "$REDACT_KEY")])
    failure = scrub_result(Failure("the request failed", f"Traceback: 401 {KEY}"), scrubber)
    assert (failure.error, failure.traceback) == ("the request failed", f"Traceback: 401 {MASK}")
    echoed = scrub_result(Generation(text=f"the key is {KEY}"), scrubber)
    assert isinstance(echoed, Failure)
    assert echoed.error == ("the server's answer held a secret of this job ($REDACT_KEY): the answer was removed, "
                            "and the candidate is not written to generations/")
    assert echoed.traceback == ""
    score = Score(1.0, {"why": "fine"})
    assert scrub_result(score, scrubber) is score


def test_a_log_records_traceback_and_stack_are_scrubbed_and_keep_their_shape() -> None:
    scrubber = Scrubber([Secret(KEY, "$REDACT_KEY")])
    try:
        raise RuntimeError(f"401: {KEY} MAX")
    except RuntimeError:
        record = logging.getLogger("redaction-test").makeRecord(
            "redaction-test", logging.ERROR, __file__, 1, "request failed", (), sys.exc_info(),
            sinfo=f"Stack (most recent call last):\n  key = {KEY!r}")
    scrub_record(record, scrubber)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.format(record)
    handler.emit(record)
    text = stream.getvalue()
    assert text.endswith(f"RuntimeError: 401: {MASK} MAX\nStack (most recent call last):\n  key = '{MASK}'\n")
    assert KEY not in text
    try:
        raise RuntimeError(f"401: {KEY}")
    except RuntimeError:
        bare = logging.LogRecord("redaction-test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    scrub_record(bare, scrubber)
    assert logging.Formatter().format(bare).endswith(f"\nRuntimeError: 401: {MASK}"), "no blank line after it"


def test_records_made_through_the_installed_factory_by_keyword_are_scrubbed() -> None:
    install(Scrubber([Secret(KEY, "$REDACT_KEY")]))
    record = logging.getLogRecordFactory()(name="redaction-test", level=logging.INFO, pathname=__file__, lineno=1,
                                           msg="the key %s", args=(KEY,), exc_info=None)
    assert record.getMessage() == f"the key {MASK}"


def test_a_sweeps_row_shows_its_values_figures_cost_and_folder() -> None:
    row = sweep_row("run-1", {"seed": 3, "generators.0.params.api_key": KEY, "token": KEY,
                              "generators.0.params.day": datetime.date(2026, 1, 2),
                              "generators.0.params.base_url": "http://u:pw-sweep-1@h/v1"},
                    {"status": "done", "prompts": 4, "generations": 8, "errors": 0, "error_fraction": 0.0,
                     "score_mean": math.nan, "seconds": 1.5, "folder": "out/run-1"}, {"cost": 0.25})
    assert row == {"run": "run-1", "status": "done",
                   "values": 'seed=3, generators.0.params.api_key="***", token="***", '
                             'generators.0.params.day="2026-01-02", generators.0.params.base_url="http://***@h/v1"',
                   "prompts": 4, "generations": 8, "errors": 0, "error_fraction": 0.0, "score_mean": None,
                   "seconds": 1.5, "cost": 0.25, "folder": "out/run-1"}


def test_the_redacted_config_is_json_a_yaml_date_included() -> None:
    params = {"base_url": "http://h/v1", "extra_body": {"since": datetime.date(2026, 1, 2)}}
    config = JobConfig.model_validate({"name": "s", "input": "in.parquet", "output": "out",
                                       "generators": [{"label": "a", "plugin": "openai", "model": "m",
                                                       "params": params}]})
    assert redacted(config)["generators"][0]["params"]["extra_body"] == {"since": "2026-01-02"}


def test_a_nested_url_with_credentials_beside_a_key_variable_is_named_by_its_full_key() -> None:
    data: dict[str, Any] = {"name": "s", "input": "in.parquet", "output": "out",
                            "generators": [{"label": "a", "plugin": "openai", "model": "m",
                                            "params": {"base_url": "http://127.0.0.1:1/v1", "api_key_env": "K",
                                                       "extra_body": {"proxy": "http://u:pw-nested-1@p:1"}}}]}
    with pytest.raises(ConfigError) as refused:
        build_config(data, source="job.yaml")
    assert ("generators.0.params: extra_body.proxy holds credentials (user:password@) and the key in $K is sent "
            "too, but a request carries one: keep the URL without its user-info, or the key variable out"
            ) in str(refused.value)


def test_a_config_shown_redacted_says_whether_it_hides_something() -> None:
    from genflow.config import hides_secrets

    assert hides_secrets({"generators": [{"params": {"api_key": "***"}}]})
    assert hides_secrets({"sweep": {"x": ["http://***@h/v1"]}})
    assert hides_secrets(["plain", ("http://***@h",)])
    assert not hides_secrets({"generators": [{"params": {"api_key": "sk-plain-abcdefgh", "note": "***"}}]})
    assert not hides_secrets({"author": "***", "n": 3, "urls": ["http://h/v1", "***@h"]})


def test_a_manifests_urls_lose_their_user_info_and_keep_their_keys() -> None:
    from genflow.config import redacted_urls

    manifest = {"http://u:pw-key-1@h": ["see http://u:pw-2@h/v1 and http://h/v1", ("ftp://a:b@c/d",)],
                "plugins": {"a": {"describe": "served by https://x:y@z:1"}, "n": 3}}
    assert redacted_urls(manifest) == {"http://u:pw-key-1@h": ["see http://***@h/v1 and http://h/v1",
                                                               ["ftp://***@c/d"]],
                                       "plugins": {"a": {"describe": "served by https://***@z:1"}, "n": 3}}

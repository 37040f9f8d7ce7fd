"""The Label Studio client, request by request, against a scripted stand-in (aiohttp on 127.0.0.1):
what it sends (path, query, headers, body), how it reads lists in pages, exchanges a
personal access token, refuses what it should not read, and the one line a user gets
for each failure (fast: no Label Studio install)."""

from __future__ import annotations

import asyncio
import html
import json
import logging
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from xml.etree import ElementTree

import pytest
from aiohttp import web
from support.jobs import free_port
from support.servers import BackgroundServer

from genflow.api import Annotation, LabelCandidate, LabelTask, PushResult
from genflow.plugins.labelling import label_studio
from genflow.plugins.labelling.label_studio import (
    LABEL_CONFIGS,
    LabelStudio,
    LabelStudioError,
    LabelStudioParams,
    task_data,
)

KEY = "legacy-token-0123456789abcdef"
PAT = "header.refresh-token-payload-0123456789.signature"
ACCESS = "access-token-fedcba9876543210"


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: dict[str, str]
    body: Any


Answer = Any  # a JSON value, or a function of the request returning a response


class Scripted:
    """Answers each (method, path) from ``routes`` (404 otherwise) and keeps every request."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Answer] = {}
        self.seen: list[Seen] = []
        self.server = BackgroundServer(self._app()).start()
        self.url = self.server.origin

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.seen.append(Seen(request.method, request.path_qs, dict(request.headers),
                              json.loads(raw) if raw else None))
        answer = self.routes.get((request.method, request.path))
        if answer is None:
            return web.json_response({"detail": "Not found."}, status=404)
        if callable(answer):
            return answer(request)
        return web.json_response(answer)

    def asked(self, method: str | None = None) -> list[str]:
        return [f"{s.method} {s.path_qs}" for s in self.seen if method in (None, s.method)]


@pytest.fixture
def ls(monkeypatch: pytest.MonkeyPatch) -> Iterator[Scripted]:
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", KEY)
    scripted = Scripted()
    yield scripted
    scripted.server.stop()


def _plugin(ls: Scripted, **params: Any) -> LabelStudio:
    return LabelStudio(LabelStudioParams(url=ls.url + "/", **params))


def _pages(*pages: list[dict[str, Any]]) -> Callable[[web.Request], web.Response]:
    """A list in Label Studio's pages: ``next`` names the following page while there is one."""
    def answer(request: web.Request) -> web.Response:
        page = int(request.query["page"])
        more = page < len(pages)
        return web.json_response({"count": sum(map(len, pages)), "results": pages[page - 1],
                                  "next": f"{request.url.with_query(page=page + 1)}" if more else None})
    return answer


def _status(status: int, text: str, headers: dict[str, str] | None = None) -> Callable[[web.Request], web.Response]:
    return lambda request: web.Response(status=status, text=text, headers=headers)


def _error(call: Callable[[], Any]) -> str:
    with pytest.raises(LabelStudioError) as raised:
        call()
    return str(raised.value)


# -- what is sent --------------------------------------------------------------------

def test_a_request_carries_the_key_and_json_and_asks_for_json(ls: Scripted) -> None:
    ls.routes[("GET", "/api/projects")] = []
    ls.routes[("POST", "/api/projects")] = {"id": 3, "title": "t"}
    ls.routes[("GET", "/api/projects/3/export")] = []
    ls.routes[("POST", "/api/projects/3/import")] = {"task_count": 1}
    task = LabelTask("k1", "demonstrations", "p1", "the prompt")
    assert _plugin(ls).push("t", "demonstrations", [task]) == PushResult("t", 1, 0, f"{ls.url}/projects/3/data")
    assert ls.asked() == ["GET /api/projects?page=1&page_size=100", "POST /api/projects",
                          "GET /api/projects/3/export?exportType=JSON&download_all_tasks=true",
                          "POST /api/projects/3/import"]
    get, post = ls.seen[0], ls.seen[1]
    assert (get.headers["Authorization"], get.headers["Accept"]) == (f"Token {KEY}", "application/json")
    assert "Content-Type" not in get.headers and get.body is None
    assert (post.headers["Authorization"], post.headers["Content-Type"]) == (f"Token {KEY}", "application/json")
    assert post.body == {"title": "t", "label_config": LABEL_CONFIGS["demonstrations"],
                         "description": "genflow demonstrations: write the answer to each prompt",
                         "show_skip_button": True}
    assert ls.seen[3].body == [{"data": {"genflow_key": "k1", "genflow_kind": "demonstrations",
                                         "prompt_id": "p1", "prompt": "the prompt"}}]


def test_a_ranking_project_is_described_as_one_and_its_config_kept_up_to_date(ls: Scripted) -> None:
    ls.routes[("GET", "/api/projects")] = []
    ls.routes[("POST", "/api/projects")] = {"id": 4}
    ls.routes[("GET", "/api/projects/4/export")] = lambda request: web.Response(status=200)  # no body: no tasks
    ls.routes[("POST", "/api/projects/4/import")] = {}
    tasks = [LabelTask("k1", "rankings", "p1", "q", (LabelCandidate("g1", "text", "one"),)),
             LabelTask("k2", "rankings", "p2", "q", ())]
    assert _plugin(ls).push("ranks", "rankings", tasks) == PushResult("ranks", 2, 0, f"{ls.url}/projects/4/data")
    assert ls.seen[1].body["description"] == "genflow rankings: order each prompt's answers from best to worst"
    assert ls.seen[1].body["label_config"] == LABEL_CONFIGS["rankings"]
    assert [t["data"]["genflow_key"] for t in ls.seen[3].body] == ["k1", "k2"]

    # The project found again with an old config: the config is replaced, the tasks it has are not sent again.
    ls.seen.clear()
    ls.routes[("GET", "/api/projects")] = [{"id": 4, "title": "ranks", "label_config": "<View/>"}]
    ls.routes[("PATCH", "/api/projects/4")] = {"id": 4}
    ls.routes[("GET", "/api/projects/4/export")] = [{"id": 1, "data": {"genflow_key": "k1"}}, {"id": 2},
                                                    {"id": 3, "data": "not an object"}]
    assert _plugin(ls).push("ranks", "rankings", tasks) == PushResult("ranks", 1, 1, f"{ls.url}/projects/4/data")
    assert ls.asked() == ["GET /api/projects?page=1&page_size=100", "PATCH /api/projects/4",
                          "GET /api/projects/4/export?exportType=JSON&download_all_tasks=true",
                          "POST /api/projects/4/import"]
    assert ls.seen[1].body == {"label_config": LABEL_CONFIGS["rankings"]}
    assert [t["data"]["genflow_key"] for t in ls.seen[3].body] == ["k2"]

    # Found with the config it should have, every task there: nothing is changed or sent.
    ls.seen.clear()
    ls.routes[("GET", "/api/projects")] = [{"id": 4, "title": "ranks", "label_config": LABEL_CONFIGS["rankings"]}]
    ls.routes[("GET", "/api/projects/4/export")] = [{"id": 1, "data": {"genflow_key": k}} for k in ("k1", "k2")]
    assert _plugin(ls).push("ranks", "rankings", tasks) == PushResult("ranks", 0, 2, f"{ls.url}/projects/4/data")
    assert ls.asked() == ["GET /api/projects?page=1&page_size=100",
                          "GET /api/projects/4/export?exportType=JSON&download_all_tasks=true"]


@pytest.mark.parametrize("answer", [[], {"title": "t"}, "created"])
def test_a_created_project_without_an_id_is_one_clear_line(ls: Scripted, answer: Any) -> None:
    ls.routes[("GET", "/api/projects")] = []
    ls.routes[("POST", "/api/projects")] = answer
    shape = {"[]": "a list of something else", "{'title': 't'}": "an object with title", "'created'": "a str"}
    assert _error(lambda: _plugin(ls).push("t", "rankings", [])) == (
        f"Label Studio POST /api/projects answered {shape[repr(answer)]}, not a project")


# -- the key --------------------------------------------------------------------------

def test_a_personal_access_token_is_exchanged_once_and_never_sent_itself(ls: Scripted,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_LS_KEY", f"  {PAT}\n")
    ls.routes[("POST", "/api/token/refresh/")] = {"access": ACCESS}
    ls.routes[("GET", "/api/projects")] = _pages([{"id": 1, "title": "a"}], [{"id": 2, "title": "b"}])
    plugin = _plugin(ls, api_key_env="MY_LS_KEY")
    assert plugin._find_project("b") == {"id": 2, "title": "b"}
    assert ls.asked() == ["POST /api/token/refresh/", "GET /api/projects?page=1&page_size=100",
                          "GET /api/projects?page=2&page_size=100"]
    exchange = ls.seen[0]
    assert exchange.body == {"refresh": PAT} and "Authorization" not in exchange.headers
    assert [s.headers["Authorization"] for s in ls.seen[1:]] == [f"Bearer {ACCESS}"] * 2
    assert plugin.scrub(f"echo {PAT} and {ACCESS}") == "echo *** and ***"  # an error body echoing either


def test_a_legacy_token_is_sent_as_it_is_with_no_exchange(ls: Scripted, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", f" {KEY} ")
    ls.routes[("GET", "/api/users")] = [{"id": 1, "email": "ada@x"}]
    plugin = _plugin(ls)
    assert plugin._users() == {1: "ada@x"}
    assert plugin._users() == {1: "ada@x"}
    assert ls.asked() == ["GET /api/users?page=1&page_size=100"] * 2
    assert {s.headers["Authorization"] for s in ls.seen} == {f"Token {KEY}"}


@pytest.mark.parametrize("value", ["", "   "])
def test_no_key_is_one_clear_line_and_nothing_is_sent(ls: Scripted, monkeypatch: pytest.MonkeyPatch,
                                                      value: str) -> None:
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", value)
    assert _error(lambda: _plugin(ls).pull("t", "rankings")) == (
        "no Label Studio key: set LABEL_STUDIO_API_KEY to a personal access token or an API token "
        "(Label Studio: Account & Settings)")
    monkeypatch.delenv("LABEL_STUDIO_API_KEY")
    assert "set LABEL_STUDIO_API_KEY to" in _error(lambda: _plugin(ls).pull("t", "rankings"))
    assert ls.seen == []


@pytest.mark.parametrize(("answer", "got"), [
    ({"refresh": "x", "detail": "y"}, "an object with detail, refresh"),
    ({}, "an object with nothing"),
    ({"access": " "}, "an object with access"),
    ({"access": 7}, "an object with access"),
    (["access"], "a list"),
])
def test_an_exchange_without_an_access_token_says_what_came_back(ls: Scripted, monkeypatch: pytest.MonkeyPatch,
                                                                 answer: Any, got: str) -> None:
    monkeypatch.setenv("MY_LS_KEY", PAT)
    ls.routes[("POST", "/api/token/refresh/")] = answer
    assert _error(lambda: _plugin(ls, api_key_env="MY_LS_KEY").pull("t", "rankings")) == (
        f"Label Studio at {ls.url} answered the exchange of MY_LS_KEY's personal access token with {got}, not "
        "an access token: is MY_LS_KEY a personal access token of this server?")
    assert ls.asked() == ["POST /api/token/refresh/"]


# -- what comes back ----------------------------------------------------------------------

@pytest.mark.parametrize(("status", "hint"), [(401, True), (403, True), (404, False), (500, False)])
def test_an_http_error_is_one_line_with_the_status_and_the_start_of_the_body(ls: Scripted, status: int,
                                                                            hint: bool) -> None:
    ls.routes[("GET", "/api/projects")] = _status(status, "x" * 600)
    said = _error(lambda: _plugin(ls).pull("t", "rankings"))
    key_hint = " (is LABEL_STUDIO_API_KEY a key of this server?)" if hint else ""
    assert said == f"Label Studio GET /api/projects?page=1&page_size=100: HTTP {status}{key_hint}: {'x' * 500}"


def test_an_error_body_echoing_the_key_is_scrubbed(ls: Scripted) -> None:
    ls.routes[("GET", "/api/projects")] = _status(400, f"bad token {KEY}")
    said = _error(lambda: _plugin(ls).pull("t", "rankings"))
    assert said.startswith("Label Studio GET /api/projects?page=1&page_size=100: HTTP 400: bad token ")
    assert KEY[:8] not in said


def test_a_redirected_post_that_cannot_follow_shows_the_servers_answer(ls: Scripted) -> None:
    """A 307 to a POST (urllib does not resend a body) is an HTTP error whose body the user sees."""
    ls.routes[("GET", "/api/projects")] = []
    ls.routes[("POST", "/api/projects")] = _status(307, "moved: use /api/projects/",
                                                   {"Location": "/api/projects/"})
    assert _error(lambda: _plugin(ls).push("t", "rankings", [])) == (
        "Label Studio POST /api/projects: HTTP 307: moved: use /api/projects/")


def test_a_server_that_is_not_there_is_one_line_naming_the_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", KEY)
    url = f"http://127.0.0.1:{free_port()}"
    said = _error(lambda: LabelStudio(LabelStudioParams(url=url)).pull("t", "rankings"))
    assert said == (f"cannot reach Label Studio at {url}: [Errno 111] Connection refused; start it with "
                    "`label-studio start` or pass its address with --url")


def test_an_answer_that_is_not_json_is_one_line(ls: Scripted) -> None:
    ls.routes[("GET", "/api/projects")] = _status(200, '{"results": [')
    assert _error(lambda: _plugin(ls).pull("t", "rankings")) == (
        "Label Studio GET /api/projects?page=1&page_size=100: the answer is not complete JSON (13 bytes: Expecting "
        "value: line 1 column 14 (char 13)); it may have been cut short: try again")


def test_an_answer_past_its_limit_is_refused_whether_announced_or_not(ls: Scripted,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(label_studio, "MAX_ANSWER_BYTES", 100)
    ls.routes[("GET", "/api/projects")] = [{"id": i, "title": f"project {i}"} for i in range(10)]
    size = len(json.dumps(ls.routes[("GET", "/api/projects")]))
    assert _error(lambda: _plugin(ls).pull("t", "rankings")) == (
        f"Label Studio GET /api/projects?page=1&page_size=100: the answer is larger than 100 bytes (it has "
        f"{size:,} bytes); is {ls.url} Label Studio?")

    def chunked(request: web.Request) -> web.StreamResponse:
        return web.Response(body=iter_body(), content_type="application/json")

    async def iter_body() -> Any:
        yield b"[" + b" " * 200 + b"]"

    ls.routes[("GET", "/api/projects")] = chunked
    assert _error(lambda: _plugin(ls).pull("t", "rankings")) == (
        "Label Studio GET /api/projects?page=1&page_size=100: the answer is larger than 100 bytes (it has more); "
        f"is {ls.url} Label Studio?")


def test_an_answer_exactly_at_its_limit_is_read(ls: Scripted, monkeypatch: pytest.MonkeyPatch) -> None:
    ls.routes[("GET", "/api/projects")] = [{"id": 1, "title": "t"}]
    monkeypatch.setattr(label_studio, "MAX_ANSWER_BYTES", len(json.dumps(ls.routes[("GET", "/api/projects")])))
    assert _plugin(ls)._find_project("t") == {"id": 1, "title": "t"}


def test_an_export_past_max_export_bytes_says_how_to_raise_it(ls: Scripted) -> None:
    ls.routes[("GET", "/api/projects")] = [{"id": 5, "title": "t"}]
    ls.routes[("GET", "/api/users")] = []
    ls.routes[("GET", "/api/projects/5/export")] = [{"id": 1, "data": {}}] * 20
    size = len(json.dumps(ls.routes[("GET", "/api/projects/5/export")]))
    assert _error(lambda: _plugin(ls, max_export_bytes=size - 1).pull("t", "rankings")) == (
        f"Label Studio GET /api/projects/5/export?exportType=JSON&download_all_tasks=true: the export is larger "
        f"than max_export_bytes ({size - 1:,} bytes; it has {size:,} bytes); raise it with --param "
        "max_export_bytes=N, or split the project")
    assert _plugin(ls, max_export_bytes=size).pull("t", "rankings") == []  # up to the limit: read


# -- lists in pages ---------------------------------------------------------------------------

def test_a_list_is_read_page_by_page_until_no_next(ls: Scripted) -> None:
    ls.routes[("GET", "/api/users")] = _pages([{"id": 1, "email": "a@x"}], [{"id": 2, "username": "bo"}],
                                              [{"id": 3}])
    assert _plugin(ls)._users() == {1: "a@x", 2: "bo", 3: "3"}
    assert ls.asked() == [f"GET /api/users?page={p}&page_size=100" for p in (1, 2, 3)]


def test_a_page_with_no_results_ends_the_list_whatever_next_says(ls: Scripted) -> None:
    def endless(request: web.Request) -> web.Response:
        page = int(request.query["page"])
        return web.json_response({"results": [{"id": page}] if page < 3 else [], "next": "more"})
    ls.routes[("GET", "/api/users")] = endless
    assert _plugin(ls)._users() == {1: "1", 2: "2"}
    assert len(ls.seen) == 3


def test_more_pages_than_max_pages_is_one_clear_line(ls: Scripted) -> None:
    ls.routes[("GET", "/api/users")] = _pages(*[[{"id": i}] for i in range(5)])
    assert _plugin(ls, max_pages=5)._users() == {i: str(i) for i in range(5)}
    ls.seen.clear()
    assert _error(lambda: _plugin(ls, max_pages=4)._users()) == (
        "Label Studio GET /api/users: more than max_pages (4) pages of users; raise it with --param max_pages=N")
    assert len(ls.seen) == 4


@pytest.mark.parametrize(("answer", "shape"), [
    ({"results": None, "next": None}, "an object with next, results"),
    ({"detail": "no"}, "an object with detail"),
    ([{"id": 1}, 2], "a list of something else"),
    ({"results": [1]}, "an object with results"),
    ("users", "a str"),
])
def test_a_list_of_something_else_is_one_clear_line(ls: Scripted, answer: Any, shape: str) -> None:
    ls.routes[("GET", "/api/users")] = answer
    assert _error(lambda: _plugin(ls)._users()) == (
        f"Label Studio GET /api/users answered {shape}, not a list of users")


def test_a_user_or_project_without_an_id_is_one_clear_line(ls: Scripted) -> None:
    ls.routes[("GET", "/api/users")] = [{"id": 1}, {"email": "who@x"}]
    assert _error(lambda: _plugin(ls)._users()) == "Label Studio GET /api/users answered a user without an id"
    ls.routes[("GET", "/api/projects")] = [{"id": 1, "title": "other"}, {"title": "mine"}]
    assert _error(lambda: _plugin(ls)._find_project("mine")) == "Label Studio's project 'mine' came without an id"
    assert _plugin(ls)._find_project("other") == {"id": 1, "title": "other"}
    assert _plugin(ls)._find_project("none of them") is None


# -- pull -----------------------------------------------------------------------------------------

def _ranked(annotation_id: int, order: list[str], **extra: Any) -> dict[str, Any]:
    return {"id": annotation_id, "completed_by": 1, "created_at": "2026-01-01", **extra,
            "result": [{"from_name": "rank", "type": "ranker", "value": {"ranker": {"rank": order}}}]}


def test_pull_reads_the_kinds_tasks_and_leaves_out_cancelled_and_unreadable_answers(
        ls: Scripted, caplog: pytest.LogCaptureFixture) -> None:
    ls.routes[("GET", "/api/projects")] = [{"id": 5, "title": "t"}]
    ls.routes[("GET", "/api/users")] = [{"id": 1, "email": "ada@x"}]
    data = {"genflow_key": "k1", "genflow_kind": "rankings", "prompt_id": "p1"}
    ls.routes[("GET", "/api/projects/5/export")] = [
        {"id": 9, "data": {"prompt_id": "p0"}, "annotations": [_ranked(7, ["g1", "g2"])]},  # not genflow's
        {"id": 10, "data": data, "annotations": [
            _ranked(1, ["g2", "g1"]), _ranked(2, ["g1"], was_cancelled=True),
            {"id": 3, "result": [{"from_name": "rank", "type": "ranker", "value": None}]}, "not an annotation",
            {"id": 4, "result": []}]},
        {"id": 11, "data": {**data, "genflow_kind": "demonstrations"}, "annotations": [_ranked(5, ["g1"])]},
        {"id": 12, "data": {"prompt_id": "p9"}, "annotations": [_ranked(6, ["g1"])]},
        {"id": 13, "data": data},
        {"id": 14, "data": data, "annotations": None},
    ]
    with caplog.at_level(logging.WARNING, logger=label_studio.__name__):
        found = _plugin(ls).pull("t", "rankings")
    assert found == [Annotation("k1", "rankings", "p1", "ada@x", "2026-01-01", "1", ranking=("g2", "g1"))]
    warnings = sorted(r.getMessage() for r in caplog.records)
    assert warnings == [
        "Label Studio task 10 of 't': annotation 3 left out, genflow cannot read it (AttributeError: 'NoneType' "
        "object has no attribute 'get')",
        "Label Studio task 10 of 't': annotation ? left out, genflow cannot read it (AttributeError: 'str' object "
        "has no attribute 'get')"]
    assert ls.asked() == ["GET /api/projects?page=1&page_size=100", "GET /api/users?page=1&page_size=100",
                          "GET /api/projects/5/export?exportType=JSON&download_all_tasks=true"]


def test_pull_of_a_project_the_tool_lacks_or_with_odd_annotations_is_one_clear_line(ls: Scripted) -> None:
    ls.routes[("GET", "/api/projects")] = [{"id": 5, "title": "t"}]
    assert _error(lambda: _plugin(ls).pull("elsewhere", "rankings")) == (
        f"Label Studio at {ls.url} has no project 'elsewhere'")
    ls.routes[("GET", "/api/users")] = []
    ls.routes[("GET", "/api/projects/5/export")] = [
        {"id": 10, "data": {"genflow_key": "k", "genflow_kind": "rankings"}, "annotations": {"id": 1}}]
    assert _error(lambda: _plugin(ls).pull("t", "rankings")) == (
        "Label Studio task 10 of 't': its annotations are an object with id, not a list")
    ls.routes[("GET", "/api/projects/5/export")] = {"tasks": []}
    assert _error(lambda: _plugin(ls).pull("t", "rankings")) == (
        "Label Studio GET /api/projects/5/export answered an object with tasks, not a list of tasks")
    ls.routes[("GET", "/api/projects/5/export")] = [{"id": 1}, 2]
    assert _error(lambda: _plugin(ls).pull("t", "rankings")) == (
        "Label Studio GET /api/projects/5/export answered a list of something else, not a list of tasks")


def test_task_data_of_a_candidate_without_text_shows_an_empty_body() -> None:
    data = task_data(LabelTask("k", "rankings", "p", "q", (LabelCandidate("g", "text", None),)))
    assert data["candidates"] == [{"id": "A", "body": ""}]
    assert data["genflow_candidates"] == {"A": "g"}


def _css(config: str) -> dict[str, str]:
    """The labelling config's ``<Style>``: each selector -> its declarations (run together)."""
    style = ElementTree.fromstring(config).find("Style")
    assert style is not None and style.text, f"no <Style> in {config}"
    rules: dict[str, str] = {}
    for selectors, body in re.findall(r"([^{}]+)\{([^}]*)\}", style.text):
        for selector in selectors.split(","):
            rules[selector.strip()] = rules.get(selector.strip(), "") + body
    return rules


@pytest.mark.parametrize("kind", ["rankings", "demonstrations"])
def test_a_task_shows_text_as_written_and_never_as_markup(ls: Scripted, kind: str) -> None:
    """Line breaks and indentation reach the labeller (Label Studio's page collapses them unless the
    config says otherwise); model output is untrusted: it goes as text, or escaped, never as markup."""
    code = 'def f(x):\n    if x:\n\treturn "<b>" & x\n'
    script = "<script>alert(1)</script>\n  <b>bold?</b> &amp;"
    prompt = "Write f:\n    - one\n    - two"
    ls.routes[("GET", "/api/projects")] = []
    ls.routes[("POST", "/api/projects")] = {"id": 5}
    ls.routes[("GET", "/api/projects/5/export")] = []
    ls.routes[("POST", "/api/projects/5/import")] = {}
    candidates = (LabelCandidate("g1", "code", code), LabelCandidate("g2", "text", script),
                  LabelCandidate("g3", "code", script), LabelCandidate("g4", "text", "An old pond\n  a frog"))
    _plugin(ls).push("t", kind, [LabelTask("k", kind, "p", prompt, candidates if kind == "rankings" else ())])
    config, data = ls.seen[1].body["label_config"], ls.seen[3].body[0]["data"]

    css = _css(config)  # the prompt's <Text>, and a <List> item's text and code, keep their spaces and breaks
    shown = [".lsf-richtext__container", *([".htx-ranker-item p", ".htx-ranker-item pre"] if kind == "rankings"
                                            else [])]
    assert {s: "white-space: pre-wrap" in css.get(s, "") for s in shown} == dict.fromkeys(shown, True)
    assert data["prompt"] == prompt
    if kind == "demonstrations":
        assert "candidates" not in data
        return
    assert "font-family: var(--font-mono, monospace) !important" in css[".htx-ranker-item pre"]
    items = data["candidates"]
    assert items[1] == {"id": "B", "body": script} and items[3] == {"id": "D", "body": "An old pond\n  a frog"}
    assert items[0] == {"id": "A", "html": '<pre>def f(x):\n    if x:\n\treturn &quot;&lt;b&gt;&quot; &amp; x\n</pre>'}
    assert items[2] == {"id": "C", "html": "<pre>&lt;script&gt;alert(1)&lt;/script&gt;\n  &lt;b&gt;bold?&lt;/b&gt; "
                                           "&amp;amp;</pre>"}
    for item, c in zip(items[::2], candidates[::2], strict=True):  # only genflow's <pre>: the text, exactly
        inner = item["html"].removeprefix("<pre>").removesuffix("</pre>")
        assert "<" not in inner and html.unescape(inner) == c.text


# -- one annotation ------------------------------------------------------------------------------

DATA = {"genflow_key": "k1", "genflow_kind": "rankings", "prompt_id": "p1"}


def test_a_ranking_with_no_order_in_it_reads_as_an_empty_ranking_not_an_unreadable_one() -> None:
    """Nothing ranked (the labeller submitted the list untouched) is an answer without an order:
    the rows leave it out as they leave out a ranking of one candidate; it is not an error."""
    empty = Annotation("k1", "rankings", "p1", "ada@x", "", "1", ranking=())
    values: list[dict[str, Any]] = [{}, {"ranker": {}}, {"ranker": {"rank": None}}]
    for value in values:
        result = {"from_name": "rank", "type": "ranker", "value": value}
        assert label_studio.read_annotation({"id": 1, "completed_by": 1, "result": [result]}, DATA, "rankings",
                                            {1: "ada@x"}) == empty
    no_value = {"id": 1, "completed_by": 1, "result": [{"from_name": "rank", "type": "ranker"}]}
    assert label_studio.read_annotation(no_value, DATA, "rankings", {1: "ada@x"}) == empty


def test_a_demonstration_is_read_from_the_answer_box_only() -> None:
    results = [{"from_name": "rank", "type": "ranker", "value": {"ranker": {"rank": ["g1"]}}},
               {"from_name": "notes", "type": "textarea", "value": {"text": ["a note, not the answer"]}},
               {"from_name": "answer", "type": "textarea", "value": {"text": ["the answer"]}}]
    assert label_studio.read_annotation({"id": 2, "completed_by": {"id": 9}, "result": results}, DATA,
                                        "demonstrations", {}) == Annotation(
        "k1", "demonstrations", "p1", "9", "", "2", completion="the answer")


@pytest.mark.parametrize(("text", "shape"), [([42], "a list of something else"), ("one string", "a str"),
                                             ({"t": "x"}, "an object with t")])
def test_an_answer_that_is_not_a_list_of_strings_says_what_it_is(text: Any, shape: str) -> None:
    result = {"from_name": "answer", "type": "textarea", "value": {"text": text}}
    with pytest.raises(TypeError) as raised:
        label_studio.read_annotation({"id": 3, "result": [result]}, DATA, "demonstrations", {})
    assert str(raised.value) == f"its text is {shape}, not a list of strings"


def test_a_server_that_never_answers_is_given_up_on_after_timeout_s(ls: Scripted) -> None:
    async def never(request: web.Request) -> web.Response:
        await asyncio.Event().wait()  # cancelled when the client gives up
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", never)
    silent = BackgroundServer(app).start()
    try:
        said = _error(lambda: LabelStudio(LabelStudioParams(url=silent.origin, timeout_s=0.2)).pull("t", "rankings"))
    finally:
        silent.stop()
    assert said == (f"cannot reach Label Studio at {silent.origin}: timed out; start it with `label-studio start` "
                    "or pass its address with --url")


def test_an_answer_of_unannounced_length_exactly_at_its_limit_is_read(ls: Scripted,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    body = json.dumps([{"id": 1, "title": "t"}]).encode()

    async def chunks() -> Any:
        yield body

    ls.routes[("GET", "/api/projects")] = lambda request: web.Response(body=chunks(),
                                                                       content_type="application/json")
    monkeypatch.setattr(label_studio, "MAX_ANSWER_BYTES", len(body))
    assert _plugin(ls)._find_project("t") == {"id": 1, "title": "t"}
    monkeypatch.setattr(label_studio, "MAX_ANSWER_BYTES", len(body) - 1)
    assert "the answer is larger than" in _error(lambda: _plugin(ls)._find_project("t"))


def test_an_import_refused_names_the_request_and_the_servers_reason(ls: Scripted) -> None:
    ls.routes[("GET", "/api/projects")] = [{"id": 3, "title": "t", "label_config": LABEL_CONFIGS["demonstrations"]}]
    ls.routes[("GET", "/api/projects/3/export")] = []
    ls.routes[("POST", "/api/projects/3/import")] = _status(400, "task data too large")
    task = LabelTask("k1", "demonstrations", "p1", "the prompt")
    assert _error(lambda: _plugin(ls).push("t", "demonstrations", [task])) == (
        "Label Studio POST /api/projects/3/import: HTTP 400: task data too large")


def test_a_refused_exchange_names_the_request_and_the_variable(ls: Scripted, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_LS_KEY", PAT)
    ls.routes[("POST", "/api/token/refresh/")] = _status(401, '{"detail": "Token is invalid or expired"}')
    assert _error(lambda: _plugin(ls, api_key_env="MY_LS_KEY").pull("t", "rankings")) == (
        "Label Studio POST /api/token/refresh/: HTTP 401 (is MY_LS_KEY a key of this server?): "
        '{"detail": "Token is invalid or expired"}')


def test_label_studio_under_a_path_keeps_its_path_in_every_address() -> None:
    plugin = LabelStudio(LabelStudioParams(url="http://ls.local:8080/studioX//"))
    assert (plugin.base, plugin.project_url(3)) == ("http://ls.local:8080/studioX",
                                                    "http://ls.local:8080/studioX/projects/3/data")


def test_a_redirect_elsewhere_is_refused_with_one_line_saying_what_to_do(ls: Scripted) -> None:
    ls.routes[("GET", "/api/projects")] = lambda request: web.Response(
        status=302, headers={"Location": "http://localhost:9/api/projects"})
    assert _error(lambda: _plugin(ls).pull("t", "rankings")) == (
        f"Label Studio GET /api/projects?page=1&page_size=100: Label Studio at {ls.url} redirected it to "
        "http://localhost:9; the key is sent to no other address: give --url the address Label Studio answers at")


def test_an_answer_that_is_not_http_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Something else on the port (its first line is no HTTP status line): one line, no traceback."""
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", KEY)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        said = _error(lambda: LabelStudio(LabelStudioParams(url=url)).pull("t", "rankings"))
    finally:
        thread.join(timeout=10)
        listener.close()
    assert said == ("Label Studio GET /api/projects?page=1&page_size=100: the answer was cut short (BadStatusLine); "
                    "try again")


def test_an_error_body_that_is_not_utf8_is_shown_with_replacement_characters(ls: Scripted) -> None:
    ls.routes[("GET", "/api/projects")] = lambda request: web.Response(status=500, body=b"bad \xff\xfe byte")
    assert _error(lambda: _plugin(ls).pull("t", "rankings")) == (
        "Label Studio GET /api/projects?page=1&page_size=100: HTTP 500: bad \ufffd\ufffd byte")


def test_an_annotation_without_results_holds_no_answer() -> None:
    for kind in ("rankings", "demonstrations"):
        assert label_studio.read_annotation({"id": 1, "completed_by": 1}, DATA, kind, {}) is None

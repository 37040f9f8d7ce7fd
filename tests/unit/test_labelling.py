"""People in the loop, fast: push and pull against a stand-in Label Studio (aiohttp on 127.0.0.1)
with a job output written by hand: no Ray, no Prefect, no Label Studio install.

The stand-in speaks the part of Label Studio's REST API genflow uses (projects paginated
as Label Studio paginates them, import, export, users, the token exchange) and can
misbehave on request: an export cut short, an answer without the expected fields, users
in pages, a redirect to another host, an error body echoing the key. It counts what it
was asked. ``tests/plugins/test_label_studio.py`` runs the real Label Studio.
"""

from __future__ import annotations

import html
import itertools
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from support.jobs import free_port
from support.servers import BackgroundServer
from typer.testing import CliRunner, Result

from genflow.api import Annotation
from genflow.cli import app
from genflow.data import schemas
from genflow.data.storage import Storage
from genflow.labelling import labels as labelling
from genflow.labelling.labels import LabellingError, disagreeing_prompts, label_tasks, task_key
from genflow.outputs.report.sections import human_sections

TOKEN = "genflow-test-token-0123456789abcdef"
ACCESS = "access-token-fedcba9876543210"
PAT = "header.payload-of-a-refresh-token.signature"

# -- a finished job's output, written by hand ------------------------------------------

# prompt -> candidate -> (score of "long", score of "short"): p1 both agree; p2 reversed; p3 one pair
# reversed; p4 "short" ties everything (a tie orders nothing: no disagreement); p5 one candidate.
SCORES = {
    "p1": {"a": (3.0, 30.0), "b": (2.0, 20.0), "c": (1.0, 10.0)},
    "p2": {"a": (3.0, 1.0), "b": (2.0, 2.0), "c": (1.0, 3.0)},
    "p3": {"a": (3.0, 3.0), "b": (2.0, 1.0), "c": (1.0, 2.0)},
    "p4": {"a": (3.0, 5.0), "b": (2.0, 5.0), "c": (1.0, 5.0)},
    "p5": {"a": (1.0, 1.0)},
}


def gid(prompt_id: str, candidate: str) -> str:
    return f"{prompt_id}-{candidate}"


def write_output(out: Path, scorers: tuple[str, ...] = ("long", "short")) -> Path:
    """prompts/, generations/, scores/ and rankings/ of a job of two scorers, and its manifest."""
    for folder in ("prompts", "generations", "scores", "rankings"):
        (out / folder).mkdir(parents=True)
    pq.write_table(pa.table({"prompt_id": list(SCORES), "prompt": [f"prompt {p}" for p in SCORES]}),
                   out / "prompts" / "part-00000.parquet")
    gens = [{"prompt_id": p, "generation_id": gid(p, c), "prompt": f"prompt {p}", "modality": "text",
             "text": f" answer {c} to {p}", "image_path": None, "generator": "echo", "sample": i}
            for p, cs in SCORES.items() for i, c in enumerate(cs)]
    pq.write_table(pa.Table.from_pylist(gens, schema=schemas.GENERATIONS),
                   out / "generations" / "part-00000-echo.parquet")
    for scorer in scorers:  # "long..." scorers score as "long", the others as "short"
        rows = [{"generation_id": gid(p, c), "prompt_id": p, "scorer": scorer, "score": v[0 if scorer.startswith(
                 "long") else 1]}
                for p, cs in SCORES.items() for c, v in cs.items()]
        pq.write_table(pa.Table.from_pylist(rows), out / "scores" / f"part-00000-{scorer}.parquet")
    ranked = [{"prompt_id": p, "generation_id": gid(p, c), "rank": r + 1, "score": sum(v)}
              for p, cs in SCORES.items() for r, (c, v) in enumerate(cs.items())]
    pq.write_table(pa.Table.from_pylist(ranked), out / "rankings" / "part-00000.parquet")
    config = {"name": "handmade", "scorers": [{"plugin": "length", "label": s, "weight": 1.0} for s in scorers]}
    (out / "manifest.json").write_text(json.dumps({
        "name": "handmade", "status": "completed", "output": str(out), "created": "2026-01-01T00:00:00+00:00",
        "config_hash": "handmade0123", "python": "3.11", "config": config, "rows": {}}))
    return out


@pytest.fixture
def output(tmp_path: Path) -> Path:
    return write_output(tmp_path / "out")


# -- --disagreeing ---------------------------------------------------------------------

def test_disagreeing_finds_the_prompts_where_two_scorers_order_a_pair_oppositely(output: Path) -> None:
    storage = Storage.open(str(output))
    weights = labelling.scorer_weights(storage.read_json("manifest.json"))
    assert weights == {"long": 1.0, "short": 1.0}
    assert disagreeing_prompts(storage, weights) == {"p2", "p3"}
    tasks = label_tasks(storage, "rankings", disagreeing=True)
    assert sorted(t.prompt_id for t in tasks) == ["p2", "p3"]
    assert label_tasks(storage, "demonstrations", disagreeing=True)[0].prompt_id == "p2"
    assert sorted(t.prompt_id for t in label_tasks(storage, "rankings")) == ["p1", "p2", "p3", "p4"]  # p5: one


def test_disagreeing_compares_every_two_of_three_scorers(tmp_path: Path) -> None:
    """A third scorer that agrees with the first: p2 and p3 still count (it disagrees with the second)."""
    out = write_output(tmp_path / "out", ("long", "short", "longer"))
    storage = Storage.open(str(out))
    assert disagreeing_prompts(storage, labelling.scorer_weights(storage.read_json("manifest.json"))) == {"p2", "p3"}
    assert disagreeing_prompts(storage, {"long": 1.0, "longer": 1.0}) == set()  # two alike agree everywhere


def test_disagreeing_needs_two_scorers(tmp_path: Path) -> None:
    out = write_output(tmp_path / "out", ("long",))
    with pytest.raises(LabellingError, match="two scorers or more; this one has 1 \\(long\\)"):
        label_tasks(Storage.open(str(out)), "rankings", disagreeing=True)


# -- the stand-in Label Studio -------------------------------------------------------------

@dataclass
class Standin:
    """Label Studio's state and how it misbehaves; ``asked`` counts requests by (method, path)."""

    url: str = ""
    page_size: int = 30
    users_paginated: bool = False
    users: list[dict[str, Any]] = field(default_factory=lambda: [
        {"id": i, "email": f"person{i}@genflow.test"} for i in range(1, 46)])
    projects: list[dict[str, Any]] = field(default_factory=list)
    tasks: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    export_fault: str | None = None
    refresh_answer: dict[str, Any] | None = None
    redirect_projects_to: str | None = None
    echo_auth_on_error: bool = False
    asked: dict[tuple[str, str], int] = field(default_factory=dict)
    auth_seen: list[str] = field(default_factory=list)
    ids: Any = field(default_factory=lambda: itertools.count(1))

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/api/projects", self.list_projects)
        app.router.add_get("/api/projects/", self.list_projects)
        app.router.add_post("/api/projects", self.create_project)
        app.router.add_patch("/api/projects/{id}", self.patch_project)
        app.router.add_get("/api/projects/{id}/export", self.export)
        app.router.add_post("/api/projects/{id}/import", self.import_tasks)
        app.router.add_get("/api/users", self.list_users)
        app.router.add_post("/api/token/refresh/", self.refresh)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.asked[(request.method, request.path)] = self.asked.get((request.method, request.path), 0) + 1
        given = request.headers.get("Authorization", "")
        self.auth_seen.append(given)
        if request.path != "/api/token/refresh/" and given not in (f"Token {TOKEN}", f"Bearer {ACCESS}"):
            text = f"Invalid token: {given!r}" if self.echo_auth_on_error else "Invalid token"
            return web.json_response({"detail": text}, status=401)
        return await handler(request)

    def _page(self, request: web.Request, rows: list[dict[str, Any]]) -> web.Response:
        page = int(request.query.get("page", 1))
        size = min(int(request.query.get("page_size", self.page_size)), self.page_size)
        chunk = rows[(page - 1) * size:page * size]
        more = page * size < len(rows)
        return web.json_response({"count": len(rows), "next": f"{request.url.with_query(page=page + 1)}" if more
                                  else None, "previous": None, "results": chunk})

    async def list_projects(self, request: web.Request) -> web.StreamResponse:
        if self.redirect_projects_to and "redirected" not in request.query:
            raise web.HTTPFound(f"{self.redirect_projects_to}{request.path}?{request.query_string}&redirected=1")
        return self._page(request, self.projects)

    async def create_project(self, request: web.Request) -> web.Response:
        body = await request.json()
        project = {"id": next(self.ids), "title": body["title"], "label_config": body["label_config"]}
        self.projects.append(project)
        self.tasks[project["id"]] = []
        return web.json_response(project, status=201)

    async def patch_project(self, request: web.Request) -> web.Response:
        project = next(p for p in self.projects if p["id"] == int(request.match_info["id"]))
        project.update(await request.json())
        return web.json_response(project)

    async def import_tasks(self, request: web.Request) -> web.Response:
        tasks = self.tasks[int(request.match_info["id"])]
        for task in await request.json():
            tasks.append({"id": next(self.ids), "data": task["data"], "annotations": []})
        return web.json_response({"task_count": len(tasks)}, status=201)

    async def export(self, request: web.Request) -> web.StreamResponse:
        body = json.dumps(self.tasks[int(request.match_info["id"])]).encode()
        if self.export_fault == "cut":  # the connection closes before the length it announced
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.content_length = len(body)
            await response.prepare(request)
            await response.write(body[:len(body) // 2])
            assert request.transport is not None
            request.transport.close()
            return response
        if self.export_fault == "cut-unannounced":  # no length: the JSON just stops
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            await response.write(body[:len(body) // 2])
            await response.write_eof()
            return response
        if self.export_fault == "chunked":  # all of it, with no length announced
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            await response.write(body)
            await response.write_eof()
            return response
        return web.Response(body=body, content_type="application/json")

    async def list_users(self, request: web.Request) -> web.Response:
        if self.users_paginated:
            return self._page(request, self.users)
        return web.json_response(self.users)

    async def refresh(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.refresh_answer is not None:
            return web.json_response(self.refresh_answer)
        if body.get("refresh") != PAT:
            return web.json_response({"detail": "Token is invalid"}, status=401)
        return web.json_response({"access": ACCESS})

    # -- what people do ---------------------------------------------------------------------

    def project(self, title: str) -> dict[str, Any]:
        found = [p for p in self.projects if p["title"] == title]
        assert len(found) == 1, f"{len(found)} projects called {title!r}"
        return found[0]

    def rank(self, title: str, prompt_id: str, order: list[str], user: int, annotation_id: int) -> None:
        """A person orders the candidates (``order``: their generation ids, best first); the Ranker
        answers with the ids of the List's items, as Label Studio does."""
        task = next(t for t in self.tasks[self.project(title)["id"]] if t["data"]["prompt_id"] == prompt_id)
        item_of = {g: item for item, g in task["data"].get("genflow_candidates", {}).items()}
        order = [item_of.get(g, g) for g in order]
        task["annotations"].append({"id": annotation_id, "completed_by": user, "created_at": "2026-01-01T00:00:00Z",
                                    "was_cancelled": False, "result": [
                                        {"from_name": "rank", "to_name": "candidates", "type": "ranker",
                                         "value": {"ranker": {"rank": order}}}]})

    def answer(self, title: str, prompt_id: str, text: str, user: int, annotation_id: int) -> None:
        task = next(t for t in self.tasks[self.project(title)["id"]] if t["data"]["prompt_id"] == prompt_id)
        task["annotations"].append({"id": annotation_id, "completed_by": {"id": user}, "created_at": "2026-01-02",
                                    "result": [{"from_name": "answer", "to_name": "prompt", "type": "textarea",
                                                "value": {"text": [text]}}]})


@pytest.fixture
def standin() -> Any:
    state = Standin()
    server = BackgroundServer(state.app()).start()
    state.url = server.origin
    yield state
    server.stop()


@pytest.fixture
def genflow(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)

    def run(*args: str, code: int = 0) -> Result:
        result = CliRunner().invoke(app, list(args))
        assert result.exit_code == code, (result.output, result.exception)
        if code:
            assert isinstance(result.exception, SystemExit), result.exception  # a message, not a traceback
            assert "Traceback" not in result.output and result.output.startswith("error: ")
        return result

    return run


def _one_line(result: Result) -> str:
    return " ".join(result.output.split())


def _human(out: Path, folder: str) -> list[dict[str, Any]]:
    path = out / folder
    return pq.read_table(path).to_pylist() if path.exists() and any(path.iterdir()) else []


# -- push and pull ---------------------------------------------------------------------------

def test_a_project_past_the_first_page_of_the_list_is_found_not_created_again(standin: Standin, output: Path,
                                                                           genflow: Any) -> None:
    standin.projects += [{"id": next(standin.ids), "title": f"someone else's {i}", "label_config": "<View/>"}
                         for i in range(70)]  # three pages of 30 before ours
    said = genflow("label", "push", str(output), "--url", standin.url)
    assert "genflow handmade rankings: 4 tasks added, 0 there already" in _one_line(said)
    assert len(standin.projects) == 71
    standin.projects += [{"id": next(standin.ids), "title": f"later {i}", "label_config": "<View/>"} for i in range(5)]
    said = genflow("label", "push", str(output), "--url", standin.url)
    assert "0 tasks added, 4 there already" in _one_line(said)
    assert [p["title"] for p in standin.projects].count("genflow handmade rankings") == 1
    assert standin.asked[("POST", "/api/projects")] == 1
    assert standin.asked[("GET", "/api/projects")] >= 3 + 3  # each push read past the first page
    said = genflow("label", "push", str(output), "--url", standin.url, "--param", "max_pages=2", code=1)
    assert "more than max_pages (2) pages of projects" in _one_line(said)


def _labelled(standin: Standin, output: Path, genflow: Any) -> dict[str, Any]:
    """Push both kinds; people rank p1 and p2 and answer two prompts."""
    genflow("label", "push", str(output), "--url", standin.url)
    genflow("label", "push", str(output), "--url", standin.url, "--kind", "demonstrations")
    rankings, demos = "genflow handmade rankings", "genflow handmade demonstrations"
    standin.rank(rankings, "p1", [gid("p1", "a"), gid("p1", "b"), gid("p1", "c")], user=40, annotation_id=900)
    standin.rank(rankings, "p2", [gid("p2", "c"), gid("p2", "a")], user=2, annotation_id=901)
    standin.answer(demos, "p1", " a person's answer to p1", user=3, annotation_id=902)
    standin.answer(demos, "p3", " a person's answer to p3", user=40, annotation_id=903)
    return {"rankings": rankings, "demonstrations": demos}


def test_pulling_the_same_annotation_twice_writes_it_once(standin: Standin, output: Path, genflow: Any) -> None:
    _labelled(standin, output, genflow)
    # The same project pushed from two spellings of the address is known twice: its annotations
    # come back twice in one pull.
    genflow("label", "push", str(output), "--url", standin.url + "/")
    record = json.loads((output / "_labelling" / "label-studio.json").read_text())["projects"]
    assert [p["project"] for p in record].count("genflow handmade rankings") == 2
    said = genflow("label", "pull", str(output), "--url", standin.url)
    assert "human_rankings: 5 human rows" in said.output and "demonstrations: 2 human rows" in said.output
    rankings = _human(output, "human_rankings")
    assert sorted((r["ranking_id"], r["rank"], r["generation_id"]) for r in rankings) == [
        ("900", 1, "p1-a"), ("900", 2, "p1-b"), ("900", 3, "p1-c"), ("901", 1, "p2-c"), ("901", 2, "p2-a")]
    assert {r["annotator"] for r in rankings} == {"person40@genflow.test", "person2@genflow.test"}
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["labelling"]["rankings"] == 2 and manifest["rows"]["human_rankings"] == 5
    prefs = pq.read_table(output / "preferences" / "part-human.parquet").to_pylist()
    assert sorted((p["chosen_id"], p["rejected_id"], p["score_chosen"]) for p in prefs) == [
        ("p1-a", "p1-b", 1.0), ("p1-a", "p1-c", 1.0), ("p1-b", "p1-c", 1.0), ("p2-c", "p2-a", 1.0)]
    before = {f: _human(output, f) for f in ("human_rankings", "demonstrations")}
    genflow("label", "pull", str(output), "--url", standin.url)  # and a second pull changes nothing
    assert {f: _human(output, f) for f in before} == before


def test_a_ranking_that_lists_a_candidate_twice_keeps_its_best_place_with_a_warning(
        output: Path, caplog: pytest.LogCaptureFixture) -> None:
    storage = Storage.open(str(output))
    twice = Annotation(task_key("rankings", "p1"), "rankings", "p1", "ada", "2026", "7",
                       ranking=(gid("p1", "b"), gid("p1", "a"), gid("p1", "b"), gid("p1", "c")))
    with caplog.at_level(logging.WARNING, logger="genflow.labelling.labels"):
        assert labelling.write_pulled(storage, "label-studio", [twice]) == {"human_rankings": 3, "demonstrations": 0}
    rows = sorted((r["rank"], r["generation_id"]) for r in _human(output, "human_rankings"))
    assert rows == [(1, "p1-b"), (2, "p1-a"), (3, "p1-c")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "annotation 7 of prompt p1 lists a candidate more than once" in warnings[0]
    only = Annotation(task_key("rankings", "p2"), "rankings", "p2", "bo", "2026", "8",
                      ranking=(gid("p2", "a"), gid("p2", "a")))
    assert labelling.write_pulled(storage, "label-studio", [only])["human_rankings"] == 0  # one candidate: no order


def test_pulling_one_kind_keeps_the_other_kinds_rows(standin: Standin, output: Path, genflow: Any) -> None:
    _labelled(standin, output, genflow)
    genflow("label", "pull", str(output), "--url", standin.url)
    rankings, demos = _human(output, "human_rankings"), _human(output, "demonstrations")
    assert len(rankings) == 5 and len(demos) == 2
    sft = pq.read_table(output / "sft" / "part-human.parquet").to_pylist()
    assert sorted(r["prompt_id"] for r in sft) == ["p1", "p3"]

    said = genflow("label", "pull", str(output), "--url", standin.url, "--kind", "rankings")
    assert "demonstrations: 2 human rows" in said.output
    assert _human(output, "demonstrations") == demos and _human(output, "human_rankings") == rankings
    assert pq.read_table(output / "sft" / "part-human.parquet").to_pylist() == sft
    said = genflow("label", "pull", str(output), "--url", standin.url, "--kind", "demonstrations")
    assert "human_rankings: 5 human rows" in said.output
    assert _human(output, "human_rankings") == rankings and _human(output, "demonstrations") == demos

    # A project named with --project is remembered: a later pull of its kind keeps its rows too.
    genflow("label", "push", str(output), "--url", standin.url, "--project", "second opinions")
    standin.rank("second opinions", "p3", [gid("p3", "c"), gid("p3", "b")], user=5, annotation_id=950)
    genflow("label", "pull", str(output), "--url", standin.url, "--project", "second opinions", "--kind", "rankings")
    assert len(_human(output, "human_rankings")) == 7 and _human(output, "demonstrations") == demos
    genflow("label", "pull", str(output), "--url", standin.url, "--kind", "rankings")
    assert len(_human(output, "human_rankings")) == 7
    genflow("label", "pull", str(output), "--url", standin.url, "--kind", "answers", code=2)


def test_an_answer_holding_the_tools_key_is_not_written(standin: Standin, output: Path, genflow: Any) -> None:
    """A server (or a person) that puts the Label Studio key in an answer must not make it
    training data (issue 23): that annotation is left out, the others are written."""
    _labelled(standin, output, genflow)
    standin.answer("genflow handmade demonstrations", "p2", f"my key is {TOKEN}", user=3, annotation_id=904)
    genflow("label", "pull", str(output), "--url", standin.url)
    demos = _human(output, "demonstrations")
    assert sorted(d["prompt_id"] for d in demos) == ["p1", "p3"]
    written = b"".join(p.read_bytes() for p in output.rglob("*") if p.is_file())
    assert TOKEN[:16].encode() not in written and b"my key is" not in written


@pytest.mark.parametrize("value", [None, {"text": [42]}, {"text": "one string"}, "a string"])
def test_an_annotation_genflow_cannot_read_is_left_out_and_the_others_are_written(
        standin: Standin, output: Path, genflow: Any, value: Any, caplog: pytest.LogCaptureFixture) -> None:
    """One person's odd answer (a null value, a number for a text) costs that answer, not the pull."""
    _labelled(standin, output, genflow)
    standin.answer("genflow handmade demonstrations", "p2", "placeholder", user=3, annotation_id=905)
    task = next(t for t in standin.tasks[standin.project("genflow handmade demonstrations")["id"]]
                if t["data"]["prompt_id"] == "p2")
    task["annotations"][-1]["result"][0]["value"] = value
    with caplog.at_level("WARNING"):
        genflow("label", "pull", str(output), "--url", standin.url)
    assert sorted(d["prompt_id"] for d in _human(output, "demonstrations")) == ["p1", "p3"]
    assert len(_human(output, "human_rankings")) > 0
    assert "annotation 905 left out" in caplog.text


def test_an_annotation_removed_from_the_tool_leaves_the_output_at_the_next_pull(standin: Standin, output: Path,
                                                                             genflow: Any) -> None:
    titles = _labelled(standin, output, genflow)
    genflow("label", "pull", str(output), "--url", standin.url)
    for title in titles.values():
        for task in standin.tasks[standin.project(title)["id"]]:
            task["annotations"] = []
    genflow("label", "pull", str(output), "--url", standin.url)
    assert not _human(output, "human_rankings") and not _human(output, "demonstrations")
    assert not (output / "preferences" / "part-human.parquet").exists()
    assert not (output / "sft" / "part-human.parquet").exists()
    manifest = json.loads((output / "manifest.json").read_text())
    assert "labelling" not in manifest and "human_agreement" not in manifest
    assert manifest["rows"]["human_rankings"] == 0


def test_users_listed_in_pages_name_every_annotator(standin: Standin, output: Path, genflow: Any) -> None:
    _labelled(standin, output, genflow)
    standin.users_paginated = True  # 45 users, 30 a page: person40 is on the second
    genflow("label", "pull", str(output), "--url", standin.url)
    assert {r["annotator"] for r in _human(output, "human_rankings")} == {"person40@genflow.test",
                                                                            "person2@genflow.test"}
    assert {r["annotator"] for r in _human(output, "demonstrations")} == {"person3@genflow.test",
                                                                            "person40@genflow.test"}


@pytest.mark.parametrize("fault", ["cut", "cut-unannounced"])
def test_an_export_cut_short_is_one_clear_line(standin: Standin, output: Path, genflow: Any, fault: str) -> None:
    _labelled(standin, output, genflow)
    standin.export_fault = fault
    said = genflow("label", "pull", str(output), "--url", standin.url, code=1)
    assert "/export" in said.output and "cut short" in said.output
    assert not _human(output, "human_rankings")  # nothing half-written


@pytest.mark.parametrize("answer", [{"refresh": "no access here"}, {"access": None}, {}])
def test_a_token_exchange_without_an_access_token_is_one_clear_line(standin: Standin, output: Path, genflow: Any,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   answer: dict[str, Any]) -> None:
    monkeypatch.setenv("LABEL_STUDIO_PAT", PAT)
    genflow("label", "push", str(output), "--url", standin.url, "--api-key-env", "LABEL_STUDIO_PAT")  # it works
    standin.refresh_answer = answer
    said = genflow("label", "pull", str(output), "--url", standin.url, "--api-key-env", "LABEL_STUDIO_PAT", code=1)
    assert "not an access token" in said.output and "LABEL_STUDIO_PAT" in said.output
    assert PAT not in said.output and PAT[:8] not in said.output


def test_the_key_never_follows_a_redirect_to_another_host(standin: Standin, output: Path, genflow: Any) -> None:
    elsewhere = Standin()
    server = BackgroundServer(elsewhere.app()).start()
    try:
        standin.redirect_projects_to = f"http://localhost:{server.port}"
        said = genflow("label", "push", str(output), "--url", standin.url, code=1)
    finally:
        server.stop()
    assert f"redirected it to http://localhost:{server.port}" in _one_line(said)
    assert elsewhere.asked == {}  # not even without the key
    assert TOKEN not in said.output


def test_a_redirect_to_the_same_address_is_followed_with_the_key(standin: Standin, output: Path,
                                                                 genflow: Any) -> None:
    standin.redirect_projects_to = standin.url
    said = genflow("label", "push", str(output), "--url", standin.url)
    assert "4 tasks added" in said.output and standin.project("genflow handmade rankings")
    assert standin.asked[("GET", "/api/projects")] == 2  # each list of projects: once redirected, once answered


def test_an_error_body_that_echoes_the_key_is_scrubbed(standin: Standin, output: Path, genflow: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    standin.echo_auth_on_error = True
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN + "-not-this-servers")
    said = genflow("label", "push", str(output), "--url", standin.url, code=1)
    assert "HTTP 401" in said.output and "Invalid token" in said.output and "***" in said.output
    assert TOKEN not in said.output and TOKEN[:8] not in said.output
    from genflow.plugins.labelling.label_studio import LabelStudio, LabelStudioError, LabelStudioParams

    plugin = LabelStudio(LabelStudioParams(url=standin.url))  # the plugin's own message, before any scrubber
    with pytest.raises(LabelStudioError, match="HTTP 401") as raised:
        plugin.pull("anything", "rankings")
    assert TOKEN[:8] not in str(raised.value) and "Invalid token: 'Token ***'" in str(raised.value)


def test_an_export_past_max_export_bytes_is_one_clear_line(standin: Standin, output: Path, genflow: Any) -> None:
    _labelled(standin, output, genflow)
    size = len(json.dumps(standin.tasks[standin.project("genflow handmade rankings")["id"]]))
    limit = str(size - 1)
    said = genflow("label", "pull", str(output), "--url", standin.url, "--param", f"max_export_bytes={limit}",
                   code=1)
    assert "max_export_bytes" in said.output and "/export" in said.output
    standin.export_fault = "chunked"  # no length announced: counted as it is read
    said = genflow("label", "pull", str(output), "--url", standin.url, "--param", f"max_export_bytes={limit}",
                   code=1)
    assert "max_export_bytes" in said.output
    assert not _human(output, "human_rankings")
    genflow("label", "pull", str(output), "--url", standin.url, "--param", f"max_export_bytes={size * 4}")
    assert len(_human(output, "human_rankings")) == 5
    assert not math.isnan(json.loads((output / "manifest.json").read_text())["labelling"]["rankings"])


# -- what labellers see, and the views a pull refreshes -------------------------------------------

def test_labellers_read_no_generation_id_and_their_order_maps_back(standin: Standin, output: Path,
                                                                   genflow: Any) -> None:
    """What the labelling page renders (the task data the config names with ``$``) holds no
    generation id; a Ranker's answer of the items' ids is read back as generation ids."""
    genflow("label", "push", str(output), "--url", standin.url)
    project = standin.project("genflow handmade rankings")
    rendered = re.findall(r'value="\$(\w+)"', project["label_config"])
    assert rendered == ["prompt", "candidates"]
    tasks = {t["data"]["prompt_id"]: t for t in standin.tasks[project["id"]]}
    all_ids = {gid(p, c) for p, cs in SCORES.items() for c in cs}
    for prompt_id, task in tasks.items():
        shown = json.dumps({key: task["data"][key] for key in rendered})
        assert not [g for g in all_ids if g in shown], shown
        items = task["data"]["candidates"]
        assert [i["id"] for i in items] == list("ABC")  # the one name the page shows of each
        mapping = task["data"]["genflow_candidates"]
        assert sorted(mapping.values()) == sorted(gid(prompt_id, c) for c in SCORES[prompt_id])
        assert [i["body"] for i in items] == [f" answer {mapping[i['id']][-1]} to {prompt_id}" for i in items]
    # A person drags the items into C, A, B; Label Studio answers with the items' ids.
    item_ids = {v: k for k, v in tasks["p1"]["data"]["genflow_candidates"].items()}
    tasks["p1"]["annotations"].append({"id": 77, "completed_by": 1, "created_at": "2026-01-03", "result": [
        {"from_name": "rank", "to_name": "candidates", "type": "ranker",
         "value": {"ranker": {"rank": [item_ids[gid("p1", c)] for c in "cab"]}}}]})
    genflow("label", "pull", str(output), "--url", standin.url)
    assert [(r["rank"], r["generation_id"]) for r in sorted(_human(output, "human_rankings"),
                                                           key=lambda r: r["rank"])] == [
        (1, "p1-c"), (2, "p1-a"), (3, "p1-b")]


def _table_after(text: str, heading: str, row: str) -> list[list[str]]:
    """The cells of the table under ``heading`` (an HTML ``<h2>`` or a markdown ``##``), each row
    matched by ``row``: a regex with the cells as groups."""
    start = text.index(heading)
    end = text.find("<h2>" if "<h2>" in heading else "\n## ", start + len(heading))
    return [[html.unescape(c).strip() for c in m] for m in re.findall(row, text[start:end if end > 0 else None])]


def test_a_pull_refreshes_the_report_and_the_dataset_card_with_the_agreement(
        standin: Standin, output: Path, genflow: Any, caplog: pytest.LogCaptureFixture) -> None:
    from genflow.outputs.dataset_card import write_card
    from genflow.outputs.report import write_report
    from genflow.outputs.report.render import fmt

    storage = Storage.open(str(output))
    write_report(storage, storage.read_json("manifest.json"))  # as the job left them: nobody had labelled
    write_card(storage, storage.read_json("manifest.json"))
    assert "Agreement with human rankings" not in (output / "report.html").read_text()
    assert "Agreement with people" not in (output / "README.md").read_text()
    _labelled(standin, output, genflow)
    # A Prefect server set but not answering: a warning, and the pull still refreshes the files.
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}), \
            caplog.at_level(logging.WARNING):
        said = genflow("label", "pull", str(output), "--url", standin.url)
    assert f"refreshed report.html: {output / 'report.html'}" in said.output
    assert f"refreshed README.md: {output / 'README.md'}" in said.output
    assert "Prefect" not in said.output
    [warning] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.startswith("the Prefect API at http://127.0.0.1:") and "does not answer" in warning

    found = json.loads((output / "manifest.json").read_text())["human_agreement"]
    figures = [[r["scorer"], *(fmt(r[k]) for k in ("pairwise_accuracy", "pairs", "kendall_tau", "prompts"))]
               for r in found["scorers"]]
    # By hand: p1 a>b>c, p2 c>a. "long" orders p1's three pairs their way and p2's pair the other: 3 of 4;
    # "short" all 4; combined (long + short) orders p1 their way and ties p2's pair (4 and 4): 3 of 3.
    assert [row[:3] for row in figures] == [["long", "0.750", "4"], ["short", "1.000", "4"],
                                            ["combined", "1.000", "3"]]
    report = (output / "report.html").read_text()
    assert _table_after(report, "<h2>Agreement with human rankings</h2>",
                        r"<tr>" + r"<td[^>]*>([^<]*)</td>" * 5 + r"</tr>") == figures
    card = (output / "README.md").read_text()
    header, *rows = _table_after(card, "## Agreement with people", r"\n\| " + r"([^|\n]*) \| " * 4 + r"([^|\n]*) \|")
    assert header == ["scorer", "pairwise accuracy", "pairs", "Kendall τ", "prompts"] and rows == figures
    assert f"{found['rankings']} rankings of {found['prompts']} prompts by {found['annotators']} people" in card
    assert card.startswith("---\n") and "config_name: human_rankings" in card  # the card lists the new folder


def test_a_pull_whose_report_cannot_be_built_says_so_and_keeps_the_rows(standin: Standin, output: Path,
                                                                        genflow: Any) -> None:
    manifest = json.loads((output / "manifest.json").read_text())
    del manifest["status"]  # the page cannot be built from it; the card can
    (output / "manifest.json").write_text(json.dumps(manifest))
    _labelled(standin, output, genflow)
    said = genflow("label", "pull", str(output), "--url", standin.url)
    assert f"report.html not refreshed (see the warning above): `genflow report {output}` rebuilds it" in (
        _one_line(said))
    assert f"refreshed README.md: {output / 'README.md'}" in said.output
    assert len(_human(output, "human_rankings")) == 5 and not (output / "report.html").exists()


# -- what people's labels become, by hand -------------------------------------------------------

def _judgements(*orders: tuple[str, str, list[int]]) -> list[labelling.HumanRanking]:
    """(prompt, annotator, sample indexes best first) -> Judgements of candidates ``<prompt>-s<k>``."""
    return [labelling.HumanRanking(p, who, f"label-studio:{i}", tuple(f"{p}-s{k}" for k in order))
            for i, (p, who, order) in enumerate(orders)]


# "length" scores sample k as k + 1, "short" as -(k + 1) with half the weight: combined = length's order.
LENGTHS = {p: {f"{p}-s{k}": {"length": k + 1.0, "short": -(k + 1.0)} for k in range(3)} for p in ("p1", "p2")}
WEIGHTS = {"length": 1.0, "short": 0.5}


def test_agreement_with_people_worked_out_by_hand() -> None:
    found = _judgements(("p1", "ada", [2, 1, 0]), ("p1", "bo", [1, 2, 0]), ("p2", "ada", [0, 1, 2]))
    agreement = labelling.human_agreement(found, LENGTHS, WEIGHTS)
    assert (agreement["rankings"], agreement["prompts"], agreement["annotators"]) == (3, 2, 2)
    # Pairwise accuracy of length: p1 by ada 3/3, p1 by bo 2/3, p2 by ada 0/3 -> 5/9. Kendall tau
    # against wins minus losses: p1 s0 -4, s1 +2, s2 +2 (a tie) -> 2/sqrt(6); p2 reversed -> -1.
    tau_p1 = 2 / math.sqrt(6)
    expected = {"length": (5 / 9, (tau_p1 - 1) / 2), "short": (4 / 9, (1 - tau_p1) / 2),
                "combined": (5 / 9, (tau_p1 - 1) / 2)}
    rows = {r["scorer"]: r for r in agreement["scorers"]}
    assert list(rows) == ["length", "short", "combined"]
    for name, (accuracy, tau) in expected.items():
        assert (rows[name]["pairs"], rows[name]["prompts"]) == (9, 2)
        assert rows[name]["pairwise_accuracy"] == pytest.approx(accuracy, abs=1e-6)
        assert rows[name]["kendall_tau"] == pytest.approx(tau, abs=1e-6)
    # ada and bo on p1: 2 pairs alike, 1 not -> tau 1/3, agreement 2/3.
    inter = agreement["inter_annotator"]
    assert (inter["prompts"], inter["annotator_pairs"], inter["pairs"]) == (1, 1, 3)
    assert inter["kendall_tau"] == pytest.approx(1 / 3, abs=1e-6) and inter["agreement"] == pytest.approx(2 / 3)


def test_agreement_leaves_out_what_a_scorer_did_not_score() -> None:
    scores = {"p1": {"p1-s0": {"length": 1.0}, "p1-s1": {"length": 2.0, "short": -2.0},
                     "p1-s2": {"length": 3.0, "short": -3.0}}}
    agreement = labelling.human_agreement(_judgements(("p1", "ada", [2, 1, 0])), scores, WEIGHTS)
    rows = {r["scorer"]: r for r in agreement["scorers"]}
    assert (rows["length"]["pairs"], rows["length"]["pairwise_accuracy"], rows["length"]["kendall_tau"]) == (
        3, 1.0, 1.0)
    assert (rows["short"]["pairs"], rows["short"]["pairwise_accuracy"], rows["short"]["kendall_tau"]) == (
        1, 0.0, -1.0)
    assert rows["combined"]["pairs"] == 1  # only where every scorer scored
    assert agreement["inter_annotator"] is None  # one person
    unscored = labelling.human_agreement(_judgements(("p1", "ada", [2, 1])), {}, WEIGHTS)
    assert {r["scorer"]: (r["pairs"], r["pairwise_accuracy"], r["kendall_tau"], r["prompts"])
            for r in unscored["scorers"]} == {n: (0, None, None, 0) for n in ("length", "short", "combined")}
    assert labelling.human_agreement(_judgements(("p1", "ada", [2, 1])), {}, {})["scorers"] == []


def test_net_wins_counts_each_candidate_over_every_order() -> None:
    assert labelling.net_wins([("a", "b", "c"), ("b", "a")]) == {"a": 2 - 1, "b": 1 + 1 - 1, "c": -2}
    assert labelling.net_wins([]) == {}


def test_human_pairs_take_the_majority_and_leave_ties_out() -> None:
    found = _judgements(("p1", "ada", [2, 1, 0]), ("p1", "bo", [1, 2, 0]), ("p1", "cy", [2, 1, 0]),
                        ("p2", "ada", [0, 1]), ("p2", "bo", [1, 0]))
    generations = {f"{p}-s{k}": {"prompt": f"prompt {p}", "text": f"text {p} {k}", "image_path": None}
                   for p in ("p1", "p2") for k in range(3)}
    generations["p1-s0"] = {"prompt": "prompt p1", "text": None, "image_path": "images/p1/s0.png"}
    from genflow.api import HumanLabels
    from genflow.data.schemas import DEMONSTRATIONS
    from genflow.plugins.training_data.exporters import PreferencePairs, PreferenceParams

    labels = HumanLabels(tuple(found), generations, DEMONSTRATIONS.empty_table())
    pairs = PreferencePairs(PreferenceParams()).export_human(labels).to_pylist()
    assert [(r["prompt_id"], r["chosen_id"], r["rejected_id"], round(r["score_chosen"], 6),
             round(r["score_rejected"], 6)) for r in pairs] == [
        ("p1", "p1-s1", "p1-s0", 1.0, 0.0), ("p1", "p1-s2", "p1-s0", 1.0, 0.0),
        ("p1", "p1-s2", "p1-s1", round(2 / 3, 6), round(1 / 3, 6))]  # p2: one vote each way, left out
    first = pairs[0]
    assert (first["prompt"], first["chosen"], first["rejected"], first["source"]) == (
        "prompt p1", "text p1 1", "images/p1/s0.png", "human")


def test_choosing_prompts_is_seeded_and_pushing_again_chooses_the_same() -> None:
    ids = [f"p{i}" for i in range(20)]
    drawn = labelling.choose_prompts(ids, 5, seed=3)
    assert len(drawn) == 5 and drawn == sorted(drawn) and set(drawn) <= set(ids)
    assert labelling.choose_prompts(reversed(ids), 5, seed=3) == drawn
    assert labelling.choose_prompts(ids, 5, seed=4) != drawn
    assert labelling.choose_prompts(ids, None, seed=3) == sorted(ids)
    assert labelling.choose_prompts(ids, 20, seed=3) == sorted(ids)
    assert labelling.choose_prompts(ids, 3, seed=3, only={"p1", "p2", "zz"}) == ["p1", "p2"]
    assert task_key("rankings", "p1", ["b", "a"]) == task_key("rankings", "p1", ["a", "b"]) != task_key(
        "rankings", "p1", ["a"])
    assert task_key("rankings", "p1").startswith("genflow-rankings-")


def test_ranking_tasks_show_every_candidate_in_an_order_fixed_per_task(output: Path) -> None:
    storage = Storage.open(str(output))
    tasks = {t.prompt_id: t for t in label_tasks(storage, "rankings")}
    again = {t.prompt_id: t for t in label_tasks(storage, "rankings")}
    assert tasks == again
    orders = {p: [c.generation_id for c in t.candidates] for p, t in tasks.items()}
    assert all(sorted(o) == [gid(p, c) for c in "abc"] for p, o in orders.items())
    assert len({tuple(c[-1] for c in o) for o in orders.values()}) > 1  # not one order for all
    t = tasks["p2"]
    assert (t.kind, t.prompt, t.key) == ("rankings", "prompt p2", task_key("rankings", "p2", orders["p2"]))
    assert {c.generation_id: (c.modality, c.text) for c in t.candidates} == {
        gid("p2", c): ("text", f" answer {c} to p2") for c in "abc"}
    demos = label_tasks(storage, "demonstrations", sample=2, seed=1)
    assert [(d.kind, d.candidates, d.prompt) for d in demos] == [("demonstrations", (), f"prompt {d.prompt_id}")
                                                                 for d in demos] and len(demos) == 2
    with pytest.raises(LabellingError, match="unknown kind of task 'answers'"):
        label_tasks(storage, "answers")


def test_push_remembers_each_project_once_and_refuses_an_empty_push(standin: Standin, output: Path,
                                                                      genflow: Any, tmp_path: Path) -> None:
    for _ in range(2):
        genflow("label", "push", str(output), "--url", standin.url, "--sample", "1")
    record = json.loads((output / "_labelling" / "label-studio.json").read_text())
    assert record == {"projects": [{"project": "genflow handmade rankings", "kind": "rankings", "url": standin.url}]}
    agreeing = write_output(tmp_path / "agreeing", ("long", "longer"))
    said = genflow("label", "push", str(agreeing), "--url", standin.url, "--disagreeing", code=2)
    assert "no prompt to push where the scorers disagree" in said.output
    said = genflow("label", "pull", str(agreeing), "--url", standin.url, code=2)
    assert "was not pushed to label-studio from here" in said.output
    said = genflow("label", "push", str(tmp_path), "--url", standin.url, code=2)
    assert "no manifest.json" in said.output


def test_human_rows_instead_of_the_models_leave_the_labelled_prompts_model_rows(output: Path) -> None:
    storage = Storage.open(str(output))
    model = [{"prompt_id": p, "chosen_id": gid(p, "a"), "source": "model"} for p in ("p1", "p2")]
    storage.write_table("preferences/part-00000.parquet", pa.Table.from_pylist(model))
    storage.write_table("preferences/part-00001.parquet", pa.Table.from_pylist(model[:1]))
    for shard in (0, 1):
        storage.write_json(f"_state/rank/0000{shard}.json", {
            "fingerprint": "f", "rows": {"preferences": 2 - shard},
            "parts": [f"preferences/part-0000{shard}.parquet", f"rankings/part-0000{shard}.parquet"]})
    labelling.write_pulled(storage, "label-studio", [
        Annotation(task_key("rankings", "p1"), "rankings", "p1", "ada", "2026", "1", ranking=(gid("p1", "c"),
                                                                                          gid("p1", "a")))])
    manifest = storage.read_json("manifest.json")
    manifest["config"]["labelling"] = {"human_rows": "instead"}
    manifest = labelling.refresh(storage, manifest)
    assert storage.read_table("preferences/part-00000.parquet").to_pylist() == model[1:]
    assert not storage.exists("preferences/part-00001.parquet")  # nothing left: the part goes
    assert storage.read_json("_state/rank/00000.json")["rows"]["preferences"] == 1
    assert storage.read_json("_state/rank/00001.json")["parts"] == ["rankings/part-00001.parquet"]
    human = storage.read_table("preferences/part-human.parquet").to_pylist()
    assert [(r["prompt_id"], r["chosen_id"], r["rejected_id"]) for r in human] == [("p1", "p1-c", "p1-a")]
    assert manifest["labelling"]["human_rows"] == "instead" and manifest["rows"]["preferences"] == 2
    sections = human_sections(manifest)
    assert [s.title for s in sections] == ["Agreement with human rankings"]
    assert [row[0] for row in sections[0].rows] == ["long", "short", "combined"]
    assert human_sections({"human_agreement": {"scorers": []}}) == []


def test_label_studio_task_data_and_annotations_read_back() -> None:
    from genflow.api import LabelCandidate, LabelTask
    from genflow.plugins.labelling.label_studio import read_annotation, task_data

    candidates = tuple(LabelCandidate(f"g{i}", "text", f"text {i}") for i in range(27))
    data = task_data(LabelTask("key-1", "rankings", "p1", "the prompt",
                               (LabelCandidate("img", "image", None, b"\x89PNG"), *candidates)))
    assert {k: data[k] for k in ("genflow_key", "genflow_kind", "prompt_id", "prompt")} == {
        "genflow_key": "key-1", "genflow_kind": "rankings", "prompt_id": "p1", "prompt": "the prompt"}
    items = data["candidates"]
    assert items[0] == {"id": "A", "html": '<img src="data:image/png;base64,iVBORw=="/>'}
    assert items[1] == {"id": "B", "body": "text 0"}
    assert [i["id"] for i in items[25:]] == ["Z", "#27", "#28"]
    assert data["genflow_candidates"] == {"A": "img", **{i["id"]: f"g{n}" for n, i in enumerate(items[1:])}}
    assert "candidates" not in task_data(LabelTask("key-2", "demonstrations", "p1", "the prompt"))

    users = {7: "ada@genflow.test"}
    ranked = {"id": 11, "completed_by": {"id": 7}, "created_at": "2026-01-01", "result": [
        {"from_name": "other", "type": "ranker", "value": {"ranker": {"rank": ["x"]}}},
        {"from_name": "rank", "type": "ranker", "value": {"ranker": {"rank": ["C", "#28", "A", 2]}}}]}
    assert read_annotation(ranked, data, "rankings", users) == Annotation(  # the items' ids, read back
        "key-1", "rankings", "p1", "ada@genflow.test", "2026-01-01", "11", ranking=("g1", "g26", "img", "2"))
    pushed_before = {k: v for k, v in data.items() if k != "genflow_candidates"}  # items' ids were generation ids
    ranked["result"][1]["value"]["ranker"]["rank"] = ["g1", 2]
    assert read_annotation(ranked, pushed_before, "rankings", users) == Annotation(
        "key-1", "rankings", "p1", "ada@genflow.test", "2026-01-01", "11", ranking=("g1", "2"))
    written = {"id": 12, "completed_by": 8, "result": [
        {"from_name": "answer", "type": "textarea", "value": {"text": ["line one", "line two"]}}]}
    assert read_annotation(written, data, "demonstrations", users) == Annotation(
        "key-1", "demonstrations", "p1", "8", "", "12", completion="line one\nline two")
    assert read_annotation({"id": 13, "result": [{"from_name": "answer", "type": "textarea", "value": {}}]},
                           data, "demonstrations", users) is None
    assert read_annotation(ranked, data, "demonstrations", users) is None  # no answer in a ranking

"""Label Studio as genflow's labelling tool, over its REST API (no SDK: plain HTTP).

A ranking task shows the prompt and its candidates in a ``<List>`` that the labeller
orders best to worst with ``<Ranker>`` (drag and drop); text goes as text (Label Studio
escapes it), code as escaped text inside ``<pre>`` (monospace), both shown with their line
breaks and indentation (:data:`STYLE`), images as ``<img>`` with the PNG inlined as a data
URI, so no file serving is needed. A demonstration task shows the prompt and a ``<TextArea>``
for the answer. Each task's data holds ``genflow_key``; a push lists the project's
tasks and imports only the keys it lacks.

Label Studio shows a ``<List>`` item's ``id`` under its text, and a ``<Ranker>`` answers
with those ids. So an item's id is its letter (``A``, ``B``...), the one name the labeller
reads for it, never the candidate's generation id: that is noise to a person. The letters'
generation ids go in the task data under ``genflow_candidates``, which the labelling
config does not name (so the labelling page never shows it), and a pull reads the
labeller's order of letters back through it. A task pushed before this (its items'
ids were generation ids, with no ``genflow_candidates``) is read as it was written.

The key: a personal access token (Label Studio 1.23's default, a JWT refresh token,
exchanged for an access token at ``/api/token/refresh/``), or a legacy API token
(``Authorization: Token``). Either is read from the variable ``api_key_env`` names.
It goes only to the address asked: a redirect to another host (or scheme, or port) is
refused, never followed with the key; an error body that echoes it, or the access
token, is scrubbed before it is shown. An answer is read up to ``max_export_bytes``
(the export of a project, with its candidates' images inlined, is the largest); an
answer cut short, not JSON, or not of the shape Label Studio gives is one clear error.
"""

from __future__ import annotations

import base64
import html
import http.client
import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any, ClassVar
from xml.sax.saxutils import quoteattr

from pydantic import Field

from genflow import hookimpl
from genflow.api import Annotation, Labeller, LabelTask, PluginParams, PushResult
from genflow.hookspecs import Register
from genflow.secrets import Scrubber, Secret

log = logging.getLogger(__name__)

RANKER = "rank"
ANSWER = "answer"
CANDIDATE_IDS = "genflow_candidates"
"""The task data's key of each item's generation id (item id -> generation id): no ``$`` of the
labelling config names it, so the labelling page does not show it."""

STYLE = """  <Style>
    .lsf-richtext__container, .htx-ranker-item p, .htx-ranker-item pre {
      white-space: pre-wrap; overflow-wrap: anywhere; tab-size: 4;
    }
    .htx-ranker-item pre { margin: 0; font-family: var(--font-mono, monospace) !important; }
  </Style>"""
"""Text as written: Label Studio's page collapses runs of spaces (a ``<Text>`` keeps its line breaks
as ``<br/>``, not its indentation) and a ``<List>`` item's line breaks too, so a haiku shows on
one line and code loses its shape. ``htx-ranker-item`` is the class Label Studio (1.23) documents
for styling a ``<List>`` item, ``lsf-richtext__container`` the element a ``<Text>`` shows its
text in; the data manager sets every font ``!important``, so code's monospace is too. The
candidates' text still goes as text (code escaped inside ``<pre>``), never as markup."""

LABEL_CONFIGS = {
    "rankings": f"""<View>
{STYLE}
  <Header value="Prompt"/>
  <Text name="prompt" value="$prompt"/>
  <Header value="Drag the answers into order: best at the top, worst at the bottom"/>
  <List name="candidates" value="$candidates" title="Answers"/>
  <Ranker name={quoteattr(RANKER)} toName="candidates"/>
</View>""",
    "demonstrations": f"""<View>
{STYLE}
  <Header value="Prompt"/>
  <Text name="prompt" value="$prompt"/>
  <Header value="Write the answer you would want the model to give"/>
  <TextArea name={quoteattr(ANSWER)} toName="prompt" rows="8" maxSubmissions="1" required="true"/>
</View>""",
}


MAX_ANSWER_BYTES = 64 * 2**20
"""The most bytes of an answer other than an export (a page of projects or users is kilobytes)."""


class LabelStudioError(RuntimeError):
    """Label Studio answered with an error, or could not be reached."""


class LabelStudioParams(PluginParams):
    url: str = Field("http://127.0.0.1:8080", description="Label Studio's address.")
    api_key_env: str = Field("LABEL_STUDIO_API_KEY", description="The environment variable holding the "
                             "key: a personal access token or a legacy API token (Account & Settings).")
    timeout_s: float = Field(60.0, gt=0, description="Seconds one request may take.")
    max_export_bytes: int = Field(512 * 2**20, gt=0, description="The most bytes a project's export (its "
                                  "tasks, images inlined, and annotations) may hold: past it, one clear error.")
    max_pages: int = Field(1000, gt=0, description="The most pages of a list (projects, users) read: a "
                           "server that lists more is answered with an error, not followed forever.")


class LabelStudio(Labeller):
    """Label Studio: ranking and demonstration projects over its REST API."""

    Params: ClassVar[type[PluginParams]] = LabelStudioParams
    description: ClassVar[str] = "Label Studio projects: rank candidates (Ranker), write demonstrations (TextArea)"
    unhashed_params: ClassVar[tuple[str, ...]] = ("url", "api_key_env", "timeout_s", "max_export_bytes",
                                                  "max_pages")
    params: LabelStudioParams

    def __init__(self, params: PluginParams) -> None:
        super().__init__(params)
        self.base = self.params.url.rstrip("/")
        self._auth: str | None = None
        self._secrets: list[Secret] = []
        self._opener = urllib.request.build_opener(_SameOriginRedirects())

    @classmethod
    def secret_env(cls, params: PluginParams) -> list[str]:
        return [params.api_key_env]  # type: ignore[attr-defined]

    # -- HTTP -----------------------------------------------------------------------

    def scrub(self, text: str) -> str:
        """``text`` without the key or the access token it was exchanged for (an error body may echo them)."""
        return Scrubber(self._secrets).scrub(text)

    def _authorization(self) -> str:
        if self._auth is None:
            env = self.params.api_key_env
            key = os.environ.get(env, "").strip()
            if not key:
                raise LabelStudioError(f"no Label Studio key: set {env} to a personal access "
                                       "token or an API token (Label Studio: Account & Settings)")
            self._secrets.append(Secret(key, f"${env}"))
            if key.count(".") == 2:  # a personal access token: a JWT refresh token
                answer = self._send("POST", "/api/token/refresh/", {"refresh": key}, auth=False)
                access = answer.get("access") if isinstance(answer, dict) else None
                if not isinstance(access, str) or not access.strip():
                    got = f"an object with {', '.join(sorted(map(str, answer))) or 'nothing'}" if isinstance(
                        answer, dict) else f"a {type(answer).__name__}"
                    raise LabelStudioError(f"Label Studio at {self.base} answered the exchange of {env}'s personal "
                                           f"access token with {got}, not an access token: is {env} a personal "
                                           "access token of this server?")
                self._secrets.append(Secret(access, "Label Studio's access token"))
                self._auth = f"Bearer {access}"
            else:
                self._auth = f"Token {key}"
        return self._auth

    def _send(self, method: str, path: str, body: Any = None, auth: bool = True, export: bool = False) -> Any:
        """Label Studio's JSON answer; every failure a :class:`LabelStudioError` of one line. An answer is
        read up to ``max_export_bytes`` for an ``export``, :data:`MAX_ANSWER_BYTES` for anything else."""
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if auth:
            headers["Authorization"] = self._authorization()
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        where = f"Label Studio {method} {path}"
        limit = self.params.max_export_bytes if export else MAX_ANSWER_BYTES
        try:
            with self._opener.open(request, timeout=self.params.timeout_s) as response:
                length = response.headers.get("Content-Length", "")
                if length.isdigit() and int(length) > limit:
                    raise self._too_large(where, export, limit, f"{int(length):,} bytes")
                raw = response.read(limit + 1)
                if len(raw) > limit:
                    raise self._too_large(where, export, limit, "more")
        except urllib.error.HTTPError as exc:
            detail = self.scrub(exc.read(64 * 1024).decode(errors="replace"))[:500]
            hint = f" (is {self.params.api_key_env} a key of this server?)" if exc.code in (401, 403) else ""
            raise LabelStudioError(f"{where}: HTTP {exc.code}{hint}: {detail}") from None
        except _Refused as exc:
            elsewhere = self.scrub(str(exc.reason))
            raise LabelStudioError(f"{where}: Label Studio at {self.base} redirected it to {elsewhere}; the key is "
                                   "sent to no other address: give --url the address Label Studio answers at") from None
        except http.client.HTTPException as exc:  # IncompleteRead, a broken status line...
            raise LabelStudioError(f"{where}: the answer was cut short ({type(exc).__name__}); try again") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = self.scrub(str(getattr(exc, "reason", exc)))
            raise LabelStudioError(f"cannot reach Label Studio at {self.base}: {reason}; start it with "
                                   "`label-studio start` or pass its address with --url") from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise LabelStudioError(f"{where}: the answer is not complete JSON ({len(raw):,} bytes: "
                                   f"{self.scrub(str(exc))}); it may have been cut short: try again") from None

    def _too_large(self, where: str, export: bool, limit: int, size: str) -> LabelStudioError:
        if not export:
            return LabelStudioError(f"{where}: the answer is larger than {limit:,} bytes (it has {size}); is "
                                    f"{self.base} Label Studio?")
        return LabelStudioError(f"{where}: the export is larger than max_export_bytes ({limit:,} bytes; it has "
                                f"{size}); raise it with --param max_export_bytes=N, or split the project")

    def _pages(self, path: str, what: str) -> Iterator[dict[str, Any]]:
        """Every entry of a list Label Studio may paginate (``{"results": [...], "next": ...}``) or not."""
        for page in range(1, self.params.max_pages + 1):
            answer = self._send("GET", f"{path}?page={page}&page_size=100")
            results = answer.get("results") if isinstance(answer, dict) else answer
            if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
                raise LabelStudioError(f"Label Studio GET {path} answered {_shape(answer)}, not a list of {what}")
            yield from results
            if not isinstance(answer, dict) or not answer.get("next") or not results:
                return
        raise LabelStudioError(f"Label Studio GET {path}: more than max_pages ({self.params.max_pages}) pages of "
                               f"{what}; raise it with --param max_pages=N")

    # -- projects and tasks -----------------------------------------------------------

    def _find_project(self, title: str) -> dict[str, Any] | None:
        for project in self._pages("/api/projects", "projects"):
            if project.get("title") == title:
                if "id" not in project:
                    raise LabelStudioError(f"Label Studio's project {title!r} came without an id")
                return dict(project)
        return None

    def _users(self) -> dict[Any, str]:
        """Who annotated: each user's id -> email (or username)."""
        users = {}
        for u in self._pages("/api/users", "users"):
            if "id" not in u:
                raise LabelStudioError("Label Studio GET /api/users answered a user without an id")
            users[u["id"]] = str(u.get("email") or u.get("username") or u["id"])
        return users

    def _export(self, project_id: int) -> list[dict[str, Any]]:
        """Every task of the project with its annotations."""
        path = f"/api/projects/{project_id}/export"
        tasks = self._send("GET", f"{path}?exportType=JSON&download_all_tasks=true", export=True)
        if tasks is None:
            return []
        if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
            raise LabelStudioError(f"Label Studio GET {path} answered {_shape(tasks)}, not a list of tasks")
        return tasks

    def project_url(self, project_id: int) -> str:
        return f"{self.base}/projects/{project_id}/data"

    def push(self, project: str, kind: str, tasks: list[LabelTask]) -> PushResult:
        config = LABEL_CONFIGS[kind]
        found = self._find_project(project)
        if found is None:
            found = self._send("POST", "/api/projects", {
                "title": project, "label_config": config,
                "description": f"genflow {kind}: " + ("order each prompt's answers from best to worst"
                                                      if kind == "rankings" else "write the answer to each prompt"),
                "show_skip_button": True})
            if not isinstance(found, dict) or "id" not in found:
                raise LabelStudioError(f"Label Studio POST /api/projects answered {_shape(found)}, not a project")
        elif found.get("label_config") != config:
            self._send("PATCH", f"/api/projects/{found['id']}", {"label_config": config})
        have = {_data(t).get("genflow_key") for t in self._export(found["id"])}
        new = [t for t in tasks if t.key not in have]
        if new:
            self._send("POST", f"/api/projects/{found['id']}/import", [{"data": task_data(t)} for t in new])
        return PushResult(project, len(new), len(tasks) - len(new), self.project_url(found["id"]))

    def pull(self, project: str, kind: str) -> list[Annotation]:
        found = self._find_project(project)
        if found is None:
            raise LabelStudioError(f"Label Studio at {self.base} has no project {project!r}")
        users = self._users()
        out = []
        for task in self._export(found["id"]):
            data = _data(task)
            if not data.get("genflow_key") or data.get("genflow_kind") != kind:
                continue  # a task genflow did not push
            annotations = task.get("annotations") or []
            if not isinstance(annotations, list):
                raise LabelStudioError(f"Label Studio task {task.get('id')} of {project!r}: its annotations are "
                                       f"{_shape(annotations)}, not a list")
            for a in annotations:
                try:
                    if a.get("was_cancelled"):
                        continue
                    annotation = read_annotation(a, data, kind, users)
                except (AttributeError, TypeError, KeyError, ValueError) as exc:
                    # one person's odd answer (a null value, a number for a text) costs that answer only
                    log.warning("Label Studio task %s of %r: annotation %s left out, genflow cannot read it "
                                "(%s: %s)", task.get("id"), project, a.get("id") if isinstance(a, dict) else "?",
                                type(exc).__name__, exc)
                    continue
                if annotation is not None:
                    out.append(annotation)
        return out


def task_data(task: LabelTask) -> dict[str, Any]:
    """A task as Label Studio's task data: the prompt, and the candidates as ``<List>`` items."""
    data: dict[str, Any] = {"genflow_key": task.key, "genflow_kind": task.kind, "prompt_id": task.prompt_id,
                            "prompt": task.prompt}
    if task.kind == "rankings":
        items = []
        for i, c in enumerate(task.candidates):
            # Label Studio shows an item's id under it (and a title above it, left out: the letter once)
            item: dict[str, Any] = {"id": _letter(i)}
            if c.image is not None:  # markup genflow writes itself: only base64 goes inside
                item["html"] = f"<img src=\"data:image/png;base64,{base64.b64encode(c.image).decode()}\"/>"
            elif c.modality == "code":  # monospace; the text escaped, so it shows as written, never as markup
                item["html"] = f"<pre>{html.escape(c.text or '')}</pre>"
            else:
                item["body"] = c.text or ""  # Label Studio shows it as text
            items.append(item)
        data["candidates"] = items
        data[CANDIDATE_IDS] = {_letter(i): c.generation_id for i, c in enumerate(task.candidates)}
    return data


def read_annotation(a: dict[str, Any], data: dict[str, Any], kind: str, users: dict[Any, str]) -> Annotation | None:
    """One Label Studio annotation as genflow's; None when it holds no answer."""
    person = a.get("completed_by")
    if isinstance(person, dict):
        person = person.get("id")
    common = {"key": data["genflow_key"], "kind": kind, "prompt_id": str(data.get("prompt_id")),
              "annotator": users.get(person, str(person)), "created_at": str(a.get("created_at") or ""),
              "annotation_id": str(a.get("id"))}
    for r in a.get("result", []):
        value = r.get("value", {})
        if kind == "rankings" and r.get("type") == "ranker" and r.get("from_name") == RANKER:
            order = value.get("ranker", {}).get(RANKER) or []
            ids = data.get(CANDIDATE_IDS)
            ids = ids if isinstance(ids, dict) else {}  # a task pushed with generation ids as item ids
            return Annotation(**common, ranking=tuple(str(ids.get(str(g), g)) for g in order))
        if kind == "demonstrations" and r.get("type") == "textarea" and r.get("from_name") == ANSWER:
            texts = value.get("text") or []
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise TypeError(f"its text is {_shape(texts)}, not a list of strings")
            return Annotation(**common, completion="\n".join(texts)) if texts else None
    return None


def _data(task: dict[str, Any]) -> dict[str, Any]:
    data = task.get("data")
    return data if isinstance(data, dict) else {}


def _shape(answer: Any) -> str:
    """What an answer is, for a message (its keys, never its values: they may be anything)."""
    if isinstance(answer, dict):
        return f"an object with {', '.join(sorted(map(str, answer))[:8]) or 'no keys'}"
    if isinstance(answer, list):
        return "a list of something else"
    return "nothing" if answer is None else f"a {type(answer).__name__}"


class _Refused(urllib.error.URLError):
    """A redirect to another address: the key is not sent there."""


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect to the same scheme, host and port only (the key goes with it, as
    urllib's handler sends every header on); a redirect elsewhere is refused."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        old, new = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(urllib.parse.urljoin(req.full_url,
                                                                                                    newurl))
        if _origin(old) != _origin(new):
            fp.close()
            raise _Refused(f"{new.scheme}://{new.hostname}{f':{new.port}' if new.port else ''}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _origin(url: urllib.parse.SplitResult) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, (url.hostname or "").lower(), url.port or default


def _letter(i: int) -> str:
    return chr(ord("A") + i) if i < 26 else f"#{i + 1}"


@hookimpl
def register_labellers(register: Register) -> None:
    register("label-studio", LabelStudio)

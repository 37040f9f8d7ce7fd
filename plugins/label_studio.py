"""Label Studio as genflow's labelling tool, over its REST API (no SDK: plain HTTP).

A ranking task shows the prompt and its candidates in a ``<List>`` that the labeller
orders best to worst with ``<Ranker>`` (drag and drop); text and code go as text
(Label Studio escapes it), images as ``<img>`` with the PNG inlined as a data URI, so
no file serving is needed. A demonstration task shows the prompt and a ``<TextArea>``
for the answer. Each task's data holds ``genflow_key``; a push lists the project's
tasks and imports only the keys it lacks.

The key: a personal access token (Label Studio 1.23's default, a JWT refresh token,
exchanged for an access token at ``/api/token/refresh/``), or a legacy API token
(``Authorization: Token``). Either is read from the variable ``api_key_env`` names.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from typing import Any, ClassVar
from xml.sax.saxutils import quoteattr

from pydantic import Field

from genflow import hookimpl
from genflow.api import Annotation, Labeller, LabelTask, PluginParams, PushResult
from genflow.hookspecs import Register

RANKER = "rank"
ANSWER = "answer"

LABEL_CONFIGS = {
    "rankings": f"""<View>
  <Header value="Prompt"/>
  <Text name="prompt" value="$prompt"/>
  <Header value="Drag the answers into order: best at the top, worst at the bottom"/>
  <List name="candidates" value="$candidates" title="Answers"/>
  <Ranker name={quoteattr(RANKER)} toName="candidates"/>
</View>""",
    "demonstrations": f"""<View>
  <Header value="Prompt"/>
  <Text name="prompt" value="$prompt"/>
  <Header value="Write the answer you would want the model to give"/>
  <TextArea name={quoteattr(ANSWER)} toName="prompt" rows="8" maxSubmissions="1" required="true"/>
</View>""",
}


class LabelStudioError(RuntimeError):
    """Label Studio answered with an error, or could not be reached."""


class LabelStudioParams(PluginParams):
    url: str = Field("http://127.0.0.1:8080", description="Label Studio's address.")
    api_key_env: str = Field("LABEL_STUDIO_API_KEY", description="The environment variable holding the "
                             "key: a personal access token or a legacy API token (Account & Settings).")
    timeout_s: float = Field(60.0, gt=0, description="Seconds one request may take.")


class LabelStudio(Labeller):
    """Label Studio: ranking and demonstration projects over its REST API."""

    Params: ClassVar[type[PluginParams]] = LabelStudioParams
    description: ClassVar[str] = "Label Studio projects: rank candidates (Ranker), write demonstrations (TextArea)"
    unhashed_params: ClassVar[tuple[str, ...]] = ("url", "api_key_env", "timeout_s")
    params: LabelStudioParams

    def __init__(self, params: PluginParams) -> None:
        super().__init__(params)
        self.base = self.params.url.rstrip("/")
        self._auth: str | None = None

    @classmethod
    def secret_env(cls, params: PluginParams) -> list[str]:
        return [params.api_key_env]  # type: ignore[attr-defined]

    # -- HTTP -----------------------------------------------------------------------

    def _authorization(self) -> str:
        if self._auth is None:
            key = os.environ.get(self.params.api_key_env, "").strip()
            if not key:
                raise LabelStudioError(f"no Label Studio key: set {self.params.api_key_env} to a personal access "
                                       "token or an API token (Label Studio: Account & Settings)")
            if key.count(".") == 2:  # a personal access token: a JWT refresh token
                answer = self._send("POST", "/api/token/refresh/", {"refresh": key}, auth=False)
                self._auth = f"Bearer {answer['access']}"
            else:
                self._auth = f"Token {key}"
        return self._auth

    def _send(self, method: str, path: str, body: Any = None, auth: bool = True) -> Any:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if auth:
            headers["Authorization"] = self._authorization()
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.params.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            hint = f" (is {self.params.api_key_env} a key of this server?)" if exc.code in (401, 403) else ""
            raise LabelStudioError(f"Label Studio {method} {path}: HTTP {exc.code}{hint}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise LabelStudioError(f"cannot reach Label Studio at {self.base}: {reason}; start it with "
                                   "`label-studio start` or pass its address with --url") from None
        return json.loads(raw) if raw else None

    # -- projects and tasks -----------------------------------------------------------

    def _find_project(self, title: str) -> dict[str, Any] | None:
        page = 1
        while True:
            answer = self._send("GET", f"/api/projects?page={page}&page_size=100")
            results = answer.get("results", []) if isinstance(answer, dict) else answer
            for project in results:
                if project.get("title") == title:
                    return dict(project)
            if not isinstance(answer, dict) or not answer.get("next"):
                return None
            page += 1

    def _export(self, project_id: int) -> list[dict[str, Any]]:
        """Every task of the project with its annotations."""
        tasks = self._send("GET", f"/api/projects/{project_id}/export?exportType=JSON&download_all_tasks=true")
        return list(tasks or [])

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
        elif found.get("label_config") != config:
            self._send("PATCH", f"/api/projects/{found['id']}", {"label_config": config})
        assert found is not None
        have = {t.get("data", {}).get("genflow_key") for t in self._export(found["id"])}
        new = [t for t in tasks if t.key not in have]
        if new:
            self._send("POST", f"/api/projects/{found['id']}/import", [{"data": task_data(t)} for t in new])
        return PushResult(project, len(new), len(tasks) - len(new), self.project_url(found["id"]))

    def pull(self, project: str, kind: str) -> list[Annotation]:
        found = self._find_project(project)
        if found is None:
            raise LabelStudioError(f"Label Studio at {self.base} has no project {project!r}")
        users = {u["id"]: u.get("email") or u.get("username") or str(u["id"]) for u in self._send("GET", "/api/users")}
        out = []
        for task in self._export(found["id"]):
            data = task.get("data", {})
            if not data.get("genflow_key") or data.get("genflow_kind") != kind:
                continue  # a task genflow did not push
            for a in task.get("annotations", []):
                if a.get("was_cancelled"):
                    continue
                annotation = read_annotation(a, data, kind, users)
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
            item: dict[str, Any] = {"id": c.generation_id, "title": _letter(i)}
            if c.image is not None:  # markup genflow writes itself: only base64 goes inside
                item["html"] = f"<img src=\"data:image/png;base64,{base64.b64encode(c.image).decode()}\"/>"
            else:
                item["body"] = c.text or ""
            items.append(item)
        data["candidates"] = items
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
            return Annotation(**common, ranking=tuple(str(g) for g in order))
        if kind == "demonstrations" and r.get("type") == "textarea" and r.get("from_name") == ANSWER:
            texts = value.get("text") or []
            return Annotation(**common, completion="\n".join(texts)) if texts else None
    return None


def _letter(i: int) -> str:
    return chr(ord("A") + i) if i < 26 else f"#{i + 1}"


@hookimpl
def register_labellers(register: Register) -> None:
    register("label-studio", LabelStudio)

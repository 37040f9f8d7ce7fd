"""People in the loop against a real Label Studio: push a job's candidates, label them through
Label Studio's REST API as two people, pull, and train on what they said.

Label Studio pins what genflow cannot share (pyarrow, openai), so it lives in a virtual
environment of its own, installed once and reused (``.genflow/label-studio-venv``, or
``GENFLOW_LABEL_STUDIO_VENV``); its database is migrated once into a template folder and
copied for each session. It runs on 127.0.0.1 with SQLite, two users with known legacy
tokens, and no update check, analytics or error reporting. Nothing is mocked.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.jobs import ROOT, free_port

from genflow.outputs.report.render import fmt

pytestmark = pytest.mark.slow

VERSION = "1.23.2"
CACHE = Path(os.environ.get("GENFLOW_LABEL_STUDIO_VENV", ROOT / ".genflow" / "label-studio-venv"))
TEMPLATE = CACHE.parent / f"label-studio-{VERSION}-data"
ADMIN, ADMIN_TOKEN = "ada@genflow.test", "genflow-test-token-ada-0123456789"
OTHER, OTHER_TOKEN = "bo@genflow.test", "genflow-test-token-bo-0123456789"


def _ls_env(data_dir: Path) -> dict[str, str]:
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    env.update(LABEL_STUDIO_BASE_DATA_DIR=str(data_dir), LATEST_VERSION_CHECK="false", COLLECT_ANALYTICS="false",
               SENTRY_DSN="", FRONTEND_SENTRY_DSN="", PYTHONUNBUFFERED="1")
    return env


def _installed() -> Path:
    """The ``label-studio`` executable, installing it into its own venv the first time (minutes)."""
    exe = CACHE / "bin" / "label-studio"
    if not exe.exists():
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(CACHE)], check=True)
        done = subprocess.run([str(CACHE / "bin" / "pip"), "install", "-q", f"label-studio=={VERSION}"],
                              capture_output=True, text=True, timeout=1500)
        if done.returncode:
            pytest.fail(f"cannot install label-studio=={VERSION} into {CACHE}: {done.stderr[-2000:]}")
        print(f"label-studio {VERSION} installed in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    return exe


def _template(exe: Path) -> Path:
    """A migrated database with the second user (``label-studio init``), made once (migrations take minutes)."""
    if not (TEMPLATE / "label_studio.sqlite3").exists():
        building = TEMPLATE.with_name(TEMPLATE.name + ".building")
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir(parents=True)
        started = time.perf_counter()
        subprocess.run([str(exe), "init", "-q", "--username", OTHER, "--password", "bo-password",
                        "--user-token", OTHER_TOKEN, "--enable-legacy-api-token"],
                       env=_ls_env(building), check=True, capture_output=True, timeout=1200, cwd=building)
        print(f"label-studio database migrated in {time.perf_counter() - started:.0f}s", file=sys.stderr)
        shutil.rmtree(TEMPLATE, ignore_errors=True)
        building.rename(TEMPLATE)
    return TEMPLATE


class LabelStudioServer:
    def __init__(self, url: str, log: Path) -> None:
        self.url, self.log = url, log

    def api(self, method: str, path: str, body: Any = None, token: str = ADMIN_TOKEN) -> Any:
        request = urllib.request.Request(self.url + path, method=method, data=None if body is None else
                                         json.dumps(body).encode(),
                                         headers={"Authorization": f"Token {token}",
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def project(self, title: str) -> dict[str, Any]:
        found = [p for p in self.api("GET", "/api/projects?page_size=100")["results"] if p["title"] == title]
        assert len(found) == 1, f"{len(found)} projects called {title!r}"
        return dict(found[0])

    def tasks(self, project_id: int) -> list[dict[str, Any]]:
        return list(self.api("GET", f"/api/projects/{project_id}/export?exportType=JSON&download_all_tasks=true"))


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """``label-studio start`` on 127.0.0.1 with SQLite in a fresh data folder and two users."""
    exe = _installed()
    data = tmp_path_factory.mktemp("label-studio") / "data"
    shutil.copytree(_template(exe), data)
    port = free_port()
    log = data.parent / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port",
                                 str(port), "--username", ADMIN, "--password", "ada-password", "--user-token",
                                 ADMIN_TOKEN, "--enable-legacy-api-token"],
                                env=_ls_env(data), stdout=out, stderr=subprocess.STDOUT, cwd=data.parent,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.perf_counter() - started > 300:
                pytest.fail(f"label-studio start did not come up (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        print(f"label-studio up in {time.perf_counter() - started:.1f}s", file=sys.stderr)
        yield LabelStudioServer(url, log)
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


# -- the job and the labellers -------------------------------------------------------

def _job(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"id": ["p1", "p2", "p3"], "prompt": ["one two", "three four", "five six"]}), prompts)
    config: dict[str, Any] = {
        "name": "labelled", "input": str(prompts), "output": str(tmp_path / "out"), "shard_rows": 2,
        "generators": [{"label": "echo", "plugin": "echo", "samples": 3}],
        "scorers": [{"plugin": "length"}, {"plugin": "length", "label": "short", "weight": 0.5,
                                           "params": {"scale": -1.0}}],
        "ranking": {"pairs": {"min_margin": 0.0, "per_prompt": 1}},
        "ray": {"workers": 1},
    }
    config.update(overrides)
    return config


def _genflow(*args: str) -> str:
    from typer.testing import CliRunner

    from genflow.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def _by_sample(out: Path) -> dict[str, dict[int, str]]:
    gens = pq.read_table(out / "generations").to_pylist()
    found: dict[str, dict[int, str]] = {}
    for g in gens:
        found.setdefault(g["prompt_id"], {})[g["sample"]] = g["generation_id"]
    return found


def _rank(server: LabelStudioServer, task: dict[str, Any], order: list[str], token: str) -> None:
    """A person orders the candidates (``order``: generation ids, best first): Label Studio's Ranker
    answers with the ids of the List's items."""
    item_of = {g: item for item, g in task["data"]["genflow_candidates"].items()}
    server.api("POST", f"/api/tasks/{task['id']}/annotations", {"result": [
        {"from_name": "rank", "to_name": "candidates", "type": "ranker",
         "value": {"ranker": {"rank": [item_of[g] for g in order]}}}]}, token=token)


def _answer(server: LabelStudioServer, task: dict[str, Any], text: str, token: str) -> None:
    server.api("POST", f"/api/tasks/{task['id']}/annotations", {"result": [
        {"from_name": "answer", "to_name": "prompt", "type": "textarea", "value": {"text": [text]}}]}, token=token)


def _folder(out: Path, name: str) -> list[dict[str, Any]]:
    return sorted(pq.read_table(out / name).to_pylist(), key=lambda r: json.dumps(r, sort_keys=True, default=str))


def test_push_label_pull_train(label_studio: LabelStudioServer, test_plugins: dict[str, str], job_runner: Any,
                               tiny_models: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job_runner(_job(tmp_path))
    out = tmp_path / "out"
    ids = _by_sample(out)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", ADMIN_TOKEN)
    common = ["--url", label_studio.url]

    # Push: every prompt's three candidates, then 2 prompts to answer; again: nothing new.
    said = _genflow("label", "push", str(out), *common)
    assert "3 tasks added, 0 there already" in said
    assert "2 tasks added" in _genflow("label", "push", str(out), *common, "--kind", "demonstrations",
                                       "--sample", "2", "--seed", "1")
    assert "0 tasks added, 3 there already" in _genflow("label", "push", str(out), *common)
    assert "0 tasks added, 2 there already" in _genflow("label", "push", str(out), *common, "--kind",
                                                        "demonstrations", "--sample", "2", "--seed", "1")
    rankings = label_studio.project("genflow labelled rankings")
    tasks = {t["data"]["prompt_id"]: t for t in label_studio.tasks(rankings["id"])}
    assert sorted(tasks) == ["p1", "p2", "p3"]
    for prompt_id, task in tasks.items():  # the candidates as Ranker items: text, in a shuffled order
        items = task["data"]["candidates"]  # shown under their letters; their generation ids kept out of sight
        assert sorted(task["data"]["genflow_candidates"].values()) == sorted(ids[prompt_id].values())
        assert [i["id"] for i in items] == ["A", "B", "C"] and all(i["body"].startswith(" ") for i in items)
    answers = label_studio.project("genflow labelled demonstrations")
    to_answer = {t["data"]["prompt_id"]: t for t in label_studio.tasks(answers["id"])}
    assert len(to_answer) == 2 and "candidates" not in next(iter(to_answer.values()))["data"]

    # Two people label: the length scorer prefers more "!" (a higher sample index), short the reverse.
    s = {p: [ids[p][k] for k in (0, 1, 2)] for p in ids}
    _rank(label_studio, tasks["p1"], [s["p1"][2], s["p1"][1], s["p1"][0]], ADMIN_TOKEN)   # as length
    _rank(label_studio, tasks["p1"], [s["p1"][1], s["p1"][2], s["p1"][0]], OTHER_TOKEN)
    _rank(label_studio, tasks["p2"], [s["p2"][0], s["p2"][1], s["p2"][2]], ADMIN_TOKEN)   # as short
    first, second = sorted(to_answer)
    _answer(label_studio, to_answer[first], " ada's answer", ADMIN_TOKEN)
    _answer(label_studio, to_answer[second], " bo's answer", OTHER_TOKEN)

    pulled = _genflow("label", "pull", str(out), *common)
    assert "human_rankings: 9 human rows" in pulled and "demonstrations: 2 human rows" in pulled

    human = _folder(out, "human_rankings")
    assert len(human) == 9 and {r["annotator"] for r in human} == {ADMIN, OTHER}
    assert all(r["created_at"] and r["tool"] == "label-studio" for r in human)
    bo = sorted((r for r in human if r["annotator"] == OTHER), key=lambda r: r["rank"])
    assert [(r["prompt_id"], r["generation_id"], r["rank"]) for r in bo] == [
        ("p1", s["p1"][1], 1), ("p1", s["p1"][2], 2), ("p1", s["p1"][0], 3)]
    demos = {(d["prompt_id"], d["annotator"]): d for d in _folder(out, "demonstrations")}
    prompts = {"p1": "one two", "p2": "three four", "p3": "five six"}
    assert {k: (d["prompt"], d["completion"]) for k, d in demos.items()} == {
        (first, ADMIN): (prompts[first], " ada's answer"), (second, OTHER): (prompts[second], " bo's answer")}

    # Human preference pairs: the majority of votes per pair; p1's s1-s2 is a tie (1 vote each), left out.
    prefs = pq.read_table(out / "preferences" / "part-human.parquet").to_pylist()
    assert {(p["prompt_id"], p["chosen_id"], p["rejected_id"], p["score_chosen"]) for p in prefs} == {
        ("p1", s["p1"][2], s["p1"][0], 1.0), ("p1", s["p1"][1], s["p1"][0], 1.0),
        ("p2", s["p2"][0], s["p2"][1], 1.0), ("p2", s["p2"][0], s["p2"][2], 1.0), ("p2", s["p2"][1], s["p2"][2], 1.0)}
    gens = {g["generation_id"]: g for g in pq.read_table(out / "generations").to_pylist()}
    assert all(p["source"] == "human" and (p["prompt"], p["chosen"], p["rejected"]) == (
        gens[p["chosen_id"]]["prompt"], gens[p["chosen_id"]]["text"], gens[p["rejected_id"]]["text"]) for p in prefs)
    model_prefs = pq.read_table(out / "preferences" / "part-00000.parquet").to_pylist()
    assert model_prefs and {p["source"] for p in model_prefs} == {"model"}
    sft = [r for r in _folder(out, "sft") if r["source"] == "human"]
    assert sorted((r["prompt"], r["completion"]) for r in sft) == sorted(
        (prompts[p], d["completion"]) for (p, _), d in demos.items())

    # Agreement, by hand. Pairwise accuracy of length: p1 by ada 3/3, p1 by bo 2/3, p2 by ada 0/3 -> 5/9.
    # Kendall tau per prompt against wins-minus-losses: p1 s0 -4, s1 +2, s2 +2 vs length s0<s1<s2:
    # 2 concordant, 1 tie in the people's -> 2/sqrt(2*3); p2 reversed -> -1.
    manifest = json.loads((out / "manifest.json").read_text())
    found = {r["scorer"]: r for r in manifest["human_agreement"]["scorers"]}
    tau_p1 = 2 / math.sqrt(6)
    expected = {"length": (5 / 9, (tau_p1 - 1) / 2), "short": (4 / 9, (1 - tau_p1) / 2),
                "combined": (5 / 9, (tau_p1 - 1) / 2)}  # combined = length - 0.5 length: length's order
    for name, (accuracy, tau) in expected.items():
        assert found[name]["pairs"] == 9 and found[name]["prompts"] == 2
        assert found[name]["pairwise_accuracy"] == pytest.approx(accuracy, abs=1e-6)
        assert found[name]["kendall_tau"] == pytest.approx(tau, abs=1e-6)
    # ada and bo on p1: s0<s1<s2 vs s0<s2<s1 -> 2 concordant, 1 discordant: tau 1/3, agreement 2/3.
    inter = manifest["human_agreement"]["inter_annotator"]
    assert inter["prompts"] == 1 and inter["pairs"] == 3
    assert inter["kendall_tau"] == pytest.approx(1 / 3, abs=1e-6) and inter["agreement"] == pytest.approx(2 / 3)
    assert manifest["rows"]["human_rankings"] == 9 and manifest["rows"]["preferences"] == len(model_prefs) + 5 + len(
        pq.read_table(out / "preferences" / "part-00001.parquet"))
    # The pull rewrote the report and the dataset card: they show these figures, no `genflow report` needed.
    assert f"refreshed report.html: {out / 'report.html'}" in pulled
    assert f"refreshed README.md: {out / 'README.md'}" in pulled
    report, card = (out / "report.html").read_text(), (out / "README.md").read_text()
    assert "Agreement with human rankings" in report and "Inter-annotator agreement" in report
    for r in manifest["human_agreement"]["scorers"]:
        cells = [r["scorer"], *(fmt(r[k]) for k in ("pairwise_accuracy", "pairs", "kendall_tau", "prompts"))]
        num = ' class="num"'
        assert "".join(f"<td{num if i else ''}>{c}</td>" for i, c in enumerate(cells)) in report
        assert "| " + " | ".join(cells) + " |" in card
    assert f"Kendall τ {fmt(inter['kendall_tau'])}, pairwise agreement {fmt(inter['agreement'])}" in card

    # Pull again, with a personal access token this time (1.23's default kind of key): the same files;
    # the rows still load as one dataset, and DPOTrainer trains on them.
    before = {name: _folder(out, name) for name in ("human_rankings", "demonstrations", "preferences", "sft")}
    monkeypatch.setenv("LABEL_STUDIO_PAT", label_studio.api("POST", "/api/token/")["token"])
    _genflow("label", "pull", str(out), *common, "--api-key-env", "LABEL_STUDIO_PAT")
    assert {name: _folder(out, name) for name in before} == before
    assert json.loads((out / "manifest.json").read_text())["human_agreement"] == manifest["human_agreement"]
    _train_dpo(out / "preferences", tiny_models["tiny-gpt2"], tmp_path / "dpo")


def _train_dpo(folder: Path, model_path: str, output_dir: Path) -> None:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    pairs = load_dataset("parquet", data_dir=str(folder), split="train")
    assert set(pairs["source"]) == {"model", "human"}
    human = pairs.filter(lambda r: r["source"] == "human")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path)
    args = DPOConfig(output_dir=str(output_dir), max_steps=1, per_device_train_batch_size=2, report_to=[],
                     max_length=64, logging_steps=1, save_strategy="no", use_cpu=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=human, processing_class=tokenizer)
    result = trainer.train()
    assert result.global_step == 1 and math.isfinite(result.training_loss)


def test_human_rows_instead_of_the_models(label_studio: LabelStudioServer, test_plugins: dict[str, str],
                                          job_runner: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``labelling.human_rows: instead``: a prompt people ranked keeps only their pairs; going back
    to ``beside`` brings the model's back. A job run keeps the human rows it finds."""
    job_runner(_job(tmp_path, name="instead"))
    out = tmp_path / "out"
    ids = _by_sample(out)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", ADMIN_TOKEN)
    _genflow("label", "push", str(out), "--url", label_studio.url, "--sample", "1", "--seed", "0")
    task = label_studio.tasks(label_studio.project("genflow instead rankings")["id"])[0]
    prompt_id = task["data"]["prompt_id"]
    _rank(label_studio, task, [ids[prompt_id][0], ids[prompt_id][1]], ADMIN_TOKEN)  # a pair: sample 0 better than 1
    _genflow("label", "pull", str(out), "--url", label_studio.url)

    def prefs() -> list[tuple[str, str, str]]:
        rows = pq.read_table(out / "preferences").to_pylist()
        return sorted((r["prompt_id"], r["source"], r["chosen_id"]) for r in rows)

    beside = prefs()
    assert (prompt_id, "human", ids[prompt_id][0]) in beside and (prompt_id, "model", ids[prompt_id][2]) in beside
    job_runner(_job(tmp_path, name="instead", labelling={"human_rows": "instead"}))
    instead = prefs()
    assert [r for r in instead if r[0] == prompt_id] == [(prompt_id, "human", ids[prompt_id][0])]
    assert [r for r in instead if r[0] != prompt_id] == [r for r in beside if r[0] != prompt_id]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["labelling"]["human_rows"] == "instead" and manifest["human_agreement"]["rankings"] == 1
    assert manifest["rows"]["preferences"] == len(instead)
    job_runner(_job(tmp_path, name="instead"))
    assert prefs() == beside


def test_code_and_markup_reach_label_studio_as_written(label_studio: LabelStudioServer,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A code candidate keeps its indentation and a ``<script>`` stays text: what Label Studio stores
    is the plugin's config and task data unchanged (its page shows them as written: see the
    screenshot in docs/labelling.md), and a ranking of them pulls back to generation ids."""
    from genflow.api import LabelCandidate, LabelTask
    from genflow.plugins.labelling.label_studio import LABEL_CONFIGS, LabelStudio, LabelStudioParams, task_data

    monkeypatch.setenv("LABEL_STUDIO_API_KEY", ADMIN_TOKEN)
    plugin = LabelStudio(LabelStudioParams(url=label_studio.url))
    code = "def f(n):\n    if n:\n        return [i\n                for i in range(n)]\n"
    script = "<script>alert(1)</script>\n  <b>bold?</b>"
    task = LabelTask("k-code", "rankings", "p1", "Write f:\n    - a list", (
        LabelCandidate("g-code", "code", code), LabelCandidate("g-script", "code", script),
        LabelCandidate("g-text", "text", script)))
    plugin.push("code as written", "rankings", [task])
    project = label_studio.project("code as written")
    assert project["label_config"] == LABEL_CONFIGS["rankings"]
    [stored] = label_studio.tasks(project["id"])
    assert stored["data"] == task_data(task)
    assert [i.get("html") or i["body"] for i in stored["data"]["candidates"]] == [
        '<pre>def f(n):\n    if n:\n        return [i\n                for i in range(n)]\n</pre>',
        "<pre>&lt;script&gt;alert(1)&lt;/script&gt;\n  &lt;b&gt;bold?&lt;/b&gt;</pre>", script]
    _rank(label_studio, stored, ["g-script", "g-code", "g-text"], ADMIN_TOKEN)
    [pulled] = plugin.pull("code as written", "rankings")
    assert (pulled.prompt_id, pulled.annotator, pulled.ranking) == ("p1", ADMIN, ("g-script", "g-code", "g-text"))

"""Prefect artifacts, task tags and the failure event of job runs, read back through Prefect's API."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from support.jobs import ROOT, run_genflow

from genflow.outputs.artifacts import artifact_key, counts_table, metric_numbers, slug, summary_markdown
from genflow.outputs.events import JOB_FAILED, job_resource_id

KEY = re.compile(r"^[a-z0-9-]+$")


# -- keys, tables and the summary, from a manifest ----------------------------------------------

@pytest.mark.parametrize("name", ["quickstart", "My_Job", "nightly/temp-0.7", "UPPER case", "日本語", "-", "a" * 300])
def test_keys_are_what_prefect_accepts_and_stable(name: str) -> None:
    key = artifact_key(name, "counts")
    assert KEY.match(key) and key == artifact_key(name, "counts") and len(key) <= 90
    from prefect.client.schemas.actions import ArtifactCreate

    ArtifactCreate(key=key, type="table", data="[]")  # Prefect's own validation of keys


def test_names_that_read_alike_keep_apart() -> None:
    assert slug("quickstart") == "quickstart"
    assert len({slug("my_job"), slug("my-job"), slug("My Job")}) == 3


MANIFEST: dict[str, Any] = {
    "name": "pipes|and_stars*", "status": "completed", "output": "/data/out", "config_hash": "abc123",
    "rows": {"prompts": 5, "generations": 25, "scores": 50, "rankings": 25, "preferences": 15, "sft": 5,
             "errors": 2},
    "errors": {"rows": 2, "work_items": 75, "fraction": 0.026667, "max_error_fraction": 0.1},
    "stages": {"generate/served": {"shards": 1, "skipped": 0, "work_items": 25, "errors": 2, "seconds": 1.0,
                                   "tokens": {"prompt": 100, "completion": 400}, "cost": 0.0123},
               "score/code-exec": {"shards": 1, "skipped": 0, "work_items": 25, "errors": 0, "seconds": 2.0},
               "score/judge": {"shards": 1, "skipped": 0, "work_items": 25, "errors": 0, "seconds": 3.0},
               "rank": {"shards": 1, "skipped": 0, "work_items": 25, "errors": 0, "seconds": 0.1}},
    "cost": 0.0123, "timings_s": {"total": 6.5},
    "plugins": {"code-exec": {"kind": "scorer", "plugin": "code-exec", "weight": 1.0},
                "judge": {"kind": "scorer", "plugin": "llm-judge", "weight": 0.5}},
    "metrics": {"code-exec": {"pass@1": 0.6, "pass@5": 1.0, "outcomes": {"passed": 15, "failed": 10}},
                "judge": {"candidates": 25, "examples": [{"reasoning": "<script>generated</script>"}],
                          "note": "free text | from the model"}},
    "agreement": {"pairs": [{"a": "code-exec", "b": "judge", "kendall_tau": 0.25, "agreement": 0.625,
                             "prompts": 5, "pairs": 40}]},
}


def test_the_counts_table_has_rows_per_folder_and_errors_per_stage() -> None:
    table = counts_table(MANIFEST)
    folders = {r["name"]: r["rows"] for r in table if r["kind"] == "folder"}
    assert folders == MANIFEST["rows"]
    stages = {r["name"]: r for r in table if r["kind"] == "stage"}
    assert next(r["name"] for r in table if r["kind"] == "stage") == "generate/served"
    assert stages["generate/served"]["errors"] == 2 and stages["generate/served"]["tokens"] == 500
    assert stages["generate/served"]["cost"] == 0.0123 and stages["rank"]["tokens"] is None


def test_the_summary_shows_any_scorers_metrics_and_no_generated_text() -> None:
    text = summary_markdown(MANIFEST, {"code-exec": {"scores": 25, "mean": 0.6, "min": 0.0, "max": 1.0}})
    assert "| code-exec | pass@1 | 0.6 |" in text and "| code-exec | outcomes.passed | 15 |" in text
    assert "| judge | candidates | 25 |" in text
    assert "script" not in text and "free text" not in text  # text metrics may hold generated text: left out
    assert "pipes\\|and\\_stars\\*" in text  # the job's name cannot break the table
    assert "| generate/served | 100 | 400 | 0.0123 |" in text
    assert "| code-exec | judge | 0.25 | 0.625 | 5 |" in text
    assert "| code-exec | 1 | 25 | 0.6 | 0 | 1 |" in text  # scores per scorer, with its weight
    assert "2.7%" in text and "10.0%" in text
    assert metric_numbers(MANIFEST["metrics"]["judge"]) == {"candidates": 25}


# -- against a real `prefect server start` -------------------------------------------------------

def _code_job(tmp_path: Path, name: str, **overrides: Any) -> Path:
    """Code candidates the rows carry, run by code-exec and measured by length: no model, two scorers."""
    config: dict[str, Any] = {
        "name": name, "input": str(ROOT / "configs/data/humaneval_responses.parquet"),
        "output": str(tmp_path / "out"), "shard_rows": 2,
        "scorers": [{"plugin": "code-exec", "params": {"timeout_s": 3, "k": [1, 5]}},
                    {"plugin": "length", "weight": 0.5}],
        "ranking": {"pairs": {"min_margin": 0.0, "per_prompt": 2}, "best_of_n": True},
        "ray": {"workers": 1},
    }
    config.update(overrides)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def server_client(prefect_server: str) -> Iterator[Any]:
    """A sync Prefect client on the real server."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
        yield client


def _flow_run_of(client: Any, output: str) -> Any:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    runs = [r for r in client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["genflow-job"])))
            if (r.parameters.get("config") or {}).get("output") == output]
    assert runs, f"no flow run wrote {output}"
    return max(runs, key=lambda r: r.created)


def _artifacts(client: Any, flow_run_id: Any) -> dict[str, Any]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
        any_=[flow_run_id])))
    return {a.key: a for a in found}


@pytest.mark.slow
@pytest.mark.server
def test_a_job_run_carries_its_counts_summary_and_report_link(
        tmp_path: Path, prefect_server: str, server_client: Any, test_plugins: dict[str, str]) -> None:
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    env = {**test_plugins, "PREFECT_API_URL": prefect_server}
    config = _code_job(tmp_path, "Nightly Code")
    result = run_genflow("run", str(config), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    run = _flow_run_of(server_client, str(tmp_path / "out"))
    assert run.state.is_completed()
    artifacts = _artifacts(server_client, run.id)
    assert set(artifacts) == {artifact_key("Nightly Code", w) for w in ("counts", "summary", "report")}

    table = json.loads(artifacts[artifact_key("Nightly Code", "counts")].data)
    assert {r["name"]: r["rows"] for r in table if r["kind"] == "folder"} == manifest["rows"]
    assert manifest["rows"]["preferences"] > 0 and manifest["rows"]["generations"] == 25
    stages = {r["name"]: r for r in table if r["kind"] == "stage"}
    assert {s: r["errors"] for s, r in stages.items()} == {s: v["errors"] for s, v in manifest["stages"].items()}
    assert stages["score/code-exec"]["rows"] == 25

    summary = artifacts[artifact_key("Nightly Code", "summary")].data
    passk = manifest["metrics"]["code-exec"]["pass@1"]
    assert f"| code-exec | pass@1 | {passk:.4g} |" in summary  # from code-exec's own summarize
    assert "| code-exec | outcomes.passed | 15 |" in summary
    assert "## Scorer agreement" in summary and "| code-exec | length |" in summary
    assert "| length | 0.5 | 25 |" in summary  # scores per scorer
    assert manifest["config_hash"] in summary

    where = artifacts[artifact_key("Nightly Code", "report")]  # a local page: where it is, not a dead link
    report = tmp_path / "out/report.html"
    assert report.exists() and where.type == "markdown" and f"```\n{report}\n```" in where.data
    assert f"genflow report {tmp_path / 'out'}" in where.data and "file://" not in where.data.replace("`file://`", "")

    tasks = server_client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(
        any_=[run.id])))
    by_stage: dict[str, set[str]] = {}
    for t in tasks:
        for tag in t.tags:
            if tag.startswith("stage:"):
                by_stage.setdefault(tag, set()).update(t.tags)
    assert set(by_stage) == {"stage:generate/input", "stage:score/code-exec", "stage:score/length", "stage:rank"}
    assert "plugin:code-exec" in by_stage["stage:score/code-exec"] and "plugin:length" in by_stage["stage:score/length"]
    assert {"plugin:preferences", "plugin:sft"} <= by_stage["stage:rank"]

    # A second run of the job: a new version under the same keys, so the UI shows the job's history.
    again = run_genflow("run", str(config), env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    history = server_client.read_artifacts(artifact_filter=_key_filter(artifact_key("Nightly Code", "counts")))
    assert len(history) == 2
    assert len({a.flow_run_id for a in history}) == 2

    listed = run_genflow("runs", env=env)
    assert listed.returncode == 0, listed.stderr
    line = next(ln for ln in listed.stdout.splitlines() if run.name in ln)
    cells = [c.strip() for c in re.split(r"[│┃|]", line) if c.strip()]
    assert cells[-4:] == ["5", "25", "0", "-"], listed.stdout  # prompts, candidates, errors, cost (none)


def _key_filter(key: str) -> Any:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    return ArtifactFilter(key=ArtifactFilterKey(any_=[key]))


def _events(client: Any, name: str, resource_id: str, timeout: float = 30) -> list[Any]:
    """The ``name`` events of one resource, waiting for the server to store them."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    deadline = time.monotonic() + timeout
    while True:
        page = client.read_events(filter=EventFilter(event=EventNameFilter(name=[name]),
                                                     resource=EventResourceFilter(id=[resource_id])), limit=50)
        if page.events or time.monotonic() > deadline:
            return list(page.events)
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.server
def test_a_job_past_max_error_fraction_emits_the_failure_event(
        tmp_path: Path, prefect_server: str, server_client: Any, test_plugins: dict[str, str]) -> None:
    prompts = [f"prompt {i}" for i in range(6)]
    pq.write_table(pa.table({"prompt": prompts}), tmp_path / "prompts.parquet")
    config = {"name": "failing-job", "input": str(tmp_path / "prompts.parquet"), "output": str(tmp_path / "out"),
              "shard_rows": 3, "generators": [{"label": "echo", "plugin": "echo", "samples": 2,
                                               "params": {"fail_on": ["prompt 1", "prompt 4"]}}],
              "max_error_fraction": 0.1, "ray": {"workers": 1}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    result = run_genflow("run", str(tmp_path / "job.yaml"), env={**test_plugins, "PREFECT_API_URL": prefect_server})
    assert result.returncode == 1, result.stderr[-3000:]
    events = _events(server_client, JOB_FAILED, job_resource_id("failing-job"))
    assert len(events) == 1
    event = events[0]
    assert event.resource["prefect.resource.name"] == "failing-job"
    payload = event.payload
    assert payload["reason"] == "max_error_fraction" and payload["job"] == "failing-job"
    assert payload["failed_rows"] == 4 and payload["work_items"] == 12 and payload["error_fraction"] > 0.1
    assert payload["rows"]["generations"] == 8 and payload["rows"]["errors"] == 4
    assert payload["output"] == str(tmp_path / "out")
    run = _flow_run_of(server_client, str(tmp_path / "out"))
    assert run.state.is_failed()
    related = {r["prefect.resource.id"] for r in event.related}
    assert f"prefect.flow-run.{run.id}" in related  # an automation can link to the run


@pytest.mark.slow
def test_a_job_that_raises_emits_the_event_with_the_error(tmp_path: Path, prefect_harness: None,
                                                          ray_local: None, test_plugins: dict[str, str]) -> None:
    from prefect import get_client

    from genflow.data.prompts import InputError
    from genflow.flows.job import genflow_job

    config = {"name": "raising job", "input": str(tmp_path / "gone.parquet"), "output": str(tmp_path / "out"),
              "generators": [{"label": "echo", "plugin": "echo"}]}
    with pytest.raises(InputError):
        genflow_job(config)  # the input is missing: the flow's planning task raises
    with get_client(sync_client=True) as client:
        events = _events(client, JOB_FAILED, job_resource_id("raising job"))
    assert len(events) == 1
    assert events[0].payload["reason"] == "error" and events[0].payload["error_type"] == "InputError"
    assert "gone.parquet" in events[0].payload["message"]
    assert events[0].payload["output"] == str(tmp_path / "out")


@pytest.mark.slow
def test_a_sweep_run_has_one_artifact_row_per_run(tmp_path: Path, prefect_harness: None, ray_local: None,
                                                  test_plugins: dict[str, str]) -> None:
    from prefect import get_client

    from genflow.flows.run import run_sweep

    pq.write_table(pa.table({"prompt": ["a b", "c d e", "f"]}), tmp_path / "prompts.parquet")
    raw = {"name": "tiny sweep", "input": str(tmp_path / "prompts.parquet"), "output": str(tmp_path / "sweep"),
           "generators": [{"label": "echo", "plugin": "echo", "samples": 2}], "scorers": [{"plugin": "length"}],
           "ray": {"workers": 1}, "sweep": {"scorers.0.params.scale": [1.0, 2.0]}}
    plan, _rows = run_sweep(raw)
    key = artifact_key("tiny sweep", "runs", kind="sweep")
    with get_client(sync_client=True) as client:
        latest = client.read_latest_artifacts(artifact_filter=_key_filter(key))
    assert len(latest) == 1
    table = json.loads(latest[0].data)
    assert [r["run"] for r in table] == [run.name for run in plan.runs]
    assert all(r["status"] == "completed" and r["prompts"] == 3 and r["generations"] == 6 for r in table)
    assert [r["values"] for r in table] == ["scorers.0.params.scale=1.0", "scorers.0.params.scale=2.0"]
    assert table[1]["score_mean"] == pytest.approx(2 * table[0]["score_mean"])


@pytest.mark.slow
@pytest.mark.server
def test_artifacts_published_outside_a_flow_run_take_the_jobs_keys(
        tmp_path: Path, prefect_server: str, server_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``genflow label pull`` publishes: the summary with the agreement with people, and the
    report's place, as the newest version of the job's keys, with no flow run; an output on S3
    gets a link that opens its page."""
    from support.s3 import moto_bucket, s3_client

    from genflow.data.storage import Storage
    from genflow.outputs.artifacts import prefect_server as answering_server
    from genflow.outputs.artifacts import publish_job_artifacts

    assert answering_server() == prefect_server
    manifest = {**MANIFEST, "name": "labelled job", "human_agreement": {
        "rankings": 3, "prompts": 2, "annotators": 2,
        "scorers": [{"scorer": "judge", "pairwise_accuracy": 0.555556, "pairs": 9, "kendall_tau": -0.091752,
                     "prompts": 2}],
        "inter_annotator": {"prompts": 1, "annotator_pairs": 1, "kendall_tau": 0.333333, "agreement": 0.666667,
                            "pairs": 3}}}
    local = Storage.open(str(tmp_path / "out"))
    local.write_bytes("report.html", b"<html></html>")
    assert len(publish_job_artifacts(local, manifest, local.uri_of("report.html"))) == 3
    latest = {a.key: a for a in server_client.read_artifacts(artifact_filter=_key_filter(
        artifact_key("labelled job", "summary")))}
    summary = latest[artifact_key("labelled job", "summary")]
    assert summary.flow_run_id is None
    assert "## Agreement with people" in summary.data and "| judge | 0.5556 | 9 | -0.09175 | 2 |" in summary.data
    assert "People with each other: Kendall's tau-b 0.3333, pairwise agreement 0.6667 over 1 prompts." in (
        summary.data)

    with moto_bucket("genflow-pages", "GENFLOWPAGESKEYID001", "pages-s3cr3t-never-shown") as endpoint:
        s3_client(endpoint, "GENFLOWPAGESKEYID001", "pages-s3cr3t-never-shown", monkeypatch)
        remote = Storage.open("s3://genflow-pages/job", endpoint_url=endpoint)
        remote.write_bytes("report.html", b"<html>the page</html>")
        publish_job_artifacts(remote, manifest, remote.uri_of("report.html"))
        found = server_client.read_artifacts(artifact_filter=_key_filter(artifact_key("labelled job", "report")))
        [link] = [a for a in found if a.data.startswith("[s3://")]  # Prefect keeps a link as markdown
        assert link.flow_run_id is None and "pages-s3cr3t" not in link.data
        url = re.search(r"\((http[^)]+)\)", link.data)
        assert url and url.group(1).startswith(f"{endpoint}/genflow-pages/job/report.html?X-Amz-Algorithm=")
        with urllib.request.urlopen(url.group(1), timeout=30) as response:
            assert response.read() == b"<html>the page</html>"

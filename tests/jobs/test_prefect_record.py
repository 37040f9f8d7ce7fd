"""What Prefect records of a job is the work as it ran, read back from a real server's API: each
task run lasts as long as its pack's work, a score task waits for the generate task runs of its
shards and a rank task for their score task runs, the flow run carries the job's tags; the
report's stage seconds add up; the terminal names what finished."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from support import plugins_for_tests
from support.jobs import run_genflow

JOB = "prefect-record"
RUN_NAME = re.compile(r"^(?P<stage>generate-echo|score-length|rank)-(?P<first>\d+)(?:-(?P<last>\d+))?-\w+$")
STAGES = {"generate-echo": "generate/echo", "score-length": "score/length", "rank": "rank"}


@pytest.fixture(scope="module")
def job_run(tmp_path_factory: pytest.TempPathFactory, test_plugins_site: Path, prefect_server: str) -> dict[str, Any]:
    """One job against the server: 12 prompts in shards of 2, two samples each, one worker taking
    calls of 2 items, so a pack holds 2 shards (8 items) and each stage has 3 packs; each call
    sleeps a little, so a pack's work lasts seconds."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, TaskRunFilter, TaskRunFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    tmp = tmp_path_factory.mktemp("prefect-record")
    pq.write_table(pa.table({"prompt": [f"prompt number {i}" for i in range(12)]}), tmp / "prompts.parquet")
    config = {"name": JOB, "input": str(tmp / "prompts.parquet"), "output": str(tmp / "out"), "shard_rows": 2,
              "generators": [{"label": "echo", "plugin": "echo", "samples": 2, "params": {"delay_s": 0.25}}],
              "scorers": [{"plugin": "length", "params": {"delay_s": 0.25}}],
              "ray": {"workers": 1, "batch_size": 2}}
    (tmp / "job.yaml").write_text(yaml.safe_dump(config))
    env = {"PYTHONPATH": plugins_for_tests.pythonpath(test_plugins_site), "PREFECT_API_URL": prefect_server}
    result = run_genflow("run", str(tmp / "job.yaml"), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["genflow-job"])))
                if (r.parameters.get("config") or {}).get("name") == JOB]
        assert len(runs) == 1, [r.name for r in runs]
        tasks = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(
            any_=[runs[0].id])))
        created = {t.id: min(s.timestamp for s in client.read_task_run_states(t.id)) for t in tasks}
    return {"out": tmp / "out", "result": result, "flow_run": runs[0], "tasks": tasks, "created": created,
            "manifest": json.loads((tmp / "out/manifest.json").read_text())}


def _packs(tasks: list[Any]) -> dict[str, list[tuple[Any, list[int]]]]:
    """The task runs of each stage (``generate/echo``, ...), each with the shards its name says it wrote."""
    packs: dict[str, list[tuple[Any, list[int]]]] = {}
    for t in tasks:
        match = RUN_NAME.match(t.name)
        if match:
            first = int(match["first"])
            last = int(match["last"]) if match["last"] else first
            packs.setdefault(STAGES[match["stage"]], []).append((t, list(range(first, last + 1))))
    return packs


def _seconds(t: Any) -> float:
    return float((t.end_time - t.start_time).total_seconds())


def _marker(out: Path, stage: str, shard: int) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / "_state" / stage / f"{shard:05d}.json").read_text())
    return data


@pytest.mark.slow
@pytest.mark.server
def test_each_task_run_lasts_as_long_as_its_packs_work(job_run: dict[str, Any]) -> None:
    packs, manifest, out = _packs(job_run["tasks"]), job_run["manifest"], job_run["out"]
    assert {s: sorted(i for _, shards in p for i in shards) for s, p in packs.items()} == {
        "generate/echo": list(range(6)), "score/length": list(range(6)), "rank": list(range(6))}
    for stage in ("generate/echo", "score/length"):
        assert len(packs[stage]) == 3, [t.name for t, _ in packs[stage]]  # 2 shards (8 items) a pack
        for t, shards in packs[stage]:
            assert t.state.is_completed()
            work = sum(_marker(out, stage, i)["seconds"] for i in shards)  # the pack's time, shared
            assert work > 0.5 and _seconds(t) >= work - 1.0, (t.name, _seconds(t), work)
        # Together the stage's task runs span the stage: no work was done before or after them. (From
        # when each was created: Prefect may take a while of its own to run one, taking its tags' slots.)
        start = min(job_run["created"][t.id] for t, _ in packs[stage])
        end = max(t.end_time for t, _ in packs[stage])
        wall = manifest["timings_s"][stage]
        assert abs((end - start).total_seconds() - wall) <= 1.0, (stage, (end - start).total_seconds(), wall)


@pytest.mark.slow
@pytest.mark.server
def test_a_task_run_waits_for_the_task_runs_that_wrote_what_it_reads(job_run: dict[str, Any]) -> None:
    tasks = job_run["tasks"]
    packs = _packs(tasks)
    plan = [t for t in tasks if t.name.startswith("plan-shards")]
    assert len(plan) == 1 and len(tasks) == 1 + 3 + 3 + 1

    def writers(stage: str, shards: list[int]) -> set[Any]:
        return {t.id for t, written in packs[stage] if set(written) & set(shards)}

    upstream = {"generate/echo": lambda shards: {plan[0].id}, "score/length": lambda s: writers("generate/echo", s),
                "rank": lambda s: writers("score/length", s)}
    for stage, stage_packs in packs.items():
        for t, shards in stage_packs:
            assert {i.id for i in t.task_inputs.get("wait_for", [])} == upstream[stage](shards), t.name
            # No argument links it to another task run: the graph draws only what it waited for.
            assert all(not inputs for name, inputs in t.task_inputs.items() if name != "wait_for"), t.task_inputs
            assert f"stage:{stage}" in t.tags
    assert all(len(upstream["score/length"](shards)) == 1 for _, shards in packs["score/length"])
    assert len(upstream["rank"](packs["rank"][0][1])) == 3


@pytest.mark.slow
@pytest.mark.server
def test_the_flow_run_carries_the_jobs_name_and_plugins_as_tags(job_run: dict[str, Any],
                                                                prefect_server: str) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.settings import PREFECT_API_URL, temporary_settings

    assert {"genflow", f"job:{JOB}", "plugin:echo", "plugin:length"} <= set(job_run["flow_run"].tags)
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
        tagged = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(
            all_=[f"job:{JOB}", "plugin:length"])))
    assert [r.id for r in tagged] == [job_run["flow_run"].id]  # what a user filters the UI's runs on
    generate = [t for t in job_run["tasks"] if t.name.startswith("generate-echo")]
    assert all("plugin:length" not in t.tags and "plugin:echo" in t.tags for t in generate)  # a stage's own


@pytest.mark.slow
@pytest.mark.server
def test_the_reported_stage_seconds_add_up_to_no_more_than_the_stages_wall_time(job_run: dict[str, Any]) -> None:
    from genflow.outputs.report.read import stage_rows

    manifest, out = job_run["manifest"], job_run["out"]
    rows = {r["stage"]: r for r in stage_rows(manifest)}
    for stage in ("generate/echo", "score/length"):
        wall = manifest["timings_s"][stage]
        assert 0 < rows[stage]["seconds"] <= wall, (stage, rows[stage]["seconds"], wall)
        assert rows[stage]["rate"] == pytest.approx(rows[stage]["work_items"] / rows[stage]["seconds"])
        # A shard's seconds are its share of its pack's: a pack's shards add up to no more than its task run.
        for t, shards in _packs(job_run["tasks"])[stage]:
            seconds = [_marker(out, stage, i)["seconds"] for i in shards]
            assert all(s > 0 for s in seconds) and sum(seconds) <= _seconds(t) + 0.1, (t.name, seconds)
    assert sum(r["seconds"] for r in rows.values()) <= manifest["timings_s"]["total"]


@pytest.mark.slow
@pytest.mark.server
def test_the_terminal_names_the_stage_and_shard_of_what_finished(job_run: dict[str, Any]) -> None:
    lines = job_run["result"].stderr.splitlines()
    assert not [line for line in lines if "Finished in state" in line], job_run["result"].stderr[-3000:]
    for stage, folder in (("generate/echo", "generations"), ("score/length", "scores")):
        for shard in range(6):
            assert sum(line.startswith(f"{stage} shard {shard}: 4 {folder}, 0 errors in ") for line in lines) == 1

"""The sweep flow: every run of a config's ``sweep`` grid as a job subflow.

Runs go one after another in one process, so they share one Ray; before each
run, finished work of earlier runs with the same fingerprints is copied into
its folder (``genflow.sweep.share_finished_work``) and the job skips it. A run
that fails does not stop the others; the sweep fails at the end if any did.
The comparison lands in ``<output>/sweep.parquet`` and ``<output>/sweep.html``.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from genflow.config import build_config
from genflow.data.storage import Storage
from genflow.flows.job import genflow_job
from genflow.outputs.artifacts import publish_sweep_artifact, sweep_row
from genflow.outputs.report import job_summary, write_sweep_report
from genflow.sweep import SweepFailed, SweepPlan, SweepRun, plan_sweep, runs_table, share_finished_work

SWEEP_TABLE = "sweep.parquet"


def _open(config: dict[str, Any], output: str) -> Storage:
    storage = config.get("storage") or {}
    return Storage.open(output, storage.get("endpoint_url"), storage.get("region"), storage.get("anonymous", False))


def _share(done: list[SweepRun], run: SweepRun) -> list[str]:
    target_config = build_config(run.config)
    target = _open(run.config, run.output)
    copied: list[str] = []
    for donor in done:
        copied += share_finished_work(_open(donor.config, donor.output), build_config(donor.config), target,
                                      target_config)
    return copied


@flow(name="genflow-sweep", log_prints=False, validate_parameters=False)
def genflow_sweep(config: dict[str, Any], resume: bool = True,
                  config_source: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run every point of the config's ``sweep`` grid; returns one summary row per run.

    As for a job, Prefect records only the redacted config: ``config_source`` says where the
    real one is (``genflow.job.real_config``), and each run's flow gets its own the same way."""
    from genflow.job import hand_over, real_config

    config = real_config(config, config_source)
    logger = get_run_logger()
    plan: SweepPlan = plan_sweep(config, source=f"sweep {config.get('name', '?')!r}")
    logger.info("sweep %s: %d runs under %s", plan.name, len(plan.runs), plan.output)
    rows: list[dict[str, Any]] = []
    artifact_rows: list[dict[str, Any]] = []
    done: list[SweepRun] = []
    failed: list[str] = []
    for run in plan.runs:
        if resume:
            copied = _share(done, run)
            if copied:
                logger.info("%s: reusing %d finished (stage, shard) outputs of earlier runs", run.name, len(copied))
        job = genflow_job.with_options(flow_run_name=f"{plan.name}-{run.name}")
        shown, source = hand_over(run.config)
        state = job(shown, resume=resume, config_source=source, return_state=True)
        storage = _open(run.config, run.output)
        manifest = storage.read_json("manifest.json") if storage.exists("manifest.json") else None
        if state.is_completed() and manifest is not None:
            figures = job_summary(storage, manifest)
        else:
            failed.append(run.name)
            figures = job_summary(storage, manifest) if manifest else {"status": "failed"}
            figures["status"] = "failed"
            figures["folder"] = storage.uri
            logger.error("%s failed: %s", run.name, state.message)
        rows.append({"run": run.name, "values": run.values, "figures": figures})
        artifact_rows.append(sweep_row(run.name, run.values, figures, manifest))
        done.append(run)
    root = _open(config, plan.output)
    root.makedirs()
    table = runs_table(plan, rows)
    root.write_table(SWEEP_TABLE, table)
    logger.info("sweep table: %s; comparison: %s", root.uri_of(SWEEP_TABLE), write_sweep_report(root, table))
    publish_sweep_artifact(plan.name, artifact_rows)  # one row per run, under a key of the sweep's name
    if failed:
        raise SweepFailed(f"{len(failed)} of {len(plan.runs)} runs failed: {', '.join(failed)}; "
                          f"the others are in {root.uri_of(SWEEP_TABLE)}")
    return table.to_pylist()

"""The sweep flow: every run of a config's ``sweep`` grid as a job subflow.

The grid is planned (every run's config validated) by ``genflow.grid.plan_sweep``, once,
before Prefect starts; the flow gets the plan through the sweep's session
(``genflow.runtime.session``), and opens a job session for each run. Runs go one after
another in one process, so they share one Ray.

Runs that share work share its outputs: before a run starts, every finished
(stage, shard) of an earlier run of the sweep whose fingerprint equals the one
this run will compute is copied into the run's folder (:func:`share_finished_work`),
and the engine skips it as done, exactly as when a job resumes. Runs that differ only
in scorers or ranking generate once; runs that differ only in a scorer's weight also
score once. A run that fails does not stop the others; the sweep fails at the end if
any did. The comparison lands in ``<output>/sweep.parquet`` and ``<output>/sweep.html``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from prefect import flow, get_run_logger

from genflow.config import JobConfig
from genflow.data import layout
from genflow.data.layout import Shard, Stage
from genflow.data.resume import finished, mark_finished
from genflow.data.storage import Storage
from genflow.engine.errors import SweepFailed
from genflow.flows.job import genflow_job
from genflow.grid import SweepPlan, plan_sweep
from genflow.outputs.artifacts import publish_sweep_artifact, sweep_row
from genflow.outputs.report import job_summary, write_sweep_report
from genflow.runtime.session import JobSession, SweepSession, config_from_parameters, find, registered

SWEEP_TABLE = "sweep.parquet"


@flow(name="genflow-sweep", log_prints=False, validate_parameters=False)
def genflow_sweep(config: dict[str, Any], resume: bool = True, session: str | None = None) -> list[dict[str, Any]]:
    """Run every point of the config's ``sweep`` grid; returns one summary row per run.

    As for a job, Prefect records only the redacted config: ``session`` is the key of the
    sweep's session in this process (``genflow.flows.run.run_sweep``), which holds the plan
    made from the real config, and each run's flow gets its job's session the same way."""
    logger = get_run_logger()
    sweep = find(session, SweepSession)
    plan: SweepPlan = sweep.plan if sweep else plan_sweep(config_from_parameters(config, None),
                                                           source=f"sweep {config.get('name', '?')!r}")
    logger.info("sweep %s: %d runs under %s", plan.name, len(plan.runs), plan.output)
    rows: list[dict[str, Any]] = []
    artifact_rows: list[dict[str, Any]] = []
    done: list[JobSession] = []
    failed: list[str] = []
    for run in plan.runs:
        job = JobSession.open(run.job, resume, check=False)  # validated with the plan; its lease taken in its flow
        if resume:
            copied = [c for donor in done for c in share_finished_work(donor.storage, donor.config, job.storage,
                                                                       job.config)]
            if copied:
                logger.info("%s: reusing %d finished (stage, shard) outputs of earlier runs", run.name, len(copied))
        subflow = genflow_job.with_options(flow_run_name=f"{plan.name}-{run.name}")
        with registered(job):
            state = subflow(**job.parameters(), return_state=True)
        storage = job.storage
        manifest = storage.read_json(layout.MANIFEST) if storage.exists(layout.MANIFEST) else None
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
        done.append(job)
    root = sweep.root if sweep and sweep.root else Storage.open(plan.output, **plan.base.storage.model_dump())
    root.makedirs()
    table = runs_table(plan, rows)
    root.write_table(SWEEP_TABLE, table)
    logger.info("sweep table: %s; comparison: %s", root.uri_of(SWEEP_TABLE), write_sweep_report(root, table))
    publish_sweep_artifact(plan.name, artifact_rows)  # one row per run, under a key of the sweep's name
    if failed:
        raise SweepFailed(f"{len(failed)} of {len(plan.runs)} runs failed: {', '.join(failed)}; "
                          f"the others are in {root.uri_of(SWEEP_TABLE)}")
    return table.to_pylist()


# -- sharing finished work between runs ---------------------------------------

def _shards_of(storage: Storage) -> list[Shard]:
    """The shards a finished run planned, from its ``prompts`` markers."""
    shards: list[Shard] = []
    stage = layout.PROMPTS_STAGE
    while storage.exists(stage.marker(len(shards))):
        marker = storage.read_json(stage.marker(len(shards)))
        shards.append(Shard(len(shards), marker["fingerprint"],
                            int(marker.get("rows", {}).get(layout.PROMPTS, 0))))
    return shards


def _same_input(a: JobConfig, b: JobConfig) -> bool:
    return (a.input, a.shard_rows, a.storage) == (b.input, b.shard_rows, b.storage)


def share_finished_work(donor: Storage, donor_config: JobConfig, target: Storage, config: JobConfig) -> list[str]:
    """Copy the donor's finished (stage, shard) outputs the target would compute identically.

    Returns the stages copied, as ``stage:shard``. The engine then finds their
    markers and skips them, exactly as when a job resumes. Generate and score stages
    are shared; ranking is cheap and is redone."""
    if not _same_input(donor_config, config):
        return []
    from genflow.registry import get_registry
    from genflow.stages.common import unhashed_params_of

    copied: list[str] = []
    unhashed = unhashed_params_of(config, get_registry())
    for shard in _shards_of(donor):
        plan = layout.plan_shard(shard, config, {}, unhashed)
        for stage, fp in [*plan.generate, *plan.score]:
            copied += _copy_stage(donor, target, stage, shard, fp)
    return copied


def _copy_stage(donor: Storage, target: Storage, stage: Stage, shard: Shard, fingerprint: str) -> list[str]:
    done = finished(donor, stage, shard, fingerprint)
    if done is None or finished(target, stage, shard, fingerprint) is not None:
        return []
    for rel in done.parts:
        target.write_bytes(rel, donor.read_bytes(rel))
        if rel.startswith(f"{layout.GENERATIONS}/"):
            _copy_images(donor, target, rel)
    for rel in stage.own_parts(shard.index):
        if rel not in done.parts:  # what an earlier, different run of this stage left here
            target.delete(rel)
    mark_finished(target, dataclasses.replace(done, skipped=False))
    return [f"{stage.name}:{shard.index}"]


def _copy_images(donor: Storage, target: Storage, generations_part: str) -> None:
    table = donor.read_table(generations_part, columns=["image_path"])
    paths = table["image_path"].drop_null().to_pylist()
    for rel in paths:
        if layout.is_job_file(rel) and donor.exists(rel) and not target.exists(rel):
            target.write_bytes(rel, donor.read_bytes(rel))


# -- one row per run ----------------------------------------------------------

def runs_table(plan: SweepPlan, rows: list[dict[str, Any]]) -> pa.Table:
    """``sweep.parquet``: run name, its values (one column per sweep key), then its figures."""
    columns: dict[str, pa.Array] = {"run": pa.array([r["run"] for r in rows], pa.string())}
    for key, column in plan.columns.items():
        values = [r["values"].get(key) for r in rows]
        columns[column] = _column(values)
    figure_names: list[str] = []
    for r in rows:
        for name in r["figures"]:
            if name not in figure_names:
                figure_names.append(name)
    for name in figure_names:
        columns[name] = _column([r["figures"].get(name) for r in rows])
    table = pa.table(columns)
    meta = {"genflow.sweep": json.dumps({"name": plan.name, "output": plan.output, "columns": plan.columns})}
    return table.replace_schema_metadata(meta)


def _column(values: list[Any]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else (v if isinstance(v, str) else json.dumps(v, default=str))
                         for v in values], pa.string())


def best_run(table: pa.Table, metric: str = "score_mean") -> str | None:
    """The run with the highest ``metric`` among completed runs, if any has one."""
    if metric not in table.column_names or table.num_rows == 0:
        return None
    values = table[metric]
    if values.null_count == len(values):
        return None
    index = pc.index(values, pc.max(values)).as_py()
    return str(table["run"][index].as_py())

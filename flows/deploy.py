"""Scheduled genflow jobs: one Prefect deployment of the job flow per config.

A config's ``schedule`` (cron + timezone) becomes the deployment's Prefect
``Cron`` schedule and the config itself its parameters; Prefect's scheduler
creates the runs and something Prefect-native executes them:

- ``genflow serve CONFIG`` (``prefect.serve``): registers the deployment and
  runs its flow runs in this process's machine until stopped. The simplest
  way: no work pool, no worker. Stopping it (Ctrl-C, SIGTERM) pauses the
  schedule, so runs do not pile up while nothing executes them.
- ``genflow deploy CONFIG``: registers (or updates) the deployment and
  returns. Its runs wait for ``genflow serve CONFIG``; with
  ``--work-pool POOL`` they go to a Prefect work pool instead, for a
  ``prefect worker start --pool POOL`` on any machine with genflow installed
  (the flow is referenced by module, ``genflow.flows.job.genflow_job``).

A config with ``rounds:`` deploys the rounds flow instead
(``genflow.flows.rounds.genflow_rounds``, docs/rounds.md), with the same
parameters: with ``rounds.per_run`` each scheduled run does that many rounds.

Relative paths in the config (input, output, local model folders) are made
absolute where the command runs, so a run means what ``genflow run`` there
would. ``{date}`` in the output stays as written and is filled in by each run.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

from genflow.config import JobConfig, build_config
from genflow.runtime.session import anchor_paths


def deployment_name(config: JobConfig) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", config.name).strip("-") or "genflow-job"


ConfigFile = tuple[Path, list[str]]
"""The config file a deployment was made from, and its ``--set`` overrides."""


def job_parameters(raw: dict[str, Any], base: Path | None = None,
                   config_file: ConfigFile | None = None) -> dict[str, Any]:
    """The deployment's parameters: the config with its secrets hidden (Prefect stores them and
    shows them in its UI); each run reads the secrets back from the config file
    (``genflow.runtime.session.config_from_parameters``) and opens its session with them."""
    from genflow.config import redacted

    data = anchor_paths(raw, base)
    data.pop("sweep", None)
    shown = redacted(data)
    if shown == data:
        return {"config": data, "resume": True}
    if config_file is None:
        from genflow.config import ConfigError

        raise ConfigError("the config holds secrets (or a URL with a password), and a deployment's parameters "
                          "are stored by Prefect: deploy it from its file (`genflow deploy CONFIG`)")
    path, overrides = config_file
    source = {"file": str(Path(path).resolve()), "overrides": list(overrides),
              "base": str((base or Path.cwd()).resolve())}
    return {"config": shown, "resume": True, "config_source": source}


def deployed_flow(job: JobConfig) -> Any:
    """The flow a config's deployment runs: the rounds flow for a config with ``rounds:``, else
    the job flow."""
    if job.rounds is not None:
        from genflow.flows.rounds import genflow_rounds

        return genflow_rounds
    from genflow.flows.job import genflow_job

    return genflow_job


def to_deployment(raw: dict[str, Any], name: str | None = None, base: Path | None = None,
                  config_file: ConfigFile | None = None) -> Any:
    """The ``RunnerDeployment`` of a config's flow (:func:`deployed_flow`): its schedule, its parameters."""
    from prefect.flows import EntrypointType
    from prefect.schedules import Cron

    from genflow.flows.job import job_tags

    job = build_config(raw, source=f"config {raw.get('name', '?')!r}")
    schedules = [Cron(job.schedule.cron, timezone=job.schedule.timezone)] if job.schedule else []
    kind = "rounds" if job.rounds is not None else "job"
    return deployed_flow(job).to_deployment(
        name=name or deployment_name(job),
        schedules=schedules,
        parameters=job_parameters(raw, base, config_file),
        description=f"genflow {kind} {job.name!r}: {job.input} -> {job.output}",
        tags=job_tags(job),  # genflow, job:<name>, plugin:<name>: on each of its flow runs too
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def deploy(raw: dict[str, Any], name: str | None = None, work_pool: str | None = None,
           config_file: ConfigFile | None = None) -> UUID:
    """Register (or update) the deployment; returns its id."""
    import prefect

    deployment = to_deployment(raw, name, config_file=config_file)
    if work_pool:
        ids: list[UUID] = prefect.deploy(deployment, work_pool_name=work_pool, build=False,  # type: ignore[assignment]
                                         push=False, print_next_steps_message=False, ignore_warnings=True)
        return ids[0]
    return deployment.apply()


def serve(raw: dict[str, Any], name: str | None = None, limit: int | None = None,
          config_file: ConfigFile | None = None) -> None:
    """Register the deployment and execute its runs here until stopped (Prefect's runner)."""
    import prefect

    prefect.serve(to_deployment(raw, name, config_file=config_file), limit=limit, print_starting_message=True)


def full_name(raw: dict[str, Any], name: str | None = None) -> str:
    job = build_config(raw)
    return f"{deployed_flow(job).name}/{name or deployment_name(job)}"


SHOWN_KEYS = {"config_source": "config file", "config_source.file": "config file",
              "config_source.overrides": "--set overrides", "config_source.base": "folder deployed from"}
"""Parameters named in a change's line by what a user typed, not by their place in the parameters."""
MAX_SHOWN_CHANGES = 8


def registered_changes(raw: dict[str, Any], name: str | None = None,
                       config_file: ConfigFile | None = None) -> list[str]:
    """What registering this config replaces in the deployment already registered under its name:
    the keys of its parameters that differ (``output``, ``schedule.cron``, ``generators.0.params``),
    and ``schedule`` when the registered one was changed by other means; empty for a new deployment
    or the same parameters. Key names only: no value is shown (parameters hold secrets hidden
    anyway, ``***``)."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    job = build_config(raw, source=f"config {raw.get('name', '?')!r}")
    new = json.loads(json.dumps(job_parameters(raw, config_file=config_file), default=str))
    try:
        with get_client(sync_client=True) as client:
            registered = client.read_deployment_by_name(full_name(raw, name))
    except ObjectNotFound:
        return []
    changed = list(dict.fromkeys(SHOWN_KEYS.get(key, key.removeprefix("config."))
                                 for key in _differing_keys(registered.parameters, new)))
    schedules = [(getattr(s.schedule, "cron", None), getattr(s.schedule, "timezone", None))
                 for s in registered.schedules]
    wanted = [(job.schedule.cron, job.schedule.timezone)] if job.schedule else []
    if schedules != wanted and not any(c == "schedule" or c.startswith("schedule.") for c in changed):
        changed.append("schedule")
    if len(changed) > MAX_SHOWN_CHANGES:
        changed[MAX_SHOWN_CHANGES:] = [f"{len(changed) - MAX_SHOWN_CHANGES} more"]
    return changed


def _differing_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two JSON values differ: down into mappings and lists of one length."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [found for key in sorted(set(old) | set(new), key=str)
                for found in _differing_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [found for i, (a, b) in enumerate(zip(old, new, strict=True))
                for found in _differing_keys(a, b, f"{prefix}{i}.")]
    return [] if old == new else [prefix.rstrip(".")]


def describe_deployment(deployment_name_: str, upcoming: int = 3) -> dict[str, Any]:
    """The registered deployment: schedules, paused or not, work pool, and its next run times."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment_name_)
    schedules = [{"cron": getattr(s.schedule, "cron", None), "timezone": getattr(s.schedule, "timezone", None),
                  "active": s.active} for s in dep.schedules]
    return {"id": str(dep.id), "name": deployment_name_, "schedules": schedules, "paused": dep.paused,
            "work_pool": dep.work_pool_name, "parameters": dep.parameters,
            "next_runs": next_run_times(schedules, upcoming)}


def next_run_times(schedules: list[dict[str, Any]], n: int = 3) -> list[datetime]:
    """The next ``n`` times the active cron schedules fire, as Prefect's scheduler computes them."""
    import asyncio

    from prefect.server.schemas.schedules import CronSchedule

    times: list[datetime] = []
    for s in schedules:
        if s["active"] and s["cron"]:
            schedule = CronSchedule(cron=s["cron"], timezone=s["timezone"])
            times += asyncio.run(schedule.get_dates(n=n))
    return sorted(times)[:n]


def _deployment_filter(ids: list[UUID]) -> Any:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return DeploymentFilter(id=DeploymentFilterId(any_=ids))


def list_runs(limit: int = 20, deployment: str | None = None, flow_names: list[str] | None = None,
              scheduled: bool = False) -> list[dict[str, Any]]:
    """Runs of genflow flows, newest first: id, name, flow, deployment, state, start, duration.

    Runs the scheduler created for the future are left out unless ``scheduled``.
    """
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    names = flow_names or ["genflow-job", "genflow-sweep", "genflow-rounds"]
    with get_client(sync_client=True) as client:
        dep_filter = _deployment_filter([client.read_deployment_by_name(deployment).id]) if deployment else None
        states = None if scheduled else FlowRunFilter(state=FlowRunFilterState(
            type=FlowRunFilterStateType(not_any_=[StateType.SCHEDULED])))
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=names)), flow_run_filter=states,
                                     deployment_filter=dep_filter, sort=FlowRunSort.EXPECTED_START_TIME_DESC,
                                     limit=limit)
        flows = {f.id: f.name for f in client.read_flows(flow_filter=FlowFilter(name=FlowFilterName(any_=names)))}
        dep_ids = list({r.deployment_id for r in runs if r.deployment_id})
        deployments = {}
        if dep_ids:
            deployments = {d.id: d.name for d in client.read_deployments(deployment_filter=_deployment_filter(dep_ids))}
    now = datetime.now(timezone.utc)
    out = []
    for r in runs:
        start = r.start_time
        end = r.end_time or (now if start and r.state and r.state.is_running() else None)
        out.append({
            "id": r.id,
            "name": r.name,
            "flow": flows.get(r.flow_id, str(r.flow_id)),
            "deployment": deployments.get(r.deployment_id) if r.deployment_id else None,
            "state": r.state.name if r.state else "?",
            "start": start or r.expected_start_time,
            "duration_s": (end - start).total_seconds() if start and end else None,
            "message": r.state.message if r.state and r.state.is_failed() else None,
        })
    return out

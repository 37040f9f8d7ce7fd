"""The Prefect event a failed job emits, for an automation to notify a team.

``genflow.job.failed`` is emitted when a job raises (bad input, a plugin that cannot
load, workers that keep dying, ``max_cost`` spent) or ends past ``max_error_fraction``.
Its resource is the job (``genflow.job.<slug of its name>``, named by the job's name);
Prefect adds the flow run, the flow and their tags as related resources. The payload
holds the counts: rows per folder, failed rows, work items, the error fraction and
the limit, where the outputs are, and the error's type and first line. Nothing from
the config beyond its name and output is sent.
"""

from __future__ import annotations

import logging
from typing import Any

from genflow.outputs.artifacts import slug

log = logging.getLogger(__name__)

JOB_FAILED = "genflow.job.failed"
MAX_MESSAGE = 500


def job_resource_id(name: str) -> str:
    """The event resource of a job: the same for every run of it, as the artifact keys."""
    return f"genflow.job.{slug(name)}"


def failure_payload(name: str, error: BaseException, manifest: dict[str, Any] | None = None,
                    output: str | None = None) -> dict[str, Any]:
    """What a notification needs: the job, the counts the run got to, and why it failed."""
    from genflow.engine.errors import BudgetSpent, JobFailed
    from genflow.secrets import scrub

    lines = scrub(str(error)).strip().splitlines()  # a server's text a plugin's error quotes: no secret in it
    reason = ("max_cost" if isinstance(error, BudgetSpent) else
              "max_error_fraction" if isinstance(error, JobFailed) else "error")
    payload: dict[str, Any] = {
        "job": name,
        "reason": reason,
        "error_type": type(error).__name__,
        "message": (lines[0] if lines else "")[:MAX_MESSAGE],
        "output": output,
    }
    if manifest is not None:
        errors = manifest.get("errors") or {}
        payload.update(output=manifest.get("output", output), status=manifest.get("status"),
                       rows=manifest.get("rows") or {}, failed_rows=errors.get("rows"),
                       work_items=errors.get("work_items"), error_fraction=errors.get("fraction"),
                       max_error_fraction=errors.get("max_error_fraction"), cost=manifest.get("cost"))
    return payload


def emit_job_failed(name: str, error: BaseException, manifest: dict[str, Any] | None = None,
                    output: str | None = None) -> Any:
    """Emit ``genflow.job.failed``; returns the event (None where Prefect sends no events).
    Never raises: the job's own error is what the caller re-raises."""
    from prefect.events import emit_event

    try:
        return emit_event(JOB_FAILED, resource={"prefect.resource.id": job_resource_id(name),
                                                "prefect.resource.name": name},
                          payload=failure_payload(name, error, manifest, output))
    except Exception as exc:
        log.warning("event %s not emitted (%s: %s)", JOB_FAILED, type(exc).__name__, exc)
        return None


def on_job_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """The job flow's ``on_failure`` hook: the run failed (raised, or ended past
    ``max_error_fraction``); emit the event with what the run got to."""
    error = state.result(raise_on_failure=False)
    if not isinstance(error, BaseException):
        error = RuntimeError(state.message or "the job failed")
    config = (flow_run.parameters or {}).get("config") or {}
    name = str(config.get("name") or flow_run.name)
    emit_job_failed(name, error, getattr(error, "manifest", None), output=config.get("output"))

"""Run a genflow job from Python: ``run_job(load_config("configs/quickstart.yaml"))``."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from genflow.config import ConfigError, JobConfig
from genflow.prompts import InputError
from genflow.registry import PluginError
from genflow.storage import StorageError

USER_ERRORS = (ConfigError, InputError, PluginError, StorageError, ConnectionError, FileNotFoundError)


class JobFailed(RuntimeError):
    """The job ran but produced more errors than ``max_error_fraction`` allows.

    Its outputs are written all the same; ``manifest`` says what they are."""

    def __init__(self, message: str, manifest: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.manifest = manifest


class BudgetSpent(JobFailed):
    """The job's requests have cost ``max_cost``: it stopped, keeping every answer it had."""


class _NoTracebackForUserErrors(logging.Filter):
    """Prefect logs every task failure with its traceback; a bad input needs only its message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], USER_ERRORS):
            record.exc_info = None
            record.exc_text = None
            record.msg = str(record.getMessage()).split("\nTraceback")[0]
            record.args = ()
        return True


def _install_log_filter() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs", "prefect.flow_engine", "prefect.task_engine"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTracebackForUserErrors) for f in logger.filters):
            logger.addFilter(_NoTracebackForUserErrors())


def quiet_prefect_defaults() -> None:
    """Settings that keep Prefect's local ephemeral server quiet and quick."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


def run_job(config: JobConfig | dict[str, Any], resume: bool = True,
            api_ready: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run the job flow and return its manifest (raises ``JobFailed`` past ``max_error_fraction``).

    ``api_ready`` is called right before the flow starts: the CLI waits there for the
    local Prefect API it launched at start-up, while the job's first workers load."""
    quiet_prefect_defaults()
    _install_log_filter()
    from genflow.config import build_config, resolve_output
    from genflow.execution import stop_early_workers
    from genflow.prompts import open_input
    from genflow.storage import Storage

    job = config if isinstance(config, JobConfig) else build_config(config)
    # Fail on a bad config, an unreadable input or unreachable storage before Prefect and Ray start.
    open_input(job.input, **job.storage.model_dump())
    storage = Storage.open(resolve_output(job.output), **job.storage.model_dump())
    storage.check()
    try:
        if not resume or not storage.exists("manifest.json"):  # a new job: its first stage has work
            _launch_workers(job)
        from genflow.flows.job import genflow_job  # Prefect's import, while the workers load

        if api_ready is not None:
            api_ready()
        return genflow_job(job.model_dump(mode="json"), resume=resume)
    finally:
        stop_early_workers()


def _launch_workers(job: JobConfig) -> None:
    """Start the job's workers now, loading its first stage's plugin: Ray's start and the
    model loads take seconds, which then pass while Prefect starts the flow run and plans
    the shards.

    Only for a job that has not finished before: a rerun may have nothing to do, and
    must then start no Ray at all (its workers start when a stage finds work)."""
    from genflow.execution import launch_early
    from genflow.registry import get_registry

    first = (job.generators or job.scorers or [None])[0]
    if first is None:
        return
    from genflow.api import sends_requests

    kind = "generator" if job.generators else "scorer"
    factory = get_registry().get(kind, first.plugin).factory.implementation(first.params)
    if not sends_requests(factory):  # a request plugin runs on a worker of its own, not these
        launch_early(job.ray, factory, first.model, first.params)

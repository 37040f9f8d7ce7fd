"""Run a genflow job from Python: ``run_job(load_config("configs/quickstart.yaml"))``."""

from __future__ import annotations

import logging
import os
from typing import Any

from genflow.config import ConfigError, JobConfig
from genflow.prompts import InputError
from genflow.registry import PluginError
from genflow.storage import StorageError

USER_ERRORS = (ConfigError, InputError, PluginError, StorageError, ConnectionError, FileNotFoundError)


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


def run_job(config: JobConfig | dict[str, Any], resume: bool = True) -> dict[str, Any]:
    """Run the job flow and return its manifest (raises ``JobFailed`` past ``max_error_fraction``)."""
    quiet_prefect_defaults()
    _install_log_filter()
    from genflow.config import build_config
    from genflow.flows.job import genflow_job, resolve_output
    from genflow.prompts import open_input
    from genflow.storage import Storage

    job = config if isinstance(config, JobConfig) else build_config(config)
    # Fail on a bad config, an unreadable input or unreachable storage before Prefect and Ray start.
    open_input(job.input, job.storage.endpoint_url, job.storage.region)
    Storage.open(resolve_output(job.output), job.storage.endpoint_url, job.storage.region).check()
    return genflow_job(job.model_dump(mode="json"), resume=resume)

"""Run a genflow job from Python: ``run_job(load_config("configs/quickstart.yaml"))``."""

from __future__ import annotations

import os
from typing import Any

from genflow.config import JobConfig


def quiet_prefect_defaults() -> None:
    """Settings that keep Prefect's local ephemeral server quiet and quick."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


def run_job(config: JobConfig | dict[str, Any], resume: bool = True) -> dict[str, Any]:
    """Run the job flow and return its manifest (raises ``JobFailed`` past ``max_error_fraction``)."""
    quiet_prefect_defaults()
    from genflow.flows.job import genflow_job

    data = config.model_dump(mode="json", exclude_unset=False) if isinstance(config, JobConfig) else config
    return genflow_job(data, resume=resume)

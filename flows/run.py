"""Run a genflow job, or a sweep, from Python: ``run_job(load_config("configs/quickstart.yaml"))``.

What ``genflow run`` and ``genflow sweep`` call. A job's run opens one session
(``genflow.runtime.session``): its config validated, its output resolved, its input
checked, its storage opened, its lease taken, each once, before Prefect and Ray start;
then its first stage's workers are launched, and the job flow (``genflow.flows.job``) is
imported and runs with the session's key among its parameters. Prefect's flows are
imported only then: their import passes while Ray starts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from genflow.config import JobConfig
from genflow.data import layout
from genflow.data.storage import Storage
from genflow.engine.errors import JobFailed
from genflow.grid import SweepPlan, plan_sweep
from genflow.runtime.local_prefect import quiet_prefect_defaults
from genflow.runtime.session import (
    USER_ERRORS,
    JobSession,
    SweepSession,
    install_log_filter,
    registered,
)
from genflow.runtime.shutdown import (
    PrefectAPILost,
    lost_api_reported,
    prefect_api_busy,
    prefect_api_lost,
    shown_api_url,
)


def run_job(config: JobConfig | dict[str, Any], resume: bool = True,
            api_ready: Callable[[], None] | None = None, force: bool = False) -> dict[str, Any]:
    """Run the job flow and return its manifest (raises ``JobFailed`` past ``max_error_fraction``).

    ``api_ready`` is called right before the flow starts: the CLI waits there for the
    local Prefect API it launched at start-up, while the job's first workers load.
    The job holds its output's lease throughout (``genflow.data.lease``): another job on the
    output refuses at start (``OutputInUse``); ``force`` takes over a stale lease."""
    quiet_prefect_defaults()
    install_log_filter()
    # A bad config, an unreadable input or unreachable storage fail here, before Prefect and Ray start.
    session = JobSession.open(config, resume, force)
    with session.held(), registered(session):
        return _run_flow(session, api_ready)


def _run_flow(session: JobSession, api_ready: Callable[[], None] | None) -> dict[str, Any]:
    """The flow, in the job's session: its workers, Prefect, and a lost API made one line."""
    if session.new_job:  # a new job: its first stage has work
        session.launch_workers()
    from genflow.flows.job import genflow_job  # Prefect's import, while the workers load

    if api_ready is not None:
        api_ready()
    started = time.time()
    try:
        return genflow_job(**session.parameters())
    except (JobFailed, *USER_ERRORS):
        raise
    except Exception as exc:
        busy = prefect_api_busy(exc)
        if busy is None and not prefect_api_lost():
            raise
        manifest = _written_since(session.storage, started)
        if manifest is None:
            what = f"the Prefect API ({shown_api_url()}) stayed busy (HTTP {busy})" if busy else \
                f"lost the Prefect API ({shown_api_url()})"
            raise PrefectAPILost(f"{what} mid-job ({type(exc).__name__}): the shards finished so far are "
                                 f"kept; run the job again to resume") from None
        done = "the job ended with its outputs and manifest.json complete; Prefect's record of the run is not"
        logging.getLogger(__name__).warning(
            f"the Prefect API ({shown_api_url()}) stayed busy (HTTP {busy}): {done}" if busy
            else lost_api_reported(done))
        return manifest


def _written_since(storage: Storage, started: float) -> dict[str, Any] | None:
    """This run's manifest, if the job got as far as writing it (its time is after ``started``)."""
    info = storage.file_info(layout.MANIFEST)
    if info is None or info.mtime is None or info.mtime.timestamp() < started - 1:
        return None
    manifest: dict[str, Any] = storage.read_json(layout.MANIFEST)
    return manifest


def run_sweep(config: SweepPlan | dict[str, Any], overrides: list[str] | tuple[str, ...] = (), resume: bool = True,
              source: str = "config", force: bool = False) -> tuple[SweepPlan, list[dict[str, Any]]]:
    """Run a config's sweep through the sweep flow; returns its plan and the rows of ``sweep.parquet``.

    ``config`` is the sweep's config mapping (with ``overrides``), or its plan already made
    (``genflow.grid.plan_sweep``: every run validated, once). The sweep holds the lease of its
    output folder (``genflow.data.lease``) while it runs, as a job holds its own: a second
    sweep on it refuses at start; ``force`` takes over a stale one."""
    quiet_prefect_defaults()
    plan = config if isinstance(config, SweepPlan) else plan_sweep(config, overrides, source)
    sweep = SweepSession(plan, resume, force)
    from genflow.flows.sweep import genflow_sweep

    with sweep.held(), registered(sweep):
        return plan, genflow_sweep(**sweep.parameters())

"""One job session a run: the config validated once, its storage opened once, its lease taken
once, one key across the Prefect boundary, and nothing of the job left in a module after it."""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow


def _job(tmp_path: Path, **values: Any) -> dict[str, Any]:
    pq.write_table(pa.table({"prompt": [f"prompt {i}" for i in range(6)]}), tmp_path / "prompts.parquet")
    config: dict[str, Any] = {"name": "session", "input": str(tmp_path / "prompts.parquet"),
                              "output": str(tmp_path / "out"), "shard_rows": 4,
                              "generators": [{"label": "echo", "plugin": "echo", "samples": 2,
                                              "params": {"api_token": "tok-session-sentinel-4711"}}],
                              "scorers": [{"plugin": "length"}]}
    config.update(values)
    return config


class Counts:
    """How often a run validated a config, opened a storage, took a lease and registered a session."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import genflow.config
        from genflow.data.lease import OutputLease
        from genflow.data.storage import Storage
        from genflow.runtime import session

        self.validated = 0
        self.opened: collections.Counter[str] = collections.Counter()
        self.leases: collections.Counter[str] = collections.Counter()
        self.sessions: list[Any] = []
        validate, acquire = genflow.config.validate_plugins, OutputLease.acquire
        open_storage, job_open = Storage.open, session.JobSession.open  # bound to their classes

        def validating(*args: Any, **kwargs: Any) -> None:
            self.validated += 1
            validate(*args, **kwargs)

        def acquiring(lease: OutputLease) -> None:
            self.leases[lease.storage.uri] += 1
            acquire(lease)

        def opening(cls: type, uri: str, *args: Any, **kwargs: Any) -> Storage:
            self.opened[uri] += 1
            return open_storage(uri, *args, **kwargs)

        def opening_session(cls: type, *args: Any, **kwargs: Any) -> Any:
            found = job_open(*args, **kwargs)
            self.sessions.append(found)
            return found

        monkeypatch.setattr(genflow.config, "validate_plugins", validating)
        monkeypatch.setattr(OutputLease, "acquire", acquiring)
        monkeypatch.setattr(Storage, "open", classmethod(opening))
        monkeypatch.setattr(session.JobSession, "open", classmethod(opening_session))


def test_a_run_validates_its_config_opens_its_storage_and_takes_its_lease_once(
        tmp_path: Path, job_runner: Any, test_plugins: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect import get_client

    config = _job(tmp_path)
    counts = Counts(monkeypatch)
    manifest = job_runner(config)
    out = str(tmp_path / "out")
    assert manifest["status"] == "completed" and manifest["rows"]["generations"] == 12
    assert manifest["errors"]["rows"] == 0  # the plugin got the real token, through the session
    assert counts.validated == 1
    assert counts.opened[out] == 1 and counts.leases == {out: 1}
    assert len(counts.sessions) == 1

    # What crossed the Prefect boundary: the session's key and the config with its secret hidden.
    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs() if r.parameters.get("config", {}).get("output") == out]
    assert len(runs) == 1
    parameters = runs[0].parameters
    assert parameters["session"] == counts.sessions[0].key and len(parameters["session"]) == 32
    assert parameters["config"]["generators"][0]["params"]["api_token"] == "***"
    assert "tok-session-sentinel-4711" not in json.dumps(parameters)

    # A rerun (everything skipped) is a run too: once each, again.
    job_runner(config)
    assert counts.validated == 2 and counts.opened[out] == 2 and counts.leases == {out: 2}


def test_a_sweep_validates_each_run_once_and_takes_each_lease_once(
        tmp_path: Path, job_runner: Any, test_plugins: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from genflow.flows.run import run_sweep

    config = _job(tmp_path, sweep={"seed": [1, 2]})
    counts = Counts(monkeypatch)
    plan, rows = run_sweep(config)
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert counts.validated == 1 + len(plan.runs)  # the sweep's config, then each run's, as it is planned
    runs = [str(tmp_path / "out" / run.name) for run in plan.runs]
    assert counts.leases == {str(tmp_path / "out"): 1, **{run: 1 for run in runs}}
    assert all(counts.opened[run] == 1 for run in runs) and counts.opened[str(tmp_path / "out")] == 1


def _holds(value: Any, job_state: tuple[type, ...], names: set[str], depth: int = 2) -> bool:
    """Whether ``value`` is, or (``depth`` levels down a container) holds, a job's state."""
    if isinstance(value, job_state):
        return True
    if isinstance(value, str):
        return any(name in value for name in names)
    if depth == 0:
        return False
    if isinstance(value, dict):
        return any(_holds(k, job_state, names, depth - 1) or _holds(v, job_state, names, depth - 1)
                   for k, v in list(value.items()))
    if isinstance(value, (list, tuple, set, frozenset, collections.deque)):
        return any(_holds(v, job_state, names, depth - 1) for v in list(value))
    return False


def test_no_module_holds_a_jobs_state_after_its_run(tmp_path: Path, job_runner: Any,
                                                    test_plugins: dict[str, str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from genflow.config import JobConfig
    from genflow.data.lease import OutputLease
    from genflow.data.storage import Storage
    from genflow.engine.actors import RequestPool, WorkerPool, Workers
    from genflow.runtime import session

    counts = Counts(monkeypatch)
    config = _job(tmp_path)
    assert job_runner(config)["status"] == "completed"
    key = counts.sessions[0].key
    assert counts.sessions[0].lease is None and counts.sessions[0].early_workers is None
    assert not session._OPEN  # the session was findable by its key only while its flow ran

    job_state = (session.JobSession, session.SweepSession, JobConfig, Storage, OutputLease, Workers, WorkerPool,
                 RequestPool)  # the API-lost flag is the session's: a session found anywhere is a failure
    names = {key, str(tmp_path / "out")}
    held = [f"{name}.{attribute}" for name, module in list(sys.modules.items())
            if name == "genflow" or name.startswith("genflow.")
            for attribute, value in list(vars(module).items())
            if not attribute.startswith("__") and _holds(value, job_state, names)]
    assert held == []


def test_a_request_stage_gets_the_request_worker_its_session_launched_early(
        tmp_path: Path, job_runner: Any, test_plugins: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from genflow.runtime.session import JobSession

    launched: list[Any] = []
    handed: list[tuple[Any, Any]] = []
    launch, hand = JobSession.launch_workers, JobSession.request_pool

    def launching(session: JobSession) -> type | None:
        factory = launch(session)
        launched.append(session.early_requests)
        return factory

    def handing(session: JobSession, pool: Any) -> Any:
        handed.append((pool, hand(session, pool)))
        return handed[-1][1]

    monkeypatch.setattr(JobSession, "launch_workers", launching)
    monkeypatch.setattr(JobSession, "request_pool", handing)
    config = _job(tmp_path, generators=[{"label": "api", "plugin": "echo-async"}])
    manifest = job_runner(config)
    assert manifest["status"] == "completed" and manifest["rows"]["generations"] == 6
    assert len(launched) == 1 and launched[0] is not None  # a request worker, launched before the flow
    assert len(handed) == 1
    fresh, used = handed[0]
    assert used is launched[0] and fresh is not used  # the stage ran on the early one, not a second worker
    assert manifest["plugins"]["api"]["requests"]  # the early worker's own counts, read as the stage ended

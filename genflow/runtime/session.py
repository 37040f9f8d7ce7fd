"""One run of one job in this process: its session.

A job's run needs, from ``genflow run`` to its ``manifest.json``: its config, validated once
and with its output resolved once (``{date}`` filled in); its storage, opened and probed
once; the lease of its output, taken once; the workers launched early for its first stage;
and whether the Prefect API was lost mid-run. A :class:`JobSession` holds them all.

It crosses the Prefect boundary by a key. A flow's parameters are stored by Prefect and
shown to everyone who can open its UI, so the job flow is given the config with its secrets
hidden and the session's key (:meth:`JobSession.parameters`); the flow finds the session
under that key in this process (:func:`flow_session`). A deployment's run, started by
Prefect in a process that has no session, builds its own from its parameters, reading the
secrets back from the config file the deployment names (``config_source``).

A session is registered only while its run is under way (:func:`registered`): after the run
no module holds any of the job's state. A sweep crosses the boundary the same way, as a
:class:`SweepSession` (its planned runs), and opens a job session for each run.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from genflow.api import sends_requests
from genflow.config import (
    ConfigError,
    JobConfig,
    build_config,
    hides_secrets,
    load_raw,
    parse_override,
    redacted,
    resolve_output,
    set_dotted,
)
from genflow.data import layout
from genflow.data.checks import check_job
from genflow.data.prompts import InputError
from genflow.data.storage import Storage, StorageError, disk_full, is_remote
from genflow.engine.errors import JobFailed, PoolStopped
from genflow.registry import PluginError, get_registry

if TYPE_CHECKING:
    from genflow.data.lease import OutputLease
    from genflow.engine.actors import RequestPool, Workers
    from genflow.grid import SweepPlan

USER_ERRORS = (ConfigError, InputError, PluginError, StorageError, ConnectionError, FileNotFoundError)
"""Errors the user fixes (the config, the input, a plugin, the storage): one message, exit code 2."""


class JobSession:
    """One run of one job: its validated config (output resolved), its storage, its lease, the
    workers launched early for its first stage, and whether the Prefect API was lost."""

    def __init__(self, config: JobConfig, storage: Storage, resume: bool = True, force: bool = False) -> None:
        self.key = uuid.uuid4().hex
        """What the flow's parameters carry to find this session (random: nothing of the config in it)."""
        self.config = config
        self.storage = storage
        self.resume = resume
        self.force = force
        self.lease: OutputLease | None = None
        self.early_workers: Workers | None = None
        self.early_requests: RequestPool | None = None
        self.api_lost = threading.Event()
        """Set once the Prefect API is gone: the run's remaining tasks run without Prefect."""

    @classmethod
    def open(cls, config: JobConfig | dict[str, Any], resume: bool = True, force: bool = False,
             check: bool = True, source: str = "config") -> JobSession:
        """The session of a run of ``config``: validated (unless it is a ``JobConfig`` already), its
        output resolved, and (``check``) its input, templates and model folders checked
        (:func:`genflow.data.checks.check_job`), before Prefect, Ray or any model starts."""
        job = config if isinstance(config, JobConfig) else build_config(config, source=source)
        job = job.model_copy(update={"output": resolve_output(job.output)})
        if check:
            check_job(job)
        return cls(job, Storage.open(job.output, **job.storage.model_dump()), resume, force)

    @property
    def new_job(self) -> bool:
        """Whether the run starts the job afresh (no resume, or no manifest of an earlier run)."""
        return not self.resume or not self.storage.exists(layout.MANIFEST)

    def parameters(self) -> dict[str, Any]:
        """The job flow's parameters, as Prefect records and shows them: no secret in them."""
        return {"config": redacted(self.config.model_dump(mode="json")), "resume": self.resume, "session": self.key}

    @contextlib.contextmanager
    def held(self) -> Iterator[JobSession]:
        """The run's hold on its output, taken once: the storage reachable and writable, the
        output's lease (``genflow.data.lease``). On every way out (Ctrl-C included), workers
        launched early that no stage took are stopped and the lease is released. Inside a
        hold already (the flow of ``genflow run``), the block runs under it."""
        if self.lease is not None:
            yield self
            return
        from genflow.data.lease import OutputLease

        self.storage.check()
        self.storage.probe_write()
        lease = OutputLease(self.storage, self.config.name, self.force)
        lease.acquire()
        self.lease = lease
        try:
            yield self
        finally:
            try:
                self.stop_early_workers()
            finally:
                self.lease = None
                lease.release()

    # -- workers launched early ------------------------------------------------------------------

    def launch_workers(self) -> type | None:
        """Start the job's workers now, loading its first stage's plugin: Ray's start and the
        model loads take seconds, which then pass while Prefect starts the flow run and plans
        the shards. Returns the plugin class launched (None: the job has no stage).

        Only for a new job (:attr:`new_job`): a rerun may have nothing to do, and must then
        start no Ray at all (its workers start when a stage finds work)."""
        from genflow.api import sends_requests
        from genflow.config import GeneratorSpec, request_settings
        from genflow.engine.actors import RequestPool, Workers
        from genflow.registry import get_registry
        from genflow.stages.common import episode_settings

        job = self.config
        first = (job.generators or job.scorers or [None])[0]
        if first is None:
            return None
        kind = "generator" if job.generators else "scorer"
        factory: type = get_registry().get(kind, first.plugin).factory.implementation(first.params)
        if sends_requests(factory) or episode_settings(first) is not None:  # a request worker of its own
            label = first.label if isinstance(first, GeneratorSpec) else first.name
            self.early_requests = RequestPool(factory, first.model, first.params, job.ray, label,
                                              request_settings(first, job.output), job.seed, episode_settings(first))
            self.early_requests.launch()
        else:
            self.early_workers = Workers(job.ray)
            self.early_workers.load(factory, first.model, first.params)
        return factory

    def take_workers(self) -> Workers:
        """The job's workers: those launched early, or new ones (started on first use)."""
        from genflow.engine.actors import Workers

        workers, self.early_workers = self.early_workers, None
        return workers or Workers(self.config.ray)

    def request_pool(self, pool: RequestPool) -> RequestPool:
        """The request worker launched early for a stage like ``pool``'s, or ``pool`` itself."""
        from genflow.engine.actors import request_key

        early = self.early_requests
        if early is not None and request_key(early) == request_key(pool):
            self.early_requests = None
            return early
        return pool

    def stop_early_workers(self) -> None:
        """Stop workers launched early that no stage took (the job failed before its first stage)."""
        workers, self.early_workers = self.early_workers, None
        requests, self.early_requests = self.early_requests, None
        if workers is not None:
            workers.stop()
        if requests is not None:
            requests.stop()


class SweepSession:
    """One run of a sweep: its planned (and validated) runs, behind a key as a job's session."""

    def __init__(self, plan: SweepPlan, resume: bool = True, force: bool = False) -> None:
        self.key = uuid.uuid4().hex
        self.plan, self.resume, self.force = plan, resume, force
        self.root: Storage | None = None
        """The sweep's folder, opened while the sweep is held (:meth:`held`)."""

    def parameters(self) -> dict[str, Any]:
        """The sweep flow's parameters, as Prefect records and shows them: no secret in them."""
        return {"config": redacted(self.plan.base.model_dump(mode="json")), "resume": self.resume,
                "session": self.key}

    @contextlib.contextmanager
    def held(self) -> Iterator[Storage]:
        """The sweep's folder, under its lease for the block (a second sweep on it refuses at start)."""
        from genflow.data.lease import output_lease

        root = Storage.open(self.plan.output, **self.plan.base.storage.model_dump())
        with output_lease(root, self.plan.name, self.force):
            self.root = root
            try:
                yield root
            finally:
                self.root = None


# -- one key across the Prefect boundary ---------------------------------------------------------

_OPEN: dict[str, JobSession | SweepSession] = {}
"""The sessions of the runs under way in this process, by key; each only while its run is."""

S = TypeVar("S", JobSession, SweepSession)


@contextlib.contextmanager
def registered(session: S) -> Iterator[S]:
    """``session`` findable by its key (:func:`find`) for the block: while its flow runs."""
    _OPEN[session.key] = session
    try:
        yield session
    finally:
        _OPEN.pop(session.key, None)


def find(key: str | None, kind: type[S]) -> S | None:
    """The session registered under ``key`` in this process, if it is one of ``kind``."""
    found = _OPEN.get(key) if key else None
    return found if isinstance(found, kind) else None


@contextlib.contextmanager
def flow_session(shown: dict[str, Any], resume: bool, source: dict[str, Any] | None,
                 key: str | None) -> Iterator[JobSession]:
    """The session a job flow's run works in, held (its lease taken) for the block: the one
    registered under ``key`` by ``genflow run`` or a sweep; for a run Prefect started (a
    deployment's), one built here from its parameters."""
    session = find(key, JobSession)
    if session is None:
        session = JobSession.open(config_from_parameters(shown, source), resume, check=False,
                                  source=f"job {shown.get('name', '?')!r}")
    with session.held():
        yield session


def config_from_parameters(shown: dict[str, Any], source: dict[str, Any] | None) -> dict[str, Any]:
    """The config a flow run was given for Prefect's records (``shown``), with its secrets back:
    read again from the config file a deployment names (``source``)."""
    if source and source.get("file"):
        raw = load_raw(source["file"])
        for text in source.get("overrides") or []:
            set_dotted(raw, *parse_override(text))
        raw = anchor_paths(raw, Path(source.get("base") or "."))
        raw.pop("sweep", None)
        if redacted(raw) != shown:
            raise ConfigError(f"{source['file']} changed since this deployment was made: its secrets cannot be "
                              f"matched to the deployment's config; run `genflow deploy` again")
        return raw
    if hides_secrets(shown):
        raise ConfigError("this run's config has hidden (***) values, and the real ones are not in this process: "
                          "run the job with `genflow run`, or deploy it with `genflow deploy CONFIG`")
    return shown


def _absolute(value: Any, base: Path, must_exist: bool) -> Any:
    if not isinstance(value, str) or not value or is_remote(value) or value.startswith("file://"):
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return value
    candidate = base / path
    if must_exist and not candidate.exists():
        return value  # a hub model id such as "gpt2", not a folder here
    return str(candidate)


def anchor_paths(raw: dict[str, Any], base: Path | None = None) -> dict[str, Any]:
    """The config with relative local paths made absolute against ``base`` (the current folder):
    a deployment's run, wherever it runs, means what ``genflow run`` would where it was made.
    A served plugin's model is the server's name for it, left as written even where a folder
    here has that name (``vllm serve models/x`` serves the name ``models/x``). Ids and
    fingerprints do not follow the spelling (``genflow.data.model_identity``)."""
    base = (base or Path.cwd()).resolve()
    data = copy.deepcopy(raw)
    data["input"] = _absolute(data.get("input"), base, must_exist=False)
    data["output"] = _absolute(data.get("output"), base, must_exist=False)
    for key, kind in (("generators", "generator"), ("scorers", "scorer")):
        for spec in data.get(key) or []:
            if isinstance(spec, dict) and "model" in spec and not _served(kind, spec):
                spec["model"] = _absolute(spec["model"], base, must_exist=True)
            user = spec.get("user") if isinstance(spec, dict) else None  # a generator's simulated user
            if isinstance(user, dict) and "model" in user and not _served("generator", user):
                user["model"] = _absolute(user["model"], base, must_exist=True)
    reward = (data.get("rounds") or {}).get("reward") if isinstance(data.get("rounds"), dict) else None
    for key in ("model", "base"):  # a rounds job's reward model, given or to train from
        if isinstance(reward, dict) and isinstance(reward.get(key), str):
            reward[key] = _absolute(reward[key], base, must_exist=True)
    return data


def _served(kind: str, spec: dict[str, Any]) -> bool:
    """Whether a raw generator or scorer entry names a plugin that sends requests (one not
    installed here counts as local: the config's check names it when the job starts)."""
    params = spec.get("params")
    try:
        factory = get_registry().get(kind, str(spec.get("plugin"))).factory.implementation(
            params if isinstance(params, dict) else {})
    except (PluginError, ValueError):
        return False
    return sends_requests(factory)


# -- the process a job runs in -------------------------------------------------------------------

class _NoTracebackForUserErrors(logging.Filter):
    """Prefect logs every task failure with its traceback; a bad input, or a full disk, needs only its
    message, and so does a job that stopped as it was told to (``max_cost`` spent, too many errors), and
    a pack's task stopped with its stage (``PoolStopped``: the job failed or was interrupted)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and (isinstance(error, (*USER_ERRORS, JobFailed, PoolStopped)) or disk_full(error)):
            record.exc_info = None
            record.exc_text = None
            record.msg = str(record.getMessage()).split("\nTraceback")[0]
            record.args = ()
        return True


class _SayWhatFinished(logging.Filter):
    """Prefect ends each task and flow run with "Finished in state Completed()", which on a terminal
    says nothing of what finished: a completed run's line is dropped (a stage's own lines name each
    shard it wrote, the command's summary the job), any other names its run
    (``generate-echo-0-3-<fingerprint>: Finished in state Failed(...)``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Finished in state"):
            return True
        if str(record.msg).startswith("Finished in state Completed("):
            return False
        name = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        if name and not str(record.msg).startswith(f"{name}: "):
            record.msg = f"{name}: {record.getMessage()}"
            record.args = ()
        return True


def install_log_filter() -> None:
    """Prefect's lines for a user's error, or a job stopped as told, without their tracebacks; no bare
    "Finished in state Completed()" line."""
    for name in ("prefect.task_runs", "prefect.flow_runs", "prefect.flow_engine", "prefect.task_engine"):
        logger = logging.getLogger(name)
        for kind in (_NoTracebackForUserErrors, _SayWhatFinished):
            if not any(isinstance(f, kind) for f in logger.filters):
                logger.addFilter(kind())

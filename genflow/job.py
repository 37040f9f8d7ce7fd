"""Run a genflow job from Python: ``run_job(load_config("configs/quickstart.yaml"))``."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from genflow.config import ConfigError, JobConfig
from genflow.data.prompts import InputError
from genflow.data.storage import StorageError, disk_full
from genflow.engine.errors import JobFailed
from genflow.registry import PluginError
from genflow.runtime.shutdown import lost_api_reported, prefect_api_busy, shown_api_url

USER_ERRORS = (ConfigError, InputError, PluginError, StorageError, ConnectionError, FileNotFoundError)


class _NoTracebackForUserErrors(logging.Filter):
    """Prefect logs every task failure with its traceback; a bad input, or a full disk, needs only its
    message, and so does a job that stopped as it was told to (``max_cost`` spent, too many errors)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and (isinstance(error, (*USER_ERRORS, JobFailed)) or disk_full(error)):
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
            api_ready: Callable[[], None] | None = None, force: bool = False) -> dict[str, Any]:
    """Run the job flow and return its manifest (raises ``JobFailed`` past ``max_error_fraction``).

    ``api_ready`` is called right before the flow starts: the CLI waits there for the
    local Prefect API it launched at start-up, while the job's first workers load.
    The job holds its output's lease throughout (``genflow.data.lease``): another job on the
    output refuses at start (``OutputInUse``); ``force`` takes over a stale lease."""
    quiet_prefect_defaults()
    _install_log_filter()
    from genflow.config import build_config, resolve_output
    from genflow.data.lease import output_lease
    from genflow.data.storage import Storage

    job = config if isinstance(config, JobConfig) else build_config(config)
    # Fail on a bad config, an unreadable input or unreachable storage before Prefect and Ray start.
    check_job(job)
    storage = Storage.open(resolve_output(job.output), **job.storage.model_dump())
    storage.check()
    storage.probe_write()
    with output_lease(storage, job.name, force):
        return _run_flow(job, storage, resume, api_ready)


def _run_flow(job: JobConfig, storage: Any, resume: bool, api_ready: Callable[[], None] | None) -> dict[str, Any]:
    """The flow, under the output's lease: the job's workers, Prefect, and a lost API made one line."""
    from genflow.engine.actors import stop_early_workers

    try:
        if not resume or not storage.exists("manifest.json"):  # a new job: its first stage has work
            _launch_workers(job)
        from genflow.flows.job import genflow_job  # Prefect's import, while the workers load

        if api_ready is not None:
            api_ready()
        shown, source = hand_over(job.model_dump(mode="json"))
        started = time.time()
        try:
            return genflow_job(shown, resume=resume, config_source=source)
        except (JobFailed, *USER_ERRORS):
            raise
        except Exception as exc:
            busy = prefect_api_busy(exc)
            if busy is None and not prefect_api_lost():
                raise
            manifest = _written_since(storage, started)
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
    finally:
        stop_early_workers()


class PrefectAPILost(RuntimeError):
    """The Prefect API stopped answering before the job finished."""


def _api_url() -> str:
    """The Prefect API's URL, credentials included (to reach it; messages show :func:`shown_api_url`)."""
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value() or "ephemeral")


def prefect_api_lost(timeout: float = 3.0) -> bool:
    """Whether the Prefect API this process uses no longer answers its health check."""
    import urllib.error
    import urllib.request

    url = _api_url()
    if not url.startswith("http"):
        return False
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as response:
            return bool(response.status >= 500)
    except (urllib.error.URLError, OSError):
        return True


def _written_since(storage: Any, started: float) -> dict[str, Any] | None:
    """This run's manifest, if the job got as far as writing it (its time is after ``started``)."""
    info = storage.file_info("manifest.json")
    if info is None or info.mtime is None or info.mtime.timestamp() < started - 1:
        return None
    manifest: dict[str, Any] = storage.read_json("manifest.json")
    return manifest


def check_job(job: JobConfig, read_rows: bool = True) -> Any:
    """What can be checked of a job before anything starts: it lies apart from its output, and
    its input opens, has rows, and (``read_rows``) every row has a prompt, an id of its own and
    valid text. Streams the input once (as the plan does again): a bad row found by the plan
    would come after Ray and the first model had started. Returns the opened input."""
    from genflow.config import resolve_output
    from genflow.data.layout import overlapping
    from genflow.data.prompts import open_input, shard_tables

    output = resolve_output(job.output)
    if overlapping(job.input, output):
        raise ConfigError(f"input {job.input} and output {output} overlap: the job would read its own outputs "
                          f"back as prompts (or write over its input); give the output a folder of its own")
    _check_model_paths(job)
    source = open_input(job.input, **job.storage.model_dump())
    _check_templates(job, source.columns)
    if read_rows:
        for _ in shard_tables(source, job.shard_rows):
            pass
    return source


def _check_model_paths(job: JobConfig) -> None:
    """A model named by a local path must be there: loading would take seconds before failing
    with a message about a model id. A name is taken for a path when it starts with ``/``,
    ``./``, ``../`` or ``~``, or when its first part is a folder here (``models/tiny``); a hub
    id (``org/name``) or a server's model name is left to the plugin."""
    from genflow.api import sends_requests
    from genflow.config import GeneratorSpec, ScorerSpec
    from genflow.registry import get_registry

    registry = get_registry()
    entries: list[tuple[str, str, int, GeneratorSpec | ScorerSpec]] = [
        ("generators", "generator", i, g) for i, g in enumerate(job.generators)]
    entries += [("scorers", "scorer", i, s) for i, s in enumerate(job.scorers)]
    for section, kind, i, spec in entries:
        if not spec.model or "://" in spec.model:
            continue
        factory = registry.get(kind, spec.plugin).factory.implementation(spec.params)
        if sends_requests(factory):  # the model is a name the server knows, not a folder
            continue
        path = Path(spec.model).expanduser()
        local = spec.model.startswith(("/", "./", "../", "~")) or (
            len(path.parts) > 1 and Path(path.parts[0]).is_dir())
        if local and not path.exists():
            raise ConfigError(f"{section}.{i}.model: {spec.model} does not exist (a local model folder; "
                              f"`genflow models init-tiny models` writes the tiny ones)")


def _check_templates(job: JobConfig, columns: list[str]) -> None:
    """A generator's template may only name the row's columns (as the input has them, plus
    ``prompt_id`` and ``task``): a missing one would fail every row after the model loaded."""
    import jinja2
    from jinja2 import meta

    environment = jinja2.Environment()
    known = {*columns, "prompt_id", "task", *environment.globals}
    for i, g in enumerate(job.generators):
        if not g.template:
            continue
        try:
            names = meta.find_undeclared_variables(environment.parse(g.template))
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError(f"generators.{i}.template: not a valid Jinja2 template: {exc}") from None
        missing = sorted(names - known)
        if missing:
            raise ConfigError(f"generators.{i}.template names {', '.join(map(repr, missing))}, which the input "
                              f"{job.input} has no column for (columns: {', '.join(columns)})")


# -- the config Prefect sees ------------------------------------------------------
#
# A flow's parameters are stored by Prefect and shown to everyone who can open its UI.
# So the flow is handed the config with its secrets hidden (``redacted``), and finds the
# real one by a key into this process's registry (``run_job``), or by re-reading the
# config file a deployment names (``config_source``).

_HANDED_OVER: dict[str, dict[str, Any]] = {}


def hand_over(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The config as Prefect may record it, and the ``config_source`` the flow finds the real one by."""
    from genflow.config import redacted, stable_hash

    shown = redacted(config)
    if shown == config:
        return config, None
    key = stable_hash(config, 32)
    _HANDED_OVER[key] = config
    return shown, {"handed_over": key}


def real_config(shown: dict[str, Any], source: dict[str, Any] | None) -> dict[str, Any]:
    """The config a flow was given for Prefect's records, with its secrets back."""
    from genflow.config import hides_secrets, load_raw, parse_override, redacted, set_dotted

    if source and source.get("handed_over") in _HANDED_OVER:
        return _HANDED_OVER[source["handed_over"]]
    if source and source.get("file"):
        from genflow.flows.deploy import anchor_paths

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


def _launch_workers(job: JobConfig) -> None:
    """Start the job's workers now, loading its first stage's plugin: Ray's start and the
    model loads take seconds, which then pass while Prefect starts the flow run and plans
    the shards.

    Only for a job that has not finished before: a rerun may have nothing to do, and
    must then start no Ray at all (its workers start when a stage finds work)."""
    from genflow.engine.actors import launch_early
    from genflow.registry import get_registry

    first = (job.generators or job.scorers or [None])[0]
    if first is None:
        return
    from genflow.api import sends_requests

    kind = "generator" if job.generators else "scorer"
    factory = get_registry().get(kind, first.plugin).factory.implementation(first.params)
    if sends_requests(factory):  # a request plugin runs on a worker of its own
        from genflow.config import GeneratorSpec
        from genflow.engine.actors import RequestPool, launch_early_requests

        label = first.label if isinstance(first, GeneratorSpec) else first.name
        launch_early_requests(RequestPool(factory, first.model, first.params, job.ray, label,
                                          first.requests.model_dump(), job.seed))
    else:
        launch_early(job.ray, factory, first.model, first.params)

"""A local Prefect API for one ``genflow`` command, started before the rest of the work.

With no ``PREFECT_API_URL``, Prefect starts a temporary server when the first flow
runs: the driver first imports Prefect's whole server package (seconds, only to
get at the class that launches it), then launches the server process and waits
while that process imports it all again. ``start_local_api`` launches the same
server process (Prefect's own command: uvicorn on
``prefect.server.api.server:create_app``, UI off, ephemeral mode, same database)
at the start of the command and points ``PREFECT_API_URL`` at it, so the server
boots while the driver imports genflow, reads the config and checks the input,
and the driver never imports the server package. Measured on 2 cores, this is
most of the time a rerun of a finished job takes (``benchmarks/bench_rerun.py``).

The server is launched before this process imports Prefect at all: reading
Prefect's settings means importing most of Prefect (1-2.5 s on 2 cores), which the
job does anyway, later, while Ray starts. Whether the settings name an API of their
own is checked when the API is first needed (``ready()``); then the server
launched for nothing is stopped.

A user's own API (``PREFECT_API_URL`` from the environment or a Prefect profile)
is left alone, and so is a profile that turns the ephemeral server off.

The server runs in a session of its own (Ctrl-C in the terminal must not take it from
the job mid-exit), so nothing ends it with the command that started it but the command
itself: at exit, on Ctrl-C, in its exit hook. A command killed with SIGKILL runs none of
them. The server therefore watches its parent (:data:`WATCH_PARENT`): once its parent
process is gone it ends itself and every process of its session within seconds.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path

log = logging.getLogger(__name__)

SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}

PARENT_POLL_S = 0.2
"""How often the server checks that the command that started it still runs."""
PARENT_GONE_GRACE_S = 10.0
"""How long the server may take to end by SIGTERM, once its parent is gone, before SIGKILL."""

WATCH_PARENT = """\
import os, signal, sys, threading, time

parent, poll, grace = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])


def end_with_the_parent():
    # The parent ended (SIGKILL, a lost terminal) without stopping this server: getppid()
    # then names whoever adopted it. End the server and what it started (its session's group).
    while os.getppid() == parent:
        time.sleep(poll)
    os.killpg(0, signal.SIGTERM)
    time.sleep(grace)
    os.killpg(0, signal.SIGKILL)


threading.Thread(target=end_with_the_parent, name="genflow-parent-watch", daemon=True).start()
sys.argv = ["uvicorn", *sys.argv[4:]]
from uvicorn.main import main

main()
"""
"""The server's program: uvicorn, as ``python -m uvicorn`` runs it, plus a thread that ends the
server's session once the process that started it is gone. Polling ``getppid`` works wherever
Python does and, unlike Linux's ``PR_SET_PDEATHSIG``, does not fire when only the thread that
started the server ends."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalPrefectAPI:
    """A temporary Prefect server process, the way Prefect's ephemeral mode starts one."""

    def __init__(self, process: subprocess.Popen[bytes], port: int) -> None:
        self.process, self.port = process, port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def wait_ready(self, timeout: float) -> bool:
        """Block until the API answers its health check; False if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """End the server and any process it started (its session's process group)."""
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.process.wait()
            self._signal_group(signal.SIGKILL)  # what it started and left behind, if anything

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)  # its pid is its group's: a session of its own
        except (ProcessLookupError, PermissionError):
            pass


def start_local_api() -> LocalPrefectAPI | None:
    """Launch the server; :func:`adopt` points this process's Prefect settings at it.

    Returns None (and launches nothing) when ``PREFECT_API_URL`` is set or Prefect is
    not installed. A Prefect profile's own API, or one that turns the ephemeral server
    off, is only known once Prefect's settings are read: :func:`adopt` then stops the
    server instead. With Prefect already imported (a test harness, a long-lived
    process), the settings are read first, and nothing is launched for nothing.
    """
    if os.environ.get("PREFECT_API_URL"):
        return None
    settings_env: dict[str, str] = {}
    if "prefect.settings" in sys.modules:  # cheap now: read them, and hand them on (a harness's temporary ones)
        if not _wants_local_api():
            return None
        from prefect.settings import get_current_settings

        settings_env = get_current_settings().to_environment_variables(exclude_unset=True)
    spec = find_spec("prefect")
    if spec is None or not spec.submodule_search_locations:
        return None
    # As quiet_prefect_defaults: no telemetry heartbeat ("database is locked"),
    # and patience for a slow start on a busy machine.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    # A server on this machine that refuses a connection is gone, not busy: Prefect's default
    # (5 retries with exponential backoff per request) turned its loss into minutes of waiting.
    os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "1")
    port = _free_port()
    # Otherwise the server reads the same profile, prefect.toml and .env as this process
    # would (same environment, same working directory): its database is the one Prefect's
    # own ephemeral server would use.
    env = {**os.environ, **settings_env, **SERVER_ENV}
    watch = [str(os.getpid()), f"{PARENT_POLL_S:g}", f"{PARENT_GONE_GRACE_S:g}"]
    command = [sys.executable, "-c", WATCH_PARENT, *watch,
               "--app-dir", str(Path(spec.submodule_search_locations[0]).parent),
               "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "error", "--lifespan", "on"]
    # A session of its own: Ctrl-C in the terminal goes to the terminal's process group, and
    # must not take the API away from the job, which still reports its end to it (genflow
    # stops the server itself, at exit or on a second Ctrl-C; after a SIGKILL, the server
    # sees its parent gone and ends itself).
    process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    api = LocalPrefectAPI(process, port)
    _RUNNING.append(api)
    atexit.register(api.stop)
    log.debug("local Prefect API starting on %s", api.url)
    return api


def _wants_local_api() -> bool:
    """Whether Prefect's settings leave the API to an ephemeral server (no API URL of their own)."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    return not settings.api.url and bool(settings.server.ephemeral.enabled)


def adopt(api: LocalPrefectAPI) -> bool:
    """Point this process's Prefect at ``api`` if its settings want an ephemeral server; else
    stop ``api`` (the user's own API is used) and return False."""
    if os.environ.get("PREFECT_API_URL") or not _wants_local_api():
        api.stop()
        return False
    _point_prefect_at(api.url)
    return True


_RUNNING: list[LocalPrefectAPI] = []


def stop_local_apis() -> None:
    """Stop the servers this process started (for an exit that skips the atexit hooks)."""
    for api in _RUNNING:
        api.stop()


def use_prefects_own_server(api: LocalPrefectAPI) -> None:
    """Fall back to Prefect's ephemeral mode (the local API did not come up)."""
    api.stop()
    _point_prefect_at(None)


def _point_prefect_at(url: str | None) -> None:
    import prefect.context

    if url is None:
        os.environ.pop("PREFECT_API_URL", None)
        if os.environ.get("PREFECT_UI_URL") == "":
            del os.environ["PREFECT_UI_URL"]
    else:
        os.environ["PREFECT_API_URL"] = url
        os.environ.setdefault("PREFECT_UI_URL", "")  # it serves no UI: no "View at" link to nowhere
    prefect.context.refresh_global_settings_context()


@contextmanager
def local_prefect_api() -> Iterator[Callable[[], None]]:
    """Start the local API now; the yielded ``ready()`` waits for it (call it right before the first flow).

    If the server does not come up, ``ready()`` falls back to Prefect's own
    ephemeral server, so the command behaves as it would without this module.
    """
    api = start_local_api()
    adopted = False

    def ready() -> None:
        nonlocal adopted
        if api is None or adopted or not adopt(api):
            return
        adopted = True
        timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") or 90)
        if not api.wait_ready(timeout):
            log.warning("the local Prefect API did not start; using Prefect's own temporary server")
            use_prefects_own_server(api)

    try:
        yield ready
    finally:
        # A server the command never used (it failed before, or Prefect has an API of its
        # own) goes now. One it used stays: Prefect sends its last logs and events at exit,
        # and the atexit hook registered at start (so run after Prefect's own) stops it.
        if api is not None and not adopted:
            api.stop()


def quiet_prefect_defaults() -> None:
    """Settings that keep Prefect's local ephemeral server quiet and quick."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

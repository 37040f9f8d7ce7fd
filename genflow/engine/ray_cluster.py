"""Ray start-up: which Ray a job uses, and never waiting on one that is gone.

``ray.init()`` left to itself connects to ``RAY_ADDRESS``, or else to the "current
cluster" that the last ``ray start --head`` on this machine wrote to
``<Ray temp dir>/ray_current_cluster`` (``/tmp/ray/ray_current_cluster`` unless
``RAY_TMPDIR`` or ``TMPDIR`` says otherwise). A head that died without ``ray stop``
leaves that file behind, and Ray then retries its dead address for many minutes.
So genflow decides itself what it hands to ``ray.init`` (:func:`ray_address`):

- ``ray.address`` set, or else ``RAY_ADDRESS``: that cluster, which must answer a TCP
  connect within seconds, else :class:`RayUnreachable` (exit code 2 from the CLI).
  ``auto`` is looked up in the current-cluster file here, so that it is checked too.
- neither (``ray.address: null``): the cluster named by the current-cluster file if it
  answers within seconds; otherwise, or with no file, a fresh local Ray
  (``address="local"``, which makes Ray ignore the file), with one line saying so
  when the file named a dead cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray

from genflow.config import RaySpec

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
"""How long a cluster named by ``ray.address`` or ``RAY_ADDRESS`` has to accept a connection."""
CURRENT_CLUSTER_TIMEOUT_S = 2.0
"""The same for the current-cluster file's address (a local one: it answers at once or never)."""


class RayUnreachable(ConnectionError):
    """``ray.address`` (or ``RAY_ADDRESS``) names a cluster that does not answer."""


def current_cluster_file() -> Path:
    """Where Ray looks for the address of the last ``ray start --head`` on this machine."""
    try:
        from ray._common.utils import get_ray_address_file
    except ImportError:  # Ray before 2.4x kept it here
        from ray._private.utils import get_ray_address_file
    return Path(get_ray_address_file(None))


def _read_current_cluster(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _host_port(address: str) -> tuple[str, int] | None:
    """``host:port`` of an address (``ray://`` or another scheme stripped); None for other forms."""
    host, _, port = re.sub(r"^[a-z][a-z0-9+.-]*://", "", address).rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _no_answer(address: str, timeout: float) -> str | None:
    """Why nothing answers at ``address`` ("nothing answers at host:port (error)"), or None if it does."""
    target = _host_port(address)
    if target is None:
        return None  # a form Ray parses itself
    try:
        with socket.create_connection(target, timeout=timeout):
            return None
    except OSError as exc:
        return f"nothing answers at {target[0]}:{target[1]} ({exc})"


def _check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S, source: str = "") -> None:
    """Ray retries an address where nothing listens for minutes; find out in seconds."""
    problem = _no_answer(address, timeout)
    if problem:
        raise RayUnreachable(f"cannot connect to the Ray cluster at {address!r}{source}: {problem}") from None


def ray_address(spec: RaySpec) -> str:
    """What genflow passes to ``ray.init(address=...)``: a cluster that answers, or ``"local"``.

    Raises :class:`RayUnreachable` when ``ray.address`` or ``RAY_ADDRESS`` names a cluster
    that does not answer. See the module's docstring for the rules."""
    address, source = spec.address, ""
    if not address and os.environ.get("RAY_ADDRESS"):
        address, source = os.environ["RAY_ADDRESS"], " (RAY_ADDRESS)"
    if address == "local":
        return "local"
    path = current_cluster_file()
    if address == "auto":
        named = _read_current_cluster(path)
        if named is None:
            return "auto"  # Ray looks for a running instance on this machine, and says so at once if none
        _check_reachable(named, source=f" (named by {path}, for {address!r}{source})")
        return named
    if address:
        _check_reachable(address, source=source)
        return address
    named = _read_current_cluster(path)
    if named is None:
        return "local"
    if _no_answer(named, CURRENT_CLUSTER_TIMEOUT_S) is None:
        return named
    log.warning("the Ray cluster named by %s (%s) does not answer; starting a local Ray", path, named)
    return "local"


WORKER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(128 * 2**20)}
"""glibc malloc settings for the plugin workers: freed blocks up to 32 MiB are kept for
reuse instead of going back to the OS, so a batch's large temporary tensors stop costing
page faults (batched generation on CPU: +6% tokens/s on a 4x256 GPT-2, +15% on the tiny
one; benchmarks/bench_generation.py). Both are needed: setting one alone turns off glibc's
own adaptive thresholds and is slower than neither. A local Ray's processes inherit them
from the driver (a worker with a runtime_env of its own starts 0.5-1 s later: Ray cannot
use the workers it started in advance); a cluster's workers get them through their
runtime_env."""


def worker_env_vars() -> dict[str, str]:
    """``WORKER_MALLOC_ENV``, except where the user's environment sets a value."""
    return {k: os.environ.get(k, v) for k, v in WORKER_MALLOC_ENV.items()}


_ray_started_here = False
"""Whether this process's Ray was started (or connected) by :func:`init_ray`, not by the caller."""


def init_ray(spec: RaySpec) -> None:
    """Start Ray locally, or connect to the cluster :func:`ray_address` picks for ``spec``.

    Call it from the main thread: a local Ray's processes are tied to the thread that
    starts them (``PR_SET_PDEATHSIG``) and die with it."""
    global _ray_started_here
    if ray.is_initialized():
        return
    address = ray_address(spec)
    if address == "local":
        os.environ.update(worker_env_vars())  # the local Ray's processes, workers included, inherit these
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                              "log_to_driver": True}
    try:
        with _quicker_local_start() if address == "local" else contextlib.nullcontext():
            ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        if address == "local":
            raise
        raise RayUnreachable(f"cannot connect to the Ray cluster at {address!r}: {exc}") from None
    _ray_started_here = True


REGISTRATION_POLL_S = 0.02
"""How often a local start asks Ray's GCS whether its raylet has registered (Ray itself: every second)."""

_release_starters = threading.Event()
"""Set when the local Ray stops: the threads that started some of its processes may end then."""


@contextlib.contextmanager
def _quicker_local_start() -> Iterator[None]:
    """A local ``ray.init`` without two waits of Ray's own (benchmarks/README.md: start-up).

    ``ray.init`` starts the GCS, then Ray's dashboard process, and waits until the
    dashboard has imported its modules and written its URL before it starts the raylet,
    which needs neither; then it asks the GCS for the new node until the raylet has
    registered (once its agents answer), sleeping a full second after each miss
    (``GlobalStateAccessor::GetNode``), so the driver waited up to a second longer than
    the raylet took. Here, for the length of one ``ray.init``:

    - the dashboard starts in a thread of its own while the raylet starts; the thread
      stays until the local Ray stops (a process Ray starts dies with the thread that
      started it: ``PR_SET_PDEATHSIG``), and ``ray.init`` waits for the dashboard before
      it connects, as before;
    - the GCS's node table is read every 20 ms before Ray's own lookup, which then
      answers at once;
    - no autoscaler monitor is started: a one-machine Ray started for one job has nothing
      to scale, and the monitor's Python process took CPU from the rest of the start-up
      (and ignored SIGTERM at shutdown, see :func:`_kill_autoscaler_monitor`).

    Where Ray's private layout is not the one this was written for, ``ray.init`` runs
    unchanged."""
    try:
        from ray._private import node as ray_node
        from ray._private import services, state

        start_api_server, start_monitor = ray_node.Node.start_api_server, ray_node.Node.start_monitor
        get_node, client_options = services.get_node, services._get_gcs_client_options
    except (ImportError, AttributeError):
        yield
        return
    started: list[tuple[threading.Event, list[BaseException]]] = []
    release = _release_starters

    def start_dashboard(self: Any, **kwargs: Any) -> None:
        done, errors = threading.Event(), list[BaseException]()
        started.append((done, errors))

        def run() -> None:
            try:
                start_api_server(self, **kwargs)
            except BaseException as exc:  # raised where ray.init waits for it
                errors.append(exc)
            finally:
                done.set()
            release.wait()

        threading.Thread(target=run, name="ray dashboard start", daemon=True).start()

    def registered_node(gcs_address: str, node_id: str) -> Any:
        try:
            table = state.GlobalState()
            table._initialize_global_state(client_options(gcs_address))
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any(
                    node.get("NodeID") == node_id and node.get("Alive") for node in table.node_table()):
                time.sleep(REGISTRATION_POLL_S)
        except Exception as exc:  # Ray's own lookup decides, and raises its own error
            log.debug("could not poll the GCS for the raylet's registration: %s", exc)
        info = get_node(gcs_address, node_id)
        _wait_started(started)
        return info

    ray_node.Node.start_api_server = start_dashboard  # type: ignore[method-assign]
    ray_node.Node.start_monitor = lambda self: None  # type: ignore[method-assign]
    services.get_node = registered_node
    try:
        yield
    finally:
        ray_node.Node.start_api_server = start_api_server  # type: ignore[method-assign]
        ray_node.Node.start_monitor = start_monitor  # type: ignore[method-assign]
        services.get_node = get_node
        _wait_started(started, raise_error=False)  # none left after a start that got as far as its node


def _wait_started(started: list[tuple[threading.Event, list[BaseException]]], raise_error: bool = True) -> None:
    """Wait for the dashboard starts of :func:`_quicker_local_start`; raise the first one's error."""
    while started:
        done, errors = started.pop()
        done.wait(timeout=120)
        if errors and raise_error:
            raise errors[0]


def shutdown_ray() -> None:
    """Stop the Ray that :func:`init_ray` started (a cluster is only disconnected from).

    Ray does this itself at exit, but only after a half-second pause for log lines;
    a command that has nothing more to do with Ray calls this instead. A Ray the
    caller started is left alone."""
    global _ray_started_here
    global _release_starters
    if _ray_started_here and ray.is_initialized():
        _kill_autoscaler_monitor()
        ray.shutdown()
        _release_starters.set()
        _release_starters = threading.Event()
    _ray_started_here = False


def _kill_autoscaler_monitor() -> None:
    """Kill a local Ray's autoscaler monitor before ``ray.shutdown``: it ignores SIGTERM, and
    Ray waits a full second for it before it kills it anyway (1.2 s -> 0.2-0.4 s for the
    whole shutdown, on 2 cores). It keeps no state of a one-machine Ray worth an orderly
    exit. A local start by :func:`init_ray` starts no monitor (:func:`_quicker_local_start`);
    this is for one that did, where that start fell back to plain ``ray.init``. Nothing to
    do for a cluster this process only connected to (it started no processes), or where
    Ray's private layout differs from the one this was written for."""
    try:
        from ray._private import ray_constants
        from ray._private import worker as ray_worker

        node = ray_worker._global_node
        monitors: list[Any] = node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []) if node is not None else []
        for info in monitors:
            if info.process.poll() is None:
                info.process.kill()
                info.process.wait(timeout=2)
    except Exception as exc:  # Ray's own shutdown stops it all the same, a second later
        log.debug("could not kill Ray's autoscaler monitor early: %s", exc)

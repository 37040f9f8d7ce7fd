"""Ray start-up: a job's Ray started locally, or a cluster connected to."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import ray

from genflow.config import RaySpec


class RayUnreachable(ConnectionError):
    """``ray.address`` names a cluster that does not answer."""


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Ray retries an address where nothing listens for minutes; find out in seconds."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", or a form Ray parses itself
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise RayUnreachable(f"cannot connect to the Ray cluster at {address!r}: nothing answers at "
                             f"{host}:{port} ({exc})") from None


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
    """Start Ray locally, or connect to ``spec.address`` (``auto``, ``host:port``, ``ray://host:port``).

    Call it from the main thread: a local Ray's processes are tied to the thread that
    starts them (``PR_SET_PDEATHSIG``) and die with it."""
    global _ray_started_here
    if ray.is_initialized():
        return
    if not spec.address:
        os.environ.update(worker_env_vars())  # the local Ray's processes, workers included, inherit these
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                              "log_to_driver": True}
    if spec.address:
        _check_reachable(spec.address)
        try:
            ray.init(address=spec.address, **kwargs)
        except ConnectionError as exc:
            raise RayUnreachable(f"cannot connect to the Ray cluster at {spec.address!r}: {exc}") from None
    else:
        ray.init(**kwargs)
    _ray_started_here = True


def shutdown_ray() -> None:
    """Stop the Ray that :func:`init_ray` started (a cluster is only disconnected from).

    Ray does this itself at exit, but only after a half-second pause for log lines;
    a command that has nothing more to do with Ray calls this instead. A Ray the
    caller started is left alone."""
    global _ray_started_here
    if _ray_started_here and ray.is_initialized():
        ray.shutdown()
    _ray_started_here = False

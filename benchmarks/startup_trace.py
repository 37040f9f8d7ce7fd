"""``genflow ARGS`` with a timestamp at each step of its start-up and exit.

    python -m benchmarks.startup_trace MARKS.jsonl run CONFIG [...]

Runs genflow's CLI in this process as ``genflow`` would, and writes one JSON line per
event to MARKS.jsonl: ``{"t": seconds since GENFLOW_TRACE_T0 (the parent's clock
just before it launched this process, else this process's start), "what": ...}``.
Functions are wrapped by name as their modules are imported (``> name`` on entry,
``< name`` on exit), so the trace changes neither the order nor the laziness of
genflow's imports; a name that no longer exists is skipped (the breakdown then
shows that step as missing, not wrong). A thread polls the local Prefect API's
health check to mark when it first answers. The end of Python's exit hooks is
marked by the last atexit hook to run (it is registered first), or by the
``os._exit`` that genflow leaves with after them: what follows until the process is
gone, the parent measures (interpreter teardown).
"""

from __future__ import annotations

import atexit
import functools
import importlib.abc
import importlib.util
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

WRAP: dict[str, tuple[str, ...]] = {
    "genflow.runtime.local_prefect": ("start_local_api", "adopt", "LocalPrefectAPI.wait_ready", "LocalPrefectAPI.stop"),
    "genflow.engine.ray_cluster": ("init_ray", "shutdown_ray"),
    "genflow.runtime.session": ("JobSession.open", "JobSession.launch_workers", "JobSession.stop_early_workers"),
    "genflow.data.checks": ("check_job",),
    "genflow.flows.run": ("run_job",),
    "genflow.config": ("load_config",),
    "genflow.flows.job": ("run_stages", "build_manifest", "write_report_safely", "write_card_safely",
                          "publish_job_artifacts"),
    "genflow.runtime.shutdown": ("drain_prefect",),
}
FLOW = ("genflow.flows.job", "genflow_job")  # a Prefect Flow: its body is ``.fn``


class Marks:
    def __init__(self, path: str, t0: float) -> None:
        self.file = open(path, "w")  # noqa: SIM115 - open for the process's lifetime
        self.t0, self.lock = t0, threading.Lock()

    def __call__(self, what: str, **extra: Any) -> None:
        line = json.dumps({"t": round(time.time() - self.t0, 4), "what": what,
                           "thread": threading.current_thread().name, **extra})
        with self.lock:
            self.file.write(line + "\n")
            self.file.flush()


def _wrapped(fn: Callable[..., Any], name: str, mark: Marks) -> Callable[..., Any]:
    @functools.wraps(fn)
    def inner(*args: Any, **kwargs: Any) -> Any:
        mark(f"> {name}")
        try:
            return fn(*args, **kwargs)
        finally:
            mark(f"< {name}")
    return inner


def _patch(module: ModuleType, mark: Marks) -> None:
    for path in WRAP.get(module.__name__, ()):
        owner: Any = module
        *parents, attr = path.split(".")
        try:
            for part in parents:
                owner = getattr(owner, part)
            fn = getattr(owner, attr)
        except AttributeError:
            continue
        setattr(owner, attr, _wrapped(fn, path, mark))
    if module.__name__ == FLOW[0] and hasattr(module, FLOW[1]):
        flow = getattr(module, FLOW[1])
        flow.fn = _wrapped(flow.fn, "flow body", mark)


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the named functions of a module right after the module has run."""

    def __init__(self, mark: Marks) -> None:
        self.mark = mark

    def find_spec(self, name: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if name not in WRAP:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader, mark = spec.loader, self.mark
        run_module = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            mark(f"import {name}")
            run_module(module)
            _patch(module, mark)
            mark(f"imported {name}")

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _watch_prefect_api(mark: Marks) -> None:
    """Mark when the API that genflow launched (or was pointed at) first answers."""
    import urllib.request

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        running = getattr(sys.modules.get("genflow.runtime.local_prefect"), "_RUNNING", None) or []
        url = running[0].url if running else None
        if url:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                    if response.status == 200:
                        mark("prefect api answers")
                        return
            except OSError:
                pass
        time.sleep(0.05)


def main() -> None:
    out, *args = sys.argv[1:]
    mark = Marks(out, float(os.environ.get("GENFLOW_TRACE_T0") or time.time()))
    mark("python main")
    atexit.register(lambda: mark("exit hooks done"))  # registered first: runs last, unless genflow leaves first
    leave = os._exit

    def marked_exit(code: int) -> None:  # genflow leaves right after the exit hooks
        mark("exit hooks done")
        leave(code)

    os._exit = marked_exit  # type: ignore[assignment]
    sys.meta_path.insert(0, _Finder(mark))
    threading.Thread(target=_watch_prefect_api, args=(mark,), daemon=True, name="trace-prefect").start()
    sys.argv = ["genflow", *args]
    from genflow.cli import main as genflow_main

    mark("cli imported")
    try:
        genflow_main()
    except SystemExit as exc:
        mark("cli returned", code=exc.code if isinstance(exc.code, int) else 1)
        raise


if __name__ == "__main__":
    main()

"""How a ``genflow`` command ends: on Ctrl-C, and when the Prefect API is gone, within seconds.

- Ctrl-C (SIGINT) raises ``KeyboardInterrupt`` in the job, as Python does; the command
  then stops Ray and the local Prefect API, says how to resume and exits 130. Finished
  shards are on storage with their markers already, so nothing finished is lost. A
  second Ctrl-C exits at once (130), whatever the first one is waiting for.
- Prefect sends its last logs and events when the process exits and waits for them
  without a limit: against an API that died, for many minutes. Here they get
  ``DRAIN_SECONDS``; what is not sent by then is dropped, with one line saying so.
- While the API is gone, Prefect's events client logs a warning per attempt to
  reconnect; the first one becomes one line that says what it means, the rest are dropped.
- A busy API (a 5xx: :func:`prefect_api_busy`) is no lost one: the job tries the task again
  (``genflow.flows.job.TaskCall``), and Prefect's line for the failed request is dropped.
- After the last exit hook, the ``genflow`` program leaves at once (:func:`exit_after_hooks`):
  Python's own teardown of Prefect's, Ray's and pyarrow's modules took 1-3.5 s more on
  2 cores and does nothing a finished command needs.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

DRAIN_SECONDS = 5.0
"""How long Prefect's last logs and events may take to reach the API at exit."""
INTERRUPTED = 130
"""The exit code of a command stopped by Ctrl-C (128 + SIGINT), as shells report it."""


class _LostAPI(logging.Filter):
    """Prefect's events client warns once per reconnect attempt: one line, then silence."""

    said = False

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        if "Please wait for all submitted tasks" in text:
            return False  # a task whose start Prefect could not record (genflow submits no futures)
        if _LostAPI.said and any(noise in text for noise in _AFTER_LOSS):
            return False  # what Prefect says about runs whose states it could no longer record
        error = record.exc_info[1] if record.exc_info else None
        if any(prefect_api_busy(e) is not None for e in (error, *_futures_errors(record))):
            return False  # a busy API, not a lost one: the task is tried again, and its lines say so
        unreachable = type(error).__name__ in ("ConnectError", "ConnectTimeout") or "Connection refused" in str(error)
        if "Unable to connect" not in text and "failed to process item" not in text and not unreachable:
            return True
        if _LostAPI.said:
            return False
        _LostAPI.said = True
        record.msg = ("lost the Prefect API (%s): Prefect's record of this run stops here; every shard "
                      "finished is kept on storage")
        record.args = (shown_api_url(),)
        record.exc_info = record.exc_text = None
        return True


_AFTER_LOSS = ("Finished in state Pending", "Finished in state Running")


def _futures_errors(record: logging.LogRecord) -> list[BaseException]:
    """The errors of the futures a Prefect service's "failed to process item" names (its item
    holds the future its caller waits on: the task that asked for concurrency slots)."""
    items = record.args if isinstance(record.args, tuple) else ()
    found: list[BaseException] = []
    for item in items:
        for part in item if isinstance(item, tuple) else (item,):
            if isinstance(part, concurrent.futures.Future) and part.done() and not part.cancelled():
                error = part.exception()
                if error is not None:
                    found.append(error)
    return found


def prefect_api_busy(error: BaseException | None) -> int | None:
    """The 5xx status the Prefect API answered, where that is what ``error`` comes from (a busy
    server: Prefect's own SQLite locked under load answers 503), else None. A plugin's own HTTP
    error (a model server's 503) is not the API's: its request went elsewhere."""
    if error is None or "httpx" not in sys.modules:
        return None
    import httpx
    from prefect.settings import PREFECT_API_URL

    url = str(PREFECT_API_URL.value() or "").rstrip("/")
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, httpx.HTTPStatusError) and cause.response.status_code >= 500 \
                and url.startswith("http") and str(cause.request.url).startswith(url):
            return cause.response.status_code
        cause = cause.__cause__ or cause.__context__
    return None


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


def lost_api_reported(text: str) -> str:
    """``text`` as the line that says the Prefect API was lost, the first time; then as it is."""
    if _LostAPI.said:
        return text
    _LostAPI.said = True
    return f"lost the Prefect API ({shown_api_url()}): {text}"


def shown_api_url() -> str:
    """The Prefect API's URL as a message may show it: a user:password inside it hidden."""
    try:
        from prefect.settings import PREFECT_API_URL

        from genflow.config import redact_url

        return redact_url(str(PREFECT_API_URL.value() or "ephemeral"))
    except Exception:
        return "?"


def quiet_lost_api() -> None:
    for name in ("prefect.events.clients", "prefect.runner._event_emitter", "prefect._internal.concurrency",
                 "prefect.flow_runs", "prefect.task_runs", "prefect.flow_engine", "prefect.task_engine"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _LostAPI) for f in logger.filters):
            logger.addFilter(_LostAPI())
    # Prefect's log handler writes "--- Error logging to API ---" per failed batch unless this is off.
    logging.raiseExceptions = False


def drain_prefect(timeout: float = DRAIN_SECONDS) -> bool:
    """Send Prefect's queued logs and events, waiting ``timeout`` seconds at most; False if some
    were still unsent (the API does not answer)."""
    if "prefect" not in sys.modules:
        return True
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    pending: set[Any] = set()
    for service in (APILogWorker, EventsWorker):
        result = service.drain_all(timeout=timeout)
        if isinstance(result, tuple):
            pending |= result[1]
    return not pending


def _stop_children() -> None:
    from genflow.runtime.local_prefect import stop_local_apis

    stop_local_apis()


def _force_exit(signum: int, frame: FrameType | None) -> None:
    sys.stderr.write("\nsecond Ctrl-C: exiting now\n")
    sys.stderr.flush()
    try:
        _stop_children()
    finally:
        os._exit(INTERRUPTED)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGINT, _force_exit)
    raise KeyboardInterrupt


@contextmanager
def command_ending(resume_hint: str, print_line: Callable[[str], None],
                   cleanup: Callable[[], None] = lambda: None,
                   interrupted_notes: list[str] | None = None) -> Iterator[None]:
    """Run a command so that Ctrl-C ends it with code 130 and a line on how to resume, and
    Prefect's exit is bounded. ``cleanup`` (stopping Ray) runs on every way out.
    ``interrupted_notes``: lines said after that one (the command adds them as it learns what the
    job does: batches left running at a provider)."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _interrupt) if main else None
    quiet_lost_api()
    code: int | None = None
    try:
        yield
    except KeyboardInterrupt:
        code = INTERRUPTED
    except SystemExit as exc:  # typer.Exit is a click exception, turned into SystemExit later
        code = exc.code if isinstance(exc.code, int) else 1
        raise
    except Exception as exc:
        code = getattr(exc, "exit_code", 1)
        raise
    finally:
        try:
            cleanup()
        except Exception as exc:
            log.debug("cleanup after the command failed: %s", exc)
        if code == INTERRUPTED:
            print_line(f"interrupted: finished shards are kept; to resume, run: {resume_hint}")
            for note in interrupted_notes or []:
                print_line(note)
        drained = drain_prefect()
        if main:
            signal.signal(signal.SIGINT, previous or signal.default_int_handler)
        if not drained:
            print_line(f"the Prefect API ({shown_api_url()}) did not take this run's last logs within "
                       f"{DRAIN_SECONDS:g}s; they are dropped")
            _stop_children()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code or 0)  # Prefect's own exit hooks would wait for them without a limit
    if code == INTERRUPTED:
        import typer

        raise typer.Exit(INTERRUPTED)


_exit_code: list[int] = []
"""The code ``exit_after_hooks`` leaves with, once the command has one."""


@contextmanager
def exit_after_hooks() -> Iterator[None]:
    """Around a program's whole command: once every exit hook has run, leave with the command's
    exit code, skipping Python's teardown of the modules (1-3.5 s on 2 cores with Prefect, Ray
    and pyarrow loaded), which writes nothing and stops nothing a finished command needs.

    The hook is registered here, before any of the command's own: Python runs exit hooks last
    registered first, so it runs after all of them (Prefect's last logs and events go in
    ``threading``'s, even earlier), and before only those registered before it, of which it
    runs the one a command needs, ``logging.shutdown`` (log files flushed and closed). Only
    for the program itself (``genflow.cli.main``): a process that embeds the command keeps
    its own exit. An uncaught Ctrl-C is left to Python, which exits by the signal."""
    atexit.register(_leave)
    try:
        yield
    except SystemExit as exc:
        _exit_code.append(exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1)
        raise
    except KeyboardInterrupt:
        raise
    except BaseException:
        _exit_code.append(1)  # Python prints the traceback first, and exits with 1
        raise
    else:
        _exit_code.append(0)


def _leave() -> None:
    if not _exit_code:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(_exit_code[0])

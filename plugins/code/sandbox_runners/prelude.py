"""Shared by both runners: limits, error text, tracebacks. Python 3.8+.

Its text comes first in each runner's program (see the package's docstring).
"""

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import NoReturn


def _genflow_limits(limits: "Sequence[int]", only: "str | None" = None, but: "str | None" = None) -> None:
    """Set the limits (CPU s, address space, processes, file size, open files, core size;
    one below 0 is left as it is), ``only`` one of them or all ``but`` one."""
    import resource
    names = ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_NPROC", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_CORE")
    for name, value in zip(names, limits):
        if value < 0 or name == but or only not in (None, name):
            continue
        which = getattr(resource, name)
        hard = value + 1 if name == "RLIMIT_CPU" else value
        _, cur_hard = resource.getrlimit(which)
        if cur_hard != resource.RLIM_INFINITY:
            hard = min(hard, cur_hard)
        resource.setrlimit(which, (min(value, hard), hard))


def _genflow_text(exc: BaseException, limit: int = 500) -> str:
    """``exc`` as one line: its class's name and what it says."""
    text = type(exc).__name__
    try:
        if str(exc):
            text += ": " + str(exc)
    except BaseException:
        pass
    return text[:limit].replace("\n", " ")


def _genflow_print(exc: BaseException) -> None:
    """Print ``exc``'s traceback to stderr, less the runner's own frame."""
    # Printed with the C printer: importing the traceback module would cost more than a
    # typical run.
    try:
        exc.__traceback__ = exc.__traceback__.tb_next if exc.__traceback__ else None
        sys.__excepthook__(type(exc), exc, exc.__traceback__)
        sys.stderr.flush()
    except BaseException:
        pass


def _genflow_flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass


def _genflow_main_file(source: bytes) -> str:
    """Write the candidate as ``main.py`` beside it, so its tracebacks show source lines (the
    file holds no secret), and return the file name to compile it under."""
    try:
        with open("main.py", "wb") as main:
            main.write(source)
    except OSError:
        return "<candidate>"
    return "main.py"


def _genflow_fail(res_fd: int, exc: BaseException, write: "Callable[[int, bytes], int]" = os.write,
                  exit_now: "Callable[[int], NoReturn]" = os._exit) -> "NoReturn":
    """A runner's end when its program (or the tests' setup) raised: report ``E<error>``,
    print the traceback and exit with 1, the output it printed before flushed first (an agent
    reads it). Bound like :func:`_genflow_pass`."""
    try:
        _genflow_flush()
        write(res_fd, b"E" + _genflow_text(exc).encode("utf-8", "replace") + b"\n")
        _genflow_print(exc)
    finally:
        exit_now(1)


def _genflow_pass(res_fd: int, nonce: bytes, write: "Callable[[int, bytes], int]" = os.write,
                  exit_now: "Callable[[int], NoReturn]" = os._exit) -> "NoReturn":
    """A runner's end once its program (or the tests) ran through: flush the output, report
    ``P<nonce>`` and exit at once. ``os.write`` and ``os._exit`` are bound when the prelude
    runs, before any candidate code could replace them."""
    _genflow_flush()
    write(res_fd, b"P" + nonce + b"\n")
    exit_now(0)

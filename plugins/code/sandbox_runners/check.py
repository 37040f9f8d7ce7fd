"""Runs a candidate and its tests as two processes. Python 3.8+.

The tests' process (this one) makes itself non-dumpable, runs the setup, forks the
candidate's, reads the nonce and the tests only then, and runs them with the candidate's
names bound to values or to functions that call the candidate's over a pipe. Only plain
data crosses, as tagged JSON.

Arguments: the tests' descriptor (nonce, names, tests), the setup's, the candidate's
(names, source), the report pipe's, the limits (comma-separated). The report: ``S`` once
started, then ``P<nonce>`` when the tests ran to their end, ``E<error>``, ``C<wait status>``
(the candidate's process ended mid-tests) or ``X<error>`` (the sandbox's failure).
"""

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    # In the sandbox the prelude's text, which comes before this one's, defines them.
    from .prelude import (  # noqa: TC004
        _genflow_fail,
        _genflow_flush,
        _genflow_limits,
        _genflow_main_file,
        _genflow_pass,
        _genflow_print,
        _genflow_text,
    )

def _genflow_codec() -> "tuple[Callable[[object], bytes], Callable[[str], Any]]":
    """``dump`` (plain data to one line of tagged JSON) and ``load`` (back)."""
    try:
        from _json import encode_basestring_ascii as quote
        from _json import make_scanner
        c_scanner = True
    except ImportError:
        from json.encoder import encode_basestring_ascii as quote
        c_scanner = False
    specials = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}

    def put(value: object, out: "list[str]") -> None:
        if value is None:
            out.append("null")
        elif value is True:
            out.append("true")
        elif value is False:
            out.append("false")
        elif isinstance(value, str):
            out.append(quote(value))
        elif isinstance(value, int):
            try:
                out.append(int.__repr__(value))
            except ValueError:  # more digits than int -> str allows
                out.append('{"i":"' + int.__format__(value, "x") + '"}')
        elif isinstance(value, float):
            text = float.__repr__(value)
            out.append(specials.get(text, text))
        elif isinstance(value, (list, tuple, set, frozenset)):
            opening = ("[" if isinstance(value, list) else '{"t":[' if isinstance(value, tuple)
                       else '{"f":[' if isinstance(value, frozenset) else '{"s":[')
            out.append(opening)
            for i, item in enumerate(value):
                if i:
                    out.append(",")
                put(item, out)
            out.append("]" if opening == "[" else "]}")
        elif isinstance(value, dict):
            out.append('{"d":[')
            for i, (key, item) in enumerate(value.items()):
                out.append(",[" if i else "[")
                put(key, out)
                out.append(",")
                put(item, out)
                out.append("]")
            out.append("]}")
        elif isinstance(value, (bytes, bytearray)):
            out.append('{"' + ("b" if isinstance(value, bytes) else "a") + '":"' + value.hex() + '"}')
        elif isinstance(value, complex):
            out.append('{"c":[')
            put(value.real, out)
            out.append(",")
            put(value.imag, out)
            out.append("]}")
        else:
            raise TypeError(f"a {type(value).__name__} is not plain data")

    def tagged(obj: "dict[str, Any]") -> object:
        if len(obj) == 1:
            (tag, body), = obj.items()
            if type(body) is list:
                if tag == "t":
                    return tuple(body)
                if tag == "s":
                    return set(body)
                if tag == "f":
                    return frozenset(body)
                if tag == "d" and all(type(pair) is list and len(pair) == 2 for pair in body):
                    return {key: item for key, item in body}
                if tag == "c" and len(body) == 2 and all(type(part) is float for part in body):
                    return complex(body[0], body[1])
            elif type(body) is str:
                if tag == "b":
                    return bytes.fromhex(body)
                if tag == "a":
                    return bytearray.fromhex(body)
                if tag == "i":
                    return int(body, 16)
        raise ValueError("not plain data")

    if c_scanner:
        class Context:  # what the C scanner reads, 3.8 to 3.15
            strict: bool
            object_hook: "Callable[[dict[str, Any]], object] | None"
            object_pairs_hook: "Callable[[list[tuple[str, Any]]], object] | None"
            array_hook: "Callable[[list[Any]], object] | None"
            parse_float: "Callable[[str], object]"
            parse_int: "Callable[[str], object]"
            parse_constant: "Callable[[str], object]"
            memo: "dict[str, str]"
        context = Context()
        context.strict, context.object_hook, context.object_pairs_hook = True, tagged, None
        context.array_hook = None  # Python 3.15's scanner reads it: None keeps arrays as lists
        context.parse_float, context.parse_int, context.parse_constant = float, int, float
        context.memo = {}
        scan = make_scanner(context)  # type: ignore[arg-type]  # typeshed asks for a scanner as the context

        def load(text: str, /) -> "Any":
            value, end = scan(text, 0)
            if end != len(text):
                raise ValueError("more than one value")
            return value
    else:
        import json
        load = json.JSONDecoder(object_hook=tagged, parse_constant=float).decode

    def dump(value: object) -> bytes:
        out: list[str] = []
        put(value, out)
        out.append("\n")
        return "".join(out).encode("ascii")

    return dump, load


def _genflow_candidate(src_fd: int, calls_fd: int, replies_fd: int,
                       dump: "Callable[[object], bytes]", load: "Callable[[str], Any]") -> None:
    exit_now = os._exit
    with open(src_fd, "rb") as f:
        data = f.read()
    names, _, source = data.partition(b"\n")
    del data
    replies = open(replies_fd, "wb")  # noqa: SIM115  # open till the process ends (os._exit)

    def send(message: bytes) -> None:
        replies.write(message)
        replies.flush()

    def failure(exc: BaseException) -> bytes:
        if not isinstance(exc, Exception):  # SystemExit, KeyboardInterrupt...: the program ends
            return dump(("exit", _genflow_text(exc)))
        kinds = tuple(getattr(kind, "__name__", "") for kind in type(exc).__mro__)
        try:
            text = str(exc)[:1000]
        except BaseException:
            text = ""
        for args in (exc.args, None):
            try:
                return dump(("raise", kinds, args, text))
            except BaseException:
                pass
        return dump(("raise", ("Exception",), None, ""))

    filename = _genflow_main_file(source)
    sys.argv = [filename]
    space: dict[str, Any] = {"__name__": "__main__", "__file__": filename, "__builtins__": __builtins__}
    try:
        exec(compile(source, filename, "exec"), space)
    except BaseException as exc:
        _genflow_print(exc)
        send(failure(exc))
        exit_now(1)
    _genflow_flush()
    ready: dict[str, tuple[object, ...]] = {}
    for name in names.decode("ascii").split():
        if name not in space:
            continue
        value = space[name]
        if isinstance(value, type(sys)) and getattr(value, "__name__", None) == name:
            ready[name] = ("module",)
        elif callable(value):
            ready[name] = ("call",)
        else:
            try:
                dump(value)
                ready[name] = ("value", value)
            except Exception:
                ready[name] = ("call",)  # calling it tells the tests why they cannot have it
    send(dump(("ready", ready)))
    mutable = (list, dict, set, bytearray)
    last = None
    for line in open(calls_fd, "rb"):  # noqa: SIM115  # open till the process ends (os._exit)
        request = load(line[:-1].decode("ascii"))
        if request[0] == "traceback":  # the tests failed on what the last call raised
            if last is not None:
                _genflow_print(last)
            send(dump(("done",)))
            continue
        _, name, args, kwargs = request
        try:
            given = [(key, value, dump(value)) for key, value in [*enumerate(args), *kwargs.items()]
                     if type(value) in mutable]
            result = space[name](*args, **kwargs)
            changed = {key: value for key, value, before in given if dump(value) != before}
            try:
                message = dump(("ok", result, changed))
            except Exception as exc:
                raise TypeError(f"{name}() returned what the tests cannot receive: {exc} (only None, bool, "
                                "int, float, complex, str, bytes, bytearray, list, tuple, dict, set and "
                                "frozenset reach them)") from None
        except Exception as exc:
            last = exc
            message = failure(exc)
        except BaseException as exc:
            _genflow_flush()
            send(failure(exc))
            exit_now(1)
        send(message)
    _genflow_flush()
    exit_now(0)


def _genflow_prctl() -> "Callable[..., int]":
    # libc's prctl through _ctypes itself: importing ctypes would cost more than a typical run.
    try:
        import _ctypes
        class Int(_ctypes._SimpleCData):
            _type_ = "i"
        class Function(_ctypes.CFuncPtr):
            _flags_ = _ctypes.FUNCFLAG_CDECL
            _restype_ = Int
        class Libc:
            _handle = _ctypes.dlopen(None, 2)  # type: ignore[arg-type]  # None: the program itself; RTLD_NOW
        return Function(("prctl", Libc()))  # type: ignore[arg-type]  # a CDLL as far as _ctypes looks: a _handle
    except Exception:
        import ctypes
        return ctypes.CDLL(None).prctl


class _GenflowGone(BaseException):
    # The candidate's process ended or broke the protocol: args[0] says how, or None (ask waitpid).
    pass


def _genflow_runner_check(tests_fd: int, setup_fd: int, candidate_fd: int, res_fd: int,
                          limits: "list[int]") -> None:
    write, exit_now = os.write, os._exit
    # The process limit after the fork: under rlimits it counts every process of the user.
    _genflow_limits(limits, but="RLIMIT_NPROC")
    os.set_inheritable(res_fd, False)
    # The candidate will be this process's child, as the same user. Non-dumpable, this process
    # is out of its reach (no /proc/<pid>/mem, fd or environ, no ptrace, no pidfd_getfd) as long
    # as it has no capabilities; the nonce and the tests are read only after the fork.
    try:
        with open("/proc/self/status") as status:
            caps = [line.split()[1] for line in status if line.startswith("CapEff:")]
        if not caps or int(caps[0], 16):
            raise OSError(f"the sandboxed process has capabilities (CapEff {caps})")
        prctl = _genflow_prctl()
        prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
        if prctl(3, 0, 0, 0, 0) != 0:  # PR_GET_DUMPABLE
            raise OSError("prctl(PR_SET_DUMPABLE, 0) did not take")
    except BaseException as exc:
        sys.stderr.write(f"genflow: cannot keep the tests out of the candidate's reach: {_genflow_text(exc)}\n")
        sys.stderr.flush()
        exit_now(2)
    write(res_fd, b"S\n")
    # The setup is no secret (the candidate may know it): it runs before the fork, so the
    # candidate's process starts with the modules it imported.
    with open(setup_fd, "rb") as f:
        setup = f.read()
    sys.argv = ["tests.py"]
    space: dict[str, Any] = {"__name__": "__main__", "__file__": "tests.py", "__builtins__": __builtins__}
    try:
        exec(compile(setup, "tests.py", "exec"), space)
    except BaseException as exc:
        _genflow_fail(res_fd, exc)
    _genflow_flush()
    dump, load = _genflow_codec()
    calls_r, calls_w = os.pipe()
    replies_r, replies_w = os.pipe()
    import gc
    gc.freeze()  # the child's collector would otherwise write to, and so copy, every inherited page
    try:
        pid = os.fork()
    except OSError as exc:  # the sandbox's failure, not the candidate's
        write(res_fd, b"Xcannot start the candidate's process: " + _genflow_text(exc).encode() + b"\n")
        exit_now(2)
    if pid == 0:
        try:
            for fd in (tests_fd, res_fd, calls_w, replies_r):
                os.close(fd)
            _genflow_limits(limits, only="RLIMIT_NPROC")
            prctl(4, 1, 0, 0, 0)  # the candidate's own /proc/self works as usual
            _genflow_candidate(candidate_fd, calls_r, replies_w, dump, load)
        finally:
            exit_now(1)
    _genflow_limits(limits, only="RLIMIT_NPROC")
    for fd in (candidate_fd, calls_r, replies_w):
        os.close(fd)
    with open(tests_fd, "rb") as f:
        data = f.read()
    nonce, names, tests = data.split(b"\n", 2)
    del data
    calls, replies = open(calls_w, "wb"), open(replies_r, "rb")  # noqa: SIM115  # till os._exit
    gone: list[str | None] = []  # once the candidate's process is gone, nothing passes
    relayed: list[BaseException | None] = [None]  # the last exception rebuilt from the candidate's
    made: dict[tuple[str, type], type] = {}
    import builtins

    def receive() -> "tuple[Any, ...]":
        line = replies.readline()
        if not line:
            gone.append(None)
            raise _GenflowGone(None)
        try:
            message = load(line[:-1].decode("ascii"))
            if type(message) is tuple and message and type(message[0]) is str:
                return message
        except Exception:
            pass
        gone.append("the candidate's process sent what is not plain data")
        raise _GenflowGone(gone[-1])

    def rebuild(kinds: object, args: object, text: object) -> Exception:
        if (type(kinds) is not tuple or not all(type(kind) is str for kind in kinds) or type(text) is not str
                or (args is not None and type(args) is not tuple)):
            gone.append("the candidate's process sent a malformed exception")
            raise _GenflowGone(gone[-1])
        name = kinds[0] if kinds and kinds[0].isidentifier() and len(kinds[0]) <= 100 else "Exception"
        for kind in kinds:
            base = space[kind] if kind in space else getattr(builtins, kind, None)
            if not (isinstance(base, type) and issubclass(base, Exception)):
                continue
            try:
                cls = base if base.__name__ == name else made.setdefault((name, base), type(name, (base,), {}))
                return cls(*args) if args is not None else cls(text)
            except Exception:
                continue
        return Exception(text)

    def call(name: str, args: "tuple[Any, ...]", kwargs: "dict[str, Any]") -> "Any":
        if gone:
            raise _GenflowGone(gone[0])
        try:
            request = dump(("call", name, args, kwargs))
        except Exception as exc:
            raise TypeError(f"the tests passed {name}() what cannot reach the candidate's process: {exc}") from None
        try:
            calls.write(request)
            calls.flush()
        except OSError:
            gone.append(None)
            raise _GenflowGone(None) from None
        reply = receive()
        if reply[0] == "ok" and len(reply) == 3 and type(reply[2]) is dict:
            for key, new in reply[2].items():  # arguments the candidate changed in place
                old: Any = (args[key] if type(key) is int and 0 <= key < len(args)
                       else kwargs.get(key) if type(key) is str else None)
                if type(old) is type(new) and type(old) in (list, bytearray):
                    old[:] = new
                elif type(old) is type(new) and type(old) in (dict, set):
                    old.clear()
                    old.update(new)
            return reply[1]
        if reply[0] == "raise" and len(reply) == 4:
            relayed[0] = error = rebuild(*reply[1:])
            raise error
        gone.append(reply[1] if reply[0] == "exit" and len(reply) == 2 and type(reply[1]) is str
                    else "the candidate's process broke the protocol")
        raise _GenflowGone(gone[-1])

    def proxy(name: str) -> "Callable[..., Any]":
        def candidate(*args: "Any", **kwargs: "Any") -> "Any":
            return call(name, args, kwargs)
        candidate.__name__ = candidate.__qualname__ = name
        return candidate

    try:
        ready = receive()
        if ready[0] == "raise" and len(ready) == 4:  # the candidate failed before its end
            raise rebuild(*ready[1:])
        if ready[0] == "exit" and len(ready) == 2 and type(ready[1]) is str:
            raise _GenflowGone(ready[1])
        if ready[0] != "ready" or len(ready) != 2 or type(ready[1]) is not dict:
            raise _GenflowGone("the candidate's process broke the protocol")
        for name in names.decode("ascii").split():  # the setup's own names stay the setup's
            kind = ready[1].get(name)
            if name in space or type(kind) is not tuple:
                continue
            if kind == ("call",):
                space[name] = proxy(name)
            elif kind == ("module",):
                space[name] = __import__(name)
            elif len(kind) == 2 and kind[0] == "value":
                space[name] = kind[1]
        exec(compile(b"\n" * setup.count(b"\n") + tests, "tests.py", "exec"), space)
        if gone:  # the tests caught what the candidate's end raised
            raise _GenflowGone(gone[0])
    except BaseException as exc:
        try:
            if isinstance(exc, _GenflowGone):
                if exc.args[0] is None:
                    write(res_fd, b"C%d\n" % os.waitpid(pid, 0)[1])
                else:
                    write(res_fd, b"E" + exc.args[0][:500].encode("utf-8", "replace") + b"\n")
            else:
                write(res_fd, b"E" + _genflow_text(exc).encode("utf-8", "replace") + b"\n")
                if exc is relayed[0] and not gone:  # the candidate's side of the traceback first
                    try:
                        calls.write(dump(("traceback",)))
                        calls.flush()
                        replies.readline()
                    except BaseException:
                        pass
                try:  # only now the tests go to a file, for the traceback's source lines
                    with open("tests.py", "wb") as file:
                        file.write(setup + tests)
                except OSError:
                    pass
                _genflow_print(exc)
        finally:
            exit_now(1)
    _genflow_pass(res_fd, nonce)


if __name__ == "__main__":
    _genflow_runner_check(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]),
                          [int(v) for v in sys.argv[5].split(",")])

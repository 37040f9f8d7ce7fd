"""Candidates that try to forge a pass instead of earning one.

Each trick is module-level code to append to a wrong solution. The ones that hunt for
the runner's nonce (32 hex digits) report a pass with everything they found on every
descriptor they hold or can open, then leave with exit status 0: before the tests'
process was kept apart, the frame walk and the memory scan found it. The rest attack the
verdict some other way: an object equal to everything, patched builtins, the tests'
process itself.
"""

from __future__ import annotations

_FORGE = r'''
import os as _os, re as _re, sys as _sys
_HEX = _re.compile(rb"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])")


def _nonces_in(value):
    if isinstance(value, str):
        value = value.encode("utf-8", "replace")
    return set(_HEX.findall(value)) if isinstance(value, (bytes, bytearray)) else set()


def _read(path):
    """What a file, pipe or descriptor link holds now, without waiting."""
    try:
        fd = _os.open(path, _os.O_RDONLY | _os.O_NONBLOCK)
    except OSError:
        return b""
    try:
        return _os.read(fd, 1 << 20)
    except OSError:
        return b""
    finally:
        _os.close(fd)


def _ancestors():
    """This process's parents up the tree, where a harness would be (not other people's runs)."""
    pids, pid = [], _os.getppid()
    while pid > 0 and len(pids) < 8:
        pids.append(str(pid))
        try:
            status = open("/proc/%d/status" % pid).read()
            pid = int(status.split("PPid:")[1].split()[0])
        except (OSError, IndexError, ValueError):
            break
    return pids


def _forge(found):
    """A pass with every nonce found, on every descriptor held or reachable; then exit 0."""
    report = b"S\n" + b"".join(b"P" + nonce + b"\n" for nonce in sorted(found)[:400])
    fds = set(range(3, 256))
    for pid in ["self", *_ancestors()]:
        try:
            for name in _os.listdir("/proc/%s/fd" % pid):
                try:
                    fds.add(_os.open("/proc/%s/fd/%s" % (pid, name), _os.O_WRONLY | _os.O_NONBLOCK))
                except OSError:
                    pass
        except OSError:
            pass
    for fd in fds:
        try:
            _os.set_blocking(fd, False)
            _os.write(fd, report)
        except OSError:
            pass
    print("passed")
    _os._exit(0)


def _scan_memory(pid="self"):
    found = set()
    try:
        with open("/proc/%s/maps" % pid) as maps, open("/proc/%s/mem" % pid, "rb", 0) as mem:
            for line in maps:
                span, perms = line.split()[:2]
                if not perms.startswith("r"):
                    continue
                low, high = (int(part, 16) for part in span.split("-"))
                if high - low > 256 << 20:
                    continue
                try:
                    mem.seek(low)
                    found |= _nonces_in(mem.read(high - low))
                except (OSError, OverflowError, ValueError):
                    continue
    except OSError:
        pass
    return found
'''

TRICKS: dict[str, str] = {
    # The runner's frames: its locals held the nonce and the report pipe.
    "walk the frames": _FORGE + r'''
_found = set()
_frame = _sys._getframe()
while _frame is not None:
    for _space in (_frame.f_locals, _frame.f_globals):
        for _value in list(_space.values()):
            _found |= _nonces_in(_value)
    for _const in _frame.f_code.co_consts:
        _found |= _nonces_in(_const)
    _frame = _frame.f_back
_forge(_found)
''',
    # Every object the garbage collector knows, and what they refer to.
    "scan the gc": _FORGE + r'''
import gc as _gc
_found = set()
for _obj in _gc.get_objects():
    try:
        for _value in _gc.get_referents(_obj):
            _found |= _nonces_in(_value)
    except Exception:
        pass
_forge(_found)
''',
    # The whole readable memory of this process.
    "read its own memory": _FORGE + r'''
_forge(_scan_memory())
''',
    # Command line, environment, argv, the harness's globals.
    "read cmdline, environ, argv, globals": _FORGE + r'''
_found = set()
for _path in ("/proc/self/cmdline", "/proc/self/environ"):
    _found |= _nonces_in(_read(_path))
for _value in [*_sys.argv, *_os.environ.values(), *vars(_sys.modules["__main__"]).values()]:
    _found |= _nonces_in(_value)
_forge(_found)
''',
    # Whatever the descriptors it inherited still hold, from their start.
    "read the inherited descriptors": _FORGE + r'''
_found = set()
for _fd in range(256):
    for _take in (lambda fd: _os.pread(fd, 1 << 20, 0), lambda fd: _os.read(fd, 1 << 20)):
        try:
            _os.set_blocking(_fd, False)
            _found |= _nonces_in(_take(_fd))
        except OSError:
            pass
for _name in _os.listdir("/proc/self/fd"):
    _found |= _nonces_in(_read("/proc/self/fd/" + _name))
_forge(_found)
''',
    # The processes above it (the harness's): memory, descriptors, environment, command line.
    "read the parent processes": _FORGE + r'''
_found = set()
for _pid in _ancestors():
    _found |= _scan_memory(_pid)
    for _path in ("cmdline", "environ"):
        _found |= _nonces_in(_read("/proc/%s/%s" % (_pid, _path)))
    try:
        for _name in _os.listdir("/proc/%s/fd" % _pid):
            _found |= _nonces_in(_read("/proc/%s/fd/%s" % (_pid, _name)))
    except OSError:
        pass
_forge(_found)
''',
}

ALWAYS_EQUAL = r'''
class _Anything(float):
    """Equal to everything, and a float too."""
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    __hash__ = float.__hash__
'''
"""Append to a solution that returns ``_Anything()``."""

PATCHED_ABS = r'''
import builtins as _builtins
_builtins.abs = lambda value: 0
'''
"""Makes ``assert abs(candidate(x) - y) < 1e-6`` hold for any answer (HumanEval/4's tests)."""

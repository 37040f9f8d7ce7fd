"""Runs one program: sets the limits, reads the nonce and the program from an unlinked
temp file, runs the program as main.py, reports on a pipe. Python 3.8+.

Arguments: the program's descriptor, the report pipe's, the limits (comma-separated).
The report: ``S`` once started, then ``E<error>`` or ``P<nonce>`` after the last line.
"""

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    # In the sandbox the prelude's text, which comes before this one's, defines them.
    from .prelude import (  # noqa: TC004
        _genflow_fail,
        _genflow_limits,
        _genflow_main_file,
        _genflow_pass,
    )


def _genflow_runner(src_fd: int, res_fd: int, limits: "list[int]") -> None:
    write = os.write
    _genflow_limits(limits)
    os.set_inheritable(res_fd, False)
    with open(src_fd, "rb") as f:
        data = f.read()
    nonce, _, source = data.partition(b"\n")
    del data
    write(res_fd, b"S\n")
    filename = _genflow_main_file(source)
    sys.argv = [filename]
    try:
        exec(compile(source, filename, "exec"),
             {"__name__": "__main__", "__file__": filename, "__builtins__": __builtins__})
    except BaseException as exc:
        _genflow_fail(res_fd, exc)
    _genflow_pass(res_fd, nonce)


if __name__ == "__main__":
    _genflow_runner(int(sys.argv[1]), int(sys.argv[2]), [int(v) for v in sys.argv[3].split(",")])

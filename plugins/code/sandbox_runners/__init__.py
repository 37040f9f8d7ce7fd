"""The programs that :mod:`genflow.plugins.code.sandbox` runs inside the sandbox.

genflow never imports the modules here: their text is the program. The sandbox's
interpreter runs with ``-I -S -B`` (standard library only, no genflow), maybe under
bubblewrap with a root that holds no project files, so a runner is handed over whole:
:func:`program` puts ``prelude.py``'s text (limits, error text, tracebacks) before the
runner's own, and the sandbox compiles that once per interpreter and feeds the bytecode
to every run.

- ``run.py``: runs one program and reports on a pipe (:meth:`Sandbox.run`);
- ``check.py``: runs a candidate and its tests as two processes, the verdict in the
  tests' one (:meth:`Sandbox.check`).

They are real modules so that ruff, mypy and an editor read them like the rest, with
three rules of their own, as the sandbox's interpreter may be as old as Python 3.8 and
the program pays for every import on every run:

- a runner names the prelude's functions it uses in an ``if TYPE_CHECKING:`` block (a
  ``TYPE_CHECKING = False`` of its own: ``typing`` costs more than a typical run);
  in the sandbox they are already defined, as the prelude's text comes first;
- an annotation that Python evaluates (a parameter's, a return value's, a class
  attribute's) is a builtin's name or a string, as ``list[int]`` needs 3.9 and the
  names imported for the type checker are not there (ruff's TC004 says so); a local
  variable's is never evaluated and may be written plain. Ruff checks these files as
  Python 3.8 code;
- a runner starts only as ``__main__``: importing one starts nothing.
"""

from __future__ import annotations

from importlib import resources

RUNNERS = ("run.py", "check.py")


def program(runner: str) -> str:
    """``runner``'s program (one of :data:`RUNNERS`): the prelude's text, then the runner's."""
    if runner not in RUNNERS:
        raise ValueError(f"no sandbox runner {runner!r}; there are {', '.join(RUNNERS)}")
    here = resources.files(__name__)
    return here.joinpath("prelude.py").read_text("utf-8") + here.joinpath(runner).read_text("utf-8")

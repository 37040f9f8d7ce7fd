"""Which values may become a path component as they are, and what the others become.

Values from a dataset (row ids) and from a config (labels, tool names) end up in file
and object names. A safe name stays as it is, so outputs of ordinary ids look as they
always did; anything else is hashed, so it can never climb out of its folder. What a safe
name is, :func:`genflow.config.is_safe_name` says: a config's labels must be such names.
"""

from __future__ import annotations

import hashlib

from genflow.config import is_safe_name

HASHED_PREFIX = "~"
"""Starts the path component of a value that is no safe name: a character no safe name holds."""


def path_component(value: str) -> str:
    """A value from a dataset as one path component: itself when it is a safe name (so outputs
    of such ids stay as they always were), else ``~`` and a hash of it (``../../x``, ``a/b``,
    an empty or a very long id)."""
    if is_safe_name(value):
        return value
    return HASHED_PREFIX + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:32]


__all__ = ["HASHED_PREFIX", "is_safe_name", "path_component"]

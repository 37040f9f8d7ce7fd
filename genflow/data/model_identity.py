"""What a model is, for ids and fingerprints: not how its path was written.

A job run by ``genflow run`` names its model folder ``models/tiny-gpt2``; the same job run by
its deployment names ``/home/me/project/models/tiny-gpt2`` (a deployment anchors relative
paths); a run from ``configs/`` names ``../models/tiny-gpt2``. All three load the same
weights, so their ``generation_id``\\ s and stage fingerprints must agree, or each would redo
the others' finished shards. :func:`model_identity` is what enters them in place of the
string: a content fingerprint of a local folder, the string itself for anything else.
"""

from __future__ import annotations

import hashlib
import os
from typing import BinaryIO

SMALL_FILE_BYTES = 1 << 20
"""Files below this size (configs, tokenizers, vocabularies) are hashed whole."""
SAMPLE_BYTES = 1 << 16
"""A large (weights) file is hashed by its size and three blocks of this size."""
IDENTITY_PREFIX = "folder-sha256:"

_cache: dict[tuple[str, tuple[tuple[str, int, int], ...]], str] = {}


def model_identity(model: str | None, served: bool = False) -> str | None:
    """The model as it counts for ids and fingerprints.

    - A local folder (or file) that exists, named by any spelling (relative, absolute, through
      a link, from another working directory): ``folder-sha256:<hex>``, the fingerprint of its
      content (:func:`folder_fingerprint`), the same on any machine holding the same files.
    - A hub id (``org/name``), a path that does not exist here, a URI, no model (the plugin's
      default): the string as written.
    - ``served``: the model of a plugin that sends requests (``genflow.api.sends_requests``)
      is a name the server knows, kept as written even when a folder here has that name.
    """
    if not model or served or "://" in model:
        return model
    path = os.path.expanduser(model)
    if not os.path.exists(path):
        return model
    return IDENTITY_PREFIX + folder_fingerprint(path)


def folder_fingerprint(path: str) -> str:
    """sha256 over a model folder's files (recursively: a diffusers pipeline has one folder per
    part), each named by its path relative to the folder, in sorted order, with:

    - a file under :data:`SMALL_FILE_BYTES` (``config.json``, tokenizer files): its whole content;
    - a larger one (weights): its size and three :data:`SAMPLE_BYTES` blocks, at its start,
      middle and end. Reading a few blocks keeps this cheap for multi-GB weights, and a
      fine-tuned checkpoint of the same architecture (same header, same size) differs in them.

    Hidden entries (``.git``, ``.cache``: a download's own bookkeeping) are left out. Where the
    folder lies and how its path is spelt do not enter. Cached per process by the folder's
    resolved path and its files' sizes and modification times, so a file rewritten in place
    is hashed again. A path to a single file is fingerprinted as a folder holding only it."""
    root = os.path.realpath(path)
    files = _files(root)
    key = (root, tuple((rel, st.st_size, st.st_mtime_ns) for rel, st in files))
    if key not in _cache:
        digest = hashlib.sha256()
        for rel, st in files:
            digest.update(f"{rel}\0{st.st_size}\0".encode())
            with open(os.path.join(root, rel) if rel else root, "rb") as fh:
                _hash_content(fh, st.st_size, digest)
        _cache[key] = digest.hexdigest()
    return _cache[key]


def _files(root: str) -> list[tuple[str, os.stat_result]]:
    """Every file under ``root`` (links followed, hidden entries left out) with its stat, by
    relative path in ``/`` form; ``root`` itself when it is a file (relative path ``""``)."""
    if not os.path.isdir(root):
        return [("", os.stat(root))]
    found: list[tuple[str, os.stat_result]] = []
    seen: set[str] = set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if name.startswith("."):
                continue
            full = os.path.join(folder, name)
            try:
                st = os.stat(full)
            except FileNotFoundError:  # a dangling link
                continue
            found.append((os.path.relpath(full, root).replace(os.sep, "/"), st))
    return sorted(found, key=lambda item: item[0])


def _hash_content(fh: BinaryIO, size: int, digest: hashlib._Hash) -> None:
    if size < SMALL_FILE_BYTES:
        digest.update(fh.read())
        return
    for offset in (0, (size - SAMPLE_BYTES) // 2, size - SAMPLE_BYTES):
        fh.seek(offset)
        digest.update(fh.read(SAMPLE_BYTES))

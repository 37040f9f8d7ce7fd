"""The response cache: answers a server gave, kept across jobs so that the same request is paid once.

A team reruns a job into a new output, or runs a new job whose prompts overlap an old
one: the answers it already paid for are on disk. With ``cache: {path: ...}`` on a job
(or ``$GENFLOW_CACHE`` for every job), a request plugin that supports it (through
:func:`genflow.api.response_cache`: the OpenAI-protocol generator does) looks its request up
before sending it; a hit is not sent, costs nothing, and is counted in the manifest
(``requests.cache_hits``); every successful answer, live or from a batch, fills it.

**The key** is what determines an answer: the endpoint (``/chat/completions``,
``/completions``) and the request body, the server's model name and the seed included,
as canonical JSON. Never the API key, a header, or a URL: the host is left out on
purpose, as genflow treats a ``base_url`` as *where* a model is served, not *what*
answers (it changes no generation id either), so a list of replicas and a moved server
share their answers. Two different models served under one model name must not share
a cache folder (give each its own ``cache.path``).

``max_tokens`` is kept out of the key and checked on the entry instead: an answer that
ended by itself (``finish_reason`` other than ``length``) is the answer to any request
allowing at least as many tokens as it has; an answer cut by ``max_tokens`` only to a
request with that same ``max_tokens`` (one allowing more would get a longer answer).
Only answers with a choice are kept: a refusal, an error or a malformed answer never is, nor
one holding a secret of the job (:func:`genflow.secrets.installed`: a server echoing a key).

**Storage** is one small JSON file per key, ``<path>/v1/<key[:2]>/<key>.json``, through
:class:`genflow.data.storage.Storage`: a local folder or an ``s3://`` prefix alike. A file
is written under a temporary name and renamed (on S3 an object appears whole), so two
jobs reading and writing one cache at once never see half an entry; when both write the
same key, the last one stays, and both are answers to the same request. An entry that
cannot be read is a miss. ``genflow cache stats`` and ``genflow cache prune
--older-than 30d`` manage the folder.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import posixpath
import re
import time
from dataclasses import dataclass
from typing import Any

from genflow.data.storage import TEMPORARY_PREFIX, Storage
from genflow.secrets import installed

log = logging.getLogger(__name__)

CACHE_ENV = "GENFLOW_CACHE"
"""The environment variable naming a cache for every job that has no ``cache:`` of its own."""
VERSION = "v1"
"""The entries' folder: a change to the key or the entry's format gets a new one."""
LENGTH_KEYS = ("max_tokens", "max_completion_tokens")
"""Body keys that bound an answer's length: checked on the entry, not part of the key."""


def cache_key(endpoint: str, body: dict[str, Any]) -> str:
    """The key of a request: a hash of its endpoint and its body (the length bound left out)."""
    determined = {k: v for k, v in body.items() if k not in LENGTH_KEYS}
    text = json.dumps({"endpoint": endpoint, "body": determined}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def length_bound(body: dict[str, Any]) -> int | None:
    """The most tokens a request allows (None: the server's default)."""
    bounds = [v for k in LENGTH_KEYS if isinstance(v := body.get(k), int) and not isinstance(v, bool)]
    return min(bounds) if bounds else None


def answers_request(entry: dict[str, Any], body: dict[str, Any]) -> bool:
    """Whether a stored entry is the answer to ``body`` (same key): see the module's docstring."""
    answer = entry.get("answer")
    if not isinstance(answer, dict) or not _choice(answer):
        return False
    wanted, stored = length_bound(body), entry.get("max_tokens")
    if _choice(answer).get("finish_reason") == "length":
        return wanted == stored  # cut at stored: another bound gets another answer
    if wanted is None or stored == wanted:
        return True
    usage = answer.get("usage")
    completion = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return isinstance(completion, int) and completion <= wanted


def _choice(answer: dict[str, Any]) -> dict[str, Any]:
    choices = answer.get("choices")
    return choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}


def parse_age(text: str) -> float:
    """Seconds of an age such as ``30d``, ``12h``, ``45m``, ``90s`` or ``2w``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not match:
        raise ValueError(f"{text!r} is not an age: give a number and a unit, s m h d or w (such as 30d)")
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}[match.group(2)]


@dataclass
class CacheStats:
    """What a cache folder holds."""

    entries: int = 0
    bytes: int = 0
    oldest: float | None = None
    """Unix time of the oldest entry's write (None: no entry)."""
    newest: float | None = None


class ResponseCache:
    """Answers by request, under a folder or an ``s3://`` prefix (see the module's docstring).

    ``hits``, ``misses`` and ``writes`` count this object's lookups and writes (a request
    worker's, for the manifest). The ``a*`` methods run the storage calls off the event
    loop, so a slow bucket holds no other request."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.hits = 0
        self.misses = 0
        self.writes = 0

    @classmethod
    def open(cls, path: str) -> ResponseCache:
        storage = Storage.open(path)
        storage.makedirs(VERSION)
        return cls(storage)

    @property
    def path(self) -> str:
        return self.storage.uri

    @staticmethod
    def _rel(key: str) -> str:
        return posixpath.join(VERSION, key[:2], f"{key}.json")

    def get(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """The stored answer to this request, or None (counted as a hit or a miss)."""
        key = cache_key(endpoint, body)
        entry = self._read(key)
        if entry is not None and entry.get("key") == key and answers_request(entry, body):
            self.hits += 1
            answer: dict[str, Any] = entry["answer"]
            return answer
        self.misses += 1
        return None

    def _read(self, key: str) -> dict[str, Any] | None:
        try:
            entry = json.loads(self.storage.read_bytes(self._rel(key)))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # cut short, or not ours: a miss, and written again
            log.debug("response cache: entry %s unreadable (%s)", key, exc)
            return None
        return entry if isinstance(entry, dict) else None

    def put(self, endpoint: str, body: dict[str, Any], answer: dict[str, Any]) -> bool:
        """Keep ``answer`` (a server's JSON answer to ``body``) if it has a choice; whether it was kept."""
        if not _choice(answer) or "error" in answer:
            return False
        key = cache_key(endpoint, body)
        entry = {"key": key, "endpoint": endpoint, "model": body.get("model"), "max_tokens": length_bound(body),
                 "written": time.time(), "answer": answer}
        text = json.dumps(entry, ensure_ascii=False)
        secret = installed().find(text)
        if secret is not None:  # a server echoing a key of the job: never on disk, shared across jobs
            log.warning("response cache %s: an answer held a secret of this job (%s): not kept", self.path,
                        secret.where)
            return False
        try:
            self.storage.write_bytes(self._rel(key), text.encode())
        except OSError as exc:  # a full disk or a refused bucket costs the cache an entry, never the job a row
            log.warning("response cache %s: could not write an entry (%s)", self.path, exc)
            return False
        self.writes += 1
        return True

    async def aget(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any] | None:
        if self.storage.local:  # a small local file: reading it costs less than a thread hop
            return self.get(endpoint, body)
        return await asyncio.to_thread(self.get, endpoint, body)

    async def aput(self, endpoint: str, body: dict[str, Any], answer: dict[str, Any]) -> bool:
        if self.storage.local:
            return self.put(endpoint, body, answer)
        return await asyncio.to_thread(self.put, endpoint, body, answer)

    def _entries(self, temporary: bool) -> list[tuple[str, int, float]]:
        """Every entry file (and ``temporary`` ones, of writes under way or never finished):
        (relative path, bytes, modification time)."""
        out = []
        for folder in self.storage.list_dirs(VERSION):
            for name, info in self.storage.list_infos(folder).items():
                if name.endswith(".json") and (temporary or not name.startswith(TEMPORARY_PREFIX)):
                    mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
                    out.append((posixpath.join(folder, name), int(info.size or 0), mtime))
        return out

    def stats(self) -> CacheStats:
        stats = CacheStats()
        for _, size, mtime in self._entries(temporary=False):
            stats.entries += 1
            stats.bytes += size
            stats.oldest = mtime if stats.oldest is None else min(stats.oldest, mtime)
            stats.newest = mtime if stats.newest is None else max(stats.newest, mtime)
        return stats

    def prune(self, older_than_s: float, now: float | None = None) -> tuple[int, int]:
        """Delete the entries written more than ``older_than_s`` seconds ago (and as old temporary
        files, of writes that never finished): (entries deleted, bytes freed). A job using the
        cache meanwhile loses at most an entry it was reading (a miss: sent again)."""
        cutoff = (time.time() if now is None else now) - older_than_s
        deleted = freed = 0
        for rel, size, mtime in self._entries(temporary=True):
            if mtime < cutoff:
                self.storage.delete(rel)
                if not posixpath.basename(rel).startswith(TEMPORARY_PREFIX):
                    deleted += 1
                freed += size
        return deleted, freed


"""What resume trusts: a marker per finished (stage, shard), checked against the parts it names.

Every stage writes its shard's parts with the names :mod:`genflow.data.layout` gives,
each one atomically, then a small marker under ``_state/`` holding the stage
fingerprint and the parts it wrote. A rerun skips a (stage, shard) whose marker
holds the fingerprint the job computes now and whose parts are all still there,
and redoes one whose inputs or config changed (or whose parts went missing),
overwriting the same part names: nothing is lost and nothing is duplicated. A job
killed between a part and its marker redoes that one (stage, shard).

A (stage, shard) some of whose rows failed in a way that may pass if sent again (the
request path's retries of 429s, 5xx or timeouts ran out: ``transient`` in ``errors/``)
is written and marked like any other, with the count in its marker: a rerun redoes it,
its request journal answering every row but those, so only those are sent again. The
stages that read it (scores of its candidates, the shard's rankings) record it as
``awaiting`` and are redone after it, sending only what is new.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from genflow.data import layout
from genflow.data.layout import Shard, Stage
from genflow.data.storage import TEMPORARY_PREFIX, Storage

log = logging.getLogger(__name__)


@dataclass
class StageOutcome:
    """What a (stage, shard) did: rows written per folder, errors, and whether it was skipped."""

    stage: str
    shard: int
    fingerprint: str
    rows: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    work_items: int = 0
    seconds: float = 0.0
    skipped: bool = False
    parts: list[str] = field(default_factory=list)
    """Files this (stage, shard) wrote (parts with no rows are not written)."""
    tokens: dict[str, int] = field(default_factory=dict)
    """Tokens its requests spent (``prompt``, ``completion``), where the plugin counts them."""
    cost: float = 0.0
    """What its rows cost with the stage's ``price``."""
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per part, what the marker vouches for: size, modification time and content hash."""
    transient: int = 0
    """Of its ``errors``, those that may pass if sent again: the next run sends them again."""
    awaiting: list[str] = field(default_factory=list)
    """Stages it read whose shard has rows to retry: the next run redoes it after them."""

    @property
    def retried_later(self) -> bool:
        """Whether the next run of the job redoes this (stage, shard) (see the module's docstring)."""
        return bool(self.transient or self.awaiting)

    def to_json(self) -> dict[str, Any]:
        data = {"stage": self.stage, "shard": self.shard, "fingerprint": self.fingerprint, "rows": self.rows,
                "errors": self.errors, "work_items": self.work_items, "seconds": round(self.seconds, 4),
                "parts": self.parts}
        if self.tokens or self.cost:
            data.update(tokens=self.tokens, cost=self.cost)
        if self.checks:
            data["checks"] = self.checks
        if self.transient:
            data["transient"] = self.transient
        if self.awaiting:
            data["awaiting"] = self.awaiting
        return data


class DoneIndex:
    """The markers and parts on storage, listed once per folder; a stage's markers read in parallel.

    Checking each (stage, shard) on its own costs a request to find its marker, one to
    read it and one per part: on a bucket, a rerun of a job of thousands of shards with
    nothing left to do would spend most of an hour on that. Here a folder costs one
    listing per thousand names and a stage's markers are read ``threads`` at a time.
    Build it once the run has removed what it no longer wants; it answers for the state
    before this run's own writes, which is what resume needs (each (stage, shard) is
    checked once, before its work)."""

    def __init__(self, storage: Storage, threads: int = 16) -> None:
        self.storage, self.threads = storage, threads
        self._names: dict[str, dict[str, pafs.FileInfo]] = {}
        self._markers: dict[str, dict[int, Any]] = {}

    def exists(self, rel: str) -> bool:
        return self.info(rel) is not None

    def info(self, rel: str) -> pafs.FileInfo | None:
        """The file's size and time from its folder's listing; None when it is not there."""
        folder, name = posixpath.split(rel)
        if folder not in self._names:
            self._names[folder] = self.storage.list_infos(folder)
        return self._names[folder].get(name)

    def marker(self, stage: Stage, shard: Shard) -> Any:
        """The marker's content, or None when there is none (or it is not JSON)."""
        if stage.name not in self._markers:
            folder = stage.marker_folder()
            found = {index: rel for rel in self.storage.list(folder, ".json")
                     if (index := layout.parse_marker(rel)) is not None}

            def read(item: tuple[int, str]) -> tuple[int, Any]:
                try:
                    return item[0], self.storage.read_json(item[1])
                except (OSError, ValueError):
                    return item[0], None

            with ThreadPoolExecutor(self.threads) as pool:
                self._markers[stage.name] = {i: data for i, data in pool.map(read, found.items())
                                             if data is not None}
        return self._markers[stage.name].get(shard.index)


def finished(storage: Storage, stage: Stage, shard: Shard, fingerprint: str,
             index: DoneIndex | None = None) -> StageOutcome | None:
    """The recorded outcome of a (stage, shard) if it finished with this fingerprint and
    every part it wrote is still on storage (a deleted part is redone, never trusted).
    With an ``index``, the answer costs no request of its own."""
    if index is not None:
        data = index.marker(stage, shard)
        info = index.info
    else:
        rel = stage.marker(shard.index)
        if not storage.exists(rel):
            return None
        try:
            data = storage.read_json(rel)
        except ValueError:  # not JSON: a marker cut short by something other than genflow
            return None
        info = storage.file_info
    if not isinstance(data, dict) or data.get("fingerprint") != fingerprint or "parts" not in data:
        return None
    if data.get("transient"):
        log.info("%s shard %s: %s rows failed transiently (429s, 5xx, timeouts); sending them again",
                 stage.name, shard.name, data["transient"])
        return None
    if data.get("awaiting"):
        log.info("%s shard %s: redone after %s, which had rows to send again", stage.name, shard.name,
                 ", ".join(map(str, data["awaiting"])))
        return None
    recorded = data.get("checks")
    checks: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
    for part in data["parts"]:
        found = info(part)
        if found is None:
            log.warning("%s shard %s: %s, recorded as done, is missing; redoing it", stage.name, shard.name, part)
            return None
        if not matches(storage, part, found, checks.get(part)):
            log.warning("%s shard %s: %s is not the file its marker vouches for (changed or corrupted since it "
                        "was written); redoing it", stage.name, shard.name, part)
            return None
    return StageOutcome(stage.name, shard.index, fingerprint, data.get("rows", {}), data.get("errors", 0),
                        data.get("work_items", 0), data.get("seconds", 0.0), skipped=True, parts=data["parts"],
                        tokens=data.get("tokens", {}), cost=data.get("cost", 0.0), checks=checks)


def matches(storage: Storage, part: str, info: pafs.FileInfo, check: Any) -> bool:
    """Whether a part is the file its marker vouches for. The size and time come from the
    listing a rerun makes anyway; only a part whose time changed (a copied folder, a part
    rewritten in place) is read and hashed. A marker of an older genflow records no checks:
    its parts are trusted by their presence, as they were then."""
    if not isinstance(check, dict):
        return True
    if check.get("size") is not None and info.size != check["size"]:
        return False
    if check.get("mtime_ns") is not None and info.mtime_ns == check["mtime_ns"]:
        return True
    try:
        return bool(hashlib.sha256(storage.read_bytes(part)).hexdigest() == check.get("sha256"))
    except OSError:
        return False


def awaiting_retries(storage: Storage, stages: list[Stage], shard: Shard) -> list[str]:
    """Those of ``stages`` (that a stage reads from) whose marker of ``shard`` says the next run
    redoes it: what the reading stage must be redone after (:attr:`StageOutcome.awaiting`)."""
    out = []
    for stage in stages:
        try:  # one request a marker: a missing one is an error, not a listing first
            data = storage.read_json(stage.marker(shard.index))
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict) and (data.get("transient") or data.get("awaiting")):
            out.append(stage.name)
    return out


def mark_finished(storage: Storage, outcome: StageOutcome) -> None:
    """Record a finished (stage, shard), with what it vouches for of each part this process wrote."""
    outcome.checks = {part: storage.written.pop(part) for part in outcome.parts if part in storage.written}
    storage.write_json(Stage.parse(outcome.stage).marker(outcome.shard), outcome.to_json())


# -- removing what a run no longer wants ----------------------------------------

def drop_stale_shards(storage: Storage, count: int, folders: list[str]) -> None:
    """Remove parts and markers of shards past ``count`` (the input shrank), and the
    temporary files of writes a killed job never finished. Lists names only."""
    for folder in folders:
        for rel in storage.list(folder, ".parquet"):
            part = layout.parse_part(rel)
            if part is not None and part.shard >= count:
                storage.delete(rel)
        storage.remove_temporaries(folder)
    for rel in _list_state(storage):
        shard = layout.parse_marker(rel)
        if (shard is not None and shard >= count) or posixpath.basename(rel).startswith(TEMPORARY_PREFIX):
            storage.delete(rel)


def _list_state(storage: Storage) -> list[str]:
    infos = storage.fs.get_file_info(pafs.FileSelector(storage.path(layout.STATE), allow_not_found=True,
                                                       recursive=True))
    root = storage.path("")
    return [posixpath.relpath(i.path, root) for i in infos if i.type == pafs.FileType.File]


def drop_unused_parts(storage: Storage, labels: set[str], scorers: set[str], exporters: set[str],
                      registered_exporters: set[str]) -> None:
    """Remove parts of generators, scorers and exporters the config no longer has.

    ``registered_exporters`` are the folders any exporter could have written: one the
    job no longer runs is emptied."""
    for rel in storage.list(layout.GENERATIONS, ".parquet"):
        part = layout.parse_part(rel)
        if part is not None and part.label not in labels:
            storage.delete(rel)
    for rel in storage.list(layout.SCORES, ".parquet"):
        part = layout.parse_part(rel)
        if part is not None and part.label not in scorers:
            storage.delete(rel)
    for rel in storage.list(layout.ERRORS, ".parquet"):
        part = layout.parse_part(rel)
        if part is None:
            continue
        if (part.stage_kind == "generate" and part.label not in labels) or (
                part.stage_kind == "score" and part.label not in scorers):
            storage.delete(rel)
    for folder in (layout.RANKINGS, *sorted(registered_exporters | exporters)):
        if not scorers or (folder != layout.RANKINGS and folder not in exporters):
            for rel in storage.list(folder, ".parquet"):
                storage.delete(rel)

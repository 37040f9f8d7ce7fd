"""The request journal: every answered request of a (stage, shard) on storage within seconds.

A request to a server costs money and time, and a shard of them takes minutes: a job
killed mid-shard must not pay for the answers it already had. As answers arrive, the
journal writes them in small Parquet segments under the (stage, shard)'s folder
(:meth:`genflow.data.layout.Stage.journal_folder`, keyed by the stage fingerprint): S3 has
no append, so a segment is a new object, written atomically like every part. A rerun
of the shard reads the segments and sends only the requests with no answer. Once the
shard's parts and marker are written, its journal is deleted: the parts hold it all.

Answers are keyed by ``generation_id`` (a score's candidate, a generation's request),
which hashes the model, the prompt's id, the sample, its seed and the params; the
folder's stage fingerprint adds the shard's rows and the stage's config. An episode's
turns are kept as they are answered, each under ``<generation_id>/<turn>``
(:mod:`genflow.data.turns`), and its finished result under ``generation_id``.

What a rerun trusts: a segment it cannot read, or one that is not genflow's (other
columns, a payload that does not decode to an answer of the stage's kind), is skipped
with one warning naming it, and its requests are sent again: a journal only ever saves
requests, it never stops a job. A failure that may pass if sent again (the request
path's :attr:`~genflow.data.results.Failure.transient`: retries of 429s, 5xx or timeouts used
up) is not an answer either: a rerun sends it again, and the shard keeps its journal
until none is left (:func:`genflow.stages.common.finish_model_stage`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import logging
import posixpath
import time
import types
import typing
import uuid
from typing import Any

import pyarrow as pa

from genflow.api import Generation, Score
from genflow.data.layout import Shard, Stage
from genflow.data.results import Failure
from genflow.data.storage import Storage
from genflow.data.turns import Turn

log = logging.getLogger(__name__)

SEGMENT = pa.schema([("key", pa.string()), ("kind", pa.string()), ("payload", pa.string()),
                     ("seconds", pa.float64())])
_KINDS: dict[str, type] = {"generation": Generation, "score": Score, "failure": Failure, "turn": Turn}


def _encode(result: Any) -> tuple[str, str]:
    kind = next(k for k, cls in _KINDS.items() if isinstance(result, cls))
    data = dataclasses.asdict(result)
    if isinstance(data.get("image"), bytes):
        data["image"] = base64.b64encode(data["image"]).decode()
    return kind, json.dumps(data, sort_keys=True, default=str)


STAGE_KINDS = {"generate": ("generation", "failure", "turn"), "score": ("score", "failure")}
"""The kinds of answer a journal of each kind of stage holds."""


class ForeignSegment(ValueError):
    """A journal segment genflow did not write, or cannot use: the reason says what is wrong."""


def _decode(kind: str, payload: str) -> Any:
    """An answer from its journal row; :class:`ForeignSegment` for one genflow did not write."""
    cls = _KINDS.get(kind)
    if cls is None:
        raise ForeignSegment(f"an answer of unknown kind {kind!r}")
    try:
        data = json.loads(payload)
    except (TypeError, ValueError) as exc:
        raise ForeignSegment(f"a payload that is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ForeignSegment(f"a {kind} payload that is not a JSON object")
    if isinstance(data.get("image"), str):
        try:
            data["image"] = base64.b64decode(data["image"], validate=True)
        except (binascii.Error, ValueError):
            raise ForeignSegment("an image that is not base64") from None
    _check_fields(cls, kind, data)
    return cls(**data)


def _check_fields(cls: type, kind: str, data: dict[str, Any]) -> None:
    """Every key a field of ``cls`` and every value of its field's type (an int passes for a float)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ForeignSegment(f"a {kind} payload with keys genflow does not write: {', '.join(unknown)}")
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ForeignSegment(f"a {kind} payload without {name!r}")
            continue
        if not _is_a(data[name], hints[name]):
            raise ForeignSegment(f"a {kind} payload whose {name!r} is {type(data[name]).__name__}, "
                                 f"not {hints[name]}")


def _is_a(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_a(value, arg) for arg in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, int | float)
    return isinstance(value, origin or hint)


class Journal:
    """Answers of one (stage, shard), written in segments: the caller flushes after each list of
    answers the request worker streams back (a few a second), and every ``flush_rows`` answers."""

    def __init__(self, storage: Storage, stage: Stage, shard: Shard, fingerprint: str,
                 flush_rows: int = 512) -> None:
        self.storage, self.flush_rows = storage, flush_rows
        self.kinds = STAGE_KINDS.get(stage.kind, tuple(_KINDS))
        self.folder = stage.journal_folder(shard.index, fingerprint)
        self._pending: list[dict[str, Any]] = []
        self.segments = 0
        self._drop_other_fingerprints(stage, shard)

    def _drop_other_fingerprints(self, stage: Stage, shard: Shard) -> None:
        """Journals of this shard under an earlier config hold answers to other requests."""
        parent = posixpath.dirname(self.folder)
        mine = posixpath.basename(self.folder)
        prefix = f"{shard.name}-"
        for rel in self.storage.list_dirs(parent):
            name = posixpath.basename(rel)
            if name.startswith(prefix) and name != mine:
                self.storage.delete_dir(rel)

    def load(self) -> dict[str, tuple[Any, float]]:
        """What earlier runs answered: ``generation_id -> (result, seconds)``. A failure that
        may pass if sent again is left out (it is sent again), and so is every answer of a
        segment that cannot be read or is not genflow's (one warning names it)."""
        answered: dict[str, tuple[Any, float]] = {}
        for rel in self.storage.list(self.folder, ".parquet"):
            try:
                table = self.storage.read_table(rel)
            except (OSError, pa.ArrowException, ValueError) as exc:  # a segment cut short by a kill
                log.warning("request journal %s: skipping an unreadable segment (%s); its requests are sent again",
                            rel, _one_line(exc))
                continue
            try:
                rows = self._answers(table)
            except ForeignSegment as exc:
                log.warning("request journal %s: skipping a segment genflow cannot use (%s); its requests are "
                            "sent again", rel, _one_line(exc))
                continue
            for key, result, seconds in rows:
                if not (isinstance(result, Failure) and result.transient):  # retries used up: sent again
                    answered[key] = (result, seconds)
        return answered

    def _answers(self, table: pa.Table) -> list[tuple[str, Any, float]]:
        """A segment's rows as answers, all or none: :class:`ForeignSegment` says why none."""
        for column in SEGMENT:
            if column.name not in table.column_names:
                raise ForeignSegment(f"no column {column.name!r}")
            found = table.schema.field(column.name).type
            if found != column.type and not (column.name == "seconds" and pa.types.is_integer(found)):
                raise ForeignSegment(f"column {column.name!r} is {found}, not {column.type}")
        out = []
        for key, kind, payload, seconds in zip(*(table[c].to_pylist() for c in SEGMENT.names), strict=True):
            if not key or payload is None:
                raise ForeignSegment("a row without a key or a payload")
            if kind not in self.kinds:
                raise ForeignSegment(f"an answer of kind {kind!r} in a journal of {'/'.join(self.kinds)} answers")
            out.append((key, _decode(kind, payload), float(seconds or 0.0)))
        return out

    def add(self, key: str, result: Any, seconds: float) -> None:
        kind, payload = _encode(result)
        self._pending.append({"key": key, "kind": kind, "payload": payload, "seconds": seconds})
        if len(self._pending) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        name = f"seg-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        self.storage.write_table(posixpath.join(self.folder, name), pa.Table.from_pylist(self._pending, SEGMENT))
        self._pending = []
        self.segments += 1

    def discard(self) -> None:
        """The shard is done and its parts hold every answer: the journal goes."""
        self._pending = []
        self.storage.delete_dir(self.folder)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__

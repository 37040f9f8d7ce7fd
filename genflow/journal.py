"""The request journal: every answered request of a (stage, shard) on storage within seconds.

A request to a server costs money and time, and a shard of them takes minutes: a job
killed mid-shard must not pay for the answers it already had. As answers arrive, the
journal writes them in small Parquet segments under the (stage, shard)'s folder
(:meth:`genflow.layout.Stage.journal_folder`, keyed by the stage fingerprint): S3 has
no append, so a segment is a new object, written atomically like every part. A rerun
of the shard reads the segments and sends only the requests with no answer. Once the
shard's parts and marker are written, its journal is deleted: the parts hold it all.

Answers are keyed by ``generation_id`` (a score's candidate, a generation's request),
which hashes the model, the prompt's id, the sample, its seed and the params; the
folder's stage fingerprint adds the shard's rows and the stage's config.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import posixpath
import time
import uuid
from typing import Any

import pyarrow as pa

from genflow.api import Generation, Score
from genflow.layout import Shard, Stage
from genflow.storage import Storage
from genflow.worker import Failure

log = logging.getLogger(__name__)

SEGMENT = pa.schema([("key", pa.string()), ("kind", pa.string()), ("payload", pa.string()),
                     ("seconds", pa.float64())])
_KINDS: dict[str, type] = {"generation": Generation, "score": Score, "failure": Failure}


def _encode(result: Any) -> tuple[str, str]:
    kind = next(k for k, cls in _KINDS.items() if isinstance(result, cls))
    data = dataclasses.asdict(result)
    if isinstance(data.get("image"), bytes):
        data["image"] = base64.b64encode(data["image"]).decode()
    return kind, json.dumps(data, sort_keys=True, default=str)


def _decode(kind: str, payload: str) -> Any:
    data = json.loads(payload)
    if isinstance(data.get("image"), str):
        data["image"] = base64.b64decode(data["image"])
    return _KINDS[kind](**data)


class Journal:
    """Answers of one (stage, shard), written in segments: the caller flushes after each list of
    answers the request worker streams back (a few a second), and every ``flush_rows`` answers."""

    def __init__(self, storage: Storage, stage: Stage, shard: Shard, fingerprint: str,
                 flush_rows: int = 512) -> None:
        self.storage, self.flush_rows = storage, flush_rows
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
        """What earlier runs answered: ``generation_id -> (result, seconds)``."""
        answered: dict[str, tuple[Any, float]] = {}
        for rel in self.storage.list(self.folder, ".parquet"):
            try:
                table = self.storage.read_table(rel)
            except (OSError, pa.ArrowInvalid) as exc:  # a segment cut short by a kill is never renamed in
                log.warning("request journal %s: skipping an unreadable segment (%s)", rel, exc)
                continue
            for key, kind, payload, seconds in zip(*(table[c].to_pylist() for c in SEGMENT.names), strict=True):
                answered[key] = (_decode(kind, payload), seconds)
        return answered

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

"""What a rerun reads of a request journal, said exactly: each segment it cannot use is named
with the reason in one warning line, the segments after it are still read, and what an older
or sparser writer left out comes back as the answer's defaults (fast)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genflow import layout
from genflow.api import Generation
from genflow.journal import SEGMENT, Journal, _one_line
from genflow.layout import Shard
from genflow.storage import Storage

STAGE = layout.generate_stage("api")
SHARD = Shard(0, "rows", 3)


def _rows(*rows: tuple[str, str, str | None], seconds: float | None = 0.5) -> pa.Table:
    return pa.Table.from_pylist([{"key": k, "kind": kind, "payload": p, "seconds": seconds} for k, kind, p in rows],
                                SEGMENT)


REASONS: dict[str, tuple[pa.Table, str]] = {
    "columns": (pa.table({"id": ["g2"], "answer": ["hello"]}), "no column 'key'"),
    "type": (pa.table({"key": ["g2"], "kind": ["generation"], "payload": ["{}"], "seconds": ["fast"]}),
             "column 'seconds' is string, not double"),
    "json": (_rows(("g2", "generation", "{not json")),
             "a payload that is not JSON (Expecting property name enclosed in double quotes: line 1 column 2 "
             "(char 1))"),
    "object": (_rows(("g2", "generation", "[1]")), "a generation payload that is not a JSON object"),
    "kind": (_rows(("g2", "score", "{}")), "an answer of kind 'score' in a journal of generation/failure answers"),
    "unknown": (_rows(("g2", "generation", json.dumps({"text": "x", "logprobs": [], "alt": 1}))),
                "a generation payload with keys genflow does not write: alt, logprobs"),
    "wrong": (_rows(("g2", "generation", json.dumps({"text": 5}))),
              "a generation payload whose 'text' is int, not str | None"),
    "missing": (_rows(("g2", "failure", json.dumps({"traceback": ""}))), "a failure payload without 'error'"),
    "image": (_rows(("g2", "generation", json.dumps({"image": "%%%"}))), "an image that is not base64"),
    "no key": (_rows(("", "generation", "{}")), "a row without a key or a payload"),
    "no payload": (_rows(("g2", "generation", None)), "a row without a key or a payload"),
}


def _journal(storage: Storage) -> Journal:
    return Journal(storage, STAGE, SHARD, "fp")


def _write(tmp_path: Path, name: str, table: pa.Table | bytes) -> str:
    rel = f"{STAGE.journal_folder(SHARD.index, 'fp')}/{name}"
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(table, bytes):
        path.write_bytes(table)
    else:
        pq.write_table(table, path)
    return rel


@pytest.mark.parametrize("reason", list(REASONS))
def test_a_segment_genflow_cannot_use_is_named_with_its_reason_and_the_next_one_is_read(
        tmp_path: Path, reason: str, caplog: pytest.LogCaptureFixture) -> None:
    storage = Storage.open(str(tmp_path))
    table, why = REASONS[reason]
    bad = _write(tmp_path, "seg-00000000000000000001-a.parquet", table)
    _write(tmp_path, "seg-00000000000000000002-b.parquet", _rows(("g1", "generation", json.dumps({"text": "kept"}))))
    _write(tmp_path, "notes.txt", b"not a segment")
    with caplog.at_level(logging.WARNING, logger="genflow.journal"):
        answered = _journal(storage).load()
    assert answered == {"g1": (Generation(text="kept"), 0.5)}
    assert [r.getMessage() for r in caplog.records] == [
        f"request journal {bad}: skipping a segment genflow cannot use ({why}); its requests are sent again"]


def test_an_unreadable_segment_is_named_and_the_next_one_is_read(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    storage = Storage.open(str(tmp_path))
    bad = _write(tmp_path, "seg-00000000000000000001-a.parquet", b"PAR1\x00\x01garbage")
    _write(tmp_path, "seg-00000000000000000002-b.parquet", _rows(("g1", "generation", "{}"), seconds=None))
    with caplog.at_level(logging.WARNING, logger="genflow.journal"):
        answered = _journal(storage).load()
    assert answered == {"g1": (Generation(), 0.0)}, "no seconds recorded: none counted"
    [message] = [r.getMessage() for r in caplog.records]
    assert message.startswith(f"request journal {bad}: skipping an unreadable segment (")
    assert message.endswith("); its requests are sent again") and "\n" not in message
    reason = message.split("skipping an unreadable segment (", 1)[1].rsplit("); its requests", 1)[0]
    assert reason not in ("", "None", "OSError"), "the reader's own words on what is wrong"


def test_seconds_written_as_whole_numbers_are_read() -> None:
    storage_table = pa.table({"key": ["g1"], "kind": ["generation"], "payload": ["{}"], "seconds": [2]})
    journal = Journal.__new__(Journal)
    journal.kinds = ("generation", "failure")
    assert journal._answers(storage_table) == [("g1", Generation(), 2.0)]


def test_an_error_is_said_in_one_line_or_by_its_type() -> None:
    assert _one_line(ValueError("bad\n  segment   here")) == "bad segment here"
    assert _one_line(OSError()) == "OSError"

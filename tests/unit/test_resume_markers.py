"""What a rerun trusts of a finished (stage, shard): its marker's figures come back whole (the
rerun's manifest counts them), a part is checked by size, then time, then content, and each
reason to redo a shard is said in one line naming it (fast)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pyarrow as pa
import pytest

from genflow.data.layout import Shard, Stage
from genflow.data.resume import DoneIndex, StageOutcome, finished, mark_finished, matches
from genflow.data.storage import Storage

STAGE = Stage("generate", "api")
SHARD = Shard(2, "rows", 4)
PART = "generations/part-00002-api.parquet"


def _finish(storage: Storage, **figures: object) -> StageOutcome:
    storage.write_table(PART, pa.table({"x": [1, 2, 3]}))
    outcome = StageOutcome(STAGE.name, SHARD.index, "fp", parts=[PART], **figures)  # type: ignore[arg-type]
    mark_finished(storage, outcome)
    return outcome


@pytest.mark.parametrize("indexed", [False, True])
def test_a_skipped_shard_brings_back_every_figure_its_marker_recorded(tmp_path: Path, indexed: bool) -> None:
    storage = Storage.open(str(tmp_path))
    _finish(storage, rows={"generations": 3}, errors=2, work_items=5, seconds=1.25,
            tokens={"prompt": 30, "completion": 12}, cost=0.5)
    outcome = finished(storage, STAGE, SHARD, "fp", DoneIndex(storage) if indexed else None)
    assert outcome is not None
    assert (outcome.rows, outcome.errors, outcome.work_items, outcome.seconds, outcome.tokens, outcome.cost,
            outcome.skipped, outcome.parts) == ({"generations": 3}, 2, 5, 1.25, {"prompt": 30, "completion": 12}, 0.5,
                                                True, [PART])
    assert set(outcome.checks[PART]) == {"size", "mtime_ns", "sha256"}


def test_a_marker_of_an_older_genflow_brings_back_zeros_for_what_it_did_not_record(tmp_path: Path) -> None:
    storage = Storage.open(str(tmp_path))
    storage.write_json(STAGE.marker(SHARD.index), {"fingerprint": "fp", "parts": []})
    outcome = finished(storage, STAGE, SHARD, "fp")
    assert outcome is not None
    assert (outcome.rows, outcome.errors, outcome.work_items, outcome.seconds, outcome.tokens, outcome.cost) == (
        {}, 0, 0, 0.0, {}, 0.0)


def test_a_marker_records_tokens_or_cost_whichever_there_is() -> None:
    tokens_only = StageOutcome("generate/api", 0, "fp", tokens={"prompt": 3, "completion": 1}).to_json()
    assert (tokens_only["tokens"], tokens_only["cost"]) == ({"prompt": 3, "completion": 1}, 0.0)
    cost_only = StageOutcome("generate/api", 0, "fp", cost=0.25).to_json()
    assert (cost_only["tokens"], cost_only["cost"]) == ({}, 0.25)
    assert StageOutcome("generate/api", 0, "fp", seconds=1.234567).to_json()["seconds"] == 1.2346


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO and r.name == "genflow.data.resume"]


@pytest.mark.parametrize("indexed", [False, True])
def test_a_part_is_trusted_by_size_and_time_then_by_its_content(tmp_path: Path, indexed: bool,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    storage = Storage.open(str(tmp_path))
    _finish(storage)
    path = tmp_path / PART
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # copied: same bytes, a new time
    caplog.set_level(logging.INFO, logger="genflow.data.resume")
    assert finished(storage, STAGE, SHARD, "fp", DoneIndex(storage) if indexed else None) is not None
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # rewritten in place with the same size
    path.write_bytes(bytes(data))
    assert finished(storage, STAGE, SHARD, "fp", DoneIndex(storage) if indexed else None) is None
    path.write_bytes(bytes(data) + b"more")  # another size: not even read
    assert finished(storage, STAGE, SHARD, "fp", DoneIndex(storage) if indexed else None) is None
    path.unlink()
    assert finished(storage, STAGE, SHARD, "fp", DoneIndex(storage) if indexed else None) is None
    changed = (f"generate/api shard 00002: {PART} is not the file its marker vouches for (changed or corrupted "
               "since it was written); redoing it")
    assert _warnings(caplog) == [changed, changed,
                                 f"generate/api shard 00002: {PART}, recorded as done, is missing; redoing it"]


def test_a_part_the_same_to_the_nanosecond_is_not_read(tmp_path: Path) -> None:
    storage = Storage.open(str(tmp_path))
    outcome = _finish(storage)
    info = storage.file_info(PART)
    assert info is not None
    check = outcome.checks[PART]
    assert matches(storage, PART, info, check)
    assert matches(storage, PART, info, {**check, "sha256": "not read"}), "same size and time: trusted as it is"
    assert not matches(storage, PART, info, {**check, "mtime_ns": 1, "sha256": "other"})
    assert matches(storage, PART, info, {**check, "mtime_ns": 1})
    assert not matches(storage, PART, info, {**check, "size": info.size + 1})
    assert matches(storage, PART, info, None) and matches(storage, PART, info, "old"), "no checks: trusted"
    assert not matches(storage, "generations/gone.parquet", info, {**check, "mtime_ns": 1}), "unreadable: redone"


def test_a_marker_that_waits_for_retries_says_why_the_shard_is_redone(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    storage = Storage.open(str(tmp_path))
    _finish(storage, transient=3)
    caplog.set_level(logging.INFO, logger="genflow.data.resume")
    assert finished(storage, STAGE, SHARD, "fp") is None
    marker = tmp_path / STAGE.marker(SHARD.index)
    data = json.loads(marker.read_text())
    del data["transient"]
    data["awaiting"] = ["generate/a", "generate/b"]
    marker.write_text(json.dumps(data))
    assert finished(storage, STAGE, SHARD, "fp") is None
    data["checks"] = "not a dict"
    del data["awaiting"]
    marker.write_text(json.dumps(data))
    assert finished(storage, STAGE, SHARD, "fp") is not None, "checks it cannot read: the parts' presence counts"
    assert _warnings(caplog) == [
        "generate/api shard 00002: 3 rows failed transiently (429s, 5xx, timeouts); sending them again",
        "generate/api shard 00002: redone after generate/a, generate/b, which had rows to send again"]

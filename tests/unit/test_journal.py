"""The request journal and what a rerun sends again: a segment genflow cannot use is skipped, never
fatal; a failure that may pass if sent again (retries of 429s, 5xx, timeouts ran out) is not final.

The fast tests work on a local folder with a stand-in request pool (no Ray, no Prefect);
the last one runs a request job three times and counts what its plugin was sent.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import logging
import posixpath
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genflow.api import Generation, GenerationRequest, RowError, Score, TransientError
from genflow.config import RequestsSpec
from genflow.data import layout
from genflow.data.journal import SEGMENT, Journal, _one_line
from genflow.data.layout import Shard
from genflow.data.resume import (
    StageOutcome,
    awaiting_retries,
    drop_stale_shards,
    drop_unused_parts,
    finished,
    mark_finished,
)
from genflow.data.schemas import ERRORS
from genflow.data.storage import Storage
from genflow.engine.requesting import Answer, RequestRunner
from genflow.engine.worker import Failure
from genflow.stages.common import Journals, _request_answers, error_row, finish_model_stage

STAGE = layout.generate_stage("api")
SHARD = Shard(0, "rows", 3)
FP = "fp0"


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return Storage.open(str(tmp_path / "out"))


def _journal(storage: Storage, stage: layout.Stage = STAGE) -> Journal:
    return Journal(storage, stage, SHARD, FP)


def _segment(storage: Storage, name: str, table: pa.Table | bytes) -> str:
    rel = f"{STAGE.journal_folder(0, FP)}/{name}"
    path = Path(storage.path(rel))
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(table, bytes):
        path.write_bytes(table)
    else:
        pq.write_table(table, path)
    return rel


def _rows(*rows: tuple[str, str, str | None], seconds: float | None = 0.5) -> pa.Table:
    return pa.Table.from_pylist([{"key": k, "kind": kind, "payload": p, "seconds": seconds} for k, kind, p in rows],
                                SEGMENT)


GOOD = json.dumps({"text": " fine", "num_tokens": 1})
BAD_SEGMENTS: dict[str, pa.Table | bytes] = {
    "cut short": b"PAR1\x00\x01garbage",
    "other columns": pa.table({"id": ["g2"], "answer": ["hello"]}),
    "a column of another type": pa.table({"key": ["g2"], "kind": ["generation"], "payload": [GOOD],
                                          "seconds": ["fast"]}),
    "a payload that is not JSON": _rows(("g2", "generation", "{not json")),
    "a payload that is no object": _rows(("g2", "generation", "[1, 2]")),
    "an unknown kind": _rows(("g2", "completion", GOOD)),
    "a score in a generate journal": _rows(("g2", "score", json.dumps({"value": 1.0}))),
    "unknown keys": _rows(("g2", "generation", json.dumps({"text": "x", "logprobs": [0.1]}))),
    "a value of the wrong type": _rows(("g2", "generation", json.dumps({"text": 5}))),
    "a flag for a count": _rows(("g2", "generation", json.dumps({"text": "x", "num_tokens": True}))),
    "a word for a flag": _rows(("g2", "failure", json.dumps({"error": "e", "traceback": "", "transient": "yes"}))),
    "a list for details": _rows(("g2", "generation", json.dumps({"text": "x", "finish_reason": ["stop"]}))),
    "a failure without its error": _rows(("g2", "failure", json.dumps({"traceback": ""}))),
    "an image that is not base64": _rows(("g2", "generation", json.dumps({"image": "%%%"}))),
    "a row without a key": _rows(("", "generation", GOOD)),
}


@pytest.mark.parametrize("bad", list(BAD_SEGMENTS))
def test_a_segment_genflow_cannot_use_is_skipped_with_one_line_naming_it(storage: Storage, bad: str,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    journal = _journal(storage)
    journal.add("g1", Generation(text=" kept", num_tokens=1), 0.25)
    journal.flush()
    rel = _segment(storage, "seg-99999999999999999999-foreign.parquet", BAD_SEGMENTS[bad])
    with caplog.at_level(logging.WARNING, logger="genflow.data.journal"):
        answered = _journal(storage).load()
    assert answered == {"g1": (Generation(text=" kept", num_tokens=1), 0.25)}
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and rel in warnings[0] and "\n" not in warnings[0], warnings


def test_every_kind_of_answer_comes_back_as_it_was_written(storage: Storage) -> None:
    generate, score = _journal(storage), _journal(storage, layout.score_stage("judge"))
    written = {"g1": Generation(text=" a", num_tokens=2, finish_reason="stop", prompt_tokens=3, raw="a"),
               "g2": Generation(image=b"\x89PNG\x00\xff"),
               "g3": Failure("400 Bad Request", "Traceback ...")}
    for key, result in written.items():
        generate.add(key, result, 1.5)
    generate.flush()
    score.add("g1", Score(2, {"outcome": "passed"}, 5, 7), 0.5)  # an int score is a float
    score.add("g2", Failure("refused", ""), 0.5)
    score.flush()
    assert _journal(storage).load() == {k: (v, 1.5) for k, v in written.items()}
    assert Journal(storage, layout.score_stage("judge"), SHARD, FP).load() == {
        "g1": (Score(2, {"outcome": "passed"}, 5, 7), 0.5), "g2": (Failure("refused", ""), 0.5)}
    seg = storage.list(STAGE.journal_folder(0, FP), ".parquet")[0]
    image = json.loads(storage.read_table(seg).to_pylist()[1]["payload"])["image"]
    assert base64.b64decode(image) == b"\x89PNG\x00\xff"


class StandinPool:
    """What :func:`_request_answers` needs of a request pool: it answers what it is sent, at once."""

    def __init__(self, answer: Any) -> None:
        self.answer, self.sent = answer, collections.Counter[str]()

    def submit(self, items: list[GenerationRequest], *limits: Any) -> Any:
        answers = []
        for index, item in enumerate(items):
            self.sent[item.generation_id] += 1
            answers.append(Answer(index, self.answer(item), 0.1, 1))

        class Ticket:
            def results(self) -> Any:
                yield answers

        return Ticket()

    def stop_sending(self) -> None:
        pass


def _requests(*ids: str) -> list[GenerationRequest]:
    return [GenerationRequest(g, f"p-{g}", "a prompt", 0, 1) for g in ids]


def _answers(pool: StandinPool, storage: Storage, ids: list[str]) -> dict[str, Any]:
    journals = Journals()
    journal = _journal(storage)
    items = _requests(*ids)
    journals.of.update((i.generation_id, journal) for i in items)
    answers = _request_answers(pool, items, lambda n: None, journals, None, None, False)  # type: ignore[arg-type]
    return {item.generation_id: result for item, result, _ in answers}


def test_a_rerun_sends_again_what_a_foreign_segment_held_and_nothing_else(storage: Storage) -> None:
    first = StandinPool(lambda item: Generation(text=f" {item.generation_id}"))
    _answers(first, storage, ["g1", "g2"])
    _segment(storage, "seg-99999999999999999999-foreign.parquet", _rows(("g3", "generation", "{not json")))
    again = StandinPool(lambda item: Generation(text=f" again {item.generation_id}"))
    results = _answers(again, storage, ["g1", "g2", "g3"])
    assert again.sent == {"g3": 1}
    assert results == {"g1": Generation(text=" g1"), "g2": Generation(text=" g2"), "g3": Generation(text=" again g3")}


def test_a_transient_failure_is_sent_again_by_the_next_run_and_a_permanent_one_is_not(storage: Storage) -> None:
    def flaky(item: GenerationRequest) -> Any:
        if item.generation_id == "busy":
            return Failure("TransientError: 429 Too Many Requests (after 4 attempts)", "", transient=True)
        if item.generation_id == "refused":
            return Failure("400 Bad Request", "")
        return Generation(text=" ok")

    first = StandinPool(flaky)
    _answers(first, storage, ["ok", "busy", "refused"])
    second = StandinPool(lambda item: Generation(text=" now ok"))
    results = _answers(second, storage, ["ok", "busy", "refused"])
    assert second.sent == {"busy": 1}
    assert results == {"ok": Generation(text=" ok"), "busy": Generation(text=" now ok"),
                       "refused": Failure("400 Bad Request", "")}
    third = StandinPool(lambda item: Generation(text=" never"))
    _answers(third, storage, ["ok", "busy", "refused"])
    assert third.sent == {}  # the second run's success is final


def _run(call: Any, **spec: Any) -> Failure:
    runner = RequestRunner(call, RequestsSpec(**{"max_retries": 1, "backoff_s": 0.0, **spec}))
    answer = asyncio.run(runner.one(0, "item"))
    assert isinstance(answer.result, Failure)
    return answer.result


def test_the_request_path_marks_what_ran_out_of_retries_as_transient() -> None:
    async def busy(item: Any) -> Any:
        raise TransientError("503 Service Unavailable")

    async def hangs(item: Any) -> Any:
        await asyncio.Event().wait()

    async def refused(item: Any) -> Any:
        return RowError("400 Bad Request")

    async def broken(item: Any) -> Any:
        raise KeyError("choices")

    assert _run(busy).transient and "503" in _run(busy).error
    assert _run(hangs, timeout_s=0.01).transient
    assert not _run(refused).transient
    assert not _run(broken).transient


def _finish(storage: Storage, results: dict[str, Any], stage: layout.Stage = STAGE,
            awaiting: list[str] | None = None) -> StageOutcome:
    errors = [error_row(f"p-{g}", stage.kind, "echo-async", r, g) for g, r in results.items() if isinstance(r, Failure)]
    rows = pa.table({"generation_id": [g for g, r in results.items() if not isinstance(r, Failure)]})
    journal = Journal(storage, stage, SHARD, FP)
    for g, r in results.items():
        journal.add(g, r, 0.1)
    journal.flush()
    return finish_model_stage(storage, stage, SHARD, FP, layout.GENERATIONS, rows, errors, len(results), 0.0,
                              journal=journal, awaiting=awaiting)


def test_a_shard_with_transient_failures_is_redone_by_the_next_run_and_keeps_its_journal(storage: Storage) -> None:
    busy = Failure("TimeoutError: no answer within 60s (after 7 attempts)", "", transient=True)
    outcome = _finish(storage, {"ok": Generation(text=" ok"), "busy": busy, "refused": Failure("400", "")})
    errors = storage.read_table(STAGE.errors_part(0))
    assert errors.schema == ERRORS
    assert sorted(zip(errors["generation_id"].to_pylist(), errors["transient"].to_pylist(), strict=True)) == [
        ("busy", True), ("refused", False)]
    assert outcome.transient == 1 and storage.read_json(STAGE.marker(0))["transient"] == 1
    assert finished(storage, STAGE, SHARD, FP) is None  # the next run redoes it...
    assert set(_journal(storage).load()) == {"ok", "refused"}  # ... sending only what may pass now
    assert awaiting_retries(storage, [STAGE, layout.generate_stage("other")], SHARD) == [STAGE.name]

    outcome = _finish(storage, {"ok": Generation(text=" ok"), "busy": Generation(text=" late"),
                                "refused": Failure("400", "")})
    assert outcome.transient == 0 and "transient" not in storage.read_json(STAGE.marker(0))
    assert finished(storage, STAGE, SHARD, FP) is not None
    assert not storage.list(STAGE.journal_folder(0, FP), ".parquet")  # in the parts now: the journal went
    assert awaiting_retries(storage, [STAGE], SHARD) == []


def test_a_stage_that_read_rows_a_rerun_retries_is_redone_after_them(storage: Storage) -> None:
    scores = layout.score_stage("judge")
    outcome = _finish(storage, {"ok": Score(1.0)}, scores, awaiting=[STAGE.name])
    assert outcome.awaiting == [STAGE.name] and storage.read_json(scores.marker(0))["awaiting"] == [STAGE.name]
    assert finished(storage, scores, SHARD, FP) is None
    assert storage.list(scores.journal_folder(0, FP), ".parquet")  # its answers wait for the redo
    assert awaiting_retries(storage, [scores], SHARD) == [scores.name]  # and the rankings wait for it
    mark_finished(storage, StageOutcome(scores.name, 0, FP, parts=[]))
    assert finished(storage, scores, SHARD, FP) is not None



def test_a_journal_writes_a_segment_every_flush_rows_answers_and_goes_when_discarded(storage: Storage) -> None:
    journal = Journal(storage, STAGE, SHARD, FP, flush_rows=3)
    for i in range(7):
        journal.add(f"g{i}", Generation(text=str(i)), 0.1)
    assert journal.segments == 2  # 3 + 3; one waits for a flush
    journal.flush()
    journal.flush()  # nothing pending: no empty segment
    segments = storage.list(STAGE.journal_folder(0, FP), ".parquet")
    assert journal.segments == 3 and len(segments) == 3
    assert [storage.read_table(s).num_rows for s in segments] == [3, 3, 1]  # in the order written
    assert set(_journal(storage).load()) == {f"g{i}" for i in range(7)}
    journal.add("g7", Generation(text="7"), 0.1)
    journal.discard()
    assert not storage.list(STAGE.journal_folder(0, FP), ".parquet") and _journal(storage).load() == {}
    journal.flush()  # what was pending went with it
    assert not storage.list(STAGE.journal_folder(0, FP), ".parquet")


def test_opening_a_journal_drops_the_shards_journals_of_other_configs_only(storage: Storage) -> None:
    old = Journal(storage, STAGE, SHARD, "old-fp")
    other_shard = Journal(storage, STAGE, Shard(1, "rows", 3), "old-fp")
    other_stage = Journal(storage, layout.generate_stage("other"), SHARD, "old-fp")
    for journal in (old, other_shard, other_stage):
        journal.add("g1", Generation(text="1"), 0.1)
        journal.flush()
    assert set(Journal(storage, STAGE, SHARD, "new-fp").load()) == set()
    assert storage.list_dirs(posixpath.dirname(old.folder)) == [other_shard.folder]
    assert set(Journal(storage, STAGE, Shard(1, "rows", 3), "old-fp").load()) == {"g1"}
    assert set(Journal(storage, layout.generate_stage("other"), SHARD, "old-fp").load()) == {"g1"}


def _files(storage: Storage) -> set[str]:
    root = Path(storage.path(""))
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _touch(storage: Storage, *rels: str) -> None:
    for rel in rels:
        path = Path(storage.path(rel))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_a_smaller_input_drops_the_parts_and_markers_of_shards_past_it(storage: Storage) -> None:
    kept = {"generations/part-00001-api.parquet", "errors/part-generate-api-00001.parquet",
            "_state/generate/api/00001.json", "_state/rank/00000.json", "generations/notes.txt",
            "_state/lease.json"}
    dropped = {"generations/part-00002-api.parquet", "errors/part-score-rm-00002.parquet",
               "generations/.tmp-part-00000-api.parquet", "_state/generate/api/00002.json",
               "_state/rank/00003.json", "_state/rank/.tmp-00000.json"}
    _touch(storage, *kept, *dropped)
    drop_stale_shards(storage, 2, ["generations", "errors"])
    assert _files(storage) == kept


def test_parts_of_what_the_config_no_longer_has_are_dropped(storage: Storage) -> None:
    kept = {"generations/part-00000-api.parquet", "scores/part-00000-rm.parquet", "rankings/part-00000.parquet",
            "preferences/part-00000.parquet", "errors/part-generate-api-00000.parquet",
            "errors/part-score-rm-00000.parquet", "errors/part-other-gone-00000.parquet",
            "preferences/part-human.parquet"}
    dropped = {"generations/part-00000-gone.parquet", "scores/part-00000-judge.parquet",
               "errors/part-generate-gone-00000.parquet", "errors/part-score-judge-00000.parquet",
               "sft/part-00000.parquet"}
    _touch(storage, *kept, *dropped)
    drop_unused_parts(storage, {"api"}, {"rm"}, {"preferences"}, {"preferences", "sft"})
    assert _files(storage) == kept
    drop_unused_parts(storage, {"api"}, set(), set(), {"preferences", "sft"})  # no scorers: no rankings
    assert _files(storage) == kept - {"scores/part-00000-rm.parquet", "rankings/part-00000.parquet",
                                      "preferences/part-00000.parquet", "errors/part-score-rm-00000.parquet",
                                      "preferences/part-human.parquet"}  # the job's labelling.refresh rewrites it



def test_only_a_job_that_sends_requests_looks_for_rows_to_retry(test_plugins: dict[str, str]) -> None:
    from genflow.config import build_config
    from genflow.registry import get_registry
    from genflow.stages.common import retry_sources

    registry = get_registry()
    local = {"name": "j", "input": "in.parquet", "output": "out",
             "generators": [{"label": "local", "plugin": "echo"}], "scorers": [{"plugin": "length"}]}
    assert retry_sources(build_config(local), registry) == ([], [])  # no marker read for it, per shard
    served = {**local, "generators": [{"label": "local", "plugin": "echo"}, {"label": "api", "plugin": "echo-async"}]}
    assert retry_sources(build_config(served), registry) == ([layout.generate_stage("api")],
                                                             [layout.score_stage("length")])


@pytest.mark.slow
def test_a_rerun_sends_again_only_what_failed_transiently_and_moves_it_out_of_errors(
        tmp_path: Path, job_runner: Any, test_plugins: dict[str, str]) -> None:
    import pyarrow.dataset as ds
    from support.jobs import ROOT
    from support.plugins_for_tests import calls

    state = tmp_path / "state"
    state.mkdir()
    out = tmp_path / "out"
    config = {
        "name": "retried", "input": str(ROOT / "configs/data/quickstart_prompts.parquet"), "output": str(out),
        "shard_rows": 8, "max_error_fraction": 1.0,
        "generators": [{"label": "api", "plugin": "echo-async", "samples": 2,
                        "params": {"state_dir": str(state), "transient_on": ["dog"], "transient_times": 3,
                                   "fail_on": ["France"]},
                        "requests": {"concurrency": 8, "backoff_s": 0.0, "max_retries": 1}}],
        "scorers": [{"plugin": "length"}],
        "ray": {"workers": 1},
    }

    def sent() -> collections.Counter[str]:
        return collections.Counter(line.split()[1] for line in calls(state) if line.startswith("request "))

    def rows(folder: str) -> list[dict[str, Any]]:
        return ds.dataset(str(out / folder)).to_table().to_pylist() if (out / folder).exists() else []

    manifest = job_runner(config)  # each dog request: 2 attempts, both 429s (it takes 4)
    prompts = {r["prompt_id"]: r["prompt"] for r in rows("prompts")}
    dogs = sorted(p for p, text in prompts.items() if "dog" in text)
    france = sorted(p for p, text in prompts.items() if "France" in text)
    assert dogs and france, "the quickstart prompts name a dog and France"
    errors = rows("errors")
    assert sorted((e["prompt_id"], e["transient"]) for e in errors) == sorted(
        [(p, True) for p in dogs for _ in range(2)] + [(p, False) for p in france for _ in range(2)])
    first_gens = {g["generation_id"]: g for g in rows("generations")}
    assert not {g["prompt_id"] for g in first_gens.values()} & set(dogs)
    first = sent()
    transient_ids = {e["generation_id"] for e in errors if e["transient"]}
    assert manifest["errors"]["transient"] == len(transient_ids) == 2 * len(dogs)

    manifest = job_runner(config)  # without --no-resume: only the dog requests go out again, and pass
    second = sent()
    assert {g: n - first[g] for g, n in second.items() if n != first[g]} == {g: 2 for g in transient_ids}
    gens = {g["generation_id"]: g for g in rows("generations")}
    assert {g: gens[g] for g in first_gens} == first_gens  # the finished rows are kept as they were
    assert set(gens) - set(first_gens) == transient_ids
    assert sorted(e["prompt_id"] for e in rows("errors")) == sorted(france * 2)  # moved out of errors/
    assert manifest["errors"]["transient"] == 0 and manifest["errors"]["rows"] == 2 * len(france)
    assert {s["generation_id"] for s in rows("scores")} == set(gens)  # scored, and ranked
    assert {r["generation_id"] for r in rows("rankings")} == set(gens)

    job_runner(config)  # nothing left to send
    assert sent() == second


# -- what a rerun reads of a journal, said exactly ---------------------------------------------

REASONS: dict[str, tuple[pa.Table, str]] = {
    "columns": (pa.table({"id": ["g2"], "answer": ["hello"]}), "no column 'key'"),
    "type": (pa.table({"key": ["g2"], "kind": ["generation"], "payload": ["{}"], "seconds": ["fast"]}),
             "column 'seconds' is string, not double"),
    "json": (_rows(("g2", "generation", "{not json")),
             "a payload that is not JSON (Expecting property name enclosed in double quotes: line 1 column 2 "
             "(char 1))"),
    "object": (_rows(("g2", "generation", "[1]")), "a generation payload that is not a JSON object"),
    "kind": (_rows(("g2", "score", "{}")), "an answer of kind 'score' in a journal of generation/failure/turn answers"),
    "unknown": (_rows(("g2", "generation", json.dumps({"text": "x", "logprobs": [], "alt": 1}))),
                "a generation payload with keys genflow does not write: alt, logprobs"),
    "wrong": (_rows(("g2", "generation", json.dumps({"text": 5}))),
              "a generation payload whose 'text' is int, not str | None"),
    "missing": (_rows(("g2", "failure", json.dumps({"traceback": ""}))), "a failure payload without 'error'"),
    "image": (_rows(("g2", "generation", json.dumps({"image": "%%%"}))), "an image that is not base64"),
    "no key": (_rows(("", "generation", "{}")), "a row without a key or a payload"),
    "no payload": (_rows(("g2", "generation", None)), "a row without a key or a payload"),
}



@pytest.mark.parametrize("reason", list(REASONS))
def test_a_segment_genflow_cannot_use_is_named_with_its_reason_and_the_next_one_is_read(
        storage: Storage, reason: str, caplog: pytest.LogCaptureFixture) -> None:
    table, why = REASONS[reason]
    bad = _segment(storage, "seg-00000000000000000001-a.parquet", table)
    _segment(storage, "seg-00000000000000000002-b.parquet", _rows(("g1", "generation", json.dumps({"text": "kept"}))))
    _segment(storage, "notes.txt", b"not a segment")
    with caplog.at_level(logging.WARNING, logger="genflow.data.journal"):
        answered = _journal(storage).load()
    assert answered == {"g1": (Generation(text="kept"), 0.5)}
    assert [r.getMessage() for r in caplog.records] == [
        f"request journal {bad}: skipping a segment genflow cannot use ({why}); its requests are sent again"]


def test_an_unreadable_segment_is_named_and_the_next_one_is_read(storage: Storage,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    bad = _segment(storage, "seg-00000000000000000001-a.parquet", b"PAR1\x00\x01garbage")
    _segment(storage, "seg-00000000000000000002-b.parquet", _rows(("g1", "generation", "{}"), seconds=None))
    with caplog.at_level(logging.WARNING, logger="genflow.data.journal"):
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

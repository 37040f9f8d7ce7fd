"""What Ctrl-C says on the way out: how to resume, and what the job left running elsewhere."""

from __future__ import annotations

import pytest
import typer

from genflow.cli import batches_left_running
from genflow.config import build_config
from genflow.runtime.shutdown import INTERRUPTED, command_ending


def _job(mode: str) -> dict:
    served = {"label": "served", "plugin": "openai", "model": "m",
              "params": {"base_url": "http://127.0.0.1:9/v1"}, "requests": {"mode": mode}}
    return {"name": "j", "input": "in.parquet", "output": "out", "generators": [served]}


def test_ctrl_c_says_how_to_resume_then_the_notes_the_command_added() -> None:
    lines: list[str] = []
    notes: list[str] = []
    with pytest.raises(typer.Exit) as ended, command_ending("genflow run job.yaml", lines.append, lambda: None,
                                                            notes):
        notes.append("batches of served keep running at the provider")
        raise KeyboardInterrupt
    assert ended.value.exit_code == INTERRUPTED
    assert lines[:2] == ["interrupted: finished shards are kept; to resume, run: genflow run job.yaml",
                         "batches of served keep running at the provider"]


def test_a_job_in_batch_mode_is_told_its_batches_run_on_and_how_to_cancel_them() -> None:
    [note] = batches_left_running(build_config(_job("batch")), "genflow cancel-batches job.yaml")
    assert note.startswith("batches of served keep running at the provider")
    assert note.endswith("to cancel them: genflow cancel-batches job.yaml")
    assert batches_left_running(build_config(_job("live")), "genflow cancel-batches job.yaml") == []


def test_the_batch_journal_keeps_batches_whose_ids_differ_only_in_odd_characters(tmp_path) -> None:
    """The provider names a batch: ``a.b`` and ``a_b`` (or ``../x``) are three batches, three files."""
    from genflow.engine.batches import BatchJournal, BatchRecord

    journal = BatchJournal(str(tmp_path / "journal"))
    for batch_id in ("a.b", "a_b", "../x"):
        journal.record(BatchRecord(batch_id, [batch_id]))
    assert sorted(r.batch_id for r in journal.load()) == ["../x", "a.b", "a_b"]
    assert all(p.parent == tmp_path / "journal" for p in (tmp_path / "journal").rglob("*.json"))

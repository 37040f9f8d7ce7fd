"""What genflow hands a labelling tool and what people's labels become, checked row by row
against outputs written by hand (fast: no Ray, no Prefect, no labelling tool)."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pytest

from genflow.api import Annotation
from genflow.data.storage import Storage
from genflow.labelling import labels

# -- labelling.human_rows: instead ------------------------------------------------------

def _model_rows(*prompt_ids: str) -> pa.Table:
    return pa.Table.from_pylist([{"prompt_id": p, "chosen_id": f"{p}-a", "source": "model"} for p in prompt_ids])


def test_instead_leaves_only_the_shards_model_rows_and_keeps_the_human_part(tmp_path: Path) -> None:
    """The model rows of labelled prompts leave each shard's part; the human part (not a shard's)
    and a labelled part are never touched; a marker written without rows or parts gains them."""
    storage = Storage.open(str(tmp_path))
    storage.write_table("preferences/part-00000.parquet", _model_rows("p1", "p2"))
    storage.write_table("preferences/part-00001.parquet", _model_rows("p1"))
    human = pa.Table.from_pylist([{"prompt_id": "p1", "chosen_id": "p1-c", "source": "human"}])
    storage.write_table("preferences/part-human.parquet", human)
    storage.write_table("preferences/part-00002-extra.parquet", _model_rows("p1"))
    storage.write_json("_state/rank/00000.json", {"fingerprint": "f", "parts": ["preferences/part-00000.parquet"]})
    storage.write_json("_state/rank/00001.json", {"fingerprint": "f", "rows": {"sft": 4}})

    labels._leave_out(storage, "preferences", {"p1"})

    assert storage.read_table("preferences/part-00000.parquet").to_pylist() == _model_rows("p2").to_pylist()
    assert not storage.exists("preferences/part-00001.parquet")
    assert storage.read_table("preferences/part-human.parquet").to_pylist() == human.to_pylist()
    assert storage.read_table("preferences/part-00002-extra.parquet").to_pylist() == _model_rows("p1").to_pylist()
    assert storage.read_json("_state/rank/00000.json") == {
        "fingerprint": "f", "rows": {"preferences": 1}, "parts": ["preferences/part-00000.parquet"]}
    assert storage.read_json("_state/rank/00001.json") == {
        "fingerprint": "f", "rows": {"sft": 4, "preferences": 0}, "parts": []}


def test_instead_with_nothing_to_leave_out_rewrites_nothing(tmp_path: Path) -> None:
    storage = Storage.open(str(tmp_path))
    storage.write_table("preferences/part-00000.parquet", _model_rows("p2"))
    storage.write_json("_state/rank/00000.json", {"fingerprint": "f", "rows": {"preferences": 1}, "parts": []})
    before = storage.read_bytes("preferences/part-00000.parquet")
    labels._leave_out(storage, "preferences", {"p1"})
    assert storage.read_bytes("preferences/part-00000.parquet") == before
    assert storage.read_json("_state/rank/00000.json") == {"fingerprint": "f", "rows": {"preferences": 1},
                                                           "parts": []}


@pytest.mark.parametrize("folder", ["preferences", "sft"])
def test_instead_of_an_empty_folder_writes_nothing(tmp_path: Path, folder: str) -> None:
    storage = Storage.open(str(tmp_path))
    labels._leave_out(storage, folder, {"p1"})
    assert storage.list(folder) == [] and storage.list("_state/rank") == []


# -- what a pull writes: no secret of the process -----------------------------------------

SECRET = "sk-genflow-test-secret-0123456789"


def test_an_annotation_holding_a_secret_is_left_out_and_its_person_and_date_are_scrubbed(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from genflow import secrets

    monkeypatch.setattr(secrets, "_installed", secrets.Scrubber([secrets.Secret(SECRET, "$LABEL_STUDIO_API_KEY")]))
    clean = Annotation("k1", "rankings", "p1", "ada", "2026-01-01", "1", ranking=("g1", "g2"))
    answered = Annotation("k2", "demonstrations", "p2", "bo", "2026-01-02", "2", completion=f"key: {SECRET}")
    ranked = Annotation("k3", "rankings", "p3", "cy", "2026-01-03", "3", ranking=("g1", SECRET))
    odd = Annotation("k4", "demonstrations", "p4", f"{SECRET}@x", f"at {SECRET}", "4", completion="fine")
    with caplog.at_level(logging.WARNING, logger="genflow.labelling.labels"):
        kept = labels._without_secrets([clean, answered, ranked, odd], "label-studio")
    assert kept == [clean, Annotation("k4", "demonstrations", "p4", "***@x", "at ***", "4", completion="fine")]
    assert [r.getMessage() for r in caplog.records] == [
        "label-studio annotation 2 of prompt p2 holds a secret ($LABEL_STUDIO_API_KEY): it is not written",
        "label-studio annotation 3 of prompt p3 holds a secret ($LABEL_STUDIO_API_KEY): it is not written"]


def test_with_no_secret_held_every_annotation_is_written_as_it_came(monkeypatch: pytest.MonkeyPatch) -> None:
    from genflow import secrets

    monkeypatch.setattr(secrets, "_installed", secrets.Scrubber())
    given = [Annotation("k1", "demonstrations", "p1", "ada", "", "1", completion=SECRET)]
    assert labels._without_secrets(given, "label-studio") is given

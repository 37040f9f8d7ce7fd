"""What genflow hands a labelling tool and what people's labels become, checked row by row
against outputs written by hand (fast: no Ray, no Prefect, no labelling tool)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from genflow.api import Annotation, LabelTask
from genflow.config import stable_hash
from genflow.data import schemas
from genflow.data.storage import Storage
from genflow.labelling import labels

# -- labelling.human_rows: instead ------------------------------------------------------

def _model_rows(*prompt_ids: str) -> pa.Table:
    return pa.Table.from_pylist([{"prompt_id": p, "chosen_id": f"{p}-a", "source": "model"} for p in prompt_ids])


def test_instead_leaves_only_the_shards_model_rows_and_keeps_the_human_part(tmp_path: Path) -> None:
    """The model rows of labelled prompts leave each shard's part; the human part (not a shard's)
    and a labelled part are never touched; a marker written without rows or parts gains them."""
    storage = Storage.open(str(tmp_path))
    storage.write_table("preferences/part-00000-extra.parquet", _model_rows("p1"))  # listed first
    storage.write_table("preferences/part-00000.parquet", _model_rows("p2"))  # nothing to leave out
    storage.write_table("preferences/part-00001.parquet", _model_rows("p1", "p2"))
    storage.write_table("preferences/part-00002.parquet", _model_rows("p1"))
    human = pa.Table.from_pylist([{"prompt_id": "p1", "chosen_id": "p1-c", "source": "human"}])
    storage.write_table("preferences/part-human.parquet", human)
    untouched = {"fingerprint": "f", "rows": {"preferences": 1}, "parts": ["preferences/part-00000.parquet"]}
    storage.write_json("_state/rank/00000.json", untouched)
    storage.write_json("_state/rank/00001.json", {"fingerprint": "f", "parts": ["preferences/part-00001.parquet"]})
    storage.write_json("_state/rank/00002.json", {"fingerprint": "f", "rows": {"sft": 4}})

    labels._leave_out(storage, "preferences", {"p1"})

    assert storage.read_table("preferences/part-00000.parquet").to_pylist() == _model_rows("p2").to_pylist()
    assert storage.read_table("preferences/part-00001.parquet").to_pylist() == _model_rows("p2").to_pylist()
    assert not storage.exists("preferences/part-00002.parquet")
    assert storage.read_table("preferences/part-human.parquet").to_pylist() == human.to_pylist()
    assert storage.read_table("preferences/part-00000-extra.parquet").to_pylist() == _model_rows("p1").to_pylist()
    assert storage.read_json("_state/rank/00000.json") == untouched
    assert storage.read_json("_state/rank/00001.json") == {
        "fingerprint": "f", "rows": {"preferences": 1}, "parts": ["preferences/part-00001.parquet"]}
    assert storage.read_json("_state/rank/00002.json") == {
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


# -- push: the tasks ------------------------------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n-a-candidate"
INPUT_PNG = b"\x89PNG\r\n\x1a\n-from-the-input"


def _job(out: Path, input_dir: Path) -> Storage:
    """A finished job: q1 (two text candidates and an image a generator wrote), q2 (a text and an
    image the input carried, relative to its folder), q3 (one candidate), q4 (two)."""
    storage = Storage.open(str(out))
    storage.write_table("prompts/part-00000.parquet", pa.table({
        "prompt_id": ["q1", "q2", "q3", "q4"], "prompt": ["first?", "second?", "third?", "fourth?"]}))
    gens = [("q1", "q1-a", "text", "answer a", None), ("q1", "q1-b", "text", None, None),
            ("q1", "q1-img", "image", None, "images/q1/q1-img.png"),
            ("q2", "q2-a", "text", "answer 2a", None), ("q2", "q2-img", "image", None, "pics/cat.png"),
            ("q2", "q2-none", "image", None, None), ("q3", "q3-a", "text", "alone", None),
            ("q4", "q4-a", "text", "four a", None), ("q4", "q4-b", "text", "four b", None)]
    storage.write_table("generations/part-00000-gen.parquet", pa.Table.from_pylist([
        {"prompt_id": p, "generation_id": g, "prompt": {"q1": "first?", "q2": "second?", "q3": "third?",
                                                         "q4": "fourth?"}[p],
         "modality": m, "text": t, "image_path": i} for p, g, m, t, i in gens]))
    storage.write_bytes("images/q1/q1-img.png", PNG)
    (input_dir / "pics").mkdir(parents=True)
    (input_dir / "pics" / "cat.png").write_bytes(INPUT_PNG)
    storage.write_table("rankings/part-00000.parquet", pa.Table.from_pylist([
        {"prompt_id": p, "generation_id": g, "rank": 1} for p, g, *_ in gens]))
    storage.write_json("manifest.json", {"name": "hand", "input_dir": str(input_dir), "config": {
        "scorers": [{"plugin": "length"}, {"plugin": "judge", "label": "strict", "weight": 0.5}]}})
    return storage


def test_ranking_tasks_carry_each_candidates_text_or_image_and_the_prompt(tmp_path: Path) -> None:
    storage = _job(tmp_path / "out", tmp_path / "input")
    tasks = {t.prompt_id: t for t in labels.label_tasks(storage, "rankings")}
    assert sorted(tasks) == ["q1", "q2", "q4"]  # q3 has one candidate: nothing to order
    assert (tasks["q4"].prompt, {c.generation_id for c in tasks["q4"].candidates}) == ("fourth?", {"q4-a", "q4-b"})
    q1, q2 = tasks["q1"], tasks["q2"]
    assert (q1.kind, q1.prompt, q1.key) == ("rankings", "first?", labels.task_key("rankings", "q1",
                                                                                   ["q1-a", "q1-b", "q1-img"]))
    assert {c.generation_id: (c.modality, c.text, c.image) for c in q1.candidates} == {
        "q1-a": ("text", "answer a", None), "q1-b": ("text", None, None), "q1-img": ("image", None, PNG)}
    assert q2.prompt == "second?"
    assert {c.generation_id: (c.modality, c.text, c.image) for c in q2.candidates} == {
        "q2-a": ("text", "answer 2a", None), "q2-img": ("image", None, INPUT_PNG), "q2-none": ("image", None, None)}
    one = labels.label_tasks(storage, "rankings", sample=1, seed=0)
    assert len(one) == 1 and one == [tasks[one[0].prompt_id]]  # a sample: the same task as pushing them all


def test_demonstration_tasks_are_each_prompt_to_answer(tmp_path: Path) -> None:
    storage = _job(tmp_path / "out", tmp_path / "input")
    tasks = labels.label_tasks(storage, "demonstrations")
    assert tasks == [LabelTask(labels.task_key("demonstrations", p), "demonstrations", p, text) for p, text in
                     (("q1", "first?"), ("q2", "second?"), ("q3", "third?"), ("q4", "fourth?"))]
    ids = ["q1", "q2", "q3", "q4"]
    assert labels.choose_prompts(ids, 2, 0) != labels.choose_prompts(ids, 2, 1)
    assert [t.prompt_id for t in labels.label_tasks(storage, "demonstrations", sample=2)] == labels.choose_prompts(
        ids, 2, 0)  # the seed is 0 unless given
    drawn = labels.label_tasks(storage, "demonstrations", sample=2, seed=5)
    assert drawn == labels.label_tasks(storage, "demonstrations", sample=2, seed=5) and len(drawn) == 2
    assert [t.prompt_id for t in drawn] == labels.choose_prompts(["q1", "q2", "q3", "q4"], 2, 5)


def test_a_job_without_rankings_or_manifest_is_one_clear_line(tmp_path: Path) -> None:
    storage = _job(tmp_path / "out", tmp_path / "input")
    storage.delete("rankings/part-00000.parquet")
    with pytest.raises(labels.LabellingError) as raised:
        labels.label_tasks(storage, "rankings")
    assert str(raised.value) == f"{storage.uri}: no rankings/; a job needs scorers to rank its candidates"
    with pytest.raises(labels.LabellingError) as raised:
        labels.read_manifest(Storage.open(str(tmp_path / "input")))
    assert str(raised.value) == (f"{Storage.open(str(tmp_path / 'input')).uri}: no manifest.json; give the output "
                                 "folder of a finished job")


def test_the_scorers_and_weights_come_from_the_manifests_config() -> None:
    assert labels.scorer_weights({"config": {"scorers": [{"plugin": "length"}, {
        "plugin": "judge", "label": "strict", "weight": 0.5}, {"plugin": "rm", "label": "", "weight": 2}]}}) == {
        "length": 1.0, "strict": 0.5, "rm": 2.0}
    assert labels.scorer_weights({}) == {} and labels.scorer_weights({"config": None}) == {}
    assert labels.scorer_weights({"config": {"scorers": None}}) == {}
    assert labels.default_project({"name": "nightly"}, "rankings") == "genflow nightly rankings"
    assert labels.default_project({}, "demonstrations") == "genflow job demonstrations"


def test_scores_by_prompt_keeps_the_finite_scores_of_the_jobs_scorers(tmp_path: Path) -> None:
    storage = Storage.open(str(tmp_path))
    assert labels._scores_by_prompt(storage, {"x": 1.0}) == {}
    rows = [("p1", "a", "x", 1.0), ("p1", "a", "y", 2.0), ("p1", "b", "x", float("nan")), ("p1", "c", "x", None),
            ("p1", "d", "x", float("inf")), ("p2", "a", "x", -1.5), ("p1", "a", "other", 9.0)]
    storage.write_table("scores/part-00000-x.parquet", pa.Table.from_pylist(
        [{"prompt_id": p, "generation_id": g, "scorer": s, "score": v} for p, g, s, v in rows]))
    assert labels._scores_by_prompt(storage, {"x": 1.0, "y": 1.0}) == {"p1": {"a": {"x": 1.0, "y": 2.0}},
                                                                       "p2": {"a": {"x": -1.5}}}


# -- pull: the rows people's annotations become ------------------------------------------------

def _ann(kind: str, prompt_id: str, annotation_id: str, who: str = "ada", **answer: Any) -> Annotation:
    return Annotation(f"key-{prompt_id}", kind, prompt_id, who, f"2026-01-0{annotation_id[-1]}", annotation_id,
                      **answer)


def test_annotations_become_rows_in_a_fixed_order_with_unknown_candidates_left_out(
        caplog: pytest.LogCaptureFixture) -> None:
    known = {"p1": {"a", "b", "c"}, "p2": {"x", "y"}}
    prompts = {"p1": "first?", "p2": "second?"}
    given = [_ann("rankings", "p2", "7", "bo", ranking=("y", "ghost", "x")),
             _ann("rankings", "p1", "5", ranking=("c", "a", "b")),
             _ann("rankings", "p1", "5", ranking=("c", "a", "b")),  # handed over twice
             _ann("rankings", "p1", "6", ranking=("a", "ghost")),  # one known candidate: no order
             _ann("rankings", "p9", "8", ranking=("a", "b")),  # a prompt the job does not have
             _ann("demonstrations", "p2", "3", "cy", completion="an answer"),
             _ann("demonstrations", "p1", "4", completion="  \n"),  # blank
             _ann("demonstrations", "p1", "2", completion=None),
             _ann("demonstrations", "p9", "1", completion="of a prompt the job lacks")]
    with caplog.at_level(logging.INFO, logger="genflow.labelling.labels"):
        rankings, demonstrations = labels.annotations_tables(given, prompts, "ls", known)
    assert rankings.schema == schemas.HUMAN_RANKINGS and demonstrations.schema == schemas.DEMONSTRATIONS
    assert rankings.to_pylist() == [
        {"prompt_id": p, "generation_id": g, "rank": r, "annotator": who, "created_at": at, "ranking_id": i,
         "tool": "ls"} for p, g, r, who, at, i in [
            ("p1", "c", 1, "ada", "2026-01-05", "5"), ("p1", "a", 2, "ada", "2026-01-05", "5"),
            ("p1", "b", 3, "ada", "2026-01-05", "5"),
            ("p2", "y", 1, "bo", "2026-01-07", "7"), ("p2", "x", 2, "bo", "2026-01-07", "7")]]
    assert demonstrations.to_pylist() == [{
        "prompt": "second?", "completion": "an answer", "annotator": "cy", "prompt_id": "p2",
        "created_at": "2026-01-03", "demonstration_id": f"human-{stable_hash(['ls', '3'])}", "tool": "ls"}]
    assert [r.getMessage() for r in caplog.records] == [
        "1 annotations were handed over more than once; each is written once"]


def test_the_same_annotation_id_of_two_tasks_or_kinds_is_two_annotations(caplog: pytest.LogCaptureFixture) -> None:
    one = _ann("rankings", "p1", "5", ranking=("a", "b"))
    other_task = Annotation("key-other", "rankings", "p1", "ada", "", "5", ranking=("b", "a"))
    other_kind = Annotation("key-p1", "demonstrations", "p1", "ada", "", "5", completion="x")
    with caplog.at_level(logging.INFO, logger="genflow.labelling.labels"):
        assert labels.unique_annotations([one, other_task, other_kind]) == [one, other_task, other_kind]
    assert caplog.records == []  # nothing handed over twice: nothing to say
    again = _ann("rankings", "p1", "5", ranking=("b", "a"))
    assert labels.unique_annotations([one, other_task, other_kind, again]) == [one, other_task, other_kind]


def test_no_annotations_are_empty_tables_of_the_folders_columns() -> None:
    rankings, demonstrations = labels.annotations_tables([], {}, "ls", {})
    assert (rankings.schema, rankings.num_rows) == (schemas.HUMAN_RANKINGS, 0)
    assert (demonstrations.schema, demonstrations.num_rows) == (schemas.DEMONSTRATIONS, 0)


def test_a_pull_writes_its_kinds_parts_and_counts_their_rows(tmp_path: Path) -> None:
    storage = _job(tmp_path / "out", tmp_path / "input")
    given = [_ann("rankings", "q1", "1", ranking=("q1-b", "q1-a")), _ann("demonstrations", "q2", "2",
                                                                        completion="an answer")]
    assert labels.write_pulled(storage, "ls", given) == {"human_rankings": 2, "demonstrations": 1}
    assert storage.list("human_rankings") == ["human_rankings/part-ls.parquet"]
    assert storage.read_table("human_rankings/part-ls.parquet")["tool"].to_pylist() == ["ls", "ls"]
    assert storage.read_table("demonstrations/part-ls.parquet").to_pylist()[0]["demonstration_id"] == (
        f"human-{stable_hash(['ls', '2'])}")
    assert storage.read_table("demonstrations/part-ls.parquet")["prompt"].to_pylist() == ["second?"]
    assert labels.write_pulled(storage, "ls", [], kinds=("rankings",)) == {"human_rankings": 0}
    assert storage.list("human_rankings") == [] and storage.list("demonstrations") == [
        "demonstrations/part-ls.parquet"]
    assert labels.write_pulled(storage, "ls", given, kinds=("demonstrations",)) == {"demonstrations": 1}
    assert storage.list("human_rankings") == []


def test_judgements_are_each_annotations_order_best_first_across_tools(tmp_path: Path) -> None:
    storage = Storage.open(str(tmp_path))
    rows = [("p1", "b", 2, "ada", "9", "ls"), ("p1", "a", 1, "ada", "9", "ls"), ("p1", "c", 3, "ada", "9", "ls"),
            ("p1", "c", 1, "bo", "9", "other"), ("p1", "a", 2, "bo", "9", "other"),
            ("p0", "x", 2, "cy", "1", "ls"), ("p0", "y", 1, "cy", "1", "ls")]
    storage.write_table("human_rankings/part-ls.parquet", pa.Table.from_pylist(
        [{"prompt_id": p, "generation_id": g, "rank": r, "annotator": who, "created_at": "", "ranking_id": i,
          "tool": t} for p, g, r, who, i, t in rows], schema=schemas.HUMAN_RANKINGS))
    assert labels.judgements(storage) == [
        labels.HumanRanking("p0", "cy", "ls:1", ("y", "x")), labels.HumanRanking("p1", "ada", "ls:9", ("a", "b", "c")),
        labels.HumanRanking("p1", "bo", "other:9", ("c", "a"))]
    assert labels.judgements(Storage.open(str(tmp_path / "nothing"))) == []


# -- agreement with people ------------------------------------------------------------------------

def test_two_annotators_are_compared_on_the_candidates_both_ranked_even_two() -> None:
    """On p1 ada and bo share two candidates (a and b, ordered oppositely); cy shares one with ada
    and none with bo: only ada and bo are a pair. On p2 ada and bo agree."""
    found = [labels.HumanRanking("p1", "ada", "ls:1", ("a", "b", "c")),
             labels.HumanRanking("p1", "bo", "ls:2", ("b", "a")),
             labels.HumanRanking("p1", "cy", "ls:3", ("c", "d")), labels.HumanRanking("p2", "ada", "ls:4", ("x", "y")),
             labels.HumanRanking("p2", "bo", "ls:5", ("x", "y"))]  # on p2, ada and bo agree
    agreement = labels.human_agreement(found, {}, {})
    assert agreement == {"rankings": 5, "prompts": 2, "annotators": 3, "scorers": [], "inter_annotator": {
        "prompts": 2, "annotator_pairs": 2, "kendall_tau": 0.0, "agreement": 0.5, "pairs": 2}}


def test_a_scorers_agreement_with_people_is_rounded_to_six_places() -> None:
    """ada orders a > b > c; the scorer scores b > c > a: it orders one of her three pairs her way,
    and its tau-b against her wins minus losses (a 2, b 0, c -2) is -1/3."""
    found = [labels.HumanRanking("p1", "ada", "ls:1", ("a", "b", "c"))]
    scores = {"p1": {"a": {"rm": 1.0}, "b": {"rm": 3.0}, "c": {"rm": 2.0}}}
    rows = labels.human_agreement(found, scores, {"rm": 1.0})["scorers"]
    assert rows == [{"scorer": name, "pairwise_accuracy": 0.333333, "pairs": 3, "kendall_tau": -0.333333,
                     "prompts": 1} for name in ("rm", "combined")]


def test_a_ranking_listing_a_candidate_twice_keeps_its_best_place_and_says_so(
        caplog: pytest.LogCaptureFixture) -> None:
    twice = _ann("rankings", "p1", "5", ranking=("b", "a", "b", "c"))
    with caplog.at_level(logging.WARNING, logger="genflow.labelling.labels"):
        rankings, _ = labels.annotations_tables([twice], {}, "ls", {"p1": {"a", "b", "c"}})
    assert [(r["generation_id"], r["rank"]) for r in rankings.to_pylist()] == [("b", 1), ("a", 2), ("c", 3)]
    assert [r.getMessage() for r in caplog.records] == [
        "ls annotation 5 of prompt p1 lists a candidate more than once; keeping the best place of each"]


def test_an_image_the_input_carried_is_read_from_the_working_folder_when_no_input_dir_was_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = _job(tmp_path / "out", tmp_path / "input")
    manifest = storage.read_json("manifest.json")
    del manifest["input_dir"]
    storage.write_json("manifest.json", manifest)
    monkeypatch.chdir(tmp_path / "input")
    q2 = next(t for t in labels.label_tasks(storage, "rankings") if t.prompt_id == "q2")
    assert {c.generation_id: c.image for c in q2.candidates}["q2-img"] == INPUT_PNG


# -- the commands --------------------------------------------------------------------------------

def test_a_record_without_projects_is_no_projects(tmp_path: Path) -> None:
    storage = Storage.open(str(tmp_path))
    assert labels._record(storage, "ls") == []
    storage.write_json("_labelling/ls.json", {})
    assert labels._record(storage, "ls") == []
    storage.write_json("_labelling/ls.json", {"projects": [{"project": "t", "kind": "rankings"}]})
    assert labels._record(storage, "ls") == [{"project": "t", "kind": "rankings"}]


def test_a_labellers_params_are_checked_and_its_secrets_held_under_its_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from genflow import secrets

    monkeypatch.setattr(secrets, "_installed", secrets.Scrubber())
    with pytest.raises(labels.LabellingError) as raised:
        labels.labeller("label-studio", {"timeout_s": 0})
    assert str(raised.value).startswith("labeller 'label-studio': bad params:\n") and "timeout_s" in str(raised.value)
    password = "s3cret-password-0123456789"
    plugin = labels.labeller("label-studio", {"url": f"http://ada:{password}@ls.local:8080"})
    assert plugin.base == f"http://ada:{password}@ls.local:8080"
    found = secrets.installed().find(f"echo {password}")
    assert found is not None and found.where.startswith("labeller label-studio")


def test_refresh_counts_the_people_and_rankings_and_says_how_human_rows_join(tmp_path: Path) -> None:
    """ada ranked q1 and answered q2, bo answered q4: two people, one ranking; the human rows
    go beside the model's unless the config says otherwise."""
    storage = _job(tmp_path / "out", tmp_path / "input")
    labels.write_pulled(storage, "ls", [_ann("rankings", "q1", "1", ranking=("q1-b", "q1-a")),
                                        _ann("demonstrations", "q2", "2", completion="an answer"),
                                        _ann("demonstrations", "q4", "3", "bo", completion="another")])
    manifest = labels.refresh(storage, storage.read_json("manifest.json"))
    found = manifest["labelling"]
    assert (found["human_rows"], found["rankings"], found["annotators"]) == ("beside", 1, 2)
    assert (found["rows"]["human_rankings"], found["rows"]["demonstrations"]) == (2, 2)
    assert manifest["human_agreement"]["rankings"] == 1 and manifest["human_agreement"]["annotators"] == 1

"""The promises a user trains on, each pinned by a test that fails when it breaks.

Fast (no Ray, no Prefect): ``make mutants`` runs these against mutated copies of the
modules they cover. Pairs keep ``min_margin``; best-of-n keeps ``min_score``; every config
section refuses unknown keys and names their path; a part is written whole or not at
all; resume trusts a marker only with its fingerprint and all its parts; failed rows
become ``errors/`` rows.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from pydantic import BaseModel
from support.jobs import ROOT

from genflow.config import ConfigError, JobConfig, build_config, job_exporters, load_config, parse_override, redacted
from genflow.data.layout import Shard, Stage
from genflow.data.resume import DoneIndex, StageOutcome, finished, mark_finished
from genflow.data.schemas import ERRORS, GENERATIONS, SCORES
from genflow.data.storage import TEMPORARY_PREFIX, Storage
from genflow.plugins.code.passk import overall_pass_at_k, pass_at_k, per_prompt_pass_at_k
from genflow.plugins.training_data.exporters import (
    PREFERENCES,
    SFT,
    BestOfN,
    BestOfNParams,
    PreferencePairs,
    PreferenceParams,
)
from genflow.stages.common import error_row, finish_model_stage
from genflow.stages.rank import rank_candidates

PROMPTS = str(ROOT / "configs/data/quickstart_prompts.parquet")


# -- preference pairs and best-of-n ----------------------------------------------

def ranked(candidates: dict[str, list[float]], modality: str = "text") -> pa.Table:
    """Rank candidates ``<prompt><i>`` with the given scores (one scorer, weight 1)."""
    gens, scores = [], []
    for prompt_id, values in candidates.items():
        for i, value in enumerate(values):
            gid = f"{prompt_id}{i}"
            image = modality == "image"
            gens.append({"prompt_id": prompt_id, "generation_id": gid, "generator": "g", "modality": modality,
                         "prompt": f"prompt {prompt_id}", "sample": i, "text": None if image else f" text {gid}",
                         "image_path": f"images/{prompt_id}/{gid}.png" if image else None})
            scores.append({"generation_id": gid, "prompt_id": prompt_id, "scorer": "rm", "score": value,
                           "details": "{}"})
    return rank_candidates(pa.Table.from_pylist(gens, schema=GENERATIONS),
                           pa.Table.from_pylist(scores, schema=SCORES), {"rm": 1.0})


def pairs_of(table: pa.Table, min_margin: float, per_prompt: int) -> list[tuple[str, str]]:
    out = PreferencePairs(PreferenceParams(min_margin=min_margin, per_prompt=per_prompt)).export(table)
    return [(r["chosen_id"], r["rejected_id"]) for r in out.to_pylist()]


def test_a_pair_below_min_margin_is_never_made_even_with_room_under_per_prompt() -> None:
    # Margins: a0-a2 0.5 (exactly min_margin: kept), a0-a1 0.25 and a1-a2 0.25 (below: dropped).
    # per_prompt 3 leaves room for all three, so only min_margin keeps the two narrow ones out.
    table = ranked({"a": [1.0, 0.75, 0.5]})
    assert pairs_of(table, min_margin=0.5, per_prompt=3) == [("a0", "a2")]
    assert pairs_of(table, min_margin=0.0, per_prompt=3) == [("a0", "a2"), ("a0", "a1"), ("a1", "a2")]
    assert pairs_of(table, min_margin=0.6, per_prompt=3) == []


def test_neighbours_in_rank_make_a_pair_and_small_margins_count() -> None:
    assert pairs_of(ranked({"a": [0.25, 0.0]}), min_margin=0.0, per_prompt=1) == [("a0", "a1")]
    assert pairs_of(ranked({"a": [0.0, 0.0]}), min_margin=0.0, per_prompt=1) == []  # a tie is no preference


def test_pair_rows_carry_the_texts_scores_and_ids_they_came_from() -> None:
    out = PreferencePairs(PreferenceParams(min_margin=0.0, per_prompt=1)).export(
        ranked({"b": [-1.0, 2.0], "a": [3.0, 1.0]}))
    assert out.schema == PREFERENCES
    assert out.to_pylist() == [
        {"prompt": "prompt a", "chosen": " text a0", "rejected": " text a1", "score_chosen": 3.0,
         "score_rejected": 1.0, "prompt_id": "a", "chosen_id": "a0", "rejected_id": "a1", "source": "model"},
        {"prompt": "prompt b", "chosen": " text b1", "rejected": " text b0", "score_chosen": 2.0,
         "score_rejected": -1.0, "prompt_id": "b", "chosen_id": "b1", "rejected_id": "b0", "source": "model"},
    ]


def test_image_candidates_pair_and_complete_with_their_paths() -> None:
    table = ranked({"p": [0.5, 1.0]}, modality="image")
    pair = PreferencePairs(PreferenceParams()).export(table).to_pylist()
    assert [(r["chosen"], r["rejected"]) for r in pair] == [("images/p/p1.png", "images/p/p0.png")]
    best = BestOfN(BestOfNParams()).export(table).to_pylist()
    assert [(r["completion"], r["generation_id"]) for r in best] == [("images/p/p1.png", "p1")]


def test_best_of_n_keeps_scores_at_min_score_and_the_prompts_after_a_dropped_one() -> None:
    table = ranked({"a": [0.25, -1.0], "b": [0.5, 0.75], "c": [-2.0]})
    out = BestOfN(BestOfNParams(min_score=0.5)).export(table)
    assert out.schema == SFT
    # a's best (0.25) is below min_score: dropped, and the prompts after it are still looked at.
    assert out.to_pylist() == [
        {"prompt": "prompt b", "completion": " text b1", "score": 0.75, "prompt_id": "b", "generation_id": "b1",
         "source": "model"}]
    at_the_bar = BestOfN(BestOfNParams(min_score=0.25)).export(table)
    assert at_the_bar["prompt_id"].to_pylist() == ["a", "b"]  # a's best is exactly 0.25: kept


def test_rankings_record_each_scorers_score_as_sorted_json() -> None:
    gens = pa.Table.from_pylist([{"prompt_id": "p", "generation_id": "g", "generator": "x", "modality": "text",
                                  "prompt": "P", "text": "t", "sample": 0}], schema=GENERATIONS)
    scores = pa.Table.from_pylist([{"generation_id": "g", "prompt_id": "p", "scorer": s, "score": v,
                                    "details": "{}"} for s, v in (("zeta", 1.0), ("alpha", 2.0))], schema=SCORES)
    row = rank_candidates(gens, scores, {"zeta": 1.0, "alpha": 0.5}).to_pylist()[0]
    assert row["scores"] == '{"alpha": 2.0, "zeta": 1.0}'
    assert (row["rank"], row["score"]) == (1, 2.0)


# -- pass@k -------------------------------------------------------------------

def test_pass_at_k_refuses_impossible_counts_with_a_message() -> None:
    with pytest.raises(ValueError, match=r"need 0 <= c <= n, got n=3, c=4"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match=r"pass@4 needs at least 4 samples, got n=3"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match=r"k must be >= 1, got \[0, 1\]"):
        per_prompt_pass_at_k(pa.table({"prompt_id": ["p"], "score": [1.0]}), ks=[1, 0])


def test_pass_at_k_is_reported_for_k_equal_to_the_fewest_samples() -> None:
    scores = pa.table({"prompt_id": ["a", "a", "a", "b", "b", "b"], "score": [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]})
    result = overall_pass_at_k(scores, ks=[3, 4])
    assert result == {"pass@3": 0.5, "prompts": 2, "samples": 6, "passed": 1}
    table = per_prompt_pass_at_k(scores, ks=[4])
    assert table.schema.field("pass@4").type == pa.float64()  # all null, still a float column
    assert table["pass@4"].to_pylist() == [None, None]
    assert pass_at_k(3, 1, 2) == pytest.approx(1 - math.comb(2, 2) / math.comb(3, 2))


# -- config: every section refuses unknown keys, by path -----------------------------

def base(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "t", "input": PROMPTS, "output": "/tmp/unused",
        "generators": [{"label": "g", "plugin": "hf-text", "model": "m"}],
        "scorers": [{"plugin": "hf-reward", "model": "r"}],
        "ranking": {"pairs": {"min_margin": 0.1, "per_prompt": 2}, "best_of_n": True},
        "ray": {"workers": 1}, "storage": {"region": "eu-west-1"},
        "schedule": {"cron": "0 3 * * *"},
    }
    data.update(overrides)
    return data


SECTIONS = ["", "generators.0", "generators.0.params", "scorers.0", "scorers.0.params", "ranking",
            "ranking.pairs", "ray", "storage", "schedule", "exporters.preferences"]


@pytest.mark.parametrize("section", SECTIONS)
def test_an_unknown_key_in_any_section_is_refused_with_its_path(section: str) -> None:
    data = base(exporters={"preferences": {"per_prompt": 1}})
    build_config(data)  # valid as it is
    node: Any = data
    for part in filter(None, section.split(".")):
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node["bogus_key"] = 1
    path = f"{section}.bogus_key" if section else "bogus_key"
    with pytest.raises(ConfigError) as error:
        build_config(data)
    assert f"  {path}: unknown key" in str(error.value).splitlines()


def _models(model: type[BaseModel], seen: set[type[BaseModel]]) -> set[type[BaseModel]]:
    """``model`` and every pydantic model its fields can hold."""
    import typing

    if model in seen:
        return seen
    seen.add(model)
    for field in model.model_fields.values():
        todo = [field.annotation]
        while todo:
            tp = todo.pop()
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                _models(tp, seen)
            todo.extend(typing.get_args(tp))
    return seen


def test_every_config_section_forbids_extra_keys() -> None:
    """A section added later inherits the rule, or this names it."""
    sections = _models(JobConfig, set())
    assert len(sections) >= 8
    # ranking holds the deprecated keys of exporters' params: a key no exporter reads is refused by
    # validation (test_an_unknown_key_in_any_section_is_refused_with_its_path[ranking])
    assert {m.__name__ for m in sections if m.model_config.get("extra") != "forbid"} == {"RankingSpec"}


def test_config_errors_come_together_one_per_line_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(base(shard_rows=0, ray={"wrokers": 2})))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).splitlines() == [
        f"{path} is not a valid genflow job:", "  shard_rows: Input should be greater than or equal to 1",
        "  ray.wrokers: unknown key"]
    bad_plugins = base(generators=[{"label": "g", "plugin": "nope"}], scorers=[{"plugin": "nada"}],
                       exporters={"nothing": {}})
    path.write_text(json.dumps(bad_plugins))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    lines = str(error.value).splitlines()
    assert lines[0] == f"{path} is not a valid genflow job:"
    named = [line.split(": ", 1) for line in lines[1:] if line.startswith("  ") and not line.startswith("   ")]
    assert [key for key, _ in named] == ["  generators.0.plugin", "  scorers.0.plugin", "  exporters.nothing"]
    assert [message.split(" (")[0] for _, message in named] == [
        "unknown generator plugin 'nope'", "unknown scorer plugin 'nada'", "unknown exporter plugin 'nothing'"]


def test_overrides_reach_a_loaded_config_and_leave_the_data_alone(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    data = base()
    path.write_text(json.dumps(data))
    config = load_config(path, ["generators.0.template=a={{ prompt }}", "name=", "ranking.pairs.per_prompt=5"])
    assert config.generators[0].template == "a={{ prompt }}"  # only the first "=" splits
    assert config.name == ""  # nothing after "=": the empty string
    assert job_exporters(config)["preferences"] == {"min_margin": 0.1, "per_prompt": 5}
    build_config(data, ["generators.0.samples=7"])
    assert data == base()  # the caller's dict is not modified
    assert parse_override("a.b = [1, 2]") == ("a.b", [1, 2])
    with pytest.raises(ConfigError, match=r"ray\.workers\.x: cannot descend into ray\.workers, it is a int"):
        build_config(base(), ["ray.workers.x=1"])
    with pytest.raises(ConfigError, match=r"a YAML mapping, got list"):
        path.write_text("[1, 2]")
        load_config(path)


def test_the_recorded_config_hides_secrets_at_any_depth() -> None:
    config = build_config(base(generators=[{"label": "g", "plugin": "hf-text", "model": "m",
                                            "params": {"max_new_tokens": 4}}]))
    shown = redacted(config)
    assert shown["generators"][0]["params"] == {"max_new_tokens": 4}
    assert shown["storage"]["region"] == "eu-west-1"
    assert redacted([{"x-token": "t", "n": [{"api_key": "k"}]}]) == [{"x-token": "***", "n": [{"api_key": "***"}]}]


# -- storage: a part is written whole or not at all ---------------------------------

class FailingStream:
    """An output stream that takes ``allow`` bytes, then fails as a full disk would."""

    def __init__(self, inner: Any, allow: int) -> None:
        self.inner, self.allow = inner, allow

    def write(self, data: bytes) -> int:
        self.inner.write(bytes(data[: self.allow]))
        raise OSError(28, "No space left on device")

    def __enter__(self) -> FailingStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.close()


class FailingDisk(pafs.LocalFileSystem):
    """The local filesystem, with every output stream failing part-way through."""

    def open_output_stream(self, path: str, *args: Any, **kwargs: Any) -> Any:
        return FailingStream(super().open_output_stream(path, *args, **kwargs), allow=100)


def parts(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_an_interrupted_part_write_keeps_the_previous_part_and_leaves_nothing_at_its_name(tmp_path: Path) -> None:
    storage = Storage.open(str(tmp_path / "out"))
    old = pa.table({"generation_id": ["g1", "g2"], "text": ["old one", "old two"]})
    assert storage.write_table("generations/part-00000.parquet", old)
    before = (tmp_path / "out/generations/part-00000.parquet").read_bytes()

    failing = Storage(storage.uri, FailingDisk(), storage.root)
    new = pa.table({"generation_id": [f"n{i}" for i in range(500)], "text": ["new"] * 500})
    with pytest.raises(OSError, match="No space left on device"):
        failing.write_table("generations/part-00000.parquet", new)
    with pytest.raises(OSError, match="No space left on device"):
        failing.write_table("generations/part-00001.parquet", new)
    with pytest.raises(OSError, match="No space left on device"):
        failing.write_bytes("_state/rank/00000.json", b"{" + b" " * 1000 + b"}")

    folder = tmp_path / "out/generations"
    assert (folder / "part-00000.parquet").read_bytes() == before  # byte for byte
    assert not (folder / "part-00001.parquet").exists()
    assert not (tmp_path / "out/_state/rank/00000.json").exists()
    leftovers = [n for n in parts(folder) if n.startswith(TEMPORARY_PREFIX)]
    assert len(leftovers) == 2  # the cut-short bytes sit under temporary names only...
    assert ds.dataset(folder).to_table().to_pylist() == old.to_pylist()  # ...which readers skip
    assert storage.list("generations") == ["generations/part-00000.parquet"]
    storage.remove_temporaries("generations")
    assert parts(folder) == ["part-00000.parquet"]


def test_a_completed_write_replaces_the_part_whole(tmp_path: Path) -> None:
    storage = Storage.open(str(tmp_path / "out"))
    storage.write_table("scores/part-00000.parquet", pa.table({"x": [1, 2, 3]}))
    assert storage.write_table("scores/part-00000.parquet", pa.table({"x": [4]}))
    assert parts(tmp_path / "out/scores") == ["part-00000.parquet"]
    assert pq.read_table(tmp_path / "out/scores/part-00000.parquet").to_pylist() == [{"x": 4}]
    # A part with no rows is never written (datasets refuses such a folder), and replaces nothing stale.
    assert not storage.write_table("scores/part-00000.parquet", pa.table({"x": pa.array([], pa.int64())}))
    assert parts(tmp_path / "out/scores") == []
    storage.write_json("manifest.json", {"b": 1, "a": [1]})
    assert storage.read_json("manifest.json") == {"a": [1], "b": 1}
    assert storage.list("") == ["manifest.json"]


# -- resume: a marker is trusted only with its fingerprint and every part -----------------

SHARD = Shard(3, "fp-shard", 8)
STAGE = Stage("score", "rm")


def finish(storage: Storage, fingerprint: str = "fp", errors: list[dict[str, Any]] | None = None) -> StageOutcome:
    """What a score stage does once its shard is scored: its parts, then its marker."""
    scores = pa.Table.from_pylist([{"generation_id": "g1", "prompt_id": "p1", "scorer": "rm", "score": 0.5,
                                    "details": "{}"}], schema=SCORES)
    return finish_model_stage(storage, STAGE, SHARD, fingerprint, "scores", scores, errors or [], 5, 0.0)


def done(storage: Storage, indexed: bool, fingerprint: str = "fp", shard: Shard = SHARD,
         stage: Stage = STAGE) -> StageOutcome | None:
    return finished(storage, stage, shard, fingerprint, DoneIndex(storage) if indexed else None)


@pytest.mark.parametrize("indexed", [False, True])
def test_a_finished_shard_is_skipped_with_its_recorded_outcome(tmp_path: Path, indexed: bool) -> None:
    storage = Storage.open(str(tmp_path))
    finish(storage)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "_state/score/rm/00003.json", "scores/part-00003-rm.parquet"]  # no errors: no errors part
    outcome = done(storage, indexed)
    assert outcome is not None and outcome.skipped
    recorded = outcome.to_json()
    assert recorded.pop("seconds") >= 0
    part = tmp_path / "scores/part-00003-rm.parquet"
    assert recorded.pop("checks") == {"scores/part-00003-rm.parquet": {  # what the marker vouches for
        "size": part.stat().st_size, "mtime_ns": part.stat().st_mtime_ns,
        "sha256": hashlib.sha256(part.read_bytes()).hexdigest()}}
    assert recorded == {"stage": "score/rm", "shard": 3, "fingerprint": "fp", "rows": {"scores": 1},
                        "errors": 0, "work_items": 5, "parts": ["scores/part-00003-rm.parquet"]}
    assert done(storage, indexed, shard=Shard(4, "fp-shard", 8)) is None
    assert done(storage, indexed, stage=Stage("score", "other")) is None


@pytest.mark.parametrize("indexed", [False, True])
def test_a_changed_fingerprint_or_a_missing_part_is_redone(tmp_path: Path, indexed: bool) -> None:
    storage = Storage.open(str(tmp_path))
    finish(storage)
    assert done(storage, indexed) is not None
    assert done(storage, indexed, fingerprint="fp-after-a-config-change") is None
    (tmp_path / "scores/part-00003-rm.parquet").unlink()
    assert done(storage, indexed) is None


@pytest.mark.parametrize("indexed", [False, True])
def test_a_marker_cut_short_or_without_parts_is_not_trusted(tmp_path: Path, indexed: bool) -> None:
    storage = Storage.open(str(tmp_path))
    finish(storage)
    marker = tmp_path / "_state/score/rm/00003.json"
    data = json.loads(marker.read_text())
    marker.write_text(marker.read_text()[:20])
    assert done(storage, indexed) is None
    marker.write_text(json.dumps({k: v for k, v in data.items() if k != "parts"}))
    assert done(storage, indexed) is None
    marker.write_text(json.dumps([data]))
    assert done(storage, indexed) is None
    marker.write_text(json.dumps(data))
    assert done(storage, indexed) is not None


def test_the_index_reads_each_stage_once_and_ignores_foreign_files(tmp_path: Path) -> None:
    storage = Storage.open(str(tmp_path))
    finish(storage)
    (tmp_path / "_state/score/rm/notes.json").write_text("{}")
    (tmp_path / "_state/score/rm/00007.json").write_text("not json")
    index = DoneIndex(storage)
    assert index.marker(STAGE, SHARD)["parts"] == ["scores/part-00003-rm.parquet"]
    assert index.marker(STAGE, Shard(7, "x", 1)) is None
    assert index.exists("scores/part-00003-rm.parquet") and not index.exists("scores/part-00004-rm.parquet")
    assert not index.exists("elsewhere/part-00003-rm.parquet")
    # It answers for the state it found: a marker written after it was built is not seen.
    mark_finished(storage, StageOutcome("score/rm", 5, "fp", parts=[]))
    assert index.marker(STAGE, Shard(5, "x", 1)) is None
    assert DoneIndex(storage).marker(STAGE, Shard(5, "x", 1)) == {
        "stage": "score/rm", "shard": 5, "fingerprint": "fp", "rows": {}, "errors": 0, "work_items": 0,
        "seconds": 0.0, "parts": []}


# -- error rows ---------------------------------------------------------------------

def test_failed_rows_become_an_errors_part_that_the_marker_vouches_for(tmp_path: Path) -> None:
    from genflow.engine.worker import Failure

    storage = Storage.open(str(tmp_path))
    errors = [error_row("p1", "score", "rm", Failure("ValueError: bad", "Traceback ..."), "g1"),
              error_row("p2", "score", "rm", Failure("OSError: gone", "Traceback 2"))]
    outcome = finish(storage, errors=errors)
    assert outcome.parts == ["scores/part-00003-rm.parquet", "errors/part-score-rm-00003.parquet"]
    assert outcome.errors == 2
    table = pq.read_table(tmp_path / "errors/part-score-rm-00003.parquet")
    assert table.schema == ERRORS
    assert table.to_pylist() == [
        {"prompt_id": "p1", "stage": "score", "plugin": "rm", "error": "ValueError: bad", "traceback": "Traceback ...",
         "generation_id": "g1", "transient": False},
        {"prompt_id": "p2", "stage": "score", "plugin": "rm", "error": "OSError: gone", "traceback": "Traceback 2",
         "generation_id": None, "transient": False}]
    assert done(storage, False) is not None
    (tmp_path / "errors/part-score-rm-00003.parquet").unlink()
    assert done(storage, False) is None  # the errors are part of what the shard produced

"""Plugins own their outputs: the exporters' params live under ``exporters`` (the old ``ranking``
keys still work, with a warning naming the new key), a scorer's own ``scores/`` columns are
typed and checked, and the report shows the input columns the generators call media."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import pytest

from genflow.api import Score
from genflow.config import ConfigError, build_config, job_exporters, load_config, load_raw
from genflow.data.results import Failure
from genflow.data.schemas import SCORES, scores_schema
from genflow.stages.score import own_columns

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = str(ROOT / "configs/data/quickstart_prompts.parquet")
DEFAULTS = {"preferences": {"min_margin": 0.0, "per_prompt": 1}, "sft": {"min_score": None}}


def config(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"name": "t", "input": PROMPTS, "output": "/tmp/unused",
                            "generators": [{"label": "g", "plugin": "hf-text", "model": "m"}],
                            "scorers": [{"plugin": "hf-reward", "model": "r"}]}
    return {**data, **overrides}


@pytest.mark.parametrize("old, new, exporters", [
    ({"pairs": {"min_margin": 0.5, "per_prompt": 3}, "best_of_n": True},
     {"preferences": {"min_margin": 0.5, "per_prompt": 3}},
     {**DEFAULTS, "preferences": {"min_margin": 0.5, "per_prompt": 3}}),
    ({"pairs": None}, {"preferences": False}, {"sft": DEFAULTS["sft"]}),
    ({"best_of_n": False, "sft_min_score": 2.0}, {"sft": False}, {"preferences": DEFAULTS["preferences"]}),
    ({"sft_min_score": 2.0}, {"sft": {"min_score": 2.0}}, {**DEFAULTS, "sft": {"min_score": 2.0}}),
])
def test_the_old_ranking_keys_make_the_exporters_the_new_ones_make_with_a_warning(
        old: dict[str, Any], new: dict[str, Any], exporters: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="genflow.config"):
        assert job_exporters(build_config(config(ranking=old))) == exporters
    warned = [r.getMessage() for r in caplog.records]
    assert [w.split(" is deprecated")[0] for w in warned] == [f"ranking.{key}" for key in old]
    assert all("exporters: {" in w for w in warned), warned  # each names the key that replaces it
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="genflow.config"):
        assert job_exporters(build_config(config(exporters=new))) == exporters
    assert not caplog.records


def test_an_exporter_runs_by_default_is_switched_off_by_false_and_on_by_true_or_null() -> None:
    assert job_exporters(build_config(config())) == DEFAULTS
    assert job_exporters(build_config(config(exporters={"sft": False, "preferences": None}))) == {
        "preferences": DEFAULTS["preferences"]}
    assert job_exporters(build_config(config(exporters={"sft": True}))) == DEFAULTS
    # The params given are those the exporter's Params read: defaults filled in, as the rank fingerprint hashes them.
    assert job_exporters({"exporters": {"preferences": {"per_prompt": 4}}})["preferences"] == {
        "min_margin": 0.0, "per_prompt": 4}


def test_exporters_params_win_over_the_old_key_which_is_said_to_be_ignored(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="genflow.config"):
        built = build_config(config(ranking={"pairs": {"per_prompt": 9}}, exporters={"preferences": {}}))
    assert job_exporters(built)["preferences"] == {"min_margin": 0.0, "per_prompt": 1}
    assert [r.getMessage() for r in caplog.records] == [
        "ranking.pairs is deprecated, and ignored: exporters.preferences is set"]


@pytest.mark.parametrize("ranking, line", [
    ({"pairs": {"min_margin": -1}}, "  ranking.pairs.min_margin: Input should be greater than or equal to 0"),
    ({"pairs": {"per_prompts": 2}}, "  ranking.pairs.per_prompts: unknown key"),
    ({"sft_min_score": "high"}, "  ranking.sft_min_score: Input should be a valid number, unable to parse string "
                                "as a number"),
    ({"best_of_m": True}, "  ranking.best_of_m: unknown key"),
])
def test_a_bad_old_key_is_refused_with_its_path(ranking: dict[str, Any], line: str) -> None:
    with pytest.raises(ConfigError) as error:
        build_config(config(ranking=ranking))
    assert line in str(error.value).splitlines()


@pytest.mark.parametrize("name", ["quickstart", "code", "images", "nightly", "sweep"])
def test_the_shipped_configs_use_no_deprecated_key(name: str, caplog: pytest.LogCaptureFixture) -> None:
    path = ROOT / "configs" / f"{name}.yaml"
    assert "ranking" not in load_raw(path)
    with caplog.at_level(logging.WARNING, logger="genflow.config"):
        exporters = job_exporters(load_config(path))
    assert not caplog.records
    margin, per_prompt = {"code": (0.5, 3), "images": (0.0, 1)}.get(name, (0.0, 2))  # as their ranking had them
    assert exporters == {"preferences": {"min_margin": margin, "per_prompt": per_prompt}, "sft": {"min_score": None}}


# -- a scorer's own columns -------------------------------------------------------------

DECLARED = {"verdict": pa.string(), "tokens": pa.int32()}


def test_a_scorers_columns_follow_the_fixed_ones_and_may_not_take_their_names() -> None:
    assert scores_schema() is SCORES and scores_schema({}) is SCORES
    assert scores_schema(DECLARED).names == [*SCORES.names, "verdict", "tokens"]
    assert scores_schema(DECLARED).field("tokens").type == pa.int32()
    with pytest.raises(ValueError, match=r"scores/ already has the column\(s\) details, score"):
        scores_schema({"score": pa.int32(), "details": pa.string()})


def test_a_scores_columns_are_its_declared_values_and_null_where_it_gives_none() -> None:
    assert own_columns(Score(1.0, columns={"tokens": 7}), DECLARED, "judge") == {"verdict": None, "tokens": 7}
    assert own_columns(Score(1.0), {}, "judge") == {}
    undeclared = own_columns(Score(1.0, columns={"tokens": 1, "mood": "good"}), DECLARED, "judge")
    assert isinstance(undeclared, Failure)
    assert undeclared.error == ("scorer 'judge' gave the column(s) mood, which its extra_columns do not declare "
                                "(verdict, tokens)")
    wrong = own_columns(Score(1.0, columns={"tokens": "many"}), DECLARED, "judge")
    assert isinstance(wrong, Failure) and wrong.error.startswith("scorer 'judge': column 'tokens' (int32) cannot "
                                                                 "hold 'many'")
    too_big = own_columns(Score(1.0, columns={"tokens": 2**40}), DECLARED, "judge")
    assert isinstance(too_big, Failure) and "cannot hold 1099511627776" in too_big.error


def test_two_scorers_may_share_a_column_only_with_one_type(monkeypatch: pytest.MonkeyPatch) -> None:
    from genflow import hookimpl
    from genflow.api import Scorer
    from genflow.data.schemas import extra_score_columns
    from genflow.registry import registry_with

    class A(Scorer):
        extra_columns: ClassVar[dict[str, pa.DataType]] = {"verdict": pa.string(), "tokens": pa.int32()}

        def score(self, items: list[Any]) -> list[Any]:
            return []

    class B(A):
        extra_columns: ClassVar[dict[str, pa.DataType]] = {"tokens": pa.int32(), "why": pa.string()}

    class C(A):
        extra_columns: ClassVar[dict[str, pa.DataType]] = {"tokens": pa.int64()}

    class Family:
        @hookimpl
        def register_scorers(self, register: Any) -> None:
            for name, factory in (("a", A), ("b", B), ("c", C)):
                register(name, factory)

    registry = registry_with(Family())
    job = config(scorers=[{"plugin": "a"}, {"plugin": "b"}])
    assert list(extra_score_columns(build_config_unchecked(job), registry).items()) == [
        ("verdict", pa.string()), ("tokens", pa.int32()), ("why", pa.string())]
    with pytest.raises(ValueError, match="two scorers declare the scores/ column 'tokens', as int32 and int64"):
        extra_score_columns(build_config_unchecked(config(scorers=[{"plugin": "a"}, {"plugin": "c"}])), registry)
    # the job is refused before anything starts (exit 2), not at its first score stage
    from genflow.config import ConfigError
    from genflow.data.checks import check_job

    monkeypatch.setattr("genflow.registry.get_registry", lambda: registry)
    with pytest.raises(ConfigError, match="two scorers declare the scores/ column 'tokens', as int32 and int64"):
        check_job(build_config_unchecked(config(scorers=[{"plugin": "a"}, {"plugin": "c"}])))


def build_config_unchecked(data: dict[str, Any]) -> Any:
    from genflow.config import JobConfig

    return JobConfig.model_validate(data)


# -- the report's media columns -----------------------------------------------------------

def test_the_report_shows_the_columns_the_jobs_generators_call_media(tmp_path: Path) -> None:
    from genflow.data.storage import Storage
    from genflow.outputs.report.samples import media_columns, samples

    image_job = {"generators": [{"plugin": "hf-text"}, {"plugin": "diffusers-image"}, {"plugin": "not-installed"}]}
    assert media_columns(image_job) == ("image", "mask")
    assert media_columns({"generators": [{"plugin": "hf-text"}]}) == ()
    storage = Storage.open(str(tmp_path))
    storage.write_table("prompts/part-00000.parquet", pa.table({
        "prompt_id": ["p"], "prompt": ["a cat"], "image": [b"png"], "mask": [None], "notes": ["x"]}))
    storage.write_table("generations/part-00000-g.parquet", pa.table({
        "prompt_id": ["p"], "generation_id": ["g1"], "generator": ["g"], "sample": [0], "modality": ["image"],
        "prompt": ["a cat"], "text": pa.array([None], pa.string()), "image_path": ["images/p/g1.png"]}))
    assert samples(storage, [], ["p"], media_columns(image_job))[0]["inputs"] == {"image": b"png"}
    assert samples(storage, [], ["p"])[0]["inputs"] == {}


def test_a_secret_in_a_scorers_own_column_is_blanked_like_one_in_its_details() -> None:
    from genflow.data.results import scrub_result
    from genflow.secrets import Scrubber, Secret

    key = "sk-test-0123456789abcdefghij"
    scrubber = Scrubber([Secret(key, "$JUDGE_KEY")])
    clean = Score(1.0, {"why": "fine"}, columns={"verdict": "good", "tokens": 3})
    assert scrub_result(clean, scrubber) is clean
    echoed = scrub_result(Score(1.0, {"why": "fine"}, columns={"verdict": f"key {key}", "tokens": 3}), scrubber)
    assert key not in echoed.columns["verdict"] and echoed.columns["verdict"].startswith("key ")
    assert (echoed.value, echoed.details, echoed.columns["tokens"]) == (1.0, {"why": "fine"}, 3)

"""``llm-judge``: rubric ratings and pairwise rankings from a local tiny model, scripted stand-in judges
and ``transformers serve``; what the answers are read as, and what a job writes and reports."""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError
from support.jobs import text_job

from genflow.api import RowError, Score, ScoreItem
from genflow.plugins.judge.llm_judge import (
    JudgeParams,
    LLMJudge,
    LocalPairwiseJudge,
    LocalRatingJudge,
    Question,
    ServedPairwiseJudge,
    ServedRatingJudge,
    served_logprobs,
)
from genflow.plugins.judge.pairwise import bradley_terry, choose_pairs, expected_win_rates, pair_outcome, win_rates
from genflow.plugins.judge.rubrics import expected_rating, read_rating, read_verdict, template_columns

# -- reading answers ---------------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [
    ("The answer is right and clear.\nRating: 8", 8.0),
    ("Rating: **7**", 7.0),
    ('{"reasoning": "ok", "score": 4}', 4.0),
    ('```json\n{"score": 9, "reasoning": "great"}\n```', 9.0),
    ("Feedback: thorough. [RESULT] 3", 3.0),
    ("I would give it 6/10.", 6.0),
    ("7 out of 10", 7.0),
    ("5", 5.0),
    ("Score: 2.5", 2.5),
    ("Rating: 12\nRating: 9", 9.0),  # a number off the scale is no rating; the last one on it is
])
def test_a_rating_is_read_from_json_or_text(text: str, value: float) -> None:
    read = read_rating(text, 1, 10)
    assert read is not None and read[0] == value


@pytest.mark.parametrize("text", ["", "no idea", "Rating: 11", "ten", "The year 1999 was good", '{"score": 0}'])
def test_an_answer_without_a_rating_on_the_scale_is_unreadable(text: str) -> None:
    assert read_rating(text, 1, 10) is None


@pytest.mark.parametrize(("text", "verdict"), [
    ("B is more complete.\nVerdict: B", "B"), ("Verdict: tie", "tie"), ('{"winner": "A", "reasoning": "x"}', "A"),
    ("[[B]]", "B"), ("A", "A"), ("Response B.", "B"), ("Winner: Response A", "A"), ("[[C]]", "tie"),
])
def test_a_verdict_is_read_from_json_or_text(text: str, verdict: str) -> None:
    read = read_verdict(text)
    assert read is not None and read[0] == verdict


@pytest.mark.parametrize("text", ["", "both are fine", "Verdict: maybe"])
def test_an_answer_without_a_verdict_is_unreadable(text: str) -> None:
    assert read_verdict(text) is None


def test_the_expected_rating_weighs_the_ratings_by_their_probabilities() -> None:
    import math

    value, probabilities, mass = expected_rating({1: math.log(0.1), 2: math.log(0.1), 3: math.log(0.3)})
    assert value == pytest.approx((1 * 0.1 + 2 * 0.1 + 3 * 0.3) / 0.5)
    assert probabilities[3] == pytest.approx(0.6) and mass == pytest.approx(0.5)


def test_served_logprobs_are_read_where_the_rating_was_written() -> None:
    import math

    question = Question("g/quality", "rate it", False, 1, 5)
    content = [{"token": "Good", "logprob": -0.1, "top_logprobs": []},
               {"token": " Rating:", "logprob": -0.1, "top_logprobs": []},
               {"token": " 4", "logprob": math.log(0.6),
                "top_logprobs": [{"token": " 4", "logprob": math.log(0.6)}, {"token": "5", "logprob": math.log(0.3)},
                                 {"token": " the", "logprob": math.log(0.1)}]}]
    found = served_logprobs(question, {"content": content})
    assert found is not None
    assert found[" 4"] == pytest.approx(math.log(0.6)) and found[" 5"] == pytest.approx(math.log(0.3))
    assert found[" 1"] < math.log(0.3) - 10  # not listed: far below the listed ones
    assert served_logprobs(question, None) is None
    assert served_logprobs(question, {"content": [{"token": "no rating", "logprob": 0.0}]}) is None


# -- pairs and rankings ------------------------------------------------------------------

def test_orders_that_disagree_are_a_tie() -> None:
    assert pair_outcome("A", "B") == 1.0  # first wins as A, and as B
    assert pair_outcome("B", "A") == 0.0
    assert pair_outcome("A", "A") == 0.5  # the judge preferred position A both times
    assert pair_outcome("B", "B") == 0.5
    assert pair_outcome("tie", "tie") == 0.5
    assert pair_outcome("A", "tie") == 0.75


def test_pairs_are_all_pairs_within_the_budget_else_balanced_rounds() -> None:
    assert choose_pairs(4, 10) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    pairs = choose_pairs(6, 7)
    assert len(pairs) == 7 and len(set(pairs)) == 7
    assert pairs[:6] == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (0, 5)]  # the first round: one cycle through all
    assert choose_pairs(6, 7) == pairs  # the same on every run
    assert sorted(choose_pairs(6, 100)) == sorted(choose_pairs(6, 15))
    assert choose_pairs(1, 10) == [] and choose_pairs(5, 10) == choose_pairs(5, 50)


@pytest.mark.parametrize(("forward", "backward", "share"), [
    ("A", "B", 1.0), ("B", "A", 0.0), ("A", "A", 0.5), ("B", "B", 0.5), ("tie", "tie", 0.5),
    ("A", "tie", 0.75), ("tie", "B", 0.75), ("B", "tie", 0.25), ("tie", "A", 0.25),
])
def test_a_pairs_outcome_from_both_orders(forward: str, backward: str, share: float) -> None:
    assert pair_outcome(forward, backward) == share


def test_balanced_rounds_never_repeat_a_pair_and_stop_at_the_budget() -> None:
    assert choose_pairs(4, 5) == [(0, 1), (1, 2), (2, 3), (0, 3), (0, 2)]  # round 2 of an even n: half of it
    assert choose_pairs(4, 6) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]  # all of them fit
    for n, budget in ((6, 14), (7, 20), (8, 27), (5, 9)):
        pairs = choose_pairs(n, budget)
        assert len(pairs) == budget and len(set(pairs)) == budget and all(0 <= a < b < n for a, b in pairs)
    assert choose_pairs(0, 3) == [] and choose_pairs(2, 1) == [(0, 1)]


def test_bradley_terry_by_hand() -> None:
    # one game, won by 0, with a prior of half a game each way: wins 1.25 and 0.25 in 1.5 games, strengths
    # in the ratio of the wins (5) with geometric mean 1, so 0 beats 1 with chance 5/6
    strengths = bradley_terry(2, [(0, 1, 1.0)])
    assert strengths == pytest.approx([5 ** 0.5, 5 ** -0.5])
    assert bradley_terry(2, [(1, 0, 0.0)]) == pytest.approx(strengths)  # the same game, told the other way
    assert expected_win_rates(strengths) == pytest.approx([5 / 6, 1 / 6])
    assert bradley_terry(2, [(0, 1, 1.0)], prior=1.0) == pytest.approx([3 ** 0.5, 3 ** -0.5])  # 1.5 and 0.5
    unplayed = bradley_terry(3, [(0, 1, 0.75)])  # wins 1.0 and 0.5; candidate 2 played no game
    assert unplayed[0] / unplayed[1] == pytest.approx(2.0) and math.prod(unplayed) == pytest.approx(1.0)
    assert bradley_terry(0, []) == [] and expected_win_rates([2.0]) == [0.5]
    assert win_rates(3, [(0, 1, 0.75)]) == [0.75, 0.25, 0.5]


def test_bradley_terry_orders_by_wins_and_ties_give_equal_strengths() -> None:
    outcomes = [(0, 1, 1.0), (0, 2, 1.0), (1, 2, 1.0), (0, 3, 1.0), (1, 3, 1.0), (2, 3, 1.0)]
    strengths = bradley_terry(4, outcomes)
    assert strengths[0] > strengths[1] > strengths[2] > strengths[3] > 0
    rates = expected_win_rates(strengths)
    assert rates == sorted(rates, reverse=True) and all(0 < r < 1 for r in rates)
    assert win_rates(4, outcomes) == [1.0, 2 / 3, 1 / 3, 0.0]
    tied = bradley_terry(3, [(0, 1, 0.5), (1, 2, 0.5), (0, 2, 0.5)])
    assert tied == pytest.approx([1.0, 1.0, 1.0])
    assert expected_win_rates(tied) == pytest.approx([0.5, 0.5, 0.5])


# -- params and backends -----------------------------------------------------------------

def test_the_backend_follows_base_url_and_the_mode_picks_the_class() -> None:
    assert LLMJudge.implementation({}) is LocalRatingJudge
    assert LLMJudge.implementation({"mode": "pairwise"}) is LocalPairwiseJudge
    assert LLMJudge.implementation({"base_url": "http://127.0.0.1:1/v1"}) is ServedRatingJudge
    assert LLMJudge.implementation({"base_url": "http://127.0.0.1:1/v1", "mode": "pairwise"}) is ServedPairwiseJudge
    assert LocalPairwiseJudge.per_prompt and ServedPairwiseJudge.per_prompt and not LocalRatingJudge.per_prompt
    assert LocalRatingJudge.requires == ("torch", "transformers") and LocalRatingJudge.extra == "hf"
    assert ServedRatingJudge.requires == ("aiohttp",) and ServedRatingJudge.extra == "openai"
    assert LLMJudge.requires == ()  # listed as available with either extra


def test_a_template_reads_the_columns_it_names() -> None:
    template = "Topic {{ topic }} for {{ audience | default('all') }}: {{ prompt }} -> {{ response }}"
    assert template_columns(template) == ("audience", "topic")
    cls = LLMJudge.implementation({"template": template, "scale": [1, 5]})
    assert issubclass(cls, LocalRatingJudge) and cls.input_columns == ("reference", "audience", "topic")
    assert LLMJudge.implementation({"template": template, "scale": [1, 5]}) is cls  # one class per columns
    assert LLMJudge.implementation({"rubric": "prometheus"}).input_columns == ("reference",)


@pytest.mark.parametrize(("params", "message"), [
    ({"backend": "openai"}, "needs base_url"),
    ({"backend": "local", "base_url": "http://127.0.0.1:1/v1"}, "base_url is for backend openai"),
    ({"score_from": "json"}, "score_from json needs a server"),
    ({"rubric": "quality", "template": "{{ response }}"}, "not both"),
    ({"template": "{{ prompt }}"}, "must show response"),
    ({"mode": "pairwise", "template": "{{ response }}"}, "response_a and response_b"),
    ({"template": "{{ response }"}, "not valid Jinja"),
    ({"weights": {"helpfulness": 1.0}}, "ultrafeedback"),
    ({"rubric": "ultrafeedback", "weights": {"wit": 1.0}}, "unknown aspects"),
    ({"scale": [5, 1]}, "scale"),
    ({"base_url": "127.0.0.1:8000"}, "expected http"),
    ({"base_url": "http://127.0.0.1:1/v1", "api_key_env": "sk-live 123"}, "NAME of an environment variable"),
])
def test_bad_params_fail_validation(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        JudgeParams.model_validate(params)


@contextlib.contextmanager
def torch_reported_missing() -> Iterator[None]:
    """The dependency check reports torch missing, within the block only. The registry caches
    what it finds (``genflow.registry.get_registry``): one built meanwhile goes with the patch,
    or a later test in this process would be told that its hf plugins need torch."""
    import genflow.registry

    real = genflow.registry.missing_distributions
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(genflow.registry, "missing_distributions",
                          lambda names, found=None: tuple(n for n in names if n == "torch") or real(names, found))
            yield
    finally:
        genflow.registry.get_registry(refresh=True)  # once the patch is gone


def test_a_registry_built_while_torch_was_reported_missing_goes_with_the_patch() -> None:
    from genflow.registry import get_registry

    with torch_reported_missing():
        assert get_registry(refresh=True).get("generator", "hf-text").missing == ("torch",)  # what the patch says
    assert get_registry().get("generator", "hf-text").available


def test_a_job_names_the_extra_its_backend_needs() -> None:
    from genflow.config import ConfigError, JobConfig, validate_plugins

    job = JobConfig.model_validate({"name": "j", "input": "x.parquet", "output": "out",
                                    "scorers": [{"plugin": "llm-judge", "model": "m"}]})
    served = job.model_copy(update={"scorers": [job.scorers[0].model_copy(
        update={"params": {"base_url": "http://127.0.0.1:1/v1"}})]})
    with torch_reported_missing():
        with pytest.raises(ConfigError, match=re.escape("scorers.0.plugin: scorer plugin 'llm-judge' needs torch: "
                                                        "pip install 'genflow[hf]'")):
            validate_plugins(job)
        validate_plugins(served)  # a served judge needs no torch


# -- the local judge, called as a worker calls it -----------------------------------------

def _items(texts: dict[str, list[str]], **inputs: Any) -> list[ScoreItem]:
    return [ScoreItem(f"{pid}-{i}", pid, f"question {pid}?", "text", text, None, dict(inputs))
            for pid, candidates in texts.items() for i, text in enumerate(candidates)]


def test_the_local_judge_writes_judgements_again_and_then_gives_an_error_with_the_raw_text(tiny_models) -> None:
    params = JudgeParams.model_validate({"score_from": "text", "max_tokens": 6, "max_parse_retries": 1})
    judge = LocalRatingJudge(tiny_models["tiny-gpt2"], params)
    items = _items({"p": ["a short answer", "a longer answer than that"]})
    results = judge.score(items)
    again = judge.score(items)
    for result, rerun in zip(results, again, strict=True):
        # a tiny random model writes no rating: two samples, then the row's error holds the last one
        assert isinstance(result, RowError)
        assert "could not be read as a rating from 1 to 10 after 2 attempts; the answer: " in str(result)
        assert str(result) == str(rerun)  # the same samples on every run
        assert getattr(result, "raw", None) and str(result).endswith(result.raw)  # type: ignore[attr-defined]


def test_the_local_judge_reads_every_rubric_from_probabilities(tiny_models) -> None:
    items = _items({"p": ["Paris.", "It is Paris, the capital of France."]}, reference="Paris")
    for rubric, (low, high), aspects in (("quality", (1, 10), 1), ("ultrafeedback", (1, 5), 4),
                                         ("prometheus", (1, 5), 1)):
        judge = LocalRatingJudge(tiny_models["tiny-gpt2"], JudgeParams.model_validate({"rubric": rubric}))
        scores = judge.score(items)
        for score in scores:
            assert isinstance(score, Score) and low <= score.value <= high
            details = score.details
            assert details["score_from"] == "logprobs" and len(details["aspects"]) == aspects
            for aspect in details["aspects"].values():
                assert sum(aspect["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
                assert set(aspect["probabilities"]) == {str(r) for r in range(low, high + 1)}
            assert score.prompt_tokens and score.prompt_tokens > 0
        assert [s.value for s in judge.score(items)] == [s.value for s in scores]


# -- jobs --------------------------------------------------------------------------------

def _rows(out: Path, folder: str) -> list[dict[str, Any]]:
    return ds.dataset(str(out / folder)).to_table().to_pylist() if (out / folder).exists() else []


LOCAL_JUDGES = [
    {"plugin": "llm-judge", "label": "judge-quality", "params": {"reasoning_tokens": 6}},
    {"plugin": "llm-judge", "label": "judge-uf", "params": {"rubric": "ultrafeedback",
                                                          "weights": {"helpfulness": 2.0, "honesty": 1.0,
                                                                      "instruction_following": 1.0,
                                                                      "truthfulness": 1.0}}},
    {"plugin": "llm-judge", "label": "judge-prometheus", "params": {"rubric": "prometheus"}},
    {"plugin": "llm-judge", "label": "judge-pairs", "params": {"mode": "pairwise", "max_pairs": 2}},
]
RANGES = {"judge-quality": (1, 10), "judge-uf": (1, 5), "judge-prometheus": (1, 5), "judge-pairs": (0, 1)}


@pytest.mark.slow
def test_a_local_judge_job_gives_the_same_scores_twice_in_range_and_reports_them(tmp_path, job_runner,
                                                                                   tiny_models) -> None:
    judges = [{**j, "model": tiny_models["tiny-gpt2"]} for j in LOCAL_JUDGES]
    runs = []
    for run in ("first", "second"):
        config = text_job(tmp_path / run, tiny_models, scorers=[
            {"plugin": "hf-reward", "model": tiny_models["tiny-reward"]}, *judges])
        manifest = job_runner(config)
        runs.append((Path(config["output"]), manifest))
    (out, manifest), (out2, _) = runs
    scores = {(r["scorer"], r["generation_id"]): r for r in _rows(out, "scores")}
    again = {(r["scorer"], r["generation_id"]): r for r in _rows(out2, "scores")}
    assert set(scores) == set(again) and len(scores) == 16 * 3 * 5
    for key, row in scores.items():
        assert row["score"] == again[key]["score"]  # the same on every run
        if key[0] in RANGES:
            low, high = RANGES[key[0]]
            assert low <= row["score"] <= high, key
    assert not _rows(out, "errors")
    details = {k: json.loads(r["details"]) for k, r in scores.items()}
    quality = [d for (scorer, _), d in details.items() if scorer == "judge-quality"]
    # Each holds the rationale it was asked for; a tiny random model may write only whitespace now and then.
    assert all("reasoning" in d and d["aspects"]["quality"]["score_from"] == "logprobs" for d in quality)
    assert sum(bool(d["reasoning"]) for d in quality) >= len(quality) // 2
    uf_key = next(k for k in details if k[0] == "judge-uf")
    aspects = {name: a["score"] for name, a in details[uf_key]["aspects"].items()}
    assert set(aspects) == {"helpfulness", "honesty", "instruction_following", "truthfulness"}
    assert scores[uf_key]["score"] == pytest.approx((aspects["helpfulness"] + sum(aspects.values())) / 5)
    pairs = [d for (scorer, _), d in details.items() if scorer == "judge-pairs"]
    assert sum(len(d["pairs"]) for d in pairs) == 16 * 2 * 2  # max_pairs 2 of 3 candidates, each pair twice

    # Judge tokens are priced into the manifest per stage; the agreement of every pair of scorers.
    for label in RANGES:
        assert manifest["stages"][f"score/{label}"]["tokens"]["prompt"] > 0
    # Up to 6 rationale tokens per candidate: fewer where the judge ends its rationale (EOS) early.
    assert 16 * 3 * 3 <= manifest["stages"]["score/judge-quality"]["tokens"]["completion"] <= 16 * 3 * 6
    names = ["hf-reward", *RANGES]
    rows = {(r["a"], r["b"]): r for r in manifest["agreement"]["pairs"]}
    assert len(rows) == len(names) * (len(names) - 1) // 2 + len(names)
    for row in rows.values():
        assert row["prompts"] <= 16 and (row["kendall_tau"] is None or -1 <= row["kendall_tau"] <= 1)
    assert rows[("hf-reward", "judge-quality")]["prompts"] == 16
    assert manifest["metrics"]["judge-quality"] == {"candidates": 48, "read_from": {"logprobs": 48}, "retried": 0}
    assert set(manifest["metrics"]["judge-uf"]) >= {"helpfulness_mean", "truthfulness_mean"}

    page = (out / "report.html").read_text()
    assert 'alt="histogram of judge-quality scores"' in page and 'alt="histogram of judge-pairs scores"' in page
    assert "judge-quality judgements" in page and "judge-pairs judgements" in page
    # the sampled candidates show the judge's rating and rationale
    rationales = re.findall(r'<div class="outcome">judge-quality: (\d+\.\d\d) of 1-10: (.+?)</div>', page, re.S)
    assert len(rationales) >= 8 and all(1 <= float(v) <= 10 and text.strip() for v, text in rationales)
    assert '<section id="agreement">' in page and "Scorer agreement" in page
    section = page[page.index('<section id="agreement">'):]
    section = section[:section.index("</section>")]
    assert section.count("<tr>") == 1 + len(rows)
    assert "<td>hf-reward</td><td>judge-quality</td>" in section


def _responses_input(path: Path) -> Path:
    """Four prompts, four candidates each of distinct lengths, in no order of length; a topic column."""
    rows = []
    for p in range(4):
        lengths = [3, 9, 1, 6] if p % 2 else [7, 2, 10, 4]
        rows.append({"id": f"q{p}", "prompt": f"Describe thing {p}.", "topic": f"topic-{p}",
                     "responses": [f"answer{p} " + "word " * n for n in lengths]})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


_PAIR = re.compile(r"<response-A-(\w+)>\n(.*?)\n</response-A-\1>.*?<response-B-\1>\n(.*?)\n</response-B-\1>", re.S)


def _user(body: dict[str, Any]) -> str:
    return str(body["messages"][-1]["content"])


def prefers_a(path: str, body: dict[str, Any]) -> str:
    return "Both are fine, but the first reads better.\nVerdict: A"


def prefers_longer(path: str, body: dict[str, Any]) -> str:
    match = _PAIR.search(_user(body))
    assert match, _user(body)
    _, a, b = match.groups()
    return f"Response {'A' if len(a) > len(b) else 'B'} says more.\nVerdict: {'A' if len(a) > len(b) else 'B'}"


def rates_three(path: str, body: dict[str, Any]) -> str:
    return json.dumps({"reasoning": "adequate", "score": 3})


def _served(label: str, url: str, **params: Any) -> dict[str, Any]:
    return {"plugin": "llm-judge", "label": label, "model": "judge-model",
            "params": {"base_url": url, "max_tokens": 64, **params},
            "requests": {"concurrency": 8, "timeout_s": 10.0, "backoff_s": 0.02},
            "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}


@pytest.mark.slow
def test_scripted_served_judges_position_bias_cancels_and_length_ranks(tmp_path, job_runner,
                                                                       make_standin_server) -> None:
    biased, longer, rater = (make_standin_server(answer=a) for a in (prefers_a, prefers_longer, rates_three))
    source = _responses_input(tmp_path / "responses.parquet")
    config: dict[str, Any] = {
        "name": "judged", "input": str(source), "output": str(tmp_path / "out"), "shard_rows": 2,
        "scorers": [_served("biased", biased.url, mode="pairwise"),
                    _served("longer", longer.url, mode="pairwise"),
                    {**_served("rater", rater.url, template="Topic: {{ topic }}\n{{ prompt }}\n{{ response }}",
                               scale=[1, 5], score_from="json"), "weight": 0.0}],
        "ranking": {"pairs": {"min_margin": 0.0, "per_prompt": 2}, "best_of_n": True},
        "ray": {"workers": 1}}
    manifest = job_runner(config)
    out = Path(config["output"])
    assert not _rows(out, "errors")
    texts = {g["generation_id"]: g["text"] for g in _rows(out, "generations")}
    scores = _rows(out, "scores")

    # A judge that always answers "A": each pair's two orders disagree, every pair is a tie.
    biased_rows = [r for r in scores if r["scorer"] == "biased"]
    assert len(biased_rows) == 16 and {r["score"] for r in biased_rows} == {0.5}
    for row in biased_rows:
        pairs = json.loads(row["details"])["pairs"]
        assert len(pairs) == 3 and all(p["verdicts"] == ["A", "A"] and p["result"] == "tie" for p in pairs)
    assert biased.received == 4 * 6 * 2  # every pair of 4 candidates, in both orders
    assert manifest["metrics"]["biased"]["position_consistency"] == 0.0

    # A judge that prefers the longer answer: its scores, the rankings and the pairs follow length.
    by_prompt: dict[str, list[tuple[float, str]]] = {}
    for row in scores:
        if row["scorer"] == "longer":
            by_prompt.setdefault(row["prompt_id"], []).append((row["score"], texts[row["generation_id"]]))
    for candidates in by_prompt.values():
        ranked = [t for _, t in sorted(candidates, reverse=True)]
        assert ranked == sorted(ranked, key=len, reverse=True)
        assert len({s for s, _ in candidates}) == 4
    for prompt_id in by_prompt:
        ranking = sorted((r for r in _rows(out, "rankings") if r["prompt_id"] == prompt_id), key=lambda r: r["rank"])
        lengths = [len(texts[r["generation_id"]]) for r in ranking]
        assert lengths == sorted(lengths, reverse=True)
    preferences = _rows(out, "preferences")
    assert len(preferences) == 4 * 2 and all(len(p["chosen"]) > len(p["rejected"]) for p in preferences)
    assert manifest["metrics"]["longer"]["position_consistency"] == 1.0

    # A user's template reads the row's columns; JSON answers are asked for with a schema.
    assert {r["score"] for r in scores if r["scorer"] == "rater"} == {3.0}
    assert rater.received == 16
    for request in rater.requests:
        assert re.search(r"Topic: topic-\d", _user(request.body))
        assert request.body["response_format"]["json_schema"]["schema"]["properties"]["score"]["maximum"] == 5

    # Judge tokens and their cost per stage; agreement: the biased judge ties everything, no tau.
    stage = manifest["stages"]["score/longer"]
    assert stage["tokens"]["prompt"] > 0 and stage["tokens"]["completion"] > 0 and stage["cost"] > 0
    rows = {(r["a"], r["b"]): r for r in manifest["agreement"]["pairs"]}
    assert rows[("biased", "longer")]["prompts"] == 0 and rows[("biased", "longer")]["kendall_tau"] is None
    assert rows[("longer", "combined")]["kendall_tau"] == 1.0 and rows[("longer", "combined")]["agreement"] == 1.0


@pytest.mark.slow
def test_a_judge_job_against_transformers_serve_completes_and_unreadable_answers_are_errors(
        tmp_path, job_runner, transformers_server) -> None:
    source = _responses_input(tmp_path / "responses.parquet")
    before = transformers_server.requests()
    config: dict[str, Any] = {
        "name": "served-judge", "input": str(source), "output": str(tmp_path / "out"), "shard_rows": 4,
        "scorers": [_served("judge", transformers_server.url, max_tokens=8, max_parse_retries=1, temperature=1.0)],
        "ranking": {"pairs": {"min_margin": 0.0, "per_prompt": 1}}, "ray": {"workers": 1},
        "max_error_fraction": 1.0}
    config["scorers"][0]["model"] = transformers_server.model
    manifest = job_runner(config)
    assert manifest["status"] == "completed"
    out = Path(config["output"])
    scores, errors = _rows(out, "scores"), _rows(out, "errors")
    assert len(scores) + len(errors) == 16 and errors  # a tiny random model rarely writes "Rating: N"
    assert all(1 <= s["score"] <= 10 for s in scores)
    for error in errors:
        assert error["stage"] == "score" and error["plugin"] == "llm-judge"
        assert "could not be read as a rating from 1 to 10 after 2 attempts; the answer: " in error["error"]
    attempts = sum(json.loads(s["details"])["aspects"]["quality"]["attempts"] for s in scores) + 2 * len(errors)
    assert transformers_server.requests() - before == attempts
    if scores:  # the engine counts the tokens of scored rows only (an errors/ row carries none)
        assert manifest["stages"]["score/judge"]["tokens"]["completion"] > 0

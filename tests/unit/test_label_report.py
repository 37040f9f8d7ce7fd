"""What people's labels show and guard, worked out by hand: the report's agreement tables,
Label Studio's redirects (the key goes to the same origin only) and the prompts where the
scorers disagree (fast)."""

from __future__ import annotations

import io
import urllib.parse
import urllib.request
from email.message import Message

import pytest

from genflow.api import ReportSection
from genflow.data.storage import Storage
from genflow.labelling.labels import LabellingError, disagreeing_prompts
from genflow.outputs.report.sections import human_sections
from genflow.plugins.labelling.label_studio import _origin, _Refused, _SameOriginRedirects


def test_the_report_shows_each_scorer_against_the_people_and_the_people_against_each_other() -> None:
    manifest = {"human_agreement": {
        "rankings": 12, "prompts": 5, "annotators": 3,
        "scorers": [{"scorer": "rm", "pairwise_accuracy": 0.75, "pairs": 8, "kendall_tau": 0.5, "prompts": 5},
                    {"scorer": "combined", "pairwise_accuracy": 0.8, "pairs": 10, "kendall_tau": 0.6, "prompts": 4}],
        "inter_annotator": {"prompts": 2, "annotator_pairs": 3, "kendall_tau": 0.4, "agreement": 0.7, "pairs": 9}}}
    scorers, people = human_sections(manifest)
    assert scorers == ReportSection(
        "Agreement with human rankings", ["scorer", "pairwise accuracy", "pairs", "Kendall τ", "prompts"],
        [["rm", 0.75, 8, 0.5, 5], ["combined", 0.8, 10, 0.6, 4]],
        "12 rankings of 5 prompts by 3 people. Pairwise accuracy: of the pairs people ordered that the scorer "
        "scores apart, the share it orders their way. Kendall τ: tau-b against the people's consensus (wins minus "
        "losses), averaged over prompts. combined is the weighted score the rankings use. Trust the scorer that "
        "agrees most.")
    assert people == ReportSection(
        "Inter-annotator agreement", ["prompts", "annotator pairs", "Kendall τ", "pairwise agreement", "pairs"],
        [[2, 3, 0.4, 0.7, 9]],
        "Prompts ranked by two people or more: how alike each two of them ordered the candidates. A scorer cannot "
        "be expected to agree with people better than they agree with each other.")
    del manifest["human_agreement"]["inter_annotator"]
    assert len(human_sections(manifest)) == 1


@pytest.mark.parametrize("found", [None, [], {"scorers": []}, {"rankings": 1}])
def test_no_human_agreement_no_tables(found: object) -> None:
    assert human_sections({"human_agreement": found}) == []


def _redirect(old: str, new: str) -> urllib.request.Request | None:
    request = urllib.request.Request(old, headers={"Authorization": "Token secret"})
    return _SameOriginRedirects().redirect_request(request, io.BytesIO(), 302, "Found", Message(), new)


def test_a_redirect_is_followed_to_the_same_origin_only() -> None:
    followed = _redirect("http://ls.local:8080/api/projects", "http://ls.local:8080/api/projects/?page=2")
    assert followed is not None and followed.full_url == "http://ls.local:8080/api/projects/?page=2"
    assert _redirect("https://LS.local/api", "https://ls.local:443/api/next") is not None
    for elsewhere, named in [("http://other.host:8080/api", "http://other.host:8080"),
                             ("http://ls.local:9090/api", "http://ls.local:9090"),
                             ("https://ls.local:8080/api", "https://ls.local:8080"),
                             ("http://ls.local/api", "http://ls.local")]:
        with pytest.raises(_Refused) as refused:
            _redirect("http://ls.local:8080/api/projects", elsewhere)
        assert refused.value.reason == named


def test_an_origin_is_its_scheme_host_and_port_with_the_schemes_default() -> None:
    split = urllib.parse.urlsplit
    assert _origin(split("http://LS.Local/x")) == ("http", "ls.local", 80)
    assert _origin(split("https://ls.local/x")) == ("https", "ls.local", 443)
    assert _origin(split("https://ls.local:8443/x")) == ("https", "ls.local", 8443)
    assert _origin(split("ftp://ls.local/x")) == ("ftp", "ls.local", None)
    assert _origin(split("file:///x")) == ("file", "", None)


def test_disagreeing_needs_two_scorers_and_names_what_the_job_has(tmp_path: object) -> None:
    storage = Storage.open(str(tmp_path))
    with pytest.raises(LabellingError) as one:
        disagreeing_prompts(storage, {"rm": 1.0})
    assert str(one.value) == "--disagreeing needs a job with two scorers or more; this one has 1 (rm)"
    with pytest.raises(LabellingError) as none:
        disagreeing_prompts(storage, {})
    assert str(none.value) == "--disagreeing needs a job with two scorers or more; this one has 0 (none)"


def test_an_answer_label_studio_should_not_have_given_is_described_by_its_shape_never_its_values() -> None:
    from genflow.plugins.labelling.label_studio import _shape

    keys = {f"k{i}": "secret value" for i in range(10, 0, -1)}
    assert _shape(keys) == "an object with k1, k10, k2, k3, k4, k5, k6, k7"
    assert _shape({}) == "an object with no keys"
    assert _shape({1: "x"}) == "an object with 1"
    assert _shape(["a"]) == "a list of something else"
    assert _shape(None) == "nothing"
    assert (_shape("text"), _shape(3)) == ("a str", "a int")


def test_disagreeing_compares_only_the_candidates_both_scorers_scored(tmp_path: object) -> None:
    """A candidate one scorer did not score (it failed there) is in no pair of theirs."""
    import pyarrow as pa

    storage = Storage.open(str(tmp_path))
    scores = {("p1", "a"): {"x": 2.0, "y": 2.0}, ("p1", "b"): {"x": 1.0, "y": 1.0}, ("p1", "c"): {"x": 0.0},
              ("p2", "a"): {"x": 2.0, "y": 1.0}, ("p2", "b"): {"x": 1.0, "y": 2.0}, ("p2", "c"): {"y": 9.0}}
    rows = [{"prompt_id": p, "generation_id": f"{p}-{g}", "scorer": s, "score": v}
            for (p, g), by in scores.items() for s, v in by.items()]
    storage.write_table("scores/part-00000.parquet", pa.Table.from_pylist(rows))
    assert disagreeing_prompts(storage, {"x": 1.0, "y": 1.0}) == {"p2"}

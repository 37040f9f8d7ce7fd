"""The report knows no plugin: scorers bring their own tables, a sweep charts whatever their metrics are."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from support.jobs import ROOT, run_genflow

import genflow
from genflow.api import ReportSection, Score, ScoreItem, Scorer
from genflow.config import StorageSpec
from genflow.data.storage import Storage
from genflow.outputs.report import build_report, build_sweep_report, metric_figures, rebuild

PACKAGE = ROOT / "genflow" / "outputs" / "report"
TEMPLATES = ROOT / "genflow" / "outputs" / "report" / "templates"


class Boxed(Scorer):
    """A scorer with tables of its own shape."""

    def score(self, items: list[ScoreItem]) -> list[Score]:  # pragma: no cover - never run here
        return [Score(0.0) for _ in items]

    @classmethod
    def report_sections(cls, name: str, metrics: dict[str, Any]) -> list[ReportSection]:
        return [ReportSection("Box office", ["scorer", "tickets", "verdict"],
                              [[name, metrics["tickets"], metrics["verdict"]]], "Counted at the door."),
                ReportSection("Summary", ["scorer", "share"], [[name, f"{metrics['share'] * 100:.1f}%"]])]


class Broken(Scorer):
    def score(self, items: list[ScoreItem]) -> list[Score]:  # pragma: no cover - never run here
        return []

    @classmethod
    def report_sections(cls, name: str, metrics: dict[str, Any]) -> list[ReportSection]:
        raise KeyError("tickets")


class NeedsNothingHere(Boxed):
    requires = ("genflow-test-no-such-distribution",)


class TablesPlugin:
    @genflow.hookimpl
    def register_scorers(self, register: Any) -> None:
        register("boxed", Boxed)
        register("broken-tables", Broken)
        register("boxed-unavailable", NeedsNothingHere)


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Any:
    import genflow.registry

    reg = genflow.registry.registry_with(TablesPlugin())
    monkeypatch.setattr(genflow.registry, "get_registry", lambda refresh=False: reg)
    return reg


def job_folder(path: Path, scorers: dict[str, str], metrics: dict[str, Any]) -> Storage:
    """A job's output holding only its manifest: ``scorers`` maps each scorer's name to its plugin."""
    manifest = {
        "name": "tables", "status": "completed", "created": "2024-01-01T00:00:00+00:00", "config_hash": "0" * 16,
        "output": str(path), "python": "3.11", "versions": {"genflow": "0"}, "timings_s": {"total": 1.0},
        "errors": {"rows": 0, "work_items": 0, "fraction": 0.0, "max_error_fraction": 0.1},
        "rows": {"prompts": 0, "generations": 0, "scores": 0, "rankings": 0, "errors": 0}, "stages": {},
        "config": {"name": "tables", "input": str(path / "in.parquet"), "output": str(path),
                   "scorers": [{"label": name, "plugin": plugin} for name, plugin in scorers.items()]},
        "plugins": {name: {"kind": "scorer", "plugin": plugin, "model": None, "version": "0"}
                    for name, plugin in scorers.items()},
        "metrics": metrics,
    }
    storage = Storage.open(str(path))
    storage.makedirs()
    storage.write_json("manifest.json", manifest)
    return storage


def sections(html: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="([\w-]+)">(.*?)</section>', html, flags=re.S))


def cells(fragment: str) -> list[list[str]]:
    import html as html_lib

    return [[html_lib.unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", fragment, flags=re.S)]


def test_a_scorers_own_tables_are_sections_of_the_page(tmp_path: Path, registry: Any) -> None:
    storage = job_folder(tmp_path, {"door": "boxed"},
                         {"door": {"tickets": 1234, "verdict": "<b>sold out</b>", "share": 0.625}})
    page = build_report(storage)
    found = sections(page)
    # Its tables follow the page's own sections; a title that one of them holds gets another id.
    assert list(found) == ["summary", "throughput", "errors", "box-office", "summary-2", "samples", "config"]
    assert cells(found["box-office"]) == [["scorer", "tickets", "verdict"], ["door", "1,234", "<b>sold out</b>"]]
    assert "&lt;b&gt;sold out&lt;/b&gt;" in found["box-office"] and "<b>" not in found["box-office"]
    assert '<td class="num">1,234</td>' in found["box-office"]  # figures are right-aligned
    assert "Counted at the door." in found["box-office"]
    assert cells(found["summary-2"]) == [["scorer", "share"], ["door", "62.5%"]]
    assert '<a href="#box-office">Box office</a>' in page and '<a href="#summary-2">Summary</a>' in page


def test_two_scorers_of_one_plugin_share_its_table(tmp_path: Path, registry: Any) -> None:
    storage = job_folder(tmp_path, {"front": "boxed", "back": "boxed"}, {
        "front": {"tickets": 1, "verdict": "ok", "share": 0.5}, "back": {"tickets": 2, "verdict": "ok", "share": 1}})
    found = sections(build_report(storage))
    assert cells(found["box-office"])[1:] == [["back", "2", "ok"], ["front", "1", "ok"]]  # manifest order: sorted


@pytest.mark.parametrize("plugin", ["not-installed-here", "boxed-unavailable", "broken-tables"])
def test_a_scorer_that_cannot_say_gets_the_generic_table(tmp_path: Path, registry: Any, plugin: str) -> None:
    """Not installed where the report is built, installed without its requirements, or failing: every number
    of its metrics in one row, and nothing else of them."""
    storage = job_folder(tmp_path, {"judge": plugin},
                         {"judge": {"accuracy": 0.75, "n": 4, "flag": True, "by_class": {"a": 1}, "note": "x"}})
    found = sections(build_report(storage))
    assert "judge-metrics" in found
    assert cells(found["judge-metrics"]) == [["scorer", "accuracy", "n"], ["judge", "0.750", "4"]]


def test_a_scorer_without_metrics_adds_no_section(tmp_path: Path, registry: Any) -> None:
    storage = job_folder(tmp_path, {"door": "boxed"}, {})
    assert list(sections(build_report(storage))) == ["summary", "throughput", "errors", "samples", "config"]


def test_the_report_holds_no_plugin_knowledge() -> None:
    sources = [*PACKAGE.glob("*.py"), *TEMPLATES.glob("*.j2")]
    assert len(sources) >= 8
    for path in sources:
        text = path.read_text()
        for word in ("pass@", "code-exec", "'passed'", '"passed"', "preferences", "sft"):
            assert word not in text, f"{path.relative_to(ROOT)} names {word!r}"


def test_every_number_of_the_scorers_metrics_is_a_figure() -> None:
    one = {"metrics": {"code": {"pass@10": 0.9, "pass@2": 0.5, "pass@1": 0.25, "prompts": 4, "samples": 40,
                                "outcomes": {"failed": 3}, "ok": True, "label": "x"}}}
    # One scorer with numbers: its own names, numbers in them in order; headline names take the scorer's prefix.
    assert list(metric_figures(one).items()) == [
        ("pass@1", 0.25), ("pass@2", 0.5), ("pass@10", 0.9), ("code.prompts", 4), ("samples", 40)]
    several = {"metrics": {"a": {"pass@1": 0.5}, "b": {"accuracy": 1.0}, "c": {}}}
    assert metric_figures(several) == {"a.pass@1": 0.5, "b.accuracy": 1.0}
    assert metric_figures({"metrics": {}}) == metric_figures({}) == {}


def sweep_table(figures: dict[str, list[Any]]) -> tuple[pa.Table, dict[str, Any]]:
    runs = len(next(iter(figures.values())))
    meta = {"name": "s", "output": "/tmp/s", "columns": {"generators.0.params.temperature": "temperature"}}
    table = pa.table({"run": [f"temperature=0.{i}" for i in range(runs)],
                      "temperature": [i / 10 for i in range(runs)], "status": ["completed"] * runs,
                      "folder": [None] * runs, "score_mean": [0.1 * i for i in range(runs)], **figures})
    return table, meta


def test_a_sweep_charts_every_scorer_figure_that_differs_between_runs() -> None:
    table, meta = sweep_table({"pass@1": [0.2, 0.4, 0.3], "judge.accuracy": [0.5, 0.5, 0.5],
                               "rubric_hits": [1, 3, 2], "code.prompts": [4, 4, 4]})
    page = build_sweep_report(table, meta)
    charted = re.findall(r'alt="([^"]+) per run"', page)
    assert charted == ["score_mean", "pass@1", "rubric_hits"]  # the same in every run: a column, no chart
    header = cells(sections(page)["runs"])[0]  # every scorer figure is a column, after the mean score
    assert header[header.index("mean score"):] == [
        "mean score", "pass@1", "judge.accuracy", "rubric_hits", "code.prompts"]


def test_rebuild_reads_every_run_of_a_sweep_with_the_storage_settings_given(
        tmp_path: Path, registry: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.parquet as pq

    for run in ("t=0.1", "t=0.2"):
        job_folder(tmp_path / run, {"door": "boxed"}, {"door": {"tickets": 1, "verdict": "ok", "share": 1.0}})
    table, meta = sweep_table({"pass@1": [0.1, 0.2]})
    table = table.set_column(0, "run", pa.array(["t=0.1", "t=0.2"])).replace_schema_metadata(
        {"genflow.sweep": json.dumps(meta)})
    pq.write_table(table, tmp_path / "sweep.parquet")
    opened: list[tuple[str, dict[str, Any]]] = []
    real_open = Storage.open.__func__  # type: ignore[attr-defined]

    def recording_open(cls: type[Storage], uri: str, **settings: Any) -> Storage:
        opened.append((uri, settings))
        return real_open(cls, uri, **settings)

    monkeypatch.setattr(Storage, "open", classmethod(recording_open))
    spec = StorageSpec(endpoint_url="http://127.0.0.1:9", region="eu-west-3", anonymous=True)
    written = rebuild(str(tmp_path), spec)
    assert written == [str(tmp_path / "sweep.html"), str(tmp_path / "t=0.1/report.html"),
                       str(tmp_path / "t=0.2/report.html")]
    assert [uri for uri, _ in opened] == [str(tmp_path), f"{tmp_path}/t=0.1", f"{tmp_path}/t=0.2"]
    assert all(settings == spec.model_dump() for _, settings in opened)


@pytest.mark.cli
def test_genflow_report_takes_the_jobs_storage_options(tmp_path: Path) -> None:
    job_folder(tmp_path, {"door": "not-installed-here"}, {"door": {"tickets": 3}})
    result = run_genflow("report", str(tmp_path), "--region", "eu-west-3", "--anonymous",
                         "--endpoint-url", "http://127.0.0.1:9")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "report.html")
    assert cells(sections((tmp_path / "report.html").read_text())["door-metrics"]) == [
        ["scorer", "tickets"], ["door", "3"]]

"""A third-party plugin distribution, installed with pip, drives a job with no change to genflow.

``tests/data/third_party_plugin`` is such a distribution (``genflow-rubric``): a scorer
that reads an input column genflow knows nothing of (``rubric``) and writes a column of
its own to ``scores/`` (``rubric_hits``), an exporter that writes a folder of its own
(``graded/``) and turns people's rankings into rows of its own, a labeller that is two
JSON files, and a tool episodes may call (``search-corpus``, run in tests/plugins/test_tools.py).
The test installs it into a folder of its own, puts that folder on ``PYTHONPATH`` (the
driver and the Ray workers both import it) and runs ``genflow run``, ``genflow label push``
and ``genflow label pull`` as a user does.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from support.jobs import ROOT, run_genflow

DISTRIBUTION = ROOT / "tests/data/third_party_plugin"
DIST_NAME, DIST_VERSION = "genflow-rubric", "0.4.0"

# The echo generator writes " " + the prompt reversed + one "!" per sample index; each rubric
# is matched against that, case-insensitively. (prompt id, sample) -> the share of items found.
PROMPTS = [
    {"id": "p1", "prompt": "red green", "rubric": "neerg;der;!"},  # " neerg der", " neerg der!"
    {"id": "p2", "prompt": "blue sky", "rubric": "YKS;eulb"},
    {"id": "p3", "prompt": "no match", "rubric": "zebra;!"},
    {"id": "p4", "prompt": "abc", "rubric": "cba;x;y"},
]
EXPECTED = {("p1", 0): 2 / 3, ("p1", 1): 1.0, ("p2", 0): 1.0, ("p2", 1): 1.0,
            ("p3", 0): 0.0, ("p3", 1): 0.5, ("p4", 0): 1 / 3, ("p4", 1): 1 / 3}
GRADES = {"p1": (1.0, "pass"), "p2": (1.0, "pass"), "p3": (0.5, "pass"), "p4": (1 / 3, "fail")}


@pytest.fixture(scope="module")
def rubric_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``genflow-rubric`` installed by pip into a folder of its own (from a copy: pip builds in the source tree)."""
    work = tmp_path_factory.mktemp("rubric")
    source, site = work / "source", work / "site"
    shutil.copytree(DISTRIBUTION, source)
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                             "--no-index", "--disable-pip-version-check", "--quiet", "--target", str(site),
                             str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (site / "genflow_rubric.py").is_file()
    entry_points = next(site.glob("genflow_rubric-*.dist-info")) / "entry_points.txt"
    assert "[genflow]" in entry_points.read_text()
    return site


@pytest.fixture(scope="module")
def env(rubric_site: Path, test_plugins_site: Path) -> dict[str, str]:
    """A ``genflow`` subprocess's environment: the rubric distribution and the tests' echo generator."""
    from support import plugins_for_tests

    return {"PYTHONPATH": f"{rubric_site}:{plugins_for_tests.pythonpath(test_plugins_site)}", "COLUMNS": "200"}


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Path:
    tmp = tmp_path_factory.mktemp("rubric-job")
    pq.write_table(pa.Table.from_pylist(PROMPTS), tmp / "prompts.parquet")
    config = tmp / "job.yaml"
    config.write_text(textwrap.dedent(f"""
        name: rubric
        input: {tmp / "prompts.parquet"}
        output: {tmp / "out"}
        shard_rows: 2
        generators:
          - {{label: echo, plugin: echo, samples: 2}}
        scorers:
          - {{plugin: rubric}}
          - {{plugin: length, weight: 0.0}}   # a scorer without columns of its own beside it
        ray: {{workers: 1, batch_size: 4}}
    """))
    result = run_genflow("run", str(config), env=env, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return tmp / "out"


@pytest.mark.slow
def test_the_scorer_reads_its_own_column_and_nothing_else(job: Path) -> None:
    gens = {g["generation_id"]: g for g in ds.dataset(job / "generations").to_table().to_pylist()}
    scores = [s for s in ds.dataset(job / "scores").to_table().to_pylist() if s["scorer"] == "rubric"]
    assert len(scores) == len(gens) == len(EXPECTED)
    got = {}
    for s in scores:
        g = gens[s["generation_id"]]
        assert s["scorer"] == "rubric" and s["prompt_id"] == g["prompt_id"]
        got[(g["prompt_id"], g["sample"])] = s["score"]
        details = json.loads(s["details"])
        assert details["inputs"] == ["rubric"]  # handed exactly the column it declared
        items = len(next(p for p in PROMPTS if p["id"] == g["prompt_id"])["rubric"].split(";"))
        assert details["outcome"] == f"{len(details['hits'])}/{items} rubric items"
    assert got == EXPECTED
    assert not (job / "errors").exists() or not list((job / "errors").glob("*.parquet"))


@pytest.mark.slow
def test_the_exporter_writes_its_own_folder(job: Path) -> None:
    graded = ds.dataset(job / "graded").to_table()
    assert graded.column_names == ["prompt_id", "generation_id", "answer", "score", "grade"]
    rows = {r["prompt_id"]: r for r in graded.to_pylist()}
    assert {pid: (r["score"], r["grade"]) for pid, r in rows.items()} == GRADES
    best = {r["prompt_id"]: r["generation_id"] for r in ds.dataset(job / "rankings").to_table().to_pylist()
            if r["rank"] == 1}
    gens = {g["generation_id"]: g["text"] for g in ds.dataset(job / "generations").to_table().to_pylist()}
    for pid, r in rows.items():
        assert r["generation_id"] == best[pid] and r["answer"] == gens[best[pid]]
    assert sorted(p.name for p in (job / "graded").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    # The default exporters still ran beside it.
    assert pq.read_table(job / "sft").num_rows == 4


@pytest.mark.slow
def test_the_manifest_and_the_report_record_both(job: Path) -> None:
    manifest = json.loads((job / "manifest.json").read_text())
    scorer = manifest["plugins"]["rubric"]
    assert (scorer["kind"], scorer["plugin"], scorer["source"], scorer["version"]) == (
        "scorer", "rubric", DIST_NAME, DIST_VERSION)
    assert manifest["rows"]["graded"] == 4 and manifest["rows"]["scores"] == 16
    assert manifest["metrics"]["rubric"] == {"coverage": pytest.approx(sum(EXPECTED.values()) / 8),
                                             "complete": 3, "candidates": 8}
    page = (job / "report.html").read_text()
    found = dict(re.findall(r'<section id="([\w-]+)">(.*?)</section>', page, flags=re.S))
    text = {k: re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", v)) for k, v in found.items()}
    coverage = f"{sum(EXPECTED.values()) / 8 * 100:.1f}%"
    assert re.search(rf"rubric {re.escape(coverage)} 3 8", text["rubric-coverage"]), text["rubric-coverage"]
    assert re.search(r"graded 4", text["summary"], flags=re.I)
    assert "rubric: 3/3 rubric items" in text["samples"]  # the scorer's verdict beside its candidate


@pytest.mark.slow
def test_genflow_plugins_lists_both_with_their_distribution(env: dict[str, str]) -> None:
    result = run_genflow("plugins", env=env)
    assert result.returncode == 0, result.stderr
    rows = [[c.strip() for c in re.split(r"[│|┃]", line)] for line in result.stdout.splitlines()]
    listed = {(r[1], r[2]): r for r in rows if len(r) > 5}
    for kind, name in (("scorer", "rubric"), ("exporter", "graded"), ("labeller", "inbox"), ("tool", "search-corpus")):
        row: list[Any] = listed[(name, kind)]
        assert DIST_NAME in row and DIST_VERSION in row, row
    assert DIST_NAME not in result.stderr  # it loaded cleanly


@pytest.mark.slow
def test_the_scorer_writes_a_typed_column_of_its_own_to_scores(job: Path) -> None:
    from genflow.data.schemas import SCORES

    parts = sorted((job / "scores").glob("*.parquet"))
    assert len(parts) == 4  # 2 shards x 2 scorers
    for part in parts:  # every part of the folder has one schema: the fixed columns, then the scorers' own
        assert pq.read_schema(part).remove_metadata() == pa.schema([*SCORES, ("rubric_hits", pa.int32())]), part
    rows = ds.dataset(job / "scores").to_table().to_pylist()
    gens = {g["generation_id"]: g for g in ds.dataset(job / "generations").to_table().to_pylist()}
    hits = {(gens[r["generation_id"]]["prompt_id"], gens[r["generation_id"]]["sample"]): r["rubric_hits"]
            for r in rows if r["scorer"] == "rubric"}
    items = {p["id"]: len(p["rubric"].split(";")) for p in PROMPTS}
    assert hits == {key: round(share * items[key[0]]) for key, share in EXPECTED.items()}
    assert all(len(json.loads(r["details"])["hits"]) == r["rubric_hits"] for r in rows if r["scorer"] == "rubric")
    assert [r["rubric_hits"] for r in rows if r["scorer"] == "length"] == [None] * 8


@pytest.mark.slow
def test_the_exporter_turns_peoples_rankings_into_rows_of_its_own(job: Path, env: dict[str, str],
                                                                   tmp_path: Path) -> None:
    out, inbox = tmp_path / "out", tmp_path / "inbox"
    shutil.copytree(job, out)
    model_rows = [r for part in sorted((out / "graded").glob("*.parquet")) for r in pq.read_table(part).to_pylist()]
    tool = ("--tool", "inbox", "--param", f"folder={inbox}")
    pushed = run_genflow("label", "push", str(out), *tool, env=env)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    assert "4 tasks added" in pushed.stdout
    tasks = json.loads(next(inbox.glob("*.tasks.json")).read_text())
    by_prompt = {t["prompt_id"]: (key, t["candidates"]) for key, t in tasks.items()}
    gens = {g["generation_id"]: g for g in ds.dataset(out / "generations").to_table().to_pylist()}

    def order(prompt_id: str, *samples: int) -> list[str]:
        ids = {gens[g]["sample"]: g for g in by_prompt[prompt_id][1]}
        return [ids[s] for s in samples]

    # p1: two people put sample 1 first, one sample 0; p2: one ranking, sample 0 first. p3, p4: not labelled.
    said = [("p1", "ada", (1, 0)), ("p1", "bo", (1, 0)), ("p1", "cy", (0, 1)), ("p2", "ada", (0, 1))]
    annotations = [{"key": by_prompt[p][0], "prompt_id": p, "annotator": who, "created_at": "2026-12-06",
                    "id": str(i), "ranking": order(p, *samples)} for i, (p, who, samples) in enumerate(said)]
    (inbox / next(inbox.glob("*.tasks.json")).name.replace(".tasks.", ".annotations.")).write_text(
        json.dumps(annotations))
    pulled = run_genflow("label", "pull", str(out), *tool, env=env)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr

    human = pq.read_table(out / "graded" / "part-human.parquet").to_pylist()
    assert [(r["prompt_id"], gens[r["generation_id"]]["sample"], r["score"], r["grade"]) for r in human] == [
        ("p1", 1, pytest.approx(2 / 3), "human"), ("p2", 0, 1.0, "human")]
    assert all(r["answer"] == gens[r["generation_id"]]["text"] for r in human)
    shards = [r for part in sorted((out / "graded").glob("part-0*.parquet")) for r in pq.read_table(part).to_pylist()]
    assert shards == model_rows  # the rows the exporter made of the scores are left as they were
    # The built-in exporters made their own rows of the same rankings, beside the third party's.
    pairs = pq.read_table(out / "preferences" / "part-human.parquet").to_pylist()
    assert {(r["prompt_id"], gens[r["chosen_id"]]["sample"], r["source"]) for r in pairs} == {
        ("p1", 1, "human"), ("p2", 0, "human")}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["labelling"]["rows"] == {"human_rankings": 8, "demonstrations": 0, "graded": 2,
                                             "preferences": 2, "sft": 0}
    assert manifest["rows"]["graded"] == 6
    assert "graded: 2 human rows" in pulled.stdout

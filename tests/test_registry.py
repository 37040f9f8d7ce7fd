"""Plugin discovery: built-ins, a third-party distribution, a broken one, GENFLOW_PLUGINS."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from conftest import ROOT, run_genflow

from genflow.registry import get_registry

BUILT_INS = {("generator", "hf-text"), ("generator", "hf-code"), ("generator", "diffusers-image"),
             ("scorer", "hf-reward"), ("scorer", "embedding-sim"), ("scorer", "clip-score"),
             ("scorer", "code-exec"), ("exporter", "preferences"), ("exporter", "sft")}

ACME = '''
"""A third-party genflow plugin, installed as the distribution acme-genflow."""
import genflow
from genflow.api import Generation, Generator, PluginParams, Score, Scorer


class ShoutParams(PluginParams):
    suffix: str = "!"


class Shout(Generator):
    """Upper-cases the prompt."""
    modality = "text"
    Params = ShoutParams

    def generate(self, requests):
        return [Generation(text=" " + r.prompt.upper() + self.params.suffix * (r.sample + 1),
                           num_tokens=1, finish_reason="stop") for r in requests]


class Length(Scorer):
    """Longer is better."""
    def score(self, items):
        return [Score(float(len(i.text or "")), {"chars": len(i.text or "")}) for i in items]


@genflow.hookimpl
def register_generators(register):
    register("shout", Shout)


@genflow.hookimpl
def register_scorers(register):
    register("length", Length)
'''


def _dist(site: Path, name: str, version: str, entry: str) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[genflow]\n{entry}\n")


@pytest.fixture
def third_party_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A site folder holding an installed third-party plugin and a broken one."""
    site = tmp_path / "site"
    (site / "acme_genflow").mkdir(parents=True)
    (site / "acme_genflow" / "__init__.py").write_text(textwrap.dedent(ACME))
    _dist(site, "acme-genflow", "1.2.3", "acme = acme_genflow")
    (site / "broken_genflow.py").write_text("raise ImportError('needs libfoo, which is not installed')\n")
    _dist(site, "broken-genflow", "0.1.0", "broken = broken_genflow")
    monkeypatch.syspath_prepend(str(site))
    get_registry(refresh=True)
    yield site
    monkeypatch.undo()
    sys.modules.pop("acme_genflow", None)
    get_registry(refresh=True)


def test_built_in_plugins_load_through_entry_points() -> None:
    registry = get_registry(refresh=True)
    found = {(p.kind, p.name): p for p in registry.all()}
    assert set(found) >= BUILT_INS
    assert found[("generator", "hf-text")].source == "built-in"
    assert found[("generator", "hf-text")].modality == "text"
    assert found[("generator", "diffusers-image")].modality == "image"
    assert not registry.broken


def test_third_party_plugin_is_listed_and_a_broken_one_is_named(third_party_site: Path) -> None:
    registry = get_registry()
    shout = registry.get("generator", "shout")
    assert (shout.source, shout.version) == ("acme-genflow", "1.2.3")
    assert registry.get("scorer", "length").source == "acme-genflow"
    # The broken distribution is reported by name; everything else still loads.
    assert list(registry.broken) == ["broken-genflow:broken"]
    assert "needs libfoo" in registry.broken["broken-genflow:broken"]
    assert {(p.kind, p.name) for p in registry.all()} >= BUILT_INS


def test_genflow_plugins_limits_what_loads(third_party_site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENFLOW_PLUGINS", "acme,text")
    registry = get_registry(refresh=True)
    names = {p.name for p in registry.all()}
    assert names == {"shout", "length", "hf-text"}
    assert not registry.broken  # the broken plugin was not asked for
    monkeypatch.delenv("GENFLOW_PLUGINS")
    get_registry(refresh=True)


def test_unknown_plugin_error_names_the_installed_ones_and_broken_ones(third_party_site: Path) -> None:
    from genflow.registry import PluginError

    with pytest.raises(PluginError, match=r"unknown generator plugin 'nope'.*hf-text.*\n.*broken-genflow"):
        get_registry().get("generator", "nope")


def test_misspelt_hook_fails_loudly() -> None:
    import genflow
    from genflow.registry import registry_with

    class Typo:
        @genflow.hookimpl
        def register_generator(self, register: object) -> None:
            pass

    with pytest.raises(Exception, match="register_generator"):
        registry_with(Typo())


def test_plugins_command_lists_third_party_and_broken(third_party_site: Path) -> None:
    result = run_genflow("plugins", env={"PYTHONPATH": str(third_party_site), "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "shout" in result.stdout and "acme-genflow" in result.stdout and "1.2.3" in result.stdout
    assert "broken-genflow" in result.stderr and "needs libfoo" in result.stderr


@pytest.mark.slow
def test_job_runs_with_a_third_party_plugin(third_party_site: Path, tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    out = tmp_path / "out"
    config.write_text(textwrap.dedent(f"""
        name: acme
        input: {ROOT / "configs/data/quickstart_prompts.parquet"}
        output: {out}
        shard_rows: 10
        generators:
          - {{label: shout, plugin: shout, samples: 2, params: {{suffix: "?"}}}}
        scorers:
          - {{plugin: length}}
        ray: {{workers: 1, batch_size: 4}}
    """))
    result = run_genflow("run", str(config), env={"PYTHONPATH": str(third_party_site)})
    assert result.returncode == 0, result.stdout + result.stderr
    gens = ds.dataset(out / "generations").to_table().to_pylist()
    assert len(gens) == 32
    first = next(g for g in gens if g["prompt_id"] == "q001" and g["sample"] == 1)
    assert first["text"] == " EXPLAIN WHY THE SKY IS BLUE.??"
    sft = {r["prompt_id"]: r for r in ds.dataset(out / "sft").to_table().to_pylist()}
    assert sft["q001"]["completion"] == " EXPLAIN WHY THE SKY IS BLUE.??"  # the longer sample wins

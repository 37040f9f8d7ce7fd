"""Plugin discovery: built-ins, a third-party distribution, a broken one, GENFLOW_PLUGINS."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from support.jobs import ROOT, run_genflow

import genflow
from genflow.api import Generator
from genflow.plugins.text.generator import HFTextParams
from genflow.registry import get_registry, plugin_options, registry_with

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


@pytest.mark.cli
def test_plugins_command_lists_third_party_and_broken(third_party_site: Path) -> None:
    result = run_genflow("plugins", env={"PYTHONPATH": str(third_party_site), "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "shout" in result.stdout and "acme-genflow" in result.stdout and "1.2.3" in result.stdout
    assert "broken-genflow" in result.stderr and "needs libfoo" in result.stderr


@pytest.mark.cli
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


# --- what a plugin declares: requirements, extras, options ------------------------------------------


class NeedsLibfoo(Generator):
    """Needs a distribution nobody has."""

    requires = ("genflow-test-no-such-distribution", "pluggy")
    extra = "libfoo"

    def generate(self, requests):  # pragma: no cover - never constructed
        return []


class NeedsLibfooPlugin:
    @genflow.hookimpl
    def register_generators(self, register: object) -> None:
        register("needs-libfoo", NeedsLibfoo)  # type: ignore[operator]


def test_a_plugin_with_missing_requirements_is_unavailable_with_its_pip_command() -> None:
    registry = registry_with(NeedsLibfooPlugin())
    info = registry.get("generator", "needs-libfoo")
    assert not info.available
    assert info.missing == ("genflow-test-no-such-distribution",)  # pluggy is installed
    assert info.unavailable_reason() == ("generator plugin 'needs-libfoo' needs genflow-test-no-such-distribution: "
                                         "pip install genflow-test-no-such-distribution")  # no distribution of its own
    # The extra is genflow's for a built-in, else that of the distribution the plugin comes from.
    assert replace(info, source="built-in", version="0.1.0").install_hint == "pip install 'genflow[libfoo]'"
    assert replace(info, source="acme-genflow", version="1.2.3").install_hint == "pip install 'acme-genflow[libfoo]'"
    assert registry.get("generator", "hf-text").available  # this environment has every extra
    assert registry.get("generator", "hf-text").install_hint == ""


def test_a_job_naming_an_unavailable_plugin_fails_validation_with_the_command(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from genflow import config as config_module

    registry = registry_with(NeedsLibfooPlugin())
    monkeypatch.setattr("genflow.registry.get_registry", lambda refresh=False: registry)
    job = config_module.JobConfig.model_validate({
        "name": "x", "input": "in.parquet", "output": "out",
        "generators": [{"label": "g", "plugin": "needs-libfoo", "params": {"anything": 1}}]})
    with pytest.raises(config_module.ConfigError) as caught:
        config_module.validate_plugins(job)
    assert ("generators.0.plugin: generator plugin 'needs-libfoo' needs genflow-test-no-such-distribution: "
            "pip install genflow-test-no-such-distribution") in str(caught.value)
    assert "anything" not in str(caught.value)  # its params are not checked: its Params may need what is missing


def test_built_in_plugins_declare_what_they_read_and_need() -> None:
    found = {p.name: p.factory for p in get_registry(refresh=True).all()}
    assert found["code-exec"].input_columns == ("tests", "test", "entry_point")
    assert found["embedding-sim"].input_columns == ("reference",)
    assert found["diffusers-image"].path_columns == ("image", "mask")
    assert found["hf-text"].input_columns == ()
    extras = {"hf-text": "hf", "hf-code": "hf", "hf-reward": "hf", "embedding-sim": "hf",
              "diffusers-image": "image", "clip-score": "image", "code-exec": "code",
              "preferences": None, "sft": None}
    assert {name: found[name].extra for name in extras} == extras
    for name, factory in found.items():
        assert set(factory.path_columns) <= set(factory.input_columns), name


def test_every_built_in_option_is_described() -> None:
    for info in get_registry(refresh=True).all():
        if info.source != "built-in":
            continue
        for option in plugin_options(info.factory.Params):
            assert option.description, f"{info.name}: params.{option.name} has no Field(description=...)"


def test_options_come_from_the_params_schema() -> None:
    from genflow.plugins.code.execution import CodeExecParams

    options = {o.name: o for o in plugin_options(CodeExecParams)}
    assert list(options)[:2] == ["timeout_s", "memory_mb"]  # the model's order
    assert (options["timeout_s"].type, options["timeout_s"].default) == ("number > 0", "5.0")
    assert options["k"].default == "[1, 5, 10]"  # a default_factory's value
    assert options["isolation"].type == "auto | bwrap | unshare | rlimits"
    assert options["workers"].type == "integer >= 1 | null"


@pytest.mark.cli
def test_plugins_params_prints_a_plugins_options() -> None:
    result = run_genflow("plugins", "--params", "hf-text", env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    rows = {line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[2:-1]]
            for line in result.stdout.splitlines() if line.startswith("│")}
    assert rows["max_new_tokens"] == ["integer >= 1", "32", "Tokens to generate at most per candidate."]
    assert rows["temperature"][:2] == ["number >= 0.0", "1.0"] and "greedy" in rows["temperature"][2]
    assert rows["stop"][:2] == ["list of string", "[]"]
    assert set(rows) == set(HFTextParams.model_fields)


@pytest.mark.cli
def test_plugins_params_of_an_unknown_plugin_names_the_installed_ones() -> None:
    result = run_genflow("plugins", "--params", "hf-txet")
    assert result.returncode == 2
    assert "no plugin called 'hf-txet'" in result.stderr and "hf-text" in result.stderr

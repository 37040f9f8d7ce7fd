"""``genflow label push/pull`` and the refresh of human rows, through labelling and exporter
plugins written here (a registry of a few plugins in place of the installed ones): which projects
of which kinds a pull reads, what it writes and remembers, which exporters a job's human rows
go to and what each is handed, and the messages a person gets. Fast: no Ray, no Prefect, no
labelling tool."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import pytest

from genflow.api import Annotation, Exporter, HumanLabels, Labeller, LabelTask, PluginParams, PushResult
from genflow.data import layout
from genflow.data.storage import Storage
from genflow.labelling import labels
from genflow.labelling.labels import LabellingError
from genflow.plugins.training_data.exporters import BestOfN, PreferencePairs
from genflow.registry import PluginInfo

CANDIDATES = {"p1": ("a", "b", "c"), "p2": ("a", "b"), "p3": ("a", "b"), "p4": ("a", "b"), "p5": ("a",)}


def _job(out: Path, config: dict[str, Any] | None = None, manifest: dict[str, Any] | None = None) -> Storage:
    """A finished job of five prompts (p5 has one candidate) ranked by one scorer, "len"."""
    storage = Storage.open(str(out))
    storage.write_table("prompts/part-00000.parquet", pa.table({
        "prompt_id": list(CANDIDATES), "prompt": [f"prompt {p}" for p in CANDIDATES]}))
    gens = [{"prompt_id": p, "generation_id": f"{p}-{c}", "prompt": f"prompt {p}", "modality": "text",
             "text": f"answer {c}", "image_path": None, "extra": "not for exporters"}
            for p, cs in CANDIDATES.items() for c in cs]
    storage.write_table("generations/part-00000-gen.parquet", pa.Table.from_pylist(gens))
    storage.write_table("scores/part-00000-len.parquet", pa.Table.from_pylist([
        {"prompt_id": g["prompt_id"], "generation_id": g["generation_id"], "scorer": "len",
         "score": float(len(CANDIDATES[str(g["prompt_id"])]) - i)} for i, g in enumerate(gens)]))
    storage.write_table("rankings/part-00000.parquet", pa.Table.from_pylist([
        {"prompt_id": g["prompt_id"], "generation_id": g["generation_id"], "rank": 1} for g in gens]))
    base = {"name": "hand", "config": {"scorers": [{"plugin": "len"}], **(config or {})}, "rows": {}}
    storage.write_json("manifest.json", {**base, **(manifest or {})})
    return storage


def _ranking(prompt_id: str, annotation_id: str, *order: str, who: str = "ada") -> Annotation:
    return Annotation(labels.task_key("rankings", prompt_id), "rankings", prompt_id, who, "2026-01-01",
                      annotation_id, ranking=tuple(f"{prompt_id}-{c}" for c in order))


def _answer(prompt_id: str, annotation_id: str, text: str, who: str = "bo") -> Annotation:
    return Annotation(labels.task_key("demonstrations", prompt_id), "demonstrations", prompt_id, who,
                      "2026-01-02", annotation_id, completion=text)


# -- plugins written here, and a registry of them ------------------------------------------------

class ToolParams(PluginParams):
    url: str = "http://tool.local"


class Tool(Labeller):
    """A labelling tool whose projects are ``projects[(title, kind)]``; it notes what it is asked."""

    Params: ClassVar[type[PluginParams]] = ToolParams

    projects: ClassVar[dict[tuple[str, str], list[Annotation]]] = {}
    pulled: ClassVar[list[tuple[str, str]]] = []
    pushed: ClassVar[list[tuple[str, str, list[LabelTask]]]] = []

    def push(self, project: str, kind: str, tasks: list[LabelTask]) -> PushResult:
        self.pushed.append((project, kind, tasks))
        return PushResult(project, len(tasks), 0, "http://tool.local")

    def pull(self, project: str, kind: str) -> list[Annotation]:
        self.pulled.append((project, kind))
        return list(self.projects.get((project, kind), []))


class Other(Tool):
    """A second labelling tool."""


class Seen(Exporter):
    """An exporter that keeps what it is handed and makes one row per ranked prompt (or None)."""

    human_kinds: ClassVar[tuple[str, ...]] = ()
    handed: ClassVar[list[tuple[str, HumanLabels]]] = []
    answer: ClassVar[str] = "rows"

    def export(self, ranked: pa.Table) -> pa.Table | None:
        return None

    def export_human(self, labels: HumanLabels) -> pa.Table | None:
        self.handed.append((type(self).__name__, labels))
        if self.answer == "none":
            return None
        ids = sorted({r.prompt_id for r in labels.rankings})
        if self.answer == "no_prompt_id":
            return pa.table({"n": pa.array(range(len(ids)), pa.int64())})
        return pa.table({"prompt_id": pa.array(ids, pa.string())})


def _info(name: str, kind: str, factory: Any, missing: tuple[str, ...] = ()) -> PluginInfo:
    return PluginInfo(name, kind, factory, "any", "built-in", "1", "", missing)


class Registry:
    def __init__(self, *infos: PluginInfo) -> None:
        self.items = {(i.kind, i.name): i for i in infos}

    def get(self, kind: str, name: str) -> PluginInfo:
        return self.items[(kind, name)]

    def all(self) -> list[PluginInfo]:
        return sorted(self.items.values(), key=lambda p: (p.kind, p.name))


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Registry:
    """The one labelling tool "tool" and the built-in exporters, in place of what is installed."""
    from genflow import registry as module
    from genflow import secrets

    monkeypatch.setattr(secrets, "_installed", secrets.Scrubber())
    found = Registry(_info("tool", "labeller", Tool), _info("preferences", "exporter", PreferencePairs),
                     _info("sft", "exporter", BestOfN))
    monkeypatch.setattr(module, "get_registry", lambda refresh=False: found)
    monkeypatch.setattr(Tool, "projects", {})
    monkeypatch.setattr(Tool, "pulled", [])
    monkeypatch.setattr(Tool, "pushed", [])
    monkeypatch.setattr(Seen, "handed", [])
    return found


# -- pull: which projects of which kinds ---------------------------------------------------------

def _two_kinds(storage: Storage) -> None:
    """Pushed before: a rankings project and a demonstrations project; both have new labels."""
    storage.write_json(layout.labelling_record("tool"), {"projects": [
        {"project": "R", "kind": "rankings"}, {"project": "D", "kind": "demonstrations"},
        {"kind": "rankings"}, "not a project"]})
    Tool.projects.update({("R", "rankings"): [_ranking("p1", "1", "a", "b")],
                          ("D", "demonstrations"): [_answer("p2", "2", "an answer")],
                          ("X", "rankings"): [_ranking("p3", "3", "b", "a")],
                          ("X", "demonstrations"): [_answer("p4", "4", "not asked for")]})


def _rows(storage: Storage, folder: str) -> list[tuple[str, str]]:
    table = storage.read_folder(folder)
    ids = "generation_id" if folder == layout.HUMAN_RANKINGS else "completion"
    return sorted(zip(table["prompt_id"].to_pylist(), table[ids].to_pylist(), strict=True)) if table.num_rows else []


def test_a_pull_reads_every_known_project_of_both_kinds(tmp_path: Path, registry: Registry) -> None:
    storage = _job(tmp_path / "out")
    _two_kinds(storage)
    manifest = labels.pull(storage, None, {}).manifest
    assert sorted(Tool.pulled) == [("D", "demonstrations"), ("R", "rankings")]
    assert _rows(storage, layout.HUMAN_RANKINGS) == [("p1", "p1-a"), ("p1", "p1-b")]
    assert _rows(storage, layout.DEMONSTRATIONS) == [("p2", "an answer")]
    assert manifest["labelling"]["rows"] == {"human_rankings": 2, "demonstrations": 1, "preferences": 1, "sft": 1}
    assert storage.read_json("manifest.json") == manifest


@pytest.mark.parametrize("kind", ["rankings", "demonstrations"])
def test_a_pull_of_one_kind_reads_only_that_kinds_projects(tmp_path: Path, registry: Registry, kind: str) -> None:
    storage = _job(tmp_path / "out")
    _two_kinds(storage)
    labels.pull(storage, "tool", {}, kind=kind)
    assert Tool.pulled == [("R" if kind == "rankings" else "D", kind)]
    # the other kind's project was not read: its new label is not written
    assert _rows(storage, layout.HUMAN_RANKINGS) == ([("p1", "p1-a"), ("p1", "p1-b")] if kind == "rankings" else [])
    assert _rows(storage, layout.DEMONSTRATIONS) == ([("p2", "an answer")] if kind == "demonstrations" else [])


def test_a_named_project_is_read_with_the_known_ones_of_its_kind_only(tmp_path: Path, registry: Registry) -> None:
    """``--project X`` (rankings by default) joins the known rankings project; the known
    demonstrations project is not read, and X's demonstrations are not asked for."""
    storage = _job(tmp_path / "out")
    _two_kinds(storage)
    labels.pull(storage, "tool", {}, project="X")
    assert sorted(Tool.pulled) == [("R", "rankings"), ("X", "rankings")]
    assert _rows(storage, layout.HUMAN_RANKINGS) == [("p1", "p1-a"), ("p1", "p1-b"), ("p3", "p3-a"), ("p3", "p3-b")]
    assert _rows(storage, layout.DEMONSTRATIONS) == []
    record = storage.read_json(layout.labelling_record("tool"))
    assert record["projects"][-1] == {"project": "X", "kind": "rankings"} and len(record["projects"]) == 5

    Tool.pulled.clear()
    labels.pull(storage, "tool", {}, project="X", kind="demonstrations")
    assert sorted(Tool.pulled) == [("D", "demonstrations"), ("X", "demonstrations")]
    assert _rows(storage, layout.DEMONSTRATIONS) == [("p2", "an answer"), ("p4", "not asked for")]
    assert storage.read_json(layout.labelling_record("tool"))["projects"][-2:] == [
        {"project": "X", "kind": "rankings"}, {"project": "X", "kind": "demonstrations"}]


def test_a_named_project_is_remembered_once(tmp_path: Path, registry: Registry) -> None:
    storage = _job(tmp_path / "out")
    Tool.projects[("X", "rankings")] = [_ranking("p3", "3", "b", "a")]
    labels.pull(storage, "tool", {}, project="X")
    assert storage.read_json(layout.labelling_record("tool")) == {"projects": [{"project": "X", "kind": "rankings"}]}
    labels.pull(storage, "tool", {}, project="X")  # known already: not written again
    labels.pull(storage, "tool", {})
    assert storage.read_json(layout.labelling_record("tool")) == {"projects": [{"project": "X", "kind": "rankings"}]}
    assert Tool.pulled == [("X", "rankings")] * 3
    _two_kinds(storage)  # a record of others: X joins it, at the end
    labels.pull(storage, "tool", {}, project="X")
    labels.pull(storage, "tool", {}, project="X")
    assert [p.get("project") for p in storage.read_json(layout.labelling_record("tool"))["projects"]
            if isinstance(p, dict)] == ["R", "D", None, "X"]


def test_a_pull_of_nothing_known_or_an_unknown_kind_says_what_to_change(tmp_path: Path, registry: Registry) -> None:
    storage = _job(tmp_path / "out")
    with pytest.raises(LabellingError) as raised:
        labels.pull(storage, None, {})
    assert str(raised.value) == (f"{storage.uri} was not pushed to tool from here; "
                                 "name the project with --project (and --kind)")
    storage.write_json(layout.labelling_record("tool"), {"projects": [{"project": "R", "kind": "rankings"}]})
    with pytest.raises(LabellingError) as raised:
        labels.pull(storage, None, {}, kind="demonstrations")
    assert str(raised.value) == (f"{storage.uri} was not pushed to tool from here as demonstrations; "
                                 "name the project with --project (and --kind)")
    with pytest.raises(LabellingError) as raised:
        labels.pull(storage, None, {}, kind="answers")
    assert str(raised.value) == "unknown kind of task 'answers': rankings or demonstrations"
    assert Tool.pulled == []


def test_a_pull_names_the_tool_in_its_log_and_its_warnings(tmp_path: Path, registry: Registry,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    from genflow import secrets

    storage = _job(tmp_path / "out")
    _two_kinds(storage)
    key = "tool-key-0123456789abcdef"
    monkeypatch.setattr(secrets, "_installed", secrets.Scrubber([secrets.Secret(key, "$TOOL_KEY")]))
    Tool.projects[("D", "demonstrations")].append(_answer("p3", "9", f"my key is {key}"))
    with caplog.at_level(logging.INFO, logger="genflow.labelling.labels"):
        labels.pull(storage, "tool", {})
    said = [r.getMessage() for r in caplog.records if r.name == "genflow.labelling.labels"]
    assert "tool annotation 9 of prompt p3 holds a secret ($TOOL_KEY): it is not written" in said
    assert "tool: 2 rows of human_rankings, 1 rows of demonstrations" in said
    assert _rows(storage, layout.DEMONSTRATIONS) == [("p2", "an answer")]


def test_the_named_tool_is_used_when_several_are_installed(tmp_path: Path, registry: Registry) -> None:
    registry.items[("labeller", "other")] = _info("other", "labeller", Other)
    storage = _job(tmp_path / "out")
    Tool.projects[("X", "rankings")] = [_ranking("p3", "3", "b", "a")]
    labels.pull(storage, "other", {}, project="X")
    assert storage.exists(layout.labelled_part(layout.HUMAN_RANKINGS, "other"))
    assert storage.exists(layout.labelling_record("other")) and not storage.exists(layout.labelling_record("tool"))
    result = labels.push(storage, "other", {}, "rankings", sample=1)
    assert result.created == 1
    with pytest.raises(LabellingError, match="name the labelling plugin with --tool: other, tool"):
        labels.pull(storage, None, {})


# -- which labelling tool ------------------------------------------------------------------------

def test_with_no_tool_or_several_the_message_names_what_is_installed(registry: Registry) -> None:
    assert labels.installed_tool(None) == "tool"
    assert labels.installed_tool("named") == "named"
    registry.items[("labeller", "other")] = _info("other", "labeller", Other)
    with pytest.raises(LabellingError) as raised:
        labels.installed_tool(None)
    assert str(raised.value) == "name the labelling plugin with --tool: other, tool"
    registry.items.clear()
    with pytest.raises(LabellingError) as raised:
        labels.installed_tool(None)
    assert str(raised.value) == "name the labelling plugin with --tool: none is installed (genflow plugins lists them)"


def test_a_labeller_that_is_not_available_says_what_to_install(registry: Registry) -> None:
    registry.items[("labeller", "tool")] = _info("tool", "labeller", Tool, missing=("tool-client",))
    with pytest.raises(LabellingError) as raised:
        labels.labeller("tool", {})
    assert str(raised.value) == "labeller plugin 'tool' needs tool-client: pip install tool-client"


# -- push ------------------------------------------------------------------------------------------

def _pushed_prompts() -> list[str]:
    return [t.prompt_id for t in Tool.pushed[-1][2]]


def _drawn(sample: int, seed: int) -> list[str]:
    """The prompts of ``sample`` drawn with ``seed`` that have two candidates to rank."""
    return [p for p in labels.choose_prompts(CANDIDATES, sample, seed) if p != "p5"]


def test_push_sends_the_sampled_tasks_of_its_seed_and_remembers_the_project(tmp_path: Path,
                                                                           registry: Registry) -> None:
    storage = _job(tmp_path / "out")
    result = labels.push(storage, None, {}, "rankings")
    assert (result.project, result.created) == ("genflow hand rankings", 4)  # all, not only where scorers disagree
    assert _pushed_prompts() == ["p1", "p2", "p3", "p4"]  # p5: one candidate
    for seed in (0, 1, 2, 3):
        labels.push(storage, None, {"url": "http://tool.local"}, "rankings", sample=2, seed=seed)
        assert _pushed_prompts() == _drawn(2, seed)
    labels.push(storage, None, {}, "rankings", sample=2)
    assert _pushed_prompts() == _drawn(2, 0)  # the default seed is 0
    assert storage.read_json(layout.labelling_record("tool")) == {"projects": [
        {"project": "genflow hand rankings", "kind": "rankings"},
        {"project": "genflow hand rankings", "kind": "rankings", "url": "http://tool.local"}]}


def test_an_empty_push_says_so(tmp_path: Path, registry: Registry) -> None:
    storage = _job(tmp_path / "out")
    storage.write_table("rankings/part-00000.parquet", pa.Table.from_pylist([
        {"prompt_id": "p5", "generation_id": "p5-a", "rank": 1}]))
    with pytest.raises(LabellingError) as raised:
        labels.push(storage, None, {}, "rankings")
    assert str(raised.value) == "no prompt to push"
    assert Tool.pushed == []


# -- the exporters of a job ------------------------------------------------------------------------

def test_a_jobs_exporters_are_made_with_its_params(registry: Registry) -> None:
    made = labels.job_exporters_of({"config": {"exporters": {"preferences": {"per_prompt": 3}, "sft": True}}})
    assert sorted(made) == ["preferences", "sft"]
    assert isinstance(made["preferences"], PreferencePairs) and made["preferences"].params.per_prompt == 3
    assert isinstance(made["sft"], BestOfN)
    assert sorted(labels.job_exporters_of({})) == ["preferences", "sft"]  # no config: the default ones
    assert list(labels.job_exporters_of({"config": {"exporters": {"preferences": False, "sft": False}}})) == []


def test_an_exporter_that_is_not_installed_is_left_out_with_a_warning(registry: Registry,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    config = {"exporters": {"gone": {"x": 1}, "also_gone": True, "off_and_gone": False, "sft": False}}
    with caplog.at_level(logging.WARNING, logger="genflow.labelling.labels"):
        made = labels.job_exporters_of({"config": config})
    assert list(made) == ["preferences"] and made["preferences"].params.per_prompt == 1  # type: ignore[attr-defined]
    assert [r.getMessage() for r in caplog.records] == [
        "exporter 'gone' of this job is not installed: its human rows are not made",
        "exporter 'also_gone' of this job is not installed: its human rows are not made"]
    # a labeller of that name is not an exporter
    registry.items[("labeller", "gone")] = _info("gone", "labeller", Tool)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="genflow.labelling.labels"):
        assert list(labels.job_exporters_of({"config": config})) == ["preferences"]
    assert len(caplog.records) == 2


# -- refresh: the exporters' human rows ------------------------------------------------------------

class First(Seen):
    """Sorted first; makes no rows of people."""

    answer = "none"


class Second(Seen):
    human_kinds = ("demonstrations",)


def _with_exporters(registry: Registry, **kinds: type[Exporter]) -> None:
    for name, factory in kinds.items():
        registry.items[("exporter", name)] = _info(name, "exporter", factory)


def test_each_exporter_is_handed_what_people_did_and_writes_its_human_part(tmp_path: Path,
                                                                          registry: Registry) -> None:
    _with_exporters(registry, a_first=First, b_second=Second)
    config = {"exporters": {"a_first": {}, "b_second": {}, "preferences": False, "sft": False}}
    storage = _job(tmp_path / "out", config)
    labels.write_pulled(storage, "tool", [_ranking("p1", "1", "c", "a"), _answer("p2", "2", "hi", who="cy")])
    manifest = labels.refresh(storage, storage.read_json("manifest.json"))
    assert [name for name, _ in Seen.handed] == ["First", "Second"]  # an exporter without rows is no end
    handed = Seen.handed[1][1]
    assert [(r.prompt_id, r.order) for r in handed.rankings] == [("p1", ("p1-c", "p1-a"))]
    assert handed.candidates["p1-c"] == {"prompt_id": "p1", "generation_id": "p1-c", "prompt": "prompt p1",
                                         "modality": "text", "text": "answer c", "image_path": None}
    assert sorted(handed.candidates) == ["p1-a", "p1-c"]
    assert handed.demonstrations["completion"].to_pylist() == ["hi"]
    assert not storage.exists(layout.human_part("a_first"))
    assert storage.read_table(layout.human_part("b_second"))["prompt_id"].to_pylist() == ["p1"]
    assert manifest["labelling"] == {"human_rows": "beside", "rankings": 1, "annotators": 2,
                                     "rows": {"human_rankings": 2, "demonstrations": 1, "b_second": 1}}
    assert manifest["rows"]["b_second"] == 1 and "a_first" not in manifest["rows"]


def _model_rows(storage: Storage, folder: str) -> None:
    storage.write_table(f"{folder}/part-00000.parquet", pa.table({"prompt_id": list(CANDIDATES)}))


def _left(storage: Storage, folder: str) -> list[str]:
    return sorted(storage.read_table(f"{folder}/part-00000.parquet")["prompt_id"].to_pylist())


def test_instead_leaves_out_the_prompts_of_the_exporters_kinds_and_of_its_rows(tmp_path: Path,
                                                                               registry: Registry) -> None:
    """``human_rows: instead``: Second makes rows of demonstrations (p2 answered) and its rows
    name p1 (ranked): both leave its model rows. An exporter of rankings whose rows name no
    prompt leaves the ranked prompt p3; one of no kind leaves only the prompts its rows name."""

    class Ranked(Seen):
        human_kinds = ("rankings", "comparisons")  # a kind genflow does not pull (yet) has no prompts
        answer = "no_prompt_id"

    class Plain(Seen):
        answer = "no_prompt_id"

    _with_exporters(registry, second=Second, ranked=Ranked, plain=Plain, named=Seen)
    exporters: dict[str, Any] = {n: {} for n in ("second", "ranked", "plain", "named")}
    storage = _job(tmp_path / "out", {"exporters": {**exporters, "preferences": False, "sft": False},
                                      "labelling": {"human_rows": "instead"}})
    for folder in ("second", "ranked", "plain", "named"):
        _model_rows(storage, folder)
    labels.write_pulled(storage, "tool", [_ranking("p1", "1", "c", "a"), _ranking("p3", "3", "a", "b"),
                                          _answer("p2", "2", "hi")])
    manifest = labels.refresh(storage, storage.read_json("manifest.json"))
    assert manifest["labelling"]["human_rows"] == "instead"
    assert _left(storage, "second") == ["p4", "p5"]  # p2 answered, p1 and p3 in its rows
    assert _left(storage, "ranked") == ["p2", "p4", "p5"]  # p1 and p3 ranked
    assert _left(storage, "plain") == list(CANDIDATES)  # its rows name no prompt, it has no kinds
    assert _left(storage, "named") == ["p2", "p4", "p5"]  # its rows name p1 and p3


def test_a_manifest_without_rows_or_agreement_is_refreshed(tmp_path: Path, registry: Registry) -> None:
    storage = _job(tmp_path / "out")
    manifest = storage.read_json("manifest.json")
    del manifest["rows"]
    labels.write_pulled(storage, "tool", [_ranking("p1", "1", "c", "a")])
    refreshed = labels.refresh(storage, manifest)
    assert refreshed["rows"] == {"human_rankings": 2, "preferences": 1}
    # everything pulled is gone: so are the human rows and what the manifest said of them
    labels.write_pulled(storage, "tool", [])
    storage.write_bytes("sft/notes.txt", b"not rows")  # a folder without parts has no rows to count
    del refreshed["human_agreement"], refreshed["rows"]
    emptied = labels.refresh(storage, refreshed)
    assert "labelling" not in emptied and "human_agreement" not in emptied
    assert not storage.exists(layout.human_part("preferences"))
    assert emptied["rows"] == {}

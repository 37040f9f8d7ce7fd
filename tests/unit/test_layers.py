"""The import layers of docs/architecture.md, checked on the source.

Every module under genflow/, plugins/ (installed as ``genflow.plugins``) and flows/
(``genflow.flows``) is parsed with :mod:`ast`, and every import of a genflow module is
read: at the top of a module, inside a function (a lazy import), and under
``if TYPE_CHECKING:``. Type-only imports count too: they tie the importer to the names of
the module it imports as much as any other import, mypy follows them, and a cycle hidden
behind one is still a cycle for a reader. A test fails naming the importing file, its line
and the rule it breaks:

(a) no import cycle among genflow's modules, eager or lazy;
(b) a module of a layer imports only its own layer and those below it (:data:`LAYERS`);
    nothing outside plugins/ imports a plugin (the core reaches plugins through the
    registry), and every module has a layer;
(c) a plugin imports from genflow only the plugin interface (:data:`PLUGIN_INTERFACE`,
    and :data:`MEDIA` to read images), its own family and ``plugins/shared``;
    ``plugins/shared`` imports only the plugin interface;
(d) nothing in genflow/ imports ``genflow.flows``: only the flows and the CLI start a job's flow.

``from package import name`` counts as an import of the module ``package.name`` when that
is a module, else of ``package``. A package's ``__init__`` that Python runs on the way to
one of its modules is not counted as imported: the rules already hold for it as a module
of its own. Imports by a string (``importlib.import_module("genflow.x")``) are not seen.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SOURCES = {"genflow": "genflow", "plugins": "genflow.plugins", "flows": "genflow.flows"}
"""Each top-level folder and the package it is installed as (pyproject.toml's package-dir)."""

LAYERS: list[tuple[str, tuple[str, ...], str]] = [
    # (layer, its modules or packages, what it holds), bottom to top
    ("interface", ("genflow", "genflow.api", "genflow.hookspecs", "genflow.registry", "genflow.secrets"),
     "what a plugin sees: the base classes, requests and results, the hooks, the registry, secret scrubbing"),
    ("config", ("genflow.config", "genflow.grid"),
     "a job's config: models, validation, redaction, the job's secrets; a sweep's runs"),
    ("data", ("genflow.data",),
     "storage, input prompts, the output's layout and fingerprints, resume, lease, journal, a row's result, "
     "an episode's turns, training tables (training_sets.py), the rows filters left out (filtered.py)"),
    ("engine", ("genflow.engine",),
     "Ray actors and workers, the request path, the budget, episodes (episodes.py), their tools (tools.py) "
     "and simulated users (users.py), the response cache (cache.py), batch mode (batches.py), "
     "training on a Ray task (training.py), JobFailed"),
    ("stages", ("genflow.stages",),
     "one stage's work on one shard: plan, generate, score, rank; the filters (filter.py)"),
    ("outputs", ("genflow.outputs",),
     "manifest, report, dataset card, Prefect artifacts and events, scorer agreement"),
    ("labelling", ("genflow.labelling",),
     "human labels: tasks pushed, labels pulled, their rows and agreement figures"),
    ("runtime", ("genflow.runtime",),
     "a job's session, the local Prefect API, progress, shutdown"),
    ("flows", ("genflow.flows",),
     "the Prefect flows of a job, a sweep, a job's rounds and a deployment, and run_job"),
    ("cli", ("genflow.cli",),
     "the genflow command"),
]
"""The layers of genflow, bottom to top (docs/architecture.md draws them). A module belongs to
the layer that names it or its nearest package."""

PLUGIN_INTERFACE = ("genflow", "genflow.api", "genflow.hookspecs", "genflow.secrets")
"""What a plugin may import from genflow's core."""
MEDIA = ("genflow.data.storage",)
"""And, outside plugins/shared, the storage a plugin reads media (images, masks) through."""
PLUGINS = "genflow.plugins"
SHARED = "genflow.plugins.shared"
FLOWS = "genflow.flows"
CLI = "genflow.cli"


@dataclass(frozen=True)
class Import:
    importer: str
    target: str
    path: Path
    line: int
    how: str
    """``""``, ``"lazy"`` (inside a function) or ``"TYPE_CHECKING"``."""

    def where(self) -> str:
        how = f" ({self.how})" if self.how else ""
        return f"{self.path}:{self.line}: {self.importer} imports {self.target}{how}"


def module_name(path: Path) -> str:
    """``plugins/code/sandbox.py`` -> ``genflow.plugins.code.sandbox`` (``path`` relative to the root)."""
    parts = list(path.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([SOURCES[parts[0]], *parts[1:]])


def source_files(root: Path = ROOT) -> dict[str, Path]:
    """Every module of genflow, plugins and flows, by name, with its path relative to ``root``."""
    return {module_name(p.relative_to(root)): p.relative_to(root)
            for top in SOURCES for p in sorted((root / top).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST, how: str = "") -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import statement below ``tree``, and whether it is lazy or type-only."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, how
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from _import_nodes(ast.Module(body=[child], type_ignores=[]), how or "TYPE_CHECKING")
            for child in node.orelse:
                yield from _import_nodes(ast.Module(body=[child], type_ignores=[]), how)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _import_nodes(node, "lazy")
        else:
            yield from _import_nodes(node, how)


def imports_of(name: str, path: Path, source: str, modules: Iterable[str]) -> list[Import]:
    """The genflow modules that module ``name`` (file ``path``, text ``source``) imports."""
    known = set(modules)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node, how in _import_nodes(ast.parse(source, str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                origin = ".".join([*base, node.module] if node.module else base)
            else:
                origin = node.module or ""
            targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in known else origin for a in node.names]
        for target in dict.fromkeys(targets):
            if (target == "genflow" or target.startswith("genflow.")) and target != name:
                out.append(Import(name, target, path, node.lineno, how))
    return out


def import_graph(root: Path = ROOT) -> tuple[dict[str, Path], list[Import]]:
    files = source_files(root)
    edges = [i for name, path in files.items() for i in imports_of(name, path, (root / path).read_text(), files)]
    return files, edges


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _named(module: str, entry: str) -> bool:
    """Whether a layer's entry names ``module``: itself, or a package holding it (``genflow``
    alone is the package's ``__init__``: every module is inside it)."""
    return module == entry or (entry != "genflow" and _within(module, entry))


def layer_of(module: str, layers: list[tuple[str, tuple[str, ...], str]] = LAYERS) -> int | None:
    """The index of ``module``'s layer: the one naming it or its nearest package."""
    best: tuple[int, int] | None = None
    for i, (_, names, _) in enumerate(layers):
        for n in names:
            if _named(module, n) and (best is None or len(n) > best[1]):
                best = (i, len(n))
    return None if best is None else best[0]


def _layer(i: int) -> str:
    return f"{LAYERS[i][0]} (layer {i + 1})"


def cycles(modules: Iterable[str], edges: list[Import]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for e in edges:
        if e.target in graph:
            graph[e.importer].add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        component.append(m)
                        if m == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def cycle_problems(modules: Iterable[str], edges: list[Import]) -> list[str]:
    out = []
    for component in cycles(modules, edges):
        inside = set(component)
        lines = [e.where() for e in edges if e.importer in inside and e.target in inside]
        out.append("(a) an import cycle among " + ", ".join(component) + ":\n    " + "\n    ".join(lines))
    return out


def layer_problems(modules: Iterable[str], edges: list[Import]) -> list[str]:
    known = set(modules)
    out = [f"(b) {m} has no layer: add it (or its package) to LAYERS in tests/unit/test_layers.py "
           "and to docs/architecture.md" for m in sorted(known)
           if not _within(m, PLUGINS) and layer_of(m) is None]
    for e in edges:
        if _within(e.importer, PLUGINS):
            continue  # the plugins' rule is (c)
        if _within(e.target, FLOWS) and not _within(e.importer, FLOWS) and e.importer != CLI:
            continue  # (d)
        if _within(e.target, PLUGINS):
            out.append(f"(b) {e.where()}: the core reaches plugins through the registry, never by import")
            continue
        if not any(_within(m, e.target) for m in known):
            out.append(f"(b) {e.where()}: no such module in genflow, plugins or flows")
            continue
        mine, theirs = layer_of(e.importer), layer_of(e.target)
        if mine is not None and theirs is not None and theirs > mine:
            out.append(f"(b) {e.where()}: {_layer(mine)} imports {_layer(theirs)}, a higher layer")
    return out


def family_of(module: str) -> str | None:
    """``genflow.plugins.code.sandbox`` -> ``code``; None for ``genflow.plugins`` itself."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 else None


def plugin_problems(edges: list[Import]) -> list[str]:
    out = []
    for e in edges:
        if not _within(e.importer, PLUGINS):
            continue
        family = family_of(e.importer)
        shared = family is None or family == "shared"
        if any(e.target == m for m in PLUGIN_INTERFACE) or e.target == PLUGINS:
            continue
        if _within(e.target, PLUGINS):
            theirs = family_of(e.target)
            if theirs == family or (theirs == "shared" and not shared):
                continue
            rule = ("plugins/shared imports only the plugin interface" if shared else
                    f"a plugin of the {family} family imports another family's module ({theirs}): "
                    "move what both need to plugins/shared")
            out.append(f"(c) {e.where()}: {rule}")
            continue
        if not shared and e.target in MEDIA:
            continue
        allowed = ", ".join(PLUGIN_INTERFACE + (() if shared else MEDIA))
        out.append(f"(c) {e.where()}: a plugin{' in plugins/shared' if shared else ''} imports from genflow "
                   f"only {allowed}")
    return out


def flow_problems(edges: list[Import]) -> list[str]:
    return [f"(d) {e.where()}: nothing in genflow/ imports the flows; the CLI and the flows start them"
            for e in edges if _within(e.target, FLOWS) and not _within(e.importer, FLOWS)
            and not _within(e.importer, PLUGINS) and e.importer != CLI]


# -- the rules on genflow's source ------------------------------------------------------------------

@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, Path], list[Import]]:
    return import_graph()


def _fail_with(problems: list[str]) -> None:
    assert not problems, f"{len(problems)} broken:\n" + "\n".join(problems)


def test_every_module_is_read(graph: tuple[dict[str, Path], list[Import]]) -> None:
    files, edges = graph
    assert {"genflow.api", "genflow.cli", "genflow.plugins.text.generator", "genflow.flows.job"} <= set(files)
    assert any(e.importer == "genflow.cli" and e.target == "genflow.config" for e in edges)
    stale = [n for _, names, _ in LAYERS for n in names if not any(_within(m, n) for m in files)]
    assert not stale, f"LAYERS names modules that are not there: {stale}"


def test_no_import_cycle(graph: tuple[dict[str, Path], list[Import]]) -> None:
    """(a) every import of genflow, plugins and flows, eager, lazy or type-only, points one way."""
    _fail_with(cycle_problems(*graph))


def test_each_layer_imports_only_itself_and_those_below(graph: tuple[dict[str, Path], list[Import]]) -> None:
    """(b) the layers of docs/architecture.md."""
    _fail_with(layer_problems(*graph))


def test_plugins_import_only_the_plugin_interface(graph: tuple[dict[str, Path], list[Import]]) -> None:
    """(c) a plugin: the interface, its family, plugins/shared; plugins/shared: the interface."""
    _fail_with(plugin_problems(graph[1]))


def test_nothing_in_genflow_imports_the_flows(graph: tuple[dict[str, Path], list[Import]]) -> None:
    """(d) the core knows no orchestrator."""
    _fail_with(flow_problems(graph[1]))


def test_the_layer_table_of_docs_architecture_is_this_one() -> None:
    """docs/architecture.md's table lists the layers in this order, each with its folders."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2:3].isdigit()]
    assert [r.split("|")[2].strip() for r in rows] == [name for name, _, _ in LAYERS]
    for row, (_, names, _) in zip(rows, LAYERS, strict=True):
        for n in names:
            shown = "genflow/__init__.py" if n == "genflow" else (
                "flows/" if n == FLOWS else n.replace(".", "/"))
            assert shown in row, f"docs/architecture.md's row {row!r} does not name {shown}"


# -- the checker itself, on a planted tree ---------------------------------------------------------

PLANTED = {
    "genflow/__init__.py": "from genflow.hookspecs import hookimpl\n",
    "genflow/hookspecs.py": "",
    "genflow/api.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from genflow.config import JobConfig\n",
    "genflow/config.py": "def f():\n    from genflow import hookspecs\n",
    "genflow/data/__init__.py": "",
    "genflow/data/storage.py": "",
    "genflow/data/journal.py": "from . import storage\nfrom ..engine.worker import Failure\n",
    "genflow/engine/__init__.py": "",
    "genflow/engine/worker.py": "import genflow.data.journal\nimport genflow.plugins.text.generator\n",
    "genflow/runtime/__init__.py": "",
    "genflow/runtime/session.py": "def run():\n    from genflow.flows.job import job\n",
    "plugins/__init__.py": "",
    "plugins/text/__init__.py": "",
    "plugins/text/generator.py": "from genflow.api import Generator\nfrom genflow.data.storage import read_bytes\n"
                                 "from genflow.plugins.shared import hf\nfrom genflow.plugins.judge import x\n",
    "plugins/judge/__init__.py": "from genflow.config import redact_url\n",
    "plugins/shared/__init__.py": "",
    "plugins/shared/hf.py": "from genflow.registry import get_registry\nfrom genflow.data.storage import read_bytes\n",
    "flows/__init__.py": "",
    "flows/job.py": "from genflow.runtime.session import run\n",
    "flows/deploy.py": "\nfrom genflow.cli import main\n",
    "genflow/cli.py": "from genflow.flows.job import job\n",  # the CLI may
    "genflow/misc.py": "",
}


def test_the_checker_names_each_broken_rule_with_its_file_and_line(tmp_path: Path) -> None:
    for name, text in PLANTED.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    files, edges = import_graph(tmp_path)
    assert {(e.importer, e.target, e.how) for e in edges if e.path.name in {"api.py", "config.py"}} == {
        ("genflow.api", "genflow.config", "TYPE_CHECKING"), ("genflow.config", "genflow.hookspecs", "lazy")}

    journal, flow = sorted(cycle_problems(files, edges))
    assert journal == ("(a) an import cycle among genflow.data.journal, genflow.engine.worker:\n"
                       "    genflow/data/journal.py:2: genflow.data.journal imports genflow.engine.worker\n"
                       "    genflow/engine/worker.py:1: genflow.engine.worker imports genflow.data.journal")
    assert flow == ("(a) an import cycle among genflow.flows.job, genflow.runtime.session:\n"
                    "    genflow/runtime/session.py:2: genflow.runtime.session imports genflow.flows.job (lazy)\n"
                    "    flows/job.py:1: genflow.flows.job imports genflow.runtime.session")

    assert sorted(layer_problems(files, edges)) == sorted([
        "(b) genflow.misc has no layer: add it (or its package) to LAYERS in tests/unit/test_layers.py and to "
        "docs/architecture.md",
        "(b) genflow/api.py:3: genflow.api imports genflow.config (TYPE_CHECKING): interface (layer 1) "
        "imports config (layer 2), a higher layer",
        "(b) genflow/data/journal.py:2: genflow.data.journal imports genflow.engine.worker: data (layer 3) "
        "imports engine (layer 4), a higher layer",
        "(b) genflow/engine/worker.py:2: genflow.engine.worker imports genflow.plugins.text.generator: "
        "the core reaches plugins through the registry, never by import",
        "(b) flows/deploy.py:2: genflow.flows.deploy imports genflow.cli: flows (layer 9) imports cli (layer 10), "
        "a higher layer",
    ])
    assert sorted(plugin_problems(edges)) == sorted([
        "(c) plugins/text/generator.py:4: genflow.plugins.text.generator imports genflow.plugins.judge: "
        "a plugin of the text family imports another family's module (judge): move what both need to "
        "plugins/shared",
        "(c) plugins/judge/__init__.py:1: genflow.plugins.judge imports genflow.config: a plugin imports from "
        "genflow only genflow, genflow.api, genflow.hookspecs, genflow.secrets, genflow.data.storage",
        "(c) plugins/shared/hf.py:1: genflow.plugins.shared.hf imports genflow.registry: a plugin in "
        "plugins/shared imports from genflow only genflow, genflow.api, genflow.hookspecs, genflow.secrets",
        "(c) plugins/shared/hf.py:2: genflow.plugins.shared.hf imports genflow.data.storage: a plugin in "
        "plugins/shared imports from genflow only genflow, genflow.api, genflow.hookspecs, genflow.secrets",
    ])
    assert flow_problems(edges) == [
        "(d) genflow/runtime/session.py:2: genflow.runtime.session imports genflow.flows.job (lazy): nothing in "
        "genflow/ imports the "
        "flows; the CLI and the flows start them"]

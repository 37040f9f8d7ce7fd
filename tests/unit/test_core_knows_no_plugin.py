"""The core knows no built-in plugin: ``genflow/`` and ``flows/`` name none of them, none of
their exporters' folders and none of the columns only they read or write.

What counts as a built-in comes from the registry (the plugins genflow's own distribution
registers), so a new built-in is checked the day it is added. A plugin's names are looked
for anywhere in a file (code, docstrings, templates), as ``grep -w`` would; its columns in
the strings of the Python code, where code names a column. A column that is also the
core's own word is not the plugin's: the columns of ``genflow.data.schemas``, the input
columns the engine reads itself, the fields of the plugin interface's data classes and of
the registry's entries, and the modalities plugins declare (``code`` is hf-code's column of
code to fix and a modality).
"""

from __future__ import annotations

import ast
import dataclasses
import io
import re
import tokenize
from pathlib import Path

import pyarrow as pa
import pytest

import genflow.api as api
from genflow import registry as registry_module
from genflow.data import prompts, schemas
from genflow.registry import PluginInfo, get_registry

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("genflow", "flows")
ALLOWED: dict[str, set[str]] = {}
"""Files that may name a built-in (relative path -> names): the registry's list of built-ins,
were it written out. genflow finds its built-ins through its distribution's entry points
(``pyproject.toml``), so no file of the core needs one."""


def built_ins() -> list[PluginInfo]:
    found = [p for p in get_registry().all() if p.source == "built-in"]
    assert {p.kind for p in found} == {"generator", "scorer", "exporter", "labeller", "tool", "trainer",
                                       "filter"}, found
    return found


CORE_NAMES = {"submit"}
"""Built-ins' names that are the core's words too: ``submit`` (a tool) is Python's
``Executor.submit`` and the ``finish_reason`` of an episode a tool ended (``genflow.data.turns``)."""


def plugin_names() -> set[str]:
    return {p.name for p in built_ins()} - CORE_NAMES


def core_words() -> set[str]:
    """Column names that belong to the core, whichever plugin also uses them."""
    words = {name for value in vars(schemas).values() if isinstance(value, pa.Schema) for name in value.names}
    words |= set(prompts.ENGINE_COLUMNS)
    words |= {f.name for value in vars(api).values() if dataclasses.is_dataclass(value)
              for f in dataclasses.fields(value)}
    words |= {f.name for value in vars(registry_module).values() if dataclasses.is_dataclass(value)
              for f in dataclasses.fields(value)}
    words |= {m for p in built_ins() if p.kind in ("generator", "scorer")
              for m in (getattr(p.factory, "modalities", None) or (p.factory.modality,))}
    return words


def plugin_columns() -> set[str]:
    """The columns built-ins read (``input_columns``, ``path_columns``, ``media_columns``) or write
    (``extra_columns``, an exporter's ``schema``), less the core's words."""
    columns: set[str] = set()
    for p in built_ins():
        f = p.factory
        for attribute in ("input_columns", "path_columns", "media_columns", "extra_columns"):
            columns |= set(getattr(f, attribute, ()))
        if p.kind == "exporter" and f.schema is not None:
            columns |= set(f.schema.names)
    return columns - core_words()


def scanned_files() -> list[Path]:
    return sorted(p for top in SCANNED for p in (ROOT / top).rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".png", ".ico"))


def names_in(text: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of each name written as a word of its own (hyphens are part of a name)."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(0))
            for name in sorted(names) for m in re.finditer(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text)]


def strings_in(source: str) -> list[tuple[int, str]]:
    """(line, value) of each string literal of Python source (f-strings' literal parts aside)."""
    out = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.STRING:
            try:
                value = ast.literal_eval(token.string)
            except (ValueError, SyntaxError):
                continue
            if isinstance(value, str):
                out.append((token.start[0], value))
    return out


def test_the_registry_knows_the_built_ins_this_test_looks_for() -> None:
    names = plugin_names()
    assert len(names) >= 10 and {p.name for p in built_ins() if p.kind == "exporter"} <= names
    columns = plugin_columns()
    assert columns, "no plugin-specific column found: the scan would check nothing"
    assert not columns & core_words()


def test_the_core_names_no_built_in_plugin_or_exporter() -> None:
    names = plugin_names()
    found = [f"{path.relative_to(ROOT)}:{line}: {name}" for path in scanned_files()
             for line, name in names_in(path.read_text(errors="replace"), names)
             if name not in ALLOWED.get(str(path.relative_to(ROOT)), set())]
    assert not found, "the core names built-in plugins:\n" + "\n".join(found)


def test_the_core_names_no_column_of_a_built_in_plugin() -> None:
    columns = plugin_columns()
    found = [f"{path.relative_to(ROOT)}:{line}: {value!r}" for path in scanned_files() if path.suffix == ".py"
             for line, value in strings_in(path.read_text()) if value in columns]
    assert not found, "the core names columns of built-in plugins:\n" + "\n".join(found)


@pytest.mark.parametrize("text, hits", [
    ('register("hf-text", X)', [(1, "hf-text")]),
    ("see ``preferences/`` and\nsft rows", [(1, "preferences"), (2, "sft")]),
    ("sft_min_score, my-preferences, hf-text-2", []),
])
def test_a_name_is_found_as_a_word_of_its_own(text: str, hits: list[tuple[int, str]]) -> None:
    assert names_in(text, {"hf-text", "preferences", "sft"}) == sorted(hits, key=lambda h: (h[1], h[0]))


def test_a_column_is_found_in_the_strings_of_code_not_in_its_names() -> None:
    source = 'mask = 1\nINPUT = ("image", "mask")\n# "entry_point" in a comment\nf"{mask}"\n'
    assert [value for _, value in strings_in(source) if value in {"mask", "entry_point"}] == ["mask"]


def test_the_modalities_a_row_may_name_are_those_the_installed_plugins_declare() -> None:
    from genflow import hookimpl
    from genflow.registry import registry_with
    from genflow.stages.generate import known_modalities

    class Speech(api.Generator):
        modality = "audio"

        def generate(self, requests: list[api.GenerationRequest]) -> list[api.Generation | api.RowError]:
            return []

    class AudioPlugin:
        @hookimpl
        def register_generators(self, register: object) -> None:
            register("speech", Speech)  # type: ignore[operator]

    before = known_modalities(registry_with())
    assert "audio" not in before and {"text", "code", "image"} <= before  # the built-in families'
    assert known_modalities(registry_with(AudioPlugin())) == before | {"audio"}

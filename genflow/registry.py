"""The plugin manager: built-in and third-party plugins through one entry-point group."""

from __future__ import annotations

import importlib.metadata as md
import json
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import pluggy
from pydantic import BaseModel

from genflow import hookspecs
from genflow.api import Exporter, Filter, Generator, Labeller, Scorer, Tool, Trainer, missing_distributions

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "genflow"
KINDS = {"generator": Generator, "scorer": Scorer, "exporter": Exporter, "labeller": Labeller, "tool": Tool,
         "trainer": Trainer, "filter": Filter}


class PluginError(RuntimeError):
    """A plugin could not be loaded or is used wrongly."""


@dataclass(frozen=True)
class PluginInfo:
    name: str
    kind: str
    factory: Any
    modality: str
    source: str
    version: str
    description: str
    missing: tuple[str, ...] = ()
    """Distributions of the plugin's ``requires`` that are not installed."""

    @property
    def available(self) -> bool:
        return not self.missing

    @property
    def install_hint(self) -> str:
        """The pip command that installs what the plugin is missing ("" when nothing is): its
        ``extra`` of genflow for a built-in, of its own distribution for a third-party plugin."""
        if not self.missing:
            return ""
        extra = getattr(self.factory, "extra", None)
        distribution = "genflow" if self.source == "built-in" else self.source if self.version != "-" else None
        if extra and distribution:
            return f"pip install '{distribution}[{extra}]'"
        return "pip install " + " ".join(self.missing)

    def unavailable_reason(self) -> str:
        """Why the plugin cannot run here, and the command that fixes it."""
        return f"{self.kind} plugin {self.name!r} needs {', '.join(self.missing)}: {self.install_hint}"


@dataclass(frozen=True)
class PluginOption:
    """One key of a plugin's ``params``, as ``genflow plugins --params NAME`` shows it."""

    name: str
    type: str
    default: str
    description: str


def plugin_options(params_model: type[BaseModel]) -> list[PluginOption]:
    """The options of a plugin's ``Params``, read from its JSON schema (names, types, limits,
    defaults and ``Field(description=...)``), in the order the model declares them."""
    schema = params_model.model_json_schema()
    defs = schema.get("$defs", {})
    fields = params_model.model_fields
    options = []
    for name, prop in schema.get("properties", {}).items():
        if "default" in prop:
            default = json.dumps(prop["default"])
        elif name in fields and not fields[name].is_required():  # a default_factory: not in the schema
            default = json.dumps(fields[name].get_default(call_default_factory=True), default=str)
        else:
            default = "required"
        options.append(PluginOption(name, _schema_type(prop, defs), default, prop.get("description", "")))
    return options


_LIMITS = (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"),
           ("multipleOf", "multiple of"))


def _schema_type(prop: dict[str, Any], defs: dict[str, Any]) -> str:
    """A JSON schema type in words: ``integer >= 1``, ``a | b``, ``list of string | null``."""
    if "$ref" in prop:
        prop = {**defs.get(prop["$ref"].rsplit("/", 1)[-1], {}), **{k: v for k, v in prop.items() if k != "$ref"}}
    if "anyOf" in prop:
        return " | ".join(_schema_type(p, defs) for p in prop["anyOf"])
    if "enum" in prop:
        return " | ".join(str(v) for v in prop["enum"])
    if "const" in prop:
        return json.dumps(prop["const"])
    kind = prop.get("type", "any")
    if kind == "array":
        kind = f"list of {_schema_type(prop.get('items', {}), defs)}"
    elif kind == "object" and isinstance(prop.get("additionalProperties"), dict):
        kind = f"mapping of {_schema_type(prop['additionalProperties'], defs)}"
    limits = [f"{word} {prop[key]}" for key, word in _LIMITS if key in prop]
    return f"{kind} {', '.join(limits)}" if limits else kind


class Registry:
    """Every generator, scorer and exporter offered by the loaded plugins."""

    def __init__(self, pm: pluggy.PluginManager, broken: dict[str, str],
                 sources: dict[str, tuple[str, str]]) -> None:
        self.pm = pm
        self.broken = broken
        self.sources = sources
        self._items: dict[tuple[str, str], PluginInfo] = {}
        self._collect()

    def _collect(self) -> None:
        installed: dict[str, bool] = {}
        for kind, hook in (("generator", self.pm.hook.register_generators),
                           ("scorer", self.pm.hook.register_scorers),
                           ("exporter", self.pm.hook.register_exporters),
                           ("labeller", self.pm.hook.register_labellers),
                           ("tool", self.pm.hook.register_tools),
                           ("trainer", self.pm.hook.register_trainers),
                           ("filter", self.pm.hook.register_filters)):
            for impl in reversed(hook.get_hookimpls()):
                source, version = self._source_of(impl.plugin)

                def register(name: str, factory: Any, _kind: str = kind,
                             _source: str = source, _version: str = version) -> None:
                    base = KINDS[_kind]
                    if not (isinstance(factory, type) and issubclass(factory, base)):
                        raise PluginError(f"plugin {_source!r} registered {name!r} as a {_kind}, "
                                          f"but {factory!r} is not a subclass of {base.__name__}")
                    modality = getattr(factory, "modality", None) or ",".join(
                        getattr(factory, "modalities", ()))
                    self._items[(_kind, name)] = PluginInfo(
                        name, _kind, factory, modality, _source, _version,
                        (factory.description or (factory.__doc__ or "")).strip().split("\n")[0],
                        missing_distributions(tuple(factory.requires), installed))

                try:
                    impl.function(register=register)
                except PluginError:
                    raise
                except Exception as exc:  # a broken plugin must not take the others down
                    self.broken[source] = f"{type(exc).__name__}: {exc}"

    def _source_of(self, plugin: object) -> tuple[str, str]:
        name = self.pm.get_name(plugin) or repr(plugin)
        return self.sources.get(name, (name, "-"))

    def get(self, kind: str, name: str) -> PluginInfo:
        try:
            return self._items[(kind, name)]
        except KeyError:
            known = ", ".join(sorted(n for k, n in self._items if k == kind)) or "none"
            hint = "".join(f"\n  plugin {src!r} failed to load: {err}" for src, err in self.broken.items())
            raise PluginError(f"unknown {kind} plugin {name!r} (installed: {known}){hint}") from None

    def all(self) -> list[PluginInfo]:
        return sorted(self._items.values(), key=lambda p: (p.kind, p.name))

    def default_trainer(self, role: str) -> PluginInfo:
        """The trainer for a role of a job's rounds (:data:`genflow.api.TRAINER_ROLES`) when the
        config names none: one whose ``default_for`` holds it, a built-in before another."""
        found = [p for p in self.all() if p.kind == "trainer" and role in p.factory.default_for]
        if not found:
            raise PluginError(f"no trainer is installed for {role!r}: name one (genflow plugins lists the trainers)")
        return sorted(found, key=lambda p: p.source != "built-in")[0]

    def named(self, name: str) -> list[PluginInfo]:
        """The plugins called ``name``, of any kind (a generator and a scorer may share one)."""
        return [p for p in self.all() if p.name == name]


def _wanted() -> set[str] | None:
    raw = os.environ.get("GENFLOW_PLUGINS")
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


Loaded = tuple[pluggy.PluginManager, dict[str, str], dict[str, tuple[str, str]]]


def build_plugin_manager() -> Loaded:
    """Add the hookspecs, load the ``genflow`` entry points and check them.

    Returns the manager, the plugins that failed to load (source -> error) and
    the source and version of each loaded plugin.
    """
    pm = pluggy.PluginManager("genflow")
    pm.add_hookspecs(hookspecs)
    broken: dict[str, str] = {}
    sources: dict[str, tuple[str, str]] = {}
    wanted = _wanted()
    seen: set[tuple[str, str]] = set()
    for dist in md.distributions():
        dist_name = dist.metadata["name"] or "?"
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP or (dist_name, ep.name) in seen:
                continue
            seen.add((dist_name, ep.name))
            if wanted is not None and ep.name not in wanted:
                continue
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
                sources[ep.name] = ("built-in" if dist_name == "genflow" else dist_name, dist.version)
            except Exception as exc:
                label = f"{dist_name}:{ep.name}"
                broken[label] = f"{ep.value}: {type(exc).__name__}: {exc}"
                log.warning("genflow plugin %s failed to load: %s", label, exc)
    pm.check_pending()
    return pm, broken, sources


@lru_cache(maxsize=1)
def _default_registry() -> Registry:
    return Registry(*build_plugin_manager())


def get_registry(refresh: bool = False) -> Registry:
    if refresh:
        _default_registry.cache_clear()
    return _default_registry()


def registry_with(*plugins: object) -> Registry:
    """A registry with extra plugin objects registered (tests, notebooks)."""
    pm, broken, sources = build_plugin_manager()
    for plugin in plugins:
        pm.register(plugin)
    pm.check_pending()
    return Registry(pm, broken, sources)

"""The plugin manager: built-in and third-party plugins through one entry-point group."""

from __future__ import annotations

import importlib.metadata as md
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import pluggy

from genflow import hookspecs
from genflow.api import Exporter, Generator, Scorer

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "genflow"
KINDS = {"generator": Generator, "scorer": Scorer, "exporter": Exporter}


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
        for kind, hook in (("generator", self.pm.hook.register_generators),
                           ("scorer", self.pm.hook.register_scorers),
                           ("exporter", self.pm.hook.register_exporters)):
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
                        (factory.description or (factory.__doc__ or "")).strip().split("\n")[0])

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

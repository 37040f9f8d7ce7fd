"""The scorers' own tables in ``report.html``: the report knows no scorer's metrics.

For each scorer of the job (``manifest["plugins"]``, kind ``scorer``) with metrics
in ``manifest["metrics"]``, its class's :meth:`genflow.api.Scorer.report_sections`
turns them into :class:`genflow.api.ReportSection` tables. A plugin that is not
installed here, cannot run here, or fails to make its tables gets the generic
default (every number in one row), so a report always rebuilds. The tables of how the
scorers agree with people come from ``manifest["human_agreement"]`` (:func:`human_sections`).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from genflow.api import ReportSection, Scorer
from genflow.outputs.agreement import COMBINED

log = logging.getLogger(__name__)


def scorer_class(plugin: str) -> type[Scorer]:
    """The installed scorer class called ``plugin``, or the :class:`Scorer` base (its defaults)."""
    from genflow.registry import PluginError, get_registry

    try:
        info = get_registry().get("scorer", plugin)
    except PluginError:
        return Scorer
    return info.factory if info.available else Scorer


def scorer_sections(manifest: dict[str, Any]) -> list[ReportSection]:
    """Every scorer's report tables, in the manifest's order of scorers."""
    metrics = manifest.get("metrics") or {}
    sections: list[ReportSection] = []
    for name, entry in (manifest.get("plugins") or {}).items():
        if not isinstance(entry, dict) or entry.get("kind") != "scorer" or not isinstance(metrics.get(name), dict):
            continue
        factory = scorer_class(str(entry.get("plugin") or name))
        try:
            sections += factory.report_sections(name, metrics[name])
        except Exception as exc:  # a plugin's bug costs its tables, not the page
            log.warning("scorer %s: report_sections failed (%s: %s); showing its metrics as they are",
                        name, type(exc).__name__, exc)
            sections += Scorer.report_sections(name, metrics[name])
    return sections


def human_sections(manifest: dict[str, Any]) -> list[ReportSection]:
    """The report's tables of ``human_agreement``: each scorer against the people, and the people
    against each other, as :mod:`genflow.labelling.labels` wrote them."""
    found = manifest.get("human_agreement")
    if not isinstance(found, dict) or not found.get("scorers"):
        return []
    sections = [ReportSection(
        "Agreement with human rankings", ["scorer", "pairwise accuracy", "pairs", "Kendall τ", "prompts"],
        [[r["scorer"], r["pairwise_accuracy"], r["pairs"], r["kendall_tau"], r["prompts"]] for r in found["scorers"]],
        f"{found['rankings']} rankings of {found['prompts']} prompts by {found['annotators']} people. Pairwise "
        "accuracy: of the pairs people ordered that the scorer scores apart, the share it orders their way. "
        "Kendall τ: tau-b against the people's consensus (wins minus losses), averaged over prompts. "
        f"{COMBINED} is the weighted score the rankings use. Trust the scorer that agrees most.")]
    inter = found.get("inter_annotator")
    if isinstance(inter, dict):
        sections.append(ReportSection(
            "Inter-annotator agreement", ["prompts", "annotator pairs", "Kendall τ", "pairwise agreement", "pairs"],
            [[inter["prompts"], inter["annotator_pairs"], inter["kendall_tau"], inter["agreement"], inter["pairs"]]],
            "Prompts ranked by two people or more: how alike each two of them ordered the candidates. A scorer "
            "cannot be expected to agree with people better than they agree with each other."))
    return sections


def filter_sections(manifest: dict[str, Any]) -> list[ReportSection]:
    """The rows the job's filters left out (``manifest["filtered"]``), by target and filter."""
    found = manifest.get("filtered")
    if not isinstance(found, dict) or not found:
        return []
    rows = [[target, name, count] for target, entry in found.items() if isinstance(entry, dict)
            for name, count in (entry.get("by_filter") or {}).items()]
    return [ReportSection("Filtered rows", ["applies to", "filter", "rows left out"], rows,
                          "Rows a filter left out, each in filtered/ with its reason and the row it duplicates: "
                          "a prompt left out is not generated for, a candidate not scored, ranked or exported.")]


def merged(sections: list[ReportSection]) -> list[ReportSection]:
    """Sections of the same title and columns (two scorers of one plugin) as one table, a row each."""
    out: list[ReportSection] = []
    for s in sections:
        same = next((i for i, o in enumerate(out) if (o.title, o.columns) == (s.title, s.columns)), None)
        if same is None:
            out.append(s)
        else:
            o = out[same]
            out[same] = ReportSection(o.title, o.columns, [*o.rows, *s.rows],
                                      o.note if o.note == s.note else " ".join(filter(None, (o.note, s.note))))
    return out


def anchor(title: str, taken: set[str]) -> str:
    """An HTML id from a section's title, unique on the page (``top@k`` -> ``top-at-k``)."""
    base = re.sub(r"[^a-z0-9]+", "-", title.lower().replace("@", " at ")).strip("-") or "section"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    taken.add(name)
    return name


_FIGURE = re.compile(r"^[-+]?[\d,]*\.?\d+\s*%?$")


def _is_figure(cell: Any) -> bool:
    """A number, or text that reads as one (``60.0%``): right-aligned like the page's other figures."""
    if isinstance(cell, bool):
        return False
    return isinstance(cell, (int, float)) or (isinstance(cell, str) and bool(_FIGURE.match(cell.strip())))


def page_sections(manifest: dict[str, Any], taken: set[str]) -> list[dict[str, Any]]:
    """The scorers' tables as the template shows them: id, title, columns, rows, note, and
    which columns hold figures (every cell a number)."""
    out = []
    for s in merged(scorer_sections(manifest) + human_sections(manifest) + filter_sections(manifest)):
        rows = [list(r) for r in s.rows]
        figures = [bool(rows) and all(i < len(r) and (r[i] is None or _is_figure(r[i])) for r in rows)
                   for i in range(len(s.columns))]
        out.append({"id": anchor(s.title, taken), "title": s.title, "columns": list(s.columns),
                    "rows": rows, "note": s.note, "figures": figures})
    return out

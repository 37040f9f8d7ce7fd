"""``report.html`` of one job: what the page shows, gathered into the template's context.

The page reads what the job wrote (see :mod:`genflow.outputs.report.read`), the scorers'
own tables come from their plugins (:mod:`genflow.outputs.report.sections`), and the
template (``genflow/outputs/report/templates/report.html.j2``) escapes every value.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import numpy as np
import yaml

from genflow.data import layout
from genflow.data.storage import Storage
from genflow.outputs.agreement import COMBINED
from genflow.outputs.report.charts import COMBINED_COLOR, PALETTE, histogram
from genflow.outputs.report.read import (
    error_groups,
    folder_counts,
    generator_rows,
    input_folder,
    job_summary,
    read_table,
    score_values,
    scorer_metrics,
    stage_rows,
)
from genflow.outputs.report.render import environment
from genflow.outputs.report.rounds import rounds_context
from genflow.outputs.report.samples import (
    SAMPLE_PROMPTS,
    add_derived_media,
    add_episodes,
    add_thumbnails,
    media_columns,
    sample_ids,
    samples,
)
from genflow.outputs.report.sections import page_sections

FIXED_SECTIONS = ("summary", "throughput", "errors", "scores", "rounds", "agreement", "images", "samples", "config")
"""The ids of the page's own sections; a scorer's table never takes one of them."""


class ReportError(RuntimeError):
    """The folder holds no job output to report on."""


def _chart_row(name: str, values: np.ndarray, color: str) -> dict[str, Any]:
    return {"name": name, "svg": histogram(values, name, color), "n": len(values),
            "mean": float(np.mean(values)), "median": float(np.median(values)),
            "min": float(np.min(values)), "max": float(np.max(values))}


def _histograms(storage: Storage, scorer_names: list[str]) -> list[dict[str, Any]]:
    """A histogram per scorer, in its palette colour, and one of the combined score when several weigh in."""
    values = score_values(storage, scorer_names)
    charts = [_chart_row(name, values[name], PALETTE[i % len(PALETTE)])
              for i, name in enumerate(scorer_names) if len(values.get(name, ()))]
    if len(values.get("", ())):
        charts.append(_chart_row("combined (weighted)", values[""], COMBINED_COLOR))
    return charts


def _agreement_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The scorer agreement rows of the manifest (a job with several scorers), as the page shows them."""
    agreement = manifest.get("agreement")
    rows = agreement.get("pairs") if isinstance(agreement, dict) else None
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def _in_field_order(config: dict[str, Any]) -> dict[str, Any]:
    """The config's keys in the order the docs write them (name, input, output, ...), not sorted."""
    from genflow.config import JobConfig

    order = list(JobConfig.model_fields)
    return dict(sorted(config.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def report_context(storage: Storage, manifest: dict[str, Any]) -> dict[str, Any]:
    # As stored in manifest.json (sorted keys): the page is the same whether written by the job or rebuilt.
    manifest = json.loads(json.dumps(manifest, sort_keys=True, default=str))
    config = manifest.get("config") or {}
    scorer_names = [s.get("label") or s.get("plugin") for s in config.get("scorers", [])]
    weights = {s.get("label") or s.get("plugin"): s.get("weight", 1.0) for s in config.get("scorers", [])}
    prompts = read_table(storage, layout.PROMPTS, ["prompt_id"])
    ids = sample_ids(prompts["prompt_id"].to_pylist()) if prompts is not None else []
    sampled = samples(storage, scorer_names, ids, media_columns(config))
    add_episodes(storage, config, sampled)
    images = any(c["modality"] == "image" for p in sampled for c in p["candidates"])
    if images:
        base_dir = manifest.get("input_dir") or input_folder(config)
        add_derived_media(storage, config, sampled, base_dir)
        add_thumbnails(storage, sampled, base_dir)
    rows = manifest.get("rows", {})
    return {
        "title": f"{manifest.get('name', 'genflow job')}",
        "manifest": manifest,
        "summary": job_summary(storage, manifest),
        "counts": folder_counts(manifest),
        "errors_folder": layout.ERRORS,
        "error_info": manifest.get("errors", {}),
        "stages": stage_rows(manifest),
        "generators": generator_rows(storage),
        "errors": error_groups(storage),
        "histograms": _histograms(storage, scorer_names),
        "scorer_sections": page_sections(manifest, set(FIXED_SECTIONS)),
        "agreement": _agreement_rows(manifest),
        "rounds": rounds_context(storage),
        "agreement_combined": COMBINED,
        "scorer_names": scorer_names,
        "weights": weights,
        "samples": sampled,
        "images": images,
        "code": any(c["modality"] == "code" for p in sampled for c in p["candidates"]),
        "metrics": scorer_metrics(manifest),
        "plugins": dict(sorted((manifest.get("plugins") or {}).items(),
                               key=lambda kv: (kv[1].get("kind") != "generator", kv[0]))),
        "versions": manifest.get("versions", {}),
        "config_yaml": yaml.safe_dump(_in_field_order(config), sort_keys=False, allow_unicode=True, width=100),
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "sample_size": SAMPLE_PROMPTS,
        "total_prompts": rows.get(layout.PROMPTS),
    }


def build_report(storage: Storage, manifest: dict[str, Any] | None = None) -> str:
    """The report page for the job stored at ``storage``."""
    if manifest is None:
        if not storage.exists(layout.MANIFEST):
            raise ReportError(f"{storage.uri} holds no {layout.MANIFEST}: is it a genflow job's output folder?")
        manifest = storage.read_json(layout.MANIFEST)
    return environment().get_template("report.html.j2").render(**report_context(storage, manifest))

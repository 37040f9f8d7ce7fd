"""``report.html``: one self-contained page to judge what a job made.

Counts, throughput, the most common errors, a score histogram per scorer, the
best and worst candidates of a sample of prompts (an image grid for image
jobs), pass@k for code jobs and the config. Everything is in the one file:
charts are SVG and images are thumbnails, both as data URIs, so the page opens
from a bucket, an e-mail or a laptop with no network. Generated text is
untrusted: the template escapes every value and control characters are shown
as symbols.

The page reads what a job wrote (``manifest.json`` and its Parquet folders),
so ``genflow report OUTPUT`` rebuilds it at any time. Large jobs stay cheap:
the samples are read with a filter on a few prompt ids, and the histograms
read two columns.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import math
import posixpath
import re
import time
from collections import Counter
from datetime import datetime, timezone
from typing import Any

import jinja2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import yaml
from markupsafe import Markup, escape

from genflow.storage import Storage, read_bytes

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
SAMPLE_PROMPTS = 8
"""Prompts shown with their candidates (chosen by a stable hash of their id)."""
SHOWN_PER_END = 2
"""Top and bottom candidates shown per prompt."""
MAX_TEXT_CHARS = 4000
THUMBNAIL_PX = 192
TOP_ERRORS = 10
PALETTE = ["#3b6ea8", "#c8553d", "#2a9d8f", "#8e6bbf", "#e9a23b", "#5c677d"]


class ReportError(RuntimeError):
    """The folder holds no job output to report on."""


# -- reading the job's outputs ------------------------------------------------

def _dataset(storage: Storage, folder: str) -> ds.Dataset | None:
    parts = storage.list(folder, ".parquet")
    if not parts:
        return None
    return ds.dataset([storage.path(p) for p in parts], filesystem=storage.fs, format="parquet")


def _read(storage: Storage, folder: str, columns: list[str], where: Any = None) -> pa.Table | None:
    dataset = _dataset(storage, folder)
    if dataset is None:
        return None
    present = [c for c in columns if c in dataset.schema.names]
    return dataset.to_table(columns=present, filter=where)


def _sample_ids(ids: list[str], k: int) -> list[str]:
    """A stable sample spread over the whole input (same prompts on every rebuild)."""
    return sorted(ids, key=lambda i: hashlib.sha256(i.encode()).hexdigest())[:k]


def _float_or_none(value: Any) -> float | None:
    if value is None:
        return None
    f = float(value)
    return None if math.isnan(f) else f


def job_summary(storage: Storage, manifest: dict[str, Any]) -> dict[str, Any]:
    """A job's headline figures: counts, mean/median scores, pass@k, tokens/s (one sweep row)."""
    rows = manifest.get("rows", {})
    figures: dict[str, Any] = {
        "status": manifest.get("status"),
        "prompts": rows.get("prompts"),
        "generations": rows.get("generations"),
        "scores": rows.get("scores"),
        "errors": rows.get("errors"),
        "error_fraction": manifest.get("errors", {}).get("fraction"),
    }
    rankings = _read(storage, "rankings", ["score"])
    if rankings is not None and rankings.num_rows:
        values = rankings["score"].drop_null().to_numpy(zero_copy_only=False)
        figures["score_mean"] = float(np.mean(values)) if len(values) else None
        figures["score_median"] = float(np.median(values)) if len(values) else None
    scores = _read(storage, "scores", ["scorer", "score"])
    if scores is not None and scores.num_rows:
        means = scores.group_by("scorer").aggregate([("score", "mean")])
        for scorer, mean in zip(means["scorer"].to_pylist(), means["score_mean"].to_pylist(), strict=True):
            figures[f"{scorer}_mean"] = _float_or_none(mean)
    passk = _pass_at_k(manifest)
    several = len(passk) > 1
    for scorer, values in passk.items():
        for k, v in values.items():
            figures[f"{scorer}.{k}" if several else k] = v
    gens = _read(storage, "generations", ["num_tokens", "latency_s"])
    if gens is not None and gens.num_rows:
        figures.update(_throughput(gens))
    figures["seconds"] = manifest.get("timings_s", {}).get("total")
    figures["folder"] = manifest.get("output") or storage.uri
    return figures


def _throughput(gens: pa.Table) -> dict[str, float | None]:
    """Per-worker throughput: tokens (or candidates) over the seconds the model spent on them."""
    latency = float(pc.sum(gens["latency_s"]).as_py() or 0.0)
    tokens = pc.sum(gens["num_tokens"]).as_py()
    return {"tokens_per_s": (tokens / latency) if tokens and latency > 0 else None,
            "generations_per_s": (gens.num_rows / latency) if latency > 0 else None}


def _pass_at_k(manifest: dict[str, Any]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for scorer, metrics in (manifest.get("metrics") or {}).items():
        if isinstance(metrics, dict):
            values = {k: float(v) for k, v in metrics.items() if k.startswith("pass@") and v is not None}
            if values:
                out[scorer] = dict(sorted(values.items(), key=lambda kv: int(kv[0][5:]) if kv[0][5:].isdigit()
                                          else 0))
    return out


# -- charts -------------------------------------------------------------------

def _svg_data_uri(fig: Any) -> str:
    import matplotlib

    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "genflow"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode()


def _style_axes(ax: Any) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color("#9aa3ad")
    ax.tick_params(colors="#4a5560", labelsize=8)
    ax.grid(axis="y", color="#e6e9ed", linewidth=0.8)
    ax.set_axisbelow(True)


def histogram(values: np.ndarray, title: str, color: str) -> str:
    """A score histogram with its mean and median marked, as an SVG data URI."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.4, 2.5), dpi=100)
    ax = fig.add_subplot()
    bins = int(min(40, max(8, math.sqrt(len(values)) * 2)))
    lo, hi = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    ax.hist(values, bins=bins, range=(lo, hi), color=color, edgecolor="white", linewidth=0.5)
    if len(values):
        ax.axvline(float(np.mean(values)), color="#1f2933", linestyle="--", linewidth=1, label="mean")
        ax.axvline(float(np.median(values)), color="#1f2933", linestyle=":", linewidth=1, label="median")
        ax.legend(frameon=False, fontsize=7, loc="upper right")
    ax.set_title(title, loc="left", fontsize=10, color="#1f2933")
    ax.set_ylabel("candidates", fontsize=8, color="#4a5560")
    _style_axes(ax)
    return _svg_data_uri(fig)


def bar_chart(labels: list[str], values: list[float | None], title: str, best: int | None = None) -> str:
    """Horizontal bars, one per run (sweep comparison), as an SVG data URI."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 0.6 + 0.3 * max(1, len(labels))), dpi=100)
    ax = fig.add_subplot()
    shown = [0.0 if v is None else v for v in values]
    colors = [PALETTE[1] if i == best else PALETTE[0] for i in range(len(labels))]
    ax.barh(range(len(labels)), shown, color=colors, height=0.65)
    ax.set_yticks(range(len(labels)), labels=labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title, loc="left", fontsize=10, color="#1f2933")
    _style_axes(ax)
    ax.grid(axis="x", color="#e6e9ed", linewidth=0.8)
    ax.grid(axis="y", visible=False)
    return _svg_data_uri(fig)


# -- images -------------------------------------------------------------------

def thumbnail(data: bytes, size: int = THUMBNAIL_PX) -> str:
    """A small JPEG of an image as a data URI (a report with many images stays a few MB)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as source:
        img = source.convert("RGB")
    img.thumbnail((size, size))
    if max(img.size) < size:  # tiny test images: scale up so the grid is readable
        factor = size / max(img.size)
        img = img.resize((max(1, round(img.width * factor)), max(1, round(img.height * factor))),
                         Image.Resampling.NEAREST)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


def _image(storage: Storage, path: str | None) -> dict[str, Any]:
    if not path:
        return {"src": None, "href": None, "error": "no image"}
    try:
        data = storage.read_bytes(path) if path.startswith("images/") else read_bytes(path)
        src = thumbnail(data)
    except Exception as exc:  # a missing image is shown, not fatal
        return {"src": None, "href": None, "error": f"cannot read {path}: {exc}"}
    href = path if storage.local and path.startswith("images/") else None
    return {"src": src, "href": href, "error": None}


def _input_image(value: Any, job_input: str) -> dict[str, Any]:
    """A prompt row's ``image`` / ``mask`` (bytes, a datasets image struct, or a path) as a thumbnail."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    try:
        if isinstance(value, str):
            if "://" not in value and not posixpath.isabs(value):
                base = posixpath.dirname(job_input) if job_input.endswith(".parquet") else job_input
                value = posixpath.join(base, value)
            value = read_bytes(value)
        return {"src": thumbnail(value), "href": None, "error": None}
    except Exception as exc:  # an input image that moved since the job ran: say so, keep the page
        return {"src": None, "href": None, "error": f"input not readable: {exc}"}


# -- the page -----------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def visible(text: Any, limit: int = MAX_TEXT_CHARS) -> Markup:
    """Untrusted text, escaped, with control characters shown as ``\\xNN`` and long text cut."""
    if text is None:
        return Markup("")
    s = str(text)
    extra = len(s) - limit
    if extra > 0:
        s = s[:limit]
    out, last = [], 0
    for m in _CONTROL.finditer(s):
        out.append(escape(s[last:m.start()]))
        out.append(Markup('<span class="ctl">%s</span>') % f"\\x{ord(m.group()):02x}")
        last = m.end()
    out.append(escape(s[last:]))
    if extra > 0:
        out.append(Markup('<span class="muted">\n… (%s more characters)</span>') % f"{extra:,}")
    return Markup("").join(out)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 10 ** -digits):
            return f"{value:.{digits}g}"
        return f"{value:,.{digits}f}"
    return str(value)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("genflow", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["visible"] = visible
    env.filters["fmt"] = _fmt
    return env


def _samples(storage: Storage, scorer_names: list[str], ids: list[str]) -> list[dict[str, Any]]:
    """The sampled prompts with their ranked candidates (top and bottom ends)."""
    where = pc.field("prompt_id").isin(ids)
    gens = _read(storage, "generations", ["prompt_id", "generation_id", "generator", "sample", "modality",
                                          "prompt", "text", "image_path"], where)
    if gens is None:
        return []
    prompts = _read(storage, "prompts", ["prompt_id", "prompt", "image", "mask"], where)
    prompt_rows = {r["prompt_id"]: r for r in prompts.to_pylist()} if prompts is not None else {}
    original = {pid: r["prompt"] for pid, r in prompt_rows.items()}
    ranks = _read(storage, "rankings", ["generation_id", "rank", "score"], where)
    rank_of = {} if ranks is None else {g: (r, s) for g, r, s in zip(
        ranks["generation_id"].to_pylist(), ranks["rank"].to_pylist(), ranks["score"].to_pylist(), strict=True)}
    scores = _read(storage, "scores", ["generation_id", "scorer", "score", "details"], where)
    per_scorer: dict[str, dict[str, float]] = {}
    outcomes: dict[str, list[tuple[str, str]]] = {}
    if scores is not None:
        for row in scores.to_pylist():
            per_scorer.setdefault(row["generation_id"], {})[row["scorer"]] = row["score"]
            outcome = _outcome(row.get("details"))
            if outcome:
                outcomes.setdefault(row["generation_id"], []).append((row["scorer"], outcome))
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for row in gens.to_pylist():
        rank, combined = rank_of.get(row["generation_id"], (None, None))
        by_prompt.setdefault(row["prompt_id"], []).append(
            {**row, "rank": rank, "score": combined,
             "scores": [per_scorer.get(row["generation_id"], {}).get(n) for n in scorer_names],
             "outcomes": outcomes.get(row["generation_id"], [])})
    out = []
    for pid in ids:
        cands = by_prompt.get(pid)
        if not cands:
            continue
        cands.sort(key=lambda c: (c["rank"] is None, c["rank"] or 0, c["generator"], c["sample"]))
        hidden = max(0, len(cands) - 2 * SHOWN_PER_END)
        ends = cands if not hidden else cands[:SHOWN_PER_END] + cands[-SHOWN_PER_END:]
        rendered = cands[0]["prompt"]
        out.append({"prompt_id": pid, "prompt": original.get(pid, rendered),
                    "inputs": {k: v for k in ("image", "mask") if (v := prompt_rows.get(pid, {}).get(k)) is not None},
                    "rendered": rendered if rendered != original.get(pid, rendered) else None,
                    "candidates": cands, "top": ends[:SHOWN_PER_END] if hidden else ends,
                    "bottom": ends[SHOWN_PER_END:] if hidden else [], "hidden": hidden})
    return out


def _outcome(details: str | None) -> str | None:
    """A scorer's one-word verdict on a candidate (code-exec: passed, failed: ..., timed out)."""
    try:
        value = json.loads(details or "{}").get("outcome")
    except (ValueError, AttributeError):
        return None
    return str(value)[:120] if value else None


def _errors(storage: Storage) -> list[dict[str, Any]]:
    table = _read(storage, "errors", ["stage", "plugin", "error", "traceback", "prompt_id"])
    if table is None or table.num_rows == 0:
        return []
    groups: Counter[tuple[str, str, str]] = Counter()
    example: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in table.to_pylist():
        first = (row["error"] or "").strip().splitlines()[0][:300] if row["error"] else "(no message)"
        key = (row["stage"] or "?", row["plugin"] or "?", first)
        groups[key] += 1
        example.setdefault(key, row)
    return [{"stage": k[0], "plugin": k[1], "error": k[2], "count": n,
             "prompt_id": example[k]["prompt_id"], "traceback": example[k]["traceback"] or ""}
            for k, n in groups.most_common(TOP_ERRORS)]


def _histograms(storage: Storage, scorer_names: list[str]) -> list[dict[str, Any]]:
    charts = []
    scores = _read(storage, "scores", ["scorer", "score"])
    if scores is not None:
        for i, name in enumerate(scorer_names):
            values = scores.filter(pc.equal(scores["scorer"], name))["score"].drop_null().to_numpy(
                zero_copy_only=False)
            if len(values):
                charts.append(_chart_row(name, values, PALETTE[i % len(PALETTE)]))
    rankings = _read(storage, "rankings", ["score"])
    if rankings is not None and rankings.num_rows and len(scorer_names) > 1:
        values = rankings["score"].drop_null().to_numpy(zero_copy_only=False)
        charts.append(_chart_row("combined (weighted)", values, "#5c677d"))
    return charts


def _chart_row(name: str, values: np.ndarray, color: str) -> dict[str, Any]:
    return {"name": name, "svg": histogram(values, name, color), "n": len(values),
            "mean": float(np.mean(values)), "median": float(np.median(values)),
            "min": float(np.min(values)), "max": float(np.max(values))}


_FOLDER_ORDER = ("prompts", "generations", "scores", "rankings", "preferences", "sft", "errors")
_STAGE_ORDER = ("prompts", "generate", "score", "rank")


def _stages(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    stages = manifest.get("stages") or {}

    def order(name: str) -> tuple[int, str]:
        kind = name.split("/")[0]
        return (_STAGE_ORDER.index(kind) if kind in _STAGE_ORDER else len(_STAGE_ORDER), name)

    for stage in sorted(stages, key=order):
        s = stages[stage]
        computed = s.get("shards", 0) - s.get("skipped", 0)
        seconds = s.get("seconds") or 0.0
        rows.append({"stage": stage, "shards": s.get("shards", 0), "skipped": s.get("skipped", 0),
                     "work_items": s.get("work_items", 0), "errors": s.get("errors", 0), "seconds": seconds,
                     "rate": (s.get("work_items", 0) / seconds) if computed and seconds > 0 else None})
    return rows


def _generators(storage: Storage) -> list[dict[str, Any]]:
    gens = _read(storage, "generations", ["generator", "model", "num_tokens", "latency_s"])
    if gens is None or gens.num_rows == 0:
        return []
    out = []
    for label in sorted(set(gens["generator"].to_pylist())):
        part = gens.filter(pc.equal(gens["generator"], label))
        tokens = pc.sum(part["num_tokens"]).as_py()
        out.append({"label": label, "model": part["model"][0].as_py(), "generations": part.num_rows,
                    "tokens": tokens, "mean_tokens": (tokens / part.num_rows) if tokens else None,
                    **_throughput(part)})
    return out


def report_context(storage: Storage, manifest: dict[str, Any]) -> dict[str, Any]:
    # As stored in manifest.json (sorted keys): the page is the same whether written by the job or rebuilt.
    manifest = json.loads(json.dumps(manifest, sort_keys=True, default=str))
    config = manifest.get("config") or {}
    scorer_names = [s.get("label") or s.get("plugin") for s in config.get("scorers", [])]
    weights = {s.get("label") or s.get("plugin"): s.get("weight", 1.0) for s in config.get("scorers", [])}
    prompts = _read(storage, "prompts", ["prompt_id"])
    ids = _sample_ids(prompts["prompt_id"].to_pylist(), SAMPLE_PROMPTS) if prompts is not None else []
    samples = _samples(storage, scorer_names, ids)
    images = any(c["modality"] == "image" for p in samples for c in p["candidates"])
    if images:
        for p in samples:
            for c in p["candidates"]:
                c["image"] = _image(storage, c["image_path"])
            p["inputs"] = {k: _input_image(v, config.get("input", "")) for k, v in p["inputs"].items()}
    passk = _pass_at_k(manifest)
    other_metrics = {name: {k: v for k, v in m.items() if not k.startswith("pass@")}
                     for name, m in (manifest.get("metrics") or {}).items() if isinstance(m, dict)}
    rows = manifest.get("rows", {})
    errors = manifest.get("errors", {})
    return {
        "title": f"{manifest.get('name', 'genflow job')}",
        "manifest": manifest,
        "summary": job_summary(storage, manifest),
        "counts": sorted(rows.items(), key=lambda kv: (_FOLDER_ORDER.index(kv[0]) if kv[0] in _FOLDER_ORDER
                                                       else len(_FOLDER_ORDER), kv[0])),
        "error_info": errors,
        "stages": _stages(manifest),
        "generators": _generators(storage),
        "errors": _errors(storage),
        "histograms": _histograms(storage, scorer_names),
        "scorer_names": scorer_names,
        "weights": weights,
        "samples": samples,
        "images": images,
        "code": any(c["modality"] == "code" for p in samples for c in p["candidates"]),
        "passk": passk,
        "passk_ks": sorted({k for v in passk.values() for k in v}, key=lambda k: int(k[5:])),
        "other_metrics": {k: v for k, v in other_metrics.items() if v},
        "plugins": dict(sorted((manifest.get("plugins") or {}).items(),
                               key=lambda kv: (kv[1].get("kind") != "generator", kv[0]))),
        "versions": manifest.get("versions", {}),
        "config_yaml": yaml.safe_dump(_in_field_order(config), sort_keys=False, allow_unicode=True, width=100),
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "sample_size": SAMPLE_PROMPTS,
        "total_prompts": rows.get("prompts"),
    }


def _in_field_order(config: dict[str, Any]) -> dict[str, Any]:
    """The config's keys in the order the docs write them (name, input, output, ...), not sorted."""
    from genflow.config import JobConfig

    order = list(JobConfig.model_fields)
    return dict(sorted(config.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def build_report(storage: Storage, manifest: dict[str, Any] | None = None) -> str:
    """The report page for the job stored at ``storage``."""
    if manifest is None:
        if not storage.exists("manifest.json"):
            raise ReportError(f"{storage.uri} holds no manifest.json: is it a genflow job's output folder?")
        manifest = storage.read_json("manifest.json")
    return _environment().get_template("report.html.j2").render(**report_context(storage, manifest))


def write_report(storage: Storage, manifest: dict[str, Any] | None = None) -> str:
    """Write ``report.html`` next to the job's outputs; returns its URI."""
    storage.write_bytes(REPORT_FILE, build_report(storage, manifest).encode())
    return storage.uri_of(REPORT_FILE)


def write_report_safely(storage: Storage, manifest: dict[str, Any]) -> str | None:
    """``write_report`` for the end of a job: a report that cannot be built never fails the job."""
    started = time.perf_counter()
    try:
        uri = write_report(storage, manifest)
    except Exception as exc:  # the data is written; the page is a convenience
        log.warning("report.html not written (%s: %s); rebuild it with `genflow report %s`",
                    type(exc).__name__, exc, storage.uri, exc_info=log.isEnabledFor(logging.DEBUG))
        return None
    log.info("report: %s (%.1fs)", uri, time.perf_counter() - started)
    return uri


# -- sweeps -------------------------------------------------------------------

SWEEP_FILE = "sweep.html"
CHARTED = ("score_mean", "tokens_per_s")
"""Sweep metrics drawn as bar charts (plus every pass@k and per-scorer mean)."""
HEADERS = {"score_mean": "mean score", "score_median": "median score", "tokens_per_s": "tokens/s",
           "generations_per_s": "candidates/s", "generations": "candidates", "errors": "errors",
           "seconds": "seconds"}
_LOWER_IS_BETTER = {"errors", "error_fraction", "seconds"}


def _sweep_metrics(columns: list[str]) -> list[str]:
    """The figures the comparison table shows, in reading order (``sweep.parquet`` has them all)."""
    scorer_means = [c for c in columns if c.endswith("_mean") and c != "score_mean"]
    passk = [c for c in columns if "pass@" in c]
    wanted = ["score_mean", "score_median", *scorer_means, *passk, "tokens_per_s", "errors", "seconds"]
    return [c for c in wanted if c in columns]


def _run_label(run: str) -> str:
    """A run's values only (``tiny-gpt2 · 0.7``), short enough for a chart's axis."""
    label = " · ".join(part.partition("=")[2] for part in run.split("__"))
    return label if len(label) <= 48 else label[:47] + "…"


def build_sweep_report(table: pa.Table, meta: dict[str, Any]) -> str:
    """The comparison page of a sweep, from its ``sweep.parquet`` table."""
    columns: dict[str, str] = meta.get("columns", {})
    params = list(columns.values())
    metrics = _sweep_metrics(table.column_names)
    rows = table.to_pylist()
    best: dict[str, int] = {}
    for m in metrics:
        values = [(i, r[m]) for i, r in enumerate(rows)
                  if isinstance(r[m], (int, float)) and r.get("status") == "completed"]
        if len({v for _, v in values}) >= 2:
            best[m] = (min if m in _LOWER_IS_BETTER else max)(values, key=lambda iv: iv[1])[0]
    labels = [_run_label(r["run"]) for r in rows]
    charts = []
    for m in metrics:
        if (m in CHARTED or "pass@" in m or (m.endswith("_mean") and len(
                [c for c in metrics if c.endswith("_mean")]) > 2)) and any(
                isinstance(r[m], (int, float)) for r in rows):
            charts.append({"metric": m, "svg": bar_chart(labels, [r[m] for r in rows], HEADERS.get(m, m),
                                                         best.get(m))})
    for i, r in enumerate(rows):
        r["_index"] = i
        r["href"] = f"{r['run']}/{REPORT_FILE}" if r.get("folder") else None
    return _environment().get_template("sweep.html.j2").render(
        title=f"sweep {meta.get('name', '')}", meta=meta, params=params, metrics=metrics, rows=rows,
        headers={**HEADERS, **{m: m.replace("_mean", " mean") for m in metrics if m.endswith("_mean")
                                and m not in HEADERS}}, best=best, charts=charts, keys=columns,
        best_run=rows[best["score_mean"]]["run"] if "score_mean" in best else None,
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def write_sweep_report(storage: Storage, table: pa.Table) -> str:
    meta = json.loads((table.schema.metadata or {}).get(b"genflow.sweep", b"{}"))
    storage.write_bytes(SWEEP_FILE, build_sweep_report(table, meta).encode())
    return storage.uri_of(SWEEP_FILE)


def rebuild(uri: str, endpoint_url: str | None = None) -> list[str]:
    """Rebuild the pages of a job folder (report.html) or a sweep folder (sweep.html and each run's)."""
    import pyarrow.parquet as pq

    storage = Storage.open(uri, endpoint_url)
    if storage.exists("manifest.json"):
        return [write_report(storage)]
    if storage.exists("sweep.parquet"):
        with storage.fs.open_input_file(storage.path("sweep.parquet")) as f:
            table = pq.read_table(f)
        written = []
        for run in table["run"].to_pylist():
            run_storage = Storage.open(f"{uri.rstrip('/')}/{run}", endpoint_url)
            if run_storage.exists("manifest.json"):
                written.append(write_report(run_storage))
        return [write_sweep_report(storage, table), *written]
    raise ReportError(f"{uri}: no manifest.json or sweep.parquet here; give the output folder of a job or sweep")

"""The sampled prompts of a report, each with its ranked candidates, their scores and verdicts.

A stable sample (the same prompts on every rebuild, spread over the whole input) is
read with a filter on its prompt ids, so a large job reads a few rows. A scorer's
one-word verdict on a candidate is the ``"outcome"`` of its :class:`genflow.api.Score`'s
``details`` (see :func:`outcome`). Image candidates and the pictures a row gives its
generators (the columns they declare in ``media_columns``) become thumbnails; their paths
are resolved by :mod:`genflow.data.layout`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from genflow.data import layout
from genflow.data.storage import Storage, read_bytes
from genflow.outputs.report.read import read_table

SAMPLE_PROMPTS = 8
"""Prompts shown with their candidates (chosen by a stable hash of their id)."""
SHOWN_PER_END = 2
"""Top and bottom candidates shown per prompt."""
THUMBNAIL_PX = 192
OUTCOME_CHARS = 120


def sample_ids(ids: list[str], k: int = SAMPLE_PROMPTS) -> list[str]:
    """A stable sample spread over the whole input (same prompts on every rebuild)."""
    return sorted(ids, key=lambda i: hashlib.sha256(i.encode()).hexdigest())[:k]


def outcome(details: str | None) -> str | None:
    """A scorer's short verdict on a candidate, shown beside it: ``details["outcome"]``.

    The convention for any scorer: a :class:`genflow.api.Score` whose ``details`` hold
    ``"outcome"`` (a short string, such as ``passed`` or ``timed out``) gets it printed
    under the candidate, as ``<scorer>: <outcome>``, cut to ``OUTCOME_CHARS``."""
    try:
        value = json.loads(details or "{}").get("outcome")
    except (ValueError, AttributeError):
        return None
    return str(value)[:OUTCOME_CHARS] if value else None


def media_columns(config: dict[str, Any]) -> tuple[str, ...]:
    """The input columns the job's generators show as pictures (their ``media_columns``), in the
    config's order; a generator not installed here shows none."""
    from genflow.registry import PluginError, get_registry

    registry = get_registry()
    found: dict[str, None] = {}
    for spec in config.get("generators") or []:
        try:
            factory = registry.get("generator", str(spec.get("plugin"))).factory
        except PluginError:
            continue
        found.update(dict.fromkeys(factory.media_columns))
    return tuple(found)


EPISODE_STEP_CHARS = 400
"""The most of one message of an episode the report shows (its tool calls each as much)."""


def episode_steps(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """An episode's messages after its opening, as the report lists them: who spoke and what,
    each tool call as ``-> name(arguments)``, every text cut to :data:`EPISODE_STEP_CHARS`."""
    def cut(text: str) -> str:
        return text if len(text) <= EPISODE_STEP_CHARS else text[:EPISODE_STEP_CHARS] + " [...]"

    start = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), len(messages))
    steps = []
    for message in messages[start:]:
        content = message.get("content")
        lines = [cut(content)] if isinstance(content, str) and content else []
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            lines.append(f"-> {function.get('name')}({cut(str(function.get('arguments') or ''))})")
        steps.append({"role": str(message.get("role")), "text": "\n".join(lines)})
    return steps


def add_episodes(storage: Storage, config: dict[str, Any], sampled: list[dict[str, Any]]) -> None:
    """Give each sampled candidate that is an episode (a generator with ``max_turns`` above 1) its
    turns in short (``episode``: turns, tool calls and :func:`episode_steps`), read from its
    generator's parts only."""
    labels = [str(g.get("label")) for g in config.get("generators") or [] if (g.get("max_turns") or 1) > 1]
    candidates = {c["generation_id"]: c for p in sampled for c in p["candidates"]}
    if not labels or not candidates:
        return
    where = pc.field("generation_id").isin(list(candidates))
    for rel in storage.list(layout.GENERATIONS, ".parquet"):
        if not any(rel.endswith(f"-{label}.parquet") for label in labels):
            continue
        try:
            table = storage.read_table(rel, ["generation_id", "messages", "turns", "tool_calls"]).filter(where)
        except (KeyError, pa.ArrowException):  # another generator's part whose label ends alike
            continue
        for row in table.to_pylist():
            try:
                messages = json.loads(row["messages"] or "[]")
            except ValueError:
                continue
            candidates[row["generation_id"]]["episode"] = {
                "turns": row["turns"], "tool_calls": row["tool_calls"], "steps": episode_steps(messages)}


def samples(storage: Storage, scorer_names: list[str], ids: list[str],
            media: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The sampled prompts with their ranked candidates (top and bottom ends); ``media``: the
    prompt columns shown as pictures beside them (:func:`media_columns`)."""
    where = pc.field("prompt_id").isin(ids)
    gens = read_table(storage, layout.GENERATIONS, ["prompt_id", "generation_id", "generator", "sample",
                                                    "modality", "prompt", "text", "image_path"], where)
    if gens is None:
        return []
    prompts = read_table(storage, layout.PROMPTS, ["prompt_id", "prompt", *media], where)
    prompt_rows = {r["prompt_id"]: r for r in prompts.to_pylist()} if prompts is not None else {}
    original = {pid: r["prompt"] for pid, r in prompt_rows.items()}
    ranks = read_table(storage, layout.RANKINGS, ["generation_id", "rank", "score"], where)
    rank_of = {} if ranks is None else {g: (r, s) for g, r, s in zip(
        ranks["generation_id"].to_pylist(), ranks["rank"].to_pylist(), ranks["score"].to_pylist(), strict=True)}
    scores = read_table(storage, layout.SCORES, ["generation_id", "scorer", "score", "details"], where)
    per_scorer: dict[str, dict[str, float]] = {}
    verdicts: dict[str, list[tuple[str, str]]] = {}
    if scores is not None:
        for row in scores.to_pylist():
            per_scorer.setdefault(row["generation_id"], {})[row["scorer"]] = row["score"]
            verdict = outcome(row.get("details"))
            if verdict:
                verdicts.setdefault(row["generation_id"], []).append((row["scorer"], verdict))
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for row in gens.to_pylist():
        rank, combined = rank_of.get(row["generation_id"], (None, None))
        by_prompt.setdefault(row["prompt_id"], []).append(
            {**row, "rank": rank, "score": combined,
             "scores": [per_scorer.get(row["generation_id"], {}).get(n) for n in scorer_names],
             "outcomes": verdicts.get(row["generation_id"], [])})
    out = []
    for pid in ids:
        cands = by_prompt.get(pid)
        if not cands:
            continue
        cands.sort(key=lambda c: (c["rank"] is None, c["rank"] or 0, c["generator"], c["sample"]))
        hidden = max(0, len(cands) - 2 * SHOWN_PER_END)
        ends = cands if not hidden else cands[:SHOWN_PER_END] + cands[-SHOWN_PER_END:]
        rendered = cands[0]["prompt"]
        row = prompt_rows.get(pid, {})
        out.append({"prompt_id": pid, "prompt": original.get(pid, rendered),
                    "inputs": {k: v for k in media if (v := row.get(k)) is not None},
                    "rendered": rendered if rendered != original.get(pid, rendered) else None,
                    "candidates": cands, "top": ends[:SHOWN_PER_END] if hidden else ends,
                    "bottom": ends[SHOWN_PER_END:] if hidden else [], "hidden": hidden})
    return out


def add_derived_media(storage: Storage, config: dict[str, Any], sampled: list[dict[str, Any]],
                      base_dir: str) -> None:
    """Add to the sampled prompts' pictures those the job's generators make from the rows before
    generating (:meth:`genflow.api.Generator.derived_media`, an outpainting mask); a generator
    not installed here, or a row it cannot make one for, adds none."""
    from pydantic import ValidationError

    from genflow.registry import PluginError, get_registry

    registry = get_registry()
    makers = []
    for spec in config.get("generators") or []:
        try:
            factory = registry.get("generator", str(spec.get("plugin"))).factory
            makers.append((factory, factory.Params.model_validate(spec.get("params") or {})))
        except (PluginError, ValidationError):  # not installed here, or params of another version
            continue
    if not makers or not sampled:
        return
    columns = sorted({c for factory, _ in makers for c in factory.input_columns})
    rows = read_table(storage, layout.PROMPTS, ["prompt_id", *columns],
                      pc.field("prompt_id").isin([p["prompt_id"] for p in sampled]))
    by_id = {r["prompt_id"]: r for r in rows.to_pylist()} if rows is not None else {}
    for p in sampled:
        row = by_id.get(p["prompt_id"], {})
        for factory, params in makers:
            inputs = {k: layout.resolve_input_path(v, base_dir) if k in factory.path_columns else v
                      for k in factory.input_columns if (v := row.get(k)) is not None}
            try:
                pictures = factory.derived_media(inputs, params)
            except Exception:  # a row it cannot make them for: its errors/ entry says why
                continue
            for name, data in pictures.items():
                p["inputs"].setdefault(name, data)


def add_thumbnails(storage: Storage, sampled: list[dict[str, Any]], base_dir: str) -> None:
    """Put a thumbnail on every candidate and input image of the sampled prompts (an image job's)."""
    for p in sampled:
        for c in p["candidates"]:
            c["image"] = candidate_thumbnail(storage, c["image_path"], base_dir)
        p["inputs"] = {k: input_thumbnail(v, base_dir) for k, v in p["inputs"].items()}


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


def candidate_thumbnail(storage: Storage, path: str | None, base_dir: str) -> dict[str, Any]:
    """A candidate's image, and a link to the full PNG where the page lies beside it (a local folder)."""
    if not path:
        return {"src": None, "href": None, "error": "no image"}
    try:
        src = thumbnail(layout.candidate_image(storage, path, base_dir))
    except Exception as exc:  # a missing image is shown, not fatal
        return {"src": None, "href": None, "error": f"cannot read {path}: {exc}"}
    href = path if storage.local and layout.is_job_file(path) else None
    return {"src": src, "href": href, "error": None}


def input_thumbnail(value: Any, base_dir: str) -> dict[str, Any]:
    """A prompt row's picture (bytes, a datasets image struct, or a path) as a thumbnail."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    try:
        if isinstance(value, str):
            value = read_bytes(layout.resolve_input_path(value, base_dir))
        return {"src": thumbnail(value), "href": None, "error": None}
    except Exception as exc:  # an input image that moved since the job ran: say so, keep the page
        return {"src": None, "href": None, "error": f"input not readable: {exc}"}

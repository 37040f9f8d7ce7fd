"""The generate stage of a shard: a request per (prompt, sample), a candidate per request."""

from __future__ import annotations

import json
import time
from typing import Any

import jinja2
import pyarrow as pa

from genflow.api import Generation, GenerationRequest, Plugin, sends_requests
from genflow.config import GeneratorSpec, JobConfig, redacted, stable_hash
from genflow.data import layout
from genflow.data.layout import INPUT_LABEL, Shard
from genflow.data.model_identity import model_identity
from genflow.data.prompts import carried_columns
from genflow.data.results import Failure, scrub_result
from genflow.data.resume import StageOutcome
from genflow.data.schemas import GENERATIONS, episodes_schema
from genflow.data.storage import Storage
from genflow.data.turns import EpisodeRequest, in_order
from genflow.engine.budget import priced, request_cost
from genflow.engine.tools import tool_columns
from genflow.registry import Registry, get_registry
from genflow.stages.common import (
    Answered,
    JobContext,
    ModelStage,
    ShardWork,
    Usage,
    error_row,
    finish_model_stage,
    open_journal,
    plugin_inputs,
    read_prompts,
)

TEXT = "text"
"""A candidate's modality when nothing says otherwise."""


def derive_seed(base: int, prompt_id: str, sample: int) -> int:
    return int(stable_hash([base, prompt_id, sample], 12), 16) % (2**31 - 1)


def known_modalities(registry: Registry) -> set[str]:
    """The modalities the installed generators and scorers declare: a row's ``task`` naming one
    makes its own candidates (``response`` / ``responses``) of that modality; any other, text."""
    return {m for p in registry.all() if p.kind in ("generator", "scorer")
            for m in (getattr(p.factory, "modalities", None) or (p.factory.modality,))}


def accepts(task: str | None, modality: str) -> bool:
    """Rows marked ``task: image`` go to image generators only; image generators take only those and unmarked rows."""
    return task is None or (task == "image") == (modality == "image")


def build_requests(prompts: pa.Table, spec: GeneratorSpec, config: JobConfig, base_dir: str,
                   factory: type[Plugin]) -> list[GenerationRequest]:
    modality: str = getattr(factory, "modality", TEXT)
    template = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True).from_string(
        spec.template) if spec.template else None
    params_key = layout.params_key(spec.params, factory.unhashed_params)
    base_seed = config.seed if spec.seed is None else spec.seed
    model = model_identity(spec.model, served=sends_requests(factory))  # the same however its path is spelt
    episodes = spec.max_turns > 1
    columns = tool_columns(spec.tools, get_registry()) if episodes else frozenset()
    if episodes and spec.user is not None:  # and those its simulated user's persona is made of
        columns = frozenset({*columns, *spec.user.reads()})
    requests: list[GenerationRequest] = []
    for row in prompts.to_pylist():
        if not accepts(row.get("task"), modality):
            continue
        try:
            prompt = template.render(**row) if template else row["prompt"]
        except jinja2.TemplateError as exc:
            raise ValueError(f"generators[{spec.label}].template: {exc}") from None
        inputs = plugin_inputs(row, factory, base_dir)
        if episodes:  # the columns its tools read (``visible_tests``) come with the episode
            inputs.update({c: row[c] for c in columns if row.get(c) is not None})
        for sample in range(spec.samples):
            seed = derive_seed(base_seed, row["prompt_id"], sample)
            gid = stable_hash([row["prompt_id"], spec.label, sample, seed, params_key, model, spec.template], 20)
            requests.append((EpisodeRequest if episodes else GenerationRequest)(
                generation_id=gid, prompt_id=row["prompt_id"], prompt=prompt, sample=sample, seed=seed,
                task=row.get("task"), system=row.get("system"), inputs=inputs))
    return requests


def generations_table(rows: list[dict[str, Any]], prompts: pa.Table, read_columns: frozenset[str],
                      episodes: bool = False) -> pa.Table:
    """``generations/`` rows with the input columns no plugin of the job reads (and, for a
    generator of episodes, :data:`~genflow.data.schemas.EPISODE_COLUMNS` after its own)."""
    table = pa.Table.from_pylist(rows, schema=episodes_schema() if episodes else GENERATIONS)
    cols = carried_columns(prompts, read_columns)
    if not cols:
        return table
    carry = {r["prompt_id"]: r for r in prompts.select(["prompt_id", *cols]).to_pylist()}
    ids = table["prompt_id"].to_pylist()
    for c in cols:
        column = prompts.schema.field(c)
        table = table.append_column(column, pa.array([carry[pid][c] for pid in ids], column.type))
    return table


def generate_work(job: JobContext, stage: ModelStage, shard: Shard, fingerprint: str) -> ShardWork:
    """A shard's generation requests, and how its ``generations/`` and ``errors/`` parts are written."""
    started = time.perf_counter()
    spec = stage.spec
    assert isinstance(spec, GeneratorSpec)
    factory = stage.factory
    prompts = read_prompts(job.storage, shard)
    requests = build_requests(prompts, spec, job.config, job.base_dir, factory)
    params_json = layout.params_key(redacted(spec.params))  # the row shows no URL password, no secret value
    model_name = spec.model or factory.default_model or ""
    journal = open_journal(job, stage, shard, fingerprint)
    episodes = spec.max_turns > 1

    def finish(answered: Answered) -> StageOutcome:
        rows, errors, usage = [], [], Usage()
        for req, res, seconds in answered:
            usage.add(res, spec.price, req)
            res = scrub_result(res)  # a secret the server sent back: the candidate becomes an errors/ row
            if isinstance(res, Failure):
                errors.append(error_row(req.prompt_id, "generate", spec.plugin, res, req.generation_id))
            else:
                rows.append(_generation_row(job.storage, req, res, spec.label, factory.modality, model_name,
                                            params_json, seconds))
                if episodes:
                    rows[-1].update(episode_columns(res, request_cost(req, res, spec.price)[0]
                                                    if priced(spec.price) else None))
        rows.sort(key=lambda r: (r["prompt_id"], r["sample"]))
        return finish_model_stage(job.storage, stage.stage, shard, fingerprint, layout.GENERATIONS,
                                  generations_table(rows, prompts, job.read_columns, episodes), errors,
                                  len(requests), started, usage, journal,
                                  seconds=work.seconds)

    work = ShardWork(shard, fingerprint, requests, finish, journal)
    return work


def _generation_row(storage: Storage, req: GenerationRequest, res: Generation, label: str, modality: str,
                    model_name: str, params_json: str, latency: float) -> dict[str, Any]:
    image_path = None
    if res.image is not None:
        image_path = layout.image_path(req.prompt_id, req.generation_id)
        storage.write_bytes(image_path, res.image)
    return {"prompt_id": req.prompt_id, "sample": req.sample, "generation_id": req.generation_id,
            "generator": label, "model": model_name, "modality": modality, "prompt": req.prompt,
            "text": res.text, "image_path": image_path, "seed": req.seed, "params": params_json,
            "num_tokens": res.num_tokens, "prompt_tokens": res.prompt_tokens, "finish_reason": res.finish_reason,
            "latency_s": latency}


def episode_columns(res: Generation, cost: float | None) -> dict[str, Any]:
    """An episode's own columns of its ``generations/`` row: the conversation as JSON text."""
    messages = json.dumps(in_order(res.messages), ensure_ascii=False) if res.messages is not None else None
    return {"messages": messages,
            "turns": res.turns, "tool_calls": res.tool_calls, "cost": cost}


def input_candidates_shard(job: JobContext, shard: Shard, fingerprint: str) -> StageOutcome:
    """Candidates the input rows already carry (``response`` / ``responses``) as generations."""
    started = time.perf_counter()
    prompts = read_prompts(job.storage, shard)
    modalities = known_modalities(get_registry())
    rows = []
    for row in prompts.to_pylist():
        answers_ = list(row.get("responses") or [])
        if row.get("response") is not None:
            answers_.insert(0, row["response"])
        task = row.get("task") or TEXT
        modality = task if task in modalities else TEXT
        for sample, answer in enumerate(answers_):
            if answer is None:
                continue
            gid = stable_hash([row["prompt_id"], INPUT_LABEL, sample, answer], 20)
            rows.append({"prompt_id": row["prompt_id"], "sample": sample, "generation_id": gid,
                         "generator": INPUT_LABEL, "model": "", "modality": modality, "prompt": row["prompt"],
                         "text": None if modality == "image" else str(answer),
                         "image_path": str(answer) if modality == "image" else None, "seed": None,
                         "params": "{}", "num_tokens": None, "prompt_tokens": None, "finish_reason": "input",
                         "latency_s": 0.0})
    return finish_model_stage(job.storage, layout.generate_stage(INPUT_LABEL), shard, fingerprint,
                              layout.GENERATIONS, generations_table(rows, prompts, job.read_columns), [],
                              len(rows), started)

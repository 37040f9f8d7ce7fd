"""The genflow job flow: plan shards, generate, score, rank and export.

Prefect sees coarse tasks, one per (stage, shard); inside each task the shard's
rows stream through a Ray actor pool that holds the plugin's model. Stages run
one after another so only one model pool is alive at a time, and every
(stage, shard) whose output is already on storage with the same fingerprint is
skipped without starting Ray or loading a model.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from genflow.api import Scorer
from genflow.config import JobConfig, ScorerSpec, build_config, stable_hash
from genflow.execution import WorkerPool
from genflow.manifest import build_manifest
from genflow.progress import StageProgress
from genflow.prompts import open_input
from genflow.registry import get_registry
from genflow.report import write_report_safely
from genflow.stages import (
    INPUT_LABEL,
    Shard,
    StageOutcome,
    drop_unused_parts,
    exporters_of,
    finished,
    generate_shard,
    generation_fingerprint,
    input_candidates_shard,
    plan_shards,
    rank_shard,
    score_fingerprint,
    score_shard,
)
from genflow.storage import Storage


class JobFailed(RuntimeError):
    """The job ran but produced more errors than ``max_error_fraction`` allows."""


TASK_OPTIONS: dict[str, Any] = {"cache_policy": NO_CACHE, "retries": 2, "retry_delay_seconds": 1}


@task(name="plan-shards", cache_policy=NO_CACHE)
def plan_task(config: JobConfig, storage: Storage, resume: bool) -> tuple[list[Shard], str]:
    source = open_input(config.input, config.storage.endpoint_url, config.storage.region)
    shards = plan_shards(config, source, storage, resume)
    get_run_logger().info("%d prompts in %d shards of up to %d", sum(s.rows for s in shards), len(shards),
                          config.shard_rows)
    return shards, source.base_dir


@task(name="generate", task_run_name="generate-{spec.label}-{shard.index}", **TASK_OPTIONS)
def generate_task(storage, shard, spec, config, pool, modality, base_dir, progress) -> StageOutcome:
    outcome = generate_shard(storage, shard, spec, config, pool, modality, base_dir, progress.advance)
    get_run_logger().info("shard %d: %s generations, %d errors in %.1fs", shard.index,
                          outcome.rows.get("generations"), outcome.errors, outcome.seconds)
    return outcome


@task(name="input-candidates", task_run_name="input-candidates-{shard.index}", **TASK_OPTIONS)
def input_task(storage: Storage, shard: Shard) -> StageOutcome:
    return input_candidates_shard(storage, shard)


@task(name="score", task_run_name="score-{spec.plugin}-{shard.index}", **TASK_OPTIONS)
def score_task(storage, shard, spec, fingerprint, pool, modalities, config, base_dir, progress) -> StageOutcome:
    outcome = score_shard(storage, shard, spec, fingerprint, pool, modalities, config, base_dir, progress.advance)
    get_run_logger().info("shard %d: %s scores, %d errors in %.1fs", shard.index,
                          outcome.rows.get("scores"), outcome.errors, outcome.seconds)
    return outcome


@task(name="rank", task_run_name="rank-{shard.index}", **TASK_OPTIONS)
def rank_task(storage, shard, config, fingerprint, exporters) -> StageOutcome:
    return rank_shard(storage, shard, config, fingerprint, exporters, get_registry())


def resolve_output(output: str, now: datetime | None = None) -> str:
    """Fill ``{date}`` / ``{datetime}`` in an output path (scheduled jobs)."""
    now = now or datetime.now(timezone.utc)
    return output.replace("{date}", now.strftime("%Y-%m-%d")).replace("{datetime}", now.strftime("%Y-%m-%dT%H%M%S"))


def run_stages(config: JobConfig, storage: Storage, resume: bool) -> dict[str, Any]:
    """The job's recipe; returns the manifest."""
    t0 = time.perf_counter()
    registry = get_registry()
    timings: dict[str, float] = {}
    outcomes: list[StageOutcome] = []
    plugins: dict[str, Any] = {}
    exporters = exporters_of(config) if config.scorers else {}

    shards, base_dir = plan_task(config, storage, resume)
    drop_unused_parts(storage, config, exporters)
    timings["plan"] = time.perf_counter() - t0
    gen_fps: dict[int, list[str]] = {s.index: [] for s in shards}

    # Generate: one pool per generator, one task per shard that is not done yet.
    for spec in config.generators:
        t = time.perf_counter()
        info = registry.get("generator", spec.plugin)
        pool = WorkerPool(info.factory, spec.model, spec.params, config.ray, name=spec.label)
        with StageProgress(f"generate {spec.label}", sum(s.rows for s in shards) * spec.samples) as bar:
            for shard in shards:
                fp = generation_fingerprint(shard, spec, config)
                gen_fps[shard.index].append(fp)
                done = finished(storage, f"generate/{spec.label}", shard, fp) if resume else None
                if done:
                    outcomes.append(done)
                    bar.advance(shard.rows * spec.samples)
                    continue
                outcomes.append(generate_task(storage, shard, spec, config, pool, info.factory.modality,
                                              base_dir, bar))
        plugins[spec.label] = {"kind": "generator", "plugin": spec.plugin, "source": info.source,
                               "version": info.version, "model": pool.description or {"model": spec.model}}
        pool.stop()
        timings[f"generate/{spec.label}"] = time.perf_counter() - t
    if not config.generators:
        for shard in shards:
            fp = stable_hash([shard.fingerprint, "input-candidates"])
            gen_fps[shard.index].append(fp)
            done = finished(storage, f"generate/{INPUT_LABEL}", shard, fp) if resume else None
            outcomes.append(done or input_task(storage, shard))

    # Score: one pool per scorer.
    score_fps: dict[int, list[str]] = {s.index: [] for s in shards}
    metrics: dict[str, Any] = {}
    for scorer in config.scorers:
        t = time.perf_counter()
        info = registry.get("scorer", scorer.plugin)
        pool = WorkerPool(info.factory, scorer.model, scorer.params, config.ray, name=scorer.name)
        total = sum(o.rows.get("generations", 0) for o in outcomes if o.stage.startswith("generate/"))
        with StageProgress(f"score {scorer.name}", total) as bar:
            for shard in shards:
                fp = score_fingerprint(gen_fps[shard.index], scorer)
                score_fps[shard.index].append(fp)
                done = finished(storage, f"score/{scorer.name}", shard, fp) if resume else None
                if done:
                    outcomes.append(done)
                    bar.advance(done.work_items)
                    continue
                outcomes.append(score_task(storage, shard, scorer, fp, pool, info.factory.modalities, config,
                                           base_dir, bar))
        plugins[scorer.name] = {"kind": "scorer", "plugin": scorer.plugin, "source": info.source,
                              "version": info.version, "weight": scorer.weight,
                              "model": pool.description or {"model": scorer.model or info.factory.default_model}}
        pool.stop()
        metrics.update(_summarize(storage, scorer, info.factory))
        timings[f"score/{scorer.name}"] = time.perf_counter() - t

    # Rank and export: cheap, no Ray.
    if config.scorers:
        t = time.perf_counter()
        weights = {s.name: s.weight for s in config.scorers}
        for shard in shards:
            fp = stable_hash([gen_fps[shard.index], score_fps[shard.index], weights, exporters])
            done = finished(storage, "rank", shard, fp) if resume else None
            outcomes.append(done or rank_task(storage, shard, config, fp, exporters))
        timings["rank"] = time.perf_counter() - t

    timings["total"] = time.perf_counter() - t0
    errors = sum(o.errors for o in outcomes)
    work = sum(o.work_items for o in outcomes if o.stage != "rank")
    fraction = errors / work if work else 0.0
    status = "failed" if fraction > config.max_error_fraction else "completed"
    manifest = build_manifest(config, storage, outcomes, plugins, metrics, timings, status)
    manifest["errors"] = {"rows": errors, "work_items": work, "fraction": round(fraction, 6),
                          "max_error_fraction": config.max_error_fraction}
    manifest["output"] = storage.uri
    storage.write_json("manifest.json", manifest)
    write_report_safely(storage, manifest)  # logs a warning on failure; never fails the job
    return manifest


def _summarize(storage: Storage, spec: ScorerSpec, factory: type[Scorer]) -> dict[str, Any]:
    if factory.summarize.__func__ is Scorer.summarize.__func__:  # type: ignore[attr-defined]
        return {}
    import pyarrow as pa

    parts = [p for p in storage.list("scores", ".parquet") if p.endswith(f"-{spec.name}.parquet")]
    if not parts:
        return {}
    table = pa.concat_tables([storage.read_table(p) for p in parts])
    return {spec.name: factory.summarize(table, factory.Params.model_validate(spec.params))}


@flow(name="genflow-job", log_prints=False, validate_parameters=False)
def genflow_job(config: dict[str, Any], resume: bool = True) -> dict[str, Any]:
    """Run one genflow job from its config mapping (as in the YAML file)."""
    job = build_config(config, source=f"job {config.get('name', '?')!r}")
    job = job.model_copy(update={"output": resolve_output(job.output)})
    storage = Storage.open(job.output, job.storage.endpoint_url, job.storage.region)
    storage.makedirs()
    manifest = run_stages(job, storage, resume)
    errors = manifest["errors"]
    if manifest["status"] == "failed":
        raise JobFailed(f"{errors['rows']} of {errors['work_items']} rows failed "
                        f"({errors['fraction']:.1%} > max_error_fraction {job.max_error_fraction:.1%}); "
                        f"see {storage.uri_of('errors')}")
    return manifest

"""The genflow job flow: plan shards, generate, score, rank and export.

Prefect sees coarse tasks, one per (stage, shard); inside each task the shard's
rows stream through a Ray actor pool that holds the plugin's model. Stages run
one after another so only one model pool is alive at a time.

Resume. What a (stage, shard) has done is recorded with its output: a marker under
``<output>/_state/`` holding the stage fingerprint (the shard's rows plus the stage
config) and the parts it wrote (see :mod:`genflow.stages`). The flow reads the
marker before it submits a task, so finished work costs no task run, no Ray and
no model load, and a changed config redoes exactly the stages whose fingerprint
changed (new scorer params: scores and rankings, not generations).

Prefect's own result cache is deliberately off (``NO_CACHE``), although a cache
key from the fingerprint would be easy to write:

- its records live in Prefect's result store (a folder on the machine that ran the
  task, or a storage block), not with the outputs. A record outlives the parts it
  stands for, so a cache hit could skip a task whose output was deleted; a rerun
  on another machine, or one that writes to a new output, would not see it.
  A marker is checked against the parts themselves.
- a cache hit is still a task run: resuming a job of thousands of shards would
  create thousands of runs to learn nothing. Skipping in the flow creates none.
- a task's inputs hold an actor pool and a progress bar, which Prefect cannot
  hash; a hand-written key would repeat the fingerprint logic in a second place.

Task runs are named ``<stage>-<shard>-<fingerprint>`` so a run in the Prefect UI
matches its marker. ``retries`` cover what may pass (a storage hiccup); bad input,
a plugin that cannot load or keeps crashing fail at once.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import Task, flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from genflow.api import Scorer
from genflow.config import ConfigError, JobConfig, ScorerSpec, build_config, resolve_output, stable_hash
from genflow.execution import WorkerPool, Workers, job_workers
from genflow.job import JobFailed
from genflow.manifest import build_manifest, rows_of
from genflow.progress import StageProgress
from genflow.prompts import InputError, open_input
from genflow.ray_cluster import RayUnreachable
from genflow.registry import PluginError, get_registry
from genflow.report import write_report_safely
from genflow.stages import (
    INPUT_LABEL,
    DoneIndex,
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


def worth_retrying(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry what may pass (storage, network); not what a retry cannot fix."""
    return not isinstance(state.data, (ConfigError, InputError, PluginError, RayUnreachable))


TASK_OPTIONS: dict[str, Any] = {"cache_policy": NO_CACHE, "retries": 2, "retry_delay_seconds": 1,
                                "retry_condition_fn": worth_retrying}


@task(name="plan-shards", cache_policy=NO_CACHE)
def plan_task(config: JobConfig, storage: Storage, resume: bool) -> tuple[list[Shard], str]:
    source = open_input(config.input, **config.storage.model_dump())
    shards = plan_shards(config, source, storage, resume)
    get_run_logger().info("%d prompts in %d shards of up to %d", sum(s.rows for s in shards), len(shards),
                          config.shard_rows)
    return shards, source.base_dir


@task(name="generate", task_run_name="generate-{spec.label}-{shard.index}-{fingerprint}", **TASK_OPTIONS)
def generate_task(storage, shard, spec, fingerprint, config, pool, modality, base_dir, progress) -> StageOutcome:
    outcome = generate_shard(storage, shard, spec, config, pool, modality, base_dir, progress.advance)
    get_run_logger().info("shard %d: %s generations, %d errors in %.1fs", shard.index,
                          outcome.rows.get("generations"), outcome.errors, outcome.seconds)
    return outcome


@task(name="input-candidates", task_run_name="input-candidates-{shard.index}-{fingerprint}", **TASK_OPTIONS)
def input_task(storage: Storage, shard: Shard, fingerprint: str) -> StageOutcome:
    return input_candidates_shard(storage, shard)


@task(name="score", task_run_name="score-{spec.name}-{shard.index}-{fingerprint}", **TASK_OPTIONS)
def score_task(storage, shard, spec, fingerprint, pool, modalities, config, base_dir, progress) -> StageOutcome:
    outcome = score_shard(storage, shard, spec, fingerprint, pool, modalities, config, base_dir, progress.advance)
    get_run_logger().info("shard %d: %s scores, %d errors in %.1fs", shard.index,
                          outcome.rows.get("scores"), outcome.errors, outcome.seconds)
    return outcome


@task(name="rank", task_run_name="rank-{shard.index}-{fingerprint}", **TASK_OPTIONS)
def rank_task(storage, shard, config, fingerprint, exporters) -> StageOutcome:
    return rank_shard(storage, shard, config, fingerprint, exporters, get_registry())


def run_stages(config: JobConfig, storage: Storage, resume: bool) -> dict[str, Any]:
    """The job's recipe; returns the manifest. Its model stages take turns on one set of workers."""
    with job_workers(config.ray) as workers:
        return _run_stages(config, storage, resume, workers)


def _run_stages(config: JobConfig, storage: Storage, resume: bool, workers: Workers) -> dict[str, Any]:
    t0 = time.perf_counter()
    registry = get_registry()
    timings: dict[str, float] = {}
    outcomes: list[StageOutcome] = []
    plugins: dict[str, Any] = {}
    exporters = exporters_of(config) if config.scorers else {}

    shards, base_dir = plan_task(config, storage, resume)
    drop_unused_parts(storage, config, exporters)
    index = DoneIndex(storage) if resume else None  # what earlier runs finished, listed once
    timings["plan"] = time.perf_counter() - t0
    gen_fps: dict[int, list[str]] = {s.index: [] for s in shards}

    # Generate: one pool per generator, one task per shard that is not done yet.
    for spec in config.generators:
        t = time.perf_counter()
        info = registry.get("generator", spec.plugin)
        pool = WorkerPool(info.factory, spec.model, spec.params, config.ray, spec.label, workers)
        with pool, StageProgress(f"generate {spec.label}", sum(s.rows for s in shards) * spec.samples) as bar:
            for shard in shards:
                fp = generation_fingerprint(shard, spec, config)
                gen_fps[shard.index].append(fp)
                done = finished(storage, f"generate/{spec.label}", shard, fp, index) if index else None
                if done:
                    outcomes.append(done)
                    bar.skip(shard.rows * spec.samples)
                    continue
                outcomes.append(generate_task(storage, shard, spec, fp, config, pool, info.factory.modality,
                                              base_dir, bar))
        plugins[spec.label] = {"kind": "generator", "plugin": spec.plugin, "source": info.source,
                               "version": info.version, "loaded": pool.description is not None,
                               "model": pool.description or {"model": spec.model}}
        timings[f"generate/{spec.label}"] = time.perf_counter() - t
        if pool.start_seconds:
            timings[f"start/generate/{spec.label}"] = pool.start_seconds  # waiting for the model loads
    if not config.generators:
        for shard in shards:
            fp = stable_hash([shard.fingerprint, "input-candidates"])
            gen_fps[shard.index].append(fp)
            done = finished(storage, f"generate/{INPUT_LABEL}", shard, fp, index) if index else None
            outcomes.append(done or input_task(storage, shard, fp))

    # Score: one pool per scorer.
    score_fps: dict[int, list[str]] = {s.index: [] for s in shards}
    metrics: dict[str, Any] = {}
    for scorer in config.scorers:
        t = time.perf_counter()
        info = registry.get("scorer", scorer.plugin)
        pool = WorkerPool(info.factory, scorer.model, scorer.params, config.ray, scorer.name, workers)
        total = sum(o.rows.get("generations", 0) for o in outcomes if o.stage.startswith("generate/"))
        with pool, StageProgress(f"score {scorer.name}", total) as bar:
            for shard in shards:
                fp = score_fingerprint(gen_fps[shard.index], scorer)
                score_fps[shard.index].append(fp)
                done = finished(storage, f"score/{scorer.name}", shard, fp, index) if index else None
                if done:
                    outcomes.append(done)
                    bar.skip(done.work_items)
                    continue
                outcomes.append(score_task(storage, shard, scorer, fp, pool, info.factory.modalities, config,
                                           base_dir, bar))
        plugins[scorer.name] = {"kind": "scorer", "plugin": scorer.plugin, "source": info.source,
                              "version": info.version, "weight": scorer.weight,
                              "loaded": pool.description is not None,
                              "model": pool.description or {"model": scorer.model or info.factory.default_model}}
        metrics.update(_summarize(storage, scorer, info.factory))
        timings[f"score/{scorer.name}"] = time.perf_counter() - t
        if pool.start_seconds:
            timings[f"start/score/{scorer.name}"] = pool.start_seconds

    # Rank and export: cheap, no Ray.
    if config.scorers:
        t = time.perf_counter()
        weights = {s.name: s.weight for s in config.scorers}
        for shard in shards:
            fp = stable_hash([gen_fps[shard.index], score_fps[shard.index], weights, exporters])
            done = finished(storage, "rank", shard, fp, index) if index else None
            outcomes.append(done or rank_task(storage, shard, config, fp, exporters))
        timings["rank"] = time.perf_counter() - t

    timings["total"] = time.perf_counter() - t0
    errors = sum(o.errors for o in outcomes)
    work = sum(o.work_items for o in outcomes if o.stage != "rank")
    fraction = errors / work if work else 0.0
    status = "failed" if fraction > config.max_error_fraction else "completed"
    manifest = build_manifest(config, storage, outcomes, plugins, metrics, timings, status,
                              rows=rows_of(outcomes, sum(s.rows for s in shards)))
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
    storage = Storage.open(job.output, **job.storage.model_dump())
    storage.makedirs()
    manifest = run_stages(job, storage, resume)
    errors = manifest["errors"]
    if manifest["status"] == "failed":
        raise JobFailed(f"{errors['rows']} of {errors['work_items']} rows failed "
                        f"({errors['fraction']:.1%} > max_error_fraction {job.max_error_fraction:.1%}); "
                        f"see {storage.uri_of('errors')}", manifest)
    return manifest

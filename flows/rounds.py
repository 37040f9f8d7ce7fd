"""The rounds flow: a reward model from the job's rankings, then rounds in which each policy
makes the next round's data (docs/rounds.md).

``genflow run`` of a config with a ``rounds:`` section runs this flow instead of one job:

1. **The job itself**, as configured, into ``<output>/``: its rankings (and people's, after
   ``genflow label pull``) are the reward model's data.
2. **The reward model** (``<output>/reward-model/checkpoint/``), trained on every pair the rankings of the
   training prompts imply, and its pairwise accuracy on the held-out prompts' rankings
   (``<output>/reward-model.json``). Or an existing one (``rounds.reward.model``).
3. **A supervised start**, optional (``<output>/supervised/checkpoint/``).
4. **Round k** (k = 0..count): a normal genflow job in ``<output>/round-<k>/`` whose generator is
   policy k, on a fresh sample of the training prompts plus the fixed held-out prompts, ranked
   by the reward model (and the job's scorers); for k < count, policy k+1 is trained on its
   training prompts' rankings into ``round-<k>/checkpoint/``, with ``round-<k>/lineage.json``.

Each round's job runs through the job flow with a session of its own (its resume, markers,
manifest and report are a job's). A step whose output exists with the same inputs (the data's
fingerprint, the trainer's config, the parent checkpoint's hash, its own checkpoint's hash) is
not redone, so a killed run resumes in the round it was in, and ``--set rounds.count=N`` adds
rounds to a finished one. ``<output>/rounds.parquet`` has a row per round.

With ``rounds.per_run`` a run does at most that many rounds beyond those finished (rows of
``rounds.parquet`` whose checkpoint and config still match), the first run's with the job and the
reward model: a deployment (``genflow deploy``) of such a config, on a nightly schedule, advances
the rounds a night at a time, and once round ``count`` is done a run does nothing and says so.
"""

from __future__ import annotations

import itertools
import json
import statistics
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from genflow.api import ScoreItem
from genflow.config import (
    GeneratorSpec,
    JobConfig,
    ScorerSpec,
    build_config,
    redacted,
    round_trainers,
    stable_hash,
)
from genflow.data import layout
from genflow.data.model_identity import folder_fingerprint, model_identity
from genflow.data.prompts import open_input, shard_tables, table_fingerprint
from genflow.data.storage import Storage, is_remote
from genflow.data.training_sets import (
    best_of_n_table,
    demonstration_table,
    heldout_split,
    job_rankings,
    pairwise_accuracy,
    preference_table,
    sample_prompts,
)
from genflow.engine.errors import JobFailed
from genflow.engine.ray_cluster import init_ray
from genflow.engine.training import score_on_ray, train_on_ray
from genflow.flows.job import genflow_job
from genflow.outputs.report import write_report_safely
from genflow.outputs.report.rounds import REWARD_FIGURES, ROUNDS_TABLE
from genflow.registry import get_registry
from genflow.runtime.session import JobSession, registered

REWARD_MODEL = "reward-model"
SUPERVISED = "supervised"
CHECKPOINT = "checkpoint"
LINEAGE = "lineage.json"
ROUND_INPUTS = "_rounds"
REWARD_LABEL = "reward-model"
"""The label of the reward model's scorer in each round's job (its ``scores/`` rows)."""

ROUNDS_SCHEMA = pa.schema([
    ("round", pa.int32()),
    ("method", pa.string()),
    ("policy", pa.string()),
    ("policy_hash", pa.string()),
    ("heldout_reward_mean", pa.float64()),
    ("heldout_reward_std", pa.float64()),
    ("train_reward_mean", pa.float64()),
    ("heldout_mean_tokens", pa.float64()),
    ("heldout_mean_chars", pa.float64()),
    ("heldout_repetition", pa.float64()),
    ("heldout_candidates", pa.int64()),
    ("trained_rows", pa.int64()),
    ("checkpoint", pa.string()),
])
"""``rounds.parquet``: round k's policy measured on the held-out prompts (the reward model's mean
score, mean length, repeated word bigrams), and what it trained (rows, the checkpoint of policy
k+1). ``method`` names what the rounds do honestly: ``iterative-dpo`` or ``best-of-n-sft``."""

_RUNS: dict[str, JobConfig] = {}
"""The validated config of each rounds run under way in this process, by the key its flow gets."""


def run_rounds(config: JobConfig, resume: bool = True, force: bool = False,
               api_ready: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run a job's rounds (``genflow run`` of a config with ``rounds:``); returns the summary."""
    from genflow.runtime.local_prefect import quiet_prefect_defaults
    from genflow.runtime.session import install_log_filter

    quiet_prefect_defaults()
    install_log_filter()
    # A local Ray dies with the thread that started it: start it here, in the command's main
    # thread, not in a task's thread the jobs and trainers would otherwise start it from.
    init_ray(config.ray)
    key = uuid.uuid4().hex
    _RUNS[key] = config
    try:
        if api_ready is not None:
            api_ready()
        return genflow_rounds(config=redacted(config.model_dump(mode="json")), resume=resume, run=key, force=force)
    finally:
        _RUNS.pop(key, None)


@flow(name="genflow-rounds", log_prints=False, validate_parameters=False)
def genflow_rounds(config: dict[str, Any], resume: bool = True, run: str | None = None,
                   force: bool = False, config_source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job, its reward model, a supervised start, then ``rounds.count`` rounds of training
    (at most ``rounds.per_run`` new ones).

    ``run`` is the key of the validated config ``run_rounds`` holds in this process; a
    deployment's run has none and builds the config from ``config`` (its secrets hidden) and
    ``config_source`` (the file to read them back from), as the job flow does."""
    logger = get_run_logger()
    job = _RUNS.get(run or "")
    if job is None:
        from genflow.runtime.session import config_from_parameters

        job = build_config(config_from_parameters(config, config_source), source=f"job {config.get('name', '?')!r}")
        init_ray(job.ray)  # this flow run's main thread (see run_rounds)
    rounds = job.rounds
    assert rounds is not None, "genflow_rounds runs a config with a rounds: section"
    root = Path(job.output).resolve()
    root.mkdir(parents=True, exist_ok=True)
    finished = finished_rounds(job, root) if rounds.per_run is not None else 0
    if finished > rounds.count:
        note = (f"all {rounds.count + 1} rounds (0..{rounds.count}) are done already: nothing to do "
                f"(a larger rounds.count adds rounds)")
        logger.info("%s", note)
        return {"output": str(root), "reward_model": json.loads((root / REWARD_FIGURES).read_text()),
                "rounds": pq.read_table(root / ROUNDS_TABLE).to_pylist(), "note": note}
    last = rounds_to_run(rounds.count, finished, rounds.per_run)
    base = job.model_copy(update={"rounds": None, "output": str(root)})
    if finished == 0:  # else it finished before round 0 did
        _run_job(base, resume, force)
    prompts = _input_prompts(job)
    train_ids, heldout_ids = heldout_split(prompts["id"].to_pylist(), job.seed, rounds.heldout_prompts)
    logger.info("%d prompts: %d to train on, %d held out", prompts.num_rows, len(train_ids), len(heldout_ids))
    reward = reward_model_task(job, str(root), train_ids, heldout_ids)
    policy = job.generators[0].model
    assert policy is not None
    if rounds.supervised is not None:
        policy = supervised_task(job, str(root), train_ids, policy)
    rows = []
    for k in range(last + 1):
        folder = root / f"round-{k}"
        sample = sample_prompts(train_ids, job.seed, k, rounds.prompts_per_round)
        round_job = round_config(job, k, policy, reward, _round_input(root, k, prompts, [*sample, *heldout_ids]))
        if k >= finished:  # a finished round's job is done: its checkpoint is checked below
            _run_job(round_job, resume, force)
        checkpoint = None
        if k < rounds.count:
            checkpoint = policy_task(job, str(folder), k, policy, sample)
        rows.append(round_row(job, k, str(folder), policy, heldout_ids, sample, checkpoint))
        if checkpoint is not None:
            policy = checkpoint["path"]
        logger.info("round %d: held-out reward %.4f", k, rows[-1]["heldout_reward_mean"] or float("nan"))
    table = pa.Table.from_pylist(rows, schema=ROUNDS_SCHEMA)
    pq.write_table(table, root / ROUNDS_TABLE)
    storage = Storage.open(str(root))
    write_report_safely(storage, storage.read_json(layout.MANIFEST))
    summary = {"output": str(root), "reward_model": reward, "rounds": rows}
    if last < rounds.count:
        summary["note"] = (f"rounds 0..{last} of 0..{rounds.count} done; the next run does "
                           f"{min(rounds.per_run or 0, rounds.count - last)} more (rounds.per_run: {rounds.per_run})")
        logger.info("%s", summary["note"])
    return summary


def rounds_to_run(count: int, finished: int, per_run: int | None) -> int:
    """The last round a run does: ``per_run`` rounds after the ``finished`` ones (rounds
    0..finished-1), never past round ``count``; every round with no bound."""
    return count if per_run is None else min(count, finished + per_run - 1)


def finished_rounds(job: JobConfig, root: Path) -> int:
    """How many rounds, from round 0 on, are finished: in ``rounds.parquet``, and for a round
    that trains (k < count) its ``lineage.json`` written with this config (``round_config_hash``)
    naming the row's checkpoint, which still hashes as written. Round ``count`` only generates:
    its row is enough."""
    assert job.rounds is not None
    path = root / ROUNDS_TABLE
    if not path.exists():
        return 0
    rows = {r["round"]: r for r in pq.read_table(path).to_pylist()}
    expected = round_config_hash(job)
    finished = 0
    while finished in rows and finished <= job.rounds.count:
        if finished < job.rounds.count:
            checkpoint = rows[finished]["checkpoint"]
            lineage_path = root / f"round-{finished}" / LINEAGE
            if checkpoint is None or not lineage_path.exists() or not Path(checkpoint).is_dir():
                break
            lineage = json.loads(lineage_path.read_text())
            if (lineage.get("round_config_hash") != expected or lineage["checkpoint"].get("path") != checkpoint
                    or lineage["checkpoint"].get("hash") != folder_fingerprint(checkpoint)):
                break
        finished += 1
    return finished


def round_config_hash(job: JobConfig) -> str:
    """What a round's training depends on in the config: the job (not its output, schedule or
    sweep) and the rounds section (not how many rounds, nor how many a run does)."""
    assert job.rounds is not None
    data = job.model_dump(mode="json", exclude={"output", "rounds", "schedule", "sweep"})
    specs: list[GeneratorSpec | ScorerSpec] = [*job.generators, *job.scorers]
    entries = [*(data.get("generators") or []), *(data.get("scorers") or [])]
    for entry, spec in zip(entries, specs, strict=True):  # a model by what it is, not how its path is spelt
        entry["model"] = model_identity(spec.model, served=layout.serves_model_by_name(spec))
    if not is_remote(job.input) and Path(job.input).exists():
        data["input"] = str(Path(job.input).resolve())
    rounds = job.rounds.model_dump(mode="json", exclude={"count", "per_run"})
    for key in ("model", "base"):
        if rounds.get("reward", {}).get(key):
            rounds["reward"][key] = model_identity(rounds["reward"][key])
    return stable_hash({"job": data, "rounds": rounds})


def _run_job(config: JobConfig, resume: bool, force: bool) -> dict[str, Any]:
    """One job through the job flow, in a session of its own (as a sweep runs its runs)."""
    session = JobSession.open(config, resume, force)
    with session.held(), registered(session):
        state = genflow_job.with_options(flow_run_name=config.name)(**session.parameters(), return_state=True)
    if not state.is_completed():
        written = session.storage.read_json(layout.MANIFEST) if session.storage.exists(layout.MANIFEST) else None
        raise JobFailed(f"{config.name}: {state.message}", written)
    manifest: dict[str, Any] = session.storage.read_json(layout.MANIFEST)
    return manifest


def _input_prompts(job: JobConfig) -> pa.Table:
    """The job's prompts with their ids as the job computes them (``id``), and their other columns."""
    source = open_input(job.input, **job.storage.model_dump())
    tables = list(shard_tables(source, job.shard_rows))
    table = pa.concat_tables(tables, promote_options="permissive")
    keep = [c for c in table.column_names if c not in ("prompt_id", "id", "task_id")]
    if "task" not in source.columns:
        keep = [c for c in keep if c != "task"]
    return pa.table({"id": table["prompt_id"], **{c: table[c] for c in keep}})


def _round_input(root: Path, k: int, prompts: pa.Table, ids: list[str]) -> str:
    """Round k's prompts as a parquet file of their own (its job's input), ids kept."""
    folder = root / ROUND_INPUTS
    folder.mkdir(exist_ok=True)
    wanted = set(ids)
    mask = pa.array([p in wanted for p in prompts["id"].to_pylist()])
    path = folder / f"round-{k}-prompts.parquet"
    table = prompts.filter(mask)
    if not path.exists() or not pq.read_table(path).equals(table):
        pq.write_table(table, path)
    return str(path)


def round_config(job: JobConfig, k: int, policy: str, reward: dict[str, Any], input_path: str) -> JobConfig:
    """Round k's job: the job's generator on policy k, the reward model's scorer (and the job's
    scorers), on the round's prompts, into ``round-<k>/``."""
    rounds = job.rounds
    assert rounds is not None
    data = job.model_dump(mode="json", exclude={"rounds", "schedule", "sweep"})
    data.update(name=f"{job.name}-round-{k}", input=input_path, output=str(Path(job.output).resolve() / f"round-{k}"))
    data["generators"][0]["model"] = policy
    scorer = {"plugin": reward["scorer"], "label": REWARD_LABEL, "model": reward["path"],
              "weight": rounds.reward.weight, "params": rounds.reward.scorer_params}
    data["scorers"] = [scorer, *(data["scorers"] if rounds.job_scorers else [])]
    return build_config(data, source=f"round {k}")


# -- training steps: each skipped when its lineage says it is done with the same inputs ---------

def _lineage_matches(path: Path, expected: dict[str, Any]) -> dict[str, Any] | None:
    """The lineage at ``path`` if its inputs are ``expected`` and its checkpoint is unchanged."""
    if not path.exists():
        return None
    lineage: dict[str, Any] = json.loads(path.read_text())
    checkpoint = Path(lineage.get("checkpoint", {}).get("path", ""))
    if any(not _same_input(k, lineage.get(k), v) for k, v in expected.items()) or not checkpoint.is_dir():
        return None
    if folder_fingerprint(str(checkpoint)) != lineage["checkpoint"].get("hash"):
        return None
    return lineage


def _same_input(key: str, recorded: Any, expected: Any) -> bool:
    """Whether a lineage's recorded input is the expected one: the parent checkpoint by its content
    hash where it has one (a path written relative or absolute names the same model), the rest as is."""
    if key == "parent" and isinstance(recorded, dict) and expected.get("hash") is not None:
        return bool(recorded.get("hash") == expected["hash"])
    return bool(recorded == expected)


def _train(job: JobConfig, key: str, data: pa.Table, data_path: Path, start: str, out: Path,
           lineage_path: Path, seed: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Train the trainer of ``key`` (``rounds.train``...) from ``data`` unless the lineage says
    it was, with these inputs; returns the lineage."""
    assert job.rounds is not None
    registry = get_registry()
    name, params = round_trainers(job.rounds, registry)[key]
    info = registry.get("trainer", name)
    parent = {"path": start, "hash": folder_fingerprint(start) if Path(start).exists() else None}
    expected = {"trainer": name, "params": params, "seed": seed, "parent": parent,
                "data": {"path": str(data_path), "fingerprint": table_fingerprint(data), "rows": data.num_rows},
                "config_hash": stable_hash({"trainer": name, "params": params, "seed": seed})}
    done = _lineage_matches(lineage_path, expected)
    if done is not None:
        get_run_logger().info("%s: done already (%s), not trained again", out, done["checkpoint"]["hash"][:12])
        return done
    if data.num_rows == 0:
        raise ValueError(f"{key}: no training rows for {out} (no ranking with two different scores?)")
    data_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(data, data_path)
    lineage_path.unlink(missing_ok=True)
    metrics = train_on_ray(job.ray, name, info.factory, params, str(data_path), start, str(out), seed)
    lineage = {**expected, **extra, "checkpoint": {"path": str(out), "hash": folder_fingerprint(str(out))},
               "metrics": metrics}
    lineage_path.write_text(json.dumps(lineage, indent=2, sort_keys=True, default=str))
    return lineage


@task(name="reward-model", cache_policy=NO_CACHE)
def reward_model_task(job: JobConfig, root: str, train_ids: list[str], heldout_ids: list[str]) -> dict[str, Any]:
    """The reward model: trained on every pair the training prompts' rankings imply (people's
    first), then its pairwise accuracy on the held-out prompts' rankings, or the given one."""
    assert job.rounds is not None
    spec = job.rounds.reward
    registry = get_registry()
    storage = Storage.open(root)
    figures_path = Path(root) / REWARD_FIGURES
    if spec.model is not None:
        assert spec.scorer is not None
        path, scorer, trained = spec.model, spec.scorer, None
    else:
        name, _ = round_trainers(job.rounds, registry)["rounds.reward"]
        scorer = spec.scorer or registry.get("trainer", name).factory.scorer
        start = spec.base or job.generators[0].model
        assert start is not None and scorer is not None
        pairs = preference_table(storage, train_ids, pairs="all")
        folder = Path(root) / REWARD_MODEL
        trained = _train(job, "rounds.reward", pairs, folder / "training-data.parquet", start,
                         folder / CHECKPOINT, folder / LINEAGE, job.seed, {})
        path = trained["checkpoint"]["path"]
    identity = folder_fingerprint(path) if Path(path).is_dir() else path
    if figures_path.exists():
        figures: dict[str, Any] = json.loads(figures_path.read_text())
        if figures.get("model_hash") == identity and figures.get("heldout_prompts") == heldout_ids:
            return figures
    rankings = job_rankings(storage)
    held = [r for r in rankings if r.prompt_id in set(heldout_ids)]
    train = [r for r in rankings if r.prompt_id in set(train_ids)]
    scores = _score_candidates(job, storage, scorer, path, spec.scorer_params,
                               {g for r in held + train for g in r.order})
    heldout_accuracy, heldout_pairs = pairwise_accuracy(held, scores)
    train_accuracy, train_pairs = pairwise_accuracy(train, scores)
    figures = {"path": path, "scorer": scorer, "model_hash": identity, "heldout_prompts": heldout_ids,
               "heldout_pairwise_accuracy": heldout_accuracy, "heldout_pairs": heldout_pairs,
               "train_pairwise_accuracy": train_accuracy, "train_pairs": train_pairs,
               "trained_pairs": trained["data"]["rows"] if trained else None,
               "trainer": trained["trainer"] if trained else None, "metrics": trained["metrics"] if trained else None}
    figures_path.write_text(json.dumps(figures, indent=2, sort_keys=True, default=str))
    get_run_logger().info("reward model: held-out pairwise accuracy %s on %d pairs (train: %s on %d)",
                          heldout_accuracy, heldout_pairs, train_accuracy, train_pairs)
    return figures


def _score_candidates(job: JobConfig, storage: Storage, scorer: str, model: str, params: dict[str, Any],
                      ids: set[str]) -> dict[str, float]:
    """The reward model's score of each of the job's candidates in ``ids`` (one Ray task)."""
    table = storage.read_folder(layout.GENERATIONS, columns=["generation_id", "prompt_id", "prompt", "modality",
                                                             "text"])
    items = [ScoreItem(r["generation_id"], r["prompt_id"], r["prompt"], r["modality"], r["text"])
             for r in table.to_pylist() if r["generation_id"] in ids and r["text"] is not None]
    factory = get_registry().get("scorer", scorer).factory
    values = score_on_ray(job.ray, factory, model, params, items)
    return {item.generation_id: v for item, v in zip(items, values, strict=True) if v is not None}


@task(name="supervised-start", cache_policy=NO_CACHE)
def supervised_task(job: JobConfig, root: str, train_ids: list[str], start: str) -> str:
    """Policy 0: the generator's model trained on demonstrations, or on the job's best-of-n."""
    assert job.rounds is not None and job.rounds.supervised is not None
    storage = Storage.open(root)
    source = job.rounds.supervised.data
    data = demonstration_table(storage, train_ids) if source in ("auto", "demonstrations") else None
    if data is None or (data.num_rows == 0 and source == "auto"):
        data = best_of_n_table(storage, train_ids)
    out = Path(root) / SUPERVISED
    lineage = _train(job, "rounds.supervised", data, out / "training-data.parquet", start, out / CHECKPOINT,
                     out / LINEAGE, job.seed, {"data_source": source})
    return str(lineage["checkpoint"]["path"])


@task(name="train-policy", cache_policy=NO_CACHE)
def policy_task(job: JobConfig, folder: str, k: int, policy: str, sample: list[str]) -> dict[str, Any]:
    """Policy k+1 from round k's rankings of its training prompts (never the held-out ones)."""
    rounds = job.rounds
    assert rounds is not None
    storage = Storage.open(folder)
    if rounds.method == "dpo":
        data = preference_table(storage, sample, pairs=rounds.pairs)
    else:
        data = best_of_n_table(storage, sample)
    config_hash = round_config_hash(job)
    lineage = _train(job, "rounds.train", data, Path(folder) / "training-data.parquet", policy,
                     Path(folder) / CHECKPOINT, Path(folder) / LINEAGE, job.seed + k + 1,
                     {"round": k, "method": rounds.method_name, "round_config_hash": config_hash})
    return {"path": lineage["checkpoint"]["path"], "hash": lineage["checkpoint"]["hash"],
            "rows": lineage["data"]["rows"]}


# -- the figures of a round -------------------------------------------------------------------

def repetition(text: str) -> float:
    """The share of a text's word bigrams that repeat an earlier one (0: none; near 1: a loop)."""
    words = text.split()
    bigrams = list(itertools.pairwise(words))
    return 1.0 - len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def round_row(job: JobConfig, k: int, folder: str, policy: str, heldout_ids: list[str], sample: list[str],
              checkpoint: dict[str, Any] | None) -> dict[str, Any]:
    """Round k's row of ``rounds.parquet``, from its job's ``scores/`` and ``generations/``."""
    assert job.rounds is not None
    storage = Storage.open(folder)
    scores = storage.read_folder(layout.SCORES, columns=["prompt_id", "generation_id", "scorer", "score"])
    reward = {r["generation_id"]: (r["prompt_id"], r["score"]) for r in scores.to_pylist()
              if r["scorer"] == REWARD_LABEL and r["score"] is not None}
    held, train = set(heldout_ids), set(sample)
    held_values = [s for p, s in reward.values() if p in held]
    train_values = [s for p, s in reward.values() if p in train]
    gens = [r for r in storage.read_folder(layout.GENERATIONS, columns=["prompt_id", "text", "num_tokens"]).to_pylist()
            if r["prompt_id"] in held and r["text"] is not None]
    return {
        "round": k, "method": job.rounds.method_name, "policy": policy,
        "policy_hash": folder_fingerprint(policy) if Path(policy).exists() else None,
        "heldout_reward_mean": statistics.fmean(held_values) if held_values else None,
        "heldout_reward_std": statistics.pstdev(held_values) if held_values else None,
        "train_reward_mean": statistics.fmean(train_values) if train_values else None,
        "heldout_mean_tokens": statistics.fmean(r["num_tokens"] or 0 for r in gens) if gens else None,
        "heldout_mean_chars": statistics.fmean(len(r["text"]) for r in gens) if gens else None,
        "heldout_repetition": statistics.fmean(repetition(r["text"]) for r in gens) if gens else None,
        "heldout_candidates": len(held_values),
        "trained_rows": checkpoint["rows"] if checkpoint else None,
        "checkpoint": checkpoint["path"] if checkpoint else None,
    }

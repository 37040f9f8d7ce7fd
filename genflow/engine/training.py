"""Training on a Ray worker: a :class:`genflow.api.Trainer` runs as one Ray task, never on the driver.

The task reserves one GPU when the cluster has one (or ``gpus`` when given) and the CPUs
asked for, so on a cluster it lands on a GPU node and on a laptop it shares the local Ray
with the job's workers. Only paths and the trainer's params cross to the worker; the
checkpoint is written by the worker to ``output_dir`` (a folder the worker can reach: local
for a local Ray, a shared filesystem on a cluster).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import ray

from genflow.config import RaySpec
from genflow.engine import ray_cluster

log = logging.getLogger(__name__)


class TrainingFailed(RuntimeError):
    """A trainer raised: its message and the trainer's name, for the user."""


def _train_in_worker(factory: Any, params: dict[str, Any], data: str, model: str, output_dir: str,
                     seed: int) -> dict[str, Any]:
    """What the Ray task runs: build the trainer, train into a temporary folder, then rename it
    into place, so a killed training leaves no folder that looks finished."""
    import torch

    device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
    trainer = factory(factory.Params.model_validate(params))
    partial = Path(f"{output_dir}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    metrics = trainer.train(data, model, str(partial), seed, device)
    for leftover in ("training_args.bin",):  # TRL's pickled args: not part of the model, and not reproducible
        (partial / leftover).unlink(missing_ok=True)
    shutil.rmtree(output_dir, ignore_errors=True)
    partial.rename(output_dir)
    return {"device": device, **metrics}


def train_on_ray(spec: RaySpec, name: str, factory: Any, params: dict[str, Any], data: str, model: str,
                 output_dir: str, seed: int, gpus: float | None = None, cpus: float = 1.0) -> dict[str, Any]:
    """Run ``factory`` (the trainer registered as ``name``) as a Ray task and return its metrics.

    ``gpus``: None reserves one GPU when the cluster has one, none otherwise."""
    ray_cluster.init_ray(spec)
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(_train_in_worker)
    log.info("training %s from %s on %s (gpus: %s)", name, model, data, gpus)
    try:
        metrics: dict[str, Any] = ray.get(task.remote(factory, params, data, model, output_dir, seed))
        return metrics
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        raise TrainingFailed(f"trainer {name!r} failed: {type(cause).__name__}: {cause}") from exc


def _score_in_worker(factory: Any, model: str, params: dict[str, Any], items: list[Any],
                     batch_size: int) -> list[float | None]:
    """What :func:`score_on_ray` runs: the scorer built once, its calls in batches; a row it
    could not score is None."""
    import torch

    device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
    scorer = factory(model, factory.Params.model_validate(params), device)
    out: list[float | None] = []
    for start in range(0, len(items), batch_size):
        out += [getattr(result, "value", None) for result in scorer.score(items[start:start + batch_size])]
    return out


def score_on_ray(spec: RaySpec, factory: Any, model: str, params: dict[str, Any], items: list[Any],
                 gpus: float | None = None) -> list[float | None]:
    """Score ``items`` (:class:`genflow.api.ScoreItem`) with one scorer in one Ray task: a reward
    model's held-out evaluation, a few hundred candidates, without a job's machinery."""
    ray_cluster.init_ray(spec)
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=0)(_score_in_worker)
    values: list[float | None] = ray.get(task.remote(factory, model, params, items, factory.batch_size))
    return values

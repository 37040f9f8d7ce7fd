"""The work of one (stage, shard): plan, generate, score, rank and export.

Each stage kind has its module; what they do alike (reading a shard's inputs,
calling the plugin on the workers, writing parts and the marker) is in
:mod:`genflow.stages.common`. Part names, markers and fingerprints come from
:mod:`genflow.data.layout`; what resume trusts is :mod:`genflow.data.resume`. A model stage
works on packs of consecutive shards (:class:`Pack`); the driver holds two at a
time, one collected and the next one sent. Nothing here reads a whole output folder.
"""

from genflow.stages.common import (
    JobContext,
    ModelStage,
    Pack,
    ShardWork,
    call_batches,
    call_size,
    plan_calls,
    read_generations,
    read_prompts,
    read_scores,
)
from genflow.stages.generate import accepts, build_requests, derive_seed, generate_work, input_candidates_shard
from genflow.stages.plan import plan_shards
from genflow.stages.rank import job_exporters, rank_shard
from genflow.stages.score import score_work

__all__ = [
    "JobContext", "ModelStage", "Pack", "ShardWork", "accepts", "build_requests", "call_batches", "call_size",
    "derive_seed", "generate_work", "input_candidates_shard", "job_exporters", "plan_calls", "plan_shards",
    "rank_shard", "read_generations", "read_prompts", "read_scores", "score_work",
]

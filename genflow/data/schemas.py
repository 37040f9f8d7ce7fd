"""Arrow schemas of every folder genflow writes: the one truth about columns."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

if TYPE_CHECKING:
    from genflow.config import JobConfig
    from genflow.registry import Registry

PROMPTS = pa.schema([
    ("prompt_id", pa.string()),
    ("prompt", pa.string()),
    ("task", pa.string()),
    ("system", pa.string()),
])

GENERATIONS = pa.schema([
    ("prompt_id", pa.string()),
    ("sample", pa.int32()),
    ("generation_id", pa.string()),
    ("generator", pa.string()),
    ("model", pa.string()),
    ("modality", pa.string()),
    ("prompt", pa.string()),
    ("text", pa.string()),
    ("image_path", pa.string()),
    ("seed", pa.int64()),
    ("params", pa.string()),
    ("num_tokens", pa.int32()),
    ("prompt_tokens", pa.int32()),
    ("finish_reason", pa.string()),
    ("latency_s", pa.float64()),
])

EPISODE_COLUMNS = pa.schema([
    ("messages", pa.string()),
    ("turns", pa.int32()),
    ("tool_calls", pa.int32()),
    ("cost", pa.float64()),
])
"""What a generator of episodes (``max_turns`` above 1) adds to its ``generations/`` rows:
the whole conversation as JSON text of OpenAI-format messages (``json.loads`` gives the
list TRL's conversational format takes), its assistant turns, its tool calls and its cost
at the stage's ``price`` (null without one). Its ``text`` is the final answer and its token
counts are summed over the turns. Rows of one-answer generators have none of these columns
(a job with both reads them as null there)."""


def episodes_schema() -> pa.Schema:
    """``generations/``'s columns for a generator of episodes."""
    return pa.schema([*GENERATIONS, *EPISODE_COLUMNS])


SCORES = pa.schema([
    ("generation_id", pa.string()),
    ("prompt_id", pa.string()),
    ("scorer", pa.string()),
    ("score", pa.float64()),
    ("details", pa.string()),
])
"""``scores/``'s fixed columns; a job whose scorers declare ``extra_columns`` writes them after
these (:func:`scores_schema`)."""


def scores_schema(extra: dict[str, pa.DataType] | None = None) -> pa.Schema:
    """``scores/``'s columns: the fixed ones, then the scorers' own (``Scorer.extra_columns``) in
    the order given. A column of its own may not take a fixed column's name."""
    if not extra:
        return SCORES
    taken = sorted(set(extra) & set(SCORES.names))
    if taken:
        raise ValueError(f"scores/ already has the column(s) {', '.join(taken)}: a scorer's extra_columns "
                         "need names of their own")
    return pa.schema([*SCORES, *(pa.field(name, kind) for name, kind in extra.items())])


def extra_score_columns(config: JobConfig, registry: Registry) -> dict[str, pa.DataType]:
    """The columns the job's scorers add to ``scores/`` (their ``extra_columns``), in the config's
    order; two scorers may declare one column only with one type."""
    out: dict[str, pa.DataType] = {}
    for spec in config.scorers:
        for name, kind in registry.get("scorer", spec.plugin).factory.extra_columns.items():
            if out.setdefault(name, kind) != kind:
                raise ValueError(f"scorers: two scorers declare the scores/ column {name!r}, as {out[name]} and "
                                 f"{kind}; a column has one type")
    return out


RANKINGS = pa.schema([
    ("prompt_id", pa.string()),
    ("generation_id", pa.string()),
    ("rank", pa.int32()),
    ("score", pa.float64()),
])

# What exporters receive: one row per ranked candidate of a shard.
RANKED = pa.schema([
    ("prompt_id", pa.string()),
    ("prompt", pa.string()),
    ("generation_id", pa.string()),
    ("generator", pa.string()),
    ("modality", pa.string()),
    ("text", pa.string()),
    ("image_path", pa.string()),
    ("rank", pa.int32()),
    ("score", pa.float64()),
    ("scores", pa.string()),  # JSON {scorer: score}
    ("messages", pa.string()),
    ("tools", pa.string()),
])
"""``messages``: in a job with episodes (a generator's ``max_turns`` above 1), every candidate as
JSON text of an OpenAI-format conversation: an episode's whole one, a one-answer candidate's
opening (the prompt's ``system``, the prompt) and its answer; null in a job without episodes,
so its exporters write what they always did. ``tools``: JSON text of the OpenAI ``tools``
entries the candidate's generator offered (null where it offered none)."""

ERRORS = pa.schema([
    ("prompt_id", pa.string()),
    ("stage", pa.string()),
    ("plugin", pa.string()),
    ("error", pa.string()),
    ("traceback", pa.string()),
    ("generation_id", pa.string()),
    ("transient", pa.bool_()),  # may pass if sent again (retries of 429s, 5xx, timeouts ran out): rerun sends it
])

FILTERED = pa.schema([
    ("prompt_id", pa.string()),
    ("generation_id", pa.string()),  # null for a prompt
    ("applies_to", pa.string()),  # prompts | candidates
    ("filter", pa.string()),  # the filter's label
    ("reason", pa.string()),
    ("duplicate_of", pa.string()),  # the kept row's id (a prompt_id, or a generation_id); null if no duplicate
])
"""``filtered/``: every row a job's filters left out, and why."""

SIGNATURES = pa.schema([
    ("row_id", pa.string()),  # a prompt_id, or a candidate's generation_id
    ("group", pa.string()),  # a candidate's prompt_id; null for a prompt
])
"""A filter's ``_signatures/`` parts: these columns, then ``signature`` (of the filter's type)."""


def empty(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()

HUMAN_RANKINGS = pa.schema([
    ("prompt_id", pa.string()),
    ("generation_id", pa.string()),
    ("rank", pa.int32()),
    ("annotator", pa.string()),
    ("created_at", pa.string()),
    ("ranking_id", pa.string()),
    ("tool", pa.string()),
])
"""``human_rankings/``: one row per candidate a person ranked (1 = best); ``ranking_id`` groups
the rows of one annotation (a judgement of a pair has two)."""

DEMONSTRATIONS = pa.schema([
    ("prompt", pa.string()),
    ("completion", pa.string()),
    ("annotator", pa.string()),
    ("prompt_id", pa.string()),
    ("created_at", pa.string()),
    ("demonstration_id", pa.string()),
    ("tool", pa.string()),
])
"""``demonstrations/``: the answer a person wrote for a prompt, in TRL's prompt-completion columns."""

TRAINING_PREFERENCE = pa.schema([
    ("prompt_id", pa.string()),
    ("prompt", pa.string()),
    ("chosen", pa.string()),
    ("rejected", pa.string()),
    ("source", pa.string()),
])
"""A trainer's preference pairs (``genflow.data.training_sets``), in TRL's columns: ``source`` is
``model`` (the job's rankings) or ``human`` (people's)."""

TRAINING_PROMPT_COMPLETION = pa.schema([
    ("prompt_id", pa.string()),
    ("prompt", pa.string()),
    ("completion", pa.string()),
    ("source", pa.string()),
])
"""A trainer's prompt-completion rows: demonstrations, or each ranking's best candidate."""

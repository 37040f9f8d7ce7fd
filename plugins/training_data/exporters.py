"""Training-data exporters: TRL preference pairs and best-of-n SFT rows.

``preferences/`` has TRL's explicit-prompt preference columns (prompt, chosen,
rejected) and ``sft/`` its prompt-completion columns; both load with
``datasets.load_dataset("parquet", ...)`` and go straight into DPOTrainer,
RewardTrainer or SFTTrainer. Completions keep their leading whitespace because
TRL joins prompt and completion without a separator. For image candidates the
columns hold the images' paths.

People's labels (``genflow label pull``) join them, marked ``source: human``: a pair for
every two candidates more people ordered one way than the other, and each demonstration
as a prompt-completion row.

Both run in every job with scorers; their params sit under ``exporters``
(``exporters: {preferences: {min_margin: 0.5, per_prompt: 2}, sft: {min_score: 1.0}}``,
``sft: false`` turns best-of-n off). The ``ranking`` keys they had before still work, with
a warning.

A job with episodes (a generator's ``max_turns`` above 1) writes TRL's conversational
formats instead, for every candidate of the job (the rank stage gives each one its
conversation, so every part of a folder has one schema): ``sft/`` a ``messages`` column
(language modelling) and ``preferences/`` ``prompt`` (the opening messages), ``chosen`` and
``rejected`` (the assistant's turns, the tools' results and any later user turns), both with
``tools``, the JSON schemas of the tools the episode was offered. Messages take the shape
TRL's docs give for tool calling: a call's ``arguments`` is an object, a ``tool`` message
names its tool, keys without a value are left out; each message and each tool is a
``datasets.Json`` value (Arrow's ``json`` type), so ``load_dataset("parquet", ...)`` gives
back exactly these dicts, with no keys of other messages filled in as nulls.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import Field

from genflow import hookimpl
from genflow.api import Exporter, HumanLabels, PluginParams
from genflow.hookspecs import Register

MODEL, HUMAN = "model", "human"
"""``source``: rows the exporter made from the scores, and rows made from people's labels."""

PREFERENCES = pa.schema([
    ("prompt", pa.string()),
    ("chosen", pa.string()),
    ("rejected", pa.string()),
    ("score_chosen", pa.float64()),
    ("score_rejected", pa.float64()),
    ("prompt_id", pa.string()),
    ("chosen_id", pa.string()),
    ("rejected_id", pa.string()),
    ("source", pa.string()),
])
"""``preferences/``: TRL's explicit-prompt preference columns, with the scores and ids behind them.
``source`` is ``model`` for the exporter's rows and ``human`` for those made from people's
rankings (``genflow label pull``), whose scores are the share of votes for each side."""

SFT = pa.schema([
    ("prompt", pa.string()),
    ("completion", pa.string()),
    ("score", pa.float64()),
    ("prompt_id", pa.string()),
    ("generation_id", pa.string()),
    ("source", pa.string()),
])
"""``sft/``: TRL's prompt-completion columns, the best candidate of each prompt (``source: model``),
and people's demonstrations (``source: human``, no score)."""

MESSAGES = pa.list_(pa.json_())
"""A conversation: a list of messages, each a JSON object (``datasets.Json``)."""

CONVERSATION_PREFERENCES = pa.schema([
    ("prompt", MESSAGES),
    ("chosen", MESSAGES),
    ("rejected", MESSAGES),
    ("tools", MESSAGES),
    ("score_chosen", pa.float64()),
    ("score_rejected", pa.float64()),
    ("prompt_id", pa.string()),
    ("chosen_id", pa.string()),
    ("rejected_id", pa.string()),
    ("source", pa.string()),
])
"""``preferences/`` of a job with episodes: TRL's conversational explicit-prompt preference
columns. ``prompt`` is the opening (system and user messages before the first assistant turn),
``chosen`` and ``rejected`` the rest of each conversation; ``tools`` the tools either side was
offered (null: none)."""

CONVERSATION_SFT = pa.schema([
    ("messages", MESSAGES),
    ("tools", MESSAGES),
    ("score", pa.float64()),
    ("prompt_id", pa.string()),
    ("generation_id", pa.string()),
    ("source", pa.string()),
])
"""``sft/`` of a job with episodes: TRL's conversational language-modelling column
(``messages``: the best conversation of each prompt) and ``tools``, the tools it was offered."""


class PreferenceParams(PluginParams):
    min_margin: float = Field(0.0, ge=0.0, description="Smallest score difference between chosen and rejected.")
    per_prompt: int = Field(1, ge=1, description="Pairs per prompt at most, widest margins first.")


class PreferencePairs(Exporter):
    """Chosen/rejected pairs per prompt, widest score margins first."""

    Params: ClassVar[type[PluginParams]] = PreferenceParams
    schema: ClassVar[pa.Schema | None] = PREFERENCES
    description: ClassVar[str] = "TRL preference pairs: prompt, chosen, rejected (+ scores)"
    params: PreferenceParams

    human_kinds: ClassVar[tuple[str, ...]] = ("rankings",)
    ranking_keys: ClassVar[dict[str, str]] = {
        "pairs": "write exporters: {preferences: {min_margin: ..., per_prompt: ...}} "
                 "(and preferences: false for ranking.pairs: null)"}

    @classmethod
    def job_params(cls, ranking: Any) -> dict[str, Any] | None:
        """Every job with scorers makes pairs; the deprecated ``ranking.pairs`` gives their params
        (null: no pairs)."""
        if "pairs" not in ranking:
            return {}
        pairs = ranking.get("pairs")
        return dict(pairs) if isinstance(pairs, dict) else pairs  # null: none; other values fail validation

    def export(self, ranked: pa.Table) -> pa.Table:
        if _conversational(ranked):
            return self._conversation_pairs(ranked)
        rows = []
        for prompt_id, cands in sorted(_by_prompt(ranked).items()):
            pairs = []
            for i, better in enumerate(cands):
                for worse in cands[i + 1:]:
                    margin = better["score"] - worse["score"]
                    if margin > 0 and margin >= self.params.min_margin and _candidate(better) != _candidate(worse):
                        pairs.append((-margin, better["rank"], worse["rank"], better, worse))
            pairs.sort(key=lambda p: p[:3])
            for _, _, _, chosen, rejected in _distinct_texts(pairs)[: self.params.per_prompt]:
                rows.append({
                    "prompt": chosen["prompt"], "chosen": _candidate(chosen), "rejected": _candidate(rejected),
                    "score_chosen": chosen["score"], "score_rejected": rejected["score"],
                    "prompt_id": prompt_id, "chosen_id": chosen["generation_id"],
                    "rejected_id": rejected["generation_id"], "source": MODEL,
                })
        return pa.Table.from_pylist(rows, schema=PREFERENCES)

    def _conversation_pairs(self, ranked: pa.Table) -> pa.Table:
        """Pairs of whole conversations, by the same rule (widest margins first); two whose
        continuations are the same (tool calls' ids aside) make no pair."""
        rows = []
        for prompt_id, cands in sorted(_by_prompt(ranked).items()):
            talks = {c["generation_id"]: _split(_messages(c)) for c in cands}
            pairs = []
            for i, better in enumerate(cands):
                for worse in cands[i + 1:]:
                    margin = better["score"] - worse["score"]
                    same = _without_ids(talks[better["generation_id"]][1]) == _without_ids(
                        talks[worse["generation_id"]][1])
                    if margin > 0 and margin >= self.params.min_margin and not same:
                        pairs.append((-margin, better["rank"], worse["rank"], better, worse))
            pairs.sort(key=lambda p: p[:3])
            for _, _, _, chosen, rejected in pairs[: self.params.per_prompt]:
                opening, chosen_turns = talks[chosen["generation_id"]]
                rows.append({
                    "prompt": opening, "chosen": chosen_turns, "rejected": talks[rejected["generation_id"]][1],
                    "tools": _tools(chosen, rejected), "score_chosen": chosen["score"],
                    "score_rejected": rejected["score"], "prompt_id": prompt_id,
                    "chosen_id": chosen["generation_id"], "rejected_id": rejected["generation_id"], "source": MODEL,
                })
        return _json_table(rows, CONVERSATION_PREFERENCES)

    def export_human(self, labels: HumanLabels) -> pa.Table:
        """A pair for every two candidates of a prompt that more people ordered one way than the
        other; ``score_chosen`` is the share of their votes for ``chosen``. ``min_margin`` and
        ``per_prompt`` are about scores: people's pairs are all kept."""
        votes: dict[str, dict[tuple[str, str], int]] = defaultdict(lambda: defaultdict(int))
        for ranking in labels.rankings:
            for i, better in enumerate(ranking.order):
                for worse in ranking.order[i + 1:]:
                    votes[ranking.prompt_id][(better, worse)] += 1
        rows = []
        for prompt_id in sorted(votes):
            tally = votes[prompt_id]
            for a, b in sorted({tuple(sorted(pair)) for pair in tally}):
                wins_a, wins_b = tally.get((a, b), 0), tally.get((b, a), 0)
                if wins_a == wins_b:
                    continue
                chosen, rejected, won = (a, b, wins_a) if wins_a > wins_b else (b, a, wins_b)
                share = won / (wins_a + wins_b)
                candidates = labels.candidates
                rows.append({"prompt": candidates[chosen]["prompt"], "chosen": _candidate(candidates[chosen]),
                             "rejected": _candidate(candidates[rejected]), "score_chosen": share,
                             "score_rejected": 1.0 - share, "prompt_id": prompt_id, "chosen_id": chosen,
                             "rejected_id": rejected, "source": HUMAN})
        return pa.Table.from_pylist(rows, schema=PREFERENCES)


class BestOfNParams(PluginParams):
    min_score: float | None = Field(None, description="Leave out prompts whose best candidate scores below "
                                    "this; null keeps every prompt.")


class BestOfN(Exporter):
    """The top-ranked candidate of each prompt as a prompt-completion row."""

    Params: ClassVar[type[PluginParams]] = BestOfNParams
    schema: ClassVar[pa.Schema | None] = SFT
    description: ClassVar[str] = "best-of-n SFT rows: prompt, completion, score"
    params: BestOfNParams

    human_kinds: ClassVar[tuple[str, ...]] = ("demonstrations",)
    ranking_keys: ClassVar[dict[str, str]] = {
        "best_of_n": "write exporters: {sft: false} to turn best-of-n off (true is the default)",
        "sft_min_score": "write exporters: {sft: {min_score: ...}}"}

    @classmethod
    def job_params(cls, ranking: Any) -> dict[str, Any] | None:
        """Every job with scorers makes best-of-n rows; the deprecated ``ranking.best_of_n: false``
        turns them off and ``ranking.sft_min_score`` gives ``min_score``."""
        if not ranking.get("best_of_n", True):
            return None
        return {"min_score": ranking.get("sft_min_score")} if "sft_min_score" in ranking else {}

    def export(self, ranked: pa.Table) -> pa.Table:
        conversational = _conversational(ranked)
        rows = []
        for prompt_id, cands in sorted(_by_prompt(ranked).items()):
            best = cands[0]
            if self.params.min_score is not None and best["score"] < self.params.min_score:
                continue
            if conversational:
                rows.append({"messages": _messages(best), "tools": _tools(best), "score": best["score"],
                             "prompt_id": prompt_id, "generation_id": best["generation_id"], "source": MODEL})
                continue
            rows.append({"prompt": best["prompt"], "completion": _candidate(best), "score": best["score"],
                         "prompt_id": prompt_id, "generation_id": best["generation_id"], "source": MODEL})
        return _json_table(rows, CONVERSATION_SFT) if conversational else pa.Table.from_pylist(rows, schema=SFT)

    def export_human(self, labels: HumanLabels) -> pa.Table:
        """Each demonstration as a row (no score; ``generation_id`` is the demonstration's id)."""
        rows = [{"prompt": d["prompt"], "completion": d["completion"], "score": None, "prompt_id": d["prompt_id"],
                 "generation_id": d["demonstration_id"], "source": HUMAN}
                for d in sorted(labels.demonstrations.to_pylist(),
                                key=lambda d: (d["prompt_id"], d["demonstration_id"]))]
        return pa.Table.from_pylist(rows, schema=SFT)


def _candidate(row: dict) -> str:
    return row["text"] if row["text"] is not None else (row["image_path"] or "")


def _distinct_texts(pairs: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The pairs, less those whose two texts an earlier pair (a wider margin) already has, either
    way round: samples of a greedy generator repeat, and would make the same pair once per copy."""
    seen: set[tuple[str, str]] = set()
    out = []
    for pair in pairs:
        a, b = _candidate(pair[3]), _candidate(pair[4])
        key = (a, b) if a <= b else (b, a)
        if key not in seen:
            seen.add(key)
            out.append(pair)
    return out


# -- conversations (a job with episodes) --------------------------------------------------------

def _conversational(ranked: pa.Table) -> bool:
    """Whether the candidates are conversations: the rank stage gives every candidate of a job
    with episodes its ``messages``, and none of any other job."""
    return "messages" in ranked.column_names and ranked["messages"].null_count < ranked.num_rows


def _messages(row: dict) -> list[dict[str, Any]]:
    """The candidate's conversation in TRL's shape (:func:`_trl_message`); a candidate without
    one is its prompt and its answer."""
    if row.get("messages"):
        messages = json.loads(row["messages"])
    else:
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": _candidate(row)}]
    names = {call.get("id"): (call.get("function") or {}).get("name")
             for m in messages if m.get("role") == "assistant" for call in m.get("tool_calls") or []}
    return [_trl_message(m, names) for m in messages]


def _trl_message(message: dict[str, Any], names: dict[Any, Any]) -> dict[str, Any]:
    """An OpenAI-format message as TRL's docs show tool calling to the chat template: a call's
    ``arguments`` as an object (the model's text where it is not a JSON object), a ``tool``
    message with the ``name`` of the tool that answered, and no keys without a value (a
    template tests ``message.content is defined``, not ``is none``)."""
    out = {k: v for k, v in message.items() if v is not None}
    if out.get("tool_calls"):
        out["tool_calls"] = [_trl_call(c) for c in out["tool_calls"]]
    elif "tool_calls" in out:
        del out["tool_calls"]  # an empty list: no calls
    if out.get("role") == "tool" and "name" not in out and names.get(out.get("tool_call_id")):
        out["name"] = names[out["tool_call_id"]]
    return out


def _trl_call(call: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in call.items() if v is not None}
    function = dict(out.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            function["arguments"] = parsed
    out["function"] = function
    return out


def _split(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A conversation's opening (the messages before the first assistant turn) and the rest."""
    first = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), len(messages))
    return messages[:first], messages[first:]


def _without_ids(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as the model's text and calls alone: a server names each call anew, so two
    episodes that said and did the same differ in their ids."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if k != "tool_call_id"}
        if "tool_calls" in m:
            m["tool_calls"] = [{k: v for k, v in c.items() if k != "id"} for c in m["tool_calls"]]
        out.append(m)
    return out


def _tools(*rows: dict) -> list[dict[str, Any]] | None:
    """The tools the candidates were offered (each by its name once, the first row's first), or
    None where none was: what the chat template shows the model beside the conversation."""
    tools: dict[str, dict[str, Any]] = {}
    for row in rows:
        for tool in json.loads(row["tools"]) if row.get("tools") else []:
            name = (tool.get("function") or {}).get("name") or json.dumps(tool, sort_keys=True)
            tools.setdefault(name, tool)
    return list(tools.values()) or None


def _json_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """``rows`` as a table of ``schema``, whose list-of-JSON columns take lists of dicts."""
    columns = []
    for f in schema:
        values = [row[f.name] for row in rows]
        if f.type == MESSAGES:
            text = [None if v is None else [json.dumps(m, ensure_ascii=False) for m in v] for v in values]
            columns.append(pa.array(text, pa.list_(pa.string())).cast(MESSAGES))
        else:
            columns.append(pa.array(values, f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _by_prompt(ranked: pa.Table) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in ranked.to_pylist():
        groups[row["prompt_id"]].append(row)
    for rows in groups.values():
        rows.sort(key=lambda r: r["rank"])
    return groups


@hookimpl
def register_exporters(register: Register) -> None:
    register("preferences", PreferencePairs)
    register("sft", BestOfN)

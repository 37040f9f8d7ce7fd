"""Training tables from a job's output: the pairs a ranking implies, best-of-n answers, and
the held-out split that keeps evaluation prompts out of every training set.

A ranking of K candidates (A > B > C > D) implies K choose 2 pairs, each (better, worse),
as InstructGPT trained its reward model on all comparisons of a prompt. People's rankings
(``human_rankings/``) come first: a prompt people ranked is trained on theirs alone (each
annotation its own ranking), the others on the job's ``rankings/``.

Tables are in TRL's columns (``genflow.api.TRAINING_FORMATS``), sorted by prompt and
candidate ids so the same output always makes the same table, whose fingerprint
(:func:`genflow.data.prompts.table_fingerprint`) names the data a model was trained on.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pyarrow as pa

from genflow.data import layout, schemas
from genflow.data.storage import Storage


@dataclass(frozen=True)
class Ranking:
    """One order of a prompt's candidates, best first; ``tied`` marks positions equal to the next."""

    prompt_id: str
    order: tuple[str, ...]
    source: str = "model"
    ties: frozenset[tuple[str, str]] = frozenset()
    """Pairs (a, b) of the order ranked equal: they imply no preference."""


def implied_pairs(ranking: Ranking) -> list[tuple[str, str]]:
    """Every (better, worse) pair of a ranking: K choose 2 of K candidates, ties left out."""
    return [(a, b) for a, b in itertools.combinations(ranking.order, 2)
            if (a, b) not in ranking.ties and (b, a) not in ranking.ties]


def heldout_split(prompt_ids: Iterable[str], seed: int, count: int) -> tuple[list[str], list[str]]:
    """(train, held-out) prompt ids: the ``count`` ids of lowest hash under ``seed`` are held
    out. The same ids and seed always split the same way, in any order."""
    ids = sorted(set(prompt_ids))
    if count >= len(ids):
        raise ValueError(f"{count} held-out prompts leave none of the {len(ids)} prompts to train on")
    ranked = sorted(ids, key=lambda p: hashlib.sha256(f"heldout:{seed}:{p}".encode()).hexdigest())
    heldout = set(ranked[:count])
    return [p for p in ids if p not in heldout], [p for p in ids if p in heldout]


def sample_prompts(prompt_ids: Sequence[str], seed: int, round_index: int, count: int) -> list[str]:
    """A round's prompts: ``count`` of ``prompt_ids``, a fresh deterministic sample per round
    (the lowest hashes of (seed, round, id)); every id when there are fewer."""
    key = {p: hashlib.sha256(f"round:{seed}:{round_index}:{p}".encode()).hexdigest() for p in prompt_ids}
    return sorted(sorted(prompt_ids, key=key.__getitem__)[:count])


def model_rankings(storage: Storage) -> list[Ranking]:
    """The job's rankings (``rankings/``), one per prompt, best first; equal scores are ties."""
    table = storage.read_folder(layout.RANKINGS, schema=schemas.RANKINGS)
    by_prompt: dict[str, list[tuple[int, str, float]]] = {}
    for row in table.to_pylist():
        by_prompt.setdefault(row["prompt_id"], []).append((row["rank"], row["generation_id"], row["score"]))
    out = []
    for prompt_id in sorted(by_prompt):
        rows = sorted(by_prompt[prompt_id])
        ties = frozenset((a[1], b[1]) for a, b in itertools.combinations(rows, 2) if a[2] == b[2])
        out.append(Ranking(prompt_id, tuple(r[1] for r in rows), "model", ties))
    return out


def human_rankings(storage: Storage) -> list[Ranking]:
    """People's rankings (``human_rankings/``): one per annotation, best first."""
    table = storage.read_folder(layout.HUMAN_RANKINGS, schema=schemas.HUMAN_RANKINGS)
    by_annotation: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for row in table.to_pylist():
        by_annotation.setdefault((row["prompt_id"], row["ranking_id"]), []).append((row["rank"], row["generation_id"]))
    out = []
    for (prompt_id, _), rows in sorted(by_annotation.items()):
        rows.sort()
        ties = frozenset((a[1], b[1]) for a, b in itertools.combinations(rows, 2) if a[0] == b[0])
        out.append(Ranking(prompt_id, tuple(r[1] for r in rows), "human", ties))
    return out


def job_rankings(storage: Storage) -> list[Ranking]:
    """People's rankings where a prompt has some, the job's own for the other prompts."""
    human = human_rankings(storage)
    ranked_by_people = {r.prompt_id for r in human}
    return human + [r for r in model_rankings(storage) if r.prompt_id not in ranked_by_people]


def _candidates(storage: Storage) -> dict[str, tuple[str, str]]:
    """``generation_id`` -> (prompt, text) of the job's text candidates."""
    table = storage.read_folder(layout.GENERATIONS, columns=["generation_id", "prompt", "text"])
    return {g: (p, t) for g, p, t in zip(table["generation_id"].to_pylist(), table["prompt"].to_pylist(),
                                         table["text"].to_pylist(), strict=True) if t is not None}


def preference_table(storage: Storage, prompt_ids: Iterable[str], pairs: str = "all") -> pa.Table:
    """Preference pairs of ``prompt_ids`` from the job's rankings (people's first).

    ``pairs``: ``all`` (K choose 2 per ranking) or ``best-worst`` (one pair per ranking: its
    first and last candidates, unless they tie)."""
    wanted = set(prompt_ids)
    candidates = _candidates(storage)
    rows = []
    for ranking in job_rankings(storage):
        if ranking.prompt_id not in wanted:
            continue
        implied = implied_pairs(ranking)
        if pairs == "best-worst":
            implied = [(ranking.order[0], ranking.order[-1])] if (ranking.order[0], ranking.order[-1]) in implied \
                else []
        for better, worse in implied:
            if better in candidates and worse in candidates:
                prompt, text = candidates[better]
                rows.append([ranking.prompt_id, prompt, text, candidates[worse][1], ranking.source])
    return _table(rows, schemas.TRAINING_PREFERENCE)


def _table(rows: list[list[str]], schema: pa.Schema) -> pa.Table:
    """Rows given as lists in the order of ``schema``'s columns."""
    return pa.Table.from_pylist([dict(zip(schema.names, row, strict=True)) for row in rows], schema=schema)


def best_of_n_table(storage: Storage, prompt_ids: Iterable[str]) -> pa.Table:
    """The best candidate of each ranking of ``prompt_ids`` as (prompt, completion): rejection
    sampling's training set (people's first choice where they ranked the prompt)."""
    wanted = set(prompt_ids)
    candidates = _candidates(storage)
    rows = []
    for ranking in job_rankings(storage):
        if ranking.prompt_id in wanted and ranking.order and ranking.order[0] in candidates:
            prompt, text = candidates[ranking.order[0]]
            rows.append({"prompt_id": ranking.prompt_id, "prompt": prompt, "completion": text,
                         "source": ranking.source})
    return pa.Table.from_pylist(rows, schema=schemas.TRAINING_PROMPT_COMPLETION)


def demonstration_table(storage: Storage, prompt_ids: Iterable[str]) -> pa.Table:
    """People's demonstrations (``demonstrations/``) of ``prompt_ids`` as (prompt, completion)."""
    wanted = set(prompt_ids)
    table = storage.read_folder(layout.DEMONSTRATIONS, schema=schemas.DEMONSTRATIONS)
    rows = [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "completion": r["completion"], "source": "human"}
            for r in sorted(table.to_pylist(), key=lambda r: (r["prompt_id"], r["demonstration_id"]))
            if r["prompt_id"] in wanted and r["completion"]]
    return pa.Table.from_pylist(rows, schema=schemas.TRAINING_PROMPT_COMPLETION)


def pairwise_accuracy(rankings: Iterable[Ranking], reward: dict[str, float]) -> tuple[float | None, int]:
    """How often a reward model's scores (``generation_id`` -> score) order a ranking's implied
    pairs as the ranking does: (accuracy, pairs counted). A pair the model scores equal counts
    half. None when no pair has both scores."""
    right, total = 0.0, 0
    for ranking in rankings:
        for better, worse in implied_pairs(ranking):
            if better in reward and worse in reward:
                total += 1
                right += 1.0 if reward[better] > reward[worse] else 0.5 if reward[better] == reward[worse] else 0.0
    return (right / total if total else None), total

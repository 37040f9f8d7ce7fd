"""``llm-judge``: a judge model rates each candidate from a rubric, or ranks a prompt's candidates in pairs.

One name, two backends (:meth:`LLMJudge.implementation` picks by ``backend``, or by
whether ``base_url`` is set), both with :class:`JudgeParams`:

- **local**: a transformers causal LM, loaded once per worker, run in batches (a sync
  scorer). The score is read from the model's probabilities (G-Eval): the rating
  tokens' probabilities right after the answer's cue (``Rating:``), and the expected
  rating over them. It is stable, needs no parsing and works with a tiny random
  model. With ``reasoning_tokens`` the model first writes a rationale (seeded), then
  the rating is read after it; with ``score_from: text`` the model writes the whole
  judgement and the rating is parsed from it.
- **openai**: any OpenAI-protocol server or hosted API (a request plugin on the
  engine's request path: concurrency, retries, journal, cost), with the ``openai``
  generator's HTTP client (:mod:`genflow.plugins.shared.openai_client`). The score
  comes from the answer's text (a robust parse), a JSON schema answer
  (``score_from: json``, sent as ``response_format``), or the answer's logprobs
  (``score_from: logprobs``, where the server returns them).

Modes:

- **rating**: an absolute score per candidate from a rubric (:mod:`genflow.plugins.judge.rubrics`):
  ``quality`` (1-10), ``ultrafeedback`` (helpfulness, honesty, instruction following and
  truthfulness, each 1-5, combined by ``weights``), ``prometheus`` (1-5 against the row's
  ``reference``), or the user's own Jinja ``template`` with the row's columns as variables.
- **pairwise** (a per-prompt scorer): up to ``max_pairs`` pairs of a prompt's candidates
  are each judged in both orders; orders that disagree are a tie (the judge preferred a
  position, not a response). A candidate's score is its expected win rate against the
  prompt's others under a Bradley-Terry fit of the wins (ties half a win), or its plain
  win rate, so the rank stage ranks and pairs them like any score.

An episode's candidate (``ScoreItem.messages`` set) is shown as its conversation, each turn,
tool call and tool result marked (:func:`rubrics.transcript`), and its final answer is judged
in that context; a pair of episodes is compared the same way.

A candidate cannot write its own verdict: its text (an episode's whole transcript) reaches the judge between tags
whose nonce it does not contain (:func:`judge_rubrics.delimit`), and the verdict is
read from the judge's own words only: what the judge quotes between the tags is left
out, and of the rest the rating or verdict written last counts (:meth:`Question.read`).

A judgement that cannot be read is asked again (served: a new request with another
seed; local: a new sample with another seed), up to ``max_parse_retries`` times, then
the candidate becomes an ``errors/`` row holding the judge's raw answer. The reasoning,
the raw answer and the probabilities go into ``details``; the judge's tokens into the
manifest (and a cost, with the scorer's ``price``): those of every request or sample,
read or not, every aspect's and every pair's, on the score or on the ``errors/`` row. Local scores are the same on every
run: every sample's seed comes from the candidate's id, the question and ``seed``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from genflow import hookimpl
from genflow.api import PluginParams, ReportSection, RowError, Score, ScoreItem, Scorer
from genflow.hookspecs import Register
from genflow.plugins.judge import rubrics
from genflow.plugins.judge.pairwise import bradley_terry, choose_pairs, expected_win_rates, pair_outcome, win_rates
from genflow.plugins.shared.hf import HF_REQUIRES, describe_model, load_tokenizer, prepare_torch
from genflow.plugins.shared.openai_client import check_base_url, check_key_env

if TYPE_CHECKING:
    import pyarrow as pa

    from genflow.plugins.shared.openai_client import OpenAIClient

RAW_CHARS = 4000
"""How much of a judge's answer goes into ``details`` and an ``errors/`` row."""
REASONING_CHARS = 1000
"""How much of a pairwise judgement's reasoning each candidate's ``details`` keep."""
MEMO_ANSWERS = 4096
"""Answers a served judge keeps, so a prompt's request sent again (one of its judgements
failed transiently) does not send the judgements already answered."""


class JudgeParams(PluginParams):
    backend: Literal["local", "openai"] | None = Field(None, description="Where the judge model runs: local (a "
                                                       "transformers causal LM; `model:` is its path or id) or "
                                                       "openai (a server at base_url; `model:` is the name it "
                                                       "serves). null = openai when base_url is set, else local.")
    mode: Literal["rating", "pairwise"] = Field("rating", description="rating: a score per candidate from the "
                                                "rubric; pairwise: a prompt's candidates compared in pairs (both "
                                                "orders) and scored by their wins.")
    rubric: Literal["quality", "ultrafeedback", "prometheus"] | None = Field(
        None, description="quality: 1-10 overall; ultrafeedback: helpfulness, honesty, instruction following, "
        "truthfulness, each 1-5, combined by weights; prometheus: 1-5 against the row's reference. null = quality, "
        "or your template.")
    template: str | None = Field(None, description="Your own Jinja judge prompt, in place of the rubric: the row's "
                                 "columns as variables, plus prompt, response (rating) or response_a and response_b "
                                 "(pairwise), reference, low, high; answer_format (how to answer) is appended "
                                 "unless the template places it.")
    scale: tuple[int, int] = Field((1, 10), description="The rating scale [low, high] of your template (the "
                                   "rubrics have their own).")
    criteria: str | None = Field(None, description="The criteria the judge reads, in place of the rubric's "
                                 "(prometheus: the score rubric; pairwise: what makes a response better).")
    weights: dict[str, float] | None = Field(None, description="ultrafeedback: each aspect's weight in the score "
                                             "(helpfulness, honesty, instruction_following, truthfulness); "
                                             "null = equal; an aspect left out is not asked.")
    score_from: Literal["auto", "logprobs", "json", "text"] = Field(
        "auto", description="How the score is read: logprobs (the expected rating over the rating tokens' "
        "probabilities, G-Eval), json (a JSON schema answer, sent as response_format; served only) or text (parsed "
        "from the answer). auto = logprobs for a local model, text for a served one.")
    max_parse_retries: int = Field(2, ge=0, description="Times an unreadable judgement is asked again (another "
                                   "seed) before the candidate goes to errors/ with the judge's answer.")
    reasoning_tokens: int = Field(0, ge=0, description="Local, logprobs: tokens of rationale the judge writes "
                                  "before its rating is read (0: the rating is read at once).")
    max_pairs: int = Field(10, ge=1, description="Pairwise: pairs judged per prompt at most (each in both "
                           "orders); all pairs when a prompt has few enough candidates.")
    ranking: Literal["bradley-terry", "wins"] = Field("bradley-terry", description="Pairwise: a candidate's score "
                                                      "is its expected win rate under a Bradley-Terry fit of the "
                                                      "wins, or its plain win rate (ties half a win).")
    seed: int = Field(0, description="Base of the seeds of the judge's samples (and of served requests).")
    temperature: float | None = Field(None, ge=0, description="Sampling temperature of written judgements; null = "
                                      "the server's default (served), 1.0 (local).")
    max_tokens: int = Field(512, ge=1, description="Tokens a written judgement may take at most.")
    base_url: str | list[str] | None = Field(None, description="Served: the server's base URL ending in /v1, or "
                                             "a list of servers of the same model.")
    api_key_env: str | None = Field(None, description="Served: the environment variable holding the API key; "
                                    "null = no key.")
    extra_body: dict[str, Any] = Field(default_factory=dict, description="Served: merged into every request body "
                                       "(server-specific parameters).")
    top_logprobs: int = Field(20, ge=1, le=20, description="Served, logprobs: alternatives asked per token.")
    micro_batch: int = Field(16, ge=1, description="Local: sequences per forward pass.")
    max_length: int | None = Field(None, ge=16, description="Local: tokens of a judge prompt kept at most (its "
                                   "end); null = the model's own limit.")

    @field_validator("base_url")
    @classmethod
    def _urls(cls, value: str | list[str] | None) -> str | list[str] | None:
        return None if value is None else check_base_url(value)

    @field_validator("api_key_env")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return check_key_env(value)

    @field_validator("template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                rubrics.compile_template(value)
            except Exception as exc:  # jinja2.TemplateSyntaxError
                raise ValueError(f"template is not valid Jinja: {exc}") from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> JudgeParams:
        backend = self.resolved_backend
        if backend == "openai" and self.base_url is None:
            raise ValueError("backend openai needs base_url, the server's /v1 URL")
        if backend == "local" and self.base_url is not None:
            raise ValueError("base_url is for backend openai; a local judge loads `model:` itself")
        if backend == "local" and self.score_from == "json":
            raise ValueError("score_from json needs a server that takes a JSON schema; a local judge reads "
                             "logprobs or text")
        if self.template is not None and self.rubric is not None:
            raise ValueError("give a rubric or a template, not both")
        if self.template is not None:
            used = rubrics.template_variables(self.template)
            needed = {"response_a", "response_b"} if self.mode == "pairwise" else {"response"}
            if not needed <= used:
                raise ValueError(f"template: a {self.mode} template must show {' and '.join(sorted(needed))}")
        low, high = self.scale
        if not 0 <= low < high or high - low > 100:
            raise ValueError("scale: [low, high] with 0 <= low < high, at most 100 apart")
        if self.weights is not None:
            if self.rubric != "ultrafeedback":
                raise ValueError("weights are the ultrafeedback rubric's aspect weights")
            known = {a.name for a in rubrics.ULTRAFEEDBACK.aspects}
            unknown = sorted(set(self.weights) - known)
            if unknown:
                raise ValueError(f"weights: unknown aspects {unknown}; the aspects are {sorted(known)}")
            if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
                raise ValueError("weights: none negative, and their sum above 0")
        return self

    @property
    def resolved_backend(self) -> str:
        return self.backend or ("openai" if self.base_url is not None else "local")

    @property
    def how(self) -> str:
        """How scores are read: ``logprobs``, ``json`` or ``text``."""
        if self.score_from != "auto":
            return self.score_from
        return "logprobs" if self.resolved_backend == "local" else "text"

    def columns(self) -> tuple[str, ...]:
        """The row's columns the judge reads: the reference, and any column a user's template names."""
        return tuple(dict.fromkeys(("reference", *(rubrics.template_columns(self.template) if self.template
                                                   else ()))))


# -- questions and answers: what both backends do alike ----------------------------

@dataclass(frozen=True)
class Question:
    """One judgement to ask: a rating of a response on ``low..high``, or a verdict between two."""

    key: str
    """What makes the question unique (candidate, aspect; or the pair in its order): its seeds come from it."""
    text: str
    pairwise: bool
    low: int = 0
    high: int = 0
    cue: str = "Rating:"
    nonce: str = ""
    """The suffix of the tags its candidates' texts are delimited by (:func:`rubrics.delimit`)."""
    quotes: tuple[str, ...] = ()
    """Its candidates' lines an answer may quote without the tags (:func:`rubrics.quotable_lines`)."""

    def options(self) -> dict[str, str]:
        """What the judge may write right after the cue, with the value each one reads as."""
        if self.pairwise:
            return {" A": "A", " B": "B"}
        return {f" {r}": str(r) for r in range(self.low, self.high + 1)}

    def read(self, text: str) -> rubrics.Reading | None:
        """The judgement in the judge's own words: what it quotes between this question's tags
        is left out (a candidate's ``Rating: 10`` is not the judge's), then the verdict it wrote
        last counts. ``at`` is an offset in ``text``."""
        own = rubrics.without_quotes(text, self.nonce, self.quotes) if self.nonce else text
        read = rubrics.read_verdict(own, self.cue) if self.pairwise else rubrics.read_rating(own, self.low, self.high,
                                                                                              self.cue)
        if read is None:
            return None
        return read._replace(reasoning=re.sub(r"\[\.\.\.\]\s+", "[...] ", read.reasoning))


@dataclass
class Judgement:
    """A judgement as read: a rating (float) or a verdict (``A``, ``B``, ``tie``), and what it came from."""

    value: float | str
    how: str
    reasoning: str = ""
    raw: str = ""
    probabilities: dict[str, float] | None = None
    mass: float | None = None
    attempts: int = 1
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Unreadable:
    """A judgement that could not be read after every attempt: the last raw answer."""

    raw: str
    attempts: int
    prompt_tokens: int = 0
    completion_tokens: int = 0


Answer = Judgement | Unreadable
Finish = Callable[[list[Answer]], list[Score | RowError]]


def from_probabilities(question: Question, logprobs: dict[str, float]) -> tuple[float | str, dict[str, float], float]:
    """A judgement from the log-probabilities of each option: the expected rating, or the likelier verdict."""
    values = {question.options()[o]: lp for o, lp in logprobs.items()}
    if question.pairwise:
        top = max(values.values())
        weights = {v: math.exp(lp - top) for v, lp in values.items()}
        total = sum(weights.values())
        probabilities = {v: w / total for v, w in weights.items()}
        a, b = probabilities.get("A", 0.0), probabilities.get("B", 0.0)
        mass = sum(math.exp(lp) for lp in values.values())
        return ("A" if a > b else "B" if b > a else "tie"), probabilities, mass
    expected, distribution, mass = rubrics.expected_rating({int(v): lp for v, lp in values.items()})
    return expected, {str(r): p for r, p in distribution.items()}, mass


def judge_seed(base: int, key: str, attempt: int) -> int:
    digest = hashlib.blake2b(f"{base}:{key}:{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % (2**31 - 1)


def _cut(text: str, limit: int = RAW_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _unreadable_error(what: str, answer: Unreadable, prompt_tokens: int, completion_tokens: int) -> RowError:
    """The error of a candidate whose judgement could not be read: the judge's last answer, and
    the tokens its requests spent (every attempt, every aspect or pair), which are paid for all the same."""
    error = RowError(f"the judge's answer could not be read as {what} after {answer.attempts} attempts; "
                     f"the answer: {_cut(answer.raw)}")
    error.raw = answer.raw  # type: ignore[attr-defined]
    error.prompt_tokens = prompt_tokens  # type: ignore[attr-defined]
    error.completion_tokens = completion_tokens  # type: ignore[attr-defined]
    return error


def _split(total: int, n: int) -> list[int]:
    """``total`` tokens over ``n`` candidates (the remainder on the first): their sum is the total."""
    share, rest = divmod(total, n)
    return [share + (rest if i == 0 else 0) for i in range(n)]


def candidate_texts(item: ScoreItem) -> list[str]:
    """A candidate's texts as the judge is shown them: its final answer, and an episode's every
    turn, tool call and tool result (none may hold its tags' nonce; the judge may quote any)."""
    return [item.text or "", *(rubrics.episode_texts(item.messages) if item.messages is not None else [])]


def shown_text(item: ScoreItem, nonce: str) -> str:
    """What the judge reads between a candidate's tags: its text, or an episode's transcript."""
    if item.messages is None:
        return item.text or ""
    return rubrics.transcript(item.messages, item.text or "", item.prompt, nonce)


class Judging:
    """The questions a judge asks of a call's items and the scores its answers make (either backend)."""

    def __init__(self, params: JudgeParams) -> None:
        self.params = params
        self.rubric = rubrics.RUBRICS[params.rubric or "quality"]
        self.custom = params.template is not None
        if self.custom:
            self.low, self.high = params.scale
        else:
            self.low, self.high = self.rubric.low, self.rubric.high
        self.cue = rubrics.PAIRWISE_CUE if params.mode == "pairwise" else (
            "Rating:" if self.custom else self.rubric.cue)
        if params.template is not None:
            source = rubrics.with_answer_format(params.template)
        else:
            source = rubrics.PAIRWISE_TEMPLATE if params.mode == "pairwise" else self.rubric.template
        self.template = rubrics.compile_template(source)
        weights = params.weights
        self.aspects = [a for a in self.rubric.aspects if weights is None or weights.get(a.name, 0) > 0]
        if self.custom:
            self.aspects = [rubrics.Aspect("score", params.criteria or "")]
        # Whether the judge is asked for a rationale; its details then always hold one (maybe empty).
        self.reasons = not (params.how == "logprobs" and params.resolved_backend == "local"
                            and params.reasoning_tokens == 0)
        self.answer_format = rubrics.answer_format(params.how, self.low, self.high, self.cue,
                                                   params.mode == "pairwise", self.reasons)

    def _render(self, item: ScoreItem, key: str, responses: dict[str, ScoreItem],
                **variables: Any) -> tuple[str, str]:
        """The question's text and its tags' nonce: ``responses`` (variable -> candidate) go in
        delimited, an episode's as its transcript (:func:`rubrics.transcript`), and the answer
        format starts by saying where they are."""
        texts = [*(t for c in responses.values() for t in candidate_texts(c)), item.prompt,
                 *(v for v in item.inputs.values() if isinstance(v, str))]
        nonce = rubrics.delimiter_nonce(f"{self.params.seed}:{key}", texts)
        pairwise = self.params.mode == "pairwise"
        tags = dict(zip(("response_a", "response_b"), rubrics.RESPONSE_TAGS[1:], strict=True)) if pairwise else {
            "response": rubrics.RESPONSE_TAGS[0]}
        note = rubrics.delimiter_note(nonce, pairwise)
        if any(c.messages is not None for c in responses.values()):
            note = f"{rubrics.episode_note(nonce, pairwise)} {note}"
        values = {**item.inputs, "prompt": item.prompt, "reference": item.inputs.get("reference"),
                  "low": self.low, "high": self.high, "answer_format": f"{note} {self.answer_format}",
                  **{name: rubrics.delimit(shown_text(c, nonce), tags[name], nonce) for name, c in responses.items()},
                  **variables}
        return self.template.render(**values), nonce

    # -- rating --------------------------------------------------------------------

    def rating_questions(self, items: list[ScoreItem]) -> tuple[list[Question], Finish]:
        questions: list[Question] = []
        spans: list[tuple[int, int] | RowError] = []
        for item in items:
            start = len(questions)
            try:
                for aspect in self.aspects:
                    criteria = self.params.criteria or aspect.criteria
                    task = ("Evaluate the response to the instruction below." if len(self.rubric.aspects) == 1
                            else f"Evaluate the response to the instruction below for "
                                 f"{aspect.name.replace('_', ' ')} only.")
                    key = f"{item.generation_id}/{aspect.name}"
                    text, nonce = self._render(item, key, {"response": item}, criteria=criteria,
                                               aspect=aspect.name, task=task)
                    questions.append(Question(key, text, False, self.low, self.high, self.cue, nonce,
                                              rubrics.quotable_lines(candidate_texts(item))))
            except Exception as exc:  # jinja2.UndefinedError: the template reads a column this row lacks
                del questions[start:]
                spans.append(RowError(f"llm-judge template: {exc}"))
                continue
            spans.append((start, len(questions)))

        def finish(answers: list[Answer]) -> list[Score | RowError]:
            return [span if isinstance(span, RowError) else self._rating(answers[span[0]:span[1]])
                    for span in spans]

        return questions, finish

    def _rating(self, answers: list[Answer]) -> Score | RowError:
        for answer in answers:
            if isinstance(answer, Unreadable):
                return _unreadable_error(f"a rating from {self.low} to {self.high}", answer,
                                         sum(a.prompt_tokens for a in answers),
                                         sum(a.completion_tokens for a in answers))
        judged: list[Judgement] = [a for a in answers if isinstance(a, Judgement)]
        weights = self.params.weights or {}
        aspect_weights = [weights.get(a.name, 1.0) if weights else 1.0 for a in self.aspects]
        value = sum(w * float(j.value) for w, j in zip(aspect_weights, judged, strict=True)) / sum(aspect_weights)
        aspects = {}
        for aspect, j in zip(self.aspects, judged, strict=True):
            entry: dict[str, Any] = {"score": round(float(j.value), 6), "score_from": j.how, "attempts": j.attempts}
            if j.probabilities is not None:
                entry["probabilities"] = {k: round(p, 6) for k, p in j.probabilities.items()}
                entry["rating_mass"] = round(j.mass or 0.0, 8)
            if j.reasoning:
                entry["reasoning"] = _cut(j.reasoning)
            if j.raw:
                entry["raw"] = _cut(j.raw)
            aspects[aspect.name] = entry
        reasoning = next((j.reasoning for j in judged if j.reasoning), "")
        details: dict[str, Any] = {"mode": "rating", "rubric": "template" if self.custom else self.rubric.name,
                                   "scale": [self.low, self.high], "score_from": judged[0].how, "aspects": aspects,
                                   "outcome": f"{value:.2f} of {self.low}-{self.high}"
                                              + (f": {' '.join(reasoning.split())}" if reasoning else "")}
        if reasoning or self.reasons:
            details["reasoning"] = _cut(reasoning)
        if weights:
            details["weights"] = weights
        return Score(value, details, prompt_tokens=sum(j.prompt_tokens for j in judged),
                     completion_tokens=sum(j.completion_tokens for j in judged))

    # -- pairwise ------------------------------------------------------------------

    def pairwise_questions(self, items: list[ScoreItem]) -> tuple[list[Question], Finish]:
        """Each prompt's pairs, each asked in both orders (A then B, B then A)."""
        groups: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.prompt_id, []).append(i)
        questions: list[Question] = []
        plans: list[tuple[list[int], list[tuple[int, int]], int] | RowError] = []
        criteria = self.params.criteria or self.rubric.summary
        for indices in groups.values():
            order = sorted(indices, key=lambda i: items[i].generation_id)
            pairs = choose_pairs(len(order), self.params.max_pairs)
            start = len(questions)
            try:
                for a, b in pairs:
                    for first, second in ((order[a], order[b]), (order[b], order[a])):
                        x, y = items[first], items[second]
                        key = f"{x.generation_id}|{y.generation_id}"
                        text, nonce = self._render(x, key, {"response_a": x, "response_b": y}, criteria=criteria)
                        quotes = rubrics.quotable_lines([*candidate_texts(x), *candidate_texts(y)])
                        questions.append(Question(key, text, True, cue=self.cue, nonce=nonce, quotes=quotes))
            except Exception as exc:  # the template reads a column this row lacks
                del questions[start:]
                plans.append(RowError(f"llm-judge template: {exc}"))
                continue
            plans.append((order, pairs, start))

        def finish(answers: list[Answer]) -> list[Score | RowError]:
            out: list[Score | RowError] = [RowError("not judged")] * len(items)
            for plan, indices in zip(plans, groups.values(), strict=True):
                if isinstance(plan, RowError):
                    for i in indices:
                        out[i] = plan
                    continue
                order, pairs, start = plan
                scores = self._ranked([items[i] for i in order], pairs, answers[start:start + 2 * len(pairs)])
                for i, score in zip(order, scores, strict=True):
                    out[i] = score
            return out

        return questions, finish

    def _ranked(self, items: list[ScoreItem], pairs: list[tuple[int, int]],
                answers: list[Answer]) -> list[Score | RowError]:
        """A prompt's candidates scored from its pairs' verdicts (two answers per pair, in order)."""
        n = len(items)
        prompt_tokens = _split(sum(a.prompt_tokens for a in answers), n)
        completion_tokens = _split(sum(a.completion_tokens for a in answers), n)
        unreadable = next((a for a in answers if isinstance(a, Unreadable)), None)
        if unreadable is not None:
            return [_unreadable_error("a verdict (A, B or tie)", unreadable, p, c)
                    for p, c in zip(prompt_tokens, completion_tokens, strict=True)]
        judged = [a for a in answers if isinstance(a, Judgement)]
        outcomes: list[tuple[int, int, float]] = []  # (a, b, a's share of the win)
        records: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        for k, (a, b) in enumerate(pairs):
            forward, backward = judged[2 * k], judged[2 * k + 1]
            share = pair_outcome(str(forward.value), str(backward.value))
            outcomes.append((a, b, share))
            for me, other, mine in ((a, b, share), (b, a, 1.0 - share)):
                records[me].append({
                    "vs": items[other].generation_id,
                    "result": "win" if mine == 1.0 else "loss" if mine == 0.0 else "tie",
                    "verdicts": [str(forward.value), str(backward.value)],
                    "order": "first" if me == a else "second",
                    "reasoning": [_cut(forward.reasoning, REASONING_CHARS), _cut(backward.reasoning, REASONING_CHARS)],
                    **({"probabilities": [forward.probabilities, backward.probabilities]}
                       if forward.probabilities is not None else {}),
                })
        strengths = bradley_terry(n, outcomes)
        scores = expected_win_rates(strengths) if self.params.ranking == "bradley-terry" else win_rates(n, outcomes)
        out: list[Score | RowError] = []
        for i in range(n):
            wins = sum(1 for r in records[i] if r["result"] == "win")
            ties = sum(1 for r in records[i] if r["result"] == "tie")
            losses = len(records[i]) - wins - ties
            details = {"mode": "pairwise", "ranking": self.params.ranking, "score_from": judged[0].how if judged
                       else self.params.how, "strength": round(strengths[i], 6),
                       "wins": wins, "ties": ties, "losses": losses, "pairs": records[i],
                       "outcome": f"won {wins}, tied {ties}, lost {losses} of {len(records[i])} pairs"}
            reasons = [r["reasoning"][0] for r in records[i] if r["reasoning"][0]]
            if reasons or self.reasons:
                details["reasoning"] = reasons[0] if reasons else ""
            out.append(Score(scores[i], details, prompt_tokens=prompt_tokens[i],
                             completion_tokens=completion_tokens[i]))
        return out


# -- the registered plugin --------------------------------------------------------------

class LLMJudge(Scorer):
    """An LLM judge: rubric ratings or pairwise rankings, from a local model or a served one."""

    Params: ClassVar[type[PluginParams]] = JudgeParams
    modalities: ClassVar[tuple[str, ...]] = ("text", "code")
    description: ClassVar[str] = ("LLM-as-a-judge: rubric ratings (quality, UltraFeedback, Prometheus, yours) or "
                                  "pairwise rankings; local model (hf) or a served one (openai)")
    input_columns: ClassVar[tuple[str, ...]] = ("reference",)
    unhashed_params: ClassVar[tuple[str, ...]] = ("base_url", "api_key_env")
    params: JudgeParams

    @classmethod
    def implementation(cls, params: dict[str, Any]) -> type[LLMJudge]:
        p = JudgeParams.model_validate(params)
        base: type[LLMJudge] = {("local", "rating"): LocalRatingJudge, ("local", "pairwise"): LocalPairwiseJudge,
                                ("openai", "rating"): ServedRatingJudge,
                                ("openai", "pairwise"): ServedPairwiseJudge}[(p.resolved_backend, p.mode)]
        return reading(base, p.columns())

    @classmethod
    def secret_env(cls, params: PluginParams) -> list[str]:
        key_env = getattr(params, "api_key_env", None)
        return [key_env] if key_env else []

    def score(self, items: list[ScoreItem]) -> list[Score | RowError]:
        raise NotImplementedError("llm-judge runs as the class its implementation() picks")

    @classmethod
    def summarize(cls, scores: pa.Table, params: PluginParams) -> dict[str, Any]:
        return summarize_judgements(scores)

    @classmethod
    def report_sections(cls, name: str, metrics: dict[str, Any]) -> list[ReportSection]:
        return judge_sections(name, metrics)


@functools.cache
def reading(base: type[LLMJudge], columns: tuple[str, ...]) -> type[LLMJudge]:
    """``base`` reading these row columns (a user's template's), the same class for the same columns."""
    if columns == base.input_columns:
        return base
    return type(base.__name__, (base,), {"input_columns": columns, "__module__": base.__module__,
                                         "__qualname__": f"{base.__qualname__}[{','.join(columns)}]"})


# -- local backend ----------------------------------------------------------------------

class _LocalJudge(LLMJudge):
    """A transformers causal LM as the judge, in the job's workers: batched forward passes."""

    requires: ClassVar[tuple[str, ...]] = HF_REQUIRES
    extra: ClassVar[str | None] = "hf"
    batch_size: ClassVar[int] = 16

    def __init__(self, model: str | None, params: JudgeParams, device: str = "cpu") -> None:
        super().__init__(model, params, device)
        if not self.model_name:
            raise ValueError("llm-judge (local) needs `model:`, the judge model's path or id")
        import torch
        from transformers import AutoModelForCausalLM

        self.torch_device = prepare_torch(device)
        self.tokenizer = load_tokenizer(self.model_name, padding_side="right")
        dtype = torch.float16 if self.torch_device.type == "cuda" else torch.float32
        loaded: Any = AutoModelForCausalLM.from_pretrained(self.model_name, dtype=dtype)
        self.model = loaded.to(self.torch_device)
        self.model.eval()
        self.judging = Judging(params)
        self.use_chat = bool(self.tokenizer.chat_template)
        limit = getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", None) or 2048
        self.max_length = min(params.max_length or limit, limit)

    def describe(self) -> dict[str, Any]:
        return describe_model(self.model_name, self.model, chat_template=self.use_chat)

    def batch_keys(self, items: list[ScoreItem]) -> list[Any]:
        """A prompt's candidates together, then by length: calls of alike lengths pad little."""
        return [(len(i.prompt) + sum(len(t) for t in candidate_texts(i)), i.prompt_id) for i in items]

    def _rendered(self, text: str) -> str:
        """The judge prompt as the model reads it: its chat template's user turn when it has one."""
        if self.use_chat:
            return str(self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                          add_generation_prompt=True))
        return text + "\n\n"

    def _encode(self, text: str, room: int) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=not self.use_chat)["input_ids"])
        keep = max(1, self.max_length - room)
        return ids[-keep:]

    def ask(self, questions: list[Question]) -> list[Answer]:
        """Every question's judgement, in batches; unreadable written answers sampled again."""
        p = self.params
        if not questions:
            return []
        prompts = [self._rendered(q.text) for q in questions]
        if p.how == "logprobs":
            rationales = [""] * len(questions)
            written_tokens = [0] * len(questions)
            if p.reasoning_tokens:
                written = self._write(prompts, [judge_seed(p.seed, q.key, 0) for q in questions],
                                      p.reasoning_tokens)
                for i, (text, n) in enumerate(written):
                    # the judge's own words, up to its cue: not a candidate's text it quotes
                    own = re.sub(r"\[\.\.\.\]\s+", "[...] ", rubrics.without_quotes(text, questions[i].nonce,
                                                                                 questions[i].quotes))
                    cut = own.find(questions[i].cue)
                    rationales[i] = (own[:cut] if cut >= 0 else own).strip()
                    written_tokens[i] = n
            contexts = [prompt + (rationale + "\n" if rationale else "") + q.cue
                        for prompt, rationale, q in zip(prompts, rationales, questions, strict=True)]
            logprobs, context_tokens = self._option_logprobs(contexts, [list(q.options()) for q in questions])
            answers: list[Answer] = []
            for q, lps, rationale, n_ctx, n_written in zip(questions, logprobs, rationales, context_tokens,
                                                           written_tokens, strict=True):
                value, probabilities, mass = from_probabilities(q, lps)
                answers.append(Judgement(value, "logprobs", rationale, rationale, probabilities, mass,
                                         prompt_tokens=n_ctx, completion_tokens=n_written))
            return answers
        # Written judgements, parsed; the unreadable ones sampled again with other seeds.
        results: list[Answer | None] = [None] * len(questions)
        spent = [[0, 0] for _ in questions]
        pending = list(range(len(questions)))
        last: dict[int, str] = {}
        for attempt in range(p.max_parse_retries + 1):
            written = self._write([prompts[i] for i in pending],
                                  [judge_seed(p.seed, questions[i].key, attempt) for i in pending], p.max_tokens)
            still = []
            for i, (text, n) in zip(pending, written, strict=True):
                spent[i][0] += len(self._encode(prompts[i], p.max_tokens))
                spent[i][1] += n
                read = questions[i].read(text)
                if read is None:
                    last[i] = text
                    still.append(i)
                else:
                    results[i] = Judgement(read.value, "text", read.reasoning, text, attempts=attempt + 1,
                                           prompt_tokens=spent[i][0], completion_tokens=spent[i][1])
            pending = still
            if not pending:
                break
        for i in pending:
            results[i] = Unreadable(last[i], p.max_parse_retries + 1, spent[i][0], spent[i][1])
        return [r for r in results if r is not None]

    def _option_logprobs(self, contexts: list[str],
                         options: list[list[str]]) -> tuple[list[dict[str, float]], list[int]]:
        """log P(option | context) for each context's options, and each context's tokens.

        An option of several tokens is scored token by token; contexts and option prefixes
        that coincide are one sequence, so single-token options cost one forward pass."""
        import torch

        longest = max(len(self.tokenizer(o, add_special_tokens=False)["input_ids"]) for opts in options
                      for o in opts)
        encoded = [self._encode(c, longest) for c in contexts]
        targets: list[list[tuple[str, list[int]]]] = []
        for context, opts in zip(contexts, options, strict=True):
            full = self.tokenizer([context + o for o in opts], add_special_tokens=not self.use_chat)["input_ids"]
            whole = list(self.tokenizer(context, add_special_tokens=not self.use_chat)["input_ids"])
            mine = []
            for o, f in zip(opts, full, strict=True):
                tail = list(f[len(whole):]) if list(f[:len(whole)]) == whole else \
                    list(self.tokenizer(o, add_special_tokens=False)["input_ids"])
                mine.append((o, tail or [self.tokenizer.eos_token_id]))
            targets.append(mine)
        sequences: dict[tuple[int, ...], int] = {}
        reads: list[list[tuple[str, int, int, list[int]]]] = []  # option, sequence, first position, tokens
        for ids, mine in zip(encoded, targets, strict=True):
            row = []
            for option, tail in mine:
                seq = tuple(ids + tail[:-1])
                index = sequences.setdefault(seq, len(sequences))
                row.append((option, index, len(ids) - 1, tail))
            reads.append(row)
        ordered = list(sequences)
        wanted: dict[int, set[int]] = {}
        for row in reads:
            for _, index, first, tail in row:
                wanted.setdefault(index, set()).update(range(first, first + len(tail)))
        logprob_at: dict[tuple[int, int], Any] = {}
        order = sorted(range(len(ordered)), key=lambda i: -len(ordered[i]))
        for start in range(0, len(order), self.params.micro_batch):
            batch = order[start:start + self.params.micro_batch]
            padded = self.tokenizer.pad({"input_ids": [list(ordered[i]) for i in batch]}, padding=True,
                                        return_tensors="pt").to(self.torch_device)
            with torch.inference_mode():
                logits = self.model(**padded).logits
            for slot, index in enumerate(batch):
                positions = sorted(wanted[index])
                picked = torch.log_softmax(logits[slot, positions].float(), dim=-1).cpu()
                for k, position in enumerate(positions):
                    logprob_at[(index, position)] = picked[k]
        out = []
        for row in reads:
            scored = {}
            for option, index, first, tail in row:
                scored[option] = float(sum(logprob_at[(index, first + k)][token] for k, token in enumerate(tail)))
            out.append(scored)
        return out, [len(ids) for ids in encoded]

    def _write(self, prompts: list[str], seeds: list[int], max_new_tokens: int) -> list[tuple[str, int]]:
        """Each prompt's continuation, sampled with its own seed (left-padded batches)."""
        import torch
        from transformers import LogitsProcessorList

        from genflow.plugins.shared.batching import length_sorted_batches
        from genflow.plugins.shared.causal_lm import SeededSampler

        temperature = 1.0 if self.params.temperature is None else self.params.temperature
        encoded = [self._encode(p, max_new_tokens) for p in prompts]
        out: list[tuple[str, int]] = [("", 0)] * len(prompts)
        eos = self.tokenizer.eos_token_id
        self.tokenizer.padding_side = "left"
        try:
            for idx in length_sorted_batches([len(e) for e in encoded], self.params.micro_batch):
                batch = self.tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, padding=True,
                                           return_tensors="pt").to(self.torch_device)
                sampler = SeededSampler([seeds[i] for i in idx], temperature, 1.0, 0)
                with torch.inference_mode():
                    generated = self.model.generate(
                        **batch, do_sample=False, max_new_tokens=max_new_tokens,
                        logits_processor=LogitsProcessorList([sampler]), pad_token_id=self.tokenizer.pad_token_id,
                        eos_token_id=eos, num_beams=1)
                for i, ids in zip(idx, generated[:, batch["input_ids"].shape[1]:].tolist(), strict=True):
                    ids = ids[:ids.index(eos)] if eos in ids else ids
                    out[i] = (str(self.tokenizer.decode(ids, skip_special_tokens=True)), len(ids))
        finally:
            self.tokenizer.padding_side = "right"
        return out


class LocalRatingJudge(_LocalJudge):
    def score(self, items: list[ScoreItem]) -> list[Score | RowError]:
        questions, finish = self.judging.rating_questions(items)
        return finish(self.ask(questions))


class LocalPairwiseJudge(_LocalJudge):
    per_prompt: ClassVar[bool] = True

    def score(self, items: list[ScoreItem]) -> list[Score | RowError]:
        questions, finish = self.judging.pairwise_questions(items)
        return finish(self.ask(questions))


# -- served backend ---------------------------------------------------------------------

class _ServedJudge(LLMJudge):
    """An OpenAI-protocol server as the judge: a request plugin (the engine's request path)."""

    requires: ClassVar[tuple[str, ...]] = ("aiohttp",)
    extra: ClassVar[str | None] = "openai"

    def __init__(self, model: str | None, params: JudgeParams, device: str = "cpu") -> None:
        super().__init__(model, params, device)
        from genflow.plugins.shared.openai_client import PATHS, OpenAIClient

        if not self.model_name:
            raise ValueError("llm-judge (openai) needs `model:`, the model name the server serves")
        if params.api_key_env and not os.environ.get(params.api_key_env, "").strip():
            raise ValueError(f"api_key_env: the environment variable {params.api_key_env} is not set where the "
                             "plugin runs")
        assert params.base_url is not None  # JudgeParams checks it
        self.client: OpenAIClient = OpenAIClient(params.base_url, params.api_key_env, PATHS["chat"])
        self.judging = Judging(params)
        self._answered: dict[str, dict[str, Any]] = {}

    def describe(self) -> dict[str, Any]:
        return {"model": self.model_name, "servers": len(self.client.servers), "score_from": self.params.how}

    async def aclose(self) -> None:
        await self.client.aclose()

    def _body(self, question: Question, attempt: int) -> dict[str, Any]:
        p = self.params
        body: dict[str, Any] = {"model": self.model_name, "messages": [{"role": "user", "content": question.text}],
                                "max_tokens": p.max_tokens, "seed": judge_seed(p.seed, question.key, attempt)}
        if p.temperature is not None:
            body["temperature"] = p.temperature
        if p.how == "json":
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "verdict" if question.pairwise else "rating", "strict": True,
                "schema": verdict_schema() if question.pairwise else rating_schema(question.low, question.high)}}
        elif p.how == "logprobs":
            body["logprobs"] = True
            body["top_logprobs"] = p.top_logprobs
        body.update(p.extra_body)
        return body

    async def _post(self, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """The server's answer, or the one it gave this very body before (a prompt sent again), or
        the job's response cache's; and whether its tokens count (False: from the cache, free)."""
        key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        if key in self._answered:
            return self._answered[key], True  # counted as its first sending was
        answer, cached = await self.client.post_cached(body)
        if len(self._answered) >= MEMO_ANSWERS:
            self._answered.pop(next(iter(self._answered)))
        self._answered[key] = answer
        return answer, not cached

    def read_answer(self, question: Question, answer: dict[str, Any], attempt: int,
                    spent: list[int]) -> tuple[Judgement | None, str]:
        """One answer's judgement (None: it cannot be read) and its text; ``spent`` gains its tokens."""
        from genflow.plugins.shared.openai_client import message_text

        choices = answer.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
        message = choice.get("message")
        raw = (message_text(message.get("content")) if isinstance(message, dict) else None) or ""
        given = answer.get("usage")
        usage: dict[str, Any] = given if isinstance(given, dict) else {}
        spent[0] += _token_count(usage.get("prompt_tokens"))  # every attempt is paid for, read or not
        spent[1] += _token_count(usage.get("completion_tokens"))
        read = question.read(raw)
        if self.params.how == "logprobs":
            found = served_logprobs(question, choice.get("logprobs"))
            if found is not None:
                value, probabilities, mass = from_probabilities(question, found)
                return Judgement(value, "logprobs", read.reasoning if read else raw.strip(), raw, probabilities,
                                 mass, attempt + 1, spent[0], spent[1]), raw
        if read is not None:
            return Judgement(read.value, "json" if self.params.how == "json" else "text", read.reasoning, raw,
                             attempts=attempt + 1, prompt_tokens=spent[0], completion_tokens=spent[1]), raw
        return None, raw

    async def ask_one(self, question: Question) -> Answer:
        """A question's answer: a request (more when an answer cannot be read)."""
        return (await self._ask_one(question))[0]

    async def _ask_one(self, question: Question) -> tuple[Answer, bool]:
        """A question's answer, and whether a request was paid for it (not all from the cache)."""
        spent = [0, 0]
        raw = ""
        paid = False
        attempts = self.params.max_parse_retries + 1
        for attempt in range(attempts):
            answer, sent = await self._post(self._body(question, attempt))
            paid = paid or sent
            judgement, raw = self.read_answer(question, answer, attempt, spent if sent else [0, 0])
            if judgement is not None:
                return judgement, paid
        return Unreadable(raw, attempts, spent[0], spent[1]), paid

    async def ask(self, questions: list[Question]) -> tuple[list[Answer], bool]:
        """The questions' answers, and whether all came from the response cache (they cost nothing)."""
        asked = await asyncio.gather(*(self._ask_one(q) for q in questions))
        return [a for a, _ in asked], bool(asked) and not any(paid for _, paid in asked)

    # -- batch mode (requests.mode: batch, genflow.engine.batches) ----------------

    def batch_api(self) -> Any:
        """The Batch API's calls: files and batches on the (first) server of ``base_url``."""
        return self.client

    def _questions(self, item: Any) -> tuple[list[Question], Finish]:
        raise NotImplementedError

    def batch_request(self, item: Any) -> list[dict[str, Any]]:
        """A line per question (an aspect, a pair's order): each question's first request. A batch
        sends no second request for an answer that cannot be read: it is read as unreadable."""
        questions, _ = self._questions(item)
        return [self._body(question, 0) for question in questions]

    def batch_result(self, item: Any, answers: list[dict[str, Any]]) -> Score | RowError | list[Score | RowError]:
        questions, finish = self._questions(item)
        judged: list[Answer] = []
        for question, answer in zip(questions, answers, strict=True):
            spent = [0, 0]
            judgement, raw = self.read_answer(question, answer, 0, spent)
            judged.append(judgement if judgement is not None else Unreadable(raw, 1, spent[0], spent[1]))
        scores = finish(judged)
        return scores if isinstance(item, list) else scores[0]


def _all_cached(scores: list[Score | RowError], cached: bool) -> list[Score | RowError]:
    """Scores built from the response cache's answers only: they cost nothing."""
    if cached:
        for score in scores:
            if isinstance(score, Score):
                score.cached = True
    return scores


class ServedRatingJudge(_ServedJudge):
    async def score(self, item: ScoreItem) -> Score | RowError:  # type: ignore[override]
        """One candidate's rating: a request per aspect (more when an answer cannot be read)."""
        questions, finish = self.judging.rating_questions([item])
        answers, cached = await self.ask(questions)
        return _all_cached(finish(answers), cached)[0]

    def _questions(self, item: Any) -> tuple[list[Question], Finish]:
        return self.judging.rating_questions([item])


class ServedPairwiseJudge(_ServedJudge):
    per_prompt: ClassVar[bool] = True

    async def score(self, items: list[ScoreItem]) -> list[Score | RowError]:  # type: ignore[override]
        """One prompt's candidates ranked: two requests per pair, sent at once."""
        questions, finish = self.judging.pairwise_questions(items)
        answers, cached = await self.ask(questions)
        return _all_cached(finish(answers), cached)

    def _questions(self, item: Any) -> tuple[list[Question], Finish]:
        return self.judging.pairwise_questions(list(item))


def _token_count(value: Any) -> int:
    """A usage count as the server gave it: a non-negative whole number, else 0."""
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 \
        and math.isfinite(value) else 0


def rating_schema(low: int, high: int) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": ["reasoning", "score"],
            "properties": {"reasoning": {"type": "string"},
                           "score": {"type": "integer", "minimum": low, "maximum": high}}}


def verdict_schema() -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": ["reasoning", "winner"],
            "properties": {"reasoning": {"type": "string"}, "winner": {"type": "string", "enum": ["A", "B", "tie"]}}}


_JSON_KEY = re.compile(r'"[^"]*"\s*:\s*"?')
"""A JSON object's key as :meth:`Question.read` points at it: the value is written right after it."""


def served_logprobs(question: Question, logprobs: Any) -> dict[str, float] | None:
    """The options' log-probabilities where the answer wrote its rating (or verdict), read from
    that token's ``top_logprobs``: the token holding the judgement :meth:`Question.read` finds in
    the answer the tokens spell (a JSON object's value, after its key); None when that token is
    no option (the server spelled `` 3.`` as one token: its alternatives are no ratings, and the
    judgement is read from the text instead). With no judgement to find, the last option token
    of the judge's own words (never one it quotes between the question's tags). An option the
    server did not list there gets a log-probability far below the others."""
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list):
        return None
    values = {v: o for o, v in question.options().items()}
    tokens = [str(e.get("token", "")) if isinstance(e, dict) else "" for e in content]
    text = "".join(tokens)
    ends = list(itertools.accumulate(len(t) for t in tokens))
    quoted = rubrics.quoted_spans(text, question.nonce, question.quotes) if question.nonce else []
    options = [k for k, token in enumerate(tokens) if token.strip() in values
               and not any(start <= ends[k] - len(token.lstrip()) < end for start, end in quoted)]
    if not options:
        return None
    read = question.read(text)
    if read is None:
        chosen = options[-1]
    else:
        key = _JSON_KEY.match(text, read.at)
        at = key.end() if key else read.at
        chosen = next(k for k, end in enumerate(ends) if end > at)  # the token whose text holds offset `at`
        if chosen not in options:
            return None
    entry = content[chosen]
    found: dict[str, float] = {}
    for alternative in [entry, *(entry.get("top_logprobs") or [])]:
        token = str(alternative.get("token", "")).strip() if isinstance(alternative, dict) else ""
        lp = alternative.get("logprob") if isinstance(alternative, dict) else None
        if token in values and isinstance(lp, (int, float)) and math.isfinite(lp):
            option = values[token]
            found[option] = max(found.get(option, -math.inf), float(lp))
    if not found:
        return None
    floor = min(found.values()) - 20.0
    return {o: found.get(o, floor) for o in question.options()}


# -- job figures ------------------------------------------------------------------------

def summarize_judgements(scores: pa.Table) -> dict[str, Any]:
    """The judge's figures: how its scores were read, judgements asked again (ratings), the
    aspects' means (UltraFeedback), and how often a pair's two orders gave the same verdict
    (pairwise: position consistency; a judge that prefers a position scores 0). Its rationales
    are in ``details`` and, for the report's sampled candidates, in their ``outcome``."""
    rows = scores.select(["details"]).to_pylist()
    if not rows:
        return {}
    read_from: dict[str, int] = {}
    aspects: dict[str, list[float]] = {}
    retried = consistent = judged_pairs = 0
    for row in rows:
        details = json.loads(row["details"] or "{}")
        how = str(details.get("score_from", "?"))
        read_from[how] = read_from.get(how, 0) + 1
        for name, entry in (details.get("aspects") or {}).items():
            aspects.setdefault(name, []).append(float(entry["score"]))
            retried += int(entry.get("attempts", 1) > 1)
        for pair in details.get("pairs") or []:
            if pair.get("order") == "first":
                judged_pairs += 1
                first, second = pair.get("verdicts") or ["", ""]
                consistent += int({"A": "B", "B": "A"}.get(first) == second)
    metrics: dict[str, Any] = {"candidates": len(rows), "read_from": read_from}
    if judged_pairs:
        metrics["pairs"] = judged_pairs
        metrics["position_consistency"] = round(consistent / judged_pairs, 6)
    elif aspects:
        metrics["retried"] = retried
        if len(aspects) > 1:
            metrics.update({f"{name}_mean": round(sum(v) / len(v), 6) for name, v in aspects.items()})
    return metrics


def judge_sections(name: str, metrics: dict[str, Any]) -> list[ReportSection]:
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    read_from = metrics.get("read_from") or {}
    note = ("position_consistency: the share of pairs whose two orders gave the same verdict; the others count as "
            "ties. " if "position_consistency" in numbers else "")
    note += "The judge's reasoning is under each sampled candidate below, and in scores/ details."
    return [ReportSection(f"{name} judgements", ["scorer", *numbers, "read from"],
                          [[name, *numbers.values(), ", ".join(f"{k} {v}" for k, v in sorted(read_from.items()))]],
                          note=note)]


@hookimpl
def register_scorers(register: Register) -> None:
    register("llm-judge", LLMJudge)


__all__ = ["JudgeParams", "Judging", "LLMJudge", "Question"]

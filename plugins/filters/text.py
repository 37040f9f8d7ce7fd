"""How the filters see a text: normalised (Unicode NFKC, case, whitespace) and cut into words."""

from __future__ import annotations

import re
import unicodedata

_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"\w+")


def normalised(text: str) -> str:
    """NFKC, case-folded, runs of whitespace as one space, no leading or trailing space."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def words(text: str) -> list[str]:
    """The words of a normalised text (letters, digits, ``_``): punctuation and layout aside."""
    return _WORD.findall(normalised(text))


def ngrams(tokens: list[str] | str, n: int, sep: str = " ") -> list[str]:
    """The n-grams of a token list (or of a string's characters); a shorter one is its own n-gram."""
    if len(tokens) <= n:
        return [sep.join(tokens)] if not isinstance(tokens, str) else [tokens]
    if isinstance(tokens, str):
        return [tokens[i:i + n] for i in range(len(tokens) - n + 1)]
    return [sep.join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]

"""A prompt's candidates ranked from pairwise verdicts: which pairs to judge, what a pair's two
orders make of it, and the candidates' strengths (Bradley-Terry) or win rates.

Used by the ``llm-judge``'s pairwise mode; plain Python, no model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def choose_pairs(n: int, budget: int) -> list[tuple[int, int]]:
    """Up to ``budget`` pairs of ``n`` candidates, the same on every run: all of them when they fit,
    else rounds of (i, i+k) for k = 1, 2, ... so every candidate meets about as many others and
    the first round links them all in one cycle."""
    every = n * (n - 1) // 2
    if every <= budget:
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    pairs: list[tuple[int, int]] = []
    for k in range(1, n // 2 + 1):
        for i in range(n if 2 * k != n else n // 2):
            pairs.append((min(i, (i + k) % n), max(i, (i + k) % n)))
            if len(pairs) == budget:
                return pairs
    return pairs


def pair_outcome(forward: str, backward: str) -> float:
    """The first candidate's share of a pair's win from the verdicts of both orders: ``forward``
    with it as A, ``backward`` with it as B. Orders that disagree are a tie (0.5)."""
    first = {"A": 1.0, "B": 0.0}.get(forward, 0.5)
    second = {"B": 1.0, "A": 0.0}.get(backward, 0.5)
    if first == second:
        return first
    if 0.5 in (first, second):  # one order tied: the other's lean counts half
        return (first + second) / 2
    return 0.5


def bradley_terry(n: int, outcomes: Sequence[tuple[int, int, float]], prior: float = 0.5,
                  iterations: int = 500, tolerance: float = 1e-10) -> list[float]:
    """Bradley-Terry strengths (geometric mean 1) from pair outcomes ``(a, b, a's share)``, by
    Hunter's MM iterations. ``prior`` adds that many tied games to every judged pair, so a
    candidate that wins every game keeps a finite strength."""
    if n == 0:
        return []
    wins = [0.0] * n
    games: dict[tuple[int, int], float] = {}
    for a, b, share in outcomes:
        wins[a] += share + prior / 2
        wins[b] += 1.0 - share + prior / 2
        key = (min(a, b), max(a, b))
        games[key] = games.get(key, 0.0) + 1.0 + prior
    strength = [1.0] * n
    for _ in range(iterations):
        denominators = [0.0] * n
        for (a, b), count in games.items():
            denominators[a] += count / (strength[a] + strength[b])
            denominators[b] += count / (strength[a] + strength[b])
        new = [wins[i] / denominators[i] if denominators[i] > 0 else strength[i] for i in range(n)]
        scale = math.exp(sum(math.log(s) for s in new) / n)
        new = [s / scale for s in new]
        change = max(abs(x - y) for x, y in zip(new, strength, strict=True))
        strength = new
        if change < tolerance:
            break
    return strength


def expected_win_rates(strengths: list[float]) -> list[float]:
    """Each candidate's chance of beating each other one under Bradley-Terry, averaged (0.5 alone)."""
    n = len(strengths)
    if n < 2:
        return [0.5] * n
    return [sum(s / (s + t) for j, t in enumerate(strengths) if j != i) / (n - 1) for i, s in enumerate(strengths)]


def win_rates(n: int, outcomes: Sequence[tuple[int, int, float]]) -> list[float]:
    """Each candidate's wins over its games, ties half a win (0.5 when it played none)."""
    wins, games = [0.0] * n, [0] * n
    for a, b, share in outcomes:
        wins[a] += share
        wins[b] += 1.0 - share
        games[a] += 1
        games[b] += 1
    return [wins[i] / games[i] if games[i] else 0.5 for i in range(n)]

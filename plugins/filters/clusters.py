"""Duplicates found pairwise, made into clusters whose first row (by the job's order) is kept."""

from __future__ import annotations

from collections.abc import Iterable


def first_of_clusters(edges: Iterable[tuple[int, int]]) -> dict[int, int]:
    """For every row linked to an earlier one (directly or through others), the first row of its
    cluster: the one kept. Rows of no pair are absent."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {row: root for row in parent if (root := find(row)) != row}

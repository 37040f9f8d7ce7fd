"""The judge family: an LLM judge (local or served), its rubrics and pairwise ranking."""

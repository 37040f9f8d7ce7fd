"""Side-by-side benchmarks: genflow vs the bare model loop. Run them all with ``python -m benchmarks``."""

"""Helpers meant for plugins (model loading, batching, tiny tokenizers): no hooks, no family."""

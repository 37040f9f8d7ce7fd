"""The text family: transformers generation, reward-model and embedding scorers."""

"""The judge family: ``llm-judge`` (a local model, or an OpenAI-protocol server through the shared
client), its rubrics and how a verdict is read, and pairwise ranking (Bradley-Terry)."""

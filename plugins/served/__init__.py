"""Served APIs: generation through the OpenAI protocol."""

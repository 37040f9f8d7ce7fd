"""Prefect flows: thin orchestration over genflow."""

"""Where plugins run: Ray actors, the worker body, the request path, budgets."""

"""Built-in genflow plugins, one module per model family."""

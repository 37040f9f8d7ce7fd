"""Built-in genflow plugins, one sub-package per family; what two families share is in ``shared``.

A plugin module imports only the plugin interface (``genflow``, ``genflow.api``,
``genflow.hookspecs``, ``genflow.secrets``, and ``genflow.data.storage`` to read media),
``genflow.plugins.shared`` and modules of its own family; ``shared`` imports only the
interface (``tests/unit/test_layers.py`` checks it).
"""

"""genflow: labelled training data from generative models, at scale."""

from genflow.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["__version__", "hookimpl"]

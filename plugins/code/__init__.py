"""The code family: ``hf-code`` generation (on the shared causal-LM core), the ``code-exec``
scorer with its sandbox (``sandbox.py`` and the runner programs in ``sandbox_runners/``), pass@k."""

"""The text family: ``hf-text`` generation (on the shared causal-LM core), the ``hf-reward`` and
``embedding-sim`` scorers."""

"""The training-data family: the ``preferences`` (TRL preference pairs) and ``sft`` (best-of-n)
exporters."""

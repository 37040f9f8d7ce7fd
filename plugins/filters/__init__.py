"""The filter family: ``exact-dedup``, ``minhash-dedup``, ``semantic-dedup`` and ``decontaminate``
(docs/filters.md). Each computes a small signature per row on the workers and decides over
all of them at once (:class:`genflow.api.Filter`)."""

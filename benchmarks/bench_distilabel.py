"""The whole ``genflow run`` vs distilabel 1.5.3's pipeline: same model, prompts and token counts.

distilabel is installed by this benchmark in a virtual environment of its own
(``<workdir>/distilabel-venv``, kept for later runs): a CPU ``torch`` of the version
genflow's environment has, then ``distilabel==1.5.3`` with the ``transformers``
genflow's environment has (both sides run the same transformers; distilabel
declares ``transformers>=4.34.1`` and works with 5.x), and ``requests``, which
distilabel 1.5.3 imports without declaring it. If that fails, the benchmark says
why, in its row and its output.

distilabel's side is ``benchmarks/distilabel_pipeline.py``: ``LoadDataFromDicts`` >>
``TextGeneration(llm=TransformersLLM(...))``, run once with one replica of the
generation step (torch on both cores) and once with 2 (one process and one torch
thread each, as genflow's 2 workers); the faster is the reference. genflow's side is
``genflow run``: the hf-text generator, 2 Ray workers, generation only, default
shard size. Both load the same folder (``models/tiny-gpt2`` with ``min_new_tokens``
and the pad token banned: every sample is exactly ``--new-tokens`` long on both
sides, and genflow's count is checked), sample with temperature 0.8 and top-p 0.95,
and are timed from the command's launch to its end. Reported: genflow's speed-up,
distilabel's wall clock over genflow's. Target: >= 5.

    python -m benchmarks.bench_distilabel [--quick] [--prompts 2000] [--new-tokens 32]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
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
    worker_environment,
    write_prompts_parquet,
)

TARGET = 5.0
DISTILABEL = "1.5.3"


class DistilabelUnavailable(RuntimeError):
    """distilabel could not be installed or imported here; the message says why."""


def _pip(python: Path, *args: str) -> None:
    proc = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *args], capture_output=True, text=True)
    if proc.returncode:
        lines = [line for line in (proc.stderr + proc.stdout).splitlines() if "is ignored: it is neither" not in line]
        raise DistilabelUnavailable(f"pip install {' '.join(args)} failed (exit {proc.returncode}): "
                                    + " | ".join(lines[-6:]))


def distilabel_venv(workdir: Path) -> tuple[Path, dict[str, str]]:
    """The venv's python and its versions of distilabel, transformers and torch; installed once."""
    venv = workdir / "distilabel-venv"
    python = venv / "bin" / "python"
    marker = venv / "genflow-bench.json"
    torch_version = version("torch").split("+")[0]
    wanted = {"distilabel": DISTILABEL, "transformers": version("transformers"), "torch": torch_version}
    if marker.exists() and json.loads(marker.read_text()).get("wanted") == wanted:
        return python, json.loads(marker.read_text())["installed"]
    shutil.rmtree(venv, ignore_errors=True)
    log(f"installing distilabel {DISTILABEL} in {venv} (once; about a minute)")
    base = getattr(sys, "_base_executable", sys.executable)
    proc = subprocess.run([base, "-m", "venv", str(venv)], capture_output=True, text=True)
    if proc.returncode:
        raise DistilabelUnavailable(f"python -m venv failed: {proc.stderr.strip()[-500:]}")
    _pip(python, f"torch=={torch_version}")  # first: the CPU build, not the CUDA one a resolver would pick
    _pip(python, f"distilabel=={DISTILABEL}", f"transformers=={wanted['transformers']}", "requests")
    probe = subprocess.run([str(python), "-c", "import json, distilabel, transformers, torch; from distilabel.models "
                            "import TransformersLLM; print(json.dumps({'distilabel': distilabel.__version__, "
                            "'transformers': transformers.__version__, 'torch': torch.__version__}))"],
                           capture_output=True, text=True, env={**os.environ, **QUIET_ENV})
    if probe.returncode:
        raise DistilabelUnavailable(f"distilabel {DISTILABEL} installed but does not import: "
                                    f"{probe.stderr.strip().splitlines()[-1:]}")
    installed = json.loads(probe.stdout.strip().splitlines()[-1])
    marker.write_text(json.dumps({"wanted": wanted, "installed": installed}))
    return python, installed


def run_distilabel(python: Path, model: str, prompts: Path, workdir: Path, new_tokens: int,
                   replicas: int) -> dict[str, Any]:
    out = workdir / f"distilabel-{replicas}.parquet"
    cache = workdir / "distilabel-cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(QUIET_ENV, **worker_environment())
    if replicas > 1:
        env["OMP_NUM_THREADS"] = "1"  # one core a replica, as genflow's workers
    started = time.perf_counter()
    proc = subprocess.run([str(python), str(ROOT / "benchmarks" / "distilabel_pipeline.py"), model, str(prompts),
                           str(out), str(new_tokens), str(replicas), str(cache)], cwd=workdir, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"distilabel's pipeline failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "replicas": replicas, **result}


def run_genflow(model: str, prompts: Path, workdir: Path, new_tokens: int) -> dict[str, Any]:
    output = workdir / "out-genflow"
    config = workdir / "genflow.yaml"
    config.write_text(yaml.safe_dump({
        "name": "bench-distilabel", "input": str(prompts), "output": str(output),
        "generators": [{"label": "gen", "plugin": "hf-text", "model": model, "samples": 1,
                        "params": {"max_new_tokens": new_tokens, "temperature": 0.8, "top_p": 0.95}}],
        "scorers": [], "ray": {"workers": 2}}))
    shutil.rmtree(output, ignore_errors=True)
    env = {**os.environ, **QUIET_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "genflow.cli", "run", str(config), "--no-resume"], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"genflow run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    import pyarrow.dataset as ds

    tokens = int(sum(ds.dataset(output / "generations").to_table(columns=["num_tokens"])["num_tokens"].to_pylist()))
    manifest = json.loads((output / "manifest.json").read_text())
    return {"wall_s": wall, "tokens": tokens, "timings_s": manifest["timings_s"]}


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, help="prompts (default 2000, --quick 200)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2],
                        help="distilabel runs with this many replicas of its generation step (default: 1 2)")
    args = parser.parse_args()
    quiet_environment()
    count = args.prompts or (200 if args.quick else 2000)
    workdir: Path = args.workdir / "distilabel"
    workdir.mkdir(parents=True, exist_ok=True)
    name = f"whole job vs distilabel {DISTILABEL} TransformersLLM pipeline, tiny-gpt2, {count:,} prompts x " \
           f"{args.new_tokens} tokens"
    try:
        python, installed = distilabel_venv(args.workdir)
    except DistilabelUnavailable as exc:
        print(f"distilabel {DISTILABEL} is not available here: {exc}", flush=True)
        emit([Comparison(name, "x", 0.0, None, 0.0, f">= {TARGET:g}x (distilabel not installed: see details)",
                         False, {"why": str(exc)}, ratio_is="not measured")], args.json)
        return
    model = tiny_text_model(args.workdir, args.new_tokens)
    prompts = write_prompts_parquet(workdir / f"prompts-{count}.parquet", synthetic_prompts(count, seed=1))
    log(f"genflow run, {count:,} prompts")
    genflow = run_genflow(model, prompts, workdir, args.new_tokens)
    if genflow["tokens"] != count * args.new_tokens:
        raise RuntimeError(f"genflow generated {genflow['tokens']} tokens, expected {count * args.new_tokens}")
    log(f"  {genflow['wall_s']:.1f}s")
    runs = []
    for replicas in args.replicas:
        log(f"distilabel {installed['distilabel']} pipeline, {replicas} replica(s)")
        run = run_distilabel(python, model, prompts, workdir, args.new_tokens, replicas)
        if run["rows"] != count or run["empty"]:
            raise RuntimeError(f"distilabel wrote {run['rows']} rows ({run['empty']} empty), expected {count}")
        log(f"  {run['wall_s']:.1f}s")
        runs.append(run)
    best = min(runs, key=lambda r: r["wall_s"])
    speedup = best["wall_s"] / genflow["wall_s"]
    tokens = count * args.new_tokens
    details = {"prompts": count, "new_tokens_per_prompt": args.new_tokens, "installed": installed,
               "genflow": {"wall_s": round(genflow["wall_s"], 2), "ray_workers": 2, "timings_s": genflow["timings_s"]},
               "distilabel_runs": [{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()} for r in runs],
               "reference": f"distilabel with {best['replicas']} replica(s)",
               "load_average_1m": round(os.getloadavg()[0], 2)}
    print(f"genflow {genflow['wall_s']:.1f}s; distilabel " +
          ", ".join(f"{r['wall_s']:.1f}s ({r['replicas']} replica(s))" for r in runs) +
          f"; genflow's speed-up {speedup:.2f}x", flush=True)
    emit([Comparison(name, "tokens/s", round(tokens / genflow["wall_s"], 1), round(tokens / best["wall_s"], 1),
                     round(speedup, 3), *at_least(speedup, TARGET), details,
                     ratio_is="genflow's speed-up: distilabel's wall clock / genflow's")], args.json)


if __name__ == "__main__":
    main()

"""The whole ``genflow run`` vs a plain batched ``generate`` loop, wall clock, same work.

genflow side: ``genflow run`` in a fresh process — Prefect (ephemeral server),
Ray (2 workers on the machine's cores), Parquet in and out, generation only, no
scorers. Bare side: one Python process that loads the same model, reads the same
Parquet prompts, generates in length-sorted left-padded batches of the same size
with the same sampling and writes the texts to Parquet.

Both sides produce exactly ``--new-tokens`` tokens per prompt: the model's
``generation_config.json`` says ``min_new_tokens`` (EOS banned until then) and
``suppress_tokens`` (the pad token, which genflow would strip), and both load the
model from that folder. Both sides' processes get the glibc malloc settings that
genflow gives its plugin workers (``genflow.engine.ray_cluster.WORKER_MALLOC_ENV``), so
the ratio is orchestration overhead, not allocator tuning.

Cores: the job runs 2 Ray workers of 1 torch thread each on a 2-core machine. The
bare loop is measured both ways a plain script can use 2 cores — one process with 2
torch threads, and 2 processes of 1 thread on half the prompts each — and the
faster is the reference, so genflow is not flattered by a badly threaded baseline.

Two models: the 4-layer, 256-wide GPT-2 of the performance issue's example, and a
6-layer, 512-wide one with 6x its compute per token. On 2 CPU cores the first
generates 2k prompts in ~14 s, which does not dominate the job's fixed start-up
(Prefect's server, Ray, the model loads); the second takes over a minute, which does.

The report splits the job's wall time into start-up before the flow's work
(interpreter, imports, Prefect's server, Ray and the workers' launch), planning,
the wait for the workers' model loads, generation and the rest (writes, manifest,
shutdown), from the
manifest's ``timings_s`` and the bench's own clock; gives the CPU seconds of every
process of the job by kind (driver, Prefect server, Ray daemons, workers); and runs
the job a second time on a fifth of the prompts, which splits its wall clock into a
fixed cost and a cost per prompt, to compare with the bare loop's (load vs
generate) and to say at how many prompts the target would be met.

    python -m benchmarks.bench_job [--quick] [--prompts 2000] [--new-tokens 32] [--models ...] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    QUIET_ENV,
    ROOT,
    Comparison,
    at_least,
    base_parser,
    causal_lm,
    emit,
    log,
    quiet_environment,
    synthetic_prompts,
    worker_environment,
    write_prompts_parquet,
)

TARGET = 0.90
TEMPERATURE, TOP_P = 0.8, 0.95
JOB_MODELS = ("gpt2-4x256", "gpt2-6x512")


def fixed_length_model(workdir: Path, name: str, new_tokens: int) -> str:
    """GPT-2 ``name`` with ``min_new_tokens`` in its generation config: every sample has the same length."""
    from transformers import GenerationConfig

    source = Path(causal_lm(workdir, name))
    path = workdir / "models" / f"{name}-exactly-{new_tokens}-tokens"
    if not (path / "config.json").exists():
        shutil.copytree(source, path, dirs_exist_ok=True)
        config = GenerationConfig.from_pretrained(path)
        config.min_new_tokens = new_tokens
        config.suppress_tokens = [config.pad_token_id]  # genflow strips trailing pads; never sample one
        config.save_pretrained(path)
    return str(path)


def job_config(model: str, prompts: Path, output: Path, new_tokens: int, batch_size: int,
               workers: int) -> dict[str, Any]:
    return {
        "name": "bench-job",
        "input": str(prompts),
        "output": str(output),
        "generators": [{"label": "gen", "plugin": "hf-text", "model": model, "samples": 1,
                        "params": {"max_new_tokens": new_tokens, "temperature": TEMPERATURE, "top_p": TOP_P,
                                   "micro_batch": batch_size}}],
        "scorers": [],
        "ray": {"workers": workers, "batch_size": batch_size},
    }


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Both sides' processes: quiet, and the malloc settings genflow gives its Ray workers."""
    env = {**os.environ, **QUIET_ENV, **worker_environment(), **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


# -- the bare loop (runs in its own process) ----------------------------------

def bare_loop(model_path: str, prompts_path: str, out_path: str, new_tokens: int, batch_size: int,
              threads: int, part: int, parts: int) -> dict[str, Any]:
    """What a user writes without genflow: load, sort by length, generate in batches, save."""
    started = time.perf_counter()
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    table = pq.read_table(prompts_path)
    ids, prompts = table["id"].to_pylist()[part::parts], table["prompt"].to_pylist()[part::parts]
    loaded = time.perf_counter()
    encoded = tokenizer(prompts)["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    texts: list[str] = [""] * len(prompts)
    tokens = 0
    torch.manual_seed(part)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt")
            out = model.generate(**batch, do_sample=True, temperature=TEMPERATURE, top_p=TOP_P,
                                 max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
            new = out[:, batch["input_ids"].shape[1]:]
            tokens += int(new.numel())
            for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True), strict=True):
                texts[i] = text
    generated = time.perf_counter()
    pq.write_table(pa.table({"id": ids, "text": texts}), out_path)
    return {"load_s": loaded - started, "generate_s": generated - loaded,
            "write_s": time.perf_counter() - generated, "tokens": tokens, "prompts": len(prompts)}


def run_bare(model: str, prompts: Path, workdir: Path, new_tokens: int, batch_size: int,
             threads: int, parts: int) -> dict[str, Any]:
    """``parts`` processes of ``threads`` torch threads each; wall clock from launch to the last exit."""
    procs = []
    started = time.perf_counter()
    for part in range(parts):
        cmd = [sys.executable, "-m", "benchmarks.bench_job", "--bare", model, str(prompts),
               str(workdir / f"bare-{part}.parquet"), str(new_tokens), str(batch_size), str(threads),
               str(part), str(parts)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=environment({"OMP_NUM_THREADS": str(threads)}),
                                      stdout=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"bare loop failed with exit code {proc.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    wall = time.perf_counter() - started
    return {"wall_s": wall, "tokens": sum(r["tokens"] for r in results),
            "generate_s": max(r["generate_s"] for r in results),
            "load_s": max(r["load_s"] for r in results), "write_s": max(r["write_s"] for r in results),
            "processes": parts, "torch_threads": threads}


# -- the job ------------------------------------------------------------------

PROCESS_KINDS = (
    ("ray::PluginWorker", "Ray workers (the model)"),
    ("ray::DashboardAgent", "Ray agents (dashboard, runtime env)"),
    ("ray::RuntimeEnvAgent", "Ray agents (dashboard, runtime env)"),
    ("ray::", "Ray workers (idle)"),
    ("uvicorn", "Prefect API server"),
    ("genflow.cli", "driver (genflow run)"),
    ("py-spy", "profiler"),
    ("", "Ray daemons (gcs, raylet, dashboard, agents, log monitor)"),
)


class FamilyCPU:
    """CPU seconds of a process and all its descendants, by kind, sampled every 0.2 s."""

    def __init__(self, pid: int) -> None:
        import threading

        self.root, self.done = pid, threading.Event()
        self.seen: dict[int, tuple[str, float]] = {}
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        import psutil

        while not self.done.wait(0.2):
            try:
                family = [psutil.Process(self.root), *psutil.Process(self.root).children(recursive=True)]
            except psutil.Error:
                continue
            for p in family:
                try:
                    with p.oneshot():
                        cpu = p.cpu_times()
                        cmd = " ".join(p.cmdline())
                    # An exiting process shows no command line: keep the last one seen.
                    self.seen[p.pid] = (cmd or self.seen.get(p.pid, ("", 0.0))[0], cpu.user + cpu.system)
                except psutil.Error:
                    pass

    def stop(self) -> dict[str, float]:
        self.done.set()
        self.thread.join()
        out: dict[str, float] = {}
        for cmd, seconds in self.seen.values():
            kind = next(name for marker, name in PROCESS_KINDS if marker in cmd)
            out[kind] = round(out.get(kind, 0.0) + seconds, 2)
        return out


def run_job(config_path: Path, output: Path, profile: Path | None) -> dict[str, Any]:
    shutil.rmtree(output, ignore_errors=True)
    cmd = [sys.executable, "-m", "genflow.cli", "run", str(config_path), "--no-resume"]
    if profile is not None:
        cmd = ["py-spy", "record", "--rate", "50", "--format", "raw", "--output", str(profile), "--", *cmd]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    cpu = FamilyCPU(proc.pid)
    _, stderr = proc.communicate()
    wall = time.perf_counter() - started
    cpu_s = cpu.stop()
    if proc.returncode:
        raise RuntimeError(f"genflow run failed ({proc.returncode}):\n{stderr[-3000:]}")
    manifest = json.loads((output / "manifest.json").read_text())
    import pyarrow.dataset as ds

    gens = ds.dataset(output / "generations").to_table(columns=["num_tokens"])
    tokens = int(sum(gens["num_tokens"].to_pylist()))
    return {"wall_s": wall, "tokens": tokens, "manifest": manifest, "cpu_s": cpu_s}


BREAKDOWN_LEGEND = {
    "outside_flow": "interpreter start, imports, Prefect API start, Ray start and the workers' launch (both "
                    "before the flow), flow-run bookkeeping, Ray shutdown, exit",
    "plan": "read the input, write the prompt shards",
    "pool_start": "waiting in the first generate task for the workers to load the model, launched before the "
                  "flow (manifest timings_s start/generate/...)",
    "generation": "the generate stage's clock in the flow minus the pool start: generation, batches to and "
                  "from the workers, Parquet writes",
    "rest_of_flow": "Prefect task runs, manifest, row counts, pool stop",
}


def breakdown(job: dict[str, Any]) -> dict[str, float]:
    """Where the job's wall clock goes, in seconds (see ``BREAKDOWN_LEGEND``)."""
    timings = job["manifest"]["timings_s"]
    gen_stage = next(k for k in timings if k.startswith("generate/"))  # the only generator
    pool_start = timings.get(f"start/{gen_stage}", 0.0)
    # The stage's clock in the flow (its shards' own seconds overlap, now that packs of shards share calls).
    shard_tasks = timings.get(gen_stage, job["manifest"]["stages"][gen_stage]["seconds"])
    out = {
        "outside_flow": job["wall_s"] - timings["total"],
        "plan": timings.get("plan", 0.0),
        "pool_start": pool_start,
        "generation": shard_tasks - pool_start,
        "rest_of_flow": timings["total"] - timings.get("plan", 0.0) - shard_tasks,
    }
    return {k: round(v, 3) for k, v in out.items()}


def summarize_profile(path: Path, top: int = 12) -> list[str]:
    """The driver's busiest functions (inclusive share of samples) from a py-spy raw profile."""
    from collections import Counter

    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        seen = set()
        for frame in stack.split(";"):
            name = frame.split(" (")[0]
            where = frame.rsplit("/", 1)[-1].split(":")[0] if "/" in frame else ""
            key = f"{name} ({where})" if where else name
            if key not in seen:
                seen.add(key)
                inclusive[key] += n
    return [f"{n / total:6.1%} {k}" for k, n in inclusive.most_common(top * 4)
            if any(s in k for s in ("genflow", "flows", "stages", "execution", "storage", "prefect", "ray",
                                    "import", "wait", "get"))][:top]


def write_job(workdir: Path, name: str, model: str, count: int, args: argparse.Namespace) -> tuple[Path, Path]:
    import yaml

    prompts = write_prompts_parquet(workdir / f"{name}.parquet", synthetic_prompts(count, seed=1))
    config_path, output = workdir / f"{name}.yaml", workdir / f"out-{name}"
    config_path.write_text(yaml.safe_dump(job_config(model, prompts, output, args.new_tokens, args.batch_size,
                                                     args.workers)))
    return config_path, output


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--bare":
        a = sys.argv[2:10]
        print(json.dumps(bare_loop(a[0], a[1], a[2], int(a[3]), int(a[4]), int(a[5]), int(a[6]), int(a[7]))))
        return
    parser: argparse.ArgumentParser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, help="prompts (default 2000, --quick 400)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per generate call, both sides")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (default 2)")
    parser.add_argument("--models", nargs="+", choices=JOB_MODELS,
                        help=f"default: {' '.join(JOB_MODELS)} (--quick: {JOB_MODELS[0]})")
    parser.add_argument("--profile", action="store_true", help="record the job's driver with py-spy")
    args = parser.parse_args()
    quiet_environment()
    count = args.prompts or (400 if args.quick else 2000)
    models = args.models or (JOB_MODELS[:1] if args.quick else JOB_MODELS)
    comparisons = []
    for name in models:
        comparison, summary = measure(name, count, args)
        comparisons.append(comparison)
        print(summary)
    emit(comparisons, args.json)


def measure(model_name: str, count: int, args: argparse.Namespace) -> tuple[Comparison, str]:
    """One model: both bare loops, the job, and the job on a fifth of the prompts."""
    workdir: Path = args.workdir / "job" / model_name
    workdir.mkdir(parents=True, exist_ok=True)
    small = max(1, count // 5)
    model = fixed_length_model(args.workdir, model_name, args.new_tokens)
    config_path, output = write_job(workdir, "job", model, count, args)
    small_config, small_output = write_job(workdir, "job-small", model, small, args)
    prompts = workdir / "job.parquet"

    cores = os.cpu_count() or 1
    log(f"{model_name}: bare loop: 1 process x {cores} torch threads")
    bare_threads = run_bare(model, prompts, workdir, args.new_tokens, args.batch_size, cores, 1)
    log(f"  {bare_threads['wall_s']:.1f}s; genflow run ({args.workers} Ray workers)")
    profile = workdir / "job-driver.pyspy.txt" if args.profile else None
    job = run_job(config_path, output, profile)
    log(f"  {job['wall_s']:.1f}s; bare loop: {cores} processes x 1 torch thread")
    bare_procs = run_bare(model, prompts, workdir, args.new_tokens, args.batch_size, 1, cores)
    log(f"  {bare_procs['wall_s']:.1f}s; genflow run on {small} prompts (fixed vs per-prompt costs)")
    job_small = run_job(small_config, small_output, None)
    log(f"  {job_small['wall_s']:.1f}s")

    expected = count * args.new_tokens
    for name, side in (("job", job), ("bare (threads)", bare_threads), ("bare (processes)", bare_procs),
                       ("job (small)", {"tokens": job_small["tokens"] * count // small})):
        if side["tokens"] != expected:
            raise RuntimeError(f"{name} generated {side['tokens']} tokens, expected {expected}")
    bare = min(bare_threads, bare_procs, key=lambda r: r["wall_s"])
    ratio = bare["wall_s"] / job["wall_s"]
    target, met = at_least(ratio, TARGET)
    parts = breakdown(job)
    # Two job sizes split the job's wall clock into a fixed cost and a cost per prompt;
    # the bare loop's split is its own clock (load vs generate).
    job_per_prompt = (job["wall_s"] - job_small["wall_s"]) / (count - small)
    job_fixed = job["wall_s"] - count * job_per_prompt
    bare_per_prompt = bare["generate_s"] / count
    bare_fixed = bare["wall_s"] - bare["generate_s"]
    # Prompts at which bare / job reaches the target, if the per-prompt costs allow it.
    margin = bare_per_prompt - TARGET * job_per_prompt
    break_even = (TARGET * job_fixed - bare_fixed) / margin if margin > 0 else None
    details: dict[str, Any] = {
        "model": model_name, "prompts": count, "new_tokens_per_prompt": args.new_tokens,
        "tokens_each_side": expected, "batch_size": args.batch_size, "ray_workers": args.workers,
        "job_wall_s": round(job["wall_s"], 2), "job_small_wall_s": round(job_small["wall_s"], 2),
        "job_small_prompts": small,
        "bare_threads": {k: round(v, 2) if isinstance(v, float) else v for k, v in bare_threads.items()},
        "bare_processes": {k: round(v, 2) if isinstance(v, float) else v for k, v in bare_procs.items()},
        "reference": f"{bare['processes']} process(es) x {bare['torch_threads']} thread(s)",
        "fixed_s": {"job": round(job_fixed, 2), "bare": round(bare_fixed, 2)},
        "per_prompt_ms": {"job": round(job_per_prompt * 1e3, 3), "bare": round(bare_per_prompt * 1e3, 3)},
        "marginal_ratio": round(bare_per_prompt / job_per_prompt, 3) if job_per_prompt > 0 else None,
        "marginal_ratio_is": "bare loop's generate seconds per prompt / the job's extra seconds per extra prompt "
                             f"({small} vs {count} prompts): throughput once start-up is paid",
        "prompts_for_target": round(break_even) if break_even else None,
        "job_breakdown_s": parts,
        "job_breakdown_legend": BREAKDOWN_LEGEND,
        "job_manifest_timings_s": job["manifest"]["timings_s"],
        "job_cpu_s_by_process": job["cpu_s"],
        "job_small_cpu_s_by_process": job_small["cpu_s"],
    }
    if profile is not None and profile.exists():
        details["driver_profile_top"] = summarize_profile(profile)
    comparison = Comparison(f"job vs bare batched loop, end to end ({model_name})", "tokens/s",
                            round(expected / job["wall_s"], 1), round(expected / bare["wall_s"], 1),
                            round(ratio, 3), target, met, details)
    needs = (f"about {details['prompts_for_target']:,} prompts" if break_even
             else "more than the per-prompt costs allow")
    return comparison, (f"{model_name}: fixed cost: job {job_fixed:.1f}s, bare {bare_fixed:.1f}s; per prompt: "
                        f"job {job_per_prompt * 1e3:.2f} ms, bare {bare_per_prompt * 1e3:.2f} ms; "
                        f"the target needs {needs}")

if __name__ == "__main__":
    main()

"""Requests to an OpenAI-protocol server: genflow's ``openai`` path vs a bare aiohttp loop and a sequential client.

The server is ``benchmarks/standin_server.py`` in its own process: it answers every
chat request after a fixed ``--latency`` (0.5 s) and computes nothing, so a client
at concurrency C can reach at most C / latency requests per second (the
latency-bound limit) and what it loses below that is its own cost per request on
this machine's cores. Every side sends the same requests (the same prompts,
``max_tokens``, seeds) and is timed from its first request to its last answer,
side by side in one run, at each concurrency of ``--concurrency`` (64 and 256):

- **bare**: what a careful user writes with asyncio and aiohttp: C coroutines
  over one ``ClientSession``, each posting the next request as its previous one
  is answered. The reference.
- **plugin**: genflow's ``OpenAIGenerator.generate`` under the same C coroutines:
  the plugin's own cost per request (body, routing, parsing), no engine.
- **engine** (when ``DRIVERS`` has it): the same requests through genflow's request
  path, the plugin driven as a job's generate stage drives it.
- **sequential**: one request after another with the standard library, what a
  user writes first (``--sequential`` requests; its rate is 1 / latency at best).
- **job**: a whole ``genflow run`` of ``--job-prompts`` prompts with the ``openai``
  generator at the last concurrency: wall clock and the generate stage's rate,
  against the sequential loop and the limit.

Client CPU seconds per request are printed for each side: on 2 cores the client's
cost per request, not the network, is what holds a side below the limit.

    python -m benchmarks.bench_openai [--quick] [--latency 0.5] [--concurrency 64 256] [--no-job]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    ROOT,
    Comparison,
    at_least,
    base_parser,
    emit,
    log,
    quiet_environment,
    synthetic_prompts,
    write_prompts_parquet,
)

MODEL = "standin"
MAX_TOKENS = 16
PLUGIN_TARGET = 0.90
"""genflow's request rate as a share of the bare loop's at the same concurrency (the issue's target)."""
LIMIT_TARGET = 0.90
"""genflow's rate at the highest concurrency as a share of the latency-bound limit ("close to 512 req/s")."""


@dataclass
class Measured:
    """One side's run: requests answered, wall seconds and the client process's CPU seconds."""

    side: str
    concurrency: int
    requests: int
    seconds: float
    cpu_s: float
    texts: list[str]

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def row(self, limit: float | None) -> dict[str, Any]:
        return {"side": self.side, "concurrency": self.concurrency, "requests": self.requests,
                "seconds": round(self.seconds, 3), "requests_per_s": round(self.rate, 1),
                "share_of_limit": round(self.rate / limit, 3) if limit else None,
                "client_cpu_ms_per_request": round(1e3 * self.cpu_s / self.requests, 3)}


Driver = Callable[[str, int, list[str]], Coroutine[Any, Any, list[str]]]
"""``driver(base_url, concurrency, prompts) -> texts``: send one chat request per prompt
(seed = its index, ``max_tokens`` = MAX_TOKENS) with at most ``concurrency`` in flight;
the answers' texts in prompt order."""


def chat_body(prompt: str, seed: int) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
            "seed": seed}


async def bare_aiohttp(base_url: str, concurrency: int, prompts: list[str]) -> list[str]:
    """C coroutines over one aiohttp session, each sending the next request when its last is answered."""
    import aiohttp

    texts = [""] * len(prompts)
    queue = iter(range(len(prompts)))
    url = base_url + "/chat/completions"
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def worker() -> None:
            for i in queue:
                async with session.post(url, data=json.dumps(chat_body(prompts[i], i)).encode(),
                                        headers=headers) as response:
                    answer = json.loads(await response.read())
                texts[i] = answer["choices"][0]["message"]["content"]

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return texts


async def plugin_direct(base_url: str, concurrency: int, prompts: list[str]) -> list[str]:
    """The ``openai`` plugin's ``generate`` under the same C coroutines: its cost per request, no engine."""
    from genflow.api import Generation
    from genflow.plugins.served.openai_api import OpenAIGenerator, OpenAIParams

    plugin = OpenAIGenerator(MODEL, OpenAIParams(base_url=base_url, max_tokens=MAX_TOKENS))
    requests = generation_requests(prompts)
    texts = [""] * len(prompts)
    queue = iter(range(len(prompts)))

    async def worker() -> None:
        for i in queue:
            result = await plugin.generate(requests[i])
            if not isinstance(result, Generation) or result.text is None:
                raise RuntimeError(f"request {i} failed: {result}")
            texts[i] = result.text

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await plugin.aclose()
    return texts


def generation_requests(prompts: list[str]) -> list[Any]:
    from genflow.api import GenerationRequest

    return [GenerationRequest(generation_id=f"g{i}", prompt_id=f"p{i}", prompt=p, sample=0, seed=i)
            for i, p in enumerate(prompts)]


async def engine_path(base_url: str, concurrency: int, prompts: list[str]) -> list[str]:
    """genflow's request path (``genflow.engine.requesting.RequestRunner``: the adaptive limit, timeouts,
    retries, answers as they arrive) driving the plugin, as a generate stage's request worker does."""
    from genflow.api import Generation
    from genflow.config import RequestsSpec
    from genflow.engine.requesting import RequestRunner
    from genflow.plugins.served.openai_api import OpenAIGenerator, OpenAIParams

    plugin = OpenAIGenerator(MODEL, OpenAIParams(base_url=base_url, max_tokens=MAX_TOKENS))
    runner = RequestRunner(plugin.generate, RequestsSpec(concurrency=concurrency))
    texts = [""] * len(prompts)
    try:
        async for batch in runner.run(generation_requests(prompts)):
            for answer in batch:
                if not isinstance(answer.result, Generation) or answer.result.text is None:
                    raise RuntimeError(f"request {answer.index} failed: {answer.result}")
                texts[answer.index] = answer.result.text
    finally:
        await plugin.aclose()
    return texts


DRIVERS: dict[str, Driver] = {"bare": bare_aiohttp, "plugin": plugin_direct, "engine": engine_path}
"""The sides measured at each concurrency; ``bare`` is the reference of the others. A side
named ``engine`` (genflow's request path driving the plugin) is compared with the same target."""


def sequential_loop(base_url: str, prompts: list[str]) -> list[str]:
    """One request after another with the standard library: what a user writes first."""
    texts = []
    for i, prompt in enumerate(prompts):
        request = urllib.request.Request(base_url + "/chat/completions", data=json.dumps(chat_body(prompt, i)).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            texts.append(json.loads(response.read())["choices"][0]["message"]["content"])
    return texts


def measure(side: str, concurrency: int, prompts: list[str], send: Callable[[], list[str]]) -> Measured:
    cpu, started = time.process_time(), time.perf_counter()
    texts = send()
    seconds, cpu_s = time.perf_counter() - started, time.process_time() - cpu
    if len(texts) != len(prompts) or not all(texts):
        raise RuntimeError(f"{side} at concurrency {concurrency} answered {sum(map(bool, texts))}/{len(prompts)}")
    return Measured(side, concurrency, len(prompts), seconds, cpu_s, texts)


# -- the stand-in server, in its own process ----------------------------------------------

class StandinProcess:
    """``python -m benchmarks.standin_server`` on a free port of 127.0.0.1, stopped on exit."""

    def __init__(self, latency: float) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.process = subprocess.Popen([sys.executable, "-m", "benchmarks.standin_server", "--port", str(self.port),
                                         "--latency", str(latency)], cwd=ROOT)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1):
                    return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("the stand-in server did not start") from None
                time.sleep(0.1)

    def cpu_s(self) -> float:
        import psutil

        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


# -- a whole genflow run ------------------------------------------------------------------

def openai_job_config(base_url: str, prompts: Path, output: Path, concurrency: int) -> dict[str, Any]:
    return {
        "name": "bench-openai",
        "input": str(prompts),
        "output": str(output),
        "generators": [{"label": "api", "plugin": "openai", "model": MODEL, "samples": 1,
                        "params": {"base_url": base_url, "max_tokens": MAX_TOKENS},
                        "requests": {"concurrency": concurrency}}],
        "scorers": [],
        "ray": {"workers": 1},
    }


def run_genflow_job(base_url: str, prompts: list[str], workdir: Path, concurrency: int) -> dict[str, Any]:
    """``genflow run`` of one ``openai`` generator over ``prompts`` in a fresh process, from scratch.

    Returns the wall clock, the generate stage's seconds and, of those, the wait for its
    worker to start (manifest ``timings_s``), and the rows written."""
    import pyarrow.dataset as ds
    import yaml

    from benchmarks.bench_job import environment

    path = write_prompts_parquet(workdir / "job-prompts.parquet", prompts)
    output = workdir / "out-job"
    shutil.rmtree(output, ignore_errors=True)
    config = workdir / "job.yaml"
    config.write_text(yaml.safe_dump(openai_job_config(base_url, path, output, concurrency)))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "genflow.cli", "run", str(config), "--no-resume"], cwd=ROOT,
                          env=environment(), capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"genflow run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    manifest = json.loads((output / "manifest.json").read_text())
    stage = next(k for k in manifest["stages"] if k.startswith("generate/"))
    rows = ds.dataset(output / "generations").count_rows()
    timings = manifest.get("timings_s", {})
    return {"wall_s": wall, "generate_s": manifest["stages"][stage]["seconds"],
            "worker_start_s": timings.get(f"start/{stage}", 0.0), "rows": rows, "timings_s": timings}


# -- the run ------------------------------------------------------------------------------

def main() -> None:
    parser: argparse.ArgumentParser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--latency", type=float, default=0.5, help="the stand-in's seconds per answer")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--rounds", type=int, help="requests per side = rounds x concurrency (default 16, "
                        "--quick 4)")
    parser.add_argument("--sequential", type=int, help="requests of the sequential loop (default 20, --quick 6)")
    parser.add_argument("--job-prompts", type=int, help="prompts of the genflow run (default 4096, --quick 1024)")
    parser.add_argument("--no-job", action="store_true", help="leave out the whole genflow run")
    args = parser.parse_args()
    quiet_environment()
    rounds = args.rounds or (4 if args.quick else 16)
    workdir: Path = args.workdir / "openai"
    workdir.mkdir(parents=True, exist_ok=True)

    server = StandinProcess(args.latency)
    try:
        comparisons, rows = run_all(server, args, rounds, workdir)
    finally:
        server.stop()
    for row in rows:
        print("  " + "  ".join(f"{k}={v}" for k, v in row.items()), file=sys.stderr)
    emit(comparisons, args.json)


def run_all(server: StandinProcess, args: argparse.Namespace, rounds: int,
            workdir: Path) -> tuple[list[Comparison], list[dict[str, Any]]]:
    comparisons: list[Comparison] = []
    rows: list[dict[str, Any]] = []
    prompts_all = synthetic_prompts(max(args.concurrency) * rounds, seed=2)
    asyncio.run(bare_aiohttp(server.url, 8, prompts_all[:16]))  # warm up the server's process
    by_concurrency: dict[int, dict[str, Measured]] = {}
    for concurrency in args.concurrency:
        prompts = prompts_all[:concurrency * rounds]
        limit = concurrency / args.latency
        sides: dict[str, Measured] = {}
        for side, driver in DRIVERS.items():
            log(f"{side} at concurrency {concurrency}: {len(prompts)} requests")
            server_cpu = server.cpu_s()
            sides[side] = measure(side, concurrency, prompts,
                                  functools.partial(asyncio.run, driver(server.url, concurrency, prompts)))
            rows.append({**sides[side].row(limit), "server_cpu_ms_per_request":
                         round(1e3 * (server.cpu_s() - server_cpu) / len(prompts), 3)})
            log(f"  {sides[side].rate:,.1f} req/s ({sides[side].rate / limit:.1%} of {limit:,.0f})")
        expected = sides["bare"].texts
        for side, got in sides.items():
            if got.texts != expected:
                raise RuntimeError(f"{side} answered other texts than the bare loop")
        by_concurrency[concurrency] = sides
        for side in (s for s in sides if s != "bare"):
            ratio = sides[side].rate / sides["bare"].rate
            target, met = at_least(ratio, PLUGIN_TARGET)
            comparisons.append(Comparison(
                f"openai {side} vs bare aiohttp loop, concurrency {concurrency}, {args.latency:g} s latency",
                "requests/s", round(sides[side].rate, 1), round(sides["bare"].rate, 1), round(ratio, 3), target, met,
                {"latency_bound_limit": limit, "rows": [m.row(limit) for m in sides.values()]}))

    top = max(args.concurrency)
    limit = top / args.latency
    best = by_concurrency[top]["engine" if "engine" in by_concurrency[top] else "plugin"]
    target, met = at_least(best.rate / limit, LIMIT_TARGET)
    comparisons.append(Comparison(
        f"openai {best.side} at concurrency {top} vs the latency-bound limit {top}/{args.latency:g} s", "requests/s",
        round(best.rate, 1), limit, round(best.rate / limit, 3), target, met,
        {"bare_share_of_limit": round(by_concurrency[top]["bare"].rate / limit, 3)}))

    count = args.sequential or (6 if args.quick else 20)
    log(f"sequential loop: {count} requests")
    seq_prompts = prompts_all[:count]
    sequential = measure("sequential", 1, seq_prompts, lambda: sequential_loop(server.url, seq_prompts))
    rows.append(sequential.row(1 / args.latency))
    log(f"  {sequential.rate:,.2f} req/s")
    if not args.no_job:
        job_prompts = synthetic_prompts(args.job_prompts or (1024 if args.quick else 4096), seed=3)
        log(f"genflow run: {len(job_prompts)} prompts at concurrency {top}")
        job = run_genflow_job(server.url, job_prompts, workdir, top)
        sending_s = job["generate_s"] - job["worker_start_s"]
        log(f"  {job['wall_s']:.1f}s wall; generate stage {job['generate_s']:.1f}s, of which "
            f"{job['worker_start_s']:.1f}s waiting for its worker to start")
        if job["rows"] != len(job_prompts):
            raise RuntimeError(f"genflow run wrote {job['rows']} generations for {len(job_prompts)} prompts")
        job_rate = len(job_prompts) / job["wall_s"]
        stage_rate = len(job_prompts) / sending_s
        rows.append({"side": "genflow run", "concurrency": top, "requests": len(job_prompts),
                     "seconds": round(job["wall_s"], 3), "requests_per_s": round(job_rate, 1),
                     "generate_stage_requests_per_s": round(stage_rate, 1),
                     "share_of_limit": round(stage_rate / limit, 3)})
        ratio = job_rate / sequential.rate
        target, met = at_least(ratio, 1.0)
        comparisons.append(Comparison(
            f"genflow run ({len(job_prompts)} prompts, concurrency {top}) vs a sequential client loop",
            "requests/s", round(job_rate, 1), round(sequential.rate, 2), round(ratio, 1), target, met,
            {"job": job, "generate_stage_requests_per_s": round(stage_rate, 1),
             "generate_stage_requests_per_s_is": "prompts / (generate stage seconds - its worker's start)",
             "latency_bound_limit": limit,
             "sequential_limit": 1 / args.latency}))
    return comparisons, rows


if __name__ == "__main__":
    main()

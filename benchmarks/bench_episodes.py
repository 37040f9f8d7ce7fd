"""Agent episodes: genflow's episode path vs a bare asyncio agent loop, turns per second.

A stand-in agent server (in its own process, started by this module with ``--serve``)
answers every chat request after ``--latency`` seconds (0.5) from a script, computing
nothing: while the conversation holds fewer than ``--tool-turns`` (2) tool results it
calls ``run_python`` with a program that spins ``--tool-ms`` (50) ms of CPU, then it
answers in text. So each episode is 3 turns, 2 of them followed by a real sandboxed
program (``run_python``: a fresh, isolated interpreter per call). Every side runs the
same episodes (``--episodes``, 512) at the same concurrency (``--concurrency``, 128):

- **bare**: what a careful user writes with asyncio and aiohttp: C coroutines over one
  ``ClientSession``, each running one episode after another: post the conversation
  with the tools' schemas, run each tool call's ``run_python`` (the same tool object
  genflow loads) on a thread pool as large as genflow's toolbox (the cores this
  process may use), append the result, post again. The reference.
- **engine**: genflow's request path in this process, as a job's request worker runs it
  (``RequestRunner`` with its ``EpisodeLoop``, the ``openai`` plugin's ``chat``, the
  ``Toolbox``): no Ray, no journal.
- **job**: a whole ``genflow run`` of the same episodes (an ``openai`` generator with
  ``max_turns`` and ``tools: [run_python]``, ``requests.concurrency`` = C): what users get.

Turns per second are counted on the server: its requests over the time from the first
one received to the last one answered, so a job's start-up (Prefect, Ray) is left out
(its wall clock is printed beside). With these sizes the tools, not the latency, bound
both sides on 2 cores (C / latency x 3/2 would need ~170 tool runs a second): the ratio
says whether genflow keeps the cores as busy with tools as the bare loop does, and what
its own CPU per turn takes from them. Each program reports the CPU time it used and the
core it ran on last (``/proc/self/stat``), so the tools' CPU is summed by core; the
machine's busy time by core (``/proc/stat``, every process on it) is printed too.

    python -m benchmarks.bench_episodes [--quick] [--episodes 512] [--concurrency 128] [--only bare job]
    python -m benchmarks.bench_episodes --profile engine      # py-spy of the engine side, to a flame graph
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, Comparison, at_least, base_parser, emit, log, quiet_environment

MODEL = "standin-agent"
TARGET = 0.90
"""genflow's turns per second as a share of the bare loop's (the issue's target)."""
SPREAD_TARGET = 0.4
"""The least used core's share of the tools' CPU (0.5 on 2 cores is an even spread)."""
MAX_TURNS = 4
"""Above the script's 3 turns: every episode ends by answering in text (``stop``)."""

BUSY = """import time
start = time.process_time()
spins = 0
while time.process_time() - start < {seconds}:
    spins += 1
with open("/proc/self/stat") as f:
    core = f.read().rsplit(")", 1)[1].split()[36]
print(f"core {{core}} cpu {{time.process_time():.4f}}")
"""
"""The program each tool call runs: ``seconds`` of CPU, then the core it ran on last and the
CPU seconds it used in all (its interpreter's start included)."""

REPORT = re.compile(r"core (\d+) cpu ([0-9.]+)")


# -- the stand-in agent server (its own process) --------------------------------------------

def serve(port: int, latency: float, tool_turns: int, tool_ms: float) -> None:
    """Answer chat requests on 127.0.0.1:``port`` as the module's docstring says, until killed.

    ``GET /stats``: requests received and answered, the most in flight at once, and the
    monotonic seconds of the first request and the last answer; ``POST /reset`` zeroes them."""
    from aiohttp import web

    code = BUSY.format(seconds=tool_ms / 1000)
    stats: dict[str, Any] = {}

    def reset() -> None:
        stats.update(received=0, answered=0, in_flight=0, max_in_flight=0, first=None, last=None, without_tools=0)

    async def complete(request: web.Request) -> web.Response:
        now = time.monotonic()
        stats["received"] += 1
        stats["first"] = stats["first"] or now
        stats["in_flight"] += 1
        stats["max_in_flight"] = max(stats["max_in_flight"], stats["in_flight"])
        try:
            body = json.loads(await request.read())
            if not body.get("tools"):
                stats["without_tools"] += 1
            messages = body["messages"]
            ran = sum(1 for m in messages if m.get("role") == "tool")
            if ran < tool_turns:
                message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [
                    {"id": f"call_{ran}", "type": "function",
                     "function": {"name": "run_python", "arguments": json.dumps({"code": code})}}]}
                finish = "tool_calls"
            else:
                message, finish = {"role": "assistant", "content": f"done after {ran} runs"}, "stop"
            await asyncio.sleep(latency)
            return web.json_response({
                "id": "agent", "object": "chat.completion", "created": int(time.time()), "model": body.get("model"),
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": {"prompt_tokens": sum(len(str(m.get("content") or "").split()) for m in messages),
                          "completion_tokens": 4}})
        finally:
            stats["in_flight"] -= 1
            stats["answered"] += 1
            stats["last"] = time.monotonic()

    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response(stats)

    async def post_reset(request: web.Request) -> web.Response:
        reset()
        return web.json_response(stats)

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    reset()
    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_post("/v1/chat/completions", complete)
    app.router.add_get("/stats", get_stats)
    app.router.add_post("/reset", post_reset)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, backlog=1024)


class AgentProcess:
    """The stand-in agent server on a free port of 127.0.0.1, in its own process."""

    def __init__(self, latency: float, tool_turns: int, tool_ms: float) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.origin = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.origin}/v1"
        self.process = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_episodes", "--serve", str(self.port),
                                         "--latency", str(latency), "--tool-turns", str(tool_turns),
                                         "--tool-ms", str(tool_ms)], cwd=ROOT)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.origin}/health", timeout=1):
                    return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("the stand-in agent server did not start") from None
                time.sleep(0.1)

    def _call(self, path: str, method: str = "GET") -> dict[str, Any]:
        request = urllib.request.Request(self.origin + path, method=method, data=b"" if method == "POST" else None)
        with urllib.request.urlopen(request, timeout=10) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer

    def reset(self) -> None:
        self._call("/reset", "POST")

    def stats(self) -> dict[str, Any]:
        return self._call("/stats")

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


# -- CPU by core -------------------------------------------------------------------------

def cores_busy() -> dict[int, float]:
    """Each core's busy seconds since boot, as ``/proc/stat`` counts them (every process)."""
    tick = os.sysconf("SC_CLK_TCK")
    busy = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu":
                v = [int(x) for x in values]
                busy[int(name[3:])] = (sum(v[:8]) - v[3] - v[4]) / tick  # all but idle and iowait
    return busy


def tool_cpu_by_core(outputs: list[str]) -> dict[int, float]:
    """The programs' CPU seconds summed by the core each ran on last, from their reports."""
    by_core: dict[int, float] = {}
    for text in outputs:
        found = REPORT.search(text)
        if found is None:
            raise RuntimeError(f"a tool call did not report its CPU: {text[:300]!r}")
        core = int(found.group(1))
        by_core[core] = by_core.get(core, 0.0) + float(found.group(2))
    return dict(sorted(by_core.items()))


@dataclass
class Side:
    """One side's run, as the server and the machine saw it."""

    side: str
    episodes: int
    turns: int
    seconds: float
    """From the server's first request to its last answer."""
    max_in_flight: int
    wall_s: float
    client_cpu_s: float
    server_cpu_s: float
    machine_busy_s: dict[int, float]
    tool_cpu_s: dict[int, float]
    tool_calls: int
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.turns / self.seconds

    def row(self, latency: float) -> dict[str, Any]:
        return {"side": self.side, "episodes": self.episodes, "turns": self.turns,
                "seconds": round(self.seconds, 2), "turns_per_s": round(self.rate, 2),
                "server_max_in_flight": self.max_in_flight,
                "server_mean_in_flight": round(self.turns * latency / self.seconds, 1),
                "wall_s": round(self.wall_s, 1), "tool_calls": self.tool_calls,
                "tool_cpu_s_by_core": {k: round(v, 2) for k, v in self.tool_cpu_s.items()},
                "machine_busy_s_by_core": {k: round(v, 1) for k, v in self.machine_busy_s.items()},
                "client_cpu_ms_per_turn": round(1e3 * self.client_cpu_s / self.turns, 2),
                "server_cpu_ms_per_turn": round(1e3 * self.server_cpu_s / self.turns, 2), **self.details}


def prompts(count: int) -> list[str]:
    return [f"Task {i}: write a program that computes the answer and run it." for i in range(count)]


# -- the bare loop ---------------------------------------------------------------------------

def load_run_python() -> Any:
    """The ``run_python`` tool as genflow loads it (the same object type, params and sandbox)."""
    from genflow.engine.tools import load_tools
    from genflow.registry import get_registry

    return load_tools(["run_python"], get_registry())


async def bare_loop(url: str, texts: list[str], concurrency: int, max_turns: int) -> tuple[list[str], int]:
    """C coroutines, each running one episode after another; tools on a pool of the toolbox's size.

    Returns the tool calls' outputs and the episodes that ended with a text answer."""
    import aiohttp

    from genflow.api import ToolContext

    toolbox = load_run_python()
    tool, schemas = toolbox.tools["run_python"], toolbox.schemas()
    pool = ThreadPoolExecutor(toolbox.workers, thread_name_prefix="bare-tool")
    loop = asyncio.get_running_loop()
    outputs: list[str] = []
    ended = 0
    queue = iter(range(len(texts)))
    headers = {"Content-Type": "application/json"}

    def run_tool(call: dict[str, Any], context: Any) -> str:
        arguments = tool.Arguments.model_validate(json.loads(call["function"]["arguments"]))
        result: str = tool.run(arguments, context).content
        return result

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def worker() -> None:
            nonlocal ended
            for i in queue:
                messages: list[dict[str, Any]] = [{"role": "user", "content": texts[i]}]
                context = ToolContext(f"p{i}", f"g{i}")
                for turn in range(1, max_turns + 1):
                    body = {"model": MODEL, "messages": messages, "tools": schemas, "seed": i * 100 + turn}
                    async with session.post(url + "/chat/completions", data=json.dumps(body).encode(),
                                            headers=headers) as response:
                        message = json.loads(await response.read())["choices"][0]["message"]
                    messages.append(message)
                    calls = message.get("tool_calls") or []
                    if not calls:
                        ended += 1
                        break
                    for call in calls:
                        content = await loop.run_in_executor(pool, run_tool, call, context)
                        outputs.append(content)
                        messages.append({"role": "tool", "tool_call_id": call["id"], "content": content})

        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        finally:
            pool.shutdown()
    return outputs, ended


# -- genflow's episode path in this process ------------------------------------------------

async def engine_path(url: str, texts: list[str], concurrency: int, max_turns: int) -> tuple[list[str], int]:
    """genflow's request path driving the episodes as a job's request worker does (no Ray, no journal)."""
    from genflow.api import Generation
    from genflow.config import RequestsSpec
    from genflow.data.turns import EpisodeRequest
    from genflow.engine.episodes import EpisodeLoop, EpisodeSettings
    from genflow.engine.requesting import RequestRunner
    from genflow.plugins.served.openai_api import OpenAIGenerator, OpenAIParams

    plugin = OpenAIGenerator(MODEL, OpenAIParams(base_url=url))
    runner = RequestRunner(plugin.generate, RequestsSpec(concurrency=concurrency))
    toolbox = load_run_python()
    runner.episodes = EpisodeLoop(plugin, toolbox, EpisodeSettings(max_turns))
    items = [EpisodeRequest(f"g{i}", f"p{i}", text, 0, i) for i, text in enumerate(texts)]
    outputs: list[str] = []
    ended = 0
    try:
        async for batch in runner.run(items):
            for answer in batch:
                if answer.partial:
                    outputs.extend(m["content"] for m in answer.result.results)
                elif not isinstance(answer.result, Generation):
                    raise RuntimeError(f"episode {answer.index} failed: {answer.result}")
                elif answer.result.finish_reason == "stop":
                    ended += 1
    finally:
        toolbox.close()
        await plugin.aclose()
    return outputs, ended


def measure(side: str, server: AgentProcess, run: Any, count: int, latency: float) -> Side:
    """Run one side against a reset server; what the server, the machine and the tools saw."""
    server.reset()
    busy, server_cpu = cores_busy(), server.cpu_s()
    cpu, started = time.process_time(), time.perf_counter()
    outputs, ended, details = run()
    wall, client_cpu = time.perf_counter() - started, time.process_time() - cpu
    after = cores_busy()
    stats = server.stats()
    if ended != count:
        raise RuntimeError(f"{side}: {ended} of {count} episodes ended with a text answer")
    return Side(side, count, stats["received"], stats["last"] - stats["first"], stats["max_in_flight"], wall,
                client_cpu, server.cpu_s() - server_cpu, {k: after[k] - busy.get(k, 0.0) for k in after},
                tool_cpu_by_core(outputs), len(outputs), details)


# -- a whole genflow run -----------------------------------------------------------------------

def job_config(url: str, prompts_path: Path, output: Path, concurrency: int, max_turns: int) -> dict[str, Any]:
    return {
        "name": "bench-episodes", "input": str(prompts_path), "output": str(output),
        "generators": [{"label": "agent", "plugin": "openai", "model": MODEL, "samples": 1,
                        "params": {"base_url": url}, "max_turns": max_turns, "tools": ["run_python"],
                        "requests": {"concurrency": concurrency, "timeout_s": 600}}],
        "scorers": [], "ray": {"workers": 1},
    }


def process_kind(process: Any) -> str | None:
    """Which part of a job a process is (None: a sandboxed program, the tools' CPU)."""
    command = " ".join(process.cmdline())
    if "bwrap" in command or "setpriv" in command or " -I -S -B " in command or "unshare" in command:
        return None
    if "genflow.cli" in command:
        return "driver"
    if "prefect" in command or "uvicorn" in command:
        return "prefect"
    if command.startswith("ray::RequestWorker"):
        return "request worker"
    if command.startswith("ray::"):
        return "ray workers"
    return "ray daemons"


class JobCpu:
    """The CPU seconds of a job's processes (the ``genflow run`` and every process under it, the
    sandboxed programs left out) from the server's first request to its ``turns``-th answer,
    sampled every ``every`` seconds from a thread."""

    def __init__(self, pid: int, server: AgentProcess, turns: int, every: float = 0.5) -> None:
        import threading

        self.pid, self.server, self.turns, self.every = pid, server, turns, every
        self.latest: dict[int, tuple[str, float]] = {}
        self.start: dict[str, float] | None = None
        self.end: dict[str, float] | None = None
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _totals(self) -> dict[str, float]:
        import psutil

        try:
            root = psutil.Process(self.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            processes = []
        for process in processes:
            try:
                kind = process_kind(process)
                if kind is not None:
                    times = process.cpu_times()
                    self.latest[process.pid] = (kind, times.user + times.system)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        totals: dict[str, float] = {}
        for kind, seconds in self.latest.values():
            totals[kind] = totals.get(kind, 0.0) + seconds
        return totals

    def _poll(self) -> None:
        while self.end is None:
            totals = self._totals()
            try:
                stats = self.server.stats()
            except OSError:
                return
            if self.start is None and stats["received"]:
                self.start = totals
            if self.start is not None and stats["answered"] >= self.turns:
                self.end = totals
                return
            time.sleep(self.every)

    def during_turns(self) -> dict[str, float]:
        self._thread.join(timeout=5)
        if self.start is None or self.end is None:
            return {}
        return {kind: round(self.end[kind] - self.start.get(kind, 0.0), 2) for kind in self.end}


def run_job(server: AgentProcess, texts: list[str], workdir: Path, concurrency: int, max_turns: int,
            turns: int) -> tuple[list[str], int, dict[str, Any]]:
    """``genflow run`` of the episodes from scratch, in a fresh process: the tools' outputs
    (from the rows' ``messages``), the episodes that ended in a text answer, the timings and
    the job's own CPU while the ``turns`` turns were sent (:class:`JobCpu`)."""
    import pyarrow.dataset as ds
    import yaml

    from benchmarks.bench_job import environment
    from benchmarks.common import write_prompts_parquet

    path = write_prompts_parquet(workdir / "prompts.parquet", texts)
    output = workdir / "out-job"
    shutil.rmtree(output, ignore_errors=True)
    config = workdir / "job.yaml"
    config.write_text(yaml.safe_dump(job_config(server.url, path, output, concurrency, max_turns)))
    log_path = workdir / "job.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "genflow.cli", "run", str(config), "--no-resume"], cwd=ROOT,
                                env=environment(), stdout=log_file, stderr=subprocess.STDOUT)
        cpu = JobCpu(proc.pid, server, turns)
        returncode = proc.wait()
    if returncode:
        raise RuntimeError(f"genflow run failed ({returncode}):\n{log_path.read_text()[-3000:]}")
    rows = ds.dataset(output / "generations").to_table(columns=["messages", "finish_reason"]).to_pylist()
    outputs = [m["content"] for r in rows for m in json.loads(r["messages"]) if m["role"] == "tool"]
    ended = sum(r["finish_reason"] == "stop" for r in rows)
    manifest = json.loads((output / "manifest.json").read_text())
    stage = manifest["stages"]["generate/agent"]
    job_cpu = cpu.during_turns()
    return outputs, ended, {"generate_stage_s": round(stage["seconds"], 1),
                            "worker_start_s": round(manifest.get("timings_s", {}).get("start/generate/agent", 0.0), 1),
                            "job_cpu_s_during_turns": job_cpu,
                            "job_cpu_ms_per_turn": round(1e3 * sum(job_cpu.values()) / turns, 2) if job_cpu else None}


# -- the run ----------------------------------------------------------------------------------

SIDES = ("bare", "engine", "job")


def main() -> None:
    parser: argparse.ArgumentParser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--latency", type=float, default=0.5, help="the server's seconds per turn")
    parser.add_argument("--tool-turns", type=int, default=2, help="turns that call run_python before the answer")
    parser.add_argument("--tool-ms", type=float, default=50.0, help="CPU milliseconds each program spins")
    parser.add_argument("--concurrency", type=int, default=128, help="episodes in flight (the bare loop's "
                        "coroutines; genflow's requests.concurrency)")
    parser.add_argument("--episodes", type=int, help="episodes per side and round (default 256, --quick 192)")
    parser.add_argument("--rounds", type=int, help="rounds of every side, in turn; each side's best counts "
                        "(default 3, --quick 1)")
    parser.add_argument("--only", nargs="+", choices=SIDES, default=list(SIDES),
                        help="the sides to run (bare is the reference of the others)")
    parser.add_argument("--profile", choices=["engine"], help="record the engine side with py-spy "
                        "(outputs/benchmarks/episodes/engine.svg) instead of comparing")
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve, args.latency, args.tool_turns, args.tool_ms)
        return
    quiet_environment()
    count = args.episodes or (192 if args.quick else 256)
    args.rounds = args.rounds or (1 if args.quick else 3)
    workdir: Path = args.workdir / "episodes"
    workdir.mkdir(parents=True, exist_ok=True)
    texts = prompts(count)
    if args.profile:
        profile(args, texts, workdir)
        return

    server = AgentProcess(args.latency, args.tool_turns, args.tool_ms)
    try:
        rounds = run_sides(server, args, texts, workdir)
    finally:
        server.stop()
    for measured in rounds.values():
        for side in measured:
            print("  " + "  ".join(f"{k}={v}" for k, v in side.row(args.latency).items()), file=sys.stderr)
    # Other tenants only ever take time: each side's best round is the one least disturbed.
    sides = {name: max(measured, key=lambda s: s.rate) for name, measured in rounds.items()}
    comparisons = []
    bare = sides.get("bare")
    for name, side in sides.items():
        if name == "bare" or bare is None:
            continue
        ratio = side.rate / bare.rate
        target, met = at_least(ratio, TARGET)
        what = "genflow run" if name == "job" else "genflow's request path in-process"
        comparisons.append(Comparison(
            f"episodes: {what} vs a bare asyncio agent loop, {args.concurrency} in flight, {args.latency:g} s "
            f"latency, {args.tool_turns} x run_python of {args.tool_ms:g} ms CPU", "turns/s",
            round(side.rate, 2), round(bare.rate, 2), round(ratio, 3), target, met,
            {"rounds_turns_per_s": {n: [round(s.rate, 2) for s in m] for n, m in rounds.items()},
             "best": [s.row(args.latency) for s in sides.values()]}))
    for name, side in sides.items():
        spread = side.tool_cpu_s
        total = sum(spread.values())
        print(f"{name} (best of {len(rounds[name])}): {side.rate:.1f} turns/s; tools' CPU by core "
              + ", ".join(f"core {k} {v:.1f} s ({v / total:.0%})" for k, v in spread.items())
              + "; machine busy by core (every process) "
              + ", ".join(f"core {k} {v:.1f} s" for k, v in side.machine_busy_s.items())
              + f" over {side.wall_s:.1f} s", flush=True)
    if "job" in sides or "engine" in sides:  # the tools' CPU over the cores, genflow's side
        side = sides.get("job") or sides["engine"]
        share = min(side.tool_cpu_s.values()) / sum(side.tool_cpu_s.values()) if len(side.tool_cpu_s) > 1 else 0.0
        target, met = at_least(share, SPREAD_TARGET)
        comparisons.append(Comparison(
            f"episodes: the tools' CPU on the least used of {os.cpu_count()} cores ({side.side})", "share",
            round(share, 3), None, round(share, 3), target, met,
            {"tool_cpu_s_by_core": side.tool_cpu_s}, ratio_is="share of the tools' CPU"))
    emit(comparisons, args.json)


def run_sides(server: AgentProcess, args: argparse.Namespace, texts: list[str],
              workdir: Path) -> dict[str, list[Side]]:
    """Each side once a round, in turn (the order reversed every other round): a load that other
    tenants of the machine add for a while falls on every side."""
    rounds: dict[str, list[Side]] = {name: [] for name in args.only}
    asyncio.run(bare_loop(server.url, texts[:4], 4, MAX_TURNS))  # warm the server and the sandbox's probe
    for number in range(args.rounds):
        for name in args.only if number % 2 == 0 else reversed(args.only):
            log(f"round {number + 1}: {name}, {len(texts)} episodes, {args.concurrency} in flight")
            if name == "bare":
                def run() -> tuple[list[str], int, dict[str, Any]]:
                    return (*asyncio.run(bare_loop(server.url, texts, args.concurrency, MAX_TURNS)), {})
            elif name == "engine":
                def run() -> tuple[list[str], int, dict[str, Any]]:
                    return (*asyncio.run(engine_path(server.url, texts, args.concurrency, MAX_TURNS)), {})
            else:
                def run() -> tuple[list[str], int, dict[str, Any]]:
                    return run_job(server, texts, workdir, args.concurrency, MAX_TURNS,
                                   len(texts) * (args.tool_turns + 1))
            side = measure(name, server, run, len(texts), args.latency)
            rounds[name].append(side)
            log(f"  {side.rate:.1f} turns/s ({side.turns} turns in {side.seconds:.1f} s; load average "
                f"{os.getloadavg()[0]:.1f})")
    return rounds


def profile(args: argparse.Namespace, texts: list[str], workdir: Path) -> None:
    """The engine side under py-spy (its threads and the sandbox's subprocesses)."""
    server = AgentProcess(args.latency, args.tool_turns, args.tool_ms)
    try:
        out = workdir / "engine.svg"
        script = (f"import asyncio; from benchmarks.bench_episodes import engine_path, prompts; "
                  f"asyncio.run(engine_path({server.url!r}, prompts({len(texts)}), {args.concurrency}, {MAX_TURNS}))")
        spy = str(Path(sys.executable).with_name("py-spy"))
        subprocess.run([spy, "record", "--subprocesses", "--idle", "-o", str(out), "--", sys.executable, "-c", script],
                       cwd=ROOT, check=True)
        log(f"profile: {out}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()

"""Memory and Prefect task runs as the input grows: 10k vs 100k prompts, same job.

The job is model-free so that only genflow's own costs show: the ``echo``
generator (the prompt reversed) and the ``length`` scorer from
``tests/support/plugins_for_tests.py``, installed as an entry point the way a third-party
plugin is, one sample per prompt, ranking and export on, the default
``shard_rows`` and ``ray.batch_size`` 64 (a trivial plugin answers a batch in
microseconds; the default 16 would only measure Ray's per-call overhead).

The input is one Parquet file in row groups of 65,536 rows. genflow streams at
row-group granularity (as any Parquet reader does): a file written as a single
row group of a million rows costs that row group's column chunks in memory while
it is read, ~150 MiB more at 1M prompts, whatever genflow does.

Each job runs in a fresh process (``genflow.flows.run.run_job``, what ``genflow run``
calls) against a real Prefect server the benchmark starts, so its task runs can
be counted from the Prefect API afterwards. Reported:

- the driver's peak RSS (its own ``ru_maxrss``) at 10k and 100k prompts and the
  ratio, target <= 1.2: the driver streams shards, it never holds the input;
- the peak of driver + every process it started (Ray's daemons and workers),
  sampled every 0.2 s, and its ratio;
- Prefect task runs per 10k prompts, target <= 100 (one per stage and shard).

    python -m benchmarks.bench_scale [--quick] [--sizes 10000 100000]
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.common import QUIET_ENV, ROOT, Comparison, at_most, base_parser, emit, log, quiet_environment

RSS_TARGET = 1.2
ROW_GROUP_ROWS = 65_536
TASK_RUN_TARGET = 100


def _job_config(prompts: Path, output: Path, name: str) -> dict[str, Any]:
    return {"name": name, "input": str(prompts), "output": str(output),
            "generators": [{"label": "echo", "plugin": "echo", "samples": 1}],
            "scorers": [{"plugin": "length"}],
            "ray": {"workers": 2, "batch_size": 64}}


def write_prompts(path: Path, count: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        words = ["river", "engine", "lantern", "violin", "orchard", "harbour", "comet", "meadow"]
        prompts = [f"Describe the {words[i % 8]} number {i} in {3 + i % 17} words." for i in range(count)]
        pq.write_table(pa.table({"id": [f"s{i:07d}" for i in range(count)], "prompt": prompts}), path,
                       row_group_size=ROW_GROUP_ROWS)
    return path


# -- the child: one job in a fresh process -------------------------------------

def child(config_path: Path, result_path: Path) -> None:
    from genflow.config import load_config
    from genflow.flows.run import run_job

    started = time.perf_counter()
    manifest = run_job(load_config(config_path))
    result_path.write_text(json.dumps({
        "driver_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "wall_s": time.perf_counter() - started, "shard_rows": manifest["config"]["shard_rows"],
        "rows": manifest["rows"], "timings_s": manifest["timings_s"], "status": manifest["status"]}))


class FamilyRss:
    """Peak RSS of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        self.pid, self.every, self.peak_mib = pid, every, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        root = psutil.Process(self.pid)
        while not self._stop.is_set():
            total = 0
            try:
                for proc in [root, *root.children(recursive=True)]:
                    try:
                        total += proc.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
            except psutil.NoSuchProcess:
                return
            self.peak_mib = max(self.peak_mib, total / 2**20)
            self._stop.wait(self.every)

    def __enter__(self) -> FamilyRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- the parent ------------------------------------------------------------------

def start_prefect_server(home: Path) -> tuple[subprocess.Popen[bytes], str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    home.mkdir(parents=True, exist_ok=True)
    out = open(home / "server.log", "wb")  # noqa: SIM115 - the server's log for its lifetime
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port), "--no-ui"], env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"prefect server did not start; see {home / 'server.log'}")


async def count_task_runs(api_url: str, job_name: str) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        async with get_client() as client:
            runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["genflow-job"])))
            run = next(r for r in runs if r.parameters.get("config", {}).get("name") == job_name)
            count = 0
            while True:  # the API pages its answers (200 per request by default)
                page = await client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])), offset=count)
                if not page:
                    return count
                count += len(page)


def run_size(workdir: Path, count: int, api_url: str, env: dict[str, str]) -> dict[str, Any]:
    import shutil

    import yaml

    name = f"scale-{count}"
    prompts = write_prompts(workdir / "inputs" / f"prompts-{count}-rg{ROW_GROUP_ROWS}.parquet", count)
    output = workdir / "jobs" / name
    shutil.rmtree(output, ignore_errors=True)
    config = workdir / f"{name}.yaml"
    config.write_text(yaml.safe_dump(_job_config(prompts, output, name)))
    result = workdir / f"{name}.json"
    log(f"{count:,} prompts: running")
    with open(workdir / f"{name}.log", "wb") as job_log:
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_scale", "--child", str(config), str(result)],
                                cwd=ROOT, env={**env, "PREFECT_API_URL": api_url}, stdout=job_log,
                                stderr=subprocess.STDOUT)
        with FamilyRss(proc.pid) as family:
            code = proc.wait()
    if code != 0:
        raise RuntimeError(f"the {count:,}-prompt job failed; see {workdir / f'{name}.log'}")
    data = json.loads(result.read_text())
    data["family_peak_rss_mib"] = family.peak_mib
    data["task_runs"] = asyncio.run(count_task_runs(api_url, name))
    log(f"{count:,} prompts: {data['wall_s']:.1f}s, driver {data['driver_peak_rss_mib']:.0f} MiB, "
        f"with Ray {family.peak_mib:.0f} MiB, {data['task_runs']} task runs")
    return data


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=None, metavar=("SMALL", "LARGE"))
    parser.add_argument("--child", nargs=2, type=Path, help=argparse_hidden())
    args = parser.parse_args()
    quiet_environment()
    if args.child:
        child(*args.child)
        return
    small, large = args.sizes or ((2_000, 20_000) if args.quick else (10_000, 100_000))
    workdir: Path = args.workdir / "scale"
    workdir.mkdir(parents=True, exist_ok=True)

    sys.path.insert(0, str(ROOT / "tests"))
    import plugins_for_tests

    site = plugins_for_tests.install(workdir / "site")
    env = {**os.environ, **QUIET_ENV, "PYTHONPATH": os.pathsep.join([plugins_for_tests.pythonpath(site), str(ROOT)])}
    log("starting a Prefect server")
    server, api_url = start_prefect_server(workdir / "prefect-home")
    try:
        results = {n: run_size(workdir, n, api_url, env) for n in (small, large)}
    finally:
        server.terminate()
        server.wait(timeout=30)

    a, b = results[small], results[large]
    driver_ratio = b["driver_peak_rss_mib"] / a["driver_peak_rss_mib"]
    family_ratio = b["family_peak_rss_mib"] / a["family_peak_rss_mib"]
    per_10k = max(a["task_runs"] * 10_000 / small, b["task_runs"] * 10_000 / large)  # the less flattering
    details = {"sizes": [small, large], "shard_rows": a["shard_rows"], "batch_size": 64,
               "wall_s": [round(a["wall_s"], 1), round(b["wall_s"], 1)],
               "prompts_per_s": [round(small / a["wall_s"]), round(large / b["wall_s"])],
               "task_runs": [a["task_runs"], b["task_runs"]], "timings_s": [a["timings_s"], b["timings_s"]]}
    comparisons = [
        Comparison(f"driver peak RSS, {large:,} vs {small:,} prompts", "MiB", b["driver_peak_rss_mib"],
                   a["driver_peak_rss_mib"], driver_ratio, *at_most(driver_ratio, RSS_TARGET), details,
                   ratio_is=f"{large:,} / {small:,}"),
        Comparison(f"driver + Ray peak RSS, {large:,} vs {small:,} prompts", "MiB", b["family_peak_rss_mib"],
                   a["family_peak_rss_mib"], family_ratio, *at_most(family_ratio, RSS_TARGET), details,
                   ratio_is=f"{large:,} / {small:,}"),
        Comparison("Prefect task runs per 10k prompts", "task runs", per_10k, None, per_10k,
                   *at_most(per_10k, TASK_RUN_TARGET), details, ratio_is="the figure"),
    ]
    print(f"shard_rows {a['shard_rows']} (default); {small:,} prompts in {a['wall_s']:.0f}s, "
          f"{large:,} in {b['wall_s']:.0f}s; task runs {a['task_runs']} and {b['task_runs']}", flush=True)
    emit(comparisons, args.json)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()

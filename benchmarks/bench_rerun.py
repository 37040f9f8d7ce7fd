"""A second ``genflow run`` of a finished job: no model calls, and seconds; and ``genflow --help``.

The job is the quickstart (tiny text model, hf-reward and embedding-sim, ranking
and export) writing under the work dir. It runs once from scratch, then again
``--reruns`` times; every rerun must skip every (stage, shard) and load no model
(the manifest says so). One more rerun is recorded with pyinstrument, and the
report lists where its wall clock goes.

    python -m benchmarks.bench_rerun [--quick] [--reruns 3]
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.bench_job import environment
from benchmarks.common import (
    ROOT,
    Comparison,
    at_most,
    base_parser,
    causal_lm,
    emit,
    log,
    quiet_environment,
    reward_model,
)

RERUN_TARGET_S = 10.0
HELP_TARGET_S = 1.0


def quickstart_config(workdir: Path) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    config["input"] = str(ROOT / config["input"])
    config["output"] = str(workdir / "out")
    config["generators"][0]["model"] = causal_lm(workdir.parent, "tiny-gpt2")
    for scorer in config["scorers"]:
        if scorer["plugin"] == "hf-reward":
            scorer["model"] = reward_model(workdir.parent)
    path = workdir / "quickstart.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def timed_run(*args: str, profile: Path | None = None) -> tuple[float, subprocess.CompletedProcess[str]]:
    """``genflow ARGS`` in a fresh process, as a user runs it (under pyinstrument with ``profile``)."""
    runner = [sys.executable, *(["-m", "pyinstrument", "-r", "pyisession", "-o", str(profile)] if profile else [])]
    cmd = [*runner, "-m", "genflow.cli", *args]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=environment(), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, proc


def model_work(manifest: dict[str, Any]) -> dict[str, Any]:
    """Stages that did work and plugins that loaded a model, per the manifest."""
    stages = {k: v for k, v in manifest["stages"].items() if v["skipped"] != v["shards"]}
    loaded = [name for name, p in manifest["plugins"].items() if p.get("loaded")]
    return {"stages_not_skipped": sorted(stages), "plugins_loaded": loaded}


def profile_lines(session_path: Path, min_seconds: float = 0.15, depth: int = 14) -> list[str]:
    """The profiled rerun's call tree, cut to frames of ``min_seconds`` or more."""
    from pyinstrument.renderers import ConsoleRenderer
    from pyinstrument.session import Session

    text = ConsoleRenderer(unicode=False, color=False, short_mode=True,
                           processor_options={"filter_threshold": 0.02}).render(Session.load(str(session_path)))
    lines = []
    for line in text.splitlines():
        line = line[2:] if line.startswith(". ") else line
        stripped = line.lstrip(" |`-")
        head = stripped.split(" ", 1)[0]
        try:
            seconds = float(head)
        except ValueError:
            continue
        if seconds >= min_seconds and (len(line) - len(stripped)) // 3 <= depth and "frames hidden" not in line:
            lines.append(line.rstrip())
    return lines


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--reruns", type=int, help="timed reruns (default 3, --quick 2)")
    parser.add_argument("--no-profile", action="store_true", help="skip the pyinstrument rerun")
    args = parser.parse_args()
    quiet_environment()
    workdir: Path = args.workdir / "rerun"
    workdir.mkdir(parents=True, exist_ok=True)
    config = quickstart_config(workdir)
    shutil.rmtree(workdir / "out", ignore_errors=True)

    help_s = []
    for _ in range(3):
        seconds, _ = timed_run("--help")
        help_s.append(seconds)
    log(f"genflow --help: {min(help_s):.2f}s; first run of the quickstart")
    first_s, _ = timed_run("run", str(config))
    manifest_path = workdir / "out" / "manifest.json"
    first = json.loads(manifest_path.read_text())
    reruns, work = [], []
    for i in range(args.reruns or (2 if args.quick else 3)):
        seconds, _ = timed_run("run", str(config))
        reruns.append(seconds)
        work.append(model_work(json.loads(manifest_path.read_text())))
        log(f"first run {first_s:.1f}s; rerun {i + 1}: {seconds:.1f}s")
    details: dict[str, Any] = {
        "job": "configs/quickstart.yaml (tiny-gpt2, hf-reward, embedding-sim)",
        "first_run_s": round(first_s, 2), "reruns_s": [round(s, 2) for s in reruns],
        "first_run_timings_s": first["timings_s"],
        "rerun_model_work": work[-1],
    }
    if not args.no_profile:
        session = workdir / "rerun.pyisession"
        timed_run("run", str(config), profile=session)
        details["profile"] = profile_lines(session)
        details["profile_file"] = str(session)
    rerun = statistics.median(reruns)
    no_work = all(not w["stages_not_skipped"] and not w["plugins_loaded"] for w in work)
    target, under = at_most(rerun, RERUN_TARGET_S)
    help_target, help_met = at_most(min(help_s), HELP_TARGET_S)
    emit([
        Comparison("rerun of a finished job (no model calls)", "s", round(rerun, 2), round(first_s, 2),
                   round(rerun, 2), f"{target} s, no model loads", under and no_work,
                   details, ratio_is="seconds (median rerun; baseline = the first run)"),
        Comparison("genflow --help", "s", round(min(help_s), 3), None, round(min(help_s), 3), f"{help_target} s",
                   help_met, {"runs_s": [round(s, 3) for s in help_s]}, ratio_is="seconds (best of 3)"),
    ], args.json)


if __name__ == "__main__":
    main()

"""What the side-by-side benchmarks share: prompts, models, results and the JSON they hand back.

Every comparison runs genflow and its baseline on the same model, the same
prompts and the same token counts, in one run, and reports a ``Comparison``:
both figures, their ratio, the target and whether the target is met. Times on a
shared machine are noisy; ratios measured side by side are what to trust.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORKDIR = ROOT / "outputs" / "benchmarks"

QUIET_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def quiet_environment() -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def worker_environment() -> dict[str, str]:
    """The process environment genflow gives its plugin workers (glibc malloc settings)."""
    from genflow.engine.ray_cluster import worker_env_vars

    return worker_env_vars()


def run_as_genflow_worker(module: str) -> None:
    """Restart this process with the worker environment if it lacks it.

    The in-process comparisons (generation, scoring) run genflow's plugin classes
    as a job's Ray worker would; the baseline shares the process, so both sides get
    the same environment. glibc reads these settings only when a process starts.
    """
    env = worker_environment()
    if any(os.environ.get(k) != v for k, v in env.items()):
        os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], {**os.environ, **env})


@dataclass
class Comparison:
    """One row of the results table: genflow vs its baseline, measured side by side.

    ``genflow`` and ``baseline`` are in ``metric`` units. ``ratio`` is the figure the
    target is about: genflow / baseline unless ``ratio_is`` says otherwise (for an
    absolute target, such as seconds, the figure itself).
    """

    name: str
    metric: str
    genflow: float
    baseline: float | None
    ratio: float
    target: str
    met: bool
    details: dict[str, Any] = field(default_factory=dict)
    ratio_is: str = "genflow / baseline"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def at_least(value: float, target: float) -> tuple[str, bool]:
    return f">= {target:g}", value >= target


def at_most(value: float, target: float) -> tuple[str, bool]:
    return f"<= {target:g}", value <= target


# -- prompts ------------------------------------------------------------------

def synthetic_prompts(count: int, min_words: int = 2, max_words: int = 16, seed: int = 0) -> list[str]:
    """``count`` prompts of 2 to 16 words cut from the tiny models' corpus (varied lengths, fixed seed).

    With the tiny tokenizer that is 2 to ~120 tokens, ~28 on average (the quickstart's prompts: ~21).
    """
    from genflow.plugins.shared.tiny_tokenizer import corpus_lines

    words = " ".join(corpus_lines()).split()
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        size = rng.randint(min_words, max_words)
        start = rng.randrange(0, len(words) - size)
        prompts.append(" ".join(words[start:start + size]))
    return prompts


def write_prompts_parquet(path: Path, prompts: list[str]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": [f"b{i:06d}" for i in range(len(prompts))], "prompt": prompts}), path)
    return path


# -- models -------------------------------------------------------------------

MODELS = {
    # name: (n_layer, n_embd, n_head); same locally trained tokenizer for all
    "tiny-gpt2": (2, 64, 2),         # what `genflow models init-tiny` writes
    "gpt2-4x256": (4, 256, 4),       # the performance issue's example: "a few layers, 256 hidden"
    "gpt2-6x512": (6, 512, 8),       # 6x the compute per token: on 2 CPU cores, compute dominates a 2k-prompt job
}


def causal_lm(workdir: Path, name: str) -> str:
    """A GPT-2 written tiny-style (random weights, seed 0), reused when already there."""
    from genflow.plugins.text.generator import write_tiny_causal_lm

    path = workdir / "models" / name
    if not (path / "config.json").exists():
        n_layer, n_embd, n_head = MODELS[name]
        write_tiny_causal_lm(path, n_layer=n_layer, n_embd=n_embd, n_head=n_head)
    return str(path)


def fixed_length_copy(source: Path, path: Path, new_tokens: int) -> str:
    """The model folder with ``min_new_tokens`` and the pad token banned: every sample is ``new_tokens`` long."""
    import shutil

    from transformers import GenerationConfig

    if not (path / "config.json").exists():
        shutil.copytree(source, path, dirs_exist_ok=True)
        config = GenerationConfig.from_pretrained(path)
        config.min_new_tokens = new_tokens
        config.suppress_tokens = [config.pad_token_id]  # genflow strips trailing pads; never sample one
        config.save_pretrained(path)
    return str(path)


def tiny_text_model(workdir: Path, new_tokens: int = 32) -> str:
    """``models/tiny-gpt2`` (what `genflow models init-tiny models` writes; the same kind is written
    under ``workdir`` if it is absent) with every sample ``new_tokens`` long, under ``workdir/models``."""
    source = ROOT / "models" / "tiny-gpt2"
    if not (source / "config.json").exists():
        source = Path(causal_lm(workdir, "tiny-gpt2"))
    return fixed_length_copy(source, workdir / "models" / f"tiny-gpt2-exactly-{new_tokens}-tokens", new_tokens)


def reward_model(workdir: Path) -> str:
    from genflow.plugins.text.reward import write_tiny_reward_model

    path = workdir / "models" / "tiny-reward"
    if not (path / "config.json").exists():
        write_tiny_reward_model(path)
    return str(path)


# -- measuring ----------------------------------------------------------------

@contextmanager
def timer() -> Iterator[list[float]]:
    """``with timer() as t: ...`` then ``t[0]`` is the elapsed seconds."""
    out: list[float] = []
    start = time.perf_counter()
    try:
        yield out
    finally:
        out.append(time.perf_counter() - start)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict[str, Any]:
    import platform

    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform()}
    try:
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


# -- the protocol between a benchmark module and the runner -------------------

def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smaller sizes: a quick look, not the targets' sizes")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help="models, inputs and job outputs (default: outputs/benchmarks)")
    parser.add_argument("--json", type=Path, help="also write the comparisons to this JSON file")
    return parser


def emit(comparisons: list[Comparison], json_path: Path | None) -> None:
    """Print the module's rows; hand them to the runner through ``--json``."""
    for c in comparisons:
        base = f" vs baseline {c.baseline:,.4g}" if c.baseline is not None else ""
        print(f"{c.name}: genflow {c.genflow:,.4g}{base} {c.metric}; {c.ratio_is} {c.ratio:.3g} "
              f"(target {c.target}: {'met' if c.met else 'NOT met'})", flush=True)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps([c.to_json() for c in comparisons], indent=2))


def log(message: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

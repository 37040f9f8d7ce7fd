"""Running genflow as the tests do: the repository's root, a small text job, the command, a free port."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def text_job(tmp_path: Path, models: dict[str, str], **overrides: Any) -> dict[str, Any]:
    """A small text job config over the quickstart prompts, writing into ``tmp_path``."""
    config: dict[str, Any] = {
        "name": "test-text",
        "input": str(ROOT / "configs/data/quickstart_prompts.parquet"),
        "output": str(tmp_path / "out"),
        "shard_rows": 8,
        "generators": [{"label": "tiny", "plugin": "hf-text", "model": models["tiny-gpt2"], "samples": 3,
                        "params": {"max_new_tokens": 8, "temperature": 0.9}}],
        "scorers": [{"plugin": "hf-reward", "model": models["tiny-reward"]}],
        "ranking": {"pairs": {"min_margin": 0.0, "per_prompt": 2}, "best_of_n": True},
        "ray": {"workers": 2, "batch_size": 8},
    }
    config.update(overrides)
    return config


def run_genflow(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
                timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The ``genflow`` command in a subprocess, as a user runs it."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "genflow.cli", *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

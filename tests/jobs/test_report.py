"""report.html: written by every job, rebuilt by `genflow report`, checked in a real headless browser."""

from __future__ import annotations

import base64
import logging
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image
from support.jobs import ROOT, run_genflow, text_job

from genflow.data.storage import Storage
from genflow.outputs.report import PALETTE, SAMPLE_PROMPTS, visible, write_report_safely

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")

EVIL = '</pre><script>document.title="pwned"</script><img src=x onerror="document.title=\'pwned\'">\x1b[31m'


# -- a headless browser -------------------------------------------------------

def chromium(tmp_path: Path, page: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    profile = tmp_path / "chromium-profile"
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         *args, page.resolve().as_uri()],
        capture_output=True, text=True, timeout=90, check=True)


def dom(tmp_path: Path, page: Path) -> str:
    """The page's DOM after Chromium loaded it (what a person's browser would show)."""
    return chromium(tmp_path, page, "--dump-dom").stdout


def screenshot(tmp_path: Path, page: Path, name: str, height: int = 2400) -> np.ndarray:
    """The page as Chromium paints it, decoded: (height, 1280, 3) RGB, checked to show a page's worth."""
    shot = tmp_path / name
    chromium(tmp_path, page, f"--screenshot={shot}", f"--window-size=1280,{height}", "--hide-scrollbars")
    with Image.open(shot) as img:
        assert img.format == "PNG" and img.size == (1280, height)
        pixels = np.asarray(img.convert("RGB"))
    colors, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    assert len(colors) > 200, "the screenshot is (nearly) blank"
    background = colors[counts.argmax()]
    assert counts.max() / counts.sum() < 0.97, "the screenshot is (nearly) one colour"
    inked = (np.abs(pixels.astype(int) - background).sum(axis=2) > 96).any(axis=1)
    assert inked[:200].any() and inked[200:].mean() > 0.15, "the page's content is not painted down the window"
    return pixels


def share_of(pixels: np.ndarray, hex_color: str, tolerance: int = 24) -> float:
    """The fraction of the screenshot painted (about) ``hex_color``."""
    rgb = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])
    return float((np.abs(pixels.astype(int) - rgb).max(axis=2) <= tolerance).mean())


def sections(html: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="([\w-]+)">(.*?)</section>', html, flags=re.S))


def text_of(fragment: str) -> str:
    import html as html_lib

    return html_lib.unescape(re.sub(r"<[^>]+>", "", fragment))


# -- jobs ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_output(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, str],
                prefect_harness: None, ray_local: None) -> Path:
    from genflow.flows.run import run_job

    tmp = tmp_path_factory.mktemp("text-report")
    config = text_job(tmp, tiny_models, ray={"workers": 1, "batch_size": 16})
    run_job(config)
    return Path(config["output"])


@pytest.fixture(scope="module")
def code_output(tmp_path_factory: pytest.TempPathFactory, prefect_harness: None, ray_local: None) -> Path:
    """Candidates the rows carry, run against their tests: some pass, some fail, one row has no tests."""
    from genflow.flows.run import run_job

    tmp = tmp_path_factory.mktemp("code-report")
    rows = pq.read_table(ROOT / "configs/data/humaneval_responses.parquet").to_pylist()
    for r in rows:
        r["task"] = "code"
    rows.append({"task_id": "evil/0", "prompt": "<b>not bold</b> & no tests", "canonical_solution": "",
                 "test": "", "entry_point": "f", "responses": [EVIL, "print('hi')"], "task": "code"})
    pq.write_table(pa.Table.from_pylist(rows), tmp / "code.parquet")
    config = {"name": "code-report", "input": str(tmp / "code.parquet"), "output": str(tmp / "out"),
              "shard_rows": 4, "scorers": [{"plugin": "code-exec", "params": {"timeout_s": 3, "k": [1, 2]}}],
              "ranking": {"pairs": {"min_margin": 0.5, "per_prompt": 1}}, "max_error_fraction": 0.5,
              "ray": {"workers": 1, "batch_size": 8}}
    run_job(config)
    return tmp / "out"


@pytest.fixture(scope="module")
def image_output(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, str],
                 prefect_harness: None, ray_local: None) -> Path:
    from genflow.config import load_raw
    from genflow.flows.run import run_job

    tmp = tmp_path_factory.mktemp("image-report")
    config = load_raw(ROOT / "configs/images.yaml")
    config.update(input=str(ROOT / config["input"]), output=str(tmp / "out"))
    config["generators"][0]["model"] = tiny_models["tiny-sd"]
    config["generators"][0]["params"]["num_inference_steps"] = 2
    config["scorers"][0]["model"] = tiny_models["tiny-clip"]
    run_job(config)
    return tmp / "out"


# -- what the page says -------------------------------------------------------

@pytest.mark.slow
def test_every_job_writes_a_report_with_its_figures(text_output: Path) -> None:
    manifest = Storage.open(str(text_output)).read_json("manifest.json")
    page = (text_output / "report.html").read_text()
    found = sections(page)
    assert list(found) == ["summary", "throughput", "errors", "scores", "samples", "config"]
    summary = text_of(found["summary"])
    for folder, rows in manifest["rows"].items():
        assert re.search(rf"{folder}\s*{rows:,}", summary, flags=re.I), folder
    scores = pq.read_table(text_output / "rankings")["score"].to_pylist()
    assert f"{sum(scores) / len(scores):.3f}" in summary  # the mean combined score

    tokens = sum(ds.dataset(text_output / "generations").to_table()["num_tokens"].to_pylist())
    assert f"{tokens:,}" in text_of(found["throughput"])
    assert "No errors" in text_of(found["errors"])
    assert "data:image/svg+xml;base64," in found["scores"]  # the hf-reward histogram, inline
    # Each sampled prompt shows its best and worst candidates, with their text.
    samples = text_of(found["samples"])
    prompts = pq.read_table(text_output / "prompts").to_pylist()
    shown = [p for p in prompts if p["prompt"] in samples]
    assert len(shown) == min(SAMPLE_PROMPTS, len(prompts))
    assert "test-text" in text_of(found["config"]) and "hf-reward" in text_of(found["config"])


@needs_browser
@pytest.mark.slow
def test_text_report_in_a_headless_browser(text_output: Path, tmp_path: Path) -> None:
    loaded = dom(tmp_path, text_output / "report.html")
    assert "<title>test-text</title>" in loaded
    found = sections(loaded)
    assert {"summary", "throughput", "errors", "scores", "samples", "config"} <= set(found)
    assert found["samples"].count('<pre class="text">') >= SAMPLE_PROMPTS * 2
    # The score histogram is in the page as an SVG of the hf-reward scores...
    figures = re.findall(r'<img[^>]+src="data:image/svg\+xml;base64,([^"]+)"', found["scores"])
    assert len(figures) == 1
    svg = base64.b64decode(figures[0]).decode()
    assert svg.lstrip().startswith(("<?xml", "<svg")) and ">hf-reward<" in svg and ">candidates<" in svg
    assert PALETTE[0] in svg  # the bars, in the first scorer's colour
    # ...and Chromium paints it: its bars' colour covers a visible patch of the page.
    pixels = screenshot(tmp_path, text_output / "report.html", "text-report.png")
    assert share_of(pixels, PALETTE[0]) > 0.002


@needs_browser
@pytest.mark.slow
def test_image_report_shows_every_candidate_with_its_score(image_output: Path, tmp_path: Path) -> None:
    page = image_output / "report.html"
    loaded = dom(tmp_path, page)
    found = sections(loaded)
    assert "images" in found and "samples" not in found
    generations = ds.dataset(image_output / "generations").to_table().to_pylist()
    rankings = {r["generation_id"]: r for r in ds.dataset(image_output / "rankings").to_table().to_pylist()}
    thumbnails = re.findall(r'<img src="data:image/jpeg;base64,[^"]+" alt="candidate', found["images"])
    assert len(thumbnails) == len(generations)  # few prompts: all of them, every candidate
    for g in generations:  # each links the full-size PNG (relative, so the folder can move)
        assert f'href="{g["image_path"]}"' in found["images"]
        assert f"#{rankings[g['generation_id']]['rank']} · {rankings[g['generation_id']]['score']:.3f}" in \
            text_of(found["images"])
    pixels = screenshot(tmp_path, page, "image-report.png", height=1800)
    # The thumbnails are painted: the tiny model's noisy images bring thousands of colours.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 2000


@needs_browser
@pytest.mark.slow
def test_untrusted_text_is_shown_not_run(code_output: Path, tmp_path: Path) -> None:
    page = code_output / "report.html"
    raw = page.read_text()
    assert "<script" not in raw and "onerror=\"" not in raw
    loaded = dom(tmp_path, page)
    assert "<title>code-report</title>" in loaded  # the script did not run
    assert "<script" not in loaded and "<img src=\"x\"" not in loaded
    samples = text_of(sections(loaded)["samples"])
    assert '<script>document.title="pwned"</script>' in samples  # shown as text
    assert "\\x1b[31m" in samples  # the escape character, visible
    assert "<b>not bold</b> & no tests" in samples


@pytest.mark.slow
def test_code_report_gives_pass_at_k_and_the_top_errors(code_output: Path) -> None:
    manifest = Storage.open(str(code_output)).read_json("manifest.json")
    found = sections((code_output / "report.html").read_text())
    passk = text_of(found["pass-at-k"])
    metrics = manifest["metrics"]["code-exec"]
    # pass@k worked out here from scores/: per prompt, n candidates scored and c of them passing
    # (score 1.0), 1 - C(n-c, k) / C(n, k), averaged over the prompts.
    outcomes: dict[str, list[bool]] = {}
    for s in ds.dataset(code_output / "scores").to_table().to_pylist():
        if s["scorer"] == "code-exec":
            outcomes.setdefault(s["prompt_id"], []).append(s["score"] >= 1.0)
    assert len(outcomes) == 5 and all(len(v) == 5 for v in outcomes.values())  # the row with no tests: errors
    assert 0 < sum(map(sum, outcomes.values())) < sum(map(len, outcomes.values()))  # some pass, some fail
    for k in (1, 2):
        expected = sum(1 - math.comb(len(v) - sum(v), k) / math.comb(len(v), k) for v in outcomes.values()) / len(
            outcomes)
        assert f"{expected * 100:.1f}%" in passk
        assert metrics[f"pass@{k}"] == pytest.approx(expected, abs=1e-12)
    errors = text_of(found["errors"])
    assert manifest["errors"]["rows"] == 2  # both candidates of the row without tests
    assert re.search(r"2\s*score\s*code-exec\s*code-exec: the row has no tests", errors)
    # Each shown candidate carries its verdict from the sandbox.
    samples = text_of(found["samples"])
    assert "code-exec: passed" in samples and "code-exec: failed: " in samples


def test_visible_escapes_and_shows_control_characters() -> None:
    assert str(visible("a<b>&\x00\x1b\x7f\tz")) == 'a&lt;b&gt;&amp;<span class="ctl">\\x00</span>' \
        '<span class="ctl">\\x1b</span><span class="ctl">\\x7f</span>\tz'
    long = visible("x" * 5000, limit=100)
    assert long.startswith("x" * 100) and "4,900 more characters" in long


@pytest.mark.slow
def test_a_report_that_cannot_be_built_never_fails_the_job(
        text_output: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import genflow.outputs.report

    storage = Storage.open(str(text_output))
    before = (text_output / "report.html").read_bytes()

    def broken(*args: Any) -> str:
        raise RuntimeError("matplotlib exploded")

    monkeypatch.setattr(genflow.outputs.report, "build_report", broken)
    with caplog.at_level(logging.WARNING, logger="genflow.outputs.report"):
        assert write_report_safely(storage, storage.read_json("manifest.json")) is None
    assert "matplotlib exploded" in caplog.text and f"genflow report {text_output}" in caplog.text
    assert (text_output / "report.html").read_bytes() == before


@pytest.mark.slow
def test_genflow_report_rebuilds_the_page(text_output: Path, tmp_path: Path) -> None:
    copy = tmp_path / "job"
    shutil.copytree(text_output, copy)
    (copy / "report.html").unlink()
    result = run_genflow("report", str(copy))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(copy / "report.html")
    # The same page the job wrote, but for the minute it was built.
    assert _undated((copy / "report.html").read_text()) == _undated((text_output / "report.html").read_text())

    empty = run_genflow("report", str(tmp_path / "nothing"))
    assert empty.returncode == 2
    assert "no manifest.json or sweep.parquet" in empty.stderr


def _undated(page: str) -> str:
    return re.sub(r"report built [^·]+", "", page)


@pytest.mark.slow
def test_a_report_on_s3_embeds_every_image(image_output: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A page in a bucket cannot link the PNGs beside it: thumbnails are in the page, links are not."""
    import boto3
    from moto.server import ThreadedMotoServer

    from genflow.outputs.report import rebuild

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                           "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(key, value)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="reports")
        for path in image_output.rglob("*"):
            if path.is_file() and path.name != "report.html":
                s3.upload_file(str(path), "reports", f"job/{path.relative_to(image_output)}")
        assert rebuild("s3://reports/job") == ["s3://reports/job/report.html"]
        page = s3.get_object(Bucket="reports", Key="job/report.html")["Body"].read().decode()
    finally:
        server.stop()
    images = sections(page)["images"]
    generations = ds.dataset(image_output / "generations").to_table().num_rows
    inputs = sum(v is not None for c in ("image", "mask")
                 for v in ds.dataset(image_output / "prompts").to_table()[c].to_pylist())
    assert images.count('src="data:image/jpeg;base64,') == generations + inputs
    assert "href=" not in images

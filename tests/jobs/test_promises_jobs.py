"""Promises only a whole job can show: through the real flow, Ray workers and Prefect."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image

pytestmark = pytest.mark.slow


def rows(out: Path, folder: str) -> list[dict[str, Any]]:
    return ds.dataset(out / folder).to_table().to_pylist()


def test_an_image_candidate_that_cannot_be_read_becomes_an_error_row_not_a_silent_drop(
        tmp_path: Path, job_runner: Any, test_plugins: dict[str, str]) -> None:
    data = tmp_path / "data"
    (data / "pics").mkdir(parents=True)
    sizes = {"cat-small.png": 4, "cat-big.png": 32, "dog.png": 8}
    for name, side in sizes.items():
        Image.new("RGB", (side, side), (side * 7 % 256, 90, 30)).save(data / "pics" / name)
    pq.write_table(pa.table({
        "id": ["cat", "dog"], "task": ["image", "image"], "prompt": ["a cat", "a dog"],
        "responses": [["pics/cat-small.png", "pics/cat-big.png"], ["pics/dog.png", "pics/gone.png"]],
    }), data / "prompts.parquet")
    out = tmp_path / "out"
    manifest = job_runner({
        "name": "unreadable-image", "input": str(data / "prompts.parquet"), "output": str(out), "shard_rows": 1,
        "scorers": [{"plugin": "length"}], "ranking": {"pairs": {"per_prompt": 1}},
        "max_error_fraction": 0.5, "ray": {"workers": 1, "batch_size": 4}})
    assert manifest["status"] == "completed"

    generations = {g["image_path"]: g for g in rows(out, "generations")}
    assert sorted(generations) == ["pics/cat-big.png", "pics/cat-small.png", "pics/dog.png", "pics/gone.png"]
    gone = generations["pics/gone.png"]

    # The three readable candidates are scored (length: the PNG's size in bytes)...
    scores = {s["generation_id"]: s["score"] for s in rows(out, "scores")}
    assert scores == {generations[p]["generation_id"]: float((data / p).stat().st_size)
                      for p in ("pics/cat-big.png", "pics/cat-small.png", "pics/dog.png")}
    # ...and the missing one is an errors/ row naming it, counted against the job.
    errors = rows(out, "errors")
    assert [(e["prompt_id"], e["stage"], e["plugin"], e["generation_id"]) for e in errors] == [
        ("dog", "score", "length", gone["generation_id"])]
    assert errors[0]["error"].startswith("cannot read image pics/gone.png: ")
    assert f"file not found: {data}/pics/gone.png" in errors[0]["error"]
    assert "Traceback" in errors[0]["traceback"]
    assert manifest["rows"]["errors"] == manifest["errors"]["rows"] == 1

    # Only what was scored is ranked and paired.
    ranked = {(r["prompt_id"], r["generation_id"]): r["rank"] for r in rows(out, "rankings")}
    assert ranked == {("cat", generations["pics/cat-big.png"]["generation_id"]): 1,
                      ("cat", generations["pics/cat-small.png"]["generation_id"]): 2,
                      ("dog", generations["pics/dog.png"]["generation_id"]): 1}
    pairs = rows(out, "preferences")
    assert [(p["prompt_id"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("cat", "pics/cat-big.png", "pics/cat-small.png")]

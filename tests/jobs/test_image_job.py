"""Image jobs end to end: the real flow, Ray workers and Prefect, on the tiny models."""

from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image

from genflow.config import load_raw

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def rows(output: Path, folder: str) -> list[dict[str, Any]]:
    return ds.dataset(output / folder).to_table().to_pylist()


def opened(path: Path) -> Image.Image:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.convert("RGB")


def pngs(output: Path) -> dict[str, bytes]:
    return {str(p.relative_to(output)): p.read_bytes() for p in sorted((output / "images").rglob("*.png"))}


def quickstart(tmp_path: Path, models: dict[str, str]) -> dict[str, Any]:
    """configs/images.yaml as shipped, with its paths pointed at the test's models and folder."""
    config = load_raw(ROOT / "configs/images.yaml")
    config["input"] = str(ROOT / config["input"])
    config["output"] = str(tmp_path / "out")
    config["generators"][0]["model"] = models["tiny-sd"]
    config["scorers"][0]["model"] = models["tiny-clip"]
    return config


def test_image_quickstart_writes_pngs_scores_rankings_and_pairs(
        tmp_path: Path, tiny_models: dict[str, str], job_runner: Any) -> None:
    config = quickstart(tmp_path, tiny_models)
    manifest = job_runner(config)
    out = Path(config["output"])
    assert manifest["status"] == "completed"
    inputs = {r["id"]: r for r in pq.read_table(config["input"]).to_pylist()}

    generations = rows(out, "generations")
    assert len(generations) == len(inputs) * 2
    by_prompt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for g in generations:
        assert g["image_path"] == f"images/{g['prompt_id']}/{g['generation_id']}.png"
        assert opened(out / g["image_path"]).size == (64, 64)  # the tiny model's native size
        assert (g["modality"], g["generator"], g["text"]) == ("image", "tiny-sd", None)
        assert json.loads(g["params"]) == config["generators"][0]["params"]
        by_prompt[g["prompt_id"]].append(g)
    assert set(by_prompt) == set(inputs)
    assert sorted(pngs(out)) == sorted(g["image_path"] for g in generations)
    for samples in by_prompt.values():
        first, second = sorted(samples, key=lambda g: g["sample"])
        assert first["seed"] != second["seed"]
        assert (out / first["image_path"]).read_bytes() != (out / second["image_path"]).read_bytes()

    # The inpainting row's mask reached the pipeline: outside it the input is kept exactly.
    room = np.asarray(Image.open(io.BytesIO(inputs["inpaint-window"]["image"])).convert("RGB"))
    keep = np.asarray(Image.open(io.BytesIO(inputs["inpaint-window"]["mask"]))) == 0
    for g in by_prompt["inpaint-window"]:
        painted = np.asarray(opened(out / g["image_path"]))
        assert np.array_equal(painted[keep], room[keep])
        assert not np.array_equal(painted[~keep], room[~keep])

    scores = {s["generation_id"]: s for s in rows(out, "scores")}
    assert sorted(scores) == sorted(g["generation_id"] for g in generations)
    for s in scores.values():
        assert s["scorer"] == "clip-score"
        assert s["score"] == pytest.approx(100 * json.loads(s["details"])["cosine"])

    rankings = rows(out, "rankings")
    best: dict[str, str] = {}
    for prompt_id in by_prompt:
        ranked = sorted((r for r in rankings if r["prompt_id"] == prompt_id), key=lambda r: r["rank"])
        assert [r["rank"] for r in ranked] == [1, 2]
        assert ranked[0]["score"] >= ranked[1]["score"]
        assert ranked[0]["score"] == pytest.approx(scores[ranked[0]["generation_id"]]["score"])
        best[prompt_id] = ranked[0]["generation_id"]

    pairs = rows(out, "preferences")
    assert sorted(p["prompt_id"] for p in pairs) == sorted(inputs)
    for pair in pairs:
        assert pair["chosen"] == f"images/{pair['prompt_id']}/{pair['chosen_id']}.png"
        assert pair["rejected"] == f"images/{pair['prompt_id']}/{pair['rejected_id']}.png"
        assert (out / pair["chosen"]).is_file() and (out / pair["rejected"]).is_file()
        assert pair["chosen_id"] == best[pair["prompt_id"]]
        assert pair["score_chosen"] > pair["score_rejected"]
    sft = {r["prompt_id"]: r for r in rows(out, "sft")}
    assert {pid: r["completion"] for pid, r in sft.items()} == {
        pid: f"images/{pid}/{gid}.png" for pid, gid in best.items()}


@pytest.fixture
def path_prompts(tmp_path: Path) -> Path:
    """Prompts whose images are files next to the Parquet (relative and absolute paths),
    three of them broken: a missing file, a text file, a mask of the wrong size."""
    pics = tmp_path / "data" / "pics"
    pics.mkdir(parents=True)
    photo = np.zeros((40, 48, 3), np.uint8)
    photo[..., 0] = np.arange(48) * 5
    photo[10:30, 12:36] = (30, 200, 90)
    Image.fromarray(photo).save(pics / "photo.png")
    mask = np.zeros((40, 48), np.uint8)
    mask[:, :24] = 255
    Image.fromarray(mask).save(pics / "mask.png")
    Image.fromarray(mask[:20, :20]).save(pics / "small_mask.png")
    (pics / "notes.txt").write_text("not a picture")
    table = pa.table({
        "id": ["text", "img2img", "inpaint", "missing", "not-an-image", "bad-mask"],
        "prompt": ["a red bicycle", "a red bicycle, watercolor", "a green door", "a cat", "a dog", "a tree"],
        "image": [None, "pics/photo.png", str(pics / "photo.png"), "pics/nope.png", "pics/notes.txt",
                  "pics/photo.png"],
        "mask": [None, None, str(pics / "mask.png"), None, None, "pics/small_mask.png"],
    })
    pq.write_table(table, tmp_path / "data" / "prompts.parquet")
    return tmp_path / "data" / "prompts.parquet"


def test_rerun_gives_byte_identical_pngs_and_bad_rows_land_in_errors(
        tmp_path: Path, tiny_models: dict[str, str], job_runner: Any, path_prompts: Path) -> None:
    config = quickstart(tmp_path, tiny_models)
    config.update(input=str(path_prompts), max_error_fraction=1.0)
    config["generators"][0]["params"] = {"num_inference_steps": 4, "height": 32, "width": 48}
    first, second = tmp_path / "first", tmp_path / "second"
    for out in (first, second):
        config["output"] = str(out)
        job_runner(config)

    images = pngs(first)
    assert len(images) == 6  # 3 good rows x 2 samples
    assert images == pngs(second), "same seeds must give byte-identical PNGs"
    for rel in images:
        assert opened(first / rel).size == (48, 32), rel  # every mode honours the configured size
    assert sorted({Path(rel).parent.name for rel in images}) == ["img2img", "inpaint", "text"]

    errors = sorted(rows(first, "errors"), key=lambda e: (e["prompt_id"], e["generation_id"]))
    assert [e["prompt_id"] for e in errors] == ["bad-mask"] * 2 + ["missing"] * 2 + ["not-an-image"] * 2
    assert {(e["stage"], e["plugin"]) for e in errors} == {("generate", "diffusers-image")}
    messages = {e["prompt_id"]: e["error"] for e in errors}
    assert "mask is 20x20 but its image is 48x40" in messages["bad-mask"]
    assert f"image file not found: {path_prompts.parent}/pics/nope.png" in messages["missing"]
    assert "pics/notes.txt is not an image PIL can read" in messages["not-an-image"]
    scored = {s["prompt_id"] for s in rows(first, "scores")}
    assert scored == {"text", "img2img", "inpaint"}


def edit_job(tmp_path: Path, models: dict[str, str]) -> dict[str, Any]:
    """configs/images-edit.yaml as shipped, its paths pointed at the test's models and folder, its
    input the shipped rows plus two that cannot be outpainted."""
    config = load_raw(ROOT / "configs/images-edit.yaml")
    table = pq.read_table(ROOT / config["input"])
    room = next(r for r in table.to_pylist() if r["id"] == "outpaint-room")
    bad = [{**room, "id": "outpaint-no-image", "image": None},
           {**room, "id": "outpaint-bad-border", "outpaint": {**room["outpaint"], "left": 12, "right": 0}}]
    pq.write_table(pa.concat_tables([table, pa.Table.from_pylist(bad, table.schema)]), tmp_path / "edits.parquet")
    config.update(input=str(tmp_path / "edits.parquet"), output=str(tmp_path / "out"), max_error_fraction=1.0)
    generator = config["generators"][0]
    generator["model"] = models["tiny-sd"]
    generator["params"]["upscale"]["model"] = models["tiny-sd-x4-upscaler"]
    config["scorers"][0]["model"] = models["tiny-clip"]
    return config


def test_every_image_mode_in_one_job_outpaints_upscales_scores_and_reports(
        tmp_path: Path, tiny_models: dict[str, str], job_runner: Any) -> None:
    config = edit_job(tmp_path, tiny_models)
    manifest = job_runner(config)
    out = Path(config["output"])
    assert manifest["status"] == "completed"
    inputs = {r["id"]: r for r in pq.read_table(config["input"]).to_pylist()}

    generations = rows(out, "generations")
    sizes: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for g in generations:
        sizes[g["prompt_id"]].add(opened(out / g["image_path"]).size)
    assert sizes == {
        "t2i-lighthouse": {(256, 256)},    # 64x64, then the x4 upscaler (upscale.after)
        "i2i-bicycle": {(64, 64)}, "inpaint-window": {(64, 64)},
        "outpaint-room": {(96, 64)},       # 64x64 plus 16 left and right
        "outpaint-street": {(128, 64)},    # widened to 2:1
        "upscale-bicycle": {(256, 256)},
    }
    for prompt_id, (left, top) in {"outpaint-room": (16, 0), "outpaint-street": (32, 0)}.items():
        source = np.asarray(Image.open(io.BytesIO(inputs[prompt_id]["image"])).convert("RGB"))
        for g in (g for g in generations if g["prompt_id"] == prompt_id):
            result = np.asarray(opened(out / g["image_path"]))
            assert np.array_equal(result[top:top + 64, left:left + 64], source), "source pixels kept exactly"
            assert not np.array_equal(result[:, :left], np.repeat(source[:, :1], left, axis=1))

    scores = {s["generation_id"]: s for s in rows(out, "scores")}
    assert sorted(scores) == sorted(g["generation_id"] for g in generations)
    ranked = defaultdict(list)
    for r in rows(out, "rankings"):
        ranked[r["prompt_id"]].append(r["rank"])
        assert r["score"] == pytest.approx(scores[r["generation_id"]]["score"])
    assert {p: sorted(r) for p, r in ranked.items()} == {p: [1, 2] for p in sizes}

    errors = {e["prompt_id"]: e["error"] for e in rows(out, "errors")}
    assert errors == {
        "outpaint-no-image": "outpainting needs an `image` to extend, but the row has no image",
        "outpaint-bad-border": "the row's `outpaint` column is not an outpainting: outpaint left + right "
                               "must be a multiple of 8 (the model makes images whose sides are multiples "
                               "of 8), got 12 + 0 = 12",
    }

    report = (out / "report.html").read_text()
    for prompt_id in sizes:
        assert f'<span class="id">{prompt_id}</span>' in report
    assert report.count('alt="input image"') == len(sizes) - 1  # every row but text-to-image's
    assert report.count('alt="input mask"') == 1  # the inpainting row's own
    assert report.count('alt="input outpaint mask"') == 2  # made from the outpainting rows' borders

"""Outpainting and x4 upscaling in diffusers-image, on the tiny offline pipelines."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from pydantic import ValidationError
from typer.testing import CliRunner

from genflow.api import Generation, GenerationRequest, RowError, Score, ScoreItem
from genflow.cli import app
from genflow.plugins.image import clip as clip_plugin
from genflow.plugins.image import generator as image_plugin
from genflow.plugins.image.clip import ClipScoreParams, ClipScorer
from genflow.plugins.image.generator import DiffusersImageGenerator, DiffusersImageParams
from genflow.plugins.image.outpaint import OutpaintParams

STEPS = 2
GUIDANCE = 1.0  # no classifier-free guidance: half the UNet work, the same code paths otherwise


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return image_plugin.init_tiny_models(tmp_path_factory.mktemp("models"))


def make(models: dict[str, str], upscale: dict[str, Any] | None = None, **params: Any) -> DiffusersImageGenerator:
    if upscale is not None:
        params["upscale"] = {"model": models["tiny-sd-x4-upscaler"], "num_inference_steps": STEPS,
                             "guidance_scale": GUIDANCE, **upscale}
    params = {"num_inference_steps": STEPS, "guidance_scale": GUIDANCE, **params}
    return DiffusersImageGenerator(models["tiny-sd"], DiffusersImageParams(**params))


@pytest.fixture(scope="module")
def generator(models: dict[str, str]) -> DiffusersImageGenerator:
    """Auto mode with an upscaler that runs only on rows asking for it (no second stage)."""
    return make(models, upscale={"after": []})


def request(seed: int = 0, prompt: str = "a lighthouse on a cliff", **inputs: object) -> GenerationRequest:
    return GenerationRequest(generation_id=f"g{seed}", prompt_id="p", prompt=prompt, sample=0, seed=seed,
                             inputs=dict(inputs))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(result: Generation | RowError) -> np.ndarray:
    assert isinstance(result, Generation), result
    assert result.image is not None
    with Image.open(io.BytesIO(result.image)) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def photo_of(width: int, height: int) -> Image.Image:
    """A noisy gradient with a bright square: every pixel differs from its neighbours."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 3, y * 4, np.full_like(x, 128)], axis=-1)
    rgb += np.random.default_rng(0).integers(0, 40, rgb.shape)
    rgb[height // 4:height // 2, width // 4:width // 2] = 250
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return photo_of(64, 48)


def test_outpainting_adds_the_borders_and_keeps_the_source_pixels_exactly(
        generator: DiffusersImageGenerator, photo: Image.Image) -> None:
    borders = {"left": 8, "right": 16, "top": 16, "bottom": 0}
    out = pixels(generator.generate([request(5, image=png(photo), outpaint=borders)])[0])
    assert out.shape == (48 + 16, 64 + 24, 3)
    source = np.asarray(photo, dtype=np.int16)
    assert np.array_equal(out[16:64, 8:72], source), "the source pixels are kept bit for bit"
    # The border is painted by the pipeline, not the edge pixels stretched outwards.
    stretched = np.pad(source, ((16, 0), (8, 16), (0, 0)), mode="edge")
    border = np.ones(out.shape[:2], bool)
    border[16:64, 8:72] = False
    assert np.abs(out[border] - stretched[border]).mean() > 10


@pytest.mark.parametrize(("outpaint", "size", "corner"), [
    (8, (80, 64), (8, 8)),                                     # one number: every side
    ({"width": 96, "height": 64}, (96, 64), (16, 8)),          # a target size, the image centred
    ({"width": 72}, (72, 48), (4, 0)),                         # one side only; odd extra goes right
    ({"aspect_ratio": "16:9"}, (88, 48), (12, 0)),             # 64x48 is 4:3: widen to 88x48
    ({"aspect_ratio": "1:2"}, (64, 128), (0, 40)),             # taller
    ({"left": None, "right": None, "top": 8, "bottom": 0}, (64, 56), (0, 8)),  # a Parquet struct
])
def test_outpainting_takes_borders_a_target_size_or_an_aspect_ratio(
        generator: DiffusersImageGenerator, photo: Image.Image, outpaint: Any,
        size: tuple[int, int], corner: tuple[int, int]) -> None:
    out = pixels(generator.generate([request(6, image=png(photo), outpaint=outpaint)])[0])
    assert (out.shape[1], out.shape[0]) == size
    left, top = corner
    assert np.array_equal(out[top:top + 48, left:left + 64], np.asarray(photo, dtype=np.int16))


def test_the_outpaint_param_applies_to_rows_without_the_column_and_a_column_overrides_it(
        models: dict[str, str], photo: Image.Image) -> None:
    gen = make(models, mode="outpaint", outpaint={"top": 8, "bottom": 8})
    plain, own = gen.generate([request(1, image=png(photo)), request(1, image=png(photo), outpaint=16)])
    assert pixels(plain).shape == (64, 64, 3)
    assert pixels(own).shape == (80, 96, 3)


def test_without_keep_unmasked_the_pipeline_output_is_returned_as_is(
        models: dict[str, str], photo: Image.Image) -> None:
    raw = pixels(make(models, keep_unmasked=False).generate([request(5, image=png(photo), outpaint=8)])[0])
    assert raw.shape == (64, 80, 3)
    assert not np.array_equal(raw[8:56, 8:72], np.asarray(photo, dtype=np.int16))


def test_outpainting_is_reproducible_and_seeds_differ(generator: DiffusersImageGenerator, photo: Image.Image) -> None:
    batch = [request(s, image=png(photo), outpaint=8) for s in (1, 2, 1)]
    first, second, again = generator.generate(batch)
    assert first.image == again.image
    assert first.image != second.image


def test_upscale_mode_makes_the_image_four_times_larger(generator: DiffusersImageGenerator) -> None:
    small = png(photo_of(32, 24))
    batch = [request(1, image=small, upscale=True), request(2, image=small, upscale=True)]
    one, other = generator.generate(batch)
    assert pixels(one).shape == pixels(other).shape == (24 * 4, 32 * 4, 3)
    assert not np.array_equal(pixels(one), pixels(other))
    again = make(generator_models(generator), upscale={"after": []}).generate(batch)
    assert [r.image for r in again] == [one.image, other.image]  # a fresh worker


def generator_models(gen: DiffusersImageGenerator) -> dict[str, str]:
    assert gen.upscaler is not None and gen.model_name is not None
    return {"tiny-sd": gen.model_name, "tiny-sd-x4-upscaler": gen.upscaler.params.model}


def test_upscale_cuts_sides_to_multiples_of_four_as_diffusers_does(
        models: dict[str, str]) -> None:
    gen = make(models, upscale={}, mode="upscale")
    assert gen.describe()["upscaler"] == {"model": models["tiny-sd-x4-upscaler"], "factor": 4,
                                          "pipeline": "StableDiffusionUpscalePipeline", "scheduler": "DDIMScheduler"}
    assert "pipeline" not in gen.describe(), "a generator that only upscales loads no Stable Diffusion pipeline"
    assert pixels(gen.generate([request(image=png(photo_of(30, 21)))])[0]).shape == (20 * 4, 28 * 4, 3)


@pytest.mark.slow
def test_second_stage_upscales_the_modes_it_comes_after(models: dict[str, str], photo: Image.Image) -> None:
    gen = make(models, upscale={"after": ["text2img", "outpaint"]}, height=24, width=32)
    t2i, i2i, out = gen.generate([request(1), request(2, image=png(photo)),
                                  request(3, image=png(photo_of(16, 24)), outpaint={"left": 8, "right": 8})])
    assert pixels(t2i).shape == (24 * 4, 32 * 4, 3)
    assert pixels(i2i).shape == (24, 32, 3), "img2img is not in `after`"
    assert pixels(out).shape == (24 * 4, 32 * 4, 3)
    plain = make(models, height=24, width=32).generate([request(1)])[0]
    assert pixels(plain).shape == (24, 32, 3)


@pytest.mark.slow
def test_a_mixed_batch_runs_every_mode_and_keeps_request_order(
        generator: DiffusersImageGenerator, photo: Image.Image) -> None:
    mask = Image.new("L", photo.size, 0)
    mask.paste(255, (0, 0, 32, 48))
    batch = [request(1), request(2, image=png(photo_of(32, 24)), upscale=True), request(3, image=png(photo)),
             request(4, image=png(photo), outpaint=8), request(5, image=png(photo), mask=png(mask))]
    mixed = generator.generate(batch)
    assert [pixels(r).shape for r in mixed] == [(64, 64, 3), (96, 128, 3), (48, 64, 3), (64, 80, 3), (48, 64, 3)]
    for result, alone in zip(mixed, batch, strict=True):
        assert np.abs(pixels(result) - pixels(generator.generate([alone])[0])).max() <= 2


def test_clip_scores_outpainted_and_upscaled_images(
        generator: DiffusersImageGenerator, photo: Image.Image, tmp_path: Path) -> None:
    clip_path = clip_plugin.init_tiny_models(tmp_path)["tiny-clip"]
    scorer = ClipScorer(clip_path, ClipScoreParams())
    results = generator.generate([request(1, image=png(photo), outpaint=8),
                                  request(2, image=png(photo_of(32, 24)), upscale=True)])
    items = [ScoreItem(generation_id=f"g{i}", prompt_id="p", prompt="a lighthouse on a cliff", modality="image",
                       image=r.image) for i, r in enumerate(results)]
    scores = scorer.score(items)
    assert all(isinstance(s, Score) for s in scores), scores
    values = [s.value for s in scores]
    assert values[0] != values[1]
    for s in scores:
        assert s.value == pytest.approx(100 * s.details["cosine"])
        assert -100 <= s.value <= 100


def test_bad_rows_fail_alone_with_messages_naming_what_to_fix(
        generator: DiffusersImageGenerator, models: dict[str, str], photo: Image.Image) -> None:
    odd = png(photo_of(60, 48))
    batch = [
        request(1, image=png(photo), outpaint=8),
        request(2, outpaint=8),
        request(3, image=odd, outpaint={"left": 8, "right": 8}),
        request(4, image=png(photo), outpaint={"width": 48}),
        request(5, image=png(photo), outpaint={"left": -8, "right": 8}),
        request(6, image=png(photo), outpaint={"left": 8, "width": 96}),
        request(7, upscale=True),
        request(8, image=b"not a picture", outpaint=8),
    ]
    results = generator.generate(batch)
    assert pixels(results[0]).shape == (64, 80, 3)
    assert all(isinstance(r, RowError) for r in results[1:]), results
    assert [str(r) for r in results[1:]] == [
        "outpainting needs an `image` to extend, but the row has no image",
        "outpainting the 60x48 image by adding left 8, right 8, top 0, bottom 0 makes it 76x48; both sides "
        "must be multiples of 8: give borders that make them so, or a target width/height",
        "outpaint target 48x48 is smaller than the image (64x48); outpainting only extends an image",
        "the row's `outpaint` column is not an outpainting: left: Input should be greater than or equal to 0",
        "the row's `outpaint` column is not an outpainting: outpaint takes one of borders, a target size or "
        "an aspect_ratio; got borders (left/right/top/bottom) and a target size (width/height)",
        "upscaling needs an `image`, but the row has no image",
        "image (13 bytes) is not an image PIL can read",
    ]
    # Mode outpaint with neither the param nor the column; an upscale row with no upscaler.
    [err] = make(models, mode="outpaint").generate([request(image=png(photo))])
    assert str(err) == ("outpainting needs borders, a target size or an aspect ratio: set the `outpaint` "
                        "param or the row's `outpaint` column")
    [err] = make(models).generate([request(image=png(photo), upscale=True)])
    assert str(err) == ("the row asks for upscaling (its `upscale` column), but the generator has no "
                        "upscaler: set its upscale: {model: ...} param")


@pytest.mark.parametrize(("params", "message"), [
    ({"outpaint": {"left": -8, "right": 8}}, "outpaint.left\n  Input should be greater than or equal to 0"),
    ({"outpaint": {"left": 4, "right": 8}}, "outpaint left + right must be a multiple of 8 (the model makes "
                                            "images whose sides are multiples of 8), got 4 + 8 = 12"),
    ({"outpaint": 6}, "outpaint left + right must be a multiple of 8 (the model makes images whose sides are "
                      "multiples of 8), got 6 + 6 = 12"),
    ({"outpaint": {}}, "outpaint adds nothing: give borders (left/right/top/bottom), a target size"),
    ({"outpaint": {"width": 100}}, "outpaint.width\n  Input should be a multiple of 8"),
    ({"outpaint": {"aspect_ratio": "wide"}}, "outpaint.aspect_ratio\n  String should match pattern"),
    ({"outpaint": {"aspect_ratio": "16:0"}}, "outpaint aspect_ratio must be two positive numbers 'W:H'"),
    ({"outpaint": {"top": 8, "bottom": 0, "aspect_ratio": "1:1"}}, "got borders (left/right/top/bottom) and "
                                                                   "an aspect_ratio"),
    ({"outpaint": {"lefft": 8}}, "outpaint.lefft\n  Extra inputs are not permitted"),
    ({"mode": "outpaint", "height": 64}, "height do not apply to mode: outpaint: its output size is the image "
                                         "plus the `outpaint` borders"),
    ({"mode": "upscale"}, "mode: upscale needs an upscaler: set upscale: {model: ...}"),
    ({"mode": "upscale", "width": 64, "upscale": {"model": "m"}}, "width do not apply to mode: upscale"),
    ({"upscale": {"noise_level": 20}}, "upscale.model\n  Field required"),
    ({"upscale": {"model": "m", "after": ["upscale"]}}, "upscale.after.0\n  Input should be 'text2img', "
                                                         "'img2img', 'inpaint' or 'outpaint'"),
    ({"upscale": {"model": "m", "noise_level": -1}}, "upscale.noise_level\n  Input should be greater than"),
    ({"mode": "sketch"}, "Input should be 'auto', 'text2img', 'img2img', 'inpaint', 'outpaint' or 'upscale'"),
])
def test_params_are_refused_before_any_work(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        DiffusersImageParams.model_validate(params)
    assert message in str(caught.value), str(caught.value)


@pytest.mark.parametrize(("params", "message"), [
    ({"mode": "outpaint", "outpaint": {"left": 8, "right": 4}},
     "generators.0.params.outpaint: Value error, outpaint left + right must be a multiple of 8"),
    ({"outpaint": {"top": -8}}, "generators.0.params.outpaint.top: Input should be greater than or equal to 0"),
    ({"mode": "upscale"}, "generators.0.params.(top level): Value error, mode: upscale needs an upscaler"),
    ({"upscale": {"model": "m", "noise_level": -5}},
     "generators.0.params.upscale.noise_level: Input should be greater than or equal to 0"),
])
def test_genflow_validate_refuses_bad_params_naming_the_key(
        tmp_path: Path, params: dict[str, Any], message: str) -> None:
    config = {"name": "edit", "input": str(tmp_path / "in.parquet"), "output": str(tmp_path / "out"),
              "generators": [{"label": "sd", "plugin": "diffusers-image", "model": "m", "params": params}]}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["validate", str(path)])
    out = " ".join((result.stdout + result.stderr).split())
    assert result.exit_code == 2, out
    assert message in out


def test_the_upscaler_must_be_an_x4_upscaler_within_its_noise_levels(models: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="is a StableDiffusionPipeline; the upscaler must be a "
                                         "StableDiffusionUpscalePipeline"):
        DiffusersImageGenerator(models["tiny-sd"], DiffusersImageParams(upscale={"model": models["tiny-sd"]}))
    with pytest.raises(ValueError, match=r"upscale\.noise_level is 400, above .* max_noise_level 350"):
        make(models, upscale={"noise_level": 400})


def test_tiny_upscaler_is_an_x4_upscaler_folder(models: dict[str, str]) -> None:
    folder = Path(models["tiny-sd-x4-upscaler"])
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionUpscalePipeline"
    assert index["max_noise_level"] == 350
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert (unet["in_channels"], unet["out_channels"]) == (7, 4)  # 4 latent + 3 low-resolution image
    assert json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"] == 0.08333


def test_the_report_gets_the_outpainting_mask_the_call_used(photo: Image.Image, tmp_path: Path) -> None:
    (tmp_path / "photo.png").write_bytes(png(photo))
    params = DiffusersImageParams(outpaint={"left": 8, "right": 8})
    made = DiffusersImageGenerator.derived_media({"image": str(tmp_path / "photo.png"), "outpaint": 16}, params)
    with Image.open(io.BytesIO(made["outpaint mask"])) as img:
        mask = np.asarray(img)
    assert mask.shape == (48 + 32, 64 + 32)  # the row's column wins over the param
    assert (mask[16:64, 16:80] == 0).all() and mask.sum() == 255 * (80 * 96 - 48 * 64)
    no_mask = {"image": png(photo)}, {"image": png(photo), "upscale": True}, {"outpaint": 8}
    assert [DiffusersImageGenerator.derived_media(inputs, params) for inputs in no_mask] == [{}, {}, {}]
    forced = DiffusersImageParams(mode="outpaint", outpaint={"top": 8, "bottom": 8})
    made = DiffusersImageGenerator.derived_media({"image": png(photo)}, forced)
    with Image.open(io.BytesIO(made["outpaint mask"])) as img:
        assert img.size == (64, 64)


def test_outpaint_params_place_the_image() -> None:
    placement = OutpaintParams.model_validate({"aspect_ratio": "1:1"}).place(60, 40)
    assert (placement.left, placement.top, placement.width, placement.height) == (2, 12, 64, 64)

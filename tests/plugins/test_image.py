"""The diffusers-image generator on the tiny offline Stable Diffusion pipeline."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from genflow.api import Generation, GenerationRequest, RowError
from genflow.plugins.image import generator as image_plugin
from genflow.plugins.image.generator import DiffusersImageGenerator, DiffusersImageParams

STEPS = 3


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> str:
    written = image_plugin.init_tiny_models(tmp_path_factory.mktemp("models"))
    return written["tiny-sd"]


@pytest.fixture(scope="module")
def generator(tiny_sd: str) -> DiffusersImageGenerator:
    return DiffusersImageGenerator(tiny_sd, DiffusersImageParams(num_inference_steps=STEPS), "cpu")


def make_generator(tiny_sd: str, **params: object) -> DiffusersImageGenerator:
    return DiffusersImageGenerator(tiny_sd, DiffusersImageParams(num_inference_steps=STEPS, **params), "cpu")


def request(prompt: str = "a red bicycle against a brick wall", seed: int = 0, sample: int = 0,
            **inputs: object) -> GenerationRequest:
    return GenerationRequest(generation_id=f"g-{prompt[:8]}-{seed}", prompt_id=f"p-{prompt[:8]}",
                             prompt=prompt, sample=sample, seed=seed, inputs=dict(inputs))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(result: Generation | RowError) -> np.ndarray:
    assert isinstance(result, Generation), result
    assert result.image is not None and result.text is None
    with Image.open(io.BytesIO(result.image)) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A 64×48 input image: a noisy gradient with a bright square (a few KB as PNG)."""
    y, x = np.mgrid[0:48, 0:64]
    rgb = np.stack([x * 3, y * 4, np.full_like(x, 128)], axis=-1)
    rgb += np.random.default_rng(0).integers(0, 40, rgb.shape)
    rgb[10:30, 20:40] = 250
    rgb = rgb.astype(np.uint8)
    return Image.fromarray(rgb)


@pytest.fixture(scope="module")
def mask() -> Image.Image:
    """White (repaint) on the left half, black (keep) on the right half."""
    m = np.zeros((48, 64), np.uint8)
    m[:, :32] = 255
    return Image.fromarray(m)


def test_tiny_pipeline_is_a_stable_diffusion_folder(tiny_sd: str, generator: DiffusersImageGenerator) -> None:
    index = json.loads((Path(tiny_sd) / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None]
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (Path(tiny_sd) / part).is_dir(), part
    assert generator.describe() == {
        "model": tiny_sd, "pipeline": "StableDiffusionPipeline", "scheduler": "PNDMScheduler",
        "dtype": "float32", "diffusers": generator.describe()["diffusers"]}


def test_text_to_image_writes_pngs_of_the_configured_size(tiny_sd: str) -> None:
    gen = make_generator(tiny_sd, height=48, width=32)
    results = gen.generate([request(seed=1), request(seed=2), request("an astronaut on a horse", seed=1)])
    images = [pixels(r) for r in results]
    assert [img.shape for img in images] == [(48, 32, 3)] * 3
    assert not np.array_equal(images[0], images[1]), "different seeds must give different images"
    assert not np.array_equal(images[0], images[2]), "different prompts must give different images"


def test_default_size_is_the_models_native_size(generator: DiffusersImageGenerator) -> None:
    assert pixels(generator.generate([request()])[0]).shape == (64, 64, 3)


def test_same_seeds_give_byte_identical_pngs(tiny_sd: str, generator: DiffusersImageGenerator) -> None:
    batch = [request(seed=7), request("a bowl of fruit", seed=8)]
    first = generator.generate(batch)
    again = make_generator(tiny_sd).generate(batch)  # a fresh worker, as on a rerun
    assert [r.image for r in first] == [r.image for r in again]


def test_batched_equals_one_at_a_time(generator: DiffusersImageGenerator) -> None:
    """Each image's noise comes from its own seed, so batching does not change it.

    Only float rounding differs between batch shapes (BLAS picks other kernels):
    at most a level or two of 255 on a few pixels.
    """
    batch = [request("a red bicycle", seed=11), request("the sea at night, oil painting", seed=12),
             request("a red bicycle", seed=13), request("x", seed=14)]
    batched = [pixels(r) for r in generator.generate(batch)]
    single = [pixels(generator.generate([r])[0]) for r in batch]
    for b, s in zip(batched, single, strict=True):
        diff = np.abs(b - s)
        assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())
    assert not np.array_equal(batched[0], batched[2]), "same prompt, other seed: another image"


@pytest.mark.parametrize("form", ["bytes", "path", "datasets-struct"])
def test_image_to_image_reads_bytes_paths_and_datasets_structs(
        generator: DiffusersImageGenerator, photo: Image.Image, tmp_path: Path, form: str) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(png(photo))
    value = {"bytes": png(photo), "path": str(path), "datasets-struct": {"bytes": None, "path": str(path)}}
    as_bytes = generator.generate([request(seed=3, image=png(photo))])[0]
    result = generator.generate([request(seed=3, image=value[form])])[0]
    assert pixels(result).shape == (48, 64, 3)  # the input's size
    assert result.image == as_bytes.image
    text_only = generator.generate([request(seed=3)])[0]
    assert pixels(text_only).shape == (64, 64, 3)


def test_image_to_image_resizes_to_the_configured_size(tiny_sd: str, photo: Image.Image) -> None:
    gen = make_generator(tiny_sd, height=32, width=32, strength=0.5)
    assert pixels(gen.generate([request(image=png(photo))])[0]).shape == (32, 32, 3)


@pytest.mark.parametrize("form", ["bytes", "path"])
def test_inpainting_repaints_only_the_white_part_of_the_mask(
        generator: DiffusersImageGenerator, photo: Image.Image, mask: Image.Image,
        tmp_path: Path, form: str) -> None:
    (tmp_path / "photo.png").write_bytes(png(photo))
    (tmp_path / "mask.png").write_bytes(png(mask))
    inputs = ({"image": png(photo), "mask": png(mask)} if form == "bytes"
              else {"image": str(tmp_path / "photo.png"), "mask": str(tmp_path / "mask.png")})
    out = pixels(generator.generate([request(seed=5, **inputs)])[0])
    original = np.asarray(photo, dtype=np.int16)
    assert out.shape == original.shape
    assert np.array_equal(out[:, 32:], original[:, 32:]), "black mask area must be kept exactly"
    assert np.abs(out[:, :32] - original[:, :32]).mean() > 10, "white mask area must be repainted"


def test_inpainting_without_keep_unmasked_returns_the_raw_pipeline_output(
        tiny_sd: str, photo: Image.Image, mask: Image.Image) -> None:
    gen = make_generator(tiny_sd, keep_unmasked=False)
    out = pixels(gen.generate([request(seed=5, image=png(photo), mask=png(mask))])[0])
    assert not np.array_equal(out[:, 32:], np.asarray(photo, dtype=np.int16)[:, 32:])


def test_mixed_batch_runs_each_mode_and_keeps_request_order(
        generator: DiffusersImageGenerator, photo: Image.Image, mask: Image.Image) -> None:
    batch = [request(seed=1), request(seed=2, image=png(photo), mask=png(mask)),
             request(seed=3, image=png(photo)), request(seed=4)]
    mixed = generator.generate(batch)
    assert [pixels(r).shape for r in mixed] == [(64, 64, 3), (48, 64, 3), (48, 64, 3), (64, 64, 3)]
    for result, alone in zip(mixed, batch, strict=True):
        assert np.abs(pixels(result) - pixels(generator.generate([alone])[0])).max() <= 2


def test_bad_rows_fail_alone_with_clear_messages(
        generator: DiffusersImageGenerator, photo: Image.Image, mask: Image.Image, tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere.png")
    truncated = png(photo)[:1000]
    batch = [
        request(seed=1),
        request(seed=2, image=png(photo), mask=png(mask.resize((32, 32)))),
        request(seed=3, image=missing),
        request(seed=4, image=b"this is not an image"),
        request(seed=5, image=truncated),
        request(seed=6, mask=png(mask)),
        request(seed=7, image=png(photo)),
    ]
    results = generator.generate(batch)
    assert len(results) == len(batch)
    assert pixels(results[0]).shape == (64, 64, 3)
    assert pixels(results[6]).shape == (48, 64, 3)
    errors = [str(r) for r in results[1:6]]
    assert all(isinstance(r, RowError) for r in results[1:6]), results
    assert errors[0] == ("mask is 32x32 but its image is 64x48; give a mask of the image's size "
                         "(white = repaint, black = keep)")
    assert errors[1] == f"image file not found: {missing}"
    assert errors[2] == "image (20 bytes) is not an image PIL can read"
    assert errors[3].startswith("image (1000 bytes) is a damaged image: "), errors[3]
    assert errors[4] == "inpainting needs an `image` and a `mask`, but the row has no image"


def test_forced_modes(tiny_sd: str, photo: Image.Image) -> None:
    text_only = make_generator(tiny_sd, mode="text2img")
    with_image = text_only.generate([request(seed=9, image=png(photo)), request(seed=9)])
    assert with_image[0].image == with_image[1].image
    inpaint = make_generator(tiny_sd, mode="inpaint")
    [err] = inpaint.generate([request(image=png(photo))])
    assert isinstance(err, RowError)
    assert str(err) == "inpainting needs a `mask` (white = repaint, black = keep), but the row has none"
    [err] = make_generator(tiny_sd, mode="img2img").generate([request()])
    assert str(err) == "img2img needs an `image`, but the row has no image"


def test_scheduler_and_negative_prompt_change_the_image(
        tiny_sd: str, generator: DiffusersImageGenerator) -> None:
    base = pixels(generator.generate([request(seed=21)])[0])
    ddim = make_generator(tiny_sd, scheduler="DDIMScheduler")
    assert ddim.describe()["scheduler"] == "DDIMScheduler"
    assert not np.array_equal(pixels(ddim.generate([request(seed=21)])[0]), base)
    negative = make_generator(tiny_sd, negative_prompt="blurry, low quality")
    assert not np.array_equal(pixels(negative.generate([request(seed=21)])[0]), base)


@pytest.mark.parametrize(("params", "message"), [
    ({"scheduler": "FastScheduler"}, "unknown diffusers scheduler 'FastScheduler'; choose one of: "),
    ({"height": 50}, "Input should be a multiple of 8"),
    ({"num_inference_steps": 2, "strength": 0.3}, "num_inference_steps × strength must be at least 1"),
    ({"mode": "sketch"}, "Input should be 'auto', 'text2img', 'img2img', 'inpaint', 'outpaint' or 'upscale'"),
    ({"steps": 4}, "Extra inputs are not permitted"),
])
def test_params_are_checked_before_any_work(params: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DiffusersImageParams.model_validate(params)


def test_plugin_is_registered_through_its_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    from genflow.registry import Registry, build_plugin_manager

    monkeypatch.setenv("GENFLOW_PLUGINS", "image")
    info = Registry(*build_plugin_manager()).get("generator", "diffusers-image")
    assert info.factory is DiffusersImageGenerator
    assert (info.modality, info.source) == ("image", "built-in")

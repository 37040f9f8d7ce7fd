"""``diffusers-image``: text-to-image, image-to-image, inpainting, outpainting and upscaling.

Each worker loads one text-to-image pipeline; the image-to-image and inpainting
pipelines are built from its components (``from_pipe``), so the weights sit in
memory once whatever mix of modes a dataset has. A row's mode follows its
columns: no ``image`` → text-to-image; ``image`` → image-to-image; ``image`` and
``mask`` → inpainting (white = repaint, black = keep); ``image`` and ``outpaint``
→ outpainting (:mod:`genflow.plugins.image.outpaint`); ``image`` and ``upscale:
true`` → upscaling. The ``mode`` param forces one. An x4 upscaler
(:mod:`genflow.plugins.image.upscale`, the ``upscale`` param) upscales a row's image
or, as a second stage, what the other modes made.

Every image has its own ``torch.Generator`` seeded from the request, so a prompt's
candidates differ, reruns give byte-identical PNGs, and an image comes out the
same (to float rounding) whichever batch it was generated in.

Besides the generator this module writes a tiny Stable Diffusion pipeline and a tiny x4
upscaler for offline use (``genflow models init-tiny DIR`` → ``DIR/tiny-sd``,
``DIR/tiny-sd-x4-upscaler``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from genflow import hookimpl
from genflow.api import Generation, GenerationRequest, Generator, PluginParams, RowError
from genflow.data.storage import read_bytes
from genflow.hookspecs import Register
from genflow.plugins.image import outpaint
from genflow.plugins.image.outpaint import OutpaintParams
from genflow.plugins.image.upscale import TINY_UPSCALER, UpscaleParams, Upscaler, tiny_unet, write_tiny_upscaler
from genflow.plugins.shared.hf import can_write_tiny_model, prepare_torch

if TYPE_CHECKING:
    from diffusers import SchedulerMixin
    from PIL import Image

TINY_SD = "tiny-sd"

Mode = Literal["text2img", "img2img", "inpaint", "outpaint", "upscale"]
PIPELINE_OF: dict[Mode, Literal["text2img", "img2img", "inpaint"]] = {
    "text2img": "text2img", "img2img": "img2img", "inpaint": "inpaint", "outpaint": "inpaint"}
"""The Stable Diffusion pipeline each mode runs (outpainting is inpainting a border; upscaling runs
the upscaler alone)."""


class DiffusersImageParams(PluginParams):
    num_inference_steps: int = Field(30, ge=1, description="Denoising steps per image.")
    guidance_scale: float = Field(7.5, ge=0.0, description="Classifier-free guidance; values above 1 enable it "
                                  "(and double the UNet batch).")
    height: int | None = Field(None, ge=8, multiple_of=8, description="Output height in pixels; null = the "
                               "model's native size for text-to-image, the input image's height (rounded "
                               "down to a multiple of 8) otherwise. Outpainting and upscaling ignore it: "
                               "their sizes follow the image.")
    width: int | None = Field(None, ge=8, multiple_of=8, description="Output width in pixels; null as for height.")
    negative_prompt: str | None = Field(None, description="What the images should not show.")
    strength: float | None = Field(None, gt=0.0, le=1.0, description="How far to move from the input image "
                                   "(1 ignores it); null = diffusers' own, 0.8 for image-to-image and 1.0 for "
                                   "inpainting.")
    scheduler: str | None = Field(None, description="A diffusers scheduler class, e.g. DDIMScheduler, built "
                                  "from the model's scheduler config; null = the model's own.")
    mode: Literal["auto", "text2img", "img2img", "inpaint", "outpaint", "upscale"] = Field(
        "auto", description="auto picks per row from its `image`, `mask`, `outpaint` and `upscale` columns; "
        "a forced mode ignores the columns it does not use and fails rows that lack one it needs.")
    keep_unmasked: bool = Field(True, description="Inpainting and outpainting: paste the input pixels back "
                                "outside the mask, so only the masked area (the new border) changes (the "
                                "VAE round trip otherwise alters the whole image slightly).")
    outpaint: OutpaintParams | None = Field(None, description="Outpainting: how far to extend each image — "
                                            "borders {left, right, top, bottom} (or one number for all four), "
                                            "a target {width, height} or an {aspect_ratio: 'W:H'}. A row's "
                                            "`outpaint` column, in the same form, overrides it.")
    upscale: UpscaleParams | None = Field(None, description="An x4 upscaler {model, num_inference_steps, "
                                          "guidance_scale, noise_level, after}: runs on rows in mode "
                                          "upscale, and after the modes listed in `after` as a second stage.")
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(None, description="Weights' dtype; null = "
                                                                     "float16 on CUDA, float32 elsewhere.")

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, name: str | None) -> str | None:
        if name is not None:
            scheduler_class(name)
        return name

    @model_validator(mode="after")
    def _at_least_one_step(self) -> DiffusersImageParams:
        if self.strength is not None and int(self.num_inference_steps * self.strength) < 1:
            raise ValueError(f"num_inference_steps × strength must be at least 1 (image-to-image runs "
                             f"that many steps), got {self.num_inference_steps} × {self.strength}")
        return self

    @model_validator(mode="after")
    def _mode_has_what_it_needs(self) -> DiffusersImageParams:
        if self.mode == "upscale" and self.upscale is None:
            raise ValueError("mode: upscale needs an upscaler: set upscale: {model: ...} (an x4 "
                             "StableDiffusionUpscalePipeline)")
        sized = [k for k in ("height", "width") if getattr(self, k) is not None]
        if self.mode in ("outpaint", "upscale") and sized:
            where = ("the image plus the `outpaint` borders (or its target width/height)" if self.mode == "outpaint"
                     else "the input image times the upscaler's factor")
            raise ValueError(f"{'/'.join(sized)} do not apply to mode: {self.mode}: its output size is {where}")
        return self


class DiffusersImageGenerator(Generator):
    """Stable Diffusion-style pipelines: text-to-image, image-to-image, inpainting, outpainting,
    and an x4 upscaler on its own or as a second stage."""

    Params: ClassVar[type[PluginParams]] = DiffusersImageParams
    modality: ClassVar[str] = "image"
    description: ClassVar[str] = ("diffusers text-to-image, image-to-image, inpainting, outpainting and x4 "
                                  "upscaling; one seed per image")
    input_columns: ClassVar[tuple[str, ...]] = ("image", "mask", "outpaint", "upscale")
    path_columns: ClassVar[tuple[str, ...]] = ("image", "mask")
    media_columns: ClassVar[tuple[str, ...]] = ("image", "mask")
    """Shown as thumbnails beside the prompt in report.html."""
    requires: ClassVar[tuple[str, ...]] = ("torch", "diffusers", "transformers", "pillow")
    extra: ClassVar[str | None] = "image"
    default_model: ClassVar[str | None] = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    batch_size: ClassVar[int] = 8
    params: DiffusersImageParams

    def __init__(self, model: str | None, params: DiffusersImageParams, device: str = "cpu") -> None:
        super().__init__(model, params, device)
        import torch
        from diffusers.utils import logging as diffusers_logging

        self.torch_device = prepare_torch(device)
        dtype_name = params.dtype or ("float16" if self.torch_device.type == "cuda" else "float32")
        self.dtype = getattr(torch, dtype_name)
        diffusers_logging.disable_progress_bar()  # this process is the plugin's worker: no loading bars
        # diffusers pipelines are duck-typed (their __call__ differs per class): Any.
        self._pipelines: dict[str, Any] = {}
        # Loaded now, so a model that cannot load fails the stage at once; a generator that only
        # upscales loads no Stable Diffusion pipeline.
        self.upscaler = Upscaler(params.upscale, self.torch_device, self.dtype) if params.upscale else None
        if params.mode != "upscale":
            self.pipeline("text2img")

    def describe(self) -> dict[str, Any]:
        import diffusers

        facts: dict[str, Any] = {"model": self.model_name}
        if "text2img" in self._pipelines:
            pipe = self._pipelines["text2img"]
            facts.update(pipeline=type(pipe).__name__, scheduler=type(pipe.scheduler).__name__)
        facts.update(dtype=str(self.dtype).removeprefix("torch."), diffusers=diffusers.__version__)
        if self.upscaler is not None:
            facts["upscaler"] = self.upscaler.describe()
        return facts

    def pipeline(self, mode: Mode) -> Any:
        """The Stable Diffusion pipeline ``mode`` runs; the image-to-image and inpainting ones
        share the text-to-image pipeline's components."""
        kind = PIPELINE_OF[mode]
        if "text2img" not in self._pipelines:
            from diffusers import AutoPipelineForText2Image

            # Generated data is filtered by the job's scorers; a safety checker would
            # silently black out images and costs a second model.
            pipe = AutoPipelineForText2Image.from_pretrained(
                self.model_name, dtype=self.dtype, safety_checker=None, requires_safety_checker=False)
            if self.params.scheduler:
                pipe.scheduler = scheduler_class(self.params.scheduler).from_config(pipe.scheduler.config)
            pipe.to(self.torch_device)
            pipe.set_progress_bar_config(disable=True)
            self._pipelines["text2img"] = pipe
        if kind not in self._pipelines:
            from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

            auto = AutoPipelineForImage2Image if kind == "img2img" else AutoPipelineForInpainting
            pipe = auto.from_pipe(self._pipelines["text2img"])
            pipe.set_progress_bar_config(disable=True)
            self._pipelines[kind] = pipe
        return self._pipelines[kind]

    def generate(self, requests: list[GenerationRequest]) -> list[Generation | RowError]:
        results: dict[int, Generation | RowError] = {}
        groups: dict[tuple[Mode, int | None, int | None], list[_Task]] = {}
        for index, request in enumerate(requests):
            try:
                task = self._task(index, request)
            except RowError as err:
                results[index] = err
                continue
            groups.setdefault(task.group, []).append(task)
        for tasks in groups.values():
            for task, image in zip(tasks, self._run(tasks), strict=True):
                results[task.index] = Generation(image=_png(image))
        return [results[i] for i in range(len(requests))]

    def mode_of(self, request: GenerationRequest) -> Mode:
        return _mode_of(self.params, request.inputs)

    @classmethod
    def derived_media(cls, inputs: dict[str, Any], params: PluginParams) -> dict[str, bytes]:
        """A row's outpainting mask (white = the border the pipeline paints), made as for the call."""
        assert isinstance(params, DiffusersImageParams)
        how = _outpaint_of(params, inputs) if _mode_of(params, inputs) == "outpaint" else None
        if how is None or not _present(inputs.get("image")):
            return {}
        image = load_image(inputs["image"], "image", "RGB")
        return {"outpaint mask": _png(how.place(image.width, image.height).mask(image))}

    def batch_keys(self, requests: list[GenerationRequest]) -> list[Any]:
        """Requests of one mode share calls: each mode is a pipeline call of its own."""
        return [(self.mode_of(r), len(r.prompt)) for r in requests]

    def _task(self, index: int, request: GenerationRequest) -> _Task:
        """Resolve a request's mode, input image and mask, and output size."""
        params = self.params
        has_image = _present(request.inputs.get("image"))
        has_mask = _present(request.inputs.get("mask"))
        mode = self.mode_of(request)
        task = _Task(index, request.prompt, request.seed, mode)
        if mode == "text2img":
            task.height, task.width = params.height, params.width
            return task
        if not has_image:
            what = {"inpaint": "inpainting needs an `image` and a `mask`" if has_mask else "inpaint needs an `image`",
                    "outpaint": "outpainting needs an `image` to extend",
                    "upscale": "upscaling needs an `image`"}.get(mode, f"{mode} needs an `image`")
            raise RowError(f"{what}, but the row has no image")
        image = load_image(request.inputs["image"], "image", "RGB")
        if mode == "outpaint":
            return self._outpaint_task(task, request, image)
        if mode == "upscale":
            return self._upscale_task(task, image)
        height = params.height or image.height // 8 * 8
        width = params.width or image.width // 8 * 8
        if height < 8 or width < 8:
            raise RowError(f"input image is {image.width}x{image.height}; it must be at least 8x8 pixels")
        task.height, task.width = height, width
        task.image = _resized(image, width, height)
        if mode == "inpaint":
            if not has_mask:
                raise RowError("inpainting needs a `mask` (white = repaint, black = keep), "
                               "but the row has none")
            mask = load_image(request.inputs["mask"], "mask", "L")
            if mask.size != image.size:
                raise RowError(f"mask is {mask.width}x{mask.height} but its image is "
                               f"{image.width}x{image.height}; give a mask of the image's size "
                               "(white = repaint, black = keep)")
            task.mask = _resized(mask, width, height)
        return task

    def _outpaint_task(self, task: _Task, request: GenerationRequest, image: Image.Image) -> _Task:
        """The image on its larger canvas and the mask of the new border (the row's ``outpaint``
        column, else the ``outpaint`` param)."""
        how = _outpaint_of(self.params, request.inputs)
        if how is None:
            raise RowError("outpainting needs borders, a target size or an aspect ratio: set the "
                           "`outpaint` param or the row's `outpaint` column")
        placement = how.place(image.width, image.height)
        task.height, task.width = placement.height, placement.width
        task.image, task.mask = placement.canvas(image), placement.mask(image)
        task.source, task.offset = image, (placement.left, placement.top)
        return task

    def _upscale_task(self, task: _Task, image: Image.Image) -> _Task:
        """The image, its sides cut down to multiples of the upscaler's factor as diffusers does."""
        if self.upscaler is None:
            raise RowError("the row asks for upscaling (its `upscale` column), but the generator has no "
                           "upscaler: set its upscale: {model: ...} param")
        factor = self.upscaler.factor
        width, height = image.width // factor * factor, image.height // factor * factor
        if width < factor or height < factor:
            raise RowError(f"input image is {image.width}x{image.height}; upscaling needs at least "
                           f"{factor}x{factor} pixels")
        task.height, task.width = height, width
        task.image = _resized(image, width, height)
        return task

    def _run(self, tasks: list[_Task]) -> list[Image.Image]:
        """One pipeline call for requests of one mode and size, one generator per image; then
        the upscaler, for mode upscale or as the second stage of the modes it comes after."""
        mode = tasks[0].mode
        upscaler = self.upscaler
        if mode == "upscale":
            assert upscaler is not None  # _upscale_task refuses rows without one
            images = [t.image for t in tasks if t.image is not None]
        else:
            images = self._diffuse(tasks)
            if upscaler is None or mode not in upscaler.params.after:
                return images
        return upscaler([*images], [t.prompt for t in tasks], [t.seed for t in tasks],
                        self.params.negative_prompt)

    def _diffuse(self, tasks: list[_Task]) -> list[Image.Image]:
        """The Stable Diffusion pipeline call of a group of same-mode, same-size requests."""
        import torch
        from PIL import Image

        params = self.params
        mode, height, width = tasks[0].group
        kwargs: dict[str, Any] = {
            "prompt": [t.prompt for t in tasks],
            "num_inference_steps": params.num_inference_steps,
            "guidance_scale": params.guidance_scale,
            # CPU generators give the same noise on every device.
            "generator": [torch.Generator("cpu").manual_seed(t.seed) for t in tasks],
            "output_type": "pil",
        }
        if params.negative_prompt is not None:
            kwargs["negative_prompt"] = [params.negative_prompt] * len(tasks)
        if mode != "img2img":  # image-to-image takes its size from the image
            kwargs.update(height=height, width=width)
        if mode != "text2img":
            kwargs["image"] = [t.image for t in tasks]
            if params.strength is not None:
                kwargs["strength"] = params.strength
        if mode in ("inpaint", "outpaint"):
            kwargs["mask_image"] = [t.mask for t in tasks]
        images: list[Image.Image] = self.pipeline(mode)(**kwargs).images
        if mode == "inpaint" and params.keep_unmasked:
            images = [Image.composite(out, t.image, t.mask)  # type: ignore[arg-type]
                      for out, t in zip(images, tasks, strict=True)]
        if mode == "outpaint" and params.keep_unmasked:
            for out, t in zip(images, tasks, strict=True):
                out.paste(t.source, t.offset)  # type: ignore[arg-type]
        return images


def scheduler_class(name: str) -> type[SchedulerMixin]:
    """The diffusers scheduler class called ``name``, or a ValueError listing the choices."""
    import diffusers
    from diffusers import SchedulerMixin

    found = getattr(diffusers, name, None)
    if isinstance(found, type) and issubclass(found, SchedulerMixin):
        return found
    known = sorted(n for n in dir(diffusers.schedulers) if n.endswith("Scheduler"))
    raise ValueError(f"unknown diffusers scheduler {name!r}; choose one of: {', '.join(known)}")


@dataclass
class _Task:
    """A request resolved to what its pipeline call needs."""

    index: int
    prompt: str
    seed: int
    mode: Mode
    image: Image.Image | None = None
    mask: Image.Image | None = None
    height: int | None = None
    width: int | None = None
    source: Image.Image | None = None
    """Outpainting: the row's image, pasted back at ``offset`` on the result."""
    offset: tuple[int, int] = (0, 0)

    @property
    def group(self) -> tuple[Mode, int | None, int | None]:
        """Requests with equal groups run in one pipeline call."""
        return self.mode, self.height, self.width


def _mode_of(params: DiffusersImageParams, inputs: dict[str, Any]) -> Mode:
    """The mode a row runs in: the forced one, else what its columns hold."""
    if params.mode != "auto":
        return params.mode
    if _present(inputs.get("mask")):
        return "inpaint"
    if outpaint.present(inputs.get("outpaint")):
        return "outpaint"
    if inputs.get("upscale") is True:
        return "upscale"
    return "img2img" if _present(inputs.get("image")) else "text2img"


def _outpaint_of(params: DiffusersImageParams, inputs: dict[str, Any]) -> OutpaintParams | None:
    """How far to extend a row's image: its ``outpaint`` column, else the param."""
    cell = inputs.get("outpaint")
    return outpaint.row_outpaint(cell) if outpaint.present(cell) else params.outpaint


def _present(value: Any) -> bool:
    """Whether an ``image``/``mask`` cell holds something (datasets use None or "" for "no image")."""
    if isinstance(value, dict):
        return _present(value.get("bytes")) or _present(value.get("path"))
    return value is not None and value != "" and value != b""


def load_image(value: Any, column: str, convert: str) -> Image.Image:
    """Decode an input cell: PNG/JPEG/... bytes, a path or URI (``s3://`` too), or a
    Hugging Face ``datasets`` image struct ``{"bytes": ..., "path": ...}``.

    Problems raise :class:`RowError` naming the column, so only that row fails.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        source = value
        try:
            data = read_bytes(value)
        except FileNotFoundError:
            raise RowError(f"{column} file not found: {value}") from None
        except OSError as exc:
            raise RowError(f"cannot read {column} file {value}: {exc}") from None
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        source = f"({len(data)} bytes)"
    else:
        raise RowError(f"{column} must be image bytes or a path/URI, got {type(value).__name__}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            # Honour the camera's orientation tag, as image viewers do.
            return ImageOps.exif_transpose(img).convert(convert)
    except UnidentifiedImageError:
        raise RowError(f"{column} {source} is not an image PIL can read") from None
    except OSError as exc:  # truncated or corrupt file of a known format
        raise RowError(f"{column} {source} is a damaged image: {exc}") from None


def _resized(image: Image.Image, width: int, height: int) -> Image.Image:
    from PIL import Image

    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_tiny_sd(path: Path, seed: int = 0) -> Path:
    """Save a tiny random Stable Diffusion pipeline (64×64 images) to ``path``.

    The same parts as Stable Diffusion 1.x — UNet, VAE, CLIP text encoder and
    tokenizer, its PNDM scheduler config — at a size that makes an image in a
    fraction of a second on a CPU. The images are noise-like; the code paths are real.
    """
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from genflow.plugins.image.clip import tiny_clip_text_config, tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = tiny_unet(in_channels=4)
        vae = AutoencoderKL(  # two blocks: latents are half the image size
            sample_size=64, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_clip_text_config(tokenizer)))
    scheduler = PNDMScheduler(  # Stable Diffusion 1.x's scheduler config
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path)  # type: ignore[attr-defined]
    return path


@hookimpl
def register_generators(register: Register) -> None:
    register("diffusers-image", DiffusersImageGenerator)


@hookimpl
def init_tiny_models(directory: Path) -> dict[str, str]:
    if not can_write_tiny_model(TINY_SD, DiffusersImageGenerator):
        return {}
    return {TINY_SD: str(write_tiny_sd(Path(directory) / TINY_SD)),
            TINY_UPSCALER: str(write_tiny_upscaler(Path(directory) / TINY_UPSCALER))}

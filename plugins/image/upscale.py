"""Upscaling with diffusers' x4 upscaler (``StableDiffusionUpscalePipeline``).

The upscaler is a diffusion model of its own: its UNet denoises latents the size of the
low-resolution image, conditioned on that image (noised to ``noise_level``) and the prompt,
and its VAE decodes them at four times the size. The generator runs it on a row's image
(``mode: upscale``) or after its own pipeline (a second stage, DALL-E's last step), and the
upscaled image is what is written and scored.

Besides the upscaler this module writes a tiny one for offline use
(``genflow models init-tiny DIR`` → ``DIR/tiny-sd-x4-upscaler``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from genflow.api import PluginParams

if TYPE_CHECKING:
    import torch
    from PIL import Image

TINY_UPSCALER = "tiny-sd-x4-upscaler"
UPSCALER_CLASS = "StableDiffusionUpscalePipeline"


class UpscaleParams(PluginParams):
    model: str = Field(description="A diffusers x4 upscaler (StableDiffusionUpscalePipeline), e.g. "
                       "stabilityai/stable-diffusion-x4-upscaler, or a folder saved from one.")
    num_inference_steps: int = Field(25, ge=1, description="The upscaler's denoising steps per image.")
    guidance_scale: float = Field(9.0, ge=0.0, description="The upscaler's classifier-free guidance "
                                  "(above 1 enables it).")
    noise_level: int = Field(20, ge=0, description="Noise added to the low-resolution image: more "
                             "invents more detail and keeps less of it (at most the model's "
                             "max_noise_level, 350 for the x4 upscaler).")
    after: list[Literal["text2img", "img2img", "inpaint", "outpaint"]] = Field(
        ["text2img"], description="Modes whose images are upscaled as a second stage (the upscaled "
        "image is the one written and scored); [] = only rows in mode upscale.")


class Upscaler:
    """A loaded x4 upscaler and the params it runs with."""

    def __init__(self, params: UpscaleParams, torch_device: torch.device, dtype: torch.dtype) -> None:
        from diffusers import DiffusionPipeline

        self.params = params
        pipe = DiffusionPipeline.from_pretrained(params.model, dtype=dtype, safety_checker=None)
        if type(pipe).__name__ != UPSCALER_CLASS:
            raise ValueError(f"upscale.model {params.model} is a {type(pipe).__name__}; the upscaler must "
                             f"be a {UPSCALER_CLASS} (the x4 upscaler)")
        if params.noise_level > pipe.config.max_noise_level:
            raise ValueError(f"upscale.noise_level is {params.noise_level}, above {params.model}'s "
                             f"max_noise_level {pipe.config.max_noise_level}")
        pipe.to(torch_device)
        pipe.set_progress_bar_config(disable=True)
        self.pipe: Any = pipe  # duck-typed like every diffusers pipeline

    @property
    def factor(self) -> int:
        """How many times larger each side comes out (the VAE's upsampling: 4)."""
        return int(self.pipe.vae_scale_factor)

    def describe(self) -> dict[str, Any]:
        return {"model": self.params.model, "pipeline": type(self.pipe).__name__,
                "scheduler": type(self.pipe.scheduler).__name__, "factor": self.factor}

    def __call__(self, images: list[Image.Image], prompts: list[str], seeds: list[int],
                 negative_prompt: str | None) -> list[Image.Image]:
        """Upscale same-sized images (one call), each with its own seeded generator."""
        import torch

        params = self.params
        kwargs: dict[str, Any] = {
            "prompt": prompts, "image": images, "num_inference_steps": params.num_inference_steps,
            "guidance_scale": params.guidance_scale, "noise_level": params.noise_level,
            "generator": [torch.Generator("cpu").manual_seed(s) for s in seeds], "output_type": "pil",
        }
        if negative_prompt is not None:
            kwargs["negative_prompt"] = [negative_prompt] * len(prompts)
        upscaled: list[Image.Image] = self.pipe(**kwargs).images
        return upscaled


def tiny_unet(in_channels: int, **extra: Any) -> Any:
    """The tiny Stable Diffusion UNet both offline pipelines use (``diffusers-image``'s and the
    upscaler's): two blocks, cross-attention sized for the tiny CLIP text encoder. ``extra`` adds
    the arguments one pipeline needs beyond the other's."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=32, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, **extra,
    )


def write_tiny_upscaler(path: Path, seed: int = 0) -> Path:
    """Save a tiny random x4 upscaler to ``path``: a 32 × 32 image becomes 128 × 128.

    The parts of stabilityai/stable-diffusion-x4-upscaler — a UNet taking the 4 latent
    channels and the 3 of the low-resolution image with a noise-level class embedding, a
    3-block VAE (×4) with its 0.08333 scaling factor, a CLIP text encoder, DDIM with
    v-prediction and a DDPM low-resolution scheduler — at a size that runs in a fraction
    of a second on a CPU.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from genflow.plugins.image.clip import tiny_clip_text_config, tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        # 4 latent channels + the 3 of the low-resolution image; the class embedding takes the noise
        # level, as the x4 upscaler's UNet does
        unet = tiny_unet(in_channels=7, num_class_embeds=1000)
        vae = AutoencoderKL(  # three blocks: the decoder doubles the size twice
            sample_size=128, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
            block_out_channels=(16, 32, 32), norm_num_groups=8, scaling_factor=0.08333,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_clip_text_config(tokenizer)))
    betas: dict[str, Any] = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "scaled_linear"}
    pipe = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        low_res_scheduler=DDPMScheduler(**betas),
        scheduler=DDIMScheduler(**betas, clip_sample=False, prediction_type="v_prediction",
                                set_alpha_to_one=False, steps_offset=1),
        max_noise_level=350,
    )
    pipe.save_pretrained(path)  # type: ignore[attr-defined]
    return path

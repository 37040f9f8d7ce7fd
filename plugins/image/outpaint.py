"""Outpainting: where a row's image sits on its larger canvas, and the mask of the new border.

A row's image is extended by borders (``left``/``right``/``top``/``bottom`` pixels), to a
target size (``width``/``height``, the image centred) or to an aspect ratio (the shorter side
grown, the image centred). The canvas holds the image with its edge pixels stretched into the
border (context for a pipeline that reads the masked area, and for ``strength`` below 1); the
mask is white over the border (repaint) and black over the image (keep). The generator fills
the border with its inpainting pipeline and pastes the image back, so its pixels are kept exactly.

Sizes are multiples of :data:`MULTIPLE` (Stable Diffusion's VAE halves an image three times):
what the params alone decide is checked when the job is validated, what depends on a row's
image is an ``errors/`` row naming the sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import Field, ValidationError, model_validator

from genflow.api import PluginParams, RowError

if TYPE_CHECKING:
    from PIL import Image

MULTIPLE = 8
"""What every side of an image a Stable Diffusion pipeline makes must be a multiple of."""
SIDES = ("left", "right", "top", "bottom")


class OutpaintParams(PluginParams):
    """How far to extend an image: borders, a target size or an aspect ratio (one of the three).

    A bare number is the same border on every side (``outpaint: 16``)."""

    left: int = Field(0, ge=0, description="Pixels added on the left.")
    right: int = Field(0, ge=0, description="Pixels added on the right.")
    top: int = Field(0, ge=0, description="Pixels added on top.")
    bottom: int = Field(0, ge=0, description="Pixels added at the bottom.")
    width: int | None = Field(None, ge=MULTIPLE, multiple_of=MULTIPLE, description="Target width in "
                              "pixels, the image centred (at least the image's width); null = the image's.")
    height: int | None = Field(None, ge=MULTIPLE, multiple_of=MULTIPLE, description="Target height, "
                               "as width.")
    aspect_ratio: str | None = Field(None, pattern=r"^\s*\d+(\.\d+)?\s*:\s*\d+(\.\d+)?\s*$",
                                     description="Target shape as 'W:H' (e.g. '16:9'): the shorter "
                                     "side grows to reach it, the image centred.")

    @model_validator(mode="before")
    @classmethod
    def _same_border_everywhere(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return dict.fromkeys(SIDES, value)
        if isinstance(value, dict):  # a Parquet struct cell has every field, unset ones null
            return {k: v for k, v in value.items() if v is not None}
        return value

    @model_validator(mode="after")
    def _one_way_that_fits_the_model(self) -> OutpaintParams:
        ways = [name for name, given in (("borders (left/right/top/bottom)", any(self.borders)),
                                         ("a target size (width/height)", self.width or self.height),
                                         ("an aspect_ratio", self.aspect_ratio)) if given]
        if not ways:
            raise ValueError("outpaint adds nothing: give borders (left/right/top/bottom), a target "
                             "size (width/height) or an aspect_ratio")
        if len(ways) > 1:
            raise ValueError(f"outpaint takes one of borders, a target size or an aspect_ratio; got "
                             f"{' and '.join(ways)}")
        for a, b in (("left", "right"), ("top", "bottom")):
            total = getattr(self, a) + getattr(self, b)
            if total % MULTIPLE:
                raise ValueError(f"outpaint {a} + {b} must be a multiple of {MULTIPLE} (the model makes "
                                 f"images whose sides are multiples of {MULTIPLE}), got "
                                 f"{getattr(self, a)} + {getattr(self, b)} = {total}")
        if self.aspect_ratio and min(self.ratio_parts) <= 0:
            raise ValueError(f"outpaint aspect_ratio must be two positive numbers 'W:H', got {self.aspect_ratio!r}")
        return self

    @property
    def borders(self) -> tuple[int, int, int, int]:
        return self.left, self.right, self.top, self.bottom

    @property
    def ratio_parts(self) -> tuple[float, float]:
        w, h = (self.aspect_ratio or "1:1").split(":")
        return float(w), float(h)

    def place(self, width: int, height: int) -> Placement:
        """Where an image of ``width`` × ``height`` goes on its canvas; a RowError when the
        canvas cannot be made (a size that is not a multiple of 8, a target smaller than the image)."""
        size = f"{width}x{height}"
        if any(self.borders):
            left, right, top, bottom = self.borders
            placement = Placement(left, top, width + left + right, height + top + bottom)
            how = f"adding left {left}, right {right}, top {top}, bottom {bottom}"
        elif self.aspect_ratio:
            placement = _centred(width, height, *_canvas_for_ratio(width, height, *self.ratio_parts))
            how = f"reaching aspect ratio {self.aspect_ratio}"
        else:
            target_w, target_h = self.width or width, self.height or height
            if target_w < width or target_h < height:
                raise RowError(f"outpaint target {target_w}x{target_h} is smaller than the image ({size}); "
                               "outpainting only extends an image")
            placement = _centred(width, height, target_w, target_h)
            how = f"extending to {target_w}x{target_h}"
        if placement.width % MULTIPLE or placement.height % MULTIPLE:
            raise RowError(f"outpainting the {size} image by {how} makes it "
                           f"{placement.width}x{placement.height}; both sides must be multiples of "
                           f"{MULTIPLE}: give borders that make them so, or a target width/height")
        return placement


@dataclass(frozen=True)
class Placement:
    """The image's top-left corner on the canvas, and the canvas size."""

    left: int
    top: int
    width: int
    height: int

    def canvas(self, image: Image.Image) -> Image.Image:
        """The image on the canvas, its edge pixels stretched over the border."""
        import numpy as np
        from PIL import Image

        pixels = np.asarray(image.convert("RGB"))
        pad = ((self.top, self.height - self.top - image.height),
               (self.left, self.width - self.left - image.width), (0, 0))
        return Image.fromarray(np.pad(pixels, pad, mode="edge"))

    def mask(self, image: Image.Image) -> Image.Image:
        """White (repaint) over the border, black (keep) over the image."""
        from PIL import Image

        mask = Image.new("L", (self.width, self.height), 255)
        mask.paste(0, (self.left, self.top, self.left + image.width, self.top + image.height))
        return mask


def _centred(width: int, height: int, canvas_w: int, canvas_h: int) -> Placement:
    """The image centred on the canvas (an odd extra pixel goes right or down)."""
    return Placement((canvas_w - width) // 2, (canvas_h - height) // 2, canvas_w, canvas_h)


def _canvas_for_ratio(width: int, height: int, ratio_w: float, ratio_h: float) -> tuple[int, int]:
    """The smallest canvas holding the image whose sides are multiples of 8 and whose shape is
    ``ratio_w:ratio_h`` as nearly as multiples of 8 allow; only the shorter side grows."""
    def up(n: float) -> int:
        return -(-round(n * 1000) // (MULTIPLE * 1000)) * MULTIPLE  # ceil to a multiple, float-safe

    if width * ratio_h < height * ratio_w:  # narrower than wanted: widen
        canvas_h = up(height)
        return max(up(canvas_h * ratio_w / ratio_h), up(width)), canvas_h
    canvas_w = up(width)
    return canvas_w, max(up(canvas_w * ratio_h / ratio_w), up(height))


def row_outpaint(value: Any) -> OutpaintParams:
    """A row's ``outpaint`` cell (a number, or a mapping as the param) as params; a RowError
    naming the column when it is not one."""
    try:
        return OutpaintParams.model_validate(value)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: "
                             f"{e['msg'].removeprefix('Value error, ')}".removeprefix("value: ")
                             for e in exc.errors())
        raise RowError(f"the row's `outpaint` column is not an outpainting: {problems}") from None


def present(value: Any) -> bool:
    """Whether a row's ``outpaint`` cell asks for outpainting (a Parquet struct of nulls does not)."""
    if isinstance(value, dict):
        return any(v is not None for v in value.values())
    return value is not None and value != ""

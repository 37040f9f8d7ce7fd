"""Rebuild the image examples' inputs: three small PNGs, ``image_prompts.parquet`` (the
quickstart, configs/images.yaml) and ``image_edits.parquet`` (configs/images-edit.yaml).

The pictures are drawn with PIL so the repository needs no downloaded images;
the Parquet embeds their bytes (as a Hugging Face dataset would), so the
examples run from any working directory. Run: ``python configs/data/images/make_image_prompts.py``.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

HERE = Path(__file__).parent
SIZE = 64  # the tiny pipeline's native size; real models resize inputs to what they are given


def bicycle() -> Image.Image:
    """A red bicycle against a brick wall."""
    img = Image.new("RGB", (SIZE, SIZE), (150, 70, 50))
    draw = ImageDraw.Draw(img)
    for y in range(0, SIZE, 8):  # mortar lines
        draw.line([(0, y), (SIZE, y)], fill=(200, 190, 180))
        for x in range(4 * (y // 8 % 2), SIZE, 16):
            draw.line([(x, y), (x, y + 8)], fill=(200, 190, 180))
    draw.rectangle([0, 52, SIZE, SIZE], fill=(90, 90, 90))  # pavement
    for cx in (18, 46):
        draw.ellipse([cx - 10, 36, cx + 10, 56], outline=(20, 20, 20), width=2)
    draw.line([(18, 46), (30, 34), (46, 46), (26, 46), (18, 46)], fill=(210, 20, 30), width=2)
    draw.line([(30, 34), (42, 34), (46, 46)], fill=(210, 20, 30), width=2)
    return img


def room() -> Image.Image:
    """A wall with a window showing a calm sea."""
    img = Image.new("RGB", (SIZE, SIZE), (225, 215, 190))
    draw = ImageDraw.Draw(img)
    draw.rectangle([16, 12, 48, 44], fill=(120, 180, 230), outline=(90, 60, 40), width=2)
    draw.rectangle([18, 30, 46, 42], fill=(40, 90, 160))  # the sea
    draw.line([(32, 12), (32, 44)], fill=(90, 60, 40), width=2)
    draw.rectangle([0, 52, SIZE, SIZE], fill=(120, 80, 50))  # floor
    return img


def window_mask() -> Image.Image:
    """White (repaint) over the window panes, black (keep) elsewhere."""
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rectangle([18, 14, 46, 42], fill=255)
    return mask


def main() -> None:
    files = {"bicycle.png": bicycle(), "room.png": room(), "room_mask.png": window_mask()}
    data = {}
    for name, image in files.items():
        image.save(HERE / name, format="PNG")
        data[name] = (HERE / name).read_bytes()
    rows = [
        ("t2i-astronaut", "An astronaut riding a horse on the moon, digital art", None, None),
        ("t2i-fruit", "A bowl of fruit on a wooden table, oil painting", None, None),
        ("t2i-lighthouse", "A lighthouse on a cliff at sunset, watercolor", None, None),
        ("i2i-bicycle", "A watercolor painting of a red bicycle leaning against a brick wall",
         data["bicycle.png"], None),
        ("inpaint-window", "A window looking out on a stormy sea at night",
         data["room.png"], data["room_mask.png"]),
    ]
    table = pa.table({
        "id": [r[0] for r in rows],
        "prompt": [r[1] for r in rows],
        "task": ["image"] * len(rows),
        "image": pa.array([r[2] for r in rows], pa.binary()),
        "mask": pa.array([r[3] for r in rows], pa.binary()),
    })
    pq.write_table(table, HERE.parent / "image_prompts.parquet")
    write_image_edits(data)


OUTPAINT = pa.struct([("left", pa.int32()), ("right", pa.int32()), ("top", pa.int32()),
                      ("bottom", pa.int32()), ("aspect_ratio", pa.string())])


def write_image_edits(data: dict[str, bytes]) -> None:
    """Every mode of diffusers-image, one row each (two for outpainting): the row's columns pick it."""
    rows = [
        ("t2i-lighthouse", "A lighthouse on a cliff at sunset, watercolor", None, None, None, None),
        ("i2i-bicycle", "A watercolor painting of a red bicycle leaning against a brick wall",
         data["bicycle.png"], None, None, None),
        ("inpaint-window", "A window looking out on a stormy sea at night",
         data["room.png"], data["room_mask.png"], None, None),
        ("outpaint-room", "A cosy room with bookshelves on both sides of a window",
         data["room.png"], None, {"left": 16, "right": 16}, None),
        ("outpaint-street", "A red bicycle in a long street of brick houses",
         data["bicycle.png"], None, {"aspect_ratio": "2:1"}, None),
        ("upscale-bicycle", "A red bicycle against a brick wall, sharp detail", data["bicycle.png"], None, None, True),
    ]
    table = pa.table({
        "id": [r[0] for r in rows],
        "prompt": [r[1] for r in rows],
        "task": ["image"] * len(rows),
        "image": pa.array([r[2] for r in rows], pa.binary()),
        "mask": pa.array([r[3] for r in rows], pa.binary()),
        "outpaint": pa.array([r[4] for r in rows], OUTPAINT),
        "upscale": pa.array([r[5] for r in rows], pa.bool_()),
    })
    pq.write_table(table, HERE.parent / "image_edits.parquet")


if __name__ == "__main__":
    main()

"""Images per second: batched pipeline calls vs one image at a time.

Both sides run the same ``diffusers-image`` generator on the same prompts and
seeds, alternating, so machine noise hits both alike; the script prints the
speed-up and how far the batched images are from the one-at-a-time ones.

    python benchmarks/bench_images.py                  # tiny pipeline written to a temp dir
    python benchmarks/bench_images.py --model models/tiny-sd --images 64 --batch-size 16
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from genflow.api import Generation, GenerationRequest, RowError
from genflow.plugins.image.generator import DiffusersImageGenerator, DiffusersImageParams, write_tiny_sd

PROMPTS = [
    "An astronaut riding a horse on the moon, digital art",
    "A bowl of fruit on a wooden table, oil painting",
    "A red bicycle leaning against a brick wall, high detail",
    "A lighthouse on a cliff at sunset, watercolor",
    "A sunset over the mountains",
    "A small village near a river",
]


def requests(n: int) -> list[GenerationRequest]:
    return [GenerationRequest(generation_id=f"g{i}", prompt_id=f"p{i % len(PROMPTS)}",
                              prompt=PROMPTS[i % len(PROMPTS)], sample=i // len(PROMPTS), seed=1000 + i)
            for i in range(n)]


def timed(generator: DiffusersImageGenerator, reqs: list[GenerationRequest],
          batch_size: int) -> tuple[float, list[Generation | RowError]]:
    start = time.perf_counter()
    results: list[Generation | RowError] = []
    for i in range(0, len(reqs), batch_size):
        results += generator.generate(reqs[i:i + batch_size])
    return time.perf_counter() - start, results


def pixels(result: Generation | RowError) -> np.ndarray:
    assert isinstance(result, Generation) and result.image is not None, result
    return np.asarray(Image.open(io.BytesIO(result.image)), dtype=np.int16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a diffusers pipeline folder (default: a fresh tiny-sd)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="height and width in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps...")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(write_tiny_sd(Path(tmp) / "tiny-sd"))
        params = DiffusersImageParams(num_inference_steps=args.steps, height=args.size, width=args.size)
        generator = DiffusersImageGenerator(model, params, args.device)
        reqs = requests(args.images)
        generator.generate(reqs[:2])  # warm-up: first-call allocations and kernel choices

        times: dict[int, list[float]] = {1: [], args.batch_size: []}
        outputs: dict[int, list[Generation | RowError]] = {}
        for _ in range(args.repeats):
            for batch_size in times:
                seconds, outputs[batch_size] = timed(generator, reqs, batch_size)
                times[batch_size].append(seconds)

    one, batched = (statistics.median(times[b]) for b in (1, args.batch_size))
    diffs = [np.abs(pixels(a) - pixels(b)) for a, b in zip(outputs[1], outputs[args.batch_size], strict=True)]
    identical = sum(int(d.max() == 0) for d in diffs)
    worst = max(int(d.max()) for d in diffs)
    mean = statistics.fmean(float(d.mean()) for d in diffs)
    print(f"model {model if args.model else 'tiny-sd (fresh)'}: {args.images} images of "
          f"{args.size}x{args.size}, {args.steps} steps, guidance 7.5, on {args.device} "
          f"(torch threads {torch.get_num_threads()}), median of {args.repeats}")
    print(f"one at a time   : {args.images / one:7.2f} images/s ({one:.2f} s)")
    print(f"batches of {args.batch_size:<4} : {args.images / batched:7.2f} images/s ({batched:.2f} s)")
    print(f"speed-up        : {one / batched:.2f}x")
    print(f"same images     : {identical}/{len(diffs)} pixel-identical, max difference {worst}/255, "
          f"mean {mean:.4f}")

if __name__ == "__main__":
    main()

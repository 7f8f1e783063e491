"""Cost of the shared preprocessing per image: a 224x224 JPEG and a 12-megapixel JPEG.

    .venv/bin/python -m bench.preprocess_cost [--repeats 7]

Reports the median over repeats of the per-image time, for decode_image at the shipped model's
input size, beside Pillow's full-size decode of the same bytes (the cost that reduced-scale
decoding avoids).
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from model.preprocess import decode_image, tokenize


def photo(width: int, height: int, seed: int = 0) -> bytes:
    """A JPEG with photo-like content: smooth gradients plus noise (flat colors compress unrealistically well)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], axis=-1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def median_ms(action: Callable[[], object], repeats: int, inner: int) -> float:
    action()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(inner):
            action()
        samples.append((time.perf_counter() - started) / inner * 1000)
    return statistics.median(samples)


def full_decode(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as image:
        image.convert("RGB").load()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", type=int, default=64, help="model input side")
    args = parser.parse_args()
    size = (args.size, args.size)
    print(f"| input | bytes | decode_image to {args.size}x{args.size} (ms) | Pillow full decode (ms) |")
    print("|---|---|---|---|")
    for name, (width, height), inner in (("224x224 JPEG", (224, 224), 50), ("12 MP JPEG (4000x3000)", (4000, 3000), 2)):
        data = photo(width, height)
        ours = median_ms(lambda data=data: decode_image(data, size), args.repeats, inner)  # type: ignore[misc]
        full = median_ms(lambda data=data: full_decode(data), args.repeats, inner)  # type: ignore[misc]
        print(f"| {name} | {len(data):,} | {ours:.2f} | {full:.2f} |")
    text = "离橙色物体最近的物体是什么颜色？"
    tokenize_ms = median_ms(lambda: tokenize(text, 192), args.repeats, 2000)
    print(f"| tokenize ({len(text)} chars, Chinese) | | {tokenize_ms:.4f} | |")


if __name__ == "__main__":
    main()

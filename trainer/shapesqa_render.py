"""Rendering and encoding of ShapesQA scenes.

Evaluation sets come from independent renderers, so the training renderer varies what SHAPESQA.md
leaves open instead of fixing one look: two rasterizers (an exact pixel-center test in numpy, and
PIL's ImageDraw with its own rounding), drawing directly or supersampled 2x/4x and downsampled
(BOX / LANCZOS), per-object color jitter within the +-12 the contract allows, optional Gaussian
noise (gray or per channel), and PNG or JPEG of quality 60..100.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from trainer.shapesqa_scene import COLORS, Scene, SceneObject

COLOR_JITTER = 12
MAX_NOISE_STD = 4.0
RASTERS: tuple[str, ...] = ("mask", "draw")
SUPERSAMPLES: tuple[int, ...] = (1, 2, 4)
FORMATS: tuple[str, ...] = ("png", "jpeg", "mixed")
_SQRT3 = math.sqrt(3.0)
# Output pixels beyond an object's box that a downsampling filter can still touch (LANCZOS: 3), plus one.
_RESAMPLE_REACH = 4


@dataclass(frozen=True)
class RenderStyle:
    """How one scene is drawn.

    raster: "mask" (a pixel is inside when its center is) or "draw" (PIL ImageDraw).
    supersample: 1 draws directly (aliased edges); 2 downsamples with BOX, 4 with LANCZOS.
    noise_std: per-pixel Gaussian noise, in gray levels (0 for none); mono_noise: same for all channels.
    jitter: apply the per-object color shift (off only for exact tests and demos).
    """

    raster: str = "mask"
    supersample: int = 4
    noise_std: float = 0.0
    mono_noise: bool = True
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.raster not in RASTERS:
            raise ValueError(f"raster must be one of {RASTERS}")
        if self.supersample not in SUPERSAMPLES:
            raise ValueError(f"supersample must be one of {SUPERSAMPLES}")
        if not 0.0 <= self.noise_std <= MAX_NOISE_STD:
            raise ValueError(f"noise_std must be in [0, {MAX_NOISE_STD}]")


def random_style(rng: random.Random) -> RenderStyle:
    """About 40% aliased, 20% 2x BOX, 40% 4x LANCZOS; noise on about 60% of scenes."""
    raster = rng.choice(RASTERS)
    supersample = rng.choices(SUPERSAMPLES, weights=(2, 1, 2))[0]
    noise_std = rng.uniform(0.5, MAX_NOISE_STD) if rng.random() < 0.6 else 0.0
    return RenderStyle(raster=raster, supersample=supersample, noise_std=noise_std, mono_noise=rng.random() < 0.5)


def _jittered(rng: random.Random, color: str, jitter: bool) -> tuple[int, int, int]:
    r, g, b = COLORS[color]
    if not jitter:
        return (r, g, b)
    j = COLOR_JITTER
    return (
        min(255, max(0, r + rng.randint(-j, j))),
        min(255, max(0, g + rng.randint(-j, j))),
        min(255, max(0, b + rng.randint(-j, j))),
    )


def _paint_mask(arr: np.ndarray, obj: SceneObject, f: int, rgb: tuple[int, int, int]) -> None:
    """Fill the pixels of ``arr`` (f times the scene's resolution) whose centers lie inside ``obj``."""
    height, width = arr.shape[:2]
    x0, y0, x1, y1 = obj.bbox
    i0, i1 = max(0, math.floor(x0 * f)), min(width, math.ceil(x1 * f))
    j0, j1 = max(0, math.floor(y0 * f)), min(height, math.ceil(y1 * f))
    if i1 <= i0 or j1 <= j0:
        return
    u = ((np.arange(i0, i1, dtype=np.float64) + 0.5) / f)[None, :]
    v = ((np.arange(j0, j1, dtype=np.float64) + 0.5) / f)[:, None]
    if obj.shape == "square":
        m = (u >= x0) & (u < x1) & (v >= y0) & (v < y1)
    elif obj.shape == "circle":
        r = obj.side / 2.0
        m = (u - obj.cx) ** 2 + (v - obj.cy) ** 2 <= r * r
    else:  # triangle pointing up: apex at the top of the box, base along its bottom
        m = (v >= y0) & (v <= y1) & (np.abs(u - obj.cx) <= (v - y0) / _SQRT3)
    arr[j0:j1, i0:i1][m] = rgb


def _paint_draw(draw: ImageDraw.ImageDraw, obj: SceneObject, f: int, rgb: tuple[int, int, int]) -> None:
    """Draw ``obj`` with ImageDraw at f times the scene's resolution.

    ImageDraw addresses pixels by index with inclusive ends, so a continuous span [a, b) becomes the
    pixels whose centers it contains; polygon vertices shift by half a pixel to the same convention.
    """
    x0, y0, x1, y1 = (c * f for c in obj.bbox)
    if obj.shape == "triangle":
        pts = [(x0 - 0.5, y1 - 0.5), (x1 - 0.5, y1 - 0.5), (obj.cx * f - 0.5, y0 - 0.5)]
        draw.polygon(pts, fill=rgb)
        return
    box = (math.ceil(x0 - 0.5), math.ceil(y0 - 0.5), math.ceil(x1 - 0.5) - 1, math.ceil(y1 - 0.5) - 1)
    if obj.shape == "square":
        draw.rectangle(box, fill=rgb)
    else:
        draw.ellipse(box, fill=rgb)


def _downsample(hi: Image.Image, scene: Scene, f: int) -> Image.Image:
    """Downsample by ``f`` (4: LANCZOS, 2: BOX), resampling only the regions around objects.

    Away from objects the supersampled image is the uniform background, which any normalized filter
    maps to itself, so only each object's box plus the filter's reach is resampled (with ``box=``, which
    reads source pixels beyond the box, so the result equals a full resize exactly) and pasted onto a
    plain background. This is several times faster than resizing the whole canvas.
    """
    resample = Image.Resampling.LANCZOS if f == 4 else Image.Resampling.BOX
    s = scene.size
    g = scene.background
    out = Image.new("RGB", (s, s), (g, g, g))
    reach = _RESAMPLE_REACH
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.bbox
        a, b = max(0, math.floor(x0) - reach), max(0, math.floor(y0) - reach)
        c, d = min(s, math.ceil(x1) + reach), min(s, math.ceil(y1) + reach)
        patch = hi.resize((c - a, d - b), resample=resample, box=(a * f, b * f, c * f, d * f))
        out.paste(patch, (a, b))
    return out


def render_scene(scene: Scene, rng: random.Random, style: RenderStyle | None = None) -> Image.Image:
    """Render ``scene`` as an RGB image of ``scene.size`` pixels square; a random style when None."""
    style = style if style is not None else random_style(rng)
    f = style.supersample
    side = scene.size * f
    g = scene.background
    colors = [_jittered(rng, o.color, style.jitter) for o in scene.objects]
    if style.raster == "mask":
        arr = np.full((side, side, 3), g, dtype=np.uint8)
        for obj, rgb in zip(scene.objects, colors, strict=True):
            _paint_mask(arr, obj, f, rgb)
        img = Image.fromarray(arr)
    else:
        img = Image.new("RGB", (side, side), (g, g, g))
        draw = ImageDraw.Draw(img)
        for obj, rgb in zip(scene.objects, colors, strict=True):
            _paint_draw(draw, obj, f, rgb)
    if f > 1:
        img = _downsample(img, scene, f)
    if style.noise_std > 0.0:
        nrng = np.random.default_rng(rng.getrandbits(64))
        shape = (scene.size, scene.size, 1 if style.mono_noise else 3)
        noise = nrng.standard_normal(size=shape, dtype=np.float32) * np.float32(style.noise_std)
        noisy = np.asarray(img, dtype=np.float32) + noise
        img = Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))
    return img


def encode_image(
    img: Image.Image, rng: random.Random, fmt: str = "mixed", jpeg_quality: int | None = None
) -> tuple[bytes, str]:
    """Encode as PNG, or JPEG of quality uniform in 60..100 (or `jpeg_quality`); returns (bytes, extension).

    "mixed" picks either with equal odds. JPEG chroma subsampling also varies (4:4:4 or 4:2:0), as
    independent encoders differ there too.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}")
    if fmt == "mixed":
        fmt = "png" if rng.random() < 0.5 else "jpeg"
    buf = io.BytesIO()
    if fmt == "png":
        # Level 1: the images are noisy, so higher levels cost much time for little size.
        img.save(buf, format="PNG", compress_level=1)
        return buf.getvalue(), "png"
    quality = rng.randint(60, 100)  # drawn even when fixed, so the stream stays the same
    if jpeg_quality is not None:
        quality = jpeg_quality
    subsampling = rng.choice((0, 2))
    img.save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    return buf.getvalue(), "jpg"

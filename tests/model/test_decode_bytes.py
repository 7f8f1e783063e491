"""decode_bytes, the service's decode memory estimate, against the memory decoding really takes:
each image decodes in a fresh process, whose peak resident size (VmHWM, Linux) grows by what
decode_image held at its peak. The estimate must never be below it, and not far above."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.preprocess import decode_bytes, decode_image, largest_decode_bytes

MiB = 2**20
WIDTH, HEIGHT = 2400, 1600  # 3.84 megapixels: large enough that the pixels dwarf the allocator's noise

_MEASURE = """
import io, json, sys
from PIL import Image
from model.preprocess import decode_image
data = open(sys.argv[1], "rb").read()
image = Image.open(io.BytesIO(data))
small = io.BytesIO()
Image.new(image.mode, (16, 16)).save(small, format=image.format)  # open, not loaded: no pixel yet
decode_image(small.getvalue(), (128, 128))  # the decoder's first-use allocations, out of the measurement
del image, small
estimates = []

def high_water_kib():
    # VmHWM, the peak of this address space (ru_maxrss would carry the parent's peak across exec).
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

before = high_water_kib()
decode_image(data, (128, 128), before_decoding=lambda size, needed: estimates.append(needed))
after = high_water_kib()
print(json.dumps({"peak": (after - before) * 1024, "estimate": estimates[0]}))
"""


def gradient(bands: int) -> np.ndarray:
    """A smooth picture (it compresses, as a large screenshot does), `bands` channels."""
    rows, columns = np.indices((HEIGHT, WIDTH))
    planes = [(rows + columns) % 256, (rows * 3) % 256, (columns * 5) % 256, (rows // 7) % 256]
    return np.stack(planes[:bands], axis=-1).astype(np.uint8).squeeze()


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def rgb() -> Image.Image:
    return Image.fromarray(gradient(3), "RGB")


def rgba() -> Image.Image:
    picture = gradient(4)
    picture[:, : WIDTH // 2, 3] = 0  # half transparent: the composite on white is not a no-op
    return Image.fromarray(picture, "RGBA")


CASES = {
    "RGB PNG": lambda: encoded(rgb(), "PNG", compress_level=1),
    "RGBA PNG": lambda: encoded(rgba(), "PNG", compress_level=1),
    "gray PNG": lambda: encoded(Image.fromarray(gradient(1), "L"), "PNG", compress_level=1),
    "palette PNG": lambda: encoded(rgb().quantize(64), "PNG", compress_level=1),
    "palette PNG with a transparent colour": lambda: encoded(rgb().quantize(64), "PNG", transparency=0),
    "16-bit gray PNG": lambda: encoded(Image.fromarray(gradient(1).astype(np.uint16) * 257), "PNG", compress_level=1),
    "RGB PNG with EXIF orientation 6": lambda: encoded(rgb(), "PNG", exif=_orientation(6), compress_level=1),
    "RGBA WebP": lambda: encoded(rgba(), "WEBP", quality=50, method=0),
    "RGB PNG with a transparent colour after its pixel data (ignored)": lambda: with_transparency_after_the_pixels(
        encoded(rgb(), "PNG", transparency=(0, 0, 0), compress_level=1)
    ),
    "RGB BMP": lambda: encoded(rgb(), "BMP"),
    "GIF": lambda: encoded(rgb().quantize(64), "GIF"),
    "JPEG (decoded at 1/8 scale)": lambda: encoded(rgb(), "JPEG", quality=80),
}


def chunks_of(png: bytes) -> list[bytes]:
    """A PNG's chunks, each whole (length, type, data, CRC), after the 8-byte signature."""
    found, at = [], 8
    while at < len(png):
        length = int.from_bytes(png[at : at + 4], "big")
        found.append(png[at : at + 12 + length])
        at += 12 + length
    return found


def with_transparency_after_the_pixels(png: bytes) -> bytes:
    """The PNG with its tRNS chunk moved after IDAT, where the spec does not allow it."""
    chunks = chunks_of(png)
    transparency = next(chunk for chunk in chunks if chunk[4:8] == b"tRNS")
    chunks.remove(transparency)
    return png[:8] + b"".join(chunks[:-1]) + transparency + chunks[-1]


def _orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, int]]:
    folder = tmp_path_factory.mktemp("decode-bytes")
    root = Path(__file__).resolve().parents[2]
    results: dict[str, dict[str, int]] = {}
    for name, make in CASES.items():
        path = folder / f"{len(results)}.img"
        path.write_bytes(make())
        done = subprocess.run(
            [sys.executable, "-c", _MEASURE, str(path)], cwd=root, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        results[name] = json.loads(done.stdout)
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_the_estimate_covers_the_peak_and_is_close_to_it(name: str, measured: dict[str, dict[str, int]]) -> None:
    peak, estimate = measured[name]["peak"], measured[name]["estimate"]
    assert peak <= estimate, f"{name}: decoding took {peak / MiB:.1f} MiB, the estimate said {estimate / MiB:.1f}"
    # Over by the fixed allowance for the decoder's buffers (8 MiB), at most, and a few percent.
    assert estimate <= 1.05 * peak + 9 * MiB, f"{name}: {estimate / MiB:.1f} MiB estimated, {peak / MiB:.1f} taken"


def test_a_transparent_webp_is_the_costliest_picture_of_its_pixels() -> None:
    opened = {name: Image.open(io.BytesIO(make())) for name, make in CASES.items()}
    assert decode_bytes(opened["RGBA PNG"]) == WIDTH * HEIGHT * 20 + 8 * MiB
    assert decode_bytes(opened["RGBA WebP"]) == WIDTH * HEIGHT * 28 + 8 * MiB == largest_decode_bytes(WIDTH * HEIGHT)
    assert max(decode_bytes(image) for image in opened.values()) == largest_decode_bytes(WIDTH * HEIGHT)


def test_a_transparent_colour_after_the_pixel_data_is_ignored() -> None:
    """libpng ignores a tRNS chunk out of place; counted or not, the pixels are those of the RGB picture."""
    stored = encoded(rgb(), "PNG", transparency=(0, 0, 0), compress_level=1)
    assert chunks_of(stored)[1][4:8] == b"tRNS"  # before IDAT, where it belongs: it counts
    moved = with_transparency_after_the_pixels(stored)
    opaque = encoded(rgb(), "PNG", compress_level=1)
    assert np.array_equal(decode_image(moved, (64, 64)), decode_image(opaque, (64, 64)))
    assert not np.array_equal(decode_image(stored, (64, 64)), decode_image(opaque, (64, 64)))


_HOLD_THE_ERROR = """
import io, sys
from model.preprocess import ImageDecodeError, decode_image

def resident_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))

data = open(sys.argv[1], "rb").read()
before = resident_kib()
try:
    decode_image(data, (128, 128))
except ImageDecodeError as error:
    kept = error  # as a server keeps it while it answers
    print((resident_kib() - before) * 1024)
"""


def test_a_corrupt_image_leaves_no_pixels_behind_in_its_error(tmp_path: Path) -> None:
    """The decoder's own error, chained, would keep the full-size buffer alive while it is handled."""
    whole = CASES["RGBA PNG"]()
    last = chunks_of(whole)[-2]  # the last IDAT
    cut = whole[: whole.index(last) + len(last) // 2]
    path = tmp_path / "cut.png"
    path.write_bytes(cut)
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", _HOLD_THE_ERROR, str(path)], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 8 * MiB, f"{int(done.stdout) / MiB:.0f} MiB still resident with the error"

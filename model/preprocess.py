"""The one preprocessing module: image bytes -> uint8 [3,H,W], text -> token ids, as numpy arrays.

The trainer and the service both call these functions and nothing else, so the pixels and token
ids a model was trained on are exactly the ones it is served (training-serving skew is the classic
bug of this kind of system). Normalization (mean/std) lives inside the model, so the tensors here
stay uint8: a quarter of the bytes of float32 to move to the device. Numpy, not torch: a process
that never runs a model (a front-end of `--frontends N`) preprocesses without importing torch (280
MB and over a second per process); where a tensor is needed, `torch.from_numpy` wraps the array
without a copy.

Image pipeline, cheapest first:
1. open with an allowlist of decoders (only these formats are ever parsed);
2. check the header's dimensions against the limits *before* any pixel is decoded, so a
   decompression bomb costs microseconds;
3. JPEG only (MPO too: a JPEG with more pictures after it): decode at a reduced scale (libjpeg's
   DCT scaling via `draft`) when the photo is far larger than the model input: a 12-megapixel
   photo decodes at 1/8 scale;
4. first frame of animations; EXIF orientation; any mode to RGB (alpha composited on white,
   16-bit samples scaled, not clipped);
5. one antialiased resize to the model's size.
"""

from __future__ import annotations

import io
import unicodedata
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
from PIL import ExifTags, Image, JpegImagePlugin, UnidentifiedImageError

ALLOWED_FORMATS: Final[tuple[str, ...]] = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
TOKENIZER: Final[str] = "utf8-bytes"
PAD_ID: Final[int] = 0  # token ids are UTF-8 bytes + 1 (1..256); 0 is padding

# Our own limits (ImageLimits) are stricter and give a clear message; Pillow's warning is noise.
# Filtered for the process, not with catch_warnings() around each open: that swaps the process's
# one filter list, which races with the other decoding threads (see model/torchscript.py).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

ImageErrorCode = Literal["empty_image", "unsupported_format", "corrupt_image", "image_dimensions"]


class ImageDecodeError(ValueError):
    """An image that cannot become a model input; `code` says why, `str()` is safe to show a client."""

    def __init__(self, code: ImageErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ImageErrorCode = code


@dataclass(frozen=True)
class ImageLimits:
    """Bounds checked from the image header before decoding."""

    max_pixels: int = 50_000_000  # 48-megapixel phone photos pass; a 64k x 64k PNG bomb does not
    max_side: int = 12_000
    min_side: int = 1
    max_aspect: float = 50.0  # longer side / shorter side; a 1x10000 strip carries no picture


DEFAULT_LIMITS: Final = ImageLimits()

_WHITE: Final = (255, 255, 255)
_SIXTEEN_BIT_MODES: Final = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
_ALPHA_MODES: Final = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})


def decode_image(
    data: bytes,
    size: tuple[int, int],
    limits: ImageLimits = DEFAULT_LIMITS,
    before_decoding: Callable[[tuple[int, int], int], None] | None = None,
) -> npt.NDArray[np.uint8]:
    """Decode image bytes into a uint8 array [3, H, W] of the given (H, W).

    Raises ImageDecodeError with a client-safe message for anything that is not an allowed,
    intact image within the limits. `before_decoding` gets the (width, height) the header
    declares and the bytes decoding it will take at most (`decode_bytes`), once it is within the
    limits and before any pixel is decoded: a caller may raise there to decode it some other way
    (the service sends large images to its decode pool, and one whose memory is not free waits).
    """
    if not data:
        raise ImageDecodeError("empty_image", "the image is empty (0 bytes)")
    image = _open(data, limits)
    declared = image.size
    _check_dimensions(declared, limits)
    height, width = size
    if isinstance(image, JpegImagePlugin.JpegImageFile):  # MPO too: a JPEG with more pictures after it
        # Reduced-scale DCT decoding; the scale chosen keeps both sides >= the request, and the
        # request is square so that a 90-degree EXIF rotation cannot leave a side short.
        side = max(height, width)
        image.draft("RGB", (side, side))
    if before_decoding is not None:
        before_decoding(declared, decode_bytes(image))
    transparent_at_open = "transparency" in image.info
    try:
        image.load()
        failed = False
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        failed = True
    if failed:
        # Raised here, unchained, the picture closed: the decoder's error, with its traceback,
        # would keep the full-size buffer alive for as long as the error is handled.
        image.close()
        raise ImageDecodeError("corrupt_image", "the image data is corrupt or truncated")
    if image.format == "PNG" and not transparent_at_open:
        # A tRNS chunk after the pixel data is out of place (the PNG spec puts it before IDAT;
        # libpng ignores it): so it is ignored here too, and the decode stays within decode_bytes.
        image.info.pop("transparency", None)
    turn = _upright_turn(image)
    # Turned after the resize, on the small picture: a full-size turned copy would double the
    # memory of a large PNG's decode. A quarter turn swaps the sides, so the resize swaps them first.
    stored_size = (height, width) if turn in _QUARTER_TURNS else (width, height)
    rgb = _to_rgb(image)
    if rgb.size != stored_size:
        rgb = rgb.resize(stored_size, Image.Resampling.BILINEAR, reducing_gap=None)
    if turn is not None:
        rgb = rgb.transpose(turn)
    array = np.array(rgb)  # [H, W, 3] uint8, writable (torch refuses to share a read-only buffer)
    return array.transpose(2, 0, 1)  # [3, H, W] view; collation makes it contiguous


# Bytes a pixel takes in Pillow's storage: 8-bit single-band modes 1, 16-bit modes 2, every other
# mode 4 (RGB too: Pillow stores it with a padding byte).
_STORED_BYTES: Final = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


_DECODER_BYTES: Final = 8 * 2**20  # the decoder's own buffers, the small resized picture, allocator slack
# Bytes a pixel the copies of each conversion to RGB take (the 16-bit one depends on the mode's).
_CONVERTED_BYTES: Final = {
    "none": 0,
    "composite": 4 * 4,  # RGBA, the white background, the composite, then RGB
    "convert": 4,  # RGB
}
_WEBP_CANVAS_BYTES: Final = 8  # libwebp decodes into canvases of its own (4 bytes a pixel, two for animations)

_Conversion = Literal["none", "sixteen_bit", "composite", "convert"]


def decode_bytes(image: Image.Image) -> int:
    """The most memory decode_image holds at once for this opened (not yet loaded) image: the
    decoded picture and the copies its conversion to RGB makes, all alive together at the peak
    (the resize and the EXIF turn work on the small picture). It matches the peak resident growth
    measured per mode and format (tests/model/test_decode_bytes.py): 4 bytes a pixel for RGB, 5 for
    gray and palette, 8 for 16-bit gray, 20 with transparency, 8 more for WebP's own canvases. A
    JPEG counts at its reduced DCT scale, once `draft` set it."""
    width, height = image.size
    stored = _STORED_BYTES.get(image.mode, 4)
    conversion = _conversion(image)
    if conversion == "sixteen_bit":
        # numpy's copy of the samples and their float32 copy; later the uint8 array, its L image and RGB.
        converted = max(stored + 4, 1 + 1 + 4)
    else:
        converted = _CONVERTED_BYTES[conversion]
    canvases = _WEBP_CANVAS_BYTES if image.format == "WEBP" else 0
    return width * height * (stored + converted + canvases) + _DECODER_BYTES


def largest_decode_bytes(max_pixels: int) -> int:
    """decode_bytes of the costliest image of `max_pixels`: a WebP with transparency."""
    return max_pixels * (4 + _CONVERTED_BYTES["composite"] + _WEBP_CANVAS_BYTES) + _DECODER_BYTES


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError as exc:
        if sniff_format(data) is not None:  # an allowed format's signature, but no valid header after it
            raise ImageDecodeError("corrupt_image", "the image header is corrupt or truncated") from exc
        raise ImageDecodeError(
            "unsupported_format", f"not an image in an allowed format ({', '.join(ALLOWED_FORMATS)})"
        ) from exc
    except Image.DecompressionBombError as exc:  # Pillow's own bound, far above ours, tripped in the header
        raise ImageDecodeError(
            "image_dimensions", f"the image has too many pixels; at most {limits.max_pixels} are accepted"
        ) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError("corrupt_image", "the image header is corrupt") from exc
    # An animation opens at its first frame, which is the picture. Its frames are never counted:
    # counting walks the whole file (3 us a frame, and a tiny frame takes 15 bytes), and a damaged
    # frame after the first would fail a picture that is intact.
    return image


# EXIF orientation -> the transpose that makes the picture upright (as ImageOps.exif_transpose).
_UPRIGHT: Final = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


_QUARTER_TURNS: Final = frozenset(
    {Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90}
)


def _upright_turn(image: Image.Image) -> Image.Transpose | None:
    """The transpose that turns the loaded picture as its EXIF orientation says, if any. Not
    ImageOps.exif_transpose: it also writes the EXIF back, and fails on tags it cannot write (odd
    camera EXIF is common), though the orientation was readable. EXIF is metadata: when it does
    not parse, the picture stands as stored."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # any parse failure of the metadata block (struct, type, value errors)
        return None
    return _UPRIGHT.get(orientation) if isinstance(orientation, int) else None


def sniff_format(data: bytes) -> str | None:
    """The allowed format whose file signature `data` starts with, if any."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data.startswith(b"BM"):
        return "BMP"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _check_dimensions(size: tuple[int, int], limits: ImageLimits) -> None:
    width, height = size
    if min(width, height) < limits.min_side:
        raise ImageDecodeError("image_dimensions", f"image is {width}x{height}; each side must be >= {limits.min_side}")
    if max(width, height) > limits.max_side:
        raise ImageDecodeError("image_dimensions", f"image is {width}x{height}; each side must be <= {limits.max_side}")
    if width * height > limits.max_pixels:
        raise ImageDecodeError(
            "image_dimensions", f"image is {width}x{height}; at most {limits.max_pixels} pixels are accepted"
        )
    if max(width, height) > limits.max_aspect * min(width, height):
        raise ImageDecodeError(
            "image_dimensions", f"image is {width}x{height}; the aspect ratio must be at most {limits.max_aspect:g}:1"
        )


def _conversion(image: Image.Image) -> _Conversion:
    """How the picture becomes RGB: one dispatch for _to_rgb and for decode_bytes, which counts its copies."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return "none"
    if mode in _SIXTEEN_BIT_MODES:
        return "sixteen_bit"
    if mode in _ALPHA_MODES or "transparency" in image.info:  # palette or RGB/L with a transparent color
        return "composite"
    return "convert"  # L, 1, P, CMYK (Adobe-inverted handled by the JPEG plugin), YCbCr


def _to_rgb(image: Image.Image) -> Image.Image:
    conversion = _conversion(image)
    if conversion == "none":
        return image
    if conversion == "sixteen_bit":
        # Pillow's convert() clips 16-bit samples to 255 (a white image); scale the range instead.
        # In place: a large picture's float copy is its largest one (decode_bytes counts it once).
        samples = np.array(image, dtype=np.float32)  # a copy: asarray of an F image is read-only
        samples /= 257.0
        np.rint(samples, out=samples)
        gray = np.clip(samples, 0, 255, out=samples).astype(np.uint8)
        del samples
        return Image.fromarray(gray, mode="L").convert("RGB")
    if conversion == "composite":
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


TokenIds = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Tokens:
    ids: TokenIds  # [L], values 1..256
    truncated: bool  # the text was longer than max_length bytes and was cut at a character boundary


def tokenize(text: str, max_length: int) -> Tokens:
    """NFC-normalize, encode as UTF-8, shift by one (0 is padding); cut to max_length bytes."""
    encoded = unicodedata.normalize("NFC", text).encode("utf-8")
    truncated = len(encoded) > max_length
    if truncated:
        encoded = _cut_at_char_boundary(encoded, max_length)
    ids = np.frombuffer(encoded, dtype=np.uint8).astype(np.int64) + 1
    return Tokens(ids=ids, truncated=truncated)


def _cut_at_char_boundary(encoded: bytes, limit: int) -> bytes:
    end = limit
    # UTF-8 continuation bytes are 0b10xxxxxx: step back to the start of the cut character.
    while end > 0 and (encoded[end] & 0xC0) == 0x80:
        end -= 1
    return encoded[:end]


def pad_tokens(sequences: Sequence[TokenIds], length: int | None = None) -> TokenIds:
    """Right-pad token id arrays with PAD_ID to the longest (or to `length`): int64 [B, L]."""
    longest = max((len(s) for s in sequences), default=1)
    width = max(longest, 1) if length is None else length
    batch = np.full((len(sequences), width), PAD_ID, dtype=np.int64)
    for row, ids in enumerate(sequences):
        batch[row, : len(ids)] = ids
    return batch

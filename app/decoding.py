"""Per-request work, done before a request joins the batch queue: in the decode pool, or on the
event loop for a lone request whose image is cheap to decode (app.routes.common).

multipart body -> validated fields -> model inputs, through the one shared preprocessing module
(`model.preprocess`), so the service feeds the model exactly what the trainer did. Anything wrong
with one request fails that request alone, here, before it can touch a batch.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Final

import numpy as np

from app.config import Settings
from app.decode_memory import DecodeMemory
from app.errors import InvalidInput, PayloadTooLarge, ServiceError, UnsupportedMediaType
from app.forms import FieldLimit, Part, parse_form
from app.items import ByteArray, TokenArray
from app.metrics import Metrics
from model.manifest import Manifest
from model.preprocess import ImageDecodeError, decode_image, tokenize

DEFAULT_TOP_K: Final = 5
_TOP_K_BYTES: Final = 16
# ASCII is a subset of UTF-8; any other charset would need a second decoder, and silently reading
# Latin-1 bytes as UTF-8 would give the model different text than the client meant.
_UTF8_CHARSETS: Final = frozenset({b"utf-8", b"utf8", b"us-ascii", b"ascii"})
# C0 and C1 control characters and DEL, except tab, line feed and carriage return (which real
# multi-line questions contain). NUL and the rest carry no meaning for the model, were never in
# its training text, and are a classic way to smuggle a string past a log or a C library.
_CONTROL_CHARACTERS: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


class DecodeElsewhere(Exception):
    """The image has more pixels than the caller allowed here: decode the request in the pool."""


@dataclass(frozen=True, slots=True)
class DecodeSite:
    """Where a request decodes. On the event loop: `max_pixels` set; a larger image raises
    DecodeElsewhere before any pixel is decoded. In the decode pool: `max_pixels` None, and the
    image first holds its decode memory (app.decode_memory), or raises MustWait; `reserved`: its
    bytes are held for it already, after such a wait, by the caller, which gives them back."""

    max_pixels: int | None = None
    reserved: bool = False


ANYWHERE: Final = DecodeSite()  # no pixel limit: the tests' and the benchmark's own calls


@dataclass(frozen=True, slots=True)
class Decoded:
    image: ByteArray | None  # uint8 [3, H, W], contiguous
    tokens: TokenArray | None  # int64 [L], 1 <= L <= max_text_length
    top_k: int = DEFAULT_TOP_K


class Decoder:
    @classmethod
    def serving(cls, settings: Settings, manifest: Manifest, metrics: Metrics) -> Decoder:
        """The decoder of a process that serves: its images hold decode memory, from a budget of its own
        waited for on this (the running) event loop."""
        memory = DecodeMemory(settings.decode_memory_bytes(), metrics, asyncio.get_running_loop())
        return cls(settings, manifest, memory)

    def __init__(self, settings: Settings, manifest: Manifest, memory: DecodeMemory | None = None) -> None:
        self.image_size = manifest.image_size
        self.max_length = manifest.max_text_length
        self.num_labels = len(manifest.labels)
        self.limits = settings.image_limits()
        self.memory = memory
        self.max_parts = settings.max_parts
        image = FieldLimit(settings.max_image_bytes, _image_too_large)
        text = FieldLimit(settings.max_text_bytes, self._text_too_long)
        self.predict_fields = {"image": image, "text": text, "top_k": FieldLimit(_TOP_K_BYTES, self._bad_top_k)}
        self.embed_fields = {"image": image, "text": text}

    def predict(self, body: bytes, boundary: bytes, site: DecodeSite = ANYWHERE) -> Decoded:
        """image (file) and text required; top_k optional."""
        parts = parse_form(body, boundary, self.predict_fields, self.max_parts)
        image = self._image(_required(parts, "image"), site)
        tokens = self._text(_required(parts, "text"))
        top_k = self._top_k(parts["top_k"]) if "top_k" in parts else min(DEFAULT_TOP_K, self.num_labels)
        return Decoded(image=image, tokens=tokens, top_k=top_k)

    def embed(self, body: bytes, boundary: bytes, site: DecodeSite = ANYWHERE) -> Decoded:
        """image and/or text: at least one."""
        parts = parse_form(body, boundary, self.embed_fields, self.max_parts)
        if not parts:
            raise InvalidInput("send an image, a text, or both", code="missing_field")
        image = self._image(parts["image"], site) if "image" in parts else None
        tokens = self._text(parts["text"]) if "text" in parts else None
        return Decoded(image=image, tokens=tokens)

    def _image(self, part: Part, site: DecodeSite) -> ByteArray:
        held = 0

        def before_decoding(size: tuple[int, int], needed: int) -> None:
            nonlocal held
            if site.max_pixels is not None:
                if size[0] * size[1] > site.max_pixels:
                    raise DecodeElsewhere
            elif self.memory is not None and not site.reserved:
                self.memory.take(size, needed)
                held = needed

        try:
            pixels = decode_image(part.data, self.image_size, self.limits, before_decoding)
        except ImageDecodeError as exc:
            error: type[ServiceError] = UnsupportedMediaType if exc.code == "unsupported_format" else InvalidInput
            raise error(str(exc), code=exc.code) from exc
        finally:
            if held and self.memory is not None:
                self.memory.release(held)
        # [3, H, W] view of Pillow's [H, W, 3]: made contiguous here, before it queues, so that
        # staging it into a batch on the event loop is one plain copy.
        return np.ascontiguousarray(pixels)

    def _text(self, part: Part) -> TokenArray:
        charset = part.charset
        if charset is not None and charset not in _UTF8_CHARSETS:
            raise InvalidInput(
                "the text field must be UTF-8 (its Content-Type names another charset)", code="unsupported_charset"
            )
        try:
            text = part.data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput("the text field is not valid UTF-8", code="invalid_text") from exc
        if not text.strip():
            raise InvalidInput("the text field is empty", code="empty_text")
        if _CONTROL_CHARACTERS.search(text):
            raise InvalidInput(
                "the text field contains control characters (only tab, line feed and carriage return are allowed)",
                code="invalid_text",
            )
        tokens = tokenize(text, self.max_length)
        if tokens.truncated:
            # Refused, not cut: an answer to half a question is a wrong answer that looks right.
            raise self._text_too_long(self.max_length)
        return tokens.ids

    def _top_k(self, part: Part) -> int:
        text = part.data.decode("ascii", errors="replace").strip()
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= self.num_labels:
            raise self._bad_top_k(0)
        return int(text)

    def _text_too_long(self, limit: int) -> ServiceError:
        return InvalidInput(
            f"the text is too long: at most {self.max_length} UTF-8 bytes are accepted, counted after Unicode NFC"
            " normalization (which turns some characters into two)",
            code="text_too_long",
        )

    def _bad_top_k(self, limit: int) -> ServiceError:
        return InvalidInput(f"top_k must be an integer from 1 to {self.num_labels}", code="invalid_top_k")


def _required(parts: dict[str, Part], name: str) -> Part:
    if name not in parts:
        raise InvalidInput(f"the {name!r} field is required", code="missing_field")
    return parts[name]


def _image_too_large(limit: int) -> ServiceError:
    return PayloadTooLarge(f"the image is too large: at most {limit} bytes are accepted", code="image_too_large")

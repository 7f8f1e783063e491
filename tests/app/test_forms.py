"""The multipart parser and the per-request decoder, on real bodies built by httpx."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.config import Settings
from app.decoding import Decoder
from app.errors import InvalidInput, MalformedRequest, PayloadTooLarge, ServiceError, UnsupportedMediaType
from app.forms import FieldLimit, multipart_boundary, parse_form
from model.manifest import read_manifest
from model.preprocess import decode_image, tokenize
from tests.app.conftest import picture

LIMITS = {
    "image": FieldLimit(1000, lambda n: PayloadTooLarge("big")),
    "text": FieldLimit(10, lambda n: InvalidInput("long")),
}


def body(files: list[tuple[str, tuple[str | None, bytes]]] | None = None, **data: str) -> tuple[bytes, bytes]:
    request = httpx.Request("POST", "http://x/", files=files or [("unused", ("u", b""))], data=data)
    content = request.read()
    return content, multipart_boundary(request.headers["content-type"])


def test_content_type_checks() -> None:
    assert multipart_boundary("multipart/form-data; boundary=abc") == b"abc"
    assert multipart_boundary('Multipart/Form-Data; boundary="a b"') == b"a b"
    for wrong in (None, "application/json", "application/x-www-form-urlencoded", "multipart/mixed; boundary=a"):
        with pytest.raises(UnsupportedMediaType):
            multipart_boundary(wrong)
    for bad in ("multipart/form-data", "multipart/form-data; boundary=", "multipart/form-data; boundary=" + "a" * 71):
        with pytest.raises(MalformedRequest):
            multipart_boundary(bad)


def test_fields_are_parsed_and_unknown_ones_skipped() -> None:
    content, boundary = body([("image", ("a.png", b"\x89PNG..."))], text="héllo", extra="ignored")
    parts = parse_form(content, boundary, LIMITS, max_parts=8)
    assert sorted(parts) == ["image", "text"]
    assert parts["image"].data == b"\x89PNG..." and parts["image"].filename == "a.png"
    assert parts["text"].data == "héllo".encode()


def test_part_limits_apply_at_the_boundary() -> None:
    content, boundary = body([("image", ("a", b"x" * 1000))], text="x" * 10)
    assert len(parse_form(content, boundary, LIMITS, max_parts=8)["image"].data) == 1000
    content, boundary = body([("image", ("a", b"x" * 1001))])
    with pytest.raises(PayloadTooLarge):
        parse_form(content, boundary, LIMITS, max_parts=8)
    content, boundary = body(text="x" * 11)
    with pytest.raises(InvalidInput):
        parse_form(content, boundary, LIMITS, max_parts=8)


def test_too_many_parts_and_duplicates() -> None:
    content, boundary = body([("a", ("a", b"1")), ("b", ("b", b"2")), ("c", ("c", b"3"))])
    assert parse_form(content, boundary, LIMITS, max_parts=3) == {}
    with pytest.raises(PayloadTooLarge) as too_many:
        parse_form(content, boundary, LIMITS, max_parts=2)
    assert too_many.value.code == "too_many_parts"
    content, boundary = body([("text", (None, b"one")), ("text", (None, b"two"))])
    with pytest.raises(InvalidInput) as duplicate:
        parse_form(content, boundary, LIMITS, max_parts=8)
    assert duplicate.value.code == "duplicate_field"


@pytest.mark.parametrize(
    "content",
    [
        b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\nhello',  # no closing boundary
        b"garbage without any boundary",
        b"--b\r\nContent-Type: text/plain\r\n\r\nno name\r\n--b--\r\n",  # no Content-Disposition
        b"",
    ],
)
def test_malformed_bodies_are_400(content: bytes) -> None:
    with pytest.raises(MalformedRequest):
        parse_form(content, b"b", LIMITS, max_parts=8)


@pytest.fixture
def decoder(tiny_package: Path) -> Decoder:
    return Decoder(Settings(model=tiny_package), read_manifest(tiny_package))


def test_predict_decodes_like_the_shared_preprocessing(decoder: Decoder) -> None:
    image = picture(fmt="JPEG")
    content, boundary = body([("image", ("p.jpg", image))], text="What shape?", top_k="3")
    decoded = decoder.predict(content, boundary)
    assert decoded.image is not None and decoded.tokens is not None
    assert decoded.image.flags["C_CONTIGUOUS"] and decoded.image.shape == (3, 32, 32)
    np.testing.assert_array_equal(decoded.image, decode_image(image, (32, 32)))
    np.testing.assert_array_equal(decoded.tokens, tokenize("What shape?", 64).ids)
    assert decoded.top_k == 3


def test_default_top_k(decoder: Decoder) -> None:
    content, boundary = body([("image", ("p", picture()))], text="q")
    assert decoder.predict(content, boundary).top_k == 5


@pytest.mark.parametrize(
    ("files", "data", "error", "code"),
    [
        ([], {"text": "q"}, InvalidInput, "missing_field"),
        ([("image", ("p", picture()))], {}, InvalidInput, "missing_field"),
        ([("image", ("p", picture()))], {"text": "   "}, InvalidInput, "empty_text"),
        ([("image", ("p", picture()))], {"text": "x" * 65}, InvalidInput, "text_too_long"),
        ([("image", ("p", picture()))], {"text": "é" * 33}, InvalidInput, "text_too_long"),  # 66 bytes
        ([("image", ("p", picture()))], {"text": "q", "top_k": "0"}, InvalidInput, "invalid_top_k"),
        ([("image", ("p", picture()))], {"text": "q", "top_k": "23"}, InvalidInput, "invalid_top_k"),
        ([("image", ("p", picture()))], {"text": "q", "top_k": "two"}, InvalidInput, "invalid_top_k"),
        ([("image", ("p", b""))], {"text": "q"}, InvalidInput, "empty_image"),
        ([("image", ("p", picture()[:60]))], {"text": "q"}, InvalidInput, "corrupt_image"),
        ([("image", ("p", picture(size=(200, 2))))], {"text": "q"}, InvalidInput, "image_dimensions"),
        ([("image", ("p", picture(fmt="TIFF")))], {"text": "q"}, UnsupportedMediaType, "unsupported_format"),
        ([("image", ("p", b"%PDF-1.4 not an image"))], {"text": "q"}, UnsupportedMediaType, "unsupported_format"),
    ],
)
def test_predict_refusals(
    decoder: Decoder, files: list[Any], data: dict[str, str], error: type[ServiceError], code: str
) -> None:
    content, boundary = body(files or None, **data)
    with pytest.raises(error) as raised:
        decoder.predict(content, boundary)
    assert raised.value.code == code


def test_text_at_the_length_limit_is_accepted(decoder: Decoder) -> None:
    content, boundary = body([("image", ("p", picture()))], text="x" * 64)
    decoded = decoder.predict(content, boundary)
    assert decoded.tokens is not None and len(decoded.tokens) == 64


def test_invalid_utf8_text(decoder: Decoder) -> None:
    content, boundary = body([("image", ("p", picture())), ("text", (None, b"\xff\xfe"))])
    with pytest.raises(InvalidInput) as raised:
        decoder.predict(content, boundary)
    assert raised.value.code == "invalid_text"


def test_embed_takes_either_or_both(decoder: Decoder) -> None:
    content, boundary = body([("image", ("p", picture()))])
    image_only = decoder.embed(content, boundary)
    assert image_only.image is not None and image_only.tokens is None
    content, boundary = body(text="q")
    text_only = decoder.embed(content, boundary)
    assert text_only.image is None and text_only.tokens is not None
    content, boundary = body()
    with pytest.raises(InvalidInput):
        decoder.embed(content, boundary)

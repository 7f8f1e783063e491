"""Fuzzing: Schemathesis against the service's own OpenAPI document (a real server), and
hypothesis on the parsing and decoding code. No 5xx, no crash, no exception but the domain errors.
"""

from __future__ import annotations

import io
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from app.config import Settings
from app.decoding import Decoder
from app.errors import InvalidInput, PayloadTooLarge, ServiceError
from app.forms import FieldLimit, parse_form
from model.manifest import read_manifest
from model.preprocess import ALLOWED_FORMATS, ImageDecodeError, decode_image
from tests.app.conftest import multipart, picture
from tests.app.servers import SERVER_ARGS, Server, running_server

# -- Schemathesis ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzzed_server(tiny_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # A real (random) model: the probe model fails on purpose for texts starting with its markers.
    with running_server(tiny_package, tmp_path_factory.mktemp("fuzz"), *SERVER_ARGS) as running:
        yield running


def asked_for_the_impossible(case: Any, response: Any) -> bool:
    """The one 5xx a client can cause by contract: 504 for a deadline (X-Request-Timeout-Ms) too
    short to be met, which the fuzzer likes to set to a millisecond or two."""
    timeout = (case.headers or {}).get("X-Request-Timeout-Ms")
    short = isinstance(timeout, int | str) and str(timeout).isdigit() and int(timeout) < 1000
    return short and response.status_code == 504 and response.json()["error"]["code"] == "deadline_exceeded"


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_the_api_answers_as_its_schema_says_and_never_5xx(fuzzed_server: Server, mode: GenerationMode) -> None:
    """Every operation of the OpenAPI document, with inputs that follow it and inputs that break it:
    each answer has a documented status and the documented shape, and none is a 5xx.

    Not checked: that every schema-valid request is accepted (JSON Schema cannot say "at most 64
    UTF-8 bytes" or "a decodable image": a long text or random bytes as an image get their
    documented 422 or 415), nor that every schema-violating one is refused with one of the
    fuzzer's statuses (413 is a refusal too, and an X-Request-ID not of the documented form is
    replaced, not refused). (The pytest integration, `schemathesis.pytest.from_fixture`,
    does not run under pytest 9: the schema's strategy drives hypothesis directly.)"""
    schema = schemathesis.openapi.from_url(f"{fuzzed_server.url}/openapi.json")

    @given(case=schema.as_strategy(mode))
    @settings(max_examples=120, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def answers_well(case: Any) -> None:
        response = case.call()
        excluded = [positive_data_acceptance, negative_data_rejection, not_a_server_error]
        case.validate_response(response, excluded_checks=excluded)
        assert response.status_code < 500 or asked_for_the_impossible(case, response), response.text

    answers_well()
    assert fuzzed_server.process.poll() is None


# -- hypothesis on the parsing and decoding code ------------------------------------------------------

FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
LIMITS = {
    "image": FieldLimit(4096, lambda n: PayloadTooLarge("big")),
    "text": FieldLimit(64, lambda n: InvalidInput("long")),
}
SIGNATURES = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"GIF87a", b"BM", b"RIFF\0\0\0\0WEBPVP8 "]


@st.composite
def multipart_bodies(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """Multipart bodies built from random parts, then maybe cut short or with bytes flipped."""
    names = st.sampled_from(["image", "text", "top_k", "other", "", "t\u00e9xt"])
    headers = st.dictionaries(
        st.sampled_from(["Content-Type", "Content-Transfer-Encoding", "X-Other"]),
        st.text(st.characters(codec="latin-1", exclude_characters="\r\n"), max_size=30),
        max_size=2,
    )
    parts = draw(st.lists(st.tuples(names, st.binary(max_size=200), headers), max_size=6))
    body, _ = multipart(*parts)
    if draw(st.booleans()):
        body = body[: draw(st.integers(0, len(body)))]
    for index in draw(st.lists(st.integers(0, max(len(body) - 1, 0)), max_size=3)) if body else []:
        body = body[:index] + bytes([draw(st.integers(0, 255))]) + body[index + 1 :]
    return body, b"fusion-test-boundary"


@FUZZ
@given(body=st.binary(max_size=2000), boundary=st.binary(min_size=1, max_size=70))
def test_the_form_parser_on_random_bytes_raises_only_domain_errors(body: bytes, boundary: bytes) -> None:
    try:
        parts = parse_form(body, boundary, LIMITS, max_parts=8)
    except ServiceError:
        return
    assert set(parts) <= set(LIMITS)


@FUZZ
@given(form=multipart_bodies())
def test_the_form_parser_on_damaged_forms_raises_only_domain_errors(form: tuple[bytes, bytes]) -> None:
    try:
        parts = parse_form(*form, LIMITS, max_parts=8)
    except ServiceError:
        return
    assert set(parts) <= set(LIMITS)
    assert all(len(part.data) <= LIMITS[name].max_bytes for name, part in parts.items())


@pytest.fixture(scope="module")
def decoder(probe_package: Path) -> Decoder:
    return Decoder(Settings(model=probe_package), read_manifest(probe_package))


@FUZZ
@given(form=multipart_bodies())
def test_the_decoder_raises_only_domain_errors(decoder: Decoder, form: tuple[bytes, bytes]) -> None:
    for decode in (decoder.predict, decoder.embed):
        try:
            decoded = decode(*form)
        except ServiceError:
            continue
        if decoded.image is not None:
            assert decoded.image.shape == (3, 32, 32) and decoded.image.dtype == np.uint8
        if decoded.tokens is not None:
            assert 1 <= len(decoded.tokens) <= 64 and decoded.tokens.min() >= 1


@FUZZ
@given(text=st.text(max_size=80))
def test_text_is_tokenized_or_refused_with_a_reason(decoder: Decoder, text: str) -> None:
    """Each text gets the one outcome its content calls for, in the decoder's order of checks."""
    body, _ = multipart(("image", picture()), ("text", text.encode("utf-8", errors="surrogatepass")))
    if any(0xD800 <= ord(c) <= 0xDFFF for c in text):  # a lone surrogate: not valid UTF-8
        expected: str | None = "invalid_text"
    elif not text.strip():
        expected = "empty_text"
    elif any(unicodedata.category(c) == "Cc" and c not in "\t\n\r" for c in text):
        expected = "invalid_text"
    elif len(unicodedata.normalize("NFC", text).encode()) > 64:
        expected = "text_too_long"
    else:
        expected = None
    try:
        decoded = decoder.predict(body, b"fusion-test-boundary")
    except InvalidInput as refused:
        assert refused.code == expected
        return
    assert expected is None
    assert decoded.tokens is not None
    np.testing.assert_array_equal(
        decoded.tokens, np.frombuffer(unicodedata.normalize("NFC", text).encode(), np.uint8) + 1
    )


@FUZZ
@given(signature=st.sampled_from([b"", *SIGNATURES]), data=st.binary(max_size=3000))
def test_decoding_random_bytes_raises_only_image_errors(signature: bytes, data: bytes) -> None:
    try:
        pixels = decode_image(signature + data, (32, 32))
    except ImageDecodeError:
        return
    assert tuple(pixels.shape) == (3, 32, 32)


MODES = {
    "JPEG": ["RGB", "L", "CMYK"],
    "PNG": ["RGB", "RGBA", "L", "LA", "P", "1", "I;16"],
    "WEBP": ["RGB", "RGBA"],
    "BMP": ["RGB", "L", "P", "1"],
    "GIF": ["P", "L"],
}


@st.composite
def images(draw: st.DrawFn) -> tuple[bytes, tuple[int, int]]:
    fmt = draw(st.sampled_from(sorted(MODES)))
    mode = draw(st.sampled_from(MODES[fmt]))
    size = (draw(st.integers(1, 80)), draw(st.integers(1, 80)))
    pixels = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, 256, (size[1], size[0], 3))
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    image = image.convert(mode) if mode != "I;16" else Image.fromarray(np.asarray(image.convert("L"), np.uint16) * 257)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue(), size


@FUZZ
@given(image=images())
def test_every_allowed_image_decodes_unless_its_shape_is_refused(image: tuple[bytes, tuple[int, int]]) -> None:
    data, (width, height) = image
    if max(width, height) > 50 * min(width, height):
        with pytest.raises(ImageDecodeError) as refused:
            decode_image(data, (32, 32))
        assert refused.value.code == "image_dimensions"
        return
    pixels = decode_image(data, (32, 32))
    assert pixels.shape == (3, 32, 32) and pixels.dtype == np.uint8


@FUZZ
@given(image=images(), cut=st.floats(0, 1), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=8))
def test_damaged_images_raise_only_image_errors(
    image: tuple[bytes, tuple[int, int]], cut: float, flips: list[tuple[float, int]]
) -> None:
    data = bytearray(image[0][: max(1, int(len(image[0]) * cut))] if cut < 0.9 else image[0])
    for where, value in flips:
        data[min(int(where * len(data)), len(data) - 1)] = value
    try:
        pixels = decode_image(bytes(data), (32, 32))
    except ImageDecodeError:
        return
    assert tuple(pixels.shape) == (3, 32, 32)


def test_only_the_allowed_formats_are_ever_opened() -> None:
    assert ALLOWED_FORMATS == ("JPEG", "PNG", "WEBP", "BMP", "GIF")
    for fmt in ("TIFF", "ICO", "PPM", "TGA", "PCX", "DDS", "EPS"):
        image = Image.new("RGB", (8, 8), (1, 2, 3))
        buffer = io.BytesIO()
        try:
            image.save(buffer, format=fmt)
        except (KeyError, OSError):  # no encoder here: Pillow cannot write it, so cannot test it
            continue
        with pytest.raises(ImageDecodeError) as refused:
            decode_image(buffer.getvalue(), (32, 32))
        assert refused.value.code == "unsupported_format", fmt


# -- the form parser against python-multipart's streaming parser ---------------------------------------

WIDE = {name: FieldLimit(1 << 20, lambda n: PayloadTooLarge("big")) for name in ("image", "text", "top_k")}


def streamed_parts(body: bytes, boundary: bytes) -> dict[str, tuple[bytes, str | None, bytes | None]] | str:
    """What python-multipart's streaming parser finds in the body: each part's data, filename and
    Content-Type by name (the fields of WIDE, sent once, with a Content-Disposition), or "refused".

    Two of its quirks are refused here, as app.forms refuses them: after a leading CR or LF it
    skips whatever comes before the next "-" (a preamble it otherwise refuses), and it takes a
    bare LF inside a header value as part of the value. And a tab before a header value is
    optional whitespace (RFC 9110), which it keeps and app.forms strips, as it strips spaces."""
    if not body.lstrip(b"\r\n").startswith(b"--" + boundary):
        return "refused"
    found: list[tuple[list[tuple[bytes, bytes]], bytearray]] = []
    header = [bytearray(), bytearray()]
    ended = []

    def on_header_end() -> None:
        found[-1][0].append((bytes(header[0]).lower(), bytes(header[1]).lstrip(b" \t")))
        header[0].clear()
        header[1].clear()

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": lambda: found.append(([], bytearray())),
            "on_header_field": lambda data, start, end: header[0].extend(data[start:end]),
            "on_header_value": lambda data, start, end: header[1].extend(data[start:end]),
            "on_header_end": on_header_end,
            "on_part_data": lambda data, start, end: found[-1][1].extend(data[start:end]),
            "on_end": lambda: ended.append(True),
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except FormParserError:
        return "refused"
    if not ended:
        return "refused"
    parts: dict[str, tuple[bytes, str | None, bytes | None]] = {}
    for headers, data in found:
        if any(b"\n" in value for _, value in headers):
            return "refused"
        fields = dict(headers)
        kind, options = parse_options_header(fields.get(b"content-disposition"))
        if kind != b"form-data" or b"name" not in options:
            return "refused"
        try:
            name = options[b"name"].decode()
            filename = options[b"filename"].decode() if b"filename" in options else None
        except UnicodeDecodeError:
            return "refused"
        if name in parts:
            return "refused"
        encoding = fields.get(b"content-transfer-encoding")
        if name in WIDE and encoding is not None and encoding.strip().lower() not in (b"7bit", b"8bit", b"binary"):
            return "refused"
        if name in WIDE:
            parts[name] = (bytes(data), filename, fields.get(b"content-type"))
    return parts


def parsed_parts(body: bytes, boundary: bytes) -> dict[str, tuple[bytes, str | None, bytes | None]] | str:
    try:
        parts = parse_form(body, boundary, WIDE, max_parts=64)
    except ServiceError:
        return "refused"
    return {name: (part.data, part.filename, part.content_type) for name, part in parts.items()}


EDGES = [
    b"",
    b"--b--",
    b"--b\r\n",
    b"\r\n\n--b--\r\n",
    b"preamble\r\n--b--\r\n",
    b"--b  \r\n--b--\r\n",
    b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\nhello\r\n--b--',
    b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\nhello\r\n--b--\r\nepilogue',
    b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\nhello--b--\r\n',
    b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\nhello\r\n--bX\r\n--b-x\r\n--b\rX\r\n--b--\r\n',
    b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\nhi\r\n--b \t\r\n'
    b"content-disposition:form-data; name=image\r\n\r\nx\r\n--b--  ",
    b'--b\r\nContent-Disposition form-data; name="text"\r\n\r\nhello\r\n--b--\r\n',
    b'--b\r\nContent-Disposition: form-data;\r\n name="text"\r\n\r\nhello\r\n--b--\r\n',
    b'--b\r\nContent-Disposition : form-data; name="text"\r\n\r\nhello\r\n--b--\r\n',
    b'--b\r\nContent-Disposition: form-data; name="text"\rX\r\n\r\nhello\r\n--b--\r\n',
    b'--b\r\nContent-Disposition: form-data; name="text"\n\r\nhello\r\n--b--\r\n',
    b'--b\r\n: x\r\nContent-Disposition: form-data; name="text"\r\n\r\nhello\r\n--b--\r\n',
    b'--b\r\nX\xc3\xa9: z\r\nContent-Disposition: form-data; name="text"\r\n\r\nhello\r\n--b--\r\n',
    b'--b\r\nX-A_b.c!: z\r\nContent-Disposition:\tform-data; name="text"  \r\n\r\nhe\r\nllo\r\n-\r\n--b--\r\n',
    b"--b\r\n\r\nno headers\r\n--b--\r\n",
    b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\nhello\r\n--b \tX\r\n--b--\r\n',  # padding, no CRLF
    b"--b\r\n" + b"X-A: 1\r\n" * 7 + b'Content-Disposition: form-data; name="text"\r\n\r\nhi\r\n--b--\r\n',  # 8 headers
    b"--b\r\n" + b"X-A: 1\r\n" * 8 + b'Content-Disposition: form-data; name="text"\r\n\r\nhi\r\n--b--\r\n',  # 9 headers
    b"--b\r\nX-A: " + b"p" * 4219 + b'\r\nContent-Disposition: form-data; name="text"\r\n\r\nhi\r\n--b--\r\n',  # 4224
    b"--b\r\nX-A: " + b"p" * 4220 + b'\r\nContent-Disposition: form-data; name="text"\r\n\r\nhi\r\n--b--\r\n',  # 4225
    b"--b\r\nX-A:" + b" " * 5000 + b'v\r\nContent-Disposition: form-data; name="text"\r\n\r\nhi\r\n--b--\r\n',
]


@pytest.mark.parametrize("body", EDGES)
def test_the_form_parser_agrees_with_python_multipart_on_edge_cases(body: bytes) -> None:
    assert parsed_parts(body, b"b") == streamed_parts(body, b"b")


@FUZZ
@given(form=multipart_bodies())
def test_the_form_parser_agrees_with_python_multipart_on_damaged_forms(form: tuple[bytes, bytes]) -> None:
    assert parsed_parts(*form) == streamed_parts(*form)

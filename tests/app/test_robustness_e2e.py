"""Hostile and odd input against a real `python -m app` process: every case gets its defined answer.

One server for the module. The table sends each case together with a good request and then
checks, every time: the status and code, the one error shape, no traceback, nothing of the input
echoed back (a canary string rides in every case's text and file name), the good request's answer
unchanged, the process alive and /healthz answering within 100 ms. Accepted odd images (EXIF
orientations, animations, 16-bit, palettes, alpha) must give exactly what the model says for an
equivalent plain image, computed here without the service.

Then what needs raw sockets (slow and oversized headers and bodies) and a burst of ten times the
server's capacity.
"""

from __future__ import annotations

import io
import json
import select
import selectors
import signal
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from model.package import ModelPackage, load_package
from model.preprocess import decode_image, tokenize
from tests.app.conftest import FormPart, image_file, metric, multipart, picture
from tests.app.servers import SERVER_ARGS, Server, read_answer, running_server
from tests.conftest import TEST_LABELS

pytestmark = pytest.mark.slow

CANARY = "zq7canary"  # never appears in an answer, a header or the server's log
TEXT = f"What shape? {CANARY}"
FILENAME = f"{CANARY}.png"
GOOD_IMAGE, GOOD_TEXT = picture(color=(30, 160, 90)), "Is the green object round?"
MAX_QUEUE, MAX_BATCH = 16, 8
ROBUST_ARGS = (*SERVER_ARGS, "--body-timeout-s", "1", "--header-timeout-s", "1", "--max-queue", str(MAX_QUEUE))


@pytest.fixture(scope="module")
def server(probe_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(probe_package, tmp_path_factory.mktemp("robust"), *ROBUST_ARGS) as running:
        yield running


@pytest.fixture(scope="module")
def prober(server: Server) -> Iterator[httpx.Client]:
    """A kept-alive connection for /healthz, so that timings measure the server, not a handshake."""
    with httpx.Client(base_url=server.url, timeout=5) as client:
        yield client


@pytest.fixture(scope="module")
def clients(server: Server) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    """Kept-alive clients for the case and for the good request sent beside it (one thread each)."""
    with httpx.Client(base_url=server.url, timeout=30) as case, httpx.Client(base_url=server.url, timeout=30) as good:
        yield case, good


@pytest.fixture(scope="module")
def model(probe_package: Path) -> ModelPackage:
    return load_package(probe_package)


def model_answer(model: ModelPackage, image: bytes, text: str) -> list[tuple[str, float]]:
    """The top 5 (label, probability) the model itself gives, without the service."""
    pixels = torch.from_numpy(decode_image(image, model.manifest.image_size)).unsqueeze(0)  # [1, 3, H, W]
    tokens = torch.from_numpy(tokenize(text, model.manifest.max_text_length).ids).unsqueeze(0)  # [1, L]
    with torch.inference_mode():
        probs = torch.softmax(model.module(pixels, tokens)["logits"][0], dim=-1)
    order = torch.argsort(probs, descending=True, stable=True)[:5].tolist()
    return [(TEST_LABELS[i], float(probs[i])) for i in order]


def assert_answer(answer: dict[str, Any], expected: list[tuple[str, float]]) -> None:
    """Same labels in the same order, scores equal up to float rounding (a batch sums in another
    order than a single item)."""
    assert [entry["label"] for entry in answer["top_k"]] == [label for label, _ in expected]
    np.testing.assert_allclose([entry["score"] for entry in answer["top_k"]], [s for _, s in expected], atol=1e-5)


def ranked(answer: dict[str, Any]) -> list[tuple[str, float]]:
    return [(entry["label"], entry["score"]) for entry in answer["top_k"]]


# -- images ------------------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def upright() -> Image.Image:
    """Not symmetric in any direction: a red blob top left, a blue bar at the bottom."""
    image = Image.new("RGB", (48, 32), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    draw.ellipse([2, 2, 18, 14], fill=(220, 30, 30))
    draw.rectangle([20, 24, 46, 30], fill=(30, 30, 220))
    return image


# exif_transpose applies these for orientations 2..8; storing the inverse makes it upright again.
T = Image.Transpose
UNDO = {
    1: None,
    2: T.FLIP_LEFT_RIGHT,
    3: T.ROTATE_180,
    4: T.FLIP_TOP_BOTTOM,
    5: T.TRANSPOSE,
    6: T.ROTATE_90,
    7: T.TRANSVERSE,
    8: T.ROTATE_270,
}


def with_orientation(orientation: int) -> bytes:
    transform = UNDO[orientation]
    stored = upright() if transform is None else upright().transpose(transform)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, exif=exif)


def animated(fmt: str, **options: Any) -> bytes:
    second = Image.new("RGB", (48, 32), (20, 20, 200))
    return encode(upright(), fmt, save_all=True, append_images=[second], **options)


def sixteen_bit() -> tuple[bytes, bytes]:
    """A 16-bit grayscale PNG of v * 257, and the 8-bit PNG of v it must read as."""
    values = (np.arange(48 * 32, dtype=np.uint16).reshape(32, 48) * 7) % 256  # [H, W]
    deep = Image.fromarray((values * 257).astype(np.uint16))
    return encode(deep), encode(Image.fromarray(values.astype(np.uint8), mode="L"))


def transparent() -> tuple[bytes, bytes]:
    """RGBA with a transparent background, and the same drawn on white."""
    rgba = Image.new("RGBA", (48, 32), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).ellipse([4, 4, 30, 28], fill=(200, 40, 40, 255))
    white = Image.new("RGB", (48, 32), (255, 255, 255))
    ImageDraw.Draw(white).ellipse([4, 4, 30, 28], fill=(200, 40, 40))
    return encode(rgba), encode(white)


def gray_alpha() -> tuple[bytes, bytes]:
    la = Image.new("LA", (48, 32), (0, 0))
    ImageDraw.Draw(la).rectangle([4, 4, 30, 28], fill=(90, 255))
    white = Image.new("L", (48, 32), 255)
    ImageDraw.Draw(white).rectangle([4, 4, 30, 28], fill=90)
    return encode(la), encode(white.convert("RGB"))


def palette(transparency: bool) -> tuple[bytes, bytes]:
    """A palette PNG and its RGB equivalent; with transparency, the background's index is the
    transparent one, so the equivalent has a white background."""
    indexed = upright().quantize(8)
    rgb = np.array(indexed.convert("RGB"))  # [H, W, 3]
    if not transparency:
        return encode(indexed), encode(Image.fromarray(rgb))
    background = np.array(indexed)[0, -1]
    rgb[np.array(indexed) == background] = 255
    return encode(indexed, transparency=int(background)), encode(Image.fromarray(rgb))


def animated_gif() -> tuple[bytes, bytes]:
    """A two-frame GIF of palette images (stored exactly), and its first frame as a plain PNG."""
    first, second = upright().quantize(16), Image.new("RGB", (48, 32), (20, 20, 200)).quantize(4)
    return encode(first, "GIF", save_all=True, append_images=[second]), encode(first.convert("RGB"))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's header), then a little data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    rows = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")


def gif_claiming(width: int, height: int) -> bytes:
    screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
    descriptor = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return b"GIF89a" + screen + descriptor + b"\x02\x02\x44\x01\x00;"


SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect/></svg>'
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


# -- the table ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    status: int
    code: str | None = None  # the error code (None for 200)
    parts: tuple[FormPart, ...] | None = None  # a multipart body written by hand ...
    content: bytes | None = None  # ... or any body
    headers: dict[str, str] = field(default_factory=dict)
    path: str = "/predict"
    method: str = "POST"
    same_as: tuple[bytes, str] | None = None  # a 200 equals the model's answer on this input
    fast: bool = False  # answered within 100 ms

    def request(self) -> dict[str, Any]:
        if self.parts is not None:
            content, headers = multipart(*self.parts)
            return {"content": content, "headers": {**headers, **self.headers}}
        return {"content": self.content, "headers": self.headers}


def image_case(name: str, image: bytes, status: int, code: str | None = None, **extra: Any) -> Case:
    same_as = extra.pop("same_as", (image, TEXT) if status == 200 else None)
    return Case(
        name, status, code, parts=(image_file(image, FILENAME), ("text", TEXT.encode())), same_as=same_as, **extra
    )


def text_case(name: str, text: bytes, status: int, code: str | None = None, **part_headers: str) -> Case:
    text_part: FormPart = ("text", text, part_headers) if part_headers else ("text", text)
    image = picture()
    same_as = (image, text.decode()) if status == 200 else None
    return Case(name, status, code, parts=(image_file(image, FILENAME), text_part), same_as=same_as)


def raw(name: str, status: int, code: str, content: bytes, content_type: str | None) -> Case:
    headers = {"Content-Type": content_type} if content_type is not None else {}
    return Case(name, status, code, content=content, headers=headers)


MULTIPART_B = "multipart/form-data; boundary=b"
GOOD = picture()
deep, deep_as_8bit = sixteen_bit()
rgba, rgba_on_white = transparent()
la, la_on_white = gray_alpha()
indexed, indexed_rgb = palette(transparency=False)
indexed_alpha, indexed_alpha_on_white = palette(transparency=True)
plain_upright = encode(upright())
first_frame = encode(upright())
gif, gif_first_frame = animated_gif()
text_disposition = {"Content-Disposition": 'form-data; name="text"'}

CASES = [
    # Content type and multipart framing.
    raw("no content type", 415, "unsupported_media_type", b"text=hello", None),
    raw("json", 415, "unsupported_media_type", b'{"text": "' + CANARY.encode() + b'"}', "application/json"),
    raw("plain text", 415, "unsupported_media_type", TEXT.encode(), "text/plain"),
    raw("urlencoded", 415, "unsupported_media_type", f"text={CANARY}".encode(), "application/x-www-form-urlencoded"),
    raw("multipart/mixed", 415, "unsupported_media_type", b"--b--\r\n", "multipart/mixed; boundary=b"),
    raw("no boundary", 400, "malformed_request", b"--b--\r\n", "multipart/form-data"),
    raw("boundary too long", 400, "malformed_request", b"--b--\r\n", "multipart/form-data; boundary=" + "b" * 71),
    raw("empty body", 400, "malformed_request", b"", MULTIPART_B),
    raw("garbage body", 400, "malformed_request", CANARY.encode() * 20, MULTIPART_B),
    raw("another boundary", 400, "malformed_request", multipart(("text", TEXT.encode()))[0], MULTIPART_B),
    raw(
        "no closing boundary",
        400,
        "malformed_request",
        b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\nq',
        MULTIPART_B,
    ),
    raw(
        "part without a name",
        400,
        "malformed_request",
        b"--b\r\nContent-Type: text/plain\r\n\r\nq\r\n--b--\r\n",
        MULTIPART_B,
    ),
    raw(
        "part name not UTF-8",
        400,
        "malformed_request",
        b'--b\r\nContent-Disposition: form-data; name="\xff"\r\n\r\nq\r\n--b--\r\n',
        MULTIPART_B,
    ),
    Case(
        "base64 transfer encoding",
        400,
        "malformed_request",
        parts=(image_file(GOOD, FILENAME), ("text", b"cT8=", {"Content-Transfer-Encoding": "base64"})),
    ),
    # Parts.
    Case("no image", 422, "missing_field", parts=(("text", TEXT.encode()),)),
    Case("no text", 422, "missing_field", parts=(image_file(GOOD, FILENAME),)),
    Case("only unknown parts", 422, "missing_field", parts=(("question", TEXT.encode()),)),
    Case("text twice", 422, "duplicate_field", parts=(image_file(GOOD, FILENAME), ("text", b"a"), ("text", b"b"))),
    Case(
        "image twice",
        422,
        "duplicate_field",
        parts=(image_file(GOOD, FILENAME), image_file(GOOD, FILENAME), ("text", b"q")),
    ),
    Case(
        "unknown parts are ignored",
        200,
        parts=(image_file(GOOD, FILENAME), ("text", TEXT.encode()), ("extra", b"x"), ("extra", b"y")),
        same_as=(GOOD, TEXT),
    ),
    Case(
        "too many parts",
        413,
        "too_many_parts",
        parts=(image_file(GOOD, FILENAME), ("text", b"q"), *[(f"x{i}", b"") for i in range(7)]),
    ),
    Case("image as a plain field", 200, parts=(("image", GOOD), ("text", TEXT.encode())), same_as=(GOOD, TEXT)),
    Case(
        "text as a file",
        200,
        parts=(
            image_file(GOOD, FILENAME),
            ("text", TEXT.encode(), {"Content-Disposition": f'form-data; name="text"; filename="{FILENAME}"'}),
        ),
        same_as=(GOOD, TEXT),
    ),
    Case(
        "image part declares another type",
        200,
        parts=(
            (
                "image",
                GOOD,
                {
                    "Content-Disposition": f'form-data; name="image"; filename="{FILENAME}"',
                    "Content-Type": "image/tiff",
                },
            ),
            ("text", TEXT.encode()),
        ),
        same_as=(GOOD, TEXT),
    ),
    Case("embed with nothing", 422, "missing_field", path="/embed", parts=(("other", b""),)),
    # Broken images.
    image_case("empty image", b"", 422, "empty_image"),
    image_case("truncated PNG", GOOD[: len(GOOD) // 2], 422, "corrupt_image"),
    image_case("truncated JPEG", picture(fmt="JPEG")[:300], 422, "corrupt_image"),
    image_case("PNG signature, garbage after", b"\x89PNG\r\n\x1a\n" + CANARY.encode() * 30, 422, "corrupt_image"),
    image_case(
        "random bytes",
        bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)),
        415,
        "unsupported_format",
    ),
    # Formats outside the allowlist.
    image_case("TIFF", picture(fmt="TIFF"), 415, "unsupported_format"),
    image_case("ICO", picture(fmt="ICO"), 415, "unsupported_format"),
    image_case("SVG", SVG, 415, "unsupported_format"),
    image_case("PDF", PDF, 415, "unsupported_format"),
    # Dimensions, from the header: a bomb costs nothing.
    image_case("PNG bomb 100000x100000", png_claiming(100_000, 100_000), 422, "image_dimensions", fast=True),
    image_case("PNG 12001 wide", png_claiming(12_001, 1000), 422, "image_dimensions", fast=True),
    image_case("GIF bomb 65535x65535", gif_claiming(65_535, 65_535), 422, "image_dimensions", fast=True),
    image_case("1x1", encode(Image.new("RGB", (1, 1), (200, 10, 10))), 200),
    image_case("aspect 50:1", encode(Image.new("RGB", (100, 2), (10, 200, 10))), 200),
    image_case("aspect 51:1", encode(Image.new("RGB", (102, 2), (10, 200, 10))), 422, "image_dimensions"),
    image_case("aspect 1:51", encode(Image.new("RGB", (2, 102), (10, 200, 10))), 422, "image_dimensions"),
    # Odd but valid images: each equals its plain equivalent.
    image_case("animated GIF", gif, 200, same_as=(gif_first_frame, TEXT)),
    image_case("animated WebP", animated("WEBP", lossless=True), 200, same_as=(first_frame, TEXT)),
    image_case("animated PNG", animated("PNG"), 200, same_as=(first_frame, TEXT)),
    image_case("CMYK JPEG", encode(Image.new("CMYK", (48, 32), (10, 200, 30, 0)), "JPEG"), 200),
    image_case("16-bit grayscale PNG", deep, 200, same_as=(deep_as_8bit, TEXT)),
    image_case("palette PNG", indexed, 200, same_as=(indexed_rgb, TEXT)),
    image_case("palette PNG with transparency", indexed_alpha, 200, same_as=(indexed_alpha_on_white, TEXT)),
    image_case("RGBA PNG", rgba, 200, same_as=(rgba_on_white, TEXT)),
    image_case("gray + alpha PNG", la, 200, same_as=(la_on_white, TEXT)),
    *[
        image_case(f"EXIF orientation {o}", with_orientation(o), 200, same_as=(plain_upright, TEXT))
        for o in range(1, 9)
    ],
    # Text.
    text_case("empty text", b"", 422, "empty_text"),
    text_case("whitespace text", b" \t\r\n\xe3\x80\x80 ", 422, "empty_text"),  # ends with U+3000, an ideographic space
    text_case("text at the model's 64 bytes", b"q" * 64, 200),
    text_case("text of 65 bytes", b"q" * 65, 422, "text_too_long"),
    text_case("65 bytes in 2-byte characters", "é".encode() * 32 + b"q", 422, "text_too_long"),
    text_case("huge text", CANARY.encode() * 20_000, 422, "text_too_long"),
    text_case("invalid UTF-8", b"caf\xe9 " + CANARY.encode(), 422, "invalid_text"),
    text_case("overlong UTF-8", b"\xc0\xaf" + CANARY.encode(), 422, "invalid_text"),
    text_case("UTF-8 surrogate", b"\xed\xa0\x80" + CANARY.encode(), 422, "invalid_text"),
    text_case("NUL", b"what\x00" + CANARY.encode(), 422, "invalid_text"),
    text_case("escape", b"\x1b[31m" + CANARY.encode(), 422, "invalid_text"),
    text_case("C1 control", "next\u0085line".encode() + CANARY.encode(), 422, "invalid_text"),
    text_case("DEL", b"a\x7fb" + CANARY.encode(), 422, "invalid_text"),
    text_case("tab and new lines", b"What\tshape?\r\nRed?", 200),
    text_case("byte order mark", "\ufeffWhat shape?".encode(), 200),
    text_case("CJK and emoji", "这是什么形状？🔺".encode(), 200),
    text_case("charset=utf-8", TEXT.encode(), 200, **text_disposition, **{"Content-Type": "text/plain; charset=UTF-8"}),
    text_case(
        "charset=us-ascii", TEXT.encode(), 200, **text_disposition, **{"Content-Type": "text/plain; charset=us-ascii"}
    ),
    text_case(
        "charset=iso-8859-1",
        b"caf\xe9",
        422,
        "unsupported_charset",
        **text_disposition,
        **{"Content-Type": "text/plain; charset=iso-8859-1"},
    ),
    text_case(
        "charset=utf-16",
        "hi".encode("utf-16"),
        422,
        "unsupported_charset",
        **text_disposition,
        **{"Content-Type": "text/plain; charset=utf-16"},
    ),
    # top_k.
    Case("top_k 0", 422, "invalid_top_k", parts=(image_file(GOOD, FILENAME), ("text", b"q"), ("top_k", b"0"))),
    Case("top_k -1", 422, "invalid_top_k", parts=(image_file(GOOD, FILENAME), ("text", b"q"), ("top_k", b"-1"))),
    Case("top_k 1e3", 422, "invalid_top_k", parts=(image_file(GOOD, FILENAME), ("text", b"q"), ("top_k", b"1e3"))),
    Case(
        "top_k too long", 422, "invalid_top_k", parts=(image_file(GOOD, FILENAME), ("text", b"q"), ("top_k", b"1" * 17))
    ),
    # Headers.
    Case(
        "deadline header not a number",
        422,
        "invalid_timeout",
        parts=(image_file(GOOD, FILENAME), ("text", b"q")),
        headers={"X-Request-Timeout-Ms": CANARY},
    ),
    # Methods and paths.
    Case("GET /predict", 405, "method_not_allowed", method="GET"),
    Case("PUT /embed", 405, "method_not_allowed", method="PUT", path="/embed"),
    Case("unknown path", 404, "not_found", path=f"/{CANARY}"),
    Case("path traversal", 404, "not_found", path="/static/../../etc/passwd"),
    # Model faults (the probe model's markers): only the item fails, with JSON.
    text_case("model raises", b"!" + CANARY.encode(), 500, "model_failure"),
    text_case("model returns NaN", b"~" + CANARY.encode(), 500, "model_failure"),
    text_case("model returns a wrong shape", b"^" + CANARY.encode(), 500, "model_failure"),
    text_case("out of memory even alone", b"&" + CANARY.encode(), 500, "out_of_memory"),
    text_case("out of memory unless alone", b"%" + CANARY.encode(), 200),
]


@pytest.fixture(scope="module")
def reference(server: Server) -> dict[str, Any]:
    """The good request's answer, computed once."""
    answer = httpx.post(f"{server.url}/predict", **good_request(), timeout=30)
    assert answer.status_code == 200
    body: dict[str, Any] = answer.json()
    return body


def good_request() -> dict[str, Any]:
    content, headers = multipart(image_file(GOOD_IMAGE), ("text", GOOD_TEXT.encode()))
    return {"content": content, "headers": headers}


def assert_error_shape(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "request_id"}
    assert body["error"]["code"] == code
    assert body["error"]["request_id"] == response.headers["x-request-id"]


# The model's own injected exceptions: the one traceback each, logged where the failure is pinned
# to the item. No other case may leave one.
LOGS_A_TRACEBACK = {"model raises", "model returns a wrong shape"}


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_gets_its_defined_answer_and_harms_nothing(
    reference: dict[str, Any],
    model: ModelPackage,
    server: Server,
    clients: tuple[httpx.Client, httpx.Client],
    prober: httpx.Client,
    case: Case,
) -> None:
    case_client, good_client = clients
    logged_before = len(server.output())

    def send_case() -> tuple[httpx.Response, float]:
        began = time.perf_counter()
        response = case_client.request(case.method, case.path, **case.request())
        return response, time.perf_counter() - began

    with ThreadPoolExecutor(2) as pool:
        good = pool.submit(good_client.post, "/predict", **good_request())
        response, elapsed = pool.submit(send_case).result()
        good_answer = good.result()

    if case.status == 200:
        assert response.status_code == 200, response.text
        assert case.same_as is not None
        assert_answer(response.json(), model_answer(model, *case.same_as))
    else:
        assert case.code is not None
        assert_error_shape(response, case.status, case.code)
    assert "Traceback" not in response.text and 'File "' not in response.text
    assert CANARY not in response.text and CANARY not in str(response.headers)
    if case.fast:
        assert elapsed < 0.1, elapsed
    assert good_answer.status_code == 200
    assert_answer(good_answer.json(), ranked(reference))
    assert server.process.poll() is None
    assert_fast_health(prober)
    # Logged before the answer went out (and the log file is written unbuffered): this case's lines.
    logged = server.output()[logged_before:]
    assert CANARY not in logged
    assert logged.count("Traceback (most recent call last)") == (case.name in LOGS_A_TRACEBACK), logged


def assert_fast_health(prober: httpx.Client) -> float:
    began = time.perf_counter()
    assert prober.get("/healthz").status_code == 200
    elapsed = time.perf_counter() - began
    assert elapsed < 0.1, elapsed
    return elapsed


# -- slow and oversized requests, over raw sockets -----------------------------------------------------


def read_until_closed(sock: socket.socket, timeout_s: float = 10) -> bytes:
    sock.settimeout(timeout_s)
    reply = b""
    try:
        while chunk := sock.recv(65536):
            reply += chunk
    except ConnectionResetError:
        pass
    return reply


def trickle(port: int, head: bytes, body: bytes, pieces: int, interval_s: float) -> tuple[bytes, float]:
    """Send the head, then the body in `pieces` pieces `interval_s` apart, stopping early when the
    server answers; return its reply (read until it closes) and the seconds since the head."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        began = time.monotonic()
        size = -(-len(body) // pieces)
        for start in range(0, len(body), size):
            answered, _, _ = select.select([sock], [], [], interval_s)
            if answered:
                break
            try:
                sock.sendall(body[start : start + size])
            except OSError:  # the server closed the connection
                break
        reply = read_until_closed(sock)
        return reply, time.monotonic() - began


def status_line(reply: bytes) -> bytes:
    return reply.split(b"\r\n", 1)[0]


def predict_head(length: int) -> bytes:
    _, headers = multipart()
    return (
        f"POST /predict HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: {headers['Content-Type']}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def test_a_body_that_trickles_in_is_cut_off(server: Server, prober: httpx.Client) -> None:
    """--body-timeout-s 1: a body sent in five pieces over half a second is served; one that
    trickles for longer gets 408 at one second, and its connection is closed."""
    body = good_request()["content"]
    reply, _ = trickle(server.port, predict_head(len(body)), body, pieces=5, interval_s=0.1)
    assert status_line(reply) == b"HTTP/1.1 200 OK"
    reply, elapsed = trickle(server.port, predict_head(len(body)), body, pieces=len(body), interval_s=0.05)
    assert status_line(reply) == b"HTTP/1.1 408 Request Timeout", reply
    assert b"connection: close" in reply.lower() and b'"code": "body_timeout"' in reply
    assert 1.0 <= elapsed < 2.0, elapsed
    assert_fast_health(prober)


def test_the_rest_of_a_refused_body_cannot_hold_the_connection(server: Server, prober: httpx.Client) -> None:
    """A 415 is answered from the headers, before the body is read, on a kept-alive connection.
    uvicorn then reads and discards the rest; a client trickling it must not keep the connection
    past --body-timeout-s (1 s) from the answer."""
    head = b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head + b"x" * 10)
        sock.settimeout(5)
        reply = b""
        while b'"request_id"' not in reply:
            reply += sock.recv(65536)
        answered = time.monotonic()
        assert status_line(reply) == b"HTTP/1.1 415 Unsupported Media Type", reply
        assert b"connection: close" not in reply.lower()  # kept alive: the rest of the body is still due
        closed = None
        for _ in range(60):  # one byte every 0.05 s, for up to 3 s
            try:
                sock.sendall(b"x")
            except OSError:
                closed = time.monotonic() - answered
                break
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable and not sock.recv(65536):
                closed = time.monotonic() - answered
                break
        assert closed is not None, "the connection was still open 3 s after the answer"
        assert 0.9 <= closed < 2.0, closed
    assert_fast_health(prober)


def test_a_refused_upload_is_read_to_its_end_so_the_client_gets_its_answer(server: Server) -> None:
    """A 413 is answered from Content-Length alone while the client is still sending 32 MB, on a
    Connection: close request. The server closes lingeringly: the rest of the body is read and
    discarded before the socket closes, so the sender finishes without a reset and reads its 413.
    (A plain close with unread bytes makes the kernel reset the connection under the sender; the
    body is larger than loopback's socket buffers, so that it is still being sent at the answer.)"""
    body = b"x" * (32 * 1024 * 1024)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(predict_head(len(body)) + body)
        reply = read_until_closed(sock)
    assert status_line(reply) == b"HTTP/1.1 413 Request Entity Too Large", reply
    assert b'"code": "payload_too_large"' in reply


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until a one-byte send fails (the server closed for good: its RST came back), or None."""
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        try:
            sock.sendall(b"x")
        except OSError:
            return time.monotonic() - began
        time.sleep(0.05)
    return None


def test_a_lingering_close_answers_at_once_and_ends_at_the_body_timeout(server: Server) -> None:
    """A client that stops sending a refused body gets its 413 and the end of the stream at once;
    the server goes on reading the body (8 MB, more than the socket buffers hold) until
    --body-timeout-s (1 s) after the answer, then closes for good."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(predict_head(30 * 1024 * 1024) + b"x" * 1000)
        began = time.monotonic()
        reply = read_until_closed(sock, timeout_s=5)  # ends at the server's FIN
        assert status_line(reply) == b"HTTP/1.1 413 Request Entity Too Large", reply
        assert time.monotonic() - began < 0.9
        sock.sendall(b"x" * (8 * 1024 * 1024))  # read and discarded on the other side
        closed = closed_within(sock, 3)
        assert closed is not None, "the connection was still open 3 s after the answer"
        assert 0.9 <= time.monotonic() - began < 2.5


def test_a_shutdown_leaves_a_lingering_close_to_finish(probe_package: Path, tmp_path: Path) -> None:
    """SIGTERM while a refused body is still arriving: the server stops accepting, but the sender
    finishes its body without a reset (8 MB after the signal, more than the socket buffers hold),
    and the server exits 0 once it has."""
    length = 12 * 1024 * 1024
    with running_server(probe_package, tmp_path, *SERVER_ARGS, "--max-body-bytes", "4000000",
                        "--max-image-bytes", "3000000", "--body-timeout-s", "20") as server:  # fmt: skip
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(predict_head(length) + b"x" * 1000)
            reply = read_until_closed(sock, timeout_s=5)
            assert status_line(reply) == b"HTTP/1.1 413 Request Entity Too Large", reply
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)  # the server's shutdown has begun
            sock.sendall(b"x" * (length - 1000))
        assert server.process.wait(10) == 0


def test_a_client_refused_before_100_continue_is_closed_at_once(server: Server) -> None:
    """`Expect: 100-continue` and a 413 from the headers: the client will not send the body, so
    there is nothing to linger for."""
    head = predict_head(30 * 1024 * 1024).replace(b"Connection: close", b"Expect: 100-continue")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head)
        reply = read_until_closed(sock, timeout_s=5)
        assert status_line(reply) == b"HTTP/1.1 413 Request Entity Too Large", reply
        assert closed_within(sock, 0.5) is not None


def test_a_refused_body_that_ends_leaves_the_connection_to_the_keep_alive_timer(server: Server) -> None:
    """A 415 from the headers on a kept-alive connection; the client sends the rest of the body and
    goes quiet. The connection closes at uvicorn's keep-alive timeout (5 s) instead of idling
    forever (the body's bytes cancel the timer the answer armed)."""
    head = b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head + b"x" * 10)
        reply = b""
        while b'"request_id"' not in reply:
            reply += sock.recv(65536)
        assert status_line(reply) == b"HTTP/1.1 415 Unsupported Media Type", reply
        sock.sendall(b"x" * 990)
        ended = time.monotonic()
        sock.settimeout(10)
        assert sock.recv(65536) == b""
        assert 4.5 <= time.monotonic() - ended < 7.0


def test_headers_that_trickle_in_are_cut_off(server: Server, prober: httpx.Client) -> None:
    """--header-timeout-s 1: headers in three pieces within 0.3 s are served; headers still arriving
    after a second get 408; a connection that sends nothing is closed after a second."""
    head = b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\nX-Slow: " + b"s" * 20 + b"\r\n\r\n"
    reply, _ = trickle(server.port, b"", head, pieces=3, interval_s=0.1)
    assert status_line(reply) == b"HTTP/1.1 200 OK"
    reply, elapsed = trickle(server.port, b"", head, pieces=len(head), interval_s=0.05)
    assert status_line(reply) == b"HTTP/1.1 408 Request Timeout", reply
    assert b'"code": "header_timeout"' in reply and 0.9 <= elapsed < 2.0, elapsed
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        began = time.monotonic()
        assert read_until_closed(sock) == b""
        assert 0.9 <= time.monotonic() - began < 2.0
    assert_fast_health(prober)


def head_of(size: int) -> bytes:
    """A GET /healthz head of exactly `size` bytes, blank line included."""
    base = b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Pad: \r\n\r\n"
    head = base.replace(b"X-Pad: ", b"X-Pad: " + b"p" * (size - len(base)))
    assert len(head) == size
    return head


def test_headers_at_the_limit_pass_and_one_byte_more_is_431(server: Server) -> None:
    for size, status in (
        (32 * 1024, b"HTTP/1.1 200 OK"),
        (32 * 1024 + 1, b"HTTP/1.1 431 Request Header Fields Too Large"),
    ):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(head_of(size))
            reply = sock.recv(65536)
        assert status_line(reply) == status


def test_an_endless_header_is_refused_without_growing_the_process(server: Server, prober: httpx.Client) -> None:
    """The 431 comes once the head passes the limit (after at most one read past it), and the
    connection closes; the client stops sending when the answer is there, and reads it whole."""
    before = metric(server.metrics(), "process_resident_memory_bytes")
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Endless: ")
        while sent < 64 << 20 and not select.select([sock], [], [], 0.05)[0]:
            sock.sendall(b"e" * (64 << 10))
            sent += 64 << 10
        reply = read_until_closed(sock)
    assert sent < 2 << 20, f"no answer after {sent} bytes"
    assert status_line(reply) == b"HTTP/1.1 431 Request Header Fields Too Large", reply[:200]
    assert b'"code": "headers_too_large"' in reply
    assert metric(server.metrics(), "process_resident_memory_bytes") - before < 16 << 20
    assert_fast_health(prober)


# -- an upgrade offer, ignored ----------------------------------------------------------------------

H2C_OFFER = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"


def chunked(body: bytes, size: int) -> bytes:
    pieces = [body[start : start + size] for start in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


def test_a_post_offering_h2c_is_served_as_http_1_1_with_its_body(
    server: Server, reference: dict[str, Any], prober: httpx.Client
) -> None:
    """Java's HttpClient, Spring's RestClient and Ktor offer an h2c upgrade on plain-HTTP POSTs.
    The server ignores the offer and serves the request with its body, framed by length or in
    chunks, however the packets split it; the kept-alive connection then serves what follows,
    an offer without a body and a request sent right behind it included."""
    good = good_request()
    body, content_type = good["content"], good["headers"]["Content-Type"].encode()
    head = b"POST /predict HTTP/1.1\r\nHost: test\r\n" + H2C_OFFER + b"Content-Type: " + content_type + b"\r\n"
    by_length = head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    in_chunks = head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body, 1000)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        for request, split_at in ((by_length, len(by_length)), (in_chunks, len(head) + 40), (by_length, len(head))):
            sock.sendall(request[:split_at])
            time.sleep(0.05)
            sock.sendall(request[split_at:])
            head, answer = read_answer(sock)
            assert status_line(head) == b"HTTP/1.1 200 OK", answer
            assert_answer(json.loads(answer), ranked(reference))
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: test\r\n" + H2C_OFFER + b"\r\nGET /readyz HTTP/1.1\r\nHost: test\r\n\r\n"
        )
        # Pipelined: both answers may come in one read.
        assert read_answers(sock, 2) == [
            (b"HTTP/1.1 200 OK", b'{"status": "alive"}'),
            (b"HTTP/1.1 200 OK", b'{"status": "ready"}'),
        ]
    assert b"Unsupported upgrade request" not in server.output().encode()
    assert_fast_health(prober)


def test_hundreds_of_offers_in_one_read_are_all_served(server: Server) -> None:
    """Each offer pauses the parser once: a read holding 1000 of them (58 KB), with bodies or
    without, is parsed in a loop, and every one is answered."""
    bare = b"GET /healthz HTTP/1.1\r\nHost: test\r\n" + H2C_OFFER + b"\r\n"
    with_body = b"GET /healthz HTTP/1.1\r\nHost: test\r\n" + H2C_OFFER + b"Content-Length: 1\r\n\r\nx"
    for one in (bare, with_body):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(one * 1000)
            answers = read_answers(sock, 1000)
        assert set(answers) == {(b"HTTP/1.1 200 OK", b'{"status": "alive"}')}


def read_answers(sock: socket.socket, count: int) -> list[tuple[bytes, bytes]]:
    """`count` pipelined answers, each framed by its Content-Length: status lines and bodies."""
    buffer, answers = b"", list[tuple[bytes, bytes]]()
    while len(answers) < count:
        head, separator, rest = buffer.partition(b"\r\n\r\n")
        lengths = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
        if separator and len(rest) >= (length := int(lengths[0][15:])):
            answers.append((status_line(head), rest[:length]))
            buffer = rest[length:]
            continue
        chunk = sock.recv(65536)
        assert chunk, f"closed after {len(answers)} answers"
        buffer += chunk
    return answers


def test_an_offer_on_a_closing_request_reads_nothing_after_it(server: Server) -> None:
    """HTTP/1.0, or `Connection: close`: what follows the request is not read, with or without an
    upgrade offer, with a body or without; the request is answered and the connection closed."""
    junk = b"\x16\x03\x01 junk\r\n\r\n"
    requests = [
        b"GET /healthz HTTP/1.0\r\n" + H2C_OFFER + b"Content-Length: 5\r\n\r\nhello",
        b"GET /healthz HTTP/1.0\r\n" + H2C_OFFER + b"\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close, upgrade\r\nUpgrade: h2c\r\n"
        b"Content-Length: 5\r\n\r\nhello",
    ]
    for request in requests:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(request + junk)
            reply = read_until_closed(sock)
        assert reply.count(b"HTTP/1.1 ") == 1 and status_line(reply) == b"HTTP/1.1 200 OK", reply


# -- overload ------------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    seconds: float  # from its own write to the end of the answer
    retry_after: bytes | None
    code: bytes | None


def parse_answer(reply: bytes, seconds: float) -> Answer:
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = dict(line.lower().split(b": ", 1) for line in lines[1:])
    code = body.split(b'"code": "', 1)[1].split(b'"', 1)[0] if b'"code": "' in body else None
    return Answer(int(lines[0].split()[1]), seconds, headers.get(b"retry-after"), code)


def raw_burst(port: int, request: bytes, count: int) -> list[Answer]:
    """Open `count` connections first, then write the same request on each as fast as the loop
    goes (a few ms for all), and read every answer. Raw sockets: a client library's own work
    would spread the burst over seconds."""
    sockets = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(count)]
    selector = selectors.DefaultSelector()
    sent: dict[socket.socket, float] = {}
    replies: dict[socket.socket, bytes] = {}
    for sock in sockets:
        sock.sendall(request)
        sent[sock], replies[sock] = time.perf_counter(), b""
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    answers: list[Answer] = []
    while len(answers) < count:
        events = selector.select(30)
        assert events, "the server stopped answering"
        for key, _ in events:
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            chunk = ready.recv(65536)
            if chunk:
                replies[ready] += chunk
                continue
            answers.append(parse_answer(replies[ready], time.perf_counter() - sent[ready]))
            selector.unregister(ready)
            ready.close()
    return answers


def test_a_burst_of_ten_times_capacity(server: Server, prober: httpx.Client) -> None:
    """The server holds MAX_QUEUE admitted requests plus a running batch of MAX_BATCH; ten times that
    arrive at once, each batch a few hundred ms of device time. The excess is refused at once with
    429 and Retry-After; every accepted request is answered within its deadline; /healthz stays
    fast throughout; memory does not grow; and the next request after the burst is served at once."""
    capacity = MAX_QUEUE + MAX_BATCH
    content, form_headers = multipart(image_file(GOOD_IMAGE), ("text", b"#" * 8 + b" burst"))
    request = (
        f"POST /predict HTTP/1.1\r\nHost: test\r\nConnection: close\r\nX-Request-Timeout-Ms: 5000\r\n"
        f"Content-Type: {form_headers['Content-Type']}\r\nContent-Length: {len(content)}\r\n\r\n"
    ).encode() + content
    before = server.metrics()
    health: list[float] = []
    with ThreadPoolExecutor(1) as pool:
        burst = pool.submit(raw_burst, server.port, request, 10 * capacity)
        while not burst.done():
            health.append(assert_fast_health(prober))
            time.sleep(0.02)
        answers = burst.result()
    after = server.metrics()

    served = [a for a in answers if a.status == 200]
    shed = [a for a in answers if a.status == 429]
    assert len(served) + len(shed) == 10 * capacity, {a.status for a in answers}
    assert len(served) >= MAX_QUEUE and len(shed) >= 5 * capacity, (len(served), len(shed))
    assert {a.code for a in shed} == {b"overloaded"} and all(int(a.retry_after or 0) >= 1 for a in shed)
    assert max(a.seconds for a in shed) < 0.5, sorted(a.seconds for a in shed)[-5:]
    assert max(a.seconds for a in served) < 5.0  # within the deadline every request carried
    assert len(health) >= 3, "the burst ended before /healthz could be probed during it"
    shed_metric = metric(after, "fusion_requests_shed_total", reason="queue_full")
    assert shed_metric - metric(before, "fusion_requests_shed_total", reason="queue_full") == len(shed)
    assert (
        metric(after, "fusion_queue_depth", stage="decode") == metric(after, "fusion_queue_depth", stage="queue") == 0
    )
    grown = metric(after, "process_resident_memory_bytes") - metric(before, "process_resident_memory_bytes")
    assert grown < 32 << 20, grown
    began = time.perf_counter()
    assert httpx.post(f"{server.url}/predict", timeout=5, **good_request()).status_code == 200
    assert time.perf_counter() - began < 0.5
    assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200


def test_the_log_never_shows_the_input(server: Server) -> None:
    """The whole log once more (each bad-input case checks its own lines): what every other test of
    the module sent, the canary included, is nowhere in the server's output."""
    log = server.output()
    assert CANARY not in log
    assert "Exception in ASGI application" not in log and "Unhandled" not in log

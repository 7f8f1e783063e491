"""The benchmark's requests: ShapesQA scenes and photos, English and Chinese texts, /predict and /embed.

A mix is a fixed, seeded rotation of fully built HTTP requests (head and multipart body as bytes),
so a load generator only writes bytes: nothing is encoded while the clock runs. The same rotation
drives the in-process ceilings, so served and in-process numbers cover the same inputs.

What is in the default mix (weights per request):
- images: ShapesQA scenes of 64, 128, 256 and 512 px (JPEG q85, the data set's own renderer), a
  1024x768 photo and a 4000x3000 (12-megapixel) photo, both JPEG q92 with lighting and sensor
  noise so that they compress like camera pictures (flat synthetic colors would compress to a
  tenth of a real photo's bytes and decode unrealistically fast);
- texts: questions about the scene in English or Chinese (about half each); captions for /embed;
- routes: /predict 60 %, /embed with both inputs 20 %, image only 10 %, text only 10 %.

Bad requests (for the memory run): not multipart, a truncated JPEG, bytes in no image format, a
missing or empty text, a text over the model's limit, a bad top_k, an unterminated multipart body.
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from trainer.shapesqa import RenderStyle, caption, render_scene, sample_question, sample_scene

T = TypeVar("T")
BOUNDARY = "fusionbench7MA4YWxkTrZu0gW"
ROUTE_WEIGHTS: tuple[tuple[str, str, int], ...] = (
    # route, batch lane (app.engine.Kind), weight
    ("/predict", "fuse", 60),
    ("/embed", "fuse", 20),
    ("/embed", "image", 10),
    ("/embed", "text", 10),
)


@dataclass(frozen=True)
class Picture:
    name: str  # "scene-256", "photo-12MP"
    data: bytes  # JPEG
    width: int
    height: int
    question_en: str
    question_zh: str
    caption_en: str
    caption_zh: str


@dataclass(frozen=True)
class Payload:
    route: str
    kind: str  # the batch lane it runs in: fuse, image, text
    image: bytes | None
    image_name: str  # which picture, "" for text only
    text: str | None
    lang: str
    expect: int = 200
    note: str = ""  # for bad requests: what is wrong with it

    def request(self) -> bytes:
        fields: list[tuple[str, bytes, str | None]] = []
        if self.image is not None:
            fields.append(("image", self.image, "image/jpeg"))
        if self.text is not None:
            fields.append(("text", self.text.encode("utf-8"), None))
        return http_request(self.route, multipart_body(fields))


def with_header(request: bytes, name: str, value: str) -> bytes:
    """The request with one more header, after its request line."""
    line_end = request.index(b"\r\n") + 2
    return request[:line_end] + f"{name}: {value}\r\n".encode("ascii") + request[line_end:]


def with_deadline(requests: Sequence[bytes], deadline_ms: int) -> list[bytes]:
    """The requests, each allowing `deadline_ms` (X-Request-Timeout-Ms)."""
    return [with_header(request, "X-Request-Timeout-Ms", str(deadline_ms)) for request in requests]


def multipart_body(fields: Sequence[tuple[str, bytes, str | None]], *, close: bool = True) -> bytes:
    """multipart/form-data; a field with a content type is sent as a file."""
    out = io.BytesIO()
    for name, data, content_type in fields:
        out.write(f"--{BOUNDARY}\r\n".encode())
        if content_type is None:
            out.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        else:
            out.write(
                f'Content-Disposition: form-data; name="{name}"; filename="{name}.jpg"\r\n'
                f"Content-Type: {content_type}\r\n\r\n".encode()
            )
        out.write(data)
        out.write(b"\r\n")
    if close:
        out.write(f"--{BOUNDARY}--\r\n".encode())
    return out.getvalue()


def http_request(
    path: str, body: bytes, content_type: str = f"multipart/form-data; boundary={BOUNDARY}", method: str = "POST"
) -> bytes:
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: bench\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


def _jpeg(image: Image.Image, quality: int, subsampling: int = 2) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=subsampling)
    return buffer.getvalue()


def _texts(rng: random.Random, scene: object) -> dict[str, str]:
    return {
        "question_en": sample_question(scene, rng, "en").text,  # type: ignore[arg-type]
        "question_zh": sample_question(scene, rng, "zh").text,  # type: ignore[arg-type]
        "caption_en": caption(scene, "en"),  # type: ignore[arg-type]
        "caption_zh": caption(scene, "zh"),  # type: ignore[arg-type]
    }


def scene_picture(side: int, seed: int) -> Picture:
    rng = random.Random(f"bench:scene:{side}:{seed}")
    scene = sample_scene(rng, side)
    style = RenderStyle(raster="mask", supersample=2, noise_std=2.0, mono_noise=False)
    image = render_scene(scene, rng, style)
    return Picture(f"scene-{side}", _jpeg(image, 85), side, side, **_texts(rng, scene))


def photo_picture(width: int, height: int, seed: int) -> Picture:
    """A ShapesQA scene shot like a photo: uneven lighting and sensor noise, 4:2:0 JPEG q92."""
    rng = random.Random(f"bench:photo:{width}x{height}:{seed}")
    side = min(width, height)
    scene = sample_scene(rng, side)
    image = render_scene(scene, rng, RenderStyle(raster="mask", supersample=1, noise_std=0.0))
    image = image.resize((width, height), Image.Resampling.BILINEAR)
    noise = np.random.default_rng(seed)
    y, x = np.ogrid[0:height, 0:width]
    light = 0.85 + 0.25 * (x / width) * (1 - 0.5 * y / height)  # [H, W] brighter towards one corner
    pixels = np.asarray(image, dtype=np.float32) * light[..., None].astype(np.float32)
    pixels += noise.standard_normal(pixels.shape, dtype=np.float32) * np.float32(7.0)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    megapixels = width * height / 1e6
    name = f"photo-{megapixels:.0f}MP" if megapixels >= 1.5 else f"photo-{width}x{height}"
    return Picture(name, _jpeg(image, 92), width, height, **_texts(rng, scene))


@dataclass(frozen=True)
class MixSpec:
    """What a mix holds; `photo` is the large picture (12 MP by default; tests use a small one)."""

    slots: int = 200
    seed: int = 0
    scene_sides: tuple[int, ...] = (64, 128, 256, 512)
    scene_weights: tuple[int, ...] = (24, 24, 24, 20)
    scenes_per_side: int = 6
    medium_photo: tuple[int, int] = (1024, 768)
    medium_weight: int = 6
    photo: tuple[int, int] = (4000, 3000)
    photo_weight: int = 2  # of the 100 weight units: 3 of the 200 requests (1.5 %) carry a 12 MP photo
    routes: tuple[tuple[str, str, int], ...] = ROUTE_WEIGHTS

    def scenes_only(self) -> MixSpec:
        """The uniform workload: /predict with ShapesQA scenes alone (no photos, no /embed)."""
        return replace(self, medium_weight=0, photo_weight=0, routes=(("/predict", "fuse", 1),))


def build_pictures(spec: MixSpec) -> dict[str, list[Picture]]:
    pictures: dict[str, list[Picture]] = {}
    for side in spec.scene_sides:
        pictures[f"scene-{side}"] = [scene_picture(side, seed) for seed in range(spec.scenes_per_side)]
    medium = [photo_picture(*spec.medium_photo, seed=seed) for seed in range(2)]
    large = [photo_picture(*spec.photo, seed=0)]
    pictures[medium[0].name] = medium
    pictures[large[0].name] = large
    return pictures


def build_mix(spec: MixSpec, max_text_length: int, pictures: dict[str, list[Picture]] | None = None) -> list[Payload]:
    """The rotation: `spec.slots` requests drawn with the spec's weights, fixed by the seed.

    Every text fits the model's `max_text_length` (in UTF-8 bytes): a caption that does not is
    replaced by the question, and a question that does not is cut at a character boundary.
    `pictures` (from build_pictures) lets two mixes share the rendering work.
    """
    pictures = pictures if pictures is not None else build_pictures(spec)
    groups = [f"scene-{side}" for side in spec.scene_sides] + list(pictures)[len(spec.scene_sides) :]
    weights = [*spec.scene_weights, spec.medium_weight, spec.photo_weight]
    rng = random.Random(f"bench:mix:{spec.seed}")
    # Deterministic shares, shuffled: the picture groups and routes occur in exact proportions.
    picks = _proportional(groups, weights, spec.slots, rng)
    routes = _proportional(list(range(len(spec.routes))), [w for _, _, w in spec.routes], spec.slots, rng)
    payloads = []
    for index, (group, route_index) in enumerate(zip(picks, routes, strict=True)):
        picture = pictures[group][index % len(pictures[group])]
        route, kind, _ = spec.routes[route_index]
        lang = "en" if rng.random() < 0.5 else "zh"
        question = picture.question_en if lang == "en" else picture.question_zh
        text = question if route == "/predict" else picture.caption_en if lang == "en" else picture.caption_zh
        if len(text.encode()) > max_text_length:
            text = question
        text = text.encode()[:max_text_length].decode("utf-8", errors="ignore")
        image = picture.data if kind in ("fuse", "image") else None
        payloads.append(
            Payload(
                route=route,
                kind=kind,
                image=image,
                image_name=picture.name if image is not None else "",
                text=text if kind in ("fuse", "text") else None,
                lang=lang,
            )
        )
    return payloads


def _proportional(values: Sequence[T], weights: Sequence[int], count: int, rng: random.Random) -> list[T]:
    total = sum(weights)
    shares = [count * w // total for w in weights]
    weighted = sorted((i for i in range(len(values)) if weights[i]), key=lambda i: -weights[i])
    for index in weighted[: count - sum(shares)]:  # the rounding remainder, to the heaviest
        shares[index] += 1
    result = [value for value, share in zip(values, shares, strict=True) for _ in range(share)]
    rng.shuffle(result)
    return result


def bad_requests(good: Sequence[Payload], max_text_length: int) -> list[Payload]:
    """One of each kind of refusal the service gives for a client's mistake (4xx)."""
    jpeg = next(p.image for p in good if p.image is not None and p.image_name.startswith("scene"))
    assert jpeg is not None
    question = "What shape is the red object?"
    return [
        Payload("/predict", "", None, "", None, "", 415, "not multipart"),
        Payload("/predict", "fuse", jpeg[: len(jpeg) // 2], "truncated", question, "en", 422, "truncated JPEG"),
        Payload("/predict", "fuse", b"GIF89a" + bytes(200), "junk", question, "en", 422, "corrupt GIF header"),
        Payload("/predict", "fuse", bytes(range(256)) * 4, "junk", question, "en", 415, "no image format"),
        Payload("/predict", "fuse", jpeg, "scene", None, "en", 422, "missing text"),
        Payload("/predict", "fuse", jpeg, "scene", "   ", "en", 422, "empty text"),
        Payload("/predict", "fuse", jpeg, "scene", "x" * (max_text_length + 40), "en", 422, "text too long"),
        Payload("/embed", "", None, "", None, "", 422, "nothing to embed"),
        Payload("/predict", "", None, "", None, "", 400, "unterminated multipart"),
        Payload("/predict", "", None, "", None, "", 422, "bad top_k"),
    ]


def bad_request_bytes(payload: Payload, jpeg: bytes) -> bytes:
    """The raw request of a bad payload (the notes that need a hand-made body)."""
    if payload.note == "not multipart":
        return http_request("/predict", b'{"text": "hi"}', content_type="application/json")
    if payload.note == "unterminated multipart":
        return http_request("/predict", multipart_body([("image", jpeg, "image/jpeg")], close=False))
    if payload.note == "bad top_k":
        fields = [("image", jpeg, "image/jpeg"), ("text", b"Is there a red square?", None), ("top_k", b"-3", None)]
        return http_request("/predict", multipart_body(fields))
    if payload.note == "nothing to embed":
        return http_request("/embed", multipart_body([("other", b"x", None)]))
    return payload.request()


def memory_rotation(good: Sequence[Payload], max_text_length: int, bad_every: int = 4) -> list[tuple[bytes, int]]:
    """Good and bad requests interleaved, one bad in every `bad_every`: (request bytes, expected status)."""
    bad = bad_requests(good, max_text_length)
    jpeg = next(p.image for p in good if p.image is not None)
    assert jpeg is not None
    rotation: list[tuple[bytes, int]] = []
    bad_index = 0
    for index, payload in enumerate(good):
        rotation.append((payload.request(), payload.expect))
        if index % (bad_every - 1) == bad_every - 2:
            wrong = bad[bad_index % len(bad)]
            rotation.append((bad_request_bytes(wrong, jpeg), wrong.expect))
            bad_index += 1
    return rotation


def write_requests(requests: Sequence[bytes], path: Path) -> Path:
    """Concatenated raw requests plus `path.idx` (offset and length per line), for wrk's Lua script."""
    offsets = []
    with path.open("wb") as handle:
        position = 0
        for request in requests:
            handle.write(request)
            offsets.append(f"{position} {len(request)}\n")
            position += len(request)
    path.with_name(path.name + ".idx").write_text("".join(offsets), encoding="ascii")
    return path


def describe(payloads: Sequence[Payload]) -> dict[str, dict[str, int]]:
    """Counts per route/lane, picture and language: what the report says the mix was."""
    counts: dict[str, dict[str, int]] = {"route": {}, "picture": {}, "lang": {}}
    for payload in payloads:
        lane = f"{payload.route} ({payload.kind})"
        counts["route"][lane] = counts["route"].get(lane, 0) + 1
        counts["picture"][payload.image_name or "(none)"] = counts["picture"].get(payload.image_name or "(none)", 0) + 1
        if payload.text is not None:
            counts["lang"][payload.lang] = counts["lang"].get(payload.lang, 0) + 1
    return counts

"""The per-request flow shared by /predict and /embed.

    a form field in the URL (422) -> deadline from X-Request-Timeout-Ms -> 415/413 from the headers
    -> admission (429; 504 when the deadline has passed already: the load-shedding middleware
    answers both first) -> the body
    budget (429) -> read the body (413 while streaming, 408 past body_timeout_s) -> decode in the
    pool, once its image's decode memory is free (413 when it never can be, 504 past the
    deadline), or on the loop when alone and small (400/413/415/422)
    -> batch queue (504, 500)

Cheap refusals come first, so a request that cannot be served costs neither a queue slot nor a
body read. From the moment the body is in, the client's disconnect is watched: a request whose
client has gone is dropped before it runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import parse_qsl

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from app.body_memory import BodyHold
from app.decode_memory import MustWait
from app.decoding import Decoded, DecodeElsewhere, DecodeSite
from app.errors import ClientGone, InvalidInput, MalformedRequest, PayloadTooLarge, RequestTimeout
from app.forms import multipart_boundary
from app.items import Kind, Row
from app.request_timeout import TIMEOUT_HEADER, allowed_seconds, deadline_of, is_small_number
from app.state import Serving
from model.manifest import Manifest

Decode = Callable[[bytes, bytes, DecodeSite], Decoded]  # body, boundary, where it decodes

FORM_FIELDS: Final = frozenset({"image", "text", "top_k"})


async def infer(
    request: Request, serving: Serving, route: str, decode: Decode, kind_of: Callable[[Decoded], Kind]
) -> tuple[Decoded, Row]:
    if query := request.scope["query_string"]:
        refuse_form_fields_in(query)
    loop = asyncio.get_running_loop()
    allowed = allowed_seconds(request.headers.get(TIMEOUT_HEADER), serving.settings)
    now = loop.time()
    deadline = deadline_of(request.scope["state"], allowed, now)
    boundary = multipart_boundary(request.headers.get("content-type"))
    declared = declared_length(request, serving.settings.max_body_bytes)
    ticket = serving.batcher.admit(deadline - now, allowed)
    gone: asyncio.Future[None] | None = None
    try:
        with serving.bodies.hold(declared) as held:
            body = await read_body(request, serving.settings.max_body_bytes, serving.settings.body_timeout_s, held)
            gone = watch_disconnect(request)
            began = time.perf_counter()
            decoded = await decode_request(serving, route, decode, body, boundary, deadline, gone)
            serving.metrics.decode.labels(route).observe(time.perf_counter() - began)
            del body  # the model's inputs go on; the body's bytes are given back here
        row = await serving.batcher.run(ticket, kind_of(decoded), decoded.image, decoded.tokens, deadline, gone)
    finally:
        if gone is not None:
            gone.cancel()
        ticket.release()
    if loop.time() <= deadline:
        serving.metrics.within_deadline.labels(route).inc()
    return decoded, row


def refuse_form_fields_in(query: bytes) -> None:
    """422 for `?top_k=3` and the like: read only from the form, it would be ignored without a word,
    and the answer would not be the one asked for. Other parameters (a cache buster) pass."""
    named = {name for name, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True)} & FORM_FIELDS
    if named:
        raise InvalidInput(
            f"{', '.join(sorted(named))}: send form fields in the multipart body, not in the URL", code="invalid_field"
        )


async def decode_request(
    serving: Serving,
    route: str,
    decode: Decode,
    body: bytes,
    boundary: bytes,
    deadline: float,
    gone: asyncio.Future[None] | None = None,
) -> Decoded:
    """In the decode pool; or here, on the event loop, when nothing else is in the server (this
    request is the only one admitted, none queued, none running) and decoding is cheap (a small
    body, an image of few pixels by its header): then nobody waits on the loop meanwhile, and the
    pool's hand-off there and back costs more than such a decode (0.5 ms against 0.15-0.4 ms).

    Where the model runs on the CPU (Settings.decodes_inline_under_load), a cheap request decodes
    here whatever else is in the server: under load the pool's queue and hand-offs took a 0.3 ms
    decode 5.4 ms (median), and a request that misses its batch that way waits a whole batch more.

    An image whose decode memory is not free (app.decode_memory) waits for it on the loop, until
    `deadline` (the loop's clock) at the latest, or until its client leaves (`gone`), then decodes
    in the pool."""
    settings, batcher = serving.settings, serving.batcher
    alone = batcher.admitted == 1 and batcher.idle
    if (alone or serving.inline_under_load) and len(body) <= settings.inline_decode_bytes:
        here = True
        try:
            return decode(body, boundary, DecodeSite(max_pixels=settings.inline_decode_pixels))
        except DecodeElsewhere:
            here = False  # too many pixels for the loop: the pool parses it again
        finally:
            if here:  # decoded, or refused, on the loop
                serving.metrics.decoded_on_loop.labels(route).inc()
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(serving.decode_pool, decode, body, boundary, DecodeSite())
    except MustWait as must:
        return await decode_when_memory_frees(serving, decode, body, boundary, must.needed, deadline, gone)


async def decode_when_memory_frees(
    serving: Serving,
    decode: Decode,
    body: bytes,
    boundary: bytes,
    needed: int,
    deadline: float,
    gone: asyncio.Future[None] | None,
) -> Decoded:
    """The image's decode memory was not free: the request waits here, holding no pool thread,
    then decodes with the bytes held for it, given back when that decode ends, or if it never runs."""
    memory = serving.decoder.memory
    assert memory is not None
    await memory.wait(needed, deadline, gone)

    def decode_reserved() -> Decoded:
        try:
            return decode(body, boundary, DecodeSite(reserved=True))
        finally:
            memory.release(needed)

    try:
        job = serving.decode_pool.submit(decode_reserved)
    except BaseException:  # a pool already shut down
        memory.give_back(needed)
        raise
    job.add_done_callback(lambda done: memory.give_back(needed) if done.cancelled() else None)
    return await asyncio.wrap_future(job)


def declared_length(request: Request, limit: int) -> int | None:
    """The body's declared length (None: chunked); 413 from it, before a byte of the body is read."""
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    if not is_small_number(declared.strip(), digits=18):
        raise MalformedRequest("the Content-Length header is not a number")
    if int(declared) > limit:
        raise PayloadTooLarge(f"the request body is too large: at most {limit} bytes are accepted")
    return int(declared)


async def read_body(request: Request, limit: int, timeout_s: float, held: BodyHold) -> bytes:
    """The whole body, counted while it streams in (chunked uploads declare no length), within
    timeout_s: a client that trickles its body holds an admission slot, so it is cut off. What
    has arrived is held in the body budget (429 when it does not fit, app.body_memory)."""
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"the request body is too large: at most {limit} bytes are accepted")
                held.arrived(size)
                chunks.append(chunk)
    except ClientDisconnect as exc:
        raise ClientGone("the client disconnected while sending its body") from exc
    except TimeoutError as exc:
        raise RequestTimeout(f"the request body did not arrive within {timeout_s:g} s") from exc
    return b"".join(chunks)


def watch_disconnect(request: Request) -> asyncio.Future[None]:
    """Completes when the client disconnects. Only call once the body has been read: from then on
    the only message the server can still deliver is http.disconnect."""

    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return asyncio.ensure_future(wait())


def model_ref(manifest: Manifest) -> dict[str, str]:
    return {"name": manifest.name, "version": manifest.version}


def json_response(payload: dict[str, Any]) -> Response:
    """The answer's JSON, numpy arrays written as they are: float32 values in their shortest form,
    which reads back as the same float32 (half the bytes of a float64's digits). orjson would write
    a NaN or an infinity as null; none gets here, since the engine fails a row with one alone."""
    return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")

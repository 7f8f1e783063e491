"""The wire between front-end processes and the device process (`--frontends N`), over a Unix socket.

A front-end parses, decodes and validates a request itself, then hands the device process only
what the batcher needs: the uint8 image the model takes, the token ids as bytes, the kind and the
deadline (on CLOCK_MONOTONIC, which all processes of a host share, so the time an item spends in
buffers between two processes counts against it). The device process answers each item with its row or its error. So an
item costs one small frame each way (about 12 KB for a 64x64 image; measured on 2 cores, 25 us of
CPU per item on each side with 32 in flight, against about 0.85 ms of framework, parsing and
answering per request in the front-end), and the device's event loop does no HTTP work for it.

Every frame: u32 length of what follows, u8 message type, the body. Little-endian throughout.

    front-end -> device                     device -> front-end
    ITEM      id, kind, deadline, the       ROW        id, probs, image and text embeddings
              request's whole allowance,    ERROR      id, error class, Retry-After, code, message
              image [3,H,W], token bytes    STATE      liveness, readiness, queue full and its
    CANCEL    id (the client went away)                Retry-After, the deadline classes whose
                                                       lateness limits refuse and those limits,
                                                       /info (once ready); on every change and
                                                       at least every HEARTBEAT_S
    METRICS   id (asks for the replica's    METRICS    id, the replica's exposition text
              merged exposition text)       PULL       id (asks for this process's own metrics)
    SNAPSHOT  id, this process's own text
    SERVING   0 (this link serves requests; a front-end's check before it listens never says so)

Token ids are UTF-8 bytes + 1 (model.preprocess), so a token travels as one byte: id - 1.
"""

from __future__ import annotations

import asyncio
import enum
import struct
from dataclasses import dataclass
from typing import Final, TypeVar

import numpy as np

from app.errors import (
    ClientGone,
    DeadlineExceeded,
    InsufficientStorage,
    InvalidInput,
    MalformedRequest,
    ModelFailure,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    Unauthorized,
    UnsupportedMediaType,
)
from app.items import ByteArray, FloatArray, Kind, Row, TokenArray
from app.lateness_limit import Binding

MAX_FRAME: Final = 64 << 20  # far above any item (a 1024x1024 model input is 3 MB); a corrupt length stops here
HEARTBEAT_S: Final = 1.0  # the device's state goes out at least this often ...
SILENCE_S: Final = 5.0  # ... and a front-end that hears nothing for this long takes the device for gone
MAX_REASON: Final = 1000  # characters of a liveness or readiness reason on the wire


class Message(enum.IntEnum):
    ITEM = 1
    CANCEL = 2
    METRICS = 3
    SNAPSHOT = 4
    SERVING = 5
    ROW = 10
    ERROR = 11
    STATE = 12
    METRICS_TEXT = 13
    PULL = 14


KINDS: Final[tuple[Kind, ...]] = tuple(Kind)
# The order is the wire's: append, never reorder.
ERRORS: Final[tuple[type[ServiceError], ...]] = (
    ServiceError,
    MalformedRequest,
    Unauthorized,
    RequestTimeout,
    PayloadTooLarge,
    UnsupportedMediaType,
    InvalidInput,
    Overloaded,
    ModelFailure,
    InsufficientStorage,
    NotReady,
    DeadlineExceeded,
    ClientGone,
)

_FRAME = struct.Struct("<IB")
# Ids are 64-bit: a front-end numbers its items from 1 for as long as it lives, and 32 bits would
# run out after about 50 days at 1,000 items a second.
# Id, kind, deadline (monotonic s), allowance (s), image height, width (0: none), tokens.
_ITEM = struct.Struct("<QBddHHI")
_ID = struct.Struct("<Q")
_ROW = struct.Struct("<QIII")  # id, then the lengths of probs, image and text embedding (0: absent)
_ERROR = struct.Struct("<QBiH")  # id, class, Retry-After (-1: none), length of the code
# Queue full, Retry-After, lengths of the two reasons (UTF-8), the number of deadline classes whose
# lateness limits refuse; the reasons, the classes (_BINDING each) and /info follow.
_STATE = struct.Struct("<BHHHB")
_BINDING = struct.Struct("<BI")  # deadline class, its limit


T = TypeVar("T")


def settle(waiting: asyncio.Future[T] | None, outcome: T | BaseException) -> None:
    """Answer a waiting future, unless it has gone (cancelled, or answered already)."""
    if waiting is None or waiting.done():
        return
    if isinstance(outcome, BaseException):
        waiting.set_exception(outcome)
    else:
        waiting.set_result(outcome)


class ProtocolError(Exception):
    """A frame that does not parse: the link is broken and is closed."""


def frame(kind: Message, *parts: bytes | memoryview) -> list[bytes | memoryview]:
    """Buffers for `writer.writelines`: the header, then the parts as they are (no join)."""
    size = 1 + sum(len(part) for part in parts)
    return [_FRAME.pack(size, kind), *parts]


async def read_frame(reader: asyncio.StreamReader) -> tuple[Message, memoryview] | None:
    """The next frame's type and body; None when the peer closed the link between frames."""
    try:
        head = await reader.readexactly(_FRAME.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ProtocolError("the link closed inside a frame header") from exc
        return None
    size, kind = _FRAME.unpack(head)
    if not 1 <= size <= MAX_FRAME:
        raise ProtocolError(f"a frame of {size} bytes")
    try:
        body = await reader.readexactly(size - 1)
        return Message(kind), memoryview(body)
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError("the link closed inside a frame") from exc
    except ValueError as exc:
        raise ProtocolError(f"unknown message type {kind}") from exc


# -- items -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Item:
    id: int
    kind: Kind
    deadline: float  # time.monotonic()
    allowance: float  # all the time the request allowed, from its first byte (for the lateness limit)
    image: ByteArray | None  # [3, H, W], read-only (a view of the frame)
    tokens: TokenArray | None  # [L] token ids


def encode_item(
    item_id: int,
    kind: Kind,
    deadline: float,
    allowance: float,
    image: ByteArray | None,
    tokens: TokenArray | None,
) -> list[bytes | memoryview]:
    height, width = (int(image.shape[1]), int(image.shape[2])) if image is not None else (0, 0)
    count = len(tokens) if tokens is not None else 0
    head = _ITEM.pack(item_id, KINDS.index(kind), deadline, allowance, height, width, count)
    pixels = np.ascontiguousarray(image).data.cast("B") if image is not None else b""  # no copy
    text = (tokens - 1).astype(np.uint8).tobytes() if tokens is not None else b""
    return frame(Message.ITEM, head, pixels, text)


def decode_item(body: memoryview) -> Item:
    try:
        item_id, kind, deadline, allowance, height, width, count = _ITEM.unpack_from(body)
        offset = _ITEM.size
        image = None
        if height:
            pixels = 3 * height * width
            image = np.frombuffer(body, np.uint8, pixels, offset).reshape(3, height, width)
            offset += pixels
        tokens = np.frombuffer(body, np.uint8, count, offset).astype(np.int64) + 1 if count else None
        if offset + count != len(body):
            raise ProtocolError("an item's length does not match its header")
        return Item(item_id, KINDS[kind], deadline, allowance, image, tokens)
    except (struct.error, ValueError, IndexError) as exc:
        raise ProtocolError("an item frame does not parse") from exc


def encode_id(kind: Message, value: int, text: bytes = b"") -> list[bytes | memoryview]:
    return frame(kind, _ID.pack(value), text)


def decode_id(body: memoryview) -> tuple[int, bytes]:
    """An id frame's id, and the bytes after it (the text of METRICS_TEXT and SNAPSHOT)."""
    if len(body) < _ID.size:
        raise ProtocolError("a frame too short for its id")
    return _ID.unpack_from(body)[0], bytes(body[_ID.size :])


# -- answers -----------------------------------------------------------------------------------


def encode_row(item_id: int, row: Row) -> list[bytes | memoryview]:
    arrays = [np.ascontiguousarray(a, np.float32) if a is not None else None for a in _fields(row)]
    lengths = [len(a) if a is not None else 0 for a in arrays]
    return frame(Message.ROW, _ROW.pack(item_id, *lengths), *(a.tobytes() for a in arrays if a is not None))


def _fields(row: Row) -> tuple[FloatArray | None, FloatArray | None, FloatArray | None]:
    return row.probs, row.image_embedding, row.text_embedding


def decode_row(body: memoryview) -> tuple[int, Row]:
    try:
        item_id, *lengths = _ROW.unpack_from(body)
        offset = _ROW.size
        arrays: list[FloatArray | None] = []
        for length in lengths:
            arrays.append(np.frombuffer(body, np.float32, length, offset) if length else None)
            offset += 4 * length
        if offset != len(body):
            raise ProtocolError("a row's length does not match its header")
        return item_id, Row(probs=arrays[0], image_embedding=arrays[1], text_embedding=arrays[2])
    except (struct.error, ValueError) as exc:
        raise ProtocolError("a row frame does not parse") from exc


def encode_error(item_id: int, error: ServiceError) -> list[bytes | memoryview]:
    cls = next((c for c in type(error).__mro__ if c in ERRORS), ServiceError)
    code = error.code.encode()
    retry = error.retry_after_s if error.retry_after_s is not None else -1
    head = _ERROR.pack(item_id, ERRORS.index(cls), retry, len(code))
    return frame(Message.ERROR, head, code, error.message.encode())


def decode_error(body: memoryview) -> tuple[int, ServiceError]:
    try:
        item_id, cls, retry, code_length = _ERROR.unpack_from(body)
        code = bytes(body[_ERROR.size : _ERROR.size + code_length]).decode()
        message = bytes(body[_ERROR.size + code_length :]).decode()
        return item_id, ERRORS[cls](message, code=code, retry_after_s=retry if retry >= 0 else None)
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise ProtocolError("an error frame does not parse") from exc


# -- the device's state ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceState:
    liveness: str | None  # None: alive
    readiness: str | None  # None: ready
    info: bytes  # the device's /info body (JSON) once loaded; empty before
    queue_full: bool = False  # the replica's admission bound is reached: refuse before reading a body
    late: tuple[Binding, ...] = ()  # deadline classes whose lateness limits refuse: those, before their body
    retry_after_s: int = 1  # the device's estimate, for those refusals


def encode_state(state: DeviceState) -> list[bytes | memoryview]:
    alive, ready = (state.liveness or "")[:MAX_REASON].encode(), (state.readiness or "")[:MAX_REASON].encode()
    retry = min(state.retry_after_s, 0xFFFF)
    late = state.late[:255]
    head = _STATE.pack(state.queue_full, retry, len(alive), len(ready), len(late))
    classes = b"".join(_BINDING.pack(b.deadline_class, min(b.limit, 0xFFFFFFFF)) for b in late)
    return frame(Message.STATE, head, alive, ready, classes, state.info)


def decode_state(body: memoryview) -> DeviceState:
    try:
        full, retry, alive_length, ready_length, classes = _STATE.unpack_from(body)
        offset = _STATE.size
        alive = bytes(body[offset : offset + alive_length]).decode()
        offset += alive_length
        ready = bytes(body[offset : offset + ready_length]).decode()
        offset += ready_length
        late = tuple(Binding(*_BINDING.unpack_from(body, offset + i * _BINDING.size)) for i in range(classes))
        info = bytes(body[offset + classes * _BINDING.size :])
        return DeviceState(alive or None, ready or None, info, bool(full), late, retry)
    except (struct.error, UnicodeDecodeError) as exc:
        raise ProtocolError("a state frame does not parse") from exc

"""multipart/form-data: the Content-Type check and a bounded parser over a body already in memory.

The body is read (and size-checked) on the event loop; parsing runs with the rest of the
per-request work, in the decode pool or on the loop (app.routes.common). Limits apply part by
part: a part over its size, a part whose headers run past MAX_PART_HEADER_BYTES, or a request with
too many parts, stops the parser there. Parts with names the route does not know are skipped
without being copied; a known name sent twice is refused (which one would count?). A known part
with a Content-Transfer-Encoding other than the identity ones is refused: RFC 7578 forbids senders
to use one, and decoding base64 or quoted-printable would be a second parser for hostile input.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from python_multipart.multipart import parse_options_header

from app.errors import InvalidInput, MalformedRequest, PayloadTooLarge, ServiceError, UnsupportedMediaType

MULTIPART = b"multipart/form-data"
# Content-Disposition and Content-Type of one part need well under 1 KiB; a part whose headers grow
# past this is an attack on the parser's memory, not a form.
MAX_PART_HEADER_BYTES: Final = 8 * 1024
# Per part, as python-multipart bounds them: a form's part needs two or three headers.
MAX_PART_HEADERS: Final = 8
MAX_HEADER_LINE_BYTES: Final = 4096 + 128
_IDENTITY_ENCODINGS: Final = frozenset({b"7bit", b"8bit", b"binary"})


def multipart_boundary(content_type: str | None) -> bytes:
    """The boundary of a multipart/form-data Content-Type; 415 for any other type, 400 without one."""
    media_type, options = parse_options_header(content_type)
    if media_type != MULTIPART:
        raise UnsupportedMediaType("the request body must be multipart/form-data")
    boundary = options.get(b"boundary", b"")
    if not boundary or len(boundary) > 70:  # RFC 2046: 1 to 70 characters
        raise MalformedRequest("the multipart/form-data Content-Type has no valid boundary")
    return boundary


@dataclass(slots=True)
class Part:
    name: str
    data: bytes
    filename: str | None
    content_type: bytes | None = None  # the part's own Content-Type header, as sent

    @property
    def charset(self) -> bytes | None:
        """The charset parameter of the part's Content-Type, lower-cased; None when absent."""
        if self.content_type is None:
            return None
        charset = parse_options_header(self.content_type)[1].get(b"charset")
        return charset.strip().lower() if charset is not None else None


@dataclass(frozen=True)
class FieldLimit:
    max_bytes: int
    # Raised when a part exceeds max_bytes: the route decides whether that is a 413 or a 422.
    too_large: Callable[[int], ServiceError]


def parse_form(body: bytes, boundary: bytes, fields: Mapping[str, FieldLimit], max_parts: int) -> dict[str, Part]:
    """Parse a whole multipart body; only the named fields are kept, each within its limit.

    The body is in memory, so each delimiter is found with one `bytes.find` (memchr speed) and the
    known parts are sliced out, where a streaming state machine would call back per header run
    and per chunk: for a small request that was most of its parsing time on the event loop.
    Accepted, as python-multipart accepted them: CR and LF before the first delimiter; spaces or
    tabs after a later one; an epilogue after the closing one; a delimiter followed by anything
    but "--", padding or CRLF, read as part of the data. Refused, as it refused them: a preamble,
    padding after the first delimiter, padding after a later one that does not end its line, a
    header line without a colon or with a bare CR or LF, a header name that is not a token (RFC
    9110), a folded header, more than MAX_PART_HEADERS headers or a line over
    MAX_HEADER_LINE_BYTES."""
    delimiter = b"--" + boundary
    position = len(body) - len(body.lstrip(b"\r\n"))
    if not body.startswith(delimiter, position):
        raise MalformedRequest("the multipart/form-data body is malformed")
    position += len(delimiter)
    if body.startswith(b"--", position):
        return {}  # a form of no parts
    if not body.startswith(b"\r\n", position):
        raise MalformedRequest("the multipart/form-data body is malformed")
    position += 2
    separator = b"\r\n" + delimiter
    parts: dict[str, Part] = {}
    for count in itertools.count(1):
        if count > max_parts:
            raise PayloadTooLarge(f"at most {max_parts} multipart parts are accepted", code="too_many_parts")
        headers, position = _part_headers(body, position)
        name, limit, filename, content_type = _disposition(headers, parts, fields)
        end, following = _data_end(body, position, separator, limit)
        if limit is not None:  # else a field this route does not take: skipped, never copied
            parts[name] = Part(name, body[position:end], filename, content_type)
        if following is None:
            break  # the closing delimiter: what follows it is ignored
        position = following
    return parts


def _part_headers(body: bytes, position: int) -> tuple[dict[bytes, bytes], int]:
    """A part's headers (names lower-cased; one sent twice: the last counts), and where its data begins."""
    headers: dict[bytes, bytes] = {}
    counted = 0  # header names and values, as MAX_PART_HEADER_BYTES counts them
    lines = 0
    while True:
        window = position + MAX_HEADER_LINE_BYTES + 2  # the longest line and its CRLF: no scan past it
        line_end = body.find(b"\r\n", position, window)
        if line_end < 0:
            if len(body) < window:
                raise _truncated()
            raise MalformedRequest(f"a multipart part's header line exceeds {MAX_HEADER_LINE_BYTES} bytes")
        if line_end == position:
            return headers, position + 2
        lines += 1
        if lines > MAX_PART_HEADERS:
            raise MalformedRequest(f"a multipart part has more than {MAX_PART_HEADERS} headers")
        line = body[position:line_end]
        name, colon, value = line.partition(b":")
        value = value.lstrip(b" \t")
        counted += len(name) + len(value)
        if counted > MAX_PART_HEADER_BYTES:
            raise MalformedRequest(f"a multipart part's headers exceed {MAX_PART_HEADER_BYTES} bytes")
        if not colon or not _TOKEN.fullmatch(name) or b"\r" in value or b"\n" in value:
            raise MalformedRequest("the multipart/form-data body is malformed")
        headers[name.lower()] = value
        position = line_end + 2


def _disposition(
    headers: dict[bytes, bytes], parts: Mapping[str, Part], fields: Mapping[str, FieldLimit]
) -> tuple[str, FieldLimit | None, str | None, bytes | None]:
    """The part's name, its limit (None: not a field of this route), filename and Content-Type."""
    kind, options = parse_options_header(headers.get(b"content-disposition"))
    if kind != b"form-data" or b"name" not in options:
        raise MalformedRequest("a multipart part has no Content-Disposition: form-data; name=...")
    try:
        name = options[b"name"].decode("utf-8")
        filename = options[b"filename"].decode("utf-8") if b"filename" in options else None
    except UnicodeDecodeError as exc:
        raise MalformedRequest("a multipart part name is not valid UTF-8") from exc
    if name in parts:
        raise InvalidInput(f"the field {name!r} was sent more than once", code="duplicate_field")
    limit = fields.get(name)
    encoding = headers.get(b"content-transfer-encoding")
    if limit is not None and encoding is not None and encoding.strip().lower() not in _IDENTITY_ENCODINGS:
        raise MalformedRequest("Content-Transfer-Encoding is not allowed in multipart/form-data (RFC 7578)")
    return name, limit, filename, headers.get(b"content-type")


def _data_end(body: bytes, position: int, separator: bytes, limit: FieldLimit | None) -> tuple[int, int | None]:
    """Where the data that starts at `position` ends, at the next CRLF and delimiter followed by
    "--" or by the end of its line (spaces or tabs, then CRLF); and where the next part starts,
    None after the closing delimiter. A delimiter followed by anything else is data. Data over the
    part's limit is refused as soon as the search passes it, as a streaming parser would."""
    start = position
    bound = len(body) if limit is None else min(len(body), start + limit.max_bytes + len(separator))
    while (end := body.find(separator, position, bound)) >= 0:
        follower = end + len(separator)
        if body.startswith(b"--", follower):
            return end, None
        padding = _PADDING.match(body, follower)  # matches the empty string too
        padded = padding.end() if padding else follower
        if body.startswith(b"\r\n", padded):
            return end, padded + 2
        if padded > follower:
            raise MalformedRequest("the multipart/form-data body is malformed")  # padding, then no line end
        position = end + 1
    if limit is not None and len(body) - start > limit.max_bytes:
        raise limit.too_large(limit.max_bytes)
    raise _truncated()


def _truncated() -> MalformedRequest:
    # A new error each time: one object raised again would keep every raiser's frames.
    return MalformedRequest("the multipart/form-data body is truncated (no closing boundary)")


_PADDING: Final = re.compile(rb"[ \t]*")
_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

"""multipart/form-data: the Content-Type check and a bounded parser over a body already in memory.

The body is read (and size-checked) on the event loop; parsing runs in the decode pool with the
rest of the per-request work. Limits apply while parsing, part by part: a part over its size, a
part whose headers run past MAX_PART_HEADER_BYTES, or a request with too many parts, stops the
parser at once. Parts with names the route does not know are skipped without being stored; a known
name sent twice is refused (which one would count?). A known part with a Content-Transfer-Encoding
other than the identity ones is refused: RFC 7578 forbids senders to use one, and decoding base64
or quoted-printable would be a second parser for hostile input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.errors import InvalidInput, MalformedRequest, PayloadTooLarge, ServiceError, UnsupportedMediaType

MULTIPART = b"multipart/form-data"
# Content-Disposition and Content-Type of one part need well under 1 KiB; a part whose headers grow
# past this is an attack on the parser's memory, not a form.
MAX_PART_HEADER_BYTES: Final = 8 * 1024
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


@dataclass(slots=True)
class _Current:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    header_field: bytearray = field(default_factory=bytearray)
    header_value: bytearray = field(default_factory=bytearray)
    header_bytes: int = 0
    name: str | None = None
    filename: str | None = None
    content_type: bytes | None = None
    limit: FieldLimit | None = None
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0


class _FormParser:
    def __init__(self, boundary: bytes, fields: Mapping[str, FieldLimit], max_parts: int) -> None:
        self.fields = fields
        self.max_parts = max_parts
        self.parts: dict[str, Part] = {}
        self.count = 0
        self.ended = False
        self.current = _Current()
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self.on_part_begin,
                "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value,
                "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished,
                "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end,
                "on_end": self.on_end,
            },
        )

    def on_part_begin(self) -> None:
        self.count += 1
        if self.count > self.max_parts:
            raise PayloadTooLarge(f"at most {self.max_parts} multipart parts are accepted", code="too_many_parts")
        self.current = _Current()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self.current.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self.current.header_value += data[start:end]

    def _count_header(self, size: int) -> None:
        self.current.header_bytes += size
        if self.current.header_bytes > MAX_PART_HEADER_BYTES:
            raise MalformedRequest(f"a multipart part's headers exceed {MAX_PART_HEADER_BYTES} bytes")

    def on_header_end(self) -> None:
        current = self.current
        current.headers.append((bytes(current.header_field).lower(), bytes(current.header_value)))
        current.header_field.clear()
        current.header_value.clear()

    def on_headers_finished(self) -> None:
        current = self.current
        headers = dict(current.headers)  # a header sent twice: the last one counts
        kind, options = parse_options_header(headers.get(b"content-disposition"))
        if kind != b"form-data" or b"name" not in options:
            raise MalformedRequest("a multipart part has no Content-Disposition: form-data; name=...")
        try:
            name = options[b"name"].decode("utf-8")
            filename = options[b"filename"].decode("utf-8") if b"filename" in options else None
        except UnicodeDecodeError as exc:
            raise MalformedRequest("a multipart part name is not valid UTF-8") from exc
        if name in self.parts:
            raise InvalidInput(f"the field {name!r} was sent more than once", code="duplicate_field")
        current.name, current.filename, current.limit = name, filename, self.fields.get(name)
        current.content_type = headers.get(b"content-type")
        encoding = headers.get(b"content-transfer-encoding")
        if current.limit is not None and encoding is not None and encoding.strip().lower() not in _IDENTITY_ENCODINGS:
            raise MalformedRequest("Content-Transfer-Encoding is not allowed in multipart/form-data (RFC 7578)")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        current = self.current
        if current.limit is None:
            return  # a field this route does not take: skipped, never stored
        current.size += end - start
        if current.size > current.limit.max_bytes:
            raise current.limit.too_large(current.limit.max_bytes)
        current.chunks.append(data[start:end])

    def on_part_end(self) -> None:
        current = self.current
        if current.name is not None and current.limit is not None:
            self.parts[current.name] = Part(
                current.name, b"".join(current.chunks), current.filename, current.content_type
            )

    def on_end(self) -> None:
        self.ended = True


def parse_form(body: bytes, boundary: bytes, fields: Mapping[str, FieldLimit], max_parts: int) -> dict[str, Part]:
    """Parse a whole multipart body; only the named fields are kept, each within its limit."""
    form = _FormParser(boundary, fields, max_parts)
    try:
        form.parser.write(body)
        form.parser.finalize()
    except FormParserError as exc:
        raise MalformedRequest("the multipart/form-data body is malformed") from exc
    if not form.ended:
        raise MalformedRequest("the multipart/form-data body is truncated (no closing boundary)")
    return form.parts

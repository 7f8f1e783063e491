"""uvicorn's httptools protocol with the two guards it lacks: a bound on a request's line and
headers, and a time limit for them to arrive.

httptools buffers a header line until it ends, and uvicorn neither bounds the headers nor times
them: one client sending a header forever grows the process without bound (200 MB sent grew it by
290 MB), and clients that open connections and trickle their headers hold them open forever
(slowloris). Here:

- the request line and headers, counted as `METHOD TARGET HTTP/x.y\\r\\n`, `NAME: VALUE\\r\\n` each
  and the blank line (the bytes of a head written without optional whitespace), may be at most
  `max_header_bytes`: 431 and the connection closed beyond. Checked exactly once the head is
  complete, and on the raw bytes while it is still arriving, so memory stays within one read of
  the bound.
- the line and headers must arrive within `header_timeout_s` of the request's first byte (or of
  the connection opening): 408 otherwise, or a silent close when nothing was sent at all.
- a body the app answered without reading (a 415, 429 or 413 sent from the headers alone) must
  finish arriving within `drain_timeout_s` of that answer, or the connection is closed: uvicorn
  reads and discards the rest to keep the connection, and every byte restarts its keep-alive
  timer, so a client trickling the rest of a refused body would otherwise hold it forever.
- an answer that closes the connection (`Connection: close` from either side, a 413) while the
  body is still arriving closes it lingeringly, as nginx and Go's net/http do: the answer and a FIN
  go out, the rest of the body is read and discarded (for at most `drain_timeout_s`, a 408's
  included: holding a socket costs little, and the client reads its answer), and only then is
  the socket closed; a server shutdown leaves such a connection to its timer. Closing a socket
  with unread bytes makes the kernel send a RST, which drops whatever of the answer is still in
  flight and makes a client that is still sending its body fail with "connection reset" instead
  of reading its 413 or 429 (measured: 20 of 20 raw-socket clients posting 30 MB against a 1 MB
  limit got ECONNRESET on send, none saw the 413).

Requests refused here never reach the app: they get the one error shape with a fresh request id.

And one repair: a request that offers an upgrade this server does not make (`Upgrade: h2c` with
`Connection: Upgrade, HTTP2-Settings`, which Java's HttpClient, Spring's RestClient and Ktor send
over plain HTTP) is served as the HTTP/1.1 request it also is (RFC 9110 7.8). httptools stops at
the end of such a request's headers, as if it had no body, and uvicorn handed the app an empty
body (a 422 "the 'image' field is required" to a request that sent one) and then parsed the body
as the next request (uvicorn issue 2722). Here the body goes to the request: its framing header
is replayed, with the bytes after the headers, into a fresh parser (_ResumableParser), and an
offer without a body goes on to whatever the client sends next, without a warning logged.
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.request_ids import new_request_id
from app.request_timeout import RECEIVED_AT


def guarded_protocol(max_header_bytes: int, header_timeout_s: float, drain_timeout_s: float) -> type[asyncio.Protocol]:
    """An HttpToolsProtocol class with these limits, for `uvicorn.Config(http=...)`."""

    class GuardedHttpToolsProtocol(_Guarded):
        pass

    GuardedHttpToolsProtocol.max_header_bytes = max_header_bytes
    GuardedHttpToolsProtocol.header_timeout_s = header_timeout_s
    GuardedHttpToolsProtocol.drain_timeout_s = drain_timeout_s
    return GuardedHttpToolsProtocol


class _Guarded(HttpToolsProtocol):
    max_header_bytes = 32 * 1024
    header_timeout_s = 10.0
    drain_timeout_s = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # between a request's first byte (or the connection's start) and its headers' end
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._in_body = False  # between a request's headers' end and its body's end
        self._drain_timer: asyncio.TimerHandle | None = None
        self._awaiting_continue = False  # `Expect: 100-continue` and no body byte yet
        self._unparsable = False  # answered 400 by uvicorn: nothing more is read from it
        # The body framing header of a request whose upgrade offer is ignored, until its body is
        # replayed; and whether the replayed head is being parsed (its callbacks are not a request).
        self._ignored_upgrade: bytes | None = None
        self._upgrade_keeps_alive = True  # whether that request leaves the connection open
        self._replaying_head = False
        self._resumable = _ResumableParser(self.parser, self)
        self.parser = self._resumable  # type: ignore[assignment]

    # -- the timer -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Each request cycle is handed this transport: its close() after a complete answer is where
        # a lingering close begins.
        self.transport = _LingeringTransport(transport, self)  # type: ignore[assignment]
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._stop_draining()
        self.transport = self._raw_transport()  # gone: uvicorn's close() below must not linger
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return
        if self._head_bytes == 0:
            self.transport.close()  # a connection that never said anything gets no answer
            return
        self._refuse(HTTPStatus.REQUEST_TIMEOUT, "header_timeout", "the request headers did not arrive in time")

    # -- the rest of a body answered without reading it --------------------------------------------

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._in_body and self._drain_timer is None and not self.transport.is_closing():
            self._drain_timer = self.loop.call_later(self.drain_timeout_s, self._drain_timed_out)

    def _stop_draining(self) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None

    def shutdown(self) -> None:
        if self._is_lingering():
            return  # already closing: its drain timer ends it; a close now would reset the sender
        super().shutdown()

    def send_400_response(self, msg: str) -> None:
        self._unparsable = True
        super().send_400_response(msg)

    def _drain_timed_out(self) -> None:
        self._drain_timer = None
        if self._in_body:
            self._close_now()  # its answer went out already; there is nothing left to say

    def _linger(self) -> bool:
        """Begin a lingering close if the answer is complete and the body still arriving."""
        cycle = self.cycle
        if not self._in_body or cycle is None or not cycle.response_complete:
            return False  # nothing is left unread, or the answer itself was cut short: close now
        if self._awaiting_continue or self._unparsable:
            return False  # a client refused before "100 Continue" sends no body; garbage is not read on
        raw = self._raw_transport()
        if raw.can_write_eof():
            raw.write_eof()  # the answer, then FIN: the client may read it and stop sending
        self.flow.resume_reading()  # a paused read would leave the rest of the body unread
        if self._drain_timer is None:  # a kept-alive drain already running keeps its limit
            self._drain_timer = self.loop.call_later(self.drain_timeout_s, self._drain_timed_out)
        return True

    def _is_lingering(self) -> bool:
        return isinstance(self.transport, _LingeringTransport) and self.transport.lingering

    def _raw_transport(self) -> asyncio.Transport:
        transport = self.transport
        return transport.raw if isinstance(transport, _LingeringTransport) else transport

    def _close_now(self) -> None:
        raw = self._raw_transport()
        if not raw.is_closing():
            raw.close()

    # -- counting --------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > self.max_header_bytes and not self._refused:
            self._refuse_too_large()

    def on_message_begin(self) -> None:
        if self._replaying_head:
            return
        super().on_message_begin()
        # The request's deadline counts from here, its first byte: under load the event loop reads
        # it, and starts its ASGI task, a turn or more after it arrived.
        self.scope["state"][RECEIVED_AT] = self.loop.time()
        self._in_head = True
        self._arm()

    def on_url(self, url: bytes) -> None:
        if not self._replaying_head:
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._replaying_head:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        if self._replaying_head:  # the request it continues was started at its own headers
            self._replaying_head = False
            self._ignored_upgrade = None
            return
        self._ignored_upgrade = self._body_framing_of_ignored_upgrade()
        self._upgrade_keeps_alive = self.parser.should_keep_alive()
        self._in_head = False
        self._disarm()
        if self._head_size() > self.max_header_bytes:
            self._refuse_too_large()  # no ASGI task is started for this request
            return
        self._in_body = True
        self._awaiting_continue = (b"expect", b"100-continue") in ((n.lower(), v.lower()) for n, v in self.headers)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            self._awaiting_continue = False
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused or self._ignored_upgrade is not None:
            return  # after an ignored upgrade offer, its body is still to come (resume_ignored_upgrade)
        super().on_message_complete()
        self._in_body = False
        self._stop_draining()
        if self._is_lingering():
            self._refused = True  # whatever follows in this read is not parsed, let alone answered
            self._close_now()  # the rest of the body has been read: a clean close now
            return
        self._in_head, self._head_bytes = True, 0  # what comes next is the next request's head
        cycle = self.cycle
        if cycle is not None and cycle.response_complete and self.timeout_keep_alive_task is None and not self.pipeline:
            # The end of a body answered before it was read: the connection is idle from here, and
            # uvicorn armed its keep-alive timer at the answer, which the body's bytes then cancelled.
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    # -- an upgrade offer, ignored ----------------------------------------------------------------

    def _body_framing_of_ignored_upgrade(self) -> bytes | None:
        """For a request offering an upgrade other than uvicorn's websockets, and carrying a body,
        the header that frames its body."""
        if not self.parser.should_upgrade() or self._should_upgrade():
            return None
        headers = dict(self.headers)
        if b"transfer-encoding" in headers:
            return b"transfer-encoding: " + headers[b"transfer-encoding"]
        if headers.get(b"content-length", b"0").strip() not in (b"", b"0"):
            return b"content-length: " + headers[b"content-length"]
        return None  # no body: the request was complete at its headers

    def resume_ignored_upgrade(self) -> bytes | None:
        """httptools paused at the end of an ignored upgrade offer's headers; a fresh parser reads
        what follows. Returns the head it reads first: one with the request's body framing when it
        has a body (its callbacks are not a request), none otherwise; None when nothing that
        follows is to be read (a request that closes the connection)."""
        parser = httptools.HttpRequestParser(self)
        # As uvicorn sets its own: after a request that closes the connection, the rest is skipped.
        parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self._resumable.replace(parser)
        framing = self._ignored_upgrade
        closing = b"" if self._upgrade_keeps_alive else b"connection: close\r\n"
        if framing is None:
            if closing:
                self._refused = True  # nothing after it is parsed, as after any closing request
                return None
            return b""
        self._replaying_head = True
        return b"POST / HTTP/1.1\r\n" + framing + b"\r\n" + closing + b"\r\n"

    def _head_size(self) -> int:
        method, version = self.parser.get_method(), self.parser.get_http_version()
        line = len(method) + 1 + len(self.url) + 1 + len("HTTP/") + len(version) + 2
        return line + sum(len(name) + 2 + len(value) + 2 for name, value in self.headers) + 2  # + the blank line

    # -- refusing --------------------------------------------------------------------------------

    def _refuse_too_large(self) -> None:
        message = f"the request line and headers exceed {self.max_header_bytes} bytes"
        self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "headers_too_large", message)

    def _refuse(self, status: HTTPStatus, code: str, message: str) -> None:
        self._refused = True
        self._disarm()
        request_id = new_request_id()
        body = json.dumps({"error": {"code": code, "message": message, "request_id": request_id}}).encode()
        head = (
            f"HTTP/1.1 {status.value} {status.phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nx-request-id: {request_id}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode("ascii") + body)
        self.transport.close()


class _ResumableParser:
    """uvicorn's httptools parser, which a request whose upgrade offer is ignored replaces with a
    fresh one for its body (_Guarded.resume_ignored_upgrade). Everything else is the parser's own."""

    def __init__(self, parser: httptools.HttpRequestParser, protocol: _Guarded) -> None:
        self._parser = parser
        self._protocol = protocol

    def replace(self, parser: httptools.HttpRequestParser) -> None:
        self._parser = parser

    def feed_data(self, data: bytes | bytearray | memoryview) -> None:
        # A loop, not a recursion: a read may hold hundreds of pipelined offers.
        rest = memoryview(data)
        while True:
            try:
                self._parser.feed_data(rest)
                return
            except httptools.HttpParserUpgrade as paused:
                if self._protocol._should_upgrade():
                    raise  # a websocket: uvicorn's own handling
                rest = rest[paused.args[0] :]
                head = self._protocol.resume_ignored_upgrade()
                if head is None:
                    return
                self._parser.feed_data(head)  # no upgrade offer in it: it cannot pause

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)


class _LingeringTransport:
    """The connection's transport as uvicorn's request cycle sees it: a close() after a complete
    answer, while the request body is still arriving, becomes a lingering close; any other close,
    or a second one, closes at once. Everything else is the transport's own."""

    def __init__(self, raw: asyncio.Transport, protocol: _Guarded) -> None:
        self.raw = raw
        self.protocol = protocol
        self.lingering = False

    def close(self) -> None:
        if not self.lingering and not self.raw.is_closing() and self.protocol._linger():
            self.lingering = True
            return
        self.raw.close()

    def is_closing(self) -> bool:
        return self.lingering or self.raw.is_closing()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.lingering:  # after the FIN nothing more may be written (a late 400, say)
            self.raw.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)

"""Upstream side of the HTTP/1 codec: one connection to an endpoint, and the response on it.

httptools (llhttp) validates each response and delimits it; only what it delimits reaches the
exchange: the head (rewritten in one pass, headers.scan_response_head) and the body pieces
(on_body, without the upstream's chunk framing; the exchange re-frames them for the client).
Bytes past the end of the framed response are the upstream's error, not the client's next
response: they make the connection unusable, and it is closed instead of pooled (nginx reads
exactly the framed length too).

The connection reports to its `receiver` (ResponseReceiver: the exchange using it, or None
while pooled).
"""

from __future__ import annotations

import asyncio
from typing import Any

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpResponseParser,
)

from edgeproxy.hosts import EndpointState
from edgeproxy.proxy.flow import FlowControl
from edgeproxy.proxy.headers import scan_response_head

MAX_RESPONSE_HEAD = 64 * 1024  # the default of --max-upstream-header-size


class ResponseHead:
    """The parts of a raw response head the exchange needs (see scan_response_head)."""

    __slots__ = ("chunked", "content_length", "head", "status", "upgrade")

    def __init__(self, status: int, raw: bytes) -> None:
        """`raw`: status line and fields, each line ending in CRLF, without the empty line."""
        self.status = status
        self.head, self.content_length, self.chunked, self.upgrade = scan_response_head(raw)


class SurplusResponse(Exception):
    """The upstream sent bytes past the end of the framed response."""


class ResponseReceiver:
    """What an UpstreamConnection reports to: the exchange using it (exchange.Exchange). A base
    class here, so that the connection calls it as C calls when compiled while the import graph
    stays one-way (exchange -> http1_client)."""

    def response_informational(self, head: ResponseHead) -> None:
        raise NotImplementedError

    def response_head(self, head: ResponseHead) -> None:
        raise NotImplementedError

    def response_body(self, data: bytes) -> None:
        raise NotImplementedError

    def response_flush(self) -> None:
        raise NotImplementedError

    def response_end(self, conn: UpstreamConnection) -> None:
        raise NotImplementedError

    def upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        raise NotImplementedError

    def upstream_upgraded(self, rest: bytes) -> None:
        raise NotImplementedError

    def tunnel_data(self, data: bytes) -> None:
        raise NotImplementedError

    def tunnel_eof(self) -> None:
        raise NotImplementedError

    def upstream_write_paused(self, paused: bool) -> None:
        raise NotImplementedError


class UpstreamConnection:
    """asyncio protocol of one connection to an endpoint (compiled: an extension type)."""

    __slots__ = (
        "closed", "done", "endpoint", "flow", "idle_list", "idle_since", "in_head", "max_head", "parser",
        "raw", "receiver", "received", "reusable", "reused", "skip_body",
        "send", "feed", "switching", "transport", "tunnel", "wbuf",
    )  # fmt: skip

    def __init__(self, endpoint: EndpointState, idle_list: list[Any],
                 max_head: int = MAX_RESPONSE_HEAD) -> None:  # fmt: skip
        self.endpoint = endpoint
        self.max_head = max_head
        # The pool's list for (endpoint, transport profile): where this connection may idle.
        self.idle_list = idle_list
        self.transport: asyncio.Transport | None = None
        self.send: Any = None  # transport.write and parser.feed_data, bound once each: a method
        self.feed: Any = None  # looked up per call costs more than the call
        self.flow: FlowControl = FlowControl(None)
        self.parser: Any = None  # None once the connection is lost
        self._new_parser()
        self.receiver: ResponseReceiver | None = None
        self.raw = b""  # bytes of the current head not yet consumed
        self.in_head = True
        self.received = False  # any byte of the current response
        self.reusable = True
        self.idle_since = 0.0
        self.closed = False
        self.reused = False
        self.tunnel = False
        self.skip_body = False  # response to HEAD: llhttp cannot be told, so we end it ourselves
        self.done = False
        self.switching: ResponseHead | None = None  # the 101 head, until the tunnel opens
        self.wbuf: list[bytes] = []  # what the exchange writes at the end of a client read

    # -- asyncio.Protocol --------------------------------------------------------------

    def _new_parser(self) -> None:
        parser = self.parser = HttpResponseParser(self)
        self.feed = parser.feed_data

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.send = transport.write  # type: ignore[attr-defined]
        self.flow.transport = transport

    def eof_received(self) -> bool:
        if self.tunnel and self.receiver is not None:
            self.receiver.tunnel_eof()
            return True  # half-closed: the client may still send
        return False

    def data_received(self, data: bytes) -> None:
        receiver = self.receiver
        if receiver is None or self.done:
            # Bytes on an idle connection, or after the response: the server broke framing.
            self.reusable = False
            self.close()
            return
        if self.tunnel:
            receiver.tunnel_data(data)
            return
        self.received = True
        if self.in_head:
            raw = self.raw = self.raw + data if self.raw else data
            # The head must end within the limit, however it arrived (in one read or many).
            limit = self.max_head
            if len(raw) > limit and raw.find(b"\r\n\r\n", 0, limit + 4) < 0:
                self._broken("response head too large")
                return
        try:
            self.feed(data)
        except HttpParserUpgrade:
            self.tunnel = True
            rest, self.raw = self.raw, b""
            receiver.upstream_upgraded(rest)
            return
        except HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, SurplusResponse):
                raise
            self.reusable = False  # the response before it is complete and delivered
        except HttpParserError as exc:
            self._broken(f"invalid response: {exc}")
            return
        if self.done:
            self.receiver = None
            receiver.response_end(self)
        else:
            receiver.response_flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        receiver = self.receiver
        if receiver is not None:
            self.receiver = None
            receiver.upstream_lost(self, exc)
        # As the client side does: no cycle left for the collector (parser -> self).
        self.parser = self.feed = None
        self.flow.transport = None
        self.transport = self.send = None

    def pause_writing(self) -> None:
        if self.receiver is not None:
            self.receiver.upstream_write_paused(True)

    def resume_writing(self) -> None:
        if self.receiver is not None:
            self.receiver.upstream_write_paused(False)

    # -- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done:
            raise SurplusResponse()  # a second response in the same read: stop parsing

    def on_headers_complete(self) -> None:
        receiver = self.receiver
        assert receiver is not None  # parsing happens only while an exchange uses it
        # llhttp insists on CRLF line ends, so the head ends at the first CRLFCRLF.
        fields, _, rest = self.raw.partition(b"\r\n\r\n")
        status = self.parser.get_status_code()
        head = ResponseHead(status, fields + b"\r\n")
        if status < 200:
            self.raw = rest  # the final head follows
            if status == 101:
                self.switching = head
            else:
                receiver.response_informational(head)
            return
        self.raw = b""
        self.in_head = False
        if not self.parser.should_keep_alive():
            self.reusable = False
        receiver.response_head(head)
        if self.skip_body:
            # llhttp would wait for Content-Length bytes that a HEAD response never carries:
            # the response ends here, and the next one needs a fresh parser.
            if rest:
                self.reusable = False
            self._new_parser()
            self.done = True

    def on_body(self, body: bytes) -> None:
        receiver = self.receiver
        if receiver is not None and not self.done:
            receiver.response_body(body)

    def on_message_complete(self) -> None:
        if not self.in_head:
            self.done = True

    def _broken(self, reason: str) -> None:
        self.reusable = False
        receiver = self.receiver
        self.abort()
        if receiver is not None:
            receiver.upstream_lost(self, ConnectionError(reason))

    # -- used by the exchange and the pool --------------------------------------------

    def begin(self, receiver: ResponseReceiver, skip_body: bool) -> None:
        self.receiver = receiver
        self.received = False
        self.in_head = True
        self.done = False
        self.skip_body = skip_body

    def write(self, data: bytes) -> None:
        send = self.send
        if send is not None and not self.closed:
            send(data)

    def close(self) -> None:
        self.receiver = None
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        self.receiver = None
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()

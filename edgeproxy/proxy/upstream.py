"""Upstream side: one HTTP/1.1 connection to an endpoint, pooled per EndpointState.

httptools (llhttp) validates the response and finds where it ends; the bytes themselves pass
through. The head is rewritten once, in one pass over its lines (headers.scan_response_head,
in C when compiled), and the body is forwarded as received (Content-Length and chunked
framing are kept end to end), so a response costs no Python call per header or per body
piece. Only a close-delimited body is re-framed (chunked) for the client.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from edgeproxy.proxy.headers import scan_response_head

if TYPE_CHECKING:
    from edgeproxy.health import EndpointState
    from edgeproxy.proxy.downstream import DownstreamProtocol

CLOSED_PHASE = 4  # DownstreamProtocol's CLOSED (kept in sync by a test)
MAX_RESPONSE_HEAD = 64 * 1024  # nginx proxy_buffer_size is 4-8k; be generous, but bounded


class ResponseHead:
    """The parts of a raw response head the client side needs (see scan_response_head)."""

    __slots__ = ("status", "head", "content_length", "chunked", "upgrade")

    def __init__(self, status: int, raw: bytes) -> None:
        """`raw`: status line and fields, each line ending in CRLF, without the empty line."""
        self.status = status
        self.head, self.content_length, self.chunked, self.upgrade = scan_response_head(raw)


class UpstreamConnection:
    """asyncio protocol of one pooled connection to an endpoint (see upstream.pxd)."""

    __slots__ = (
        "closed",
        "done",
        "endpoint",
        "exchange",
        "idle_since",
        "in_head",
        "parser",
        "raw",
        "received",
        "rechunk",
        "reusable",
        "reused",
        "skip_body",
        "switching",
        "transport",
        "tunnel",
        "until_close",
    )  # fmt: skip

    def __init__(self, endpoint: EndpointState) -> None:
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.parser = HttpResponseParser(self)
        self.exchange: DownstreamProtocol | None = None
        self.raw = b""  # bytes of the current head not yet consumed
        self.in_head = True
        self.received = False  # any byte of the current response
        self.reusable = True
        self.idle_since = 0.0
        self.closed = False
        self.reused = False
        self.tunnel = False
        self.until_close = False  # close-delimited body (RFC 9112 6.3 rule 8)
        self.rechunk = False  # ... which the client receives chunked
        self.skip_body = False  # response to HEAD: llhttp cannot be told, so we end it ourselves
        self.done = False
        self.switching: ResponseHead | None = None  # the 101 head, until the tunnel opens

    # -- asyncio.Protocol --------------------------------------------------------------

    def eof_received(self) -> None:
        return None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None or self.done:
            # Bytes on an idle connection, or after the response: the server broke framing.
            self.reusable = False
            if exchange is None:
                self.close()
            return
        if self.tunnel:
            exchange.tunnel_to_client(data)
            return
        self.received = True
        exchange.deadline = exchange.dp.now + exchange.read_timeout
        if self.in_head:
            raw = self.raw = self.raw + data if self.raw else data
            if len(raw) > MAX_RESPONSE_HEAD and raw.find(b"\r\n\r\n") < 0:
                exchange.upstream_broken(self, "response head too large")
                return
        elif self.rechunk:
            exchange.wbuf.append(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            exchange.wbuf.append(data)  # body bytes pass through as framed by the upstream
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade:
            self.tunnel = True
            rest, self.raw = self.raw, b""
            exchange.upstream_upgraded(rest)
        except HttpParserError as exc:
            self.reusable = False
            exchange.upstream_broken(self, f"invalid response: {exc}")
            return
        buf = exchange.wbuf  # DownstreamProtocol.flush_client, inlined for the common case
        transport = exchange.transport
        if buf and transport is not None and exchange.phase != CLOSED_PHASE:
            transport.write(buf[0] if len(buf) == 1 else b"".join(buf))
            buf.clear()
        else:
            exchange.flush_client()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        exchange = self.exchange
        if exchange is not None:
            if self.until_close and not self.tunnel:
                # Read-until-close framing: close ends the message.
                self.until_close = False
                self.reusable = False
                if self.rechunk:
                    exchange.wbuf.append(b"0\r\n\r\n")
                exchange.response_complete(self)
                exchange.flush_client()
            else:
                exchange.upstream_lost(self, exc)
        else:
            try:
                self.endpoint.idle.remove(self)
            except ValueError:
                pass

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_paused(True)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_paused(False)

    # -- httptools callbacks ------------------------------------------------------------

    def on_headers_complete(self) -> None:
        exchange = self.exchange
        assert exchange is not None
        # llhttp insists on CRLF line ends, so the head ends at the first CRLFCRLF.
        # partition, not find: it takes one argument, without find's argument parsing.
        fields, _, rest = self.raw.partition(b"\r\n\r\n")
        status = self.parser.get_status_code()
        head = ResponseHead(status, fields + b"\r\n")
        if status < 200:
            self.raw = rest  # the final head follows
            if status == 101:
                self.switching = head
            else:
                exchange.response_informational(head)
            return
        self.raw = b""
        self.in_head = False
        if not self.parser.should_keep_alive():
            self.reusable = False
        no_body = self.skip_body or status == 204 or status == 304
        if not no_body and head.content_length is None and not head.chunked:
            self.until_close = True
            self.reusable = False
        self.rechunk = exchange.response_head(self, head, no_body)
        if rest and not no_body:
            exchange.wbuf.append(b"%x\r\n%b\r\n" % (len(rest), rest) if self.rechunk else rest)
        if self.skip_body:
            # llhttp would wait for Content-Length bytes that a HEAD response never carries.
            self.parser = HttpResponseParser(self)
            self._message_done()

    def on_message_complete(self) -> None:
        if not self.in_head:
            self.until_close = False  # _message_done, inlined on the hot path
            self.done = True
            exchange = self.exchange
            if exchange is not None:
                exchange.response_complete(self)

    def _message_done(self) -> None:
        self.until_close = False
        self.done = True
        exchange = self.exchange
        if exchange is not None:
            exchange.response_complete(self)

    # -- used by the exchange and the pool --------------------------------------------

    def begin(self, exchange: DownstreamProtocol, skip_body: bool) -> None:
        self.exchange = exchange
        self.received = False
        self.in_head = True
        self.done = False
        self.skip_body = skip_body

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not self.closed:
            transport.write(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        self.exchange = None
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()

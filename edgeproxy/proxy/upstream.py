"""Upstream side: one HTTP/1.1 connection to an endpoint, pooled per EndpointState.

The protocol parses responses with httptools (llhttp) and hands each event to the exchange
that owns the connection (a DownstreamProtocol); it keeps no request state of its own.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

if TYPE_CHECKING:
    from edgeproxy.health import EndpointState
    from edgeproxy.proxy.downstream import DownstreamProtocol

Header = tuple[bytes, bytes]


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "endpoint", "transport", "parser", "exchange", "headers", "reason", "received",
        "reusable", "idle_since", "closed", "reused", "tunnel", "chunked", "until_close",
        "content_length", "conn_tokens", "skip_body",
    )  # fmt: skip

    def __init__(self, endpoint: EndpointState) -> None:
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.parser = HttpResponseParser(self)
        self.exchange: DownstreamProtocol | None = None
        self.headers: list[Header] = []
        self.reason = b""
        self.received = False  # any byte of the current response
        self.reusable = True
        self.idle_since = 0.0
        self.closed = False
        self.reused = False
        self.tunnel = False
        self.chunked = False
        self.until_close = False
        self.content_length: bytes | None = None
        self.conn_tokens: frozenset[bytes] = frozenset()
        self.skip_body = False  # response to HEAD: llhttp cannot be told, so we end it ourselves

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # Bytes on an idle connection: the server broke framing; never reuse it.
            self.close()
            return
        if self.tunnel:
            exchange.tunnel_to_client(data)
            return
        self.received = True
        exchange.deadline = exchange.dp.now + exchange.dp.settings.read_timeout
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as upgrade:
            self.tunnel = True
            rest = data[upgrade.args[0] :]
            exchange.upstream_upgraded(rest)
        except HttpParserError as exc:
            self.reusable = False
            exchange.upstream_broken(self, f"invalid response: {exc}")
            return
        exchange.flush_client()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        exchange = self.exchange
        if exchange is not None:
            if self.until_close and not self.tunnel:
                # Read-until-close framing (RFC 9112 6.3 rule 8): close ends the message.
                self.until_close = False
                self.reusable = False
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

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        if len(name) in (10, 14, 17):
            lname = name.lower()
            if lname == b"content-length":
                self.content_length = value
            elif lname == b"connection":
                self.conn_tokens = frozenset(
                    t.strip().lower() for t in value.split(b",") if t.strip()
                )
            elif lname == b"transfer-encoding":
                self.chunked = value.lower().rstrip().endswith(b"chunked")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        exchange = self.exchange
        assert exchange is not None
        headers, reason = self.headers, self.reason
        self.headers, self.reason = [], b""
        if status < 200:
            if status != 101:
                exchange.response_informational(status, reason, headers)
            return
        if not self.parser.should_keep_alive() or b"close" in self.conn_tokens:
            self.reusable = False
        no_body = self.skip_body or status in (204, 304)
        if not no_body and self.content_length is None and not self.chunked:
            self.until_close = True
            self.reusable = False
        exchange.response_head(self, status, reason, headers, no_body)
        if self.skip_body:
            # llhttp would wait for Content-Length bytes that a HEAD response never carries.
            self.parser = HttpResponseParser(self)
            self._message_done()

    def on_body(self, body: bytes) -> None:
        if self.exchange is not None:
            self.exchange.response_body(body)

    def on_message_complete(self) -> None:
        if self.parser.get_status_code() >= 200:
            self._message_done()

    def _message_done(self) -> None:
        self.until_close = False
        exchange = self.exchange
        if exchange is not None:
            exchange.response_complete(self)

    # -- used by the exchange and the pool --------------------------------------------

    def begin(self, exchange: DownstreamProtocol, skip_body: bool) -> None:
        self.exchange = exchange
        self.received = False
        self.content_length = None
        self.chunked = False
        self.until_close = False
        self.conn_tokens = frozenset()
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

"""Upstream side: one HTTP/1.1 connection to an endpoint, pooled per EndpointState.

httptools (llhttp) validates the response and finds where it ends; the bytes themselves pass
through. The head is rewritten once, in C (regular expressions over the raw head), and the
body is forwarded as received (Content-Length and chunked framing are kept end to end), so a
response costs no Python call per header or per body piece. Only a close-delimited body is
re-framed (chunked) for the client.
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

if TYPE_CHECKING:
    from edgeproxy.health import EndpointState
    from edgeproxy.proxy.downstream import DownstreamProtocol

CLOSED_PHASE = 4  # DownstreamProtocol's CLOSED (kept in sync by a test)
MAX_RESPONSE_HEAD = 64 * 1024  # nginx proxy_buffer_size is 4-8k; be generous, but bounded

# Over the lower-cased head (the leading CRLF anchors a field name at the start of a line).
# Hop-by-hop response fields (RFC 9110 7.6.1) that edgeproxy drops; framing fields stay,
# because the body passes through with its own framing.
HOP_BY_HOP_LINE_RE = re.compile(
    rb"\r\n(?:connection|keep-alive|proxy-[a-z0-9-]*|upgrade)[ \t]*:[^\r\n]*",
    re.IGNORECASE,
)
PLAIN_CONNECTION_TOKENS = frozenset({b"", b"close", b"keep-alive", b"upgrade"})


class ResponseHead:
    """The parts of a raw response head the client side needs, found with bytes.find (C).

    Field names are matched as "\\r\\nname:" on the lower-cased head: RFC 9112 5.1 allows
    no whitespace between a field name and its colon (llhttp rejects it), so this is exact.
    """

    __slots__ = ("status", "head", "content_length", "chunked", "upgrade")

    def __init__(self, status: int, raw: bytes) -> None:
        """`raw`: status line and fields, each line ending in CRLF, without the empty line."""
        lower = raw.lower()
        self.status = status
        self.upgrade = b""
        at = lower.find(b"\r\ncontent-length:")
        self.content_length = raw[at + 17 : lower.find(b"\r\n", at + 17)].strip() if at >= 0 else None
        at = lower.find(b"\r\ntransfer-encoding:")
        self.chunked = at >= 0 and lower[at : lower.find(b"\r\n", at + 20)].rstrip().endswith(b"chunked")
        head = raw
        # Hop-by-hop fields to drop (RFC 9110 7.6.1). The common case is one Connection line
        # with keep-alive or close: cut it out by position; anything else takes the regex.
        others = b"\r\nkeep-alive:" in lower or b"\r\nproxy-" in lower or b"\r\nupgrade:" in lower
        at = lower.find(b"\r\nconnection:")
        if at >= 0:
            eol = lower.find(b"\r\n", at + 13)
            value = lower[at + 13 : eol].strip()
            if value in PLAIN_CONNECTION_TOKENS:
                if not others:
                    head = raw[:at] + raw[eol:]
            else:
                others = True
                extra = {t.strip() for t in value.split(b",")} - PLAIN_CONNECTION_TOKENS
                if extra:  # fields named by Connection are hop-by-hop too
                    names = b"|".join(re.escape(t) for t in extra)
                    head = re.sub(rb"\r\n(?:" + names + rb")[ \t]*:[^\r\n]*", b"", head, flags=re.I)
        if others:
            head = HOP_BY_HOP_LINE_RE.sub(b"", head)
        if status == 101:
            up = lower.find(b"\r\nupgrade:")
            self.upgrade = raw[up + 10 : raw.find(b"\r\n", up + 10)].strip() if up >= 0 else b""
        if head[5:8] != b"1.1":
            head = b"HTTP/1.1" + head[8:]  # edgeproxy speaks 1.1 to the client (RFC 9110 6.2)
        if b"\r\nserver:" not in lower:
            head += SERVER_LINE
        self.head = head


SERVER_LINE = b"Server: edgeproxy\r\n"


class UpstreamConnection(asyncio.Protocol):
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
        raw = self.raw
        end = raw.find(b"\r\n\r\n")
        status = self.parser.get_status_code()
        head = ResponseHead(status, raw[: end + 2])
        rest = raw[end + 4 :]
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

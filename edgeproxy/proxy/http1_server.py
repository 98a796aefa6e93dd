"""Client side of the HTTP/1 codec: one connection from a client (RFC 9112).

States of the connection, and what moves it on:

    IDLE --first byte--> HEAD --headers complete--> exchange in progress --its end--> IDLE
                                        \\--> pipelined requests wait in `queued` (reading paused)
    any --malformed or over a limit--> answer 4xx/5xx, CLOSED (RFC 9112 11.2: the framing is lost)
    exchange --101 from the upstream--> TUNNEL (tunnel.py)

- Limits are counted on bytes fed, not on callbacks completed: a header line without CRLF is
  still bytes (`head_fed`, at most max_header_bytes plus one read).
- Pipelining (RFC 9112 9.3): requests after the one in flight are parsed from the same read and
  queued; reading pauses until the queue is empty, and a queued request starts only when the
  response before it is complete and the client reads (flow.CLIENT_FULL), so a client that
  does not read costs at most one read of requests and one socket buffer of answers.
- Half-close (RFC 9112 9.6): a FIN after a complete request keeps the connection open for the
  response; the connection closes once the responses are written.
- Upgrade: only WebSocket is tunnelled (message.RequestHead.websocket); llhttp stops at any
  upgrade request, so for the others parsing goes on with a fresh parser.
- The request line's protocol: llhttp also accepts RTSP/1.0 and ICE/1.0 and reports only the
  version numbers, so the codec reads the protocol token itself (request_line_end). A request
  that begins a read (every first or sequential keep-alive request) has its line at the start
  of the read; a pipelined one is searched for after the line of the request before it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any

from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade, HttpRequestParser

from edgeproxy.proxy import flow
from edgeproxy.proxy.dataplane import Dataplane
from edgeproxy.proxy.exchange import Downstream, Exchange
from edgeproxy.proxy.flow import FlowControl
from edgeproxy.proxy.local import error_response
from edgeproxy.proxy.message import ClientProtocolError, ConnectionInfo, RequestHead

HEAD_EVENT, BODY_EVENT, END_EVENT, ERROR_EVENT = range(4)
MAX_UPGRADE_REST = 64 * 1024  # bytes sent after an upgrade request before the 101 arrives
# A read is parsed in slices of this size, and parsing stops while --max-pipelined events of
# pipelined requests wait: a client that pipelines without reading holds at most this much
# parsed state (the rest stays bytes, and reading is paused).
FEED_SLICE = 16 * 1024
# After an error answer: read and drop what the client still sends, for at most this long and
# this much, so that its RST does not destroy the answer (nginx's lingering close).
LINGER_SECONDS = 2.0
LINGER_BYTES = 8 * 1024 * 1024
NO_REQUEST = RequestHead()  # what `parsing` holds before the first request
NO_CONNECTION = ConnectionInfo(b"", b"", "", False)  # what `info` holds before connection_made
MAX_SHARED_INFOS = 4096
# With more client connections than this in a worker, a keep-alive connection sheds its parser
# as soon as it is idle (a new one costs about 0.3 us at its next request; below, after 1 s).
SHRINK_AT_ONCE_ABOVE = 2048


def request_line_end(window: bytes, mid: bool, start: int, method: bytes, target: bytes) -> int:
    """The end of the request line of the message being parsed, or -1 when its protocol is not
    HTTP (llhttp checked the rest of its grammar). Not `mid`: the line is the first of
    `window` (after empty lines, RFC 9112 2.2); `mid`: the first line from `start` on that
    begins with the method. (Compiled, the byte tests are C comparisons.)"""
    n = len(window)
    at = 0
    if not mid:
        # The usual line, single spaces at the start of the read: "HTTP/" is where the method
        # and target put it, and no search is needed.
        eol = len(method) + len(target) + 2
        if (eol + 9 < n and window[eol] == 72 and window[eol + 1] == 84 and window[eol + 2] == 84
                and window[eol + 3] == 80 and window[eol + 4] == 47 and window[eol + 8] == 13
                and window[eol + 9] == 10 and window[eol - 1] == 32):  # fmt: skip
            return eol + 10
        while at < n and (window[at] == 13 or window[at] == 10):  # CR, LF
            at += 1
    else:
        at = window.find(b"\n" + method + b" ", start - 1 if start else 0) + 1
        if at == 0:
            if start != 0 or not window.startswith(method + b" "):
                return -1
    eol = window.find(b"\n", at)
    # ... SP "HTTP/" DIGIT "." DIGIT CR LF: the five bytes of "HTTP/" end 4 before the LF.
    if eol - at < 14 or not (window[eol - 9] == 72 and window[eol - 8] == 84 and window[eol - 7] == 84
                             and window[eol - 6] == 80 and window[eol - 5] == 47):  # fmt: skip
        return -1
    return eol + 1


class ClientConnection(Downstream):
    """asyncio protocol of one client connection (compiled: an extension type; asyncio and
    uvloop only call its methods)."""

    __slots__ = (
        "body_received", "closed", "deadline", "dp", "eof", "exchange", "flow", "info", "wbuf",
        "backlog", "continuation", "feeding", "head_fed", "in_head", "lingering", "parser", "parsing", "parsing_queued", "port",
        "piece", "carry", "fresh_piece", "boundary", "line_mid", "line_end", "header_count",
        "requests",
        "queued", "replaying", "scheme", "send", "feed", "transport", "tunnel", "upgrade_rest",
        "write_paused",
    )  # fmt: skip

    def __init__(self, dp: Dataplane, scheme: bytes, port: bytes) -> None:
        self.dp = dp
        self.scheme = scheme
        self.port = port
        self.transport: Any = None
        self.send: Any = None  # transport.write, bound once (Downstream)
        self.flow = FlowControl(None)
        self.wbuf: Any = []  # list[bytes]; None while shed
        self.parser: Any = None  # None while idle and shed (shrink_idle)
        self.feed: Any = None  # parser.feed_data, bound with each new parser (_new_parser)
        self._new_parser()
        self.info = NO_CONNECTION  # (one made here would format its forwarding lines for nothing)
        self.deadline = 0.0
        self.exchange: Exchange | None = None
        self.parsing: RequestHead = NO_REQUEST  # replaced at each message's first byte
        self.parsing_queued = False  # the request being parsed waits behind another
        self.queued: list[tuple[int, Any]] | None = None
        self.replaying = False
        self.in_head = False
        self.head_fed = 0
        self.body_received = 0
        self.closed = False
        self.eof = False
        self.write_paused = False
        self.tunnel: Any = None
        self.upgrade_rest: bytes | None = None  # bytes after a WebSocket request, before its 101
        self.backlog: bytes | None = None  # bytes not parsed yet (MAX_QUEUED reached)
        self.feeding = False
        self.continuation = False  # parsing the body of an upgrade request we do not upgrade
        self.lingering = -1  # bytes still accepted after an error answer; -1: not lingering
        # Where the request line of the message being parsed is (see request_line_end).
        self.piece = b""  # the bytes being fed
        self.carry: bytearray | None = None  # earlier reads of a head that spans reads
        self.boundary = True  # the parser is between messages
        self.fresh_piece = True  # no message began yet in this piece, which began at a boundary
        self.line_mid = False  # the message began inside a piece, after other bytes
        self.line_end = 0  # in piece (or carry + piece): the end of the last request line found
        self.header_count = 0  # fields of the head being parsed
        self.requests = 0  # requests started on this connection

    # -- asyncio.Protocol ------------------------------------------------------------------

    def _new_parser(self) -> Any:
        parser = self.parser = HttpRequestParser(self)
        self.feed = parser.feed_data
        return parser

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.send = transport.write  # type: ignore[attr-defined]
        self.flow.transport = transport
        peer = transport.get_extra_info("peername")
        client_ip = peer[0] if isinstance(peer, tuple) else "127.0.0.1"
        # One ConnectionInfo per (listener, client address): immutable, so connections from one
        # address (a load balancer, a NAT) share it, and it costs them no memory each.
        infos = self.dp.connection_infos
        key = (self.port, client_ip)
        info = infos.get(key)
        if info is None:
            trusted = False
            proxies = self.dp.settings.trusted_proxies
            if proxies:
                ip = ipaddress.ip_address(client_ip)
                trusted = any(ip in net for net in proxies)
            info = ConnectionInfo(self.scheme, self.port, client_ip, trusted)
            if len(infos) >= MAX_SHARED_INFOS:
                infos.clear()  # bounded: a scan from many addresses only costs re-creation
            infos[key] = info
        self.info = info
        if not self.dp.loop_sets_nodelay:  # uvloop sets TCP_NODELAY itself; asyncio does not
            sock = transport.get_extra_info("socket")  # (uvloop would keep this object per connection)
            if sock is not None and sock.family != socket.AF_UNIX:
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    pass
        dp = self.dp
        dp.connections.add(self)
        self.deadline = dp.now + dp.keepalive_timeout
        if len(dp.connections) >= dp.max_connections and not dp.accept_paused:
            dp.accept_paused = True
            if dp.accept_hook is not None:
                dp.accept_hook(True)

    def data_received(self, data: bytes) -> None:
        if self.lingering >= 0:
            self.lingering -= len(data)
            if self.lingering < 0:
                self._really_close()
            return
        if self.closed:
            return
        if self.tunnel is not None:
            self.tunnel.from_client(data)
            return
        if self.upgrade_rest is not None:
            self._hold_for_upgrade(data)
            return
        if self.backlog is not None:
            self.backlog += data  # reading is paused; this read was already under way
            return
        if self.exchange is None and self.queued is None and not self.in_head:
            self.deadline = self.dp.now + self.dp.client_header_timeout
            if self.parser is None:  # shrunk while idle (shrink_idle)
                self._new_parser()
                self.wbuf = []
        self._consume(data)
        exchange = self.exchange
        if exchange is not None and not self.closed:
            exchange.flush_upstream()
            exchange.flush_client()

    def _consume(self, data: bytes) -> None:
        """Parse `data` slice by slice; stop (keeping the rest as bytes) when too many
        pipelined events wait, and check the header limit on the bytes fed."""
        if self.feeding:  # re-entered from a callback: the outer loop continues with it
            self.backlog = (self.backlog or b"") + data
            return
        self.feeding = True
        limit = self.dp.max_header_bytes
        try:
            while data and not self.closed:
                queued = self.queued
                if queued is not None and len(queued) >= self.dp.max_pipelined:
                    self.backlog = data
                    self.flow.pause(flow.PIPELINED)
                    return
                if len(data) <= FEED_SLICE:
                    piece, data = data, b""
                else:
                    piece, data = data[:FEED_SLICE], data[FEED_SLICE:]
                if self.in_head:
                    self.head_fed += len(piece)
                self._feed(piece)
                if self.in_head and self.head_fed > limit and not self.closed:
                    self._fail(431)  # counted on bytes fed: a line without end is bytes too
                    return
                if self.backlog is not None:
                    data = self.backlog + data
                    self.backlog = None
        finally:
            self.feeding = False

    def _feed(self, data: bytes) -> None:
        for _ in range(64):  # each turn starts after an upgrade request; bounded by the read
            if not self.in_head:
                self.carry = None
                self.line_end = 0
            self.piece = data
            self.fresh_piece = self.boundary
            try:
                self.feed(data)
                if self.in_head:  # the head goes on in the next read: keep it, from its line on
                    carry = self.carry
                    if carry is None:
                        self.carry = bytearray(data[self.line_end:])
                        self.line_end = 0
                    else:
                        carry += data  # bounded: the 431 check counts these bytes
                self.piece = b""  # an idle connection holds no bytes
                return
            except HttpParserUpgrade as upgrade:
                rest = data[upgrade.args[0]:]
                exchange = self.exchange
                if not self.parsing_queued and exchange is not None and exchange.upgrading:
                    self._hold_for_upgrade(rest)  # a WebSocket request: the tunnel takes them
                    return
                # Any other upgrade token is not ours to honour: parse on, as plain HTTP.
                parser = self._new_parser()
                self.boundary = True
                head = self.parsing
                if head.body_after_upgrade:
                    # llhttp left this request's body unparsed: a framing-only head lets the
                    # new parser delimit it (its head callbacks are ignored: continuation).
                    self.continuation = True
                    framing = (b"Transfer-Encoding: chunked" if head.chunked
                               else b"Content-Length: %d" % head.content_length)  # fmt: skip
                    parser.feed_data(b"PUT / HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n\r\n")
                data = rest
            except HttpParserCallbackError as exc:
                cause = exc.__context__
                if not isinstance(cause, ClientProtocolError):
                    raise
                self._protocol_error(cause.status)
                return
            except HttpParserError:
                self._protocol_error(400)
                return

    def _hold_for_upgrade(self, data: bytes) -> None:
        rest = (self.upgrade_rest or b"") + data
        self.upgrade_rest = rest
        self.flow.pause(flow.UPGRADING)  # released by the tunnel, or by the exchange's end
        if len(rest) > MAX_UPGRADE_REST:
            self._fail(400)

    def eof_received(self) -> bool:
        if self.lingering >= 0:
            self._really_close()
            return True
        if self.tunnel is not None:
            self.tunnel.client_eof()
            return True
        if self.exchange is not None or self.queued is not None:
            # Half-closed after a request: answer it, then close (RFC 9112 9.6).
            self.eof = True
            if self.in_head or (self.exchange is not None and not self.exchange.req_done
                                and not self.parsing_queued):  # fmt: skip
                self._drop_incomplete()
            return True
        return False

    def _drop_incomplete(self) -> None:
        """EOF in the middle of a request: it can never complete."""
        exchange = self.exchange
        if exchange is not None and not exchange.req_done and not exchange.resp_started:
            self._fail(400)
        elif exchange is not None and not exchange.req_done:
            exchange.client_lost()
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        dp = self.dp
        dp.connections.discard(self)
        if dp.accept_paused and len(dp.connections) * 10 < dp.max_connections * 9:
            dp.accept_paused = False
            if dp.accept_hook is not None:
                dp.accept_hook(False)
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.client_lost()
        # Break the cycles (parser -> its bound callbacks -> self; flow -> transport -> self)
        # so that reference counting frees the connection now: left to the cycle collector,
        # every closed connection costs a collection's traversal (11% of a worker's busy time
        # with a new connection per request, py-spy).
        self.parser = self.feed = None
        self.flow.transport = None
        self.transport = self.send = None

    def pause_writing(self) -> None:
        self.write_paused = True
        exchange = self.exchange
        if exchange is not None:
            exchange.client_write_paused(True)
        if exchange is None or exchange.req_done:
            self.flow.pause(flow.CLIENT_FULL)  # read no further requests for now

    def resume_writing(self) -> None:
        self.write_paused = False
        exchange = self.exchange
        if exchange is not None:
            exchange.client_write_paused(False)
        self.flow.resume(flow.CLIENT_FULL)
        if exchange is None and (self.queued is not None or self.backlog is not None):
            if not self.replaying:
                self._replay()

    # -- httptools callbacks: the request --------------------------------------------------

    def on_message_begin(self) -> None:
        if self.continuation:
            return
        self.parsing = RequestHead()
        self.parsing_queued = self.exchange is not None or self.queued is not None
        self.in_head = True
        self.head_fed = 0
        self.boundary = False
        self.line_mid = not self.fresh_piece
        self.fresh_piece = False
        self.header_count = 0

    def on_url(self, url: bytes) -> None:
        if self.continuation:
            return
        head = self.parsing
        head.target += url
        head.size += len(url)
        if len(head.target) > self.dp.max_request_line:
            raise ClientProtocolError(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.continuation:
            dp = self.dp
            self.header_count += 1
            if self.header_count > dp.max_header_count:
                raise ClientProtocolError(431, "too many header fields")
            if len(name) + len(value) > dp.max_header_line:
                raise ClientProtocolError(431, "header field line too long")
            self.parsing.add_field(name, value)

    def on_headers_complete(self) -> None:
        if self.continuation:
            return
        self.in_head = False
        head = self.parsing
        dp = self.dp
        if head.size > dp.max_header_bytes:
            raise ClientProtocolError(431, "header section too large")
        parser = self.parser
        head.method = parser.get_method()
        window = self.piece if self.carry is None else bytes(self.carry) + self.piece
        end = request_line_end(window, self.line_mid, self.line_end, head.method, head.target)
        if end < 0:
            raise ClientProtocolError(400, "not an HTTP/1 request line (RFC 9112 2.3, 3)")
        self.line_end = end
        if head.method == b"CONNECT":
            raise ClientProtocolError(405, "CONNECT is not proxied (edgeproxy is no open proxy)")
        keep_alive = parser.should_keep_alive()
        # Without any Connection field, llhttp keeps only HTTP/1.1 (and 1.x, x > 0) alive; so
        # then the version string (formatted by get_http_version) is not needed.
        version = "1.1" if keep_alive and not head.conn_tokens else parser.get_http_version()
        head.complete(version, keep_alive, dp.max_body_bytes)
        if self.parsing_queued:
            self._queue(HEAD_EVENT, head)
        else:
            self._start(head)

    def on_body(self, body: bytes) -> None:
        if self.parsing_queued:
            self._queue(BODY_EVENT, body)
            return
        exchange = self.exchange
        if exchange is not None:
            self._check_body(exchange, len(body))
            self.deadline = self.dp.now + self.dp.client_body_timeout
            exchange.request_body(body)

    def on_message_complete(self) -> None:
        self.boundary = True
        if self.continuation:
            self.continuation = False
        elif self.parsing.body_after_upgrade:
            return  # the end comes after the body, which the continuation parser reads
        if self.parsing_queued:
            self._queue(END_EVENT, None)
            return
        exchange = self.exchange
        if exchange is not None:
            exchange.request_end()

    def _check_body(self, exchange: Exchange, size: int) -> None:
        limit = self.dp.max_body_bytes
        self.body_received += size
        if limit and self.body_received > limit:
            raise ClientProtocolError(413, "request body over the limit")

    # -- exchanges -------------------------------------------------------------------------

    def _start(self, head: RequestHead) -> None:
        self.body_received = 0
        dp = self.dp
        self.requests += 1
        limit = dp.max_requests_per_connection
        if limit and self.requests >= limit:
            head.keep_alive = False  # its response says Connection: close (nginx keepalive_requests)
        self.deadline = dp.now + dp.client_body_timeout  # for its body, if one follows
        exchange = self.exchange = Exchange(self, dp, head)
        exchange.start()

    def _queue(self, kind: int, payload: Any) -> None:
        if self.queued is None:
            self.queued = []
            self.flow.pause(flow.PIPELINED)
        self.queued.append((kind, payload))

    def _protocol_error(self, status: int) -> None:
        exchange = self.exchange
        current = exchange is not None and not exchange.req_done and not self.parsing_queued
        if not current and (exchange is not None or self.queued is not None):
            # Requests before the bad one are answered first (as nginx does), then the error.
            self._queue(ERROR_EVENT, status)
            self.parsing_queued = True
            self.in_head = False
            self._new_parser()  # nothing more is read from this one
            self.boundary = True
            self.flow.pause(flow.PIPELINED)
            self.eof = True
        else:
            self._fail(status)

    def exchange_done(self, exchange: Exchange, keep_alive: bool) -> None:
        """The exchange ended (its response is written, or it was cut)."""
        if self.exchange is not exchange:
            return
        self.exchange = None
        if not self.feeding and not self.in_head:
            # An idle connection keeps no request head (not while llhttp is inside a message:
            # an upgrade request's body still needs its head).
            self.parsing = NO_REQUEST
        if self.upgrade_rest is not None and self.tunnel is None:
            keep_alive = False  # bytes after an upgrade request that did not upgrade
        if not keep_alive or self.closed:
            self.close()
            return
        self.deadline = self.dp.now + self.dp.keepalive_timeout
        if self.queued is not None or self.backlog is not None:
            if not self.replaying:
                self._replay()
        elif self.eof and not self.in_head:
            self.close()
        elif self.write_paused:
            self.flow.pause(flow.CLIENT_FULL)
        elif not self.feeding and len(self.dp.connections) > SHRINK_AT_ONCE_ABOVE:
            self.shrink_idle()  # many connections: memory counts more than a new parser

    def _replay(self) -> None:
        """Start the queued requests in order, one at a time, then parse what waits as bytes
        (a loop, not recursion: local answers finish at once)."""
        self.replaying = True
        try:
            for _ in range(1 << 20):  # bounded: each turn consumes a queued event or bytes
                if self.closed or self.exchange is not None or self.write_paused:
                    return  # the exchange's end, or resume_writing, goes on from here
                queued = self.queued
                if queued is not None:
                    self._start_queued(queued)
                    continue
                if self._read_on():
                    exchange = self.exchange
                    if exchange is not None:
                        exchange.flush_upstream()
                        exchange.flush_client()
                    continue
                if self.eof and not self.in_head:
                    self.close()
                return
        finally:
            self.replaying = False

    def _read_on(self) -> bool:
        """Reading resumes after pipelining paused it; bytes held back are parsed first.
        True if there were some."""
        self.flow.resume(flow.PIPELINED)
        backlog = self.backlog
        if backlog is None or self.feeding:
            return False
        self.backlog = None
        self._consume(backlog)
        return True

    def _start_queued(self, queued: list[tuple[int, Any]]) -> None:
        kind, payload = queued.pop(0)
        if not queued:
            self.queued = None
        if kind == HEAD_EVENT:
            self._start(payload)
        elif kind == ERROR_EVENT:
            self._fail(payload)
            return
        # Body and end events of the request just started follow it.
        while self.queued is not None and self.exchange is not None:
            kind, payload = self.queued[0]
            if kind == ERROR_EVENT and not self.exchange.req_done:
                # Its own body was malformed: it can never complete; answer the error now.
                self.queued = None
                self._fail(payload)
                return
            if kind == HEAD_EVENT or kind == ERROR_EVENT:
                break
            self.queued.pop(0)
            if not self.queued:
                self.queued = None
            if kind == BODY_EVENT:
                self.exchange.request_body(payload)
            else:
                self.exchange.request_end()
        if self.queued is None and self.parsing_queued and not self.in_head:
            self.parsing_queued = False  # nothing of a later request is half-parsed
        elif self.queued is None and self.in_head:
            self.parsing_queued = self.exchange is not None
        exchange = self.exchange
        if exchange is not None and not exchange.req_done and self.queued is None:
            # The rest of its body is still to come: read on (pipelining paused reading).
            if self.eof:
                self._drop_incomplete()  # the client half-closed before sending it
                return
            self._read_on()
            exchange = self.exchange
        if exchange is not None:
            exchange.flush_upstream()
            exchange.flush_client()

    def upgrade_refused(self) -> None:
        """The upstream answered a WebSocket request with a normal response."""
        self.flow.resume(flow.UPGRADING)

    def start_tunnel(self, tunnel: Any) -> bytes:
        """The 101 went out: from now on bytes are relayed. Returns what the client sent early."""
        self.tunnel = tunnel
        self.deadline = 0.0
        rest = self.upgrade_rest or b""
        self.upgrade_rest = None
        return rest

    # -- output and the end ------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.closed and self.send is not None:
            self.send(data)

    def _fail(self, status: int) -> None:
        """Malformed or over-limit request: answer `status` and close (RFC 9112 11.2)."""
        if self.closed:
            return
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            started = exchange.resp_started
            exchange.client_lost()
            if started:
                self.abort()
                return
        self.dp.status_counts[status] += 1
        self.write(error_response(status, self.dp.date.at_now()))
        transport = self.transport
        if transport is not None and transport.can_write_eof():
            # Lingering close: our FIN goes after the answer; what the client still sends is
            # read and dropped for a while, so its RST cannot destroy the answer in flight.
            transport.write_eof()
            self.closed = True
            self.exchange = None
            self.queued = None
            self.backlog = None
            self.lingering = LINGER_BYTES
            self.flow.resume(-1)
            self.deadline = self.dp.now + LINGER_SECONDS
            return
        self.close()

    def _really_close(self) -> None:
        """The lingering after an error answer is over (`closed` is already set)."""
        self.lingering = -1
        self._shut(False)

    def close(self) -> None:
        """Close after what was written is flushed."""
        if not self.closed:
            self._shut(False)

    def abort(self) -> None:
        """Cut the connection: what the client has is incomplete and must look so."""
        if not self.closed:
            self._shut(True)

    def _shut(self, cut: bool) -> None:
        self.closed = True
        self.dp.connections.discard(self)
        transport = self.transport
        if transport is not None:
            if cut:
                transport.abort()
            else:
                transport.close()

    def shrink_idle(self) -> None:
        """Idle keep-alive for a while: drop what the next request can make again (the parser
        and the write list), as nginx frees an idle connection's request buffers. The parser
        holds no state between messages, so nothing is lost."""
        if (self.exchange is None and not self.in_head and self.boundary and self.queued is None
                and self.backlog is None and self.tunnel is None and self.upgrade_rest is None
                and self.lingering < 0 and not self.closed and not self.wbuf):  # fmt: skip
            self.parser = self.feed = None
            self.wbuf = None
            self.parsing = NO_REQUEST
            self.carry = None

    def deadline_passed(self) -> None:
        if self.lingering >= 0:
            self._really_close()
            return
        exchange = self.exchange
        dp = self.dp
        if exchange is not None:
            if not exchange.req_done and self.deadline and self.deadline <= dp.now:
                if self.flow.reasons:  # edgeproxy paused reading: the client is not to blame
                    self.deadline = dp.now + dp.client_body_timeout
                else:
                    self._fail(408)  # the request body stopped arriving
                    return
            if exchange.deadline and exchange.deadline <= dp.now:
                exchange.deadline_passed()
        elif self.in_head:
            self._fail(408)
        else:
            self.deadline = 0.0
            self.close()  # keep-alive idle timeout: close quietly

"""Client side: one HTTP/1.1 connection from a client, and the exchange in progress on it.

Phases of an exchange (Pingora's phase chart, flattened): parse the head -> look up the route
-> pick an endpoint -> send the head (from the pool, or after connecting) -> stream the request
body -> stream the response back -> release the upstream connection to the pool.

Writes are coalesced: callbacks append to a buffer, and the buffer is written once at the end
of each read, so a small exchange costs one read and one write per message per side.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import TYPE_CHECKING, cast

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpRequestParser,
    parse_url,
)

from edgeproxy.balancing import choose
from edgeproxy.proxy import protocol_factory
from edgeproxy.proxy.headers import (
    PLAIN_CONNECTION_TOKENS,
    REQUEST_DROP,
    SPECIAL_FIELDS,
    connection_tokens,
    error_body,
    hex16,
    join_bytes,
    local_response,
)
from edgeproxy.proxy.upstream import ResponseHead, UpstreamConnection

if TYPE_CHECKING:
    from edgeproxy.health import EndpointState
    from edgeproxy.proxy.dataplane import Dataplane
    from edgeproxy.routing import Cluster, Route

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
PENDING_BODY_HIGH_WATER = 256 * 1024  # buffered before the upstream is connected, then pause
GATEWAY_FAILURE_STATUSES = frozenset({502, 503, 504})
BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})  # sent with Content-Length: 0 if empty

# Phases, for the deadline sweep.
IDLE, READING_HEAD, WAITING_UPSTREAM, STREAMING, CLOSED = range(5)


class ClientProtocolError(Exception):
    """The client broke HTTP/1.1; answer `status` and close (h11 style)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class DownstreamProtocol:
    """asyncio protocol of one client connection (not an asyncio.Protocol subclass: compiled,
    it is an extension type, see downstream.pxd; asyncio and uvloop only call its methods)."""

    __slots__ = (
        "active",
        "attempts",
        "body_received",
        "body_sent",
        "chunked",
        "client_ip",
        "client_ip_bytes",
        "conn_tokens",
        "content_length",
        "deadline",
        "discarding",
        "dp",
        "endpoint",
        "expect_continue",
        "has_body",
        "has_request_id",
        "header_bytes",
        "header_timeout",
        "keepalive_timeout",
        "headers",
        "host_count",
        "host_header",
        "http10",
        "keep_alive",
        "fwd",
        "max_header_bytes",
        "max_body_bytes",
        "method",
        "parser",
        "path",
        "pending",
        "pending_bytes",
        "phase",
        "port",
        "queued",
        "rare",
        "read_paused_by",
        "read_timeout",
        "req_done",
        "resp_done",
        "resp_started",
        "route",
        "scheme",
        "seq",
        "stale_retry",
        "status",
        "transport",
        "trusted_peer",
        "tunnel_rest",
        "up_head",
        "up_ready",
        "up_wbuf",
        "upgrade",
        "upgrading",
        "upstream",
        "url",
        "wbuf",
        "xf_proto",
        "xff",
    )

    def __init__(self, dp: Dataplane, scheme: bytes, port: bytes) -> None:
        self.dp = dp
        self.scheme = scheme
        self.port = port
        self.transport: asyncio.Transport | None = None
        self.parser = HttpRequestParser(self)
        self.client_ip = ""
        self.client_ip_bytes = b""
        self.trusted_peer = False
        self.phase = IDLE
        self.deadline = 0.0
        self.wbuf: list[bytes] = []
        self.queued: list[tuple[object, tuple[object, ...]]] | None = None  # pipelined events
        self.read_paused_by: set[str] = set()
        self.upstream: UpstreamConnection | None = None
        self.tunnel_rest = b""
        self.upgrading = False  # the client asked to upgrade; bytes after the head wait
        self.seq = 0  # exchange number on this connection, so late connects know they are late
        self.rare = True
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        """Fields every exchange writes; the rarely used ones only when an exchange used them."""
        self.seq += 1
        self.active = False
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.fwd: list[bytes] = []
        self.header_bytes = 0
        self.host_header: bytes | None = None
        self.host_count = 0
        self.conn_tokens: frozenset[bytes] = frozenset()
        self.chunked = False
        self.content_length = 0
        self.body_received = 0
        self.endpoint: EndpointState | None = None
        self.attempts = 0
        self.up_ready = False  # head written to the upstream; body goes straight through
        self.body_sent = False
        self.req_done = False
        self.resp_started = False
        self.resp_done = False
        self.status = 0
        self.discarding = False
        if self.rare:
            self._reset_rare()

    def _reset_rare(self) -> None:
        self.rare = False
        self.method = b""
        self.path = ""
        self.has_body = False
        self.keep_alive = True
        self.http10 = False
        self.route: Route | None = None
        self.up_head = b""
        self.expect_continue = False
        self.upgrade: bytes | None = None
        self.xff: bytes | None = None
        self.xf_proto: bytes | None = None
        self.has_request_id = False
        self.stale_retry = False
        self.up_wbuf: list[bytes] = []
        self.pending: list[bytes] = []
        self.pending_bytes = 0

    # -- asyncio.Protocol -------------------------------------------------------------

    def eof_received(self) -> None:
        return None  # the transport closes itself, as with asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if isinstance(peer, tuple) else "127.0.0.1"
        self.client_ip_bytes = self.client_ip.encode()
        proxies = self.dp.settings.trusted_proxies
        if proxies:
            ip = ipaddress.ip_address(self.client_ip)
            self.trusted_peer = any(ip in net for net in proxies)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.dp.connections.add(self)
        settings = self.dp.settings
        self.read_timeout = settings.read_timeout
        self.keepalive_timeout = settings.keepalive_timeout
        self.header_timeout = settings.client_header_timeout
        self.max_header_bytes = settings.max_header_bytes
        self.max_body_bytes = settings.max_body_bytes
        self.deadline = self.dp.now + self.dp.settings.keepalive_timeout

    def data_received(self, data: bytes) -> None:
        phase = self.phase
        if phase == IDLE:
            self.phase = READING_HEAD
            self.deadline = self.dp.now + self.header_timeout
        elif phase == READING_HEAD:
            pass
        elif phase == CLOSED:
            return
        else:
            upstream = self.upstream
            if upstream is not None and upstream.tunnel:
                upstream.write(data)
                return
            if self.upgrading:
                self.tunnel_rest += data
                return
            self.deadline = self.dp.now + self.read_timeout
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as upgrade:
            self.tunnel_rest = data[upgrade.args[0] :]
            if self.phase != CLOSED and self.upgrade is not None:
                self.upgrading = True
        except HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, ClientProtocolError):
                self.fail_client(cause.status)
            else:
                raise
        except HttpParserError:
            self.fail_client(400)
        else:
            if self.phase == READING_HEAD and self.header_bytes > self.max_header_bytes:
                self.fail_client(431)
        buf = self.up_wbuf  # flush_upstream and flush_client, inlined: one write per side
        if buf and self.upstream is not None:
            self.upstream.write(buf[0] if len(buf) == 1 else b"".join(buf))
            buf.clear()
        if self.wbuf or self.phase == CLOSED:
            self.flush_client()

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = CLOSED
        self.dp.connections.discard(self)
        upstream = self.upstream
        if upstream is not None:
            # The client left mid-exchange: the upstream's answer has nowhere to go.
            self.upstream = None
            upstream.abort()
        # Also while a connect is pending: _connect sees the CLOSED phase and drops its socket.
        self._release_endpoint()

    def pause_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    def upstream_paused(self, paused: bool) -> None:
        self._pause_reading("upstream", paused)

    def _pause_reading(self, reason: str, paused: bool) -> None:
        transport = self.transport
        if transport is None:
            return
        if paused:
            if not self.read_paused_by:
                transport.pause_reading()
            self.read_paused_by.add(reason)
        elif reason in self.read_paused_by:
            self.read_paused_by.discard(reason)
            if not self.read_paused_by and self.phase != CLOSED:
                transport.resume_reading()

    # -- what balancers may read (balancing.RequestView) ------------------------------

    def header(self, name: bytes) -> bytes | None:
        name = name.lower()
        for field_name, value in self.headers:
            if field_name.lower() == name:
                return value
        return None

    # -- httptools callbacks: the request ------------------------------------------

    def on_message_begin(self) -> None:
        if self.active or self.queued is not None:
            # Pipelined request while one is in flight: record its events for later.
            self._queue(self.on_message_begin, ())
            return
        self.active = True
        self.phase = READING_HEAD

    def _queue(self, method: object, args: tuple[object, ...]) -> None:
        if self.queued is None:
            self.queued = []
            self._pause_reading("pipelined", True)
        self.queued.append((method, args))

    def on_url(self, url: bytes) -> None:
        if self.queued is not None:
            self._queue(self.on_url, (url,))
            return
        self.url += url
        self.header_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.queued is not None:
            self._queue(self.on_header, (name, value))
            return
        lname = name.lower()
        self.headers.append((name, value))
        self.header_bytes += len(name) + len(value) + 4
        if lname in SPECIAL_FIELDS:
            self._special_field(lname, value)
            if lname in REQUEST_DROP:
                return
        elif lname[:6] == b"proxy-":
            return  # every Proxy-* field is for this hop only
        # Forwarded as received; the upstream head is these lines plus edgeproxy's own.
        self.fwd += (name, b": ", value, b"\r\n")

    def _special_field(self, lname: bytes, value: bytes) -> None:
        """Fields edgeproxy reads (framing, routing, forwarding); most are not forwarded."""
        if lname == b"host":
            self.host_header = value
            self.host_count += 1
        elif lname == b"content-length":
            self.content_length = int(value)  # llhttp checked: digits, duplicates agree
        elif lname == b"connection":
            self.conn_tokens = self.conn_tokens | connection_tokens(value)
        elif lname == b"transfer-encoding":
            self.chunked = True
        elif lname == b"x-forwarded-for":
            self.rare = True
            self.xff = value if self.xff is None else self.xff + b", " + value
        elif lname == b"x-request-id":
            self.rare = True
            self.has_request_id = True
        elif lname == b"x-forwarded-proto":
            self.rare = True
            self.xf_proto = value
        elif lname == b"expect":
            self.rare = True
            if value.lower() == b"100-continue":
                self.expect_continue = True
            else:
                raise ClientProtocolError(417, "unsupported expectation")
        elif lname == b"upgrade":
            self.rare = True
            self.upgrade = value

    def on_headers_complete(self) -> None:
        parser = self.parser
        # Read the parser now: for a queued (pipelined) request it moves on before we replay.
        keep_alive = parser.should_keep_alive()
        # A 1.0 request is kept alive only with "Connection: keep-alive"; without any
        # Connection field a kept-alive request is 1.1, and get_http_version (which formats
        # a string) is not needed.
        version = parser.get_http_version() if self.conn_tokens or not keep_alive else "1.1"
        if self.queued is not None:
            self._queue(self._headers_complete, (parser.get_method(), version, keep_alive))
            return
        self._headers_complete(parser.get_method(), version, keep_alive)

    def _headers_complete(self, method: bytes, version: str, keep_alive: bool) -> None:
        dp = self.dp
        if self.header_bytes > self.max_header_bytes:
            raise ClientProtocolError(431, "header section too large")
        self.method = method
        self.http10 = version == "1.0"
        self.keep_alive = keep_alive and not dp.draining
        self.phase = WAITING_UPSTREAM
        self.deadline = dp.now + self.read_timeout
        if self.host_count > 1 or (self.host_count == 0 and not self.http10):
            raise ClientProtocolError(400, "a request needs exactly one Host (RFC 9112 3.2)")
        # Framing of the request body (RFC 9112 6.3); llhttp already rejected CL + TE.
        length = self.content_length
        self.has_body = self.chunked or length > 0
        if self.max_body_bytes and length > self.max_body_bytes:
            raise ClientProtocolError(413, "request body over the limit")

        url = self.url
        host = self.host_header or b""
        if url[:1] != b"/":
            if url == b"*" and self.method == b"OPTIONS":
                self.respond_local(200, b"")
                return
            try:
                parsed = parse_url(url)
            except HttpParserError:
                raise ClientProtocolError(400, "invalid request target") from None
            if parsed.host:  # absolute-form: its authority overrides Host (RFC 9112 3.2.2)
                host = parsed.host + (b":%d" % parsed.port if parsed.port else b"")
            url = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
            self.url = url
        if self.host_header is None:  # HTTP/1.0 without Host; give the upstream one
            self.fwd += (b"Host: ", host or b"localhost", b"\r\n")
        raw_path = url.partition(b"?")[0]  # partition takes one argument: cheaper than find
        try:
            self.path = path = raw_path.decode("ascii")
        except UnicodeDecodeError:
            raise ClientProtocolError(400, "request target is not ASCII") from None
        host_name = dp.host_names.get(host)
        if host_name is None:
            host_name = dp.remember_host(host, _host_name(host))
        route = dp.table.lookup(host_name, path)
        self.route = route
        if route is None:
            self.respond_local(404, error_body(404))
            return
        if route.ssl_redirect and self.scheme == b"http":
            location = b"https://" + host_name.encode() + url
            self.respond_local(308, b"", extra=[(b"Location", location)])
            return
        forwarded_for = self.client_ip_bytes
        proto = self.scheme
        if self.trusted_peer:
            if self.xff is not None:
                forwarded_for = self.xff + b", " + forwarded_for
                self.client_ip = self.xff.split(b",")[-1].strip().decode("latin-1")
            if self.xf_proto is not None:
                proto = self.xf_proto
        # The upstream request head: origin-form, end-to-end fields only (RFC 9110 7.6.1),
        # X-Forwarded-*. HTTP/1.0 for an HTTP/1.0 client, so that the upstream never answers
        # with a chunked body the client could not read (as nginx's proxy_http_version 1.0).
        parts = [method, b" ", url, b" HTTP/1.0\r\n" if self.http10 else b" HTTP/1.1\r\n"]
        named = self.conn_tokens
        if named and not named <= PLAIN_CONNECTION_TOKENS:
            # Fields the client named in Connection are hop-by-hop too (RFC 9110 7.6.1).
            for name, value in self.headers:
                lname = name.lower()
                if lname not in REQUEST_DROP and lname not in named and lname[:6] != b"proxy-":
                    parts += (name, b": ", value, b"\r\n")
        else:
            parts += self.fwd
        if host:
            parts += (b"X-Forwarded-Host: ", host, b"\r\n")
        parts += (b"X-Forwarded-For: ", forwarded_for, b"\r\nX-Forwarded-Proto: ", proto,
                  b"\r\nX-Forwarded-Port: ", self.port, b"\r\n")  # fmt: skip
        if not self.has_request_id:
            dp.rid_counter += 1
            parts += (b"X-Request-ID: ", dp.rid_prefix, hex16(dp.rid_counter), b"\r\n")
        if self.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n\r\n")
        elif length or method in BODY_METHODS:
            parts.append(b"Content-Length: %d\r\n\r\n" % length)
        elif self.upgrade and b"upgrade" in named:
            parts += (b"Connection: upgrade\r\nUpgrade: ", self.upgrade, b"\r\n\r\n")
        else:
            parts.append(b"\r\n")
        self.up_head = join_bytes(parts)
        if self.expect_continue and self.has_body and not self.http10:
            self.wbuf.append(b"HTTP/1.1 100 Continue\r\n\r\n")
        balancer = route.cluster.balancer
        if balancer is not None and not dp.registry.ejected_count:
            endpoint = balancer.pick(self)  # nothing ejected anywhere: no health check
            if endpoint is not None:
                self._use_endpoint(endpoint, route.cluster)
                return
        self._start_attempt(None)

    def on_body(self, body: bytes) -> None:
        if self.queued is not None:
            self._queue(self.on_body, (body,))
            return
        self.body_received += len(body)
        if self.discarding:
            return
        limit = self.dp.settings.max_body_bytes
        if limit and self.body_received > limit:
            raise ClientProtocolError(413, "request body over the limit")
        if self.chunked:
            body = b"%x\r\n%b\r\n" % (len(body), body)
        if self.up_ready:
            self.up_wbuf.append(body)
            self.body_sent = True
        else:
            self.rare = True
            self.pending.append(body)
            self.pending_bytes += len(body)
            if self.pending_bytes > PENDING_BODY_HIGH_WATER:
                self._pause_reading("connecting", True)

    def on_message_complete(self) -> None:
        if self.queued is not None:
            self._queue(self.on_message_complete, ())
            return
        if self.phase == CLOSED:
            return
        self.req_done = True
        if self.chunked and not self.discarding:
            if self.up_ready:
                self.up_wbuf.append(b"0\r\n\r\n")
            else:
                self.pending.append(b"0\r\n\r\n")
        if self.resp_done:
            self._finish()

    # -- choosing and reaching an endpoint -------------------------------------------

    def _start_attempt(self, exclude: EndpointState | None) -> None:
        route = self.route
        assert route is not None
        dp = self.dp
        cluster = route.cluster
        if exclude is None and not dp.registry.ejected_count and cluster.balancer is not None:
            endpoint = cluster.balancer.pick(self)  # nothing ejected anywhere: no health check
        else:
            endpoint = choose(
                cluster, self, dp.now, dp.registry.ejected_count,
                dp.settings.outlier.panic_threshold_percent, exclude, dp.registry.ejection_epoch,
            )  # fmt: skip
        if endpoint is None:
            # No endpoint at all is 503; none left to retry on, after a failure, is that 502.
            status = 503 if exclude is None else 502
            self.respond_local(status, error_body(status))
            return
        self._use_endpoint(endpoint, cluster)

    def _use_endpoint(self, endpoint: EndpointState, cluster: Cluster) -> None:
        """Send the request to this endpoint: on a pooled connection, or a new one."""
        self.attempts += 1
        self.endpoint = endpoint
        endpoint.in_flight += 1
        endpoint.requests += 1
        idle = endpoint.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn.reused = True
                self._attach(conn)  # a C call when compiled: no inlined copy needed
                return
        dp = self.dp
        self.phase = WAITING_UPSTREAM
        self.deadline = dp.now + dp.settings.connect_timeout
        dp.loop.create_task(self._connect(endpoint, cluster))

    async def _connect(self, endpoint: EndpointState, cluster: Cluster) -> None:
        dp = self.dp
        seq = self.seq
        dp.upstream_connects += 1
        tls = None
        server_name = None
        if cluster.upstream_tls:
            tls = cluster.upstream_ssl if cluster.backend_ca else dp.upstream_ssl
            server_name = cluster.backend_server_name or endpoint.address
        try:
            _, protocol = await dp.loop.create_connection(
                protocol_factory(lambda: UpstreamConnection(endpoint)), endpoint.address,
                endpoint.port, ssl=tls, server_hostname=server_name,
            )  # fmt: skip
        except (TimeoutError, OSError) as exc:
            if self.seq == seq and self.endpoint is endpoint and self.phase == WAITING_UPSTREAM:
                self._upstream_failed(endpoint, f"connect: {exc}", body_sent=False)
            return
        conn = cast("UpstreamConnection", protocol)
        if (self.seq != seq or self.endpoint is not endpoint or self.phase != WAITING_UPSTREAM
                or self.upstream):  # fmt: skip
            conn.close()  # the exchange timed out or the client left meanwhile
            return
        try:
            sock = conn.transport.get_extra_info("socket") if conn.transport else None
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self._attach(conn)
        self.flush_upstream()
        self.flush_client()

    def _attach(self, conn: UpstreamConnection) -> None:
        self.upstream = conn
        conn.begin(self, skip_body=self.method == b"HEAD")
        self.phase = WAITING_UPSTREAM
        self.deadline = self.dp.now + self.read_timeout
        self.up_ready = True
        self.up_wbuf.append(self.up_head)
        if self.pending:
            self.up_wbuf.extend(self.pending)
            self.body_sent = True
            self.pending = []
            self.pending_bytes = 0
            self._pause_reading("connecting", False)

    def flush_upstream(self) -> None:
        buf = self.up_wbuf
        if buf and self.upstream is not None:
            self.upstream.write(buf[0] if len(buf) == 1 else b"".join(buf))
            buf.clear()

    def flush_client(self) -> None:
        buf = self.wbuf
        if buf and self.transport is not None:
            self.transport.write(buf[0] if len(buf) == 1 else b"".join(buf))
            buf.clear()
        if self.phase == CLOSED and self.transport is not None:
            self.transport.close()

    # -- events from the upstream connection ---------------------------------------

    def response_informational(self, head: ResponseHead) -> None:
        # 100 was answered by edgeproxy already; other 1xx (103 Early Hints) pass to 1.1 clients.
        if head.status != 100 and not self.http10:
            self.wbuf.append(head.head + b"\r\n")

    def response_head(self, conn: UpstreamConnection, head: ResponseHead, no_body: bool) -> bool:
        """Queue the client's response head; True if the body must be re-framed as chunked."""
        self.phase = STREAMING
        self.resp_started = True
        self.status = head.status
        if self.dp.draining:
            self.keep_alive = False  # shutting down: this response is the connection's last
        rechunk = False
        if no_body or head.content_length is not None or head.chunked:
            framing = b""  # Content-Length or chunked pass through with the body
        elif self.http10:
            framing = b""  # close-delimited to an HTTP/1.0 client too
            self.keep_alive = False
        else:
            framing = b"Transfer-Encoding: chunked\r\n"
            rechunk = True
        if self.scheme == b"https" and self.route is not None and self.route.hsts:
            framing += self.route.hsts  # RFC 6797: only over a secure transport
        if not self.keep_alive:
            self.wbuf.append(head.head + framing + b"Connection: close\r\n\r\n")
        elif self.http10:
            self.wbuf.append(head.head + framing + b"Connection: keep-alive\r\n\r\n")
        else:
            self.wbuf.append(head.head + framing + b"\r\n")
        return rechunk

    def response_complete(self, conn: UpstreamConnection) -> None:
        self.resp_done = True
        endpoint = self.endpoint
        if endpoint is not None:
            if self.status in GATEWAY_FAILURE_STATUSES:
                self.dp.registry.record_failure(endpoint, self.route.cluster)  # type: ignore[union-attr]
            else:
                if endpoint.consecutive_failures:
                    self.dp.registry.record_success(endpoint)
        self.upstream = None
        conn.exchange = None
        dp = self.dp
        if conn.reusable and self.req_done and not endpoint.draining:  # type: ignore[union-attr]
            conn.idle_since = dp.now
            idle = conn.endpoint.idle
            if len(idle) < dp.settings.upstream_max_idle_per_endpoint:
                idle.append(conn)
            else:
                conn.close()
        else:
            conn.close()
            if not self.req_done:
                # Upstream answered before the body ended: read and drop the rest (nginx's
                # lingering discard) so the connection stays usable for the next request.
                self.discarding = True
        if endpoint is not None:  # _release_endpoint, inlined
            endpoint.in_flight -= 1
            self.endpoint = None
        if self.req_done:
            if (self.keep_alive and self.queued is None and not self.upgrading
                    and not self.read_paused_by and self.phase != CLOSED):  # fmt: skip
                # _finish for a plain keep-alive exchange, inlined.
                dp.status_counts[self.status] += 1
                self._reset_exchange()
                self.phase = IDLE
                self.deadline = dp.now + self.keepalive_timeout
            else:
                self._finish()

    def upstream_upgraded(self, rest: bytes) -> None:
        """101 Switching Protocols: from here on both connections are a byte tunnel."""
        conn = self.upstream
        assert conn is not None and conn.switching is not None
        switching = conn.switching
        # The head lost Connection/Upgrade as hop-by-hop; for a tunnel they are the point.
        self.wbuf.append(switching.head + b"Connection: upgrade\r\nUpgrade: "
                         + (switching.upgrade or self.upgrade or b"") + b"\r\n\r\n")  # fmt: skip
        if rest:
            self.wbuf.append(rest)
        self.phase = STREAMING
        self.deadline = 0.0  # tunnels idle as long as both ends want
        self.status = 101
        self.resp_started = True
        if self.tunnel_rest:
            conn.write(self.tunnel_rest)
            self.tunnel_rest = b""

    def tunnel_to_client(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def upstream_broken(self, conn: UpstreamConnection, reason: str) -> None:
        conn.abort()
        self.upstream_lost(conn, ConnectionError(reason))

    def upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        """The upstream connection closed or failed while this exchange used it."""
        if self.upstream is not conn:
            return
        self.upstream = None
        conn.exchange = None
        if conn.tunnel:
            self._release_endpoint()
            self._close_client()
            return
        if self.resp_started:
            # Part of the response went out: the only honest signal left is to cut the client.
            self._release_endpoint()
            self._close_client()
            return
        endpoint = self.endpoint
        assert endpoint is not None
        self.rare = True
        if (conn.reused and not conn.received and not self.stale_retry and not self.body_sent
                and len(self.route.cluster.hosts) == 1):  # type: ignore[union-attr]  # fmt: skip
            # A pooled connection the upstream closed meanwhile, and no other endpoint to try:
            # once more on a fresh connection. With a choice, the retry goes elsewhere.
            self.stale_retry = True
            self.up_ready = False
            self.up_wbuf.clear()
            endpoint.in_flight -= 1
            endpoint.requests -= 1
            self.attempts -= 1
            self._start_attempt_same(endpoint)
            return
        self._upstream_failed(endpoint, f"reset: {exc}", body_sent=self.body_sent)

    def _start_attempt_same(self, endpoint: EndpointState) -> None:
        self.attempts += 1
        endpoint.in_flight += 1
        endpoint.requests += 1
        self.phase = WAITING_UPSTREAM
        self.deadline = self.dp.now + self.dp.settings.connect_timeout
        self.dp.loop.create_task(self._connect(endpoint, self.route.cluster))  # type: ignore[union-attr]

    def _upstream_failed(self, endpoint: EndpointState, reason: str, body_sent: bool, timeout: bool = False) -> None:  # fmt: skip
        route = self.route
        assert route is not None
        self.rare = True
        self.dp.registry.record_failure(endpoint, route.cluster)
        self._release_endpoint()
        self.up_ready = False
        self.up_wbuf.clear()
        retryable = (self.method in IDEMPOTENT or not self.has_body) and not body_sent
        if retryable and self.attempts < 2 and len(route.cluster.hosts) > 1 and not timeout:
            self.dp.retries += 1
            self._start_attempt(endpoint)
            self.flush_upstream()
            self.flush_client()
            return
        self.respond_local(504 if timeout else 502, error_body(504 if timeout else 502))
        self.flush_client()

    def _release_endpoint(self) -> None:
        endpoint = self.endpoint
        if endpoint is not None:
            endpoint.in_flight -= 1
            self.endpoint = None

    # -- local answers and the end of an exchange --------------------------------------

    def respond_local(self, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> None:  # fmt: skip
        """Answer from edgeproxy itself; the rest of the request body is read and dropped."""
        self.rare = True
        self.status = status
        self.resp_started = self.resp_done = True
        self.discarding = True
        self.pending = []
        close = not self.keep_alive or (self.has_body and not self.req_done and
                                        self.content_length > self.dp.settings.max_header_bytes)  # fmt: skip
        if close:
            self.keep_alive = False
        extra = list(extra or ())
        if self.http10 and not close:
            extra.append((b"Connection", b"keep-alive"))
        self.wbuf.append(
            local_response(status, body, self.dp.date.at_now(), close=close, extra=extra,
                           head_only=self.method == b"HEAD")  # fmt: skip
        )
        if self.req_done or close:
            self._finish()

    def fail_client(self, status: int) -> None:
        """Malformed or over-limit request: answer `status` and close (RFC 9112 11.2)."""
        if self.phase == CLOSED:
            return
        upstream = self.upstream
        if upstream is not None:
            self.upstream = None
            upstream.abort()
            self._release_endpoint()
        if not self.resp_started:
            self.status = status
            self.wbuf.append(local_response(status, error_body(status), self.dp.date.at_now(), close=True))  # fmt: skip
        self._count()
        self._close_client()

    def _close_client(self) -> None:
        self.phase = CLOSED
        self.dp.connections.discard(self)
        self.flush_client()

    def _count(self) -> None:
        self.dp.status_counts[self.status] += 1

    def _finish(self) -> None:
        if self.phase == CLOSED:
            return
        self.dp.status_counts[self.status] += 1
        if not self.keep_alive or self.upgrading:
            self._close_client()
            return
        self._reset_exchange()
        self.phase = IDLE
        self.deadline = self.dp.now + self.keepalive_timeout
        if "upstream" in self.read_paused_by:
            # The upstream's buffer filled during this exchange and its connection was
            # released before it drained: its resume_writing will not reach us.
            self._pause_reading("upstream", False)
        queued = self.queued
        if queued is not None:
            self.queued = None
            self._pause_reading("pipelined", False)
            try:
                for index, (method, args) in enumerate(queued):
                    if self.active and method == self.on_message_begin:
                        # The next pipelined request waits for the one just started.
                        self.queued = queued[index:]
                        self._pause_reading("pipelined", True)
                        break
                    method(*args)  # type: ignore[operator]
                    if self.phase == CLOSED:
                        break
            except ClientProtocolError as exc:
                self.fail_client(exc.status)
            self.flush_upstream()

    def deadline_passed(self) -> None:
        phase = self.phase
        if phase == IDLE:
            self.deadline = 0.0
            self._close_client()  # keep-alive idle timeout: close quietly
        elif phase == READING_HEAD:
            self.fail_client(408)
        elif phase == WAITING_UPSTREAM and not self.resp_started:
            endpoint = self.endpoint
            upstream = self.upstream
            self.upstream = None
            if upstream is not None:
                upstream.abort()
            if endpoint is not None:
                self._upstream_failed(endpoint, "timeout", body_sent=True, timeout=True)
            else:
                self.fail_client(504)
        else:
            # Stalled mid-stream (upstream silent, or client not reading): give up on both.
            upstream = self.upstream
            self.upstream = None
            if upstream is not None:
                upstream.abort()
            self._release_endpoint()
            self._close_client()


def _host_name(host: bytes) -> str:
    """Host header -> lower-case name without port (RFC 9110 7.2), "[::1]" kept bracketed."""
    if not host:
        return ""
    text = host.decode("latin-1").lower()
    if text[0] == "[":
        end = text.find("]")
        return text[: end + 1] if end > 0 else text
    colon = text.rfind(":")
    return text[:colon] if colon >= 0 else text

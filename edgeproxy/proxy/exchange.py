"""One request's exchange and its context (Pingora's CTX): the phases after the head is parsed.

    route -> pick -> take a pooled connection or connect -> send -> relay the response -> finish

Each phase is a method; what a request needs is a field of its Exchange, created per request
and dropped at its end, never a field of the client connection. A failure goes one step back
in the phases when `retry_decision` allows it: pick again (another endpoint) and send again.
The codecs report to the exchange: the client side (http1_server.ClientConnection) with
request_body / request_end / client_lost / deadline_passed, the upstream side
(http1_client.UpstreamConnection) with the response_* and upstream_* events.

Where later phases fit: a filter phase (header modifiers, redirects, rewrites) runs between
`route` and `pick` on `self.req`; a logging phase is `finish`; an HTTP/2 codec calls the same
entry points as ClientConnection does.
"""

from __future__ import annotations

import asyncio
from time import perf_counter
from typing import Any

from edgeproxy.hosts import EndpointState
from edgeproxy.proxy.binding import ClusterBinding
from edgeproxy.proxy.dataplane import Dataplane
from edgeproxy.proxy.flow import (
    BODY_BUFFERED,
    DOWNSTREAM_FULL,
    EXCHANGE_REASONS,
    UPSTREAM_FULL,
    FlowControl,
)
from edgeproxy.proxy.forward import upstream_request_head
from edgeproxy.proxy.http1_client import ResponseHead, ResponseReceiver, UpstreamConnection
from edgeproxy.proxy.local import CONTINUE, error_body, local_response
from edgeproxy.proxy.message import (
    CHUNKED,
    IDEMPOTENT,
    LENGTH,
    NO_BODY,
    UNTIL_CLOSE,
    VALID_HOST,
    ConnectionInfo,
    RequestHead,
    host_name,
    response_framing,
)
from edgeproxy.proxy.observe import RouteFigures
from edgeproxy.proxy.pool import take_idle
from edgeproxy.routing import Route

GATEWAY_FAILURE_STATUSES = frozenset({502, 503, 504})
PENDING_BODY_HIGH_WATER = 256 * 1024  # buffered while no upstream is attached, then pause
REPLAY_LIMIT = 64 * 1024  # body bytes kept so that an idempotent request can be sent again
MAX_ATTEMPTS = 3  # first try plus two retries, each on an endpoint not tried yet

# How far an attempt got: the failure stage decides whether it may be retried.
NOTHING_SENT, REQUEST_SENT, RESPONSE_STARTED = range(3)


def retry_decision(stage: int, method: bytes, replayable: bool) -> bool:
    """May a failed attempt be sent again, to another endpoint?

    Before any byte was sent (refused, connect timeout, TLS handshake failure): any method, the
    upstream cannot have acted on it. After the request was sent, before any response byte: only
    idempotent methods (RFC 9110 9.2.2), and only when the body is still at hand. Never once a
    response byte arrived: part of an answer may already be with the client. (Envoy's
    reset-before-request vs reset; Pingora's fail_to_connect vs error_while_proxy.)
    """
    if stage == NOTHING_SENT:
        return True
    if stage == REQUEST_SENT:
        return replayable and method in IDEMPOTENT
    return False


class Downstream:
    """What an exchange needs of the connection its request came on: http1_server's
    ClientConnection now, an HTTP/2 stream later. A base class here, so that the exchange calls
    it as C calls when compiled while the import graph stays one-way (http1_server -> exchange).
    Subclasses set transport, send (its write, bound once per connection: a method looked up
    per call costs more than the call), flow, info, closed and wbuf (the bytes to write at the
    end of the current read, which the exchange appends to)."""

    def exchange_done(self, exchange: Exchange, keep_alive: bool) -> None:
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def upgrade_refused(self) -> None:
        raise NotImplementedError

    def start_tunnel(self, tunnel: Any) -> bytes:
        raise NotImplementedError


class Exchange(ResponseReceiver):
    """One request, from its parsed head to the last byte of its response (see exchange.pxd)."""

    __slots__ = (
        "attempts", "binding", "cflow", "client", "conn", "connect_task", "deadline", "done", "dp", "endpoint", "framing",
        "keep_alive", "kept", "kept_bytes", "pending", "pending_bytes", "replayable", "req",
        "req_done", "resp_done", "resp_started", "route", "stage", "status", "tried",
        "tunnel", "up", "up_head", "up_until_close", "upgrading", "out",
        "up_buf", "discarding", "started", "attempt_at", "header_at", "connect_s", "received",
        "sent", "request_id", "picked",
    )  # fmt: skip

    def __init__(self, client: Downstream, dp: Dataplane, req: RequestHead) -> None:
        # The fields are read back through self: compiled, they are typed (the arguments of a
        # def are not), so each read is a C member access, not a generic attribute lookup.
        self.client = client  # http1_server.ClientConnection (or a later codec)
        self.dp = dp
        self.req = req
        self.conn: ConnectionInfo = self.client.info  # type: ignore[attr-defined]
        self.cflow: FlowControl = self.client.flow  # type: ignore[attr-defined]  # its flow control
        # Loop time the current phase must end by (connect, read); 0: none.
        self.deadline = self.dp.now + self.dp.read_timeout
        # The connections' own write buffers (written once per read on the other side): the
        # client's from the start, the upstream connection's once one is attached.
        self.out: list[bytes] = self.client.wbuf  # type: ignore[attr-defined]
        self.up_buf: list[bytes] | None = None
        self.route: Route | None = None
        self.binding: ClusterBinding | None = None
        self.endpoint: EndpointState | None = None
        self.up: UpstreamConnection | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.tried: list[EndpointState] | None = None
        self.attempts = 0
        self.stage = NOTHING_SENT
        self.up_head = b""
        self.pending: list[bytes] | None = None  # body pieces (framed) not yet written upstream
        self.pending_bytes = 0
        self.kept: list[bytes] | None = None  # body pieces written, while a retry could resend them
        self.kept_bytes = 0
        self.replayable = True
        self.req_done = False
        self.resp_started = False
        self.resp_done = False
        self.done = False
        self.discarding = False  # the response is decided: the rest of the body is dropped
        self.status = 0
        self.framing = LENGTH
        self.up_until_close = False
        self.keep_alive = self.req.keep_alive and not self.dp.draining
        self.upgrading = False
        self.tunnel: Any = None
        # For the finish phase (observe, accesslog): perf_counter times, 0: not reached.
        self.started = perf_counter()
        self.attempt_at = 0.0  # the last attempt's pick
        self.header_at = 0.0  # its response head
        self.connect_s = -1.0  # its connect, when it opened a connection
        self.received = self.req.size  # head and body bytes from the client
        self.sent = 0  # bytes written to the client
        self.request_id: bytes | None = None  # the X-Request-ID edgeproxy added
        self.picked: EndpointState | None = None  # the last attempt's endpoint (kept after release)

    # -- what balancers read (balancing.RequestView) ---------------------------------------

    @property
    def client_ip(self) -> str:
        xff = self.req.xff
        if xff is not None and self.conn.trusted:  # the address the trusted proxy saw
            return xff.rpartition(b",")[2].strip().decode("latin-1")
        return self.conn.client_ip

    @property
    def path(self) -> str:
        return self.req.path

    def header(self, name: bytes) -> bytes | None:
        return self.req.header(name)

    # -- phase: route ------------------------------------------------------------------

    def start(self) -> None:
        req = self.req
        dp = self.dp
        authority = req.authority
        name = dp.host_names.get(authority)  # a memo of the authorities already checked
        if name is None:
            if VALID_HOST.fullmatch(authority) is None:
                self.keep_alive = False  # RFC 9112 3.2: 400, and the connection is closed
                self.respond_local(400, error_body(400))
                return
            name = dp.remember_host(authority, host_name(authority))
        if req.path == "*":  # OPTIONS * (RFC 9110 9.3.7): about edgeproxy itself
            self.respond_local(200, b"")
            return
        route = dp.route(name, req.path)
        self.route = route
        if route is None:
            self.respond_local(404, error_body(404))
            return
        if route.ssl_redirect and self.conn.scheme == b"http":
            location = b"https://" + name.encode() + req.origin_target()
            self.respond_local(308, b"", extra=[(b"Location", location)])
            return
        binding = dp.bindings.get(route.cluster)
        if binding is None:
            self.respond_local(503, error_body(503))
            return
        self.binding = binding
        request_id = self.request_id = None if req.has_request_id else dp.request_id()
        self.up_head = upstream_request_head(req, self.conn, request_id)
        if req.expect_continue and (req.chunked or req.content_length > 0) and not req.http10:
            self.out.append(CONTINUE)
        if req.websocket:
            self.upgrading = True
        self.pick()

    # -- phase: pick -------------------------------------------------------------------

    def pick(self) -> None:
        binding = self.binding
        assert binding is not None
        dp = self.dp
        registry = dp.registry
        if not registry.ejected_count and self.tried is None:
            endpoint = binding.balancer.pick(self)  # nothing to avoid: no accept check
        else:
            endpoint = binding.pick(self, dp.now, registry.ejected_count, registry.ejection_epoch,
                                    dp.panic_percent, self.tried)  # fmt: skip
        if endpoint is None:
            # No endpoint at all is 503; none left to retry on, after a failure, 502.
            status = 503 if self.tried is None else 502
            self.respond_local(status, error_body(status))
            return
        self.attempts += 1
        self.attempt_at = perf_counter()
        self.connect_s = -1.0
        self.endpoint = self.picked = endpoint
        endpoint.in_flight += 1
        endpoint.requests += 1
        conn = take_idle(binding.pools.get(endpoint))
        if conn is not None:
            self.attach(conn)
            return
        self.stage = NOTHING_SENT
        self.deadline = dp.now + dp.connect_timeout
        self.connect_task = dp.loop.create_task(self.connect(endpoint, binding))

    # -- phase: connect ----------------------------------------------------------------

    async def connect(self, endpoint: EndpointState, binding: ClusterBinding) -> None:
        figures = binding.service_figures
        figures.connects += 1
        began = perf_counter()
        try:
            conn = await self.dp.pool.connect(endpoint, binding.profile, binding.tls_context)
        except asyncio.CancelledError:
            figures.connect_errors += 1
            return  # timed out or abandoned; the exchange moved on
        except (OSError, ValueError) as exc:  # refused, unreachable, TLS handshake failure
            figures.connect_errors += 1
            if self.endpoint is endpoint and not self.done:
                self.connect_task = None
                self.fail(NOTHING_SENT, f"connect: {exc}", timeout=False)
            return
        if self.endpoint is not endpoint or self.done or self.up is not None:
            conn.close()  # the exchange timed out, failed over or ended meanwhile
            return
        self.connect_task = None
        if self.endpoint is endpoint:
            self.connect_s = perf_counter() - began
        self.attach(conn)
        self.flush_upstream()
        self.flush_client()

    # -- phase: send -------------------------------------------------------------------

    def attach(self, conn: UpstreamConnection) -> None:
        self.up = conn
        conn.begin(self, self.req.method == b"HEAD")
        self.stage = REQUEST_SENT
        self.deadline = self.dp.now + self.dp.read_timeout
        buf = self.up_buf = conn.wbuf
        buf.append(self.up_head)
        pending = self.pending
        if pending:
            buf.extend(pending)
            if self.replayable:
                if self.kept is None:
                    self.kept = []
                self.kept.extend(pending)
            self.pending = None
            self.pending_bytes = 0
            self.cflow.resume(BODY_BUFFERED)

    def request_body(self, data: bytes) -> None:
        self.received += len(data)
        if self.discarding:
            return
        if self.req.chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        self._body_piece(data)

    def _body_piece(self, data: bytes) -> None:
        up_buf = self.up_buf
        if self.up is not None and up_buf is not None:
            up_buf.append(data)
            self.deadline = self.dp.now + self.dp.read_timeout
            if self.replayable:
                self.kept_bytes += len(data)
                if self.kept_bytes > REPLAY_LIMIT:
                    self.kept = None
                    self.replayable = False
                else:
                    if self.kept is None:
                        self.kept = []
                    self.kept.append(data)
        else:
            # Not attached yet (connecting): keep it, and stop reading past the high water.
            # The connect deadline stays as it is: a body streaming in is no progress upstream.
            if self.pending is None:
                self.pending = []
            self.pending.append(data)
            self.pending_bytes += len(data)
            if self.pending_bytes > PENDING_BODY_HIGH_WATER:
                self.cflow.pause(BODY_BUFFERED)

    def request_end(self) -> None:
        self.req_done = True
        if self.req.chunked and not self.discarding:
            self._body_piece(b"0\r\n\r\n")  # trailers are not forwarded (TODO)
        if self.resp_done:
            self.finish()

    def flush_upstream(self) -> None:
        buf = self.up_buf
        if buf and self.up is not None:
            self.up.write(buf[0] if len(buf) == 1 else b"".join(buf))
            buf.clear()

    # -- phase: relay the response -----------------------------------------------------

    def response_informational(self, head: ResponseHead) -> None:
        # 100 was answered by edgeproxy already; other 1xx (103 Early Hints) pass to 1.1 clients.
        if head.status != 100 and not self.req.http10:
            self.out.append(head.head + b"\r\n")

    def response_head(self, head: ResponseHead) -> None:
        self.stage = RESPONSE_STARTED
        self.resp_started = True
        if self.dp.access_log is not None:  # only the log reads it: one clock read less
            self.header_at = perf_counter()
        status = self.status = head.status
        req = self.req
        endpoint = self.endpoint
        if endpoint is not None:
            if status in GATEWAY_FAILURE_STATUSES:
                self._record_failure(endpoint)
            elif endpoint.consecutive_failures:
                self.dp.registry.record_success(endpoint)
        framing = self.framing = response_framing(status, head.content_length, head.chunked,
                                                  req.method == b"HEAD", req.http10)  # fmt: skip
        self.up_until_close = (head.content_length is None and not head.chunked
                               and framing != NO_BODY)  # fmt: skip
        if self.upgrading:
            self.upgrading = False  # a WebSocket upgrade the upstream refused
            self.keep_alive = False  # the client parser is past an upgrade request: close after
            self.client.upgrade_refused()
        if framing == UNTIL_CLOSE or self.dp.draining:
            self.keep_alive = False
        line = head.head
        if framing == CHUNKED:
            line += b"Transfer-Encoding: chunked\r\n"
        route = self.route
        if route is not None and route.hsts is not None and self.conn.scheme == b"https":
            line += route.hsts  # RFC 6797: only over a secure transport
        if not self.keep_alive:
            line += b"Connection: close\r\n\r\n"
        elif req.http10:
            line += b"Connection: keep-alive\r\n\r\n"
        else:
            line += b"\r\n"
        self.out.append(line)
        self.deadline = self.dp.now + self.dp.read_timeout

    def response_body(self, data: bytes) -> None:
        if self.framing == CHUNKED:
            self.out.append(b"%x\r\n%b\r\n" % (len(data), data))
        elif self.framing != NO_BODY:
            self.out.append(data)

    def response_flush(self) -> None:
        self.deadline = self.dp.now + self.dp.read_timeout
        self.flush_client()

    def response_end(self, conn: UpstreamConnection) -> None:
        """The upstream's response is complete (as llhttp delimited it)."""
        if self.framing == CHUNKED:
            self.out.append(b"0\r\n\r\n")
        self.resp_done = True
        self.up = None
        conn.flow.resume(DOWNSTREAM_FULL)
        if self.req_done:
            self.dp.pool.put(conn, self.dp.now)
        else:
            # Answered before the body ended (an early 413, say): that connection is in an
            # unknown state. The rest of the client's body is read and dropped (nginx's
            # lingering discard), and whoever paused the client for it releases the pause now.
            conn.close()
            self._discard_rest()
        self._release_endpoint()
        self.flush_client()
        if self.req_done:
            self.finish()

    def flush_client(self) -> None:
        out = self.out
        if out:
            client = self.client
            send = client.send  # type: ignore[attr-defined]
            if send is not None and not client.closed:  # type: ignore[attr-defined]
                data = out[0] if len(out) == 1 else b"".join(out)
                self.sent += len(data)
                send(data)
            out.clear()

    # -- failures and retries --------------------------------------------------------------

    def upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        """The upstream connection closed or failed while this exchange used it."""
        if self.up is not conn:
            return
        self.up = None
        if self.tunnel is not None:
            self.tunnel.upstream_closed()
            return
        if self.resp_started:
            if self.up_until_close and exc is None:
                # A clean close ends a body without length (RFC 9112 6.3 rule 8).
                conn.reusable = False
                self.response_end(conn)
                return
            # Cut (a reset, or fewer bytes than framed): never presented as complete.
            self._release_endpoint()
            self.flush_client()
            self.client.abort()
            self.finish_aborted()
            return
        stale = conn.reused and not conn.received  # a pooled connection the upstream dropped
        self.fail(self.stage, f"reset: {exc}", timeout=False, blame=not stale)

    def fail(self, stage: int, reason: str, timeout: bool, blame: bool = True) -> None:
        """An attempt failed before any response byte: retry elsewhere, or answer 502/504."""
        endpoint = self.endpoint
        binding = self.binding
        assert binding is not None
        if endpoint is not None:
            if blame:
                self._record_failure(endpoint)
            if self.tried is None:
                self.tried = []
            if blame or len(binding.hosts) > 1:
                self.tried.append(endpoint)
            self._release_endpoint()
        up = self.up
        if up is not None:
            self.up = None
            up.abort()
        if self.up_buf is not None:
            self.up_buf.clear()  # unsent bytes of the failed attempt
            self.up_buf = None
        if (self.attempts < MAX_ATTEMPTS and not self.resp_started
                and retry_decision(stage, self.req.method, self.replayable)):  # fmt: skip
            self.dp.retries += 1
            binding.service_figures.retries += 1
            # Back one phase: the body written so far is sent again from the start.
            if self.kept:
                self.pending = self.kept + (self.pending or [])
                self.pending_bytes = self.kept_bytes + self.pending_bytes
            self.kept = None
            self.kept_bytes = 0
            self.pick()
            self.flush_upstream()
            self.flush_client()
            return
        status = 504 if timeout else 502
        self.respond_local(status, error_body(status))
        self.flush_client()

    def _record_failure(self, endpoint: EndpointState) -> None:
        binding = self.binding
        assert binding is not None
        self.dp.registry.record_failure(endpoint, binding.hosts, binding.outlier)

    def _release_endpoint(self) -> None:
        endpoint = self.endpoint
        if endpoint is not None:
            endpoint.in_flight -= 1
            self.endpoint = None

    def deadline_passed(self) -> None:
        if self.tunnel is not None:
            return
        if self.resp_started:
            # Stalled mid-stream (upstream silent, or client not reading): give up on both.
            self._abort_upstream()
            self._release_endpoint()
            self.client.abort()
            self.finish_aborted()
            return
        task = self.connect_task
        if task is not None:
            self.connect_task = None
            task.cancel()
            self.fail(NOTHING_SENT, "connect timeout", timeout=True)
        elif self.endpoint is not None:
            # Sent, no answer in the read timeout: 504, not retried (it would double the wait).
            self.fail(RESPONSE_STARTED, "timeout", timeout=True)
        else:
            self.respond_local(504, error_body(504))
        self.flush_client()

    def client_lost(self) -> None:
        """The client connection is gone: the answer has nowhere to go."""
        if self.done:
            return
        if self.tunnel is not None:
            self.tunnel.client_closed()
        self._abort_upstream()
        self._release_endpoint()
        self.finish_aborted()

    def _abort_upstream(self) -> None:
        task = self.connect_task
        if task is not None:
            self.connect_task = None
            task.cancel()
        up = self.up
        if up is not None:
            self.up = None
            up.abort()

    def upstream_write_paused(self, paused: bool) -> None:
        if paused:
            self.cflow.pause(UPSTREAM_FULL)
        else:
            self.cflow.resume(UPSTREAM_FULL)

    def client_write_paused(self, paused: bool) -> None:
        up = self.up
        if up is not None:
            if paused:
                up.flow.pause(DOWNSTREAM_FULL)
            else:
                up.flow.resume(DOWNSTREAM_FULL)

    # -- WebSocket -------------------------------------------------------------------------

    def upstream_upgraded(self, rest: bytes) -> None:
        """101 Switching Protocols: from here on both connections are a byte tunnel."""
        from edgeproxy.proxy.tunnel import Tunnel

        conn = self.up
        assert conn is not None
        self.status = 101
        self.resp_started = True
        self.upgrading = False
        self.deadline = 0.0  # tunnels idle as long as both ends want
        self.tunnel = Tunnel(self, conn)
        self.tunnel.open(rest)

    def tunnel_data(self, data: bytes) -> None:
        self.tunnel.to_client(data)

    def tunnel_eof(self) -> None:
        self.tunnel.upstream_eof()

    # -- local answers and the end -----------------------------------------------------------

    def respond_local(self, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> None:  # fmt: skip
        """Answer from edgeproxy itself; the rest of the request body is read and dropped."""
        req = self.req
        self.status = status
        self.resp_started = self.resp_done = True
        self.upgrading = False
        has_body = req.chunked or req.content_length > 0
        # A large body still to come is not worth reading: close instead.
        if not self.keep_alive or (has_body and not self.req_done
                                   and req.content_length > self.dp.max_header_bytes):  # fmt: skip
            self.keep_alive = False
        if req.websocket:
            self.keep_alive = False
        extra = list(extra or ())
        if req.http10 and self.keep_alive:
            extra.append((b"Connection", b"keep-alive"))
        self.out.append(local_response(status, body, self.dp.date.at_now(), close=not self.keep_alive,
                                       extra=extra, head_only=req.method == b"HEAD"))  # fmt: skip
        self._discard_rest()
        if self.req_done or not self.keep_alive:
            self.flush_client()
            self.finish()

    def _discard_rest(self) -> None:
        self.discarding = True
        self.pending = None
        self.pending_bytes = 0
        self.kept = None
        self.cflow.resume(EXCHANGE_REASONS)

    def finish(self) -> None:
        """The exchange is over: count it, release what it held, hand the connection back."""
        self._end(True)

    def finish_aborted(self) -> None:
        """The exchange was cut (its connection is closed or closing): count it and let go."""
        self._end(False)

    def _end(self, clean: bool) -> None:
        if self.done:
            return
        self.done = True
        if clean:
            self.flush_client()
        dp = self.dp
        dp.status_counts[self.status] += 1
        # The finish phase: the route's figures, and the access log line.
        ended = perf_counter()
        duration = ended - self.started
        upstream = ended - self.attempt_at if self.attempt_at > 0.0 else -1.0
        binding = self.binding
        route = self.route
        figures: RouteFigures | None = None
        if binding is not None and route is not None:
            figures = binding.figures.get(route.ingress)
        if figures is None:
            figures = dp.figures_for(self.route, binding)
        figures.record(self.req.method, self.status, duration, upstream, self.received, self.sent)
        if dp.access_log is not None:
            dp.access_log.write(self, duration, upstream)
        self.cflow.resume(EXCHANGE_REASONS)
        self.client.exchange_done(self, clean and self.keep_alive and self.req_done)

"""One parsed HTTP/1 request head, and the framing decisions of both directions.

The codec (http1_server.py) feeds a RequestHead the fields llhttp delimited; `complete()` then
checks what llhttp leaves to us and decides the request's framing, authority and path. The
response side's framing decision is `response_framing` below. Every rule cites its section of
RFC 9112 (HTTP/1.1) or RFC 9110 (semantics); an error names the status to answer with, as h11's
`error_status_hint` does.
"""

from __future__ import annotations

import re

from httptools import HttpParserError, parse_url

from edgeproxy.proxy.headers import SPECIAL_FIELDS, connection_tokens

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})  # RFC 9110 9.2.2
BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})  # sent with Content-Length: 0 if empty

# RFC 3986 3.2.2 / RFC 9110 7.2: host = IP-literal / IPv4address / reg-name, then [":" port].
# Anything else in Host (a slash, a space, a backslash) is a bad request, never a route.
VALID_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")
UNRESERVED_ESCAPE = re.compile(r"%(2[dDeE]|3[0-9]|[46][1-9a-fA-F]|[57][0-9aA]|5[fF]|7[eE])")

# Response body framing toward the client (response_framing).
NO_BODY, LENGTH, CHUNKED, UNTIL_CLOSE = range(4)


class ClientProtocolError(Exception):
    """The client broke HTTP/1.1: answer `status` and close the connection (RFC 9112 11.2)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class ConnectionInfo:
    """What a request's exchange needs to know of the connection it came on; set once per
    connection (the listener's scheme and port, the peer, whether it is a trusted proxy)."""

    __slots__ = ("client_ip", "client_ip_bytes", "forward_lines", "peer_ip", "port", "scheme", "trusted")

    def __init__(self, scheme: bytes, port: bytes, peer: str, trusted: bool) -> None:
        self.scheme = scheme
        self.port = port
        self.client_ip = peer  # the client as edgeproxy believes it (balancers' client-ip)
        self.client_ip_bytes = self.peer_ip = peer.encode()
        self.trusted = trusted
        # The forwarding lines of every request on this connection that carries none a trusted
        # proxy set (forward.py): the same bytes each time, so made once, not per request.
        self.forward_lines = forwarding_lines(self.peer_ip, scheme, port, self.client_ip_bytes)


def forwarding_lines(forwarded_for: bytes, proto: bytes, port: bytes, real_ip: bytes) -> bytes:
    """The X-Forwarded-For/-Proto/-Port and X-Real-IP lines of an upstream request head."""
    return b"X-Forwarded-For: %b\r\nX-Forwarded-Proto: %b\r\nX-Forwarded-Port: %b\r\nX-Real-IP: %b\r\n" % (
        forwarded_for, proto, port, real_ip)  # fmt: skip


class RequestHead:
    """A request as parsed. `fwd` holds the end-to-end lines to forward as received; the
    fields edgeproxy reads (headers.SPECIAL_FIELDS) are kept apart and written by forward.py."""

    __slots__ = (
        "authority", "chunked", "conn_tokens", "content_length", "expect_continue",
        "body_after_upgrade", "forwarded", "fwd", "has_request_id", "request_id", "user_agent", "host_count", "host_header", "http10", "keep_alive",
        "method", "origin", "path", "query", "size", "target", "te", "upgrade", "websocket", "xf_proto",
        "xff", "x_real_ip",
    )  # fmt: skip

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.size = 0  # bytes of the request line and fields, for the header limit
        # name, b": ", value, b"\r\n" per end-to-end field, in order: the lines forwarded as
        # received, and what header() searches (edgeproxy's own fields are kept apart).
        self.fwd: list[bytes] = []
        self.host_header: bytes | None = None
        self.host_count = 0
        self.conn_tokens: frozenset[bytes] = frozenset()
        self.content_length = -1
        self.te: bytes | None = None
        self.chunked = False
        self.expect_continue = False
        self.upgrade: bytes | None = None
        self.websocket = False
        self.body_after_upgrade = False
        self.xff: bytes | None = None
        self.xf_proto: bytes | None = None
        self.forwarded: list[bytes] | None = None  # a trusted proxy's Forwarded / X-Real-IP lines
        self.x_real_ip: bytes | None = None
        self.has_request_id = False
        self.request_id: bytes | None = None  # the client's X-Request-ID (the first one)
        self.user_agent: bytes | None = None
        self.http10 = False
        self.keep_alive = True
        self.authority = b""
        self.path = "/"
        self.query = b""
        self.origin = b"/"  # the target for the upstream (origin_target)

    def add_field(self, name: bytes, value: bytes) -> None:
        self.size += len(name) + len(value) + 4
        lname = name.lower()
        if lname in SPECIAL_FIELDS:
            self._special_field(lname, value)
        elif lname[:6] == b"proxy-":
            pass  # every Proxy-* field is for this hop only
        else:
            fwd = self.fwd  # four appends: C calls when compiled, no tuple built
            fwd.append(name)
            fwd.append(b": ")
            fwd.append(value)
            fwd.append(b"\r\n")

    def _special_field(self, lname: bytes, value: bytes) -> None:
        """Fields edgeproxy reads (framing, routing, forwarding); written anew by forward.py."""
        if lname == b"host":
            self.host_header = value
            self.host_count += 1
        elif lname == b"content-length":
            self.content_length = int(value)  # llhttp checked: digits, duplicates agree
        elif lname == b"connection":
            tokens = connection_tokens(value)
            self.conn_tokens = self.conn_tokens | tokens if self.conn_tokens else tokens
        elif lname == b"transfer-encoding":
            self.te = value if self.te is None else self.te + b", " + value
        elif lname == b"x-forwarded-for":
            self.xff = value if self.xff is None else self.xff + b", " + value
        elif lname == b"x-request-id":
            if not self.has_request_id:
                self.request_id = value
            self.has_request_id = True
            self.fwd.extend((b"X-Request-ID", b": ", value, b"\r\n"))  # four per field
        elif lname == b"user-agent":
            if self.user_agent is None:
                self.user_agent = value
            self.fwd.extend((b"User-Agent", b": ", value, b"\r\n"))  # forwarded, its value as received
        elif lname == b"x-forwarded-proto":
            self.xf_proto = value
        elif lname == b"forwarded" or lname == b"x-real-ip":
            if lname == b"x-real-ip":
                self.x_real_ip = value
            if self.forwarded is None:
                self.forwarded = []
            self.forwarded.append(b"%s: %s\r\n" % (b"Forwarded" if lname == b"forwarded" else b"X-Real-IP", value))
        elif lname == b"expect":
            if value.lower() == b"100-continue":
                self.expect_continue = True
            else:
                raise ClientProtocolError(417, "unsupported expectation (RFC 9110 10.1.1)")
        elif lname == b"upgrade":
            self.upgrade = value

    def header(self, name: bytes) -> bytes | None:
        """The first end-to-end field of that name, case-insensitive (what balancers read)."""
        name = name.lower()
        fwd = self.fwd
        for i in range(0, len(fwd), 4):
            if fwd[i].lower() == name:
                return fwd[i + 2]
        return None

    def complete(self, version: str, keep_alive: bool, max_body: int) -> None:
        """The head is complete: check what llhttp leaves to us, decide framing and target."""
        self.http10 = version == "1.0"
        if version != "1.1" and not self.http10:
            raise ClientProtocolError(505, "HTTP/1.0 or HTTP/1.1 only on this connection")
        self.keep_alive = keep_alive
        if self.host_count > 1 or (self.host_count == 0 and not self.http10):
            raise ClientProtocolError(400, "a request needs exactly one Host (RFC 9112 3.2)")
        # Body framing, RFC 9112 6.1-6.3; llhttp already refused Content-Length with
        # Transfer-Encoding and differing Content-Lengths.
        if self.te is not None:
            if self.http10:
                raise ClientProtocolError(400, "Transfer-Encoding in HTTP/1.0 (RFC 9112 6.1)")
            if self.te.strip().lower() != b"chunked":
                # Only chunked is implemented; other codings are refused, never dropped.
                raise ClientProtocolError(501, "transfer coding not implemented (RFC 9112 6.1)")
            self.chunked = True
        if max_body and self.content_length > max_body:
            raise ClientProtocolError(413, "request body over the limit")
        # Only WebSocket upgrades are tunnelled (RFC 6455 4.1: GET with Connection: upgrade);
        # other tokens (h2c, a smuggling vector through proxies) are dropped and the request
        # is proxied as a plain one.
        upgrade = self.upgrade
        asks = upgrade is not None and b"upgrade" in self.conn_tokens
        self.websocket = (asks and self.method == b"GET" and upgrade is not None
                          and upgrade.strip().lower() == b"websocket")  # fmt: skip
        # llhttp (through httptools) ends an upgrade request at its head and leaves the body
        # as "upgrade data"; for one we proxy as plain HTTP, the codec parses that body itself.
        self.body_after_upgrade = (asks and not self.websocket
                                   and (self.chunked or self.content_length > 0))  # fmt: skip
        self._target()

    def _target(self) -> None:
        """Request target -> authority and path (RFC 9112 3.2)."""
        target = self.target
        authority = self.host_header or b""
        if target[:1] != b"/":
            if target == b"*":
                if self.method != b"OPTIONS":
                    raise ClientProtocolError(400, "asterisk-form is for OPTIONS only (RFC 9112 3.2.4)")
                self.path = "*"
                self.origin = b"*"
                self.authority = authority
                return
            try:
                parsed = parse_url(target)
            except HttpParserError:
                raise ClientProtocolError(400, "invalid request target") from None
            if not parsed.host or (parsed.schema or b"").lower() not in (b"http", b"https"):
                raise ClientProtocolError(400, "request target is not origin-form or absolute-form")
            if parsed.userinfo or parsed.fragment is not None:
                raise ClientProtocolError(400, "userinfo or a fragment in the target (RFC 9110 4.2.4)")
            # absolute-form: the target's authority wins and replaces Host (RFC 9112 3.2.2).
            authority = parsed.host + (b":%d" % parsed.port if parsed.port else b"")
            target = parsed.path or b"/"
            if parsed.query:
                target += b"?" + parsed.query
        elif b"#" in target:
            raise ClientProtocolError(400, "a fragment in the target (RFC 9112 3.2.1)")
        self.authority = authority  # checked against VALID_HOST by the exchange (memoized)
        raw_path, mark, query = target.partition(b"?")
        self.query = mark + query
        try:
            path = raw_path.decode("ascii")
        except UnicodeDecodeError:
            raise ClientProtocolError(400, "request target is not ASCII") from None
        if "/." in path or "%" in path:
            normalized = normalize_path(path)
            if normalized != path:
                path = normalized
                target = path.encode("ascii") + self.query
        self.path = path
        self.origin = target

    def origin_target(self) -> bytes:
        """The target for the upstream: the normalized path and the query as received."""
        return self.origin


def normalize_path(path: str) -> str:
    """RFC 3986 6.2.2: decode percent-encoded unreserved characters (so %2e is a dot), then
    remove dot segments (5.2.4), as Envoy's normalize_path does; routing and the upstream
    both see the result, so /web/../api is /api for both."""
    if "%" in path:
        path = UNRESERVED_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), path)
    if "/." not in path:
        return path
    out: list[str] = []
    segments = path.split("/")
    for segment in segments[1:]:
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    if segments[-1] in (".", ".."):
        out.append("")  # "/a/." is the directory "/a/"
    return "/" + "/".join(out)


def host_name(authority: bytes) -> str:
    """Authority -> lower-case name without port (RFC 9110 7.2), "[::1]" kept bracketed."""
    if not authority:
        return ""
    text = authority.decode("latin-1").lower()
    if text[0] == "[":
        end = text.find("]")
        return text[: end + 1] if end > 0 else text
    colon = text.rfind(":")
    return text[:colon] if colon >= 0 else text


def response_framing(status: int, content_length: bytes | None, chunked: bool, head_request: bool,
                     http10: bool) -> int:  # fmt: skip
    """How the client receives the body of a final response (RFC 9112 6.3).

    NO_BODY for HEAD, 204 and 304 (and 1xx, handled before); LENGTH when the upstream gave a
    Content-Length (passed on as is); CHUNKED for an HTTP/1.1 client when the upstream chunked
    or closes to end the body (re-chunked from the parsed pieces); UNTIL_CLOSE for an HTTP/1.0
    client without a length (the client connection is then closed).
    """
    if head_request or status == 204 or status == 304:
        return NO_BODY
    if content_length is not None and not chunked:
        return LENGTH
    return UNTIL_CLOSE if http10 else CHUNKED

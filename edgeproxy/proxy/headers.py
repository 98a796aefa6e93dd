"""Header rewriting between client and upstream: pure functions over (name, value) byte pairs.

RFC 9110 7.6.1: Connection and the fields it names are hop-by-hop, as are Keep-Alive, TE,
Trailer, Transfer-Encoding (re-framed per hop, RFC 9112 6.1), Upgrade (unless tunnelling) and
the Proxy-* fields.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus

from edgeproxy.config import SERVER_NAME

Header = tuple[bytes, bytes]

HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
        b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
    }
)  # fmt: skip
# Set by edgeproxy from what it saw; a client's own values are dropped unless it is trusted.
FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
                       b"x-forwarded-port"})  # fmt: skip
SERVER_HEADER = b"Server: " + SERVER_NAME.encode() + b"\r\n"
# Expect: edgeproxy answers 100-continue itself; Content-Length: re-added with the framing.
REQUEST_DROP = HOP_BY_HOP | FORWARDED | {b"expect", b"content-length"}


def connection_tokens(value: bytes) -> frozenset[bytes]:
    return frozenset(t.strip().lower() for t in value.split(b",") if t.strip())


def upstream_request_head(
    method: bytes,
    target: bytes,
    headers: list[Header],
    lowered: list[bytes],
    named_by_connection: frozenset[bytes],
    *,
    host: bytes | None,
    forwarded_for: bytes,
    proto: bytes,
    port: bytes,
    request_id: bytes | None,
    framing: bytes,
    upgrade: bytes | None,
    http10: bool = False,
) -> bytes:
    """The request head sent upstream: origin-form, end-to-end fields only.

    HTTP/1.1, except for an HTTP/1.0 client: then 1.0, so that the upstream never answers
    with a chunked body the client could not read (nginx's proxy_http_version 1.0 behaviour).
    """
    parts = [method, b" ", target, b" HTTP/1.0\r\n" if http10 else b" HTTP/1.1\r\n"]
    drop = REQUEST_DROP
    for (name, value), lname in zip(headers, lowered, strict=True):
        if lname in drop or (named_by_connection and lname in named_by_connection):
            continue
        parts += (name, b": ", value, b"\r\n")
    if host is not None:
        parts += (b"X-Forwarded-Host: ", host, b"\r\n")
    parts += (
        b"X-Forwarded-For: ", forwarded_for,
        b"\r\nX-Forwarded-Proto: ", proto,
        b"\r\nX-Forwarded-Port: ", port, b"\r\n",
    )  # fmt: skip
    if request_id is not None:
        parts += (b"X-Request-ID: ", request_id, b"\r\n")
    if upgrade is not None:
        parts += (b"Connection: upgrade\r\nUpgrade: ", upgrade, b"\r\n")
    parts += (framing, b"\r\n")
    return b"".join(parts)


def downstream_response_head(
    status: int,
    reason: bytes,
    headers: list[Header],
    named_by_connection: frozenset[bytes],
    framing: bytes,
    connection: bytes,
) -> bytes:
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, reason or _reason(status))]
    has_server = False
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP or lname == b"content-length" or lname in named_by_connection:
            continue
        if lname == b"server":
            has_server = True
        parts += (name, b": ", value, b"\r\n")
    if not has_server:  # as nginx and Envoy do; an upstream's own Server is kept
        parts.append(SERVER_HEADER)
    parts += (framing, connection, b"\r\n")
    return b"".join(parts)


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Status"


class DateHeader:
    """RFC 9110 6.6.1 Date, formatted once per second rather than per response."""

    __slots__ = ("second", "value")

    def __init__(self) -> None:
        self.second = -1
        self.value = b""

    def at(self, wall: float) -> bytes:
        second = int(wall)
        if second != self.second:
            self.second = second
            self.value = formatdate(second, usegmt=True).encode()
        return self.value

    def at_now(self) -> bytes:
        return self.at(time.time())


def local_response(
    status: int,
    body: bytes,
    date: bytes,
    *,
    close: bool,
    content_type: bytes = b"text/plain; charset=utf-8",
    extra: list[Header] | None = None,
    head_only: bool = False,
) -> bytes:
    """A response edgeproxy makes itself: Date, Server, Content-Type and Content-Length."""
    parts = [
        b"HTTP/1.1 %d %s\r\nDate: %s\r\nServer: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
        % (status, _reason(status), date, SERVER_NAME.encode(), content_type, len(body))
    ]
    for name, value in extra or ():
        parts += (name, b": ", value, b"\r\n")
    if close:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    if not head_only:
        parts.append(body)
    return b"".join(parts)


def error_body(status: int) -> bytes:
    return b"%d %s\n" % (status, _reason(status))

"""Header rewriting for the upstream request, and the responses edgeproxy makes itself.

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
# Expect: edgeproxy answers 100-continue itself; Content-Length: re-added with the framing.
REQUEST_DROP = HOP_BY_HOP | FORWARDED | {b"expect", b"content-length"}
# Fields the client side reads as they arrive (the rest only pass through).
SPECIAL_FIELDS = REQUEST_DROP | {b"host", b"x-request-id"}
PLAIN_CONNECTION_TOKENS = frozenset({b"close", b"keep-alive", b"upgrade"})


def connection_tokens(value: bytes) -> frozenset[bytes]:
    return frozenset(t.strip().lower() for t in value.split(b",") if t.strip())


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

"""Responses edgeproxy makes itself (errors, redirects, 100 Continue) and the Date they carry."""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus

from edgeproxy.config import SERVER_NAME

Header = tuple[bytes, bytes]
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


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




def error_response(status: int, date: bytes, *, close: bool = True, head_only: bool = False) -> bytes:
    return local_response(status, error_body(status), date, close=close, head_only=head_only)

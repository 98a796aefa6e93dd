"""An upgraded connection (WebSocket after a 101): bytes both ways, half-closes relayed.

A FIN from one side is passed on as a FIN (write_eof) to the other, which may go on sending;
the tunnel ends when both sides have closed their writing, or either connection is lost.
"""

from __future__ import annotations

from typing import Any

from edgeproxy.proxy import flow


class Tunnel:
    __slots__ = ("client", "client_eof_seen", "exchange", "up", "upstream_eof_seen")

    def __init__(self, exchange: Any, up: Any) -> None:
        self.exchange = exchange
        self.client = exchange.client
        self.up = up
        self.client_eof_seen = False
        self.upstream_eof_seen = False

    def open(self, rest: bytes) -> None:
        switching = self.up.switching
        upgrade = (switching.upgrade if switching is not None else b"") or self.exchange.req.upgrade
        head = switching.head if switching is not None else b"HTTP/1.1 101 Switching Protocols\r\n"
        # The head lost Connection/Upgrade as hop-by-hop; for a tunnel they are the point.
        self.client.write(head + b"Connection: upgrade\r\nUpgrade: " + upgrade + b"\r\n\r\n" + rest)
        early = self.client.start_tunnel(self)
        if early:
            self.up.write(early)
        self.client.flow.resume(flow.UPGRADING)

    def from_client(self, data: bytes) -> None:
        self.up.write(data)

    def to_client(self, data: bytes) -> None:
        self.client.write(data)

    def client_eof(self) -> None:
        self.client_eof_seen = True
        transport = self.up.transport
        if self.upstream_eof_seen or transport is None or not transport.can_write_eof():
            self._close()
        else:
            transport.write_eof()

    def upstream_eof(self) -> None:
        self.upstream_eof_seen = True
        transport = self.client.transport
        if self.client_eof_seen or transport is None or not transport.can_write_eof():
            self._close()
        else:
            transport.write_eof()

    def upstream_closed(self) -> None:
        self._close()

    def client_closed(self) -> None:
        self.up.abort()

    def _close(self) -> None:
        self.up.close()
        exchange = self.exchange
        exchange._release_endpoint()
        self.client.close()
        exchange.finish_aborted()

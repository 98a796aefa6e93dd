"""A backend that records every byte it receives and judges it with h11, an independent strict
RFC 9112 parser: what edgeproxy forwards must parse there exactly as edgeproxy parsed it.

Each complete request is answered `200` with `X-Recorded: <n>` (n counts requests over all
connections), so a client can count the backend answers it got: a desync shows as the backend
having parsed more requests than the clients received answers for.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11

RECORDED = b"x-recorded:"


class Recorder:
    def __init__(self) -> None:
        self.received: list[bytearray] = []  # per upstream connection, every byte
        self.requests: list[tuple[h11.Request, bytes]] = []  # parsed by h11, with their bodies
        self.parse_errors: list[str] = []
        self.truncated = 0  # connections closed inside a body (a client that went away mid-upload)
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self, address: str = "127.0.0.2") -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Connection(self), address, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    @property
    def bytes_received(self) -> bytes:
        return b"".join(bytes(b) for b in self.received)


class _Connection(asyncio.Protocol):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.raw = bytearray()
        recorder.received.append(self.raw)
        self.conn = h11.Connection(h11.SERVER)
        self.transport: Any = None
        self.request: h11.Request | None = None
        self.body = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.raw += data
        self.conn.receive_data(data)
        self._events()

    def eof_received(self) -> bool:
        if self.conn.their_state is h11.SEND_BODY:
            self.recorder.truncated += 1  # cut, not misread: the request never completes here
            return False
        self.conn.receive_data(b"")
        self._events()
        return False

    def _events(self) -> None:
        for _ in range(10_000):  # bounded: each turn takes one event
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                self.recorder.parse_errors.append(f"{exc} after {bytes(self.raw)[-200:]!r}")
                self.transport.close()
                return
            if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                if event is h11.PAUSED and self.conn.our_state is h11.DONE:
                    self.conn.start_next_cycle()
                    continue
                return
            if isinstance(event, h11.Request):
                self.request, self.body = event, bytearray()
            elif isinstance(event, h11.Data):
                self.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert self.request is not None
                self.recorder.requests.append((self.request, bytes(self.body)))
                number = len(self.recorder.requests)
                out = self.conn.send(h11.Response(status_code=200, headers=[
                    ("X-Recorded", str(number)), ("Content-Length", "3")]))  # fmt: skip
                out += self.conn.send(h11.Data(data=b"ok\n")) + self.conn.send(h11.EndOfMessage())
                self.transport.write(out)
                if self.conn.our_state is h11.MUST_CLOSE:
                    self.transport.close()
                    return
                self.conn.start_next_cycle()

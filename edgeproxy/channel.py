"""Messages between the supervisor and one worker: length-prefixed pickles on a socketpair.

Both ends are edgeproxy processes of one pod (the socketpair is made by the supervisor before
it starts the worker), so pickle's trust model holds. Messages are tuples whose first item
names them; each side dispatches on it.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from collections.abc import Callable
from typing import Any

HEADER = struct.Struct("!I")


def frame(message: tuple[Any, ...]) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


class Channel(asyncio.Protocol):
    def __init__(self, on_message: Callable[[tuple[Any, ...]], None],
                 on_closed: Callable[[], None]) -> None:  # fmt: skip
        self.on_message = on_message
        self.on_closed = on_closed
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._need = 0  # length of the message being read, 0 while reading a header

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while True:
            if not self._need:
                if len(buffer) < HEADER.size:
                    return
                (self._need,) = HEADER.unpack_from(buffer)
                del buffer[: HEADER.size]
            if len(buffer) < self._need:
                return
            payload = bytes(buffer[: self._need])
            del buffer[: self._need]
            self._need = 0
            self.on_message(pickle.loads(payload))

    def send(self, message: tuple[Any, ...]) -> None:
        self.send_frame(frame(message))

    def send_frame(self, data: bytes) -> None:
        """A message already framed (frame()): a broadcast pickles once for every worker."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.on_closed()

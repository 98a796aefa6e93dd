"""Flow control for one side of a connection: who paused reading, and only they resume it.

Like uvicorn's FlowControl, but with the reasons named: a transport's reading is paused while
any reason holds and resumed when the last one is released, so a reason released by someone
who did not set it cannot resume a read another part of the proxy still needs paused. An
exchange releases the reasons it owns when it ends (EXCHANGE_REASONS), whatever ended it.
"""

from __future__ import annotations

from typing import Any

PIPELINED = 1  # client: a request waits for the one before it (owned by the client codec)
CLIENT_FULL = 2  # client: the client does not read what we write (owned by the client codec)
BODY_BUFFERED = 4  # client: body bytes wait for an upstream connection (owned by the exchange)
UPSTREAM_FULL = 8  # client: the upstream does not read the body (owned by the exchange)
UPGRADING = 16  # client: bytes after an upgrade request wait for the 101 (owned by the exchange)
DOWNSTREAM_FULL = 32  # upstream: the client does not read the response (owned by the exchange)
EXCHANGE_REASONS = BODY_BUFFERED | UPSTREAM_FULL | UPGRADING | DOWNSTREAM_FULL


class FlowControl:
    __slots__ = ("reasons", "transport")

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.reasons = 0

    def pause(self, reason: int) -> None:
        if not self.reasons and self.transport is not None:
            self.transport.pause_reading()
        self.reasons |= reason

    def resume(self, reason: int) -> None:
        """Release `reason` (several, or-ed, at once); reading resumes when none is left."""
        if self.reasons & reason:
            self.reasons &= ~reason
            if not self.reasons and self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

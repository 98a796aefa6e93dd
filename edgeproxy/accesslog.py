"""The access log: one JSON line per request (orjson), never a wait for the event loop.

The finish phase hands each exchange to AccessLog.write, which formats its line into memory.
The worker flushes every FLUSH_INTERVAL_S (sooner when BATCH_BYTES wait) with non-blocking
writes to a file description of its own: a pipe or terminal on stdout is reopened through
/proc, so O_NONBLOCK never reaches the supervisor's stderr when both share one pipe. When the reader falls behind
and `max_pending` bytes (--access-log-buffer) wait, new lines are dropped and counted (`dropped`, in /metrics as
edgeproxy_access_log_dropped_lines_total): traffic never waits on the log.

Writes to a pipe are cut at line ends in pieces of at most PIPE_BUF bytes, which the kernel
writes whole, so the lines of several workers on one stdout never interleave mid-line.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import socket
import stat
import time
from typing import Any

import orjson

FLUSH_INTERVAL_S = 0.1
BATCH_BYTES = 64 * 1024
PIPE_BUF = getattr(select, "PIPE_BUF", 4096)


def open_target(target: str) -> tuple[int, bool, socket.socket | None]:
    """(fd, is a pipe, socket): the log's own non-blocking description of stdout or a file."""
    if target != "-":
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o644)
        return fd, False, None
    mode = os.fstat(1).st_mode
    if stat.S_ISSOCK(mode):  # journald, say: /proc cannot reopen a socket; send per call
        sock = socket.socket(fileno=os.dup(1))
        return sock.fileno(), False, sock
    if stat.S_ISREG(mode):
        # A file (`> log 2>&1`): share the description, whose offset stderr's writes advance
        # too (a second description would overwrite them); a disk write does not wait on a reader.
        return os.dup(1), False, None
    try:  # a pipe or a terminal: a description of our own, non-blocking
        fd = os.open("/proc/self/fd/1", os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # no /proc: the shared description, written blocking (a slow reader waits)
        fd = os.dup(1)
    return fd, stat.S_ISFIFO(mode), None


class LineLogPy:
    """The hot part: format the line and keep it, or count it dropped when the reader is too
    far behind (the C twin, _accesslog.LineLog, is used when compiled)."""

    def __init__(self, max_pending: int, batch: int) -> None:
        self.lines: list[bytes] = []
        self.pending = 0  # bytes in lines and in the unsent rest of the last write
        self.max_pending = max_pending
        self.dropped = 0
        self.batch = batch
        self.unsent_len = 0

    def write(self, exchange: Any, duration: float, upstream: float) -> None:
        """The finish phase of one exchange (proxy.exchange.Exchange)."""
        if self.pending > self.max_pending:
            self.dropped += 1
            return
        line = format_line(exchange, duration, upstream)
        if line is None:
            line = self.format_long(exchange, duration, upstream)
        self.lines.append(line)
        self.pending += len(line)
        if self.pending - self.unsent_len >= self.batch:
            self.flush()

    def format_long(self, exchange: Any, duration: float, upstream: float) -> bytes:
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError


def format_line(exchange: Any, duration: float, upstream: float) -> bytes | None:
    return format_line_py(exchange, duration, upstream)


try:  # the C twins, when setup.py could compile them
    from edgeproxy._accesslog import LineLog, format_line  # type: ignore[no-redef]
except ImportError:
    LineLog = LineLogPy  # type: ignore[misc, assignment]


class AccessLog(LineLog):  # type: ignore[valid-type, misc]
    lines: list[bytes]
    pending: int
    unsent_len: int
    dropped: int

    def __init__(self, target: str, loop: asyncio.AbstractEventLoop, max_pending: int) -> None:
        super().__init__(max_pending, BATCH_BYTES)
        self.loop = loop
        self.fd, self.pipe, self.sock = open_target(target)
        self.unsent = b""  # the rest of a piece the last write did not take
        self.written = 0
        self._timer: asyncio.TimerHandle | None = None

    def format_long(self, exchange: Any, duration: float, upstream: float) -> bytes:
        return format_line_py(exchange, duration, upstream)  # longer than the C buffer

    def start(self) -> None:
        self._timer = self.loop.call_later(FLUSH_INTERVAL_S, self._tick)

    def _tick(self) -> None:
        self.flush()
        self._timer = self.loop.call_later(FLUSH_INTERVAL_S, self._tick)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.flush()
        if self.sock is not None:
            self.sock.close()
        else:
            os.close(self.fd)

    def flush(self) -> None:
        """Write what the target takes now; keep the rest for the next flush."""
        if self.unsent and not self._send(self.unsent):
            return
        lines: list[bytes] = self.lines
        if not lines:
            return
        self.lines = []
        limit = PIPE_BUF if self.pipe else BATCH_BYTES
        piece: list[bytes] = []
        size = 0
        for i, line in enumerate(lines):
            if piece and size + len(line) > limit:
                if not self._send(b"".join(piece)):
                    self.lines = lines[i:] + self.lines
                    return
                piece, size = [], 0
            piece.append(line)
            size += len(line)
        if piece:
            self._send(b"".join(piece))

    def _send(self, data: bytes) -> bool:
        """True when all of `data` went out; else the rest is kept in `unsent`."""
        try:
            if self.sock is not None:
                n = self.sock.send(data, socket.MSG_DONTWAIT)
            else:
                n = os.write(self.fd, data)
        except BlockingIOError:
            n = 0
        except OSError as exc:  # the reader is gone (EPIPE) or the disk is full: drop it all
            if exc.errno in (errno.EPIPE, errno.ENOSPC, errno.EBADF, errno.ECONNRESET):
                self.dropped += len(self.lines) + (1 if data else 0)
                self.lines = []
                self.pending = 0
                self.unsent = b""
                self.unsent_len = 0
                return False
            raise
        self.written += n
        self.pending -= n
        self.unsent = data[n:]
        self.unsent_len = len(self.unsent)
        return not self.unsent


_clock = {"second": -1, "stamp": ""}


def _time() -> str:
    now = time.time()
    second = int(now)
    if second != _clock["second"]:  # one strftime per second, not per line
        _clock["second"] = second
        _clock["stamp"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_clock['stamp']}.{int((now - second) * 1000):03d}Z"


def format_line_py(exchange: Any, duration: float, upstream: float) -> bytes:
    """One JSON line for a finished exchange (the C twin, _accesslog.pyx, is the one used
    when compiled: this costs about 17 us on the benchmark machine)."""
    req = exchange.req
    route = exchange.route
    endpoint = exchange.picked
    request_id = exchange.request_id or req.header(b"x-request-id")
    agent = req.header(b"user-agent")
    header_at = exchange.header_at
    return orjson.dumps({
        "time": _time(),
        "client": exchange.client_ip,
        "method": req.method.decode("latin-1"),
        "host": req.authority.decode("latin-1"),
        "path": req.target.decode("latin-1"),
        "protocol": "HTTP/1.0" if req.http10 else "HTTP/1.1",
        "status": exchange.status,
        "bytes_sent": exchange.sent,
        "bytes_received": exchange.received,
        "duration": round(duration, 6),
        "upstream": None if endpoint is None else endpoint.label,
        "upstream_connect_time": round(exchange.connect_s, 6) if exchange.connect_s >= 0.0 else None,
        "upstream_header_time": (round(header_at - exchange.attempt_at, 6)
                                 if header_at > 0.0 and endpoint is not None else None),
        "upstream_response_time": round(upstream, 6) if upstream >= 0.0 else None,
        "retries": max(exchange.attempts - 1, 0),
        "request_id": None if request_id is None else request_id.decode("latin-1"),
        "ingress": None if route is None else route.ingress,
        "service": None if route is None else route.cluster.name,
        "user_agent": None if agent is None else agent.decode("latin-1"),
    }, option=orjson.OPT_APPEND_NEWLINE)  # fmt: skip


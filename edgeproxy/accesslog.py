"""The access log: one JSON line per request, never a wait for the event loop.

The finish phase hands each exchange to AccessLog.write, which formats its line onto the end
of one buffer (in C when compiled: _accesslog.pyx). The worker flushes every FLUSH_INTERVAL_S
(sooner when BATCH_BYTES wait) with non-blocking writes to a file description of its own: a
pipe or terminal on stdout is reopened through /proc, so O_NONBLOCK never reaches the
supervisor's stderr when both share one pipe. When the reader falls behind and `max_pending`
bytes (--access-log-buffer) wait, new lines are dropped and counted (`dropped`, in /metrics
as edgeproxy_access_log_dropped_lines_total): traffic never waits on the log.

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
    """The hot part: format the line onto the end of the pending bytes, or count it dropped
    when the reader is too far behind (the C twin, _accesslog.LineLog, is used when compiled;
    flush() below uses the same five calls on either)."""

    def __init__(self, max_pending: int, batch: int) -> None:
        self.buf = bytearray()  # lines not written yet
        self.max_pending = max_pending
        self.dropped = 0
        self.batch = batch

    def write(self, exchange: Any, duration: float, upstream: float) -> None:
        """The finish phase of one exchange (proxy.exchange.Exchange)."""
        if len(self.buf) > self.max_pending:
            self.dropped += 1
            return
        self.buf += format_line_py(exchange, duration, upstream)
        if len(self.buf) >= self.batch:
            self.flush()

    def __len__(self) -> int:
        return len(self.buf)

    def pending(self) -> memoryview:
        return memoryview(self.buf)

    def cut(self, limit: int) -> int:
        """Bytes to write so a piece of at most `limit` ends at a line end (else the first
        line, else all)."""
        buf = self.buf
        return buf.rfind(b"\n", 0, limit) + 1 or buf.find(b"\n") + 1 or len(buf)

    def consume(self, n: int) -> None:
        del self.buf[:n]

    def discard(self) -> int:
        lines = self.buf.count(b"\n")
        del self.buf[:]
        return lines

    def format_long(self, exchange: Any, duration: float, upstream: float) -> bytes:
        return format_line_py(exchange, duration, upstream)

    def flush(self) -> None:
        raise NotImplementedError


def _line_log_class() -> type:
    """The C twin when the hot path it reads is compiled too (it reads the exchange's C
    fields: beside the pure-Python exchange its types would not match)."""
    from edgeproxy.proxy import exchange

    if str(exchange.__file__).endswith(".py"):
        return LineLogPy
    try:
        from edgeproxy._accesslog import LineLog as compiled
    except ImportError:
        return LineLogPy
    return compiled  # type: ignore[no-any-return]


LineLog = _line_log_class()


class AccessLog(LineLog):  # type: ignore[valid-type, misc]
    dropped: int

    def __init__(self, target: str, loop: asyncio.AbstractEventLoop, max_pending: int) -> None:
        super().__init__(max_pending, BATCH_BYTES)
        self.loop = loop
        self.fd, self.pipe, self.sock = open_target(target)
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
        for _ in range(1 + len(self) // PIPE_BUF):  # bounded: each turn writes or stops
            size = len(self)
            if not size:
                return
            # A pipe takes whole lines, at most PIPE_BUF: never interleaved with another's.
            end = self.cut(PIPE_BUF) if self.pipe else min(size, BATCH_BYTES)
            try:
                with self.pending() as view:
                    if self.sock is not None:
                        n = self.sock.send(view[:end], socket.MSG_DONTWAIT)
                    else:
                        n = os.write(self.fd, view[:end])
            except BlockingIOError:
                return
            except OSError as exc:  # the reader is gone (EPIPE) or the disk is full: drop it
                if exc.errno in (errno.EPIPE, errno.ENOSPC, errno.EBADF, errno.ECONNRESET):
                    self.dropped += self.discard()
                    return
                raise
            self.written += n
            self.consume(n)
            if n < end:
                return


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
    request_id = exchange.request_id or req.request_id
    agent = req.user_agent
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


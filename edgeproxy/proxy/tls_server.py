"""TLS termination of one client connection: between the TCP transport and the HTTP codec.

It is the TCP transport's protocol and the codec's transport. The event loop's own TLS layer
(uvloop's SSLProtocol) is generic; this one does what a server needs, as nginx does:

- The _ssl object's C methods are called directly (no ssl.SSLObject frames in between), and the
  first request's bytes go to the codec in the same callback as the handshake's end (uvloop
  defers them by one loop turn: a saturated worker's turn is long).
- Closing sends close_notify and closes, without waiting for the client's: the side that closes
  after a complete response need not wait (RFC 8446 6.1; nginx does not wait). uvloop waits,
  which costs a read round, its callbacks and two SSLWantReadErrors per connection.
- The client's close_notify is an end of input like TCP's FIN: the codec still answers the
  request it has, then closes (a half-close, as over plain TCP; RFC 8446 6.1 allows writing
  after it). uvloop drops every write after it, so such a request lost its answer.
- A plain HTTP request on the TLS port is answered 400 in plain text (nginx: "The plain HTTP
  request was sent to HTTPS port"), not dropped as a failed handshake.

The codec is made when the handshake is done (`app_factory`), so a failed handshake costs no
codec, and the negotiated ALPN protocol can choose it.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import Any

log = logging.getLogger("edgeproxy.tls")

# A read returns one record's plaintext or less (at most 16 KiB), so reads are sized to what
# arrived, up to that: no 256 KiB buffer (uvloop's) allocated and shrunk for every record.
MAX_RECORD = 16384
READ_SLACK = 256  # a record's plaintext is shorter than its ciphertext; slack all the same
TLS_HANDSHAKE_RECORD = 0x16
LINGER_BYTES = 64 * 1024  # what a refused plain-HTTP client may still send, read and dropped

# How handshakes ended, counted in the data plane's tls_results (edgeproxy_tls_handshakes_total).
HANDSHAKE_RESULTS = ("completed", "failed", "timed_out", "plain_http")
COMPLETED, FAILED, TIMED_OUT, PLAIN_HTTP = range(len(HANDSHAKE_RESULTS))

# ssl.SSLContext._wrap_bio gives the _ssl object itself; ssl.SSLObject only forwards to it.
_WRAP_RAW = hasattr(ssl.SSLContext, "_wrap_bio")


def _wrap(context: ssl.SSLContext, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> Any:
    if _WRAP_RAW:
        try:
            return context._wrap_bio(incoming, outgoing, True, None)  # type: ignore[attr-defined]
        except TypeError:  # another signature: the public way
            pass
    return context.wrap_bio(incoming, outgoing, server_side=True)


class TLSServerTransport:
    """asyncio protocol of the TCP connection, and transport of the codec (compiled: an
    extension type; uvloop and the codec only call its methods)."""

    __slots__ = (
        "app", "app_factory", "closing", "context", "deadline", "dp", "eof", "fresh", "handshaking",
        "incoming", "outgoing", "paused", "plain_refusal", "lingering", "tcp", "tls",
        "in_write", "out_read", "tcp_write", "tls_pending", "tls_read", "tls_write",
    )  # fmt: skip

    def __init__(self, context: ssl.SSLContext, app_factory: Callable[[], Any], dp: Any,
                 plain_refusal: Callable[[], bytes] | None = None) -> None:  # fmt: skip
        self.context = context
        self.app_factory: Any = app_factory
        # The data plane: its clock, its loop, and its sweep, which calls deadline_passed once
        # `deadline` is past while the handshake lasts (a timer per connection costs more).
        self.dp = dp
        self.deadline = 0.0
        self.plain_refusal = plain_refusal  # the answer to plain HTTP on this port
        self.app: Any = None  # the codec, once the handshake is done
        self.tcp: Any = None
        self.tls: Any = None
        self.incoming: Any = None
        self.outgoing: Any = None
        # Bound once per connection (each lookup per record costs a bound method's allocation):
        self.in_write: Any = None  # incoming.write, from the connection's start
        self.tls_read: Any = None  # the _ssl object's read, write and pending, and
        self.tls_write: Any = None  # outgoing.read and tcp.write: from the handshake's end
        self.tls_pending: Any = None
        self.out_read: Any = None
        self.tcp_write: Any = None
        self.handshaking = True
        self.fresh = True  # no byte arrived yet
        self.closing = False
        self.eof = False  # the codec was told the input ended
        self.paused = False  # the codec paused reading
        self.lingering = -1  # refused plain HTTP: bytes still read and dropped

    # -- the TCP side (asyncio.Protocol) ---------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.tcp = transport
        incoming = self.incoming = ssl.MemoryBIO()
        self.in_write = incoming.write
        self.outgoing = ssl.MemoryBIO()
        try:
            self.tls = _wrap(self.context, incoming, self.outgoing)
        except (ssl.SSLError, ValueError) as exc:
            log.warning("cannot start TLS on a client connection: %s", exc)
            self.dp.tls_results[FAILED] += 1
            transport.abort()
            return
        dp = self.dp
        self.deadline = dp.now + dp.client_header_timeout  # nginx's bound on a handshake
        dp.handshaking.add(self)

    def data_received(self, data: bytes) -> None:
        if self.handshaking:
            self._handshake(data)
            return
        if self.lingering >= 0:
            self.lingering -= len(data)
            if self.lingering < 0:
                self.tcp.close()
            return
        self.in_write(data)
        if not self.paused and not self.closing:
            self._read()

    def eof_received(self) -> bool:
        """TCP's FIN, with or without close_notify before it."""
        if self.handshaking or self.lingering >= 0 or self.app is None:
            return False  # the TCP transport closes
        self._input_ended()
        return True  # the codec closes when it has answered (or has already)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.dp.handshaking.discard(self)
        app = self.app
        self.tcp = self.tls = self.app = self.app_factory = None  # no cycles left to collect
        self.in_write = self.out_read = self.tcp_write = None
        self.tls_read = self.tls_write = self.tls_pending = None
        if app is not None:
            app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.app is not None:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.app is not None:
            self.app.resume_writing()

    # -- handshake ---------------------------------------------------------------------------

    def _handshake(self, data: bytes) -> None:
        tls = self.tls
        if tls is None:
            return
        if self.fresh and data:
            self.fresh = False
            if data[0] != TLS_HANDSHAKE_RECORD:
                if self.plain_refusal is not None and 65 <= data[0] <= 90:  # "GET ", "POST "...
                    self._refuse_plain()
                else:
                    self._handshake_failed("not a TLS handshake")
                return
        self.in_write(data)
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError, ValueError) as exc:  # ValueError: SNI callback failed
            self._handshake_failed(str(exc))
            return
        self.handshaking = False
        dp = self.dp
        dp.handshaking.discard(self)
        dp.tls_results[COMPLETED] += 1
        self.tls_read, self.tls_write, self.tls_pending = tls.read, tls.write, tls.pending
        self.out_read, self.tcp_write = self.outgoing.read, self.tcp.write
        self._flush()  # the server's last flight, session tickets
        app = self.app = self.app_factory()
        app.connection_made(self)
        if self.incoming.pending and not self.closing and not self.paused:
            self._read()  # the first request came with the client's Finished

    def _handshake_failed(self, reason: str) -> None:
        log.debug("TLS handshake failed: %s", reason)
        self.dp.tls_results[FAILED] += 1
        self.closing = True
        self._flush()  # the alert, if OpenSSL made one
        self.tcp.close()

    def _refuse_plain(self) -> None:
        """Plain HTTP on the TLS port: answered in plain text, then a lingering close so that
        what the client still sends cannot reset the answer away (as the codec's errors)."""
        assert self.plain_refusal is not None
        self.dp.tls_results[PLAIN_HTTP] += 1
        self.closing = True
        self.handshaking = False
        self.lingering = LINGER_BYTES
        tcp = self.tcp
        tcp.write(self.plain_refusal())
        if tcp.can_write_eof():
            tcp.write_eof()
        else:
            tcp.close()

    def deadline_passed(self) -> None:
        """The handshake (or the lingering after a plain-HTTP refusal) took too long."""
        self.dp.handshaking.discard(self)
        if self.tcp is not None and (self.handshaking or self.lingering >= 0):
            if self.handshaking:
                self.dp.tls_results[TIMED_OUT] += 1
            self.closing = True
            self.tcp.abort()

    # -- records in and out -------------------------------------------------------------

    def _read(self) -> None:
        """Decrypt what arrived and give it to the codec in one call."""
        incoming = self.incoming
        read = self.tls_read
        pending = self.tls_pending
        first: bytes | None = None
        more: list[bytes] | None = None
        ended = False
        try:
            # Read while whole records may wait: a read past the last one would raise
            # SSLWantReadError, an exception per read (uvloop's check too).
            for _ in range(1 << 16):  # bounded: each turn consumes a record
                waiting = incoming.pending
                buffered = pending()
                if not waiting and not buffered:
                    break
                size = waiting + buffered + READ_SLACK
                chunk = read(size if size < MAX_RECORD else MAX_RECORD)
                if not chunk:
                    ended = True  # close_notify
                    break
                if first is None:
                    first = chunk
                elif more is None:
                    more = [first, chunk]
                else:
                    more.append(chunk)
        except ssl.SSLWantReadError:
            pass  # a record not whole yet
        except ssl.SSLError as exc:
            log.debug("TLS error on a client connection: %s", exc)
            self._flush()
            self.abort()
            return
        if self.outgoing.pending:
            self._flush()  # a post-handshake answer (TLS 1.3 KeyUpdate)
        app = self.app
        if first is not None and app is not None:
            app.data_received(first if more is None else b"".join(more))
        if ended and not self.closing:
            self._input_ended()

    def _input_ended(self) -> None:
        if self.eof:
            return
        self.eof = True
        app = self.app
        if app is not None and not app.eof_received():
            self.close()

    def _flush(self) -> None:
        outgoing = self.outgoing
        if outgoing.pending and self.tcp is not None:
            self.tcp.write(outgoing.read())

    # -- the codec's transport ------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.closing or self.tls_write is None:
            return
        try:
            self.tls_write(data)  # all of it: memory BIOs never refuse a write
        except ssl.SSLError as exc:
            log.debug("TLS error on a client connection: %s", exc)
            self.abort()
            return
        self.tcp_write(self.out_read())

    def writelines(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def close(self) -> None:
        """close_notify after what was written, then close without waiting for the client's."""
        if self.closing:
            return
        self.closing = True
        tls = self.tls
        if tls is not None and not self.handshaking:
            shutdown = getattr(tls, "shutdown", None) or tls.unwrap
            try:
                shutdown()
            except (ssl.SSLError, ValueError):
                pass  # SSLWantReadError: sent, the client's is not awaited
            self._flush()
        if self.tcp is not None:
            self.tcp.close()

    def abort(self) -> None:
        self.closing = True
        if self.tcp is not None:
            self.tcp.abort()

    def is_closing(self) -> bool:
        return self.closing or self.tcp is None or self.tcp.is_closing()

    def can_write_eof(self) -> bool:
        return False  # TLS has no half-close of our own side but close_notify: close()

    def pause_reading(self) -> None:
        self.paused = True
        if self.tcp is not None:
            self.tcp.pause_reading()

    def resume_reading(self) -> None:
        self.paused = False
        if self.tcp is not None and not self.closing:
            self.tcp.resume_reading()
            if self.incoming.pending or self.tls_pending():
                self.dp.loop.call_soon(self._read_again)

    def _read_again(self) -> None:
        if not self.paused and not self.closing and self.tls is not None:
            self._read()

    def get_write_buffer_size(self) -> int:
        return 0 if self.tcp is None else self.tcp.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self.tcp is not None:
            self.tcp.set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        tls = self.tls
        if tls is not None and not self.handshaking:
            if name == "ssl_object":
                return tls
            if name == "sslcontext":
                return self.context
            if name == "peercert":
                return tls.getpeercert()
            if name == "cipher":
                return tls.cipher()
        if self.tcp is None:
            return default
        return self.tcp.get_extra_info(name, default)

"""Which fields are hop-by-hop and which edgeproxy sets itself, and the response head rewrite.

The one place for these rules: the request side (message.py, forward.py) and the response head
scan below (and its C twin, _heads.pyx) use the sets defined here.

RFC 9110 7.6.1: Connection and the fields it names are hop-by-hop, as are Keep-Alive, TE,
Trailer, Transfer-Encoding (re-framed per hop, RFC 9112 6.1), Upgrade (unless tunnelling) and
the Proxy-* fields.
"""

from __future__ import annotations

from edgeproxy.config import SERVER_NAME

HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
        b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
    }
)  # fmt: skip
# Set by edgeproxy from what it saw; a client's own values are dropped unless it is a trusted
# proxy (--trusted-proxies), whose X-Forwarded-For is appended to and whose others are kept.
FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
                       b"x-forwarded-port", b"x-real-ip", b"forwarded"})  # fmt: skip
# Expect: edgeproxy answers 100-continue itself; Content-Length: re-added with the framing;
# Host: written from the request's authority (RFC 9112 3.2.2), so never hop-by-hop.
REQUEST_DROP = HOP_BY_HOP | FORWARDED | {b"expect", b"content-length", b"host"}
# Fields the client side reads as they arrive (the rest only pass through).
# Read by edgeproxy but forwarded as received: X-Request-ID (kept, or added), User-Agent (the
# access log; kept here so the log does not scan the fields).
SPECIAL_FIELDS = REQUEST_DROP | {b"x-request-id", b"user-agent"}
PLAIN_CONNECTION_TOKENS = frozenset({b"close", b"keep-alive", b"upgrade"})
SERVER_LINE = b"Server: %s\r\n" % SERVER_NAME.encode()
PLAIN_CONNECTION_TOKENS_OR_EMPTY = PLAIN_CONNECTION_TOKENS | {b""}
# Response fields the head scan acts on; the rest pass through (plus Proxy-*, dropped).
WATCHED_FIELDS = frozenset({b"content-length", b"transfer-encoding", b"server", b"connection",
                            b"keep-alive", b"upgrade"})  # fmt: skip


_TOKENS: dict[bytes, frozenset[bytes]] = {}  # Connection values seen: a few, in real traffic
MAX_REMEMBERED_TOKENS = 64


def connection_tokens(value: bytes) -> frozenset[bytes]:
    """The tokens of a Connection field value, lower-cased. Browsers send "keep-alive" on
    every request and many clients "close": parsed once, not per request (bounded, so odd
    values cost only their parse)."""
    tokens = _TOKENS.get(value)
    if tokens is None:
        tokens = frozenset(t.strip().lower() for t in value.split(b",") if t.strip())
        if len(_TOKENS) < MAX_REMEMBERED_TOKENS:
            _TOKENS[value] = tokens
    return tokens


def scan_response_head_py(raw: bytes) -> tuple[bytes, bytes | None, bool, bytes]:
    """-> (head for the client, Content-Length value or None, chunked, Upgrade value).

    One pass over the lines. The hop-by-hop fields (RFC 9110 7.6.1) are dropped: Connection
    and the fields it names, Keep-Alive, Proxy-*, Upgrade (a tunnel re-adds it), and
    Transfer-Encoding: the body is re-framed from what the parser delimited, and the exchange
    writes the framing it chose (proxy/message.py). Content-Length stays. A field name is matched as
    "name:" at the start of a line: RFC 9112 5.1 allows no whitespace before the colon (llhttp
    rejects it), so this is exact. The status line becomes HTTP/1.1 (RFC 9110 6.2) and a
    Server field is added when the upstream sent none. _heads.pyx is the same in C.
    """
    lines = raw.split(b"\r\n")
    kept = [lines[0] if lines[0][5:8] == b"1.1" else b"HTTP/1.1" + lines[0][8:]]
    content_length: bytes | None = None
    chunked = False
    upgrade = b""
    named: frozenset[bytes] | None = None  # extra fields named by Connection
    has_server = dropped = False
    for line in lines[1:-1]:  # the last element is the b"" after the final CRLF
        name = line[:18].lower().partition(b":")[0]
        if name in WATCHED_FIELDS:
            if name == b"content-length":
                content_length = line[15:].strip()
            elif name == b"transfer-encoding":
                chunked = line[18:].strip().lower().endswith(b"chunked")  # the last coding
                dropped = True  # re-framed per hop (RFC 9112 6.1): the exchange adds its own
                continue
            elif name == b"server":
                has_server = True
            else:  # hop-by-hop
                if name == b"connection":
                    tokens = frozenset(t.strip().lower() for t in line[11:].split(b","))
                    if not tokens <= PLAIN_CONNECTION_TOKENS_OR_EMPTY:
                        named = tokens if named is None else named | tokens
                elif name == b"upgrade":
                    upgrade = line[8:].strip()
                dropped = True
                continue
        elif name[:6] == b"proxy-" or (dropped and name[:1] in (b" ", b"\t")):
            dropped = True  # Proxy-*, or an obs-fold line continuing a dropped field
            continue
        dropped = False
        kept.append(line)
    if named is not None:
        kept = [line for line in kept if line.partition(b":")[0].strip().lower() not in named]
    kept.append(b"" if has_server else SERVER_LINE)
    return b"\r\n".join(kept), content_length, chunked, upgrade


def join_bytes_py(parts: list[bytes]) -> bytes:
    return b"".join(parts)


def prefixed_hex16_py(prefix: bytes, value: int) -> bytes:
    return prefix + b"%016x" % value


# The C versions (_heads.pyx), when setup.py could compile them.
try:
    from edgeproxy.proxy._heads import join_bytes as join_bytes
    from edgeproxy.proxy._heads import prefixed_hex16 as prefixed_hex16
    from edgeproxy.proxy._heads import scan_response_head as scan_response_head
except ImportError:
    scan_response_head = scan_response_head_py
    join_bytes = join_bytes_py
    prefixed_hex16 = prefixed_hex16_py

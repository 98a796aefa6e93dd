"""The upstream request head, serialized from the parsed request; pure.

Origin-form target (normalized path), end-to-end fields only (RFC 9110 7.6.1: Connection, the
fields it names and the rest of headers.HOP_BY_HOP are dropped), Host from the request's
authority (RFC 9112 3.2.2), X-Forwarded-* and X-Real-IP from what edgeproxy saw, and framing
from what the codec parsed: the upstream never sees the client's own framing lines.
"""

from __future__ import annotations

from edgeproxy.proxy.headers import PLAIN_CONNECTION_TOKENS, join_bytes
from edgeproxy.proxy.message import BODY_METHODS, ConnectionInfo, RequestHead, forwarding_lines


def upstream_request_head(req: RequestHead, conn: ConnectionInfo, request_id: bytes | None) -> bytes:
    """`request_id`: the X-Request-ID to add when the client sent none."""
    method = req.method
    authority = req.authority
    # Always HTTP/1.1 upstream (pooled keep-alive); an HTTP/1.0 client gets its response
    # re-framed (message.response_framing), as nginx's proxy_http_version 1.1 does.
    parts = [method, b" ", req.origin_target(), b" HTTP/1.1\r\nHost: ", authority or b"localhost",
             b"\r\n"]  # fmt: skip
    named = req.conn_tokens
    if named and not named <= PLAIN_CONNECTION_TOKENS:
        # Fields the client named in Connection are hop-by-hop too (RFC 9110 7.6.1); Host and
        # edgeproxy's own fields are never among them (they are not in fwd: written here).
        fwd = req.fwd
        for i in range(0, len(fwd), 4):
            if fwd[i].lower() not in named:
                parts += fwd[i : i + 4]
    else:
        parts += req.fwd
    # A trusted proxy's forwarding fields are kept and appended to (--trusted-proxies); else
    # the lines say what edgeproxy saw, the same bytes for every request of the connection.
    own = not conn.trusted or (req.xff is None and req.xf_proto is None and req.forwarded is None)
    if not own and req.forwarded is not None:
        parts += [line for line in req.forwarded if not line.startswith(b"X-Real-IP")]
    if authority:
        parts += (b"X-Forwarded-Host: ", authority, b"\r\n")
    if own:
        parts.append(conn.forward_lines)
    else:
        forwarded_for = peer_ip = conn.peer_ip
        real_ip = conn.client_ip_bytes
        proto = conn.scheme
        if req.xff is not None:
            forwarded_for = req.xff + b", " + peer_ip
            real_ip = req.x_real_ip or req.xff.rpartition(b",")[2].strip()
        if req.xf_proto is not None:
            proto = req.xf_proto
        parts.append(forwarding_lines(forwarded_for, proto, conn.port, real_ip))
    if request_id is not None:
        parts += (b"X-Request-ID: ", request_id, b"\r\n")
    if req.chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n\r\n")
    elif req.content_length > 0 or method in BODY_METHODS:
        parts.append(b"Content-Length: %d\r\n\r\n" % max(req.content_length, 0))
    elif req.websocket:
        parts += (b"Connection: upgrade\r\nUpgrade: ", req.upgrade or b"", b"\r\n\r\n")
    else:
        parts.append(b"\r\n")
    return join_bytes(parts)

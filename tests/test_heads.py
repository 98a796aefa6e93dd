"""Head rewriting as pure functions: what reaches the client of an upstream's response head."""

from __future__ import annotations

from edgeproxy.proxy.upstream import ResponseHead


def head(raw: bytes, status: int = 200) -> ResponseHead:
    return ResponseHead(status, raw)


def test_connection_keep_alive_line_is_cut_and_server_added() -> None:
    h = head(b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 5\r\n")
    assert h.head == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: edgeproxy\r\n"
    assert h.content_length == b"5" and not h.chunked


def test_fields_named_by_connection_and_other_hop_by_hop_fields_are_dropped() -> None:
    h = head(b"HTTP/1.1 200 OK\r\nServer: up\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\n"
             b"Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nProxy-Other: 1\r\nX-Kept: 2\r\n"
             b"Transfer-Encoding: chunked\r\n")  # fmt: skip
    assert h.head == (b"HTTP/1.1 200 OK\r\nServer: up\r\nX-Kept: 2\r\n"
                      b"Transfer-Encoding: chunked\r\n")  # fmt: skip
    assert h.chunked and h.content_length is None


def test_http10_status_line_becomes_11_and_case_does_not_matter() -> None:
    h = head(b"HTTP/1.0 404 Not Found\r\nCONTENT-LENGTH:  12 \r\nSERVER: x\r\n", 404)
    assert h.head.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert h.content_length == b"12"
    assert b"edgeproxy" not in h.head  # the upstream's Server is kept


def test_switching_protocols_keeps_its_upgrade_token() -> None:
    h = head(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n", 101)
    assert h.upgrade == b"websocket"
    assert b"Upgrade" not in h.head and b"Connection" not in h.head  # re-added by the tunnel


def test_upstream_knows_the_downstream_closed_phase() -> None:
    from edgeproxy.proxy import downstream, upstream

    assert upstream.CLOSED_PHASE == downstream.CLOSED

"""Head rewriting as pure functions: what reaches the client of an upstream's response head.

Every case runs against the Python scan and, when setup.py compiled it, its C twin
(_heads.pyx); a final case checks that the two agree on a batch of varied heads.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import Any

import pytest

from edgeproxy.proxy import headers, http1_client
from edgeproxy.proxy.headers import scan_response_head_py
from edgeproxy.proxy.http1_client import ResponseHead

try:
    from edgeproxy.proxy._heads import scan_response_head as scan_c
except ImportError:
    scan_c = None

SCANS = [pytest.param(scan_response_head_py, id="python"),
         pytest.param(scan_c, id="c", marks=pytest.mark.skipif(scan_c is None, reason="not compiled"))]  # fmt: skip


@pytest.fixture(params=SCANS)
def head(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    # ResponseHead is compiled code that calls the module's scan_response_head: swap it there.
    monkeypatch.setattr(http1_client, "scan_response_head", request.param)

    def make(raw: bytes, status: int = 200) -> ResponseHead:
        return ResponseHead(status, raw)

    return make


def test_connection_keep_alive_line_is_cut_and_server_added(head: Callable[..., Any]) -> None:
    h = head(b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 5\r\n")
    assert h.head == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: edgeproxy\r\n"
    assert h.content_length == b"5" and not h.chunked


def test_fields_named_by_connection_and_other_hop_by_hop_fields_are_dropped(head: Callable[..., Any]) -> None:
    h = head(b"HTTP/1.1 200 OK\r\nServer: up\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\n"
             b"Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nProxy-Other: 1\r\nX-Kept: 2\r\n"
             b"Transfer-Encoding: chunked\r\n")  # fmt: skip
    assert h.head == b"HTTP/1.1 200 OK\r\nServer: up\r\nX-Kept: 2\r\n"  # framing is per hop
    assert h.chunked and h.content_length is None


def test_http10_status_line_becomes_11_and_case_does_not_matter(head: Callable[..., Any]) -> None:
    h = head(b"HTTP/1.0 404 Not Found\r\nCONTENT-LENGTH:  12 \r\nSERVER: x\r\n", 404)
    assert h.head.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert h.content_length == b"12"
    assert b"edgeproxy" not in h.head  # the upstream's Server is kept


def test_switching_protocols_keeps_its_upgrade_token(head: Callable[..., Any]) -> None:
    h = head(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n", 101)
    assert h.upgrade == b"websocket"
    assert b"Upgrade" not in h.head and b"Connection" not in h.head  # re-added by the tunnel


def test_obs_fold_of_a_dropped_field_goes_with_it_and_last_coding_decides(head: Callable[..., Any]) -> None:
    h = head(b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5,\r\n max=100\r\nX-A: 1,\r\n 2\r\n"
             b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n")  # fmt: skip
    assert h.head == b"HTTP/1.1 200 OK\r\nX-A: 1,\r\n 2\r\nServer: edgeproxy\r\n"
    assert not h.chunked  # the final coding is gzip: not chunked-framed (RFC 9112 6.3)


def test_compiled_modules_are_not_older_than_their_sources() -> None:
    """In a checkout the compiled module is imported before its .py: a stale build would be
    tested instead of the code. Rebuild with `python setup.py build_ext --inplace`."""
    import importlib
    from pathlib import Path

    from edgeproxy.proxy import compiled_modules

    names = [*compiled_modules(), "edgeproxy.proxy._heads"]
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue  # _heads exists only compiled
        built = Path(str(module.__file__))
        if built.suffix != ".so":
            continue
        stem = built.name.split(".")[0]
        for source in built.parent.glob(stem + ".p*"):  # .py, .pxd, .pyx
            assert source.stat().st_mtime <= built.stat().st_mtime, f"{built.name} is older than {source.name}"


def test_compiled_hot_path_is_what_ci_tests() -> None:
    """CI sets EDGEPROXY_EXPECT_COMPILED=1: there the suite must run the compiled modules."""
    from edgeproxy.proxy import compiled

    if os.environ.get("EDGEPROXY_EXPECT_COMPILED") != "1":
        pytest.skip("EDGEPROXY_EXPECT_COMPILED not set")
    assert compiled() and scan_c is not None


@pytest.mark.skipif(scan_c is None, reason="not compiled")
def test_c_and_python_scans_agree() -> None:
    assert scan_c is not None
    status_lines = [b"HTTP/1.1 200 OK", b"HTTP/1.0 204 No Content", b"HTTP/1.1 101 Switching"]
    fields = [b"Content-Length: 12", b"content-length:7 ", b"Connection: keep-alive",
              b"CONNECTION: close, Upgrade", b"Connection: X-Hop", b"X-Hop: secret",
              b"Transfer-Encoding: gzip, chunked", b"Keep-Alive: 5", b"Proxy-Foo: 1",
              b"Upgrade: websocket", b"Server: up", b"Set-Cookie: a=b; Path=/", b"\tfolded",
              b"C: short", b"P: x", b"U:", b"S"]  # fmt: skip
    for status_line in status_lines:
        for combo in itertools.combinations(fields, 3):
            raw = b"\r\n".join((status_line, *combo)) + b"\r\n"
            assert scan_c(raw) == scan_response_head_py(raw), raw


@pytest.mark.skipif(scan_c is None, reason="not compiled")
def test_c_join_and_request_id_digits_match_python() -> None:
    from edgeproxy.proxy._heads import join_bytes, prefixed_hex16

    for prefix in (b"", b"0123456789abcdef"):
        for value in (0, 1, 255, 2**32 + 7, 2**64 - 1):
            assert prefixed_hex16(prefix, value) == headers.prefixed_hex16_py(prefix, value)
    assert headers.prefixed_hex16_py(b"ab", 255) == b"ab00000000000000ff"
    parts = [b"GET", b" ", b"/a?b", b" HTTP/1.1\r\n", b"", b"X: " * 100]
    assert join_bytes(parts) == headers.join_bytes_py(parts)
    assert join_bytes([b"a", bytearray(b"b")]) == b"ab"  # not all bytes: the general join


def test_connection_tokens_are_remembered_within_a_bound() -> None:
    """Common Connection values are parsed once; a client inventing values fills no memory."""
    values = [b"Keep-Alive, X-Trace-%d " % i for i in range(3 * headers.MAX_REMEMBERED_TOKENS)]
    for _ in range(2):  # the second pass reads what the first remembered (or parses again)
        for i, value in enumerate(values):
            assert headers.connection_tokens(value) == {b"keep-alive", b"x-trace-%d" % i}
    assert len(headers._TOKENS) <= headers.MAX_REMEMBERED_TOKENS
    assert headers.connection_tokens(b"close") == {b"close"}

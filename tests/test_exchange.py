"""The defects a review confirmed in the first data plane, each as the behaviour a client sees
(issue "The exchange, rebuilt"). Real sockets: backends on 127.0.0.x written to misbehave."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests import k8s
from tests.backends import Pods
from tests.conftest import ROOT, free_port, simple_site
from tests.http1 import IO_TIMEOUT, Client, fetch, read_body, read_head

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawBackend:
    """A loopback server whose every connection runs `handler`; counts requests it read."""

    def __init__(self) -> None:
        self.servers: list[asyncio.AbstractServer] = []
        self.requests: list[Any] = []

    async def start(self, address: str, handler: Handler, port: int = 0) -> int:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(serve, address, port, reuse_address=True)
        self.servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def read_request(self, reader: asyncio.StreamReader) -> Any:
        msg = await read_head(reader)
        if msg is not None:
            if msg.header("content-length") or msg.header("transfer-encoding"):
                msg.body = await read_body(reader, msg, request=True)
            self.requests.append(msg)
        return msg

    def close(self) -> None:
        for server in self.servers:
            server.close()


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def site(port: int, *addresses: str, annotations: dict[str, str] | None = None,
         host: str | None = None) -> list[dict[str, Any]]:  # fmt: skip
    objs = simple_site(port, *addresses)
    objs[1] = k8s.ingress("site", [(host, [k8s.path("/", "web")])], annotations=annotations)
    return objs


# 1 -------------------------------------------------------------------------------------------

async def test_bytes_after_the_framed_response_never_reach_the_client(proxy_factory: Any) -> None:
    backend = RawBackend()

    async def surplus(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await backend.read_request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                         b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra")  # fmt: skip
            await writer.drain()

    port = await backend.start("127.0.0.2", surplus)
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"))
    client = await Client.connect(proxy.http)
    try:
        for _ in range(3):  # each on the same client connection: never off by one
            resp = await client.request("GET", "/")
            assert (resp.status, resp.body) == (200, b"ok")
    finally:
        await client.close()
        backend.close()


# 2 -------------------------------------------------------------------------------------------

async def test_pooled_plain_connection_is_never_reused_for_an_https_backend(proxy_factory: Any) -> None:  # fmt: skip
    pods = Pods()
    port = await pods.start("127.0.0.2")
    objs = simple_site(port, "127.0.0.2")
    objs[1] = k8s.ingress("plain", [("plain.example.com", [k8s.path("/", "web")])])
    objs.append(k8s.ingress("tls", [("tls.example.com", [k8s.path("/", "web")])],
                            annotations={"edgeproxy.io/backend-protocol": "HTTPS"}))  # fmt: skip
    proxy = await proxy_factory(objs)
    try:
        assert (await fetch(proxy.http, "GET", "/", host="plain.example.com")).status == 200
        # The pod speaks plain HTTP only: over TLS, as this Ingress asks, it cannot answer.
        resp = await fetch(proxy.http, "GET", "/secret", host="tls.example.com")
        assert resp.status == 502
        assert [m.target for _, m in pods.requests] == ["/"]  # nothing went out in clear
    finally:
        await pods.close()


# 3 -------------------------------------------------------------------------------------------

async def test_client_that_half_closes_after_its_request_gets_the_response(pods: Pods, proxy_factory: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.http)
    writer.write(b"GET /half HTTP/1.1\r\nHost: example.com\r\n\r\n")
    writer.write_eof()  # as nc -N does
    data = await asyncio.wait_for(reader.read(), IO_TIMEOUT)  # until edgeproxy closes
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(body)["target"] == "/half"


# 4 -------------------------------------------------------------------------------------------

async def test_post_without_body_reset_after_delivery_is_not_sent_twice(proxy_factory: Any) -> None:
    backend = RawBackend()

    async def take_and_reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await backend.read_request(reader) is not None:
            reset(writer)

    port = await backend.start("127.0.0.2", take_and_reset)
    await backend.start("127.0.0.3", take_and_reset, port)
    proxy = await proxy_factory(simple_site(port, "127.0.0.2", "127.0.0.3"))
    try:
        resp = await fetch(proxy.http, "POST", "/order", headers=[("Content-Length", "0")])
        assert resp.status == 502
        assert len(backend.requests) == 1  # delivered once: a POST is not replayed after sending
    finally:
        backend.close()


async def test_post_with_body_whose_connect_was_refused_goes_to_another_endpoint(pods: Pods, proxy_factory: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.9", "127.0.0.2"))  # .9: refused
    for _ in range(4):  # round robin meets the refusing endpoint first in one of two
        resp = await fetch(proxy.http, "POST", "/", body=b"payload")
        assert resp.status == 200 and json.loads(resp.body)["body_len"] == 7


async def test_connect_timeout_is_retried_on_another_endpoint(pods: Pods, proxy_factory: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2")
    # A listener on the same port whose accept queue is full: the kernel drops further SYNs,
    # so connecting to it hangs as it does to an unreachable pod.
    stuck = socket.socket()
    stuck.bind(("127.0.0.5", port))
    stuck.listen(0)
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        try:
            filler.connect(("127.0.0.5", port))
        except BlockingIOError:
            pass
        fillers.append(filler)
    try:
        proxy = await proxy_factory(simple_site(port, "127.0.0.5", "127.0.0.2"),
                                    "--connect-timeout", "0.3", "--outlier-consecutive-failures", "100")  # fmt: skip
        for _ in range(4):  # any method: nothing was sent to the endpoint that timed out
            resp = await fetch(proxy.http, "POST", "/", body=b"x")
            assert resp.status == 200 and json.loads(resp.body)["pod"] == "127.0.0.2"
    finally:
        stuck.close()
        for filler in fillers:
            filler.close()


# 5 -------------------------------------------------------------------------------------------

async def test_header_line_without_end_is_431_before_it_ends(pods: Pods, proxy_factory: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.http)
    writer.write(b"GET / HTTP/1.1\r\nHost: example.com\r\nX-Long: ")
    try:
        for _ in range(64):  # up to 4 MiB of one line, never ended
            writer.write(b"a" * 65536)
            await writer.drain()
    except ConnectionError:
        pass  # closed by edgeproxy after its 431: the rest is not read
    head = await asyncio.wait_for(reader.read(65536), IO_TIMEOUT)
    writer.close()
    assert head.startswith(b"HTTP/1.1 431")


async def test_pipelined_local_answers_to_a_client_that_does_not_read_stay_bounded(proxy_factory: Any) -> None:  # fmt: skip
    # Without a cap on requests per connection (which would end this one after 1000).
    proxy = await proxy_factory(simple_site(free_port(), "127.0.0.9"), "--max-requests-per-connection", "0")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.http)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    before = proxy.rss_kib("VmRSS")
    request = b"GET /nope HTTP/1.1\r\nHost: nowhere.example.org\r\n\r\n"
    sent = 0
    try:
        while sent < 8 * 1024 * 1024:  # 8 MiB of requests, none of the answers read
            writer.write(request * 1024)
            await asyncio.wait_for(writer.drain(), 2.0)
            sent += len(request) * 1024
    except TimeoutError:
        pass  # edgeproxy stopped reading: the client is paused, as it should be
    grown = proxy.rss_kib("VmRSS") - before
    writer.close()
    assert grown < 8 * 1024, f"RSS grew {grown} KiB for {sent} bytes of unread pipelining"


# 6 -------------------------------------------------------------------------------------------

async def test_h2c_upgrade_with_a_body_is_proxied_as_a_plain_request(pods: Pods, proxy_factory: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"), "--read-timeout", "3")
    client = await Client.connect(proxy.http)
    try:
        resp = await client.request("POST", "/form", body=b"a=1", headers=[
            ("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"),
            ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA")])  # as curl --http2 -d a=1 sends
        assert resp.status == 200
        echo = json.loads(resp.body)
        assert echo["body_len"] == 3
        assert not any(k.lower() in ("upgrade", "http2-settings") for k, _ in echo["headers"])
        resp = await client.request("GET", "/after")  # and the connection goes on as HTTP/1.1
        assert json.loads(resp.body)["target"] == "/after"
    finally:
        await client.close()


# 7 -------------------------------------------------------------------------------------------

async def test_early_413_from_the_upstream_during_an_upload_reaches_the_client(proxy_factory: Any) -> None:  # fmt: skip
    backend = RawBackend()
    seen = asyncio.Event()

    async def refuse_upload(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)  # the body is never read
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n\r\nbig!")
        await writer.drain()
        await seen.wait()

    port = await backend.start("127.0.0.2", refuse_upload)
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"), "--read-timeout", "5")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.http)
    size = 32 * 1024 * 1024
    writer.write(b"POST /upload HTTP/1.1\r\nHost: example.com\r\nContent-Length: %d\r\n\r\n" % size)

    async def upload() -> None:
        piece = b"u" * 65536
        for _ in range(size // len(piece)):
            writer.write(piece)
            await writer.drain()

    uploading = asyncio.create_task(upload())
    try:
        # A client that sends its whole body before it reads (as many do): edgeproxy must keep
        # reading (and dropping) the body after the upstream's early answer, not stay paused.
        await asyncio.wait_for(uploading, 4 * IO_TIMEOUT)
        msg = await read_head(reader)
        assert msg is not None and msg.status == 413
        assert await read_body(reader, msg, request=False) == b"big!"
    finally:
        seen.set()
        uploading.cancel()
        writer.close()
        backend.close()


# 8 -------------------------------------------------------------------------------------------

async def test_close_delimited_body_cut_by_a_reset_is_not_presented_as_complete(proxy_factory: Any) -> None:  # fmt: skip
    backend = RawBackend()
    client_has_part = asyncio.Event()

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await backend.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart of a body")
        await writer.drain()
        await client_has_part.wait()
        reset(writer)

    port = await backend.start("127.0.0.2", cut)
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.http)
    writer.write(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
    msg = await read_head(reader)
    assert msg is not None and msg.status == 200
    assert (msg.header("transfer-encoding") or "").lower() == "chunked"
    first = await asyncio.wait_for(reader.readuntil(b"part of a body\r\n"), IO_TIMEOUT)
    assert first
    client_has_part.set()
    rest = await asyncio.wait_for(reader.read(), IO_TIMEOUT)  # until edgeproxy cuts it
    writer.close()
    backend.close()
    assert b"0\r\n\r\n" not in rest  # no clean terminator: the client knows it is truncated


# 9 -------------------------------------------------------------------------------------------

async def test_absolute_form_authority_replaces_host_upstream(pods: Pods, proxy_factory: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(site(port, "127.0.0.2", host="shop.example.com"))
    resp = await fetch(proxy.http, "GET", "http://shop.example.com/x", host="other.example.com")
    echo = json.loads(resp.body)
    assert [v for k, v in echo["headers"] if k.lower() == "host"] == ["shop.example.com"]


async def test_invalid_host_is_400_and_never_reflected(pods: Pods, proxy_factory: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2")
    objs = site(port, "127.0.0.2", host="*.example.com")
    proxy = await proxy_factory(objs)
    for host in ("evil/.wild.example.com", "a b.example.com", "x\\.example.com"):
        resp = await fetch(proxy.http, "GET", "/", host=host)
        assert resp.status == 400, host
        assert resp.header("location") is None
    assert pods.requests == []


async def test_connection_naming_host_does_not_strip_host(pods: Pods, proxy_factory: Any) -> None:
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"))
    resp = await fetch(proxy.http, "GET", "/", host="shop.example.com",
                       headers=[("Connection", "host, x-drop"), ("X-Drop", "1")])  # fmt: skip
    names = {k.lower(): v for k, v in json.loads(resp.body)["headers"]}
    assert names["host"] == "shop.example.com" and "x-drop" not in names


# 10 ------------------------------------------------------------------------------------------

async def test_balancer_plugin_that_raises_is_confined_to_its_cluster(pods: Pods, proxy_factory: Any, manifests: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2", "127.0.0.3")
    objs = simple_site(port, "127.0.0.2", "127.0.0.3")
    objs.append(k8s.ingress("broken", [("broken.example.com", [k8s.path("/", "web")])],
                            annotations={"edgeproxy.io/load-balance": "test-broken"}))  # fmt: skip
    proxy = await proxy_factory(objs, pythonpath=str(ROOT / "tests" / "plugins"))  # it starts
    assert (await fetch(proxy.http, "GET", "/", host="broken.example.com")).status == 200
    # An EndpointSlice-only change still applies: .3 leaves and gets no more requests.
    objs[3] = k8s.endpoint_slice("web", k8s.ready("127.0.0.2"), port)
    k8s.write(manifests, objs)
    for _ in range(100):
        routes = json.loads((await fetch(proxy.admin, "GET", "/debug/routes")).body)
        if all(len(r["endpoints"]) == 1 for r in routes["routes"]):
            break
        await asyncio.sleep(0.05)
    before = pods.hits("127.0.0.3")
    for host in ("example.com", "broken.example.com"):
        for _ in range(4):
            assert (await fetch(proxy.http, "GET", "/", host=host)).status == 200
    assert pods.hits("127.0.0.3") == before
    assert "test-broken" in proxy.log() or "Broken" in proxy.log()


# 11 ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("version", "coding", "status"), [
    ("HTTP/1.1", "gzip, chunked", 501),  # a coding edgeproxy does not implement: never dropped
    ("HTTP/1.0", "chunked", 400),  # RFC 9112 6.1: Transfer-Encoding in 1.0 is faulty framing
])
async def test_transfer_encoding_edgeproxy_cannot_honour_is_refused(pods: Pods, proxy_factory: Any, version: str, coding: str, status: int) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"))
    client = await Client.connect(proxy.http)
    await client.send_raw(b"POST / %s\r\nHost: example.com\r\nTransfer-Encoding: %s\r\n\r\n"
                          b"3\r\nabc\r\n0\r\n\r\n" % (version.encode(), coding.encode()))  # fmt: skip
    resp = await client.response()
    assert resp.status == status and await client.closed_by_peer()
    assert pods.requests == []


async def test_forwarded_and_x_real_ip_from_untrusted_clients_are_replaced(pods: Pods, proxy_factory: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"))
    resp = await fetch(proxy.http, "GET", "/", headers=[
        ("Forwarded", "for=6.6.6.6"), ("X-Real-IP", "6.6.6.6"), ("X-Forwarded-For", "6.6.6.6")])
    fields = json.loads(resp.body)["headers"]
    assert not any(k.lower() == "forwarded" for k, _ in fields)
    assert [v for k, v in fields if k.lower() == "x-real-ip"] == ["127.0.0.1"]
    assert [v for k, v in fields if k.lower() == "x-forwarded-for"] == ["127.0.0.1"]


async def test_dot_segments_are_normalized_before_routing_and_forwarding(pods: Pods, proxy_factory: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2", "127.0.0.3")
    objs = [k8s.ingress_class(),
            k8s.ingress("site", [(None, [k8s.path("/web", "web"), k8s.path("/api", "api")])]),
            k8s.service("web"), k8s.service("api"),
            k8s.endpoint_slice("web", k8s.ready("127.0.0.2"), port),
            k8s.endpoint_slice("api", k8s.ready("127.0.0.3"), port)]  # fmt: skip
    proxy = await proxy_factory(objs)
    for target in ("/web/../api/items", "/web/%2e%2e/api/items", "/api/./items"):
        echo = json.loads((await fetch(proxy.http, "GET", target)).body)
        assert (echo["pod"], echo["target"]) == ("127.0.0.3", "/api/items"), target

"""The defects a review confirmed in the first data plane, each as the behaviour a client sees
(issue "The exchange, rebuilt"). Real sockets: backends on 127.0.0.x written to misbehave."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

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

"""The proxy over real sockets: edgeproxy process, backend pods on 127.0.0.x, raw clients."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from tests import k8s
from tests.backends import Pods
from tests.conftest import eventually, simple_site
from tests.http1 import Client, fetch, read_body, read_head

PODS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


def echo(resp: Any) -> dict[str, Any]:
    assert resp.status == 200, (resp.status, resp.body[:200])
    return json.loads(resp.body)


def upstream_header(data: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in data["headers"] if k.lower() == name.lower()]


async def test_host_and_path_routing_reaches_the_right_service(pods: Pods, proxy_factory: Any) -> None:  # fmt: skip
    web, api = Pods(), Pods()
    wport = await web.start("127.0.0.2", "127.0.0.3")
    aport = await api.start("127.0.0.5")
    proxy = await proxy_factory([
        k8s.ingress_class(),
        k8s.ingress("shop", [("shop.example.com", [k8s.path("/", "web"), k8s.path("/api", "api")])]),
        k8s.service("web"), k8s.endpoint_slice("web", k8s.ready("127.0.0.2", "127.0.0.3"), wport),
        k8s.service("api"), k8s.endpoint_slice("api", k8s.ready("127.0.0.5"), aport),
    ])  # fmt: skip
    try:
        assert echo(await fetch(proxy.http, "GET", "/api/x?q=1", host="SHOP.example.com:80"))["pod"] == "127.0.0.5"  # fmt: skip
        pods_seen = {echo(await fetch(proxy.http, "GET", "/", host="shop.example.com"))["pod"] for _ in range(4)}  # fmt: skip
        assert pods_seen == {"127.0.0.2", "127.0.0.3"}
        assert (await fetch(proxy.http, "GET", "/", host="other.example.com")).status == 404
        assert echo(await fetch(proxy.http, "GET", "/apix", host="shop.example.com"))["pod"] != "127.0.0.5"  # fmt: skip
    finally:
        await web.close()
        await api.close()


async def test_round_robin_spreads_requests_evenly_over_pods(pods: Pods, proxy_factory: Any) -> None:  # fmt: skip
    port = await pods.start(*PODS)
    proxy = await proxy_factory(simple_site(port, *PODS))
    client = await Client.connect(proxy.http)
    for _ in range(30):
        echo(await client.request("GET", "/"))
    await client.close()
    assert [pods.hits(p) for p in PODS] == [10, 10, 10]


async def test_keep_alive_reuses_upstream_connections(pods: Pods, proxy_factory: Any) -> None:
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"), "--workers", "1")  # pools are per worker
    for _ in range(3):
        client = await Client.connect(proxy.http)
        for _ in range(20):
            echo(await client.request("GET", "/"))
        await client.close()
    assert pods.hits("127.0.0.2") == 60
    assert pods.connections["127.0.0.2"] == 1


async def test_forwarding_headers_are_rewritten(pods: Pods, proxy_factory: Any) -> None:
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"))
    data = echo(await fetch(proxy.http, "GET", "/h", host="site.example.com:8080", headers=[
        ("Connection", "keep-alive, X-Secret"), ("X-Secret", "hop"), ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"), ("Proxy-Authorization", "Basic x"), ("X-Forwarded-For", "6.6.6.6"),
        ("X-Request-ID", "abc-123"), ("X-Custom", "kept"), ("Proxy-Anything", "hop"),
    ]))  # fmt: skip
    for hop in ("Connection", "X-Secret", "Keep-Alive", "TE", "Proxy-Authorization", "Proxy-Anything"):
        assert upstream_header(data, hop) == [], hop
    assert upstream_header(data, "Host") == ["site.example.com:8080"]
    assert upstream_header(data, "X-Forwarded-For") == ["127.0.0.1"]  # untrusted client: replaced
    assert upstream_header(data, "X-Forwarded-Proto") == ["http"]
    assert upstream_header(data, "X-Forwarded-Host") == ["site.example.com:8080"]
    assert upstream_header(data, "X-Forwarded-Port") == [str(proxy.http)]
    assert upstream_header(data, "X-Request-ID") == ["abc-123"]
    assert upstream_header(data, "X-Custom") == ["kept"]
    generated = echo(await fetch(proxy.http, "GET", "/"))
    [rid] = upstream_header(generated, "X-Request-ID")
    assert len(rid) == 32


async def test_trusted_proxy_forwarded_for_is_appended(pods: Pods, proxy_factory: Any) -> None:
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"), "--trusted-proxies", "127.0.0.0/8")
    data = echo(await fetch(proxy.http, "GET", "/", headers=[("X-Forwarded-For", "6.6.6.6"),
                                                             ("X-Forwarded-Proto", "https")]))  # fmt: skip
    assert upstream_header(data, "X-Forwarded-For") == ["6.6.6.6, 127.0.0.1"]
    assert upstream_header(data, "X-Forwarded-Proto") == ["https"]


async def test_response_framings_reach_the_client(pods: Pods, proxy_factory: Any) -> None:
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"))
    client = await Client.connect(proxy.http)
    chunked = await client.request("GET", "/chunked")
    assert chunked.body == b"hello world" and chunked.header("transfer-encoding") == "chunked"
    # Read-until-close from the upstream becomes chunked for an HTTP/1.1 client: it stays open.
    until_close = await client.request("GET", "/until-close")
    assert until_close.body == b"until close body"
    assert until_close.header("transfer-encoding") == "chunked"
    head = await client.request("HEAD", "/head-length")
    assert head.header("content-length") == "1234" and head.body == b""
    no_content = await client.request("GET", "/status/204")
    assert no_content.status == 204 and no_content.header("content-length") is None
    not_modified = await client.request("GET", "/status/304")
    assert not_modified.status == 304
    assert echo(await client.request("GET", "/still-alive"))["target"] == "/still-alive"
    await client.close()


async def test_http10_client_gets_a_close_delimited_or_sized_response(pods: Pods, proxy_factory: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"))
    client = await Client.connect(proxy.http)
    resp = await client.request("GET", "/chunked", host=None, version="HTTP/1.0")
    assert resp.body == b"hello world" and resp.header("transfer-encoding") is None
    assert await client.closed_by_peer()
    client = await Client.connect(proxy.http)
    resp = await client.request("GET", "/x", version="HTTP/1.0", headers=[("Connection", "keep-alive")])  # fmt: skip
    assert resp.header("connection") == "keep-alive"
    assert echo(await client.request("GET", "/y", version="HTTP/1.0"))["target"] == "/y"
    await client.close()


async def test_expect_100_continue_is_answered_before_the_body(pods: Pods, proxy_factory: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"))
    client = await Client.connect(proxy.http)
    await client.send_raw(b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"
                          b"Expect: 100-continue\r\n\r\n")  # fmt: skip
    interim = await read_head(client.reader)
    assert interim is not None and interim.status == 100
    await client.send_raw(b"hello")
    data = echo(await client.response("POST"))
    assert data["body_len"] == 5 and upstream_header(data, "Expect") == []
    await client.close()


async def test_large_bodies_stream_both_ways_with_bounded_memory(pods: Pods, proxy_factory: Any) -> None:  # fmt: skip
    size = 64 * 1024 * 1024
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"))
    before = proxy.rss_kib()
    client = await Client.connect(proxy.http)
    # Download: the client reads slowly at first, so edgeproxy must push back on the upstream.
    await client.send_raw(b"GET /big/%d HTTP/1.1\r\nHost: h\r\n\r\n" % size)
    head = await read_head(client.reader)
    assert head is not None and head.status == 200
    await asyncio.sleep(0.5)
    received = [0]
    await read_body(client.reader, head, request=False, sink=received)
    assert received[0] == size
    # Upload, chunked, in 1 MiB pieces.
    piece = b"z" * (1 << 20)
    digest = hashlib.sha256()
    await client.send_raw(b"PUT /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(64):
        digest.update(piece)
        await client.send_raw(b"%x\r\n%s\r\n" % (len(piece), piece))
    await client.send_raw(b"0\r\n\r\n")
    data = echo(await client.response("PUT"))
    assert data["body_len"] == size and data["sha256"] == digest.hexdigest()
    await client.close()
    growth_mib = (proxy.rss_kib() - before) / 1024
    assert growth_mib < 32, f"edgeproxy grew by {growth_mib:.0f} MiB moving 128 MiB"


async def test_websocket_upgrade_becomes_a_tunnel(pods: Pods, proxy_factory: Any) -> None:
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"))
    client = await Client.connect(proxy.http)
    await client.send_raw(b"GET /upgrade HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\n"
                          b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n")  # fmt: skip
    head = await read_head(client.reader)
    assert head is not None and head.status == 101
    assert head.header("upgrade") == "websocket"
    for message in (b"ping", b"\x81\x05hello", b"x" * 100_000):
        await client.send_raw(message)
        got = b""
        while len(got) < len(message):
            got += await asyncio.wait_for(client.reader.read(1 << 16), 5)
        assert got == message
    await client.close()


async def test_pipelined_requests_are_answered_in_order(pods: Pods, proxy_factory: Any) -> None:
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"))
    client = await Client.connect(proxy.http)
    await client.send_raw(b"".join(b"GET /slow/%d HTTP/1.1\r\nHost: h\r\n\r\n" % ms for ms in (50, 0, 20)))  # fmt: skip
    targets = [echo(await client.response())["target"] for _ in range(3)]
    assert targets == ["/slow/50", "/slow/0", "/slow/20"]
    await client.close()


async def test_live_reload_keeps_an_open_keep_alive_connection(pods: Pods, proxy_factory: Any, manifests: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2", "127.0.0.3")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"))
    client = await Client.connect(proxy.http)
    assert echo(await client.request("GET", "/"))["pod"] == "127.0.0.2"
    k8s.write(manifests, simple_site(port, "127.0.0.3"))
    for _ in range(100):
        await asyncio.sleep(0.05)
        if echo(await client.request("GET", "/"))["pod"] == "127.0.0.3":
            break
    else:
        raise AssertionError("the edited manifest never took effect")
    assert pods.connections.get("127.0.0.3") == 1
    await client.close()


async def test_early_hints_reach_an_http11_client_before_the_response(pods: Pods, proxy_factory: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"))
    client = await Client.connect(proxy.http)
    await client.send_raw(b"GET /early-hints HTTP/1.1\r\nHost: h\r\n\r\n")
    hints = await read_head(client.reader)
    assert hints is not None and hints.status == 103
    assert hints.header("link") == "</style.css>; rel=preload"
    final = await client.response()
    assert final.status == 200 and final.body == b"final"
    await client.close()


async def test_absolute_form_target_routes_by_its_authority(pods: Pods, proxy_factory: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2")
    objs = simple_site(port, "127.0.0.2")
    objs[1] = k8s.ingress("site", [("real.example.com", [k8s.path("/", "web")])])
    proxy = await proxy_factory(objs)
    resp = await fetch(proxy.http, "GET", "http://real.example.com/a?b=1", host="ignored.example.com")
    data = echo(resp)
    assert data["target"] == "/a?b=1"  # origin-form upstream (RFC 9112 3.2.1)


async def test_upstream_connection_close_is_not_reused(pods: Pods, proxy_factory: Any) -> None:
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"))
    client = await Client.connect(proxy.http)
    for _ in range(3):
        resp = await client.request("GET", "/close")
        assert resp.body == b"closed" and resp.header("connection") is None  # hop-by-hop
    assert pods.connections["127.0.0.2"] == 3
    await client.close()


async def test_client_connection_close_is_honoured(pods: Pods, proxy_factory: Any) -> None:
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"))
    client = await Client.connect(proxy.http)
    resp = await client.request("GET", "/", headers=[("Connection", "close")])
    assert resp.status == 200 and resp.header("connection") == "close"
    assert await client.closed_by_peer()


async def test_invalid_upstream_response_is_502(pods: Pods, proxy_factory: Any) -> None:
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"))
    resp = await fetch(proxy.http, "GET", "/garbage")
    assert resp.status == 502


async def test_sigterm_lets_the_request_in_flight_finish(pods: Pods, proxy_factory: Any) -> None:
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"))
    client = await Client.connect(proxy.http)
    await client.send_raw(b"GET /slow/400 HTTP/1.1\r\nHost: h\r\n\r\n")

    async def reached_the_pod() -> bool:
        return bool(pods.requests)

    await eventually(reached_the_pod, what="the request reaching the pod")
    assert proxy.proc is not None
    proxy.proc.send_signal(15)

    async def draining() -> bool:
        return (await fetch(proxy.admin, "GET", "/readyz")).status == 503

    await eventually(draining, what="/readyz turning 503")  # not ready: draining
    resp = await client.response()
    assert resp.status == 200 and resp.header("connection") == "close"
    await client.close()


@pytest.mark.parametrize("max_idle", [None, "8"])
async def test_pool_follows_a_burst_and_every_request_is_answered(pods: Pods, proxy_factory: Any, max_idle: str | None) -> None:  # fmt: skip
    """Two bursts of 120 concurrent requests: every one answered; by default the second burst
    reuses the first one's connections (the pool kept them), with --upstream-max-idle 8 it
    opens new ones beyond the 8 kept, and still answers all."""
    port = await pods.start("127.0.0.2")
    extra = ("--workers", "1") + (("--upstream-max-idle", max_idle) if max_idle else ())
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"), *extra)

    async def burst() -> list[int]:
        return [r.status for r in await asyncio.gather(
            *(fetch(proxy.http, "GET", "/slow/100") for _ in range(120)))]  # fmt: skip

    assert await burst() == [200] * 120
    first = pods.connections["127.0.0.2"]
    assert await burst() == [200] * 120
    opened = pods.connections["127.0.0.2"] - first
    if max_idle is None:
        assert opened <= 10  # the burst's connections were kept
    else:
        assert opened >= 120 - 8 - 10  # only 8 were kept (a few may not have overlapped)


async def test_a_burst_of_over_a_thousand_requests_keeps_its_upstream_connections(proxy_factory: Any) -> None:  # fmt: skip
    """1,100 requests at once, twice: the second burst reuses the first one's upstream
    connections. The pod answers a burst only when all of it has arrived, so each burst holds
    1,100 upstream connections at once. With 1024 kept per endpoint, every burst past 1024
    reopened the rest, and in a saturated worker each of those connects waited up to 1.6 s."""
    size = 1100
    accepted = 0
    waiting: list[asyncio.StreamWriter] = []
    all_here = asyncio.Event()

    async def pod(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        try:
            while await read_head(reader) is not None:
                waiting.append(writer)
                if len(waiting) == size:
                    all_here.set()
                await all_here.wait()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(pod, "127.0.0.2", 0, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"), "--workers", "1")

    async def burst() -> list[int]:
        waiting.clear()
        all_here.clear()
        statuses = asyncio.gather(*(fetch(proxy.http, "GET", "/") for _ in range(size)))
        return [r.status for r in await asyncio.wait_for(statuses, 60)]

    try:
        assert await burst() == [200] * size
        first = accepted
        assert first >= size  # one upstream connection per request held at once
        assert await burst() == [200] * size
        assert accepted - first <= 30  # the first burst's connections were kept
    finally:
        server.close()


async def test_a_worker_moves_big_bodies_in_memory_it_reuses(pods: Pods, proxy_factory: Any) -> None:
    """1 MiB responses written by the pod at once reach edgeproxy in reads of up to 256 KiB.
    Each piece must land in heap memory the worker already has: left to glibc's defaults,
    every piece was mapped anew (or the heap grown and trimmed), about 390 minor page faults
    per response, which cost the worker more CPU than the copies themselves."""
    size = 1 << 20
    response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (size, b"b" * size)

    async def pod(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(response)  # one write: the kernel hands it on in big segments
            await writer.drain()

    server = await asyncio.start_server(pod, "127.0.0.2", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"), "--workers", "1", "--access-log", "off")
    assert proxy.proc is not None
    children = Path(f"/proc/{proxy.proc.pid}/task/{proxy.proc.pid}/children").read_text().split()
    assert len(children) == 1, children
    stat = Path(f"/proc/{children[0]}/stat")

    def minor_faults() -> int:
        return int(stat.read_text().rpartition(")")[2].split()[7])  # minflt, field 10

    client = await Client.connect(proxy.http)

    async def download(count: int) -> None:
        for _ in range(count):
            await client.send_raw(b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n")
            head = await read_head(client.reader)
            assert head is not None and head.status == 200
            received = [0]
            await read_body(client.reader, head, request=False, sink=received)
            assert received[0] == size

    await download(5)  # the pools, the heap's first growth
    before = minor_faults()
    await download(40)
    per_response = (minor_faults() - before) / 40
    await client.close()
    server.close()
    # A MiB in fresh pages is 256 faults; reused memory needs next to none.
    assert per_response < 32, f"{per_response:.0f} minor page faults per 1 MiB response"

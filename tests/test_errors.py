"""Every error status a client can get from edgeproxy, and that bad input loses nothing else."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests import k8s
from tests.backends import Pods
from tests.conftest import eventually, simple_site
from tests.http1 import Client, fetch


def assert_local_response(resp: Any, status: int) -> None:
    assert resp.status == status
    for name in ("Date", "Server", "Content-Type", "Content-Length"):
        assert resp.header(name), f"{status} lacks {name}"
    assert int(resp.header("Content-Length")) == len(resp.body)


async def test_no_route_is_404_from_edgeproxy(pods: Pods, proxy_factory: Any) -> None:
    port = await pods.start("127.0.0.2")
    objs = simple_site(port, "127.0.0.2")
    objs[1] = k8s.ingress("site", [("only.example.com", [k8s.path("/", "web")])])
    proxy = await proxy_factory(objs)
    resp = await fetch(proxy.http, "GET", "/", host="else.example.com")
    assert_local_response(resp, 404)
    assert pods.requests == []


async def test_service_without_endpoints_is_503(proxy_factory: Any) -> None:
    proxy = await proxy_factory([
        k8s.ingress_class(), k8s.ingress("i", [(None, [k8s.path("/", "empty")])]),
        k8s.service("empty"),
    ])  # fmt: skip
    assert_local_response(await fetch(proxy.http, "GET", "/"), 503)


async def test_refused_connection_is_retried_on_another_endpoint(pods: Pods, proxy_factory: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2")
    # 127.0.0.9 has no listener on that port: connecting is refused.
    proxy = await proxy_factory(simple_site(port, "127.0.0.9", "127.0.0.2"))
    for _ in range(4):
        resp = await fetch(proxy.http, "GET", "/")
        assert resp.status == 200 and json.loads(resp.body)["pod"] == "127.0.0.2"


async def test_non_idempotent_request_with_a_body_is_not_retried(pods: Pods, proxy_factory: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2", "127.0.0.3")
    pods.fail_with["127.0.0.2"] = 0  # reads the request, then resets: it may have acted on it
    # One worker: round-robin positions are per worker, and two new connections may reach two.
    proxy = await proxy_factory(simple_site(port, "127.0.0.2", "127.0.0.3"), "--workers", "1")
    for _ in range(2):  # round robin starts somewhere: one of two goes to .2 first
        resp = await fetch(proxy.http, "POST", "/", body=b"payload")
        if resp.status != 200:
            assert_local_response(resp, 502)
    assert pods.hits("127.0.0.2") == 1
    assert pods.hits("127.0.0.3") == 1  # the reset POST was not sent to .3 as well


async def test_upstream_reset_before_response_is_502(pods: Pods, proxy_factory: Any) -> None:
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"))
    assert_local_response(await fetch(proxy.http, "GET", "/reset"), 502)


async def test_slow_upstream_is_504(pods: Pods, proxy_factory: Any) -> None:
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"), "--read-timeout", "0.3")
    assert_local_response(await fetch(proxy.http, "GET", "/slow/2000"), 504)
    assert (await fetch(proxy.http, "GET", "/slow/10")).status == 200


@pytest.mark.parametrize("raw", [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n",
])  # fmt: skip
async def test_malformed_request_is_400_and_closed(pods: Pods, proxy_factory: Any, raw: bytes) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"))
    client = await Client.connect(proxy.http)
    await client.send_raw(raw)
    resp = await client.response()
    assert_local_response(resp, 400)
    assert resp.header("connection") == "close"
    assert await client.closed_by_peer()
    assert pods.requests == []


async def test_header_section_too_large_is_431(pods: Pods, proxy_factory: Any) -> None:
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"), "--max-header-size", "4k")
    client = await Client.connect(proxy.http)
    await client.send_raw(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n")
    assert_local_response(await client.response(), 431)
    assert await client.closed_by_peer()


@pytest.mark.parametrize("chunked", [False, True])
async def test_body_over_the_limit_is_413(pods: Pods, proxy_factory: Any, chunked: bool) -> None:
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"), "--max-body-size", "1k")
    client = await Client.connect(proxy.http)
    body = b"b" * 2048
    if chunked:
        await client.send_raw(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"800\r\n" + body + b"\r\n0\r\n\r\n")  # fmt: skip
    else:
        await client.send_raw(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2048\r\n\r\n" + body)
    assert_local_response(await client.response(), 413)
    assert await client.closed_by_peer()


async def test_client_too_slow_with_its_headers_gets_408(pods: Pods, proxy_factory: Any) -> None:
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"), "--client-header-timeout", "0.3")
    client = await Client.connect(proxy.http)
    await client.send_raw(b"GET / HTTP/1.1\r\nHost: a\r\n")
    assert_local_response(await client.response(), 408)
    assert await client.closed_by_peer()


async def test_idle_keep_alive_connection_is_closed_quietly(pods: Pods, proxy_factory: Any) -> None:
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"), "--keepalive-timeout", "0.3")
    client = await Client.connect(proxy.http)
    assert (await client.request("GET", "/")).status == 200
    assert await client.closed_by_peer()


async def test_invalid_objects_are_logged_and_the_rest_serves(pods: Pods, proxy_factory: Any, manifests: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2")
    objs = simple_site(port, "127.0.0.2")
    objs.append(k8s.ingress("broken", [("broken.example.com", [k8s.path("/", "missing-svc")])]))
    (manifests / "garbage.yaml").parent.mkdir(parents=True, exist_ok=True)
    (manifests / "garbage.yaml").write_text("kind: [unclosed\n")
    proxy = await proxy_factory(objs)
    assert (await fetch(proxy.http, "GET", "/", host="site.example.com")).status == 200

    async def reported() -> bool:
        return "missing-svc" in proxy.log()

    await eventually(reported, what="the skipped Ingress's log line")
    log = proxy.log()
    assert "default/broken" in log and "missing-svc" in log
    assert "garbage.yaml" in log

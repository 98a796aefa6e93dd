"""The Kubernetes watch, against a real HTTP API server emulator (tests/apiserver.py)."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests import k8s
from tests.apiserver import FakeApiServer
from tests.backends import Pods
from tests.conftest import EdgeProxy, simple_site
from tests.http1 import Client, fetch

CONVERGE_TIMEOUT = 5.0


async def pod_of(proxy: EdgeProxy, path: str = "/", host: str = "site.example.com") -> str | int:
    resp = await fetch(proxy.http, "GET", path, host=host)
    return json.loads(resp.body)["pod"] if resp.status == 200 else resp.status


async def eventually(check: Any, timeout: float = CONVERGE_TIMEOUT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if await check():
            return
        if loop.time() > deadline:
            raise AssertionError("never converged")
        await asyncio.sleep(0.02)


async def test_routes_follow_the_watch(api: FakeApiServer, pods: Pods, kube_proxy: Any) -> None:
    port = await pods.start("127.0.0.2", "127.0.0.3")
    await api.apply(*simple_site(port, "127.0.0.2"))
    proxy = await kube_proxy()
    assert await pod_of(proxy) == "127.0.0.2"
    await api.apply(k8s.endpoint_slice("web", k8s.ready("127.0.0.3"), port))
    await eventually(lambda: _is(pod_of(proxy), "127.0.0.3"))
    await api.delete("Ingress", "default", "site")
    await eventually(lambda: _is(pod_of(proxy), 404))
    assert {"LIST Ingress", "WATCH Ingress", "LIST EndpointSlice"} <= set(api.requests)


async def _is(awaitable: Any, expected: Any) -> bool:
    return (await awaitable) == expected


async def test_readyz_waits_for_the_first_list_of_every_kind(tmp_path: Path, pods: Pods, kube_proxy: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2")
    late = FakeApiServer()
    await late.start()
    late_port = late.port
    await late.stop()  # nothing listens yet
    (tmp_path / "kubeconfig.yaml").write_text("")
    kubeconfig = tmp_path / "late.yaml"
    late.port = late_port
    kubeconfig.write_text(late.kubeconfig())
    proxy = EdgeProxy(None, tmp_path / "late.log")
    await proxy.start("--kubeconfig", str(kubeconfig), wait_ready=False)
    try:
        # Up (healthz answers) and already failed to reach the API server: not ready, surely.
        await eventually(lambda: _healthz(proxy), timeout=20)
        await eventually(lambda: _logged(proxy, "retrying in"), timeout=20)
        assert (await fetch(proxy.admin, "GET", "/readyz")).status == 503
        await late.apply(*simple_site(port, "127.0.0.2"))
        await late.start(late_port)
        await eventually(lambda: _readyz(proxy), timeout=20)
        assert await pod_of(proxy) == "127.0.0.2"
    finally:
        await proxy.stop()
        await late.stop()


async def _healthz(proxy: EdgeProxy) -> bool:
    try:
        return (await fetch(proxy.admin, "GET", "/healthz")).status == 200
    except OSError:
        return False


async def _logged(proxy: EdgeProxy, text: str) -> bool:
    return text in proxy.log()


async def _readyz(proxy: EdgeProxy) -> bool:
    try:
        return (await fetch(proxy.admin, "GET", "/readyz")).status == 200
    except OSError:
        return False


async def test_api_server_outage_keeps_the_last_table_and_the_watch_resumes(api: FakeApiServer, pods: Pods, kube_proxy: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2", "127.0.0.3")
    await api.apply(*simple_site(port, "127.0.0.2"))
    proxy = await kube_proxy()
    await api.stop()
    for _ in range(10):  # traffic continues on the last table
        assert await pod_of(proxy) == "127.0.0.2"
        await asyncio.sleep(0.05)
    # Changed while the API server was away: seen once it is back.
    await api.apply(k8s.endpoint_slice("web", k8s.ready("127.0.0.3"), port))
    await api.start(api.port)
    await eventually(lambda: _is(pod_of(proxy), "127.0.0.3"), timeout=20)
    assert "retrying in" in proxy.log()


async def test_rewatch_answered_410_lists_again(api: FakeApiServer, pods: Pods, kube_proxy: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2")
    await api.apply(*simple_site(port, "127.0.0.2"))
    await api.apply(k8s.ingress("old", [("old.example.com", [k8s.path("/", "web")])]))
    proxy = await kube_proxy()
    assert await served(proxy) == {"default/old", "default/site"}
    lists_before = api.requests.count("LIST Ingress")
    # The Ingress goes, and the history that would tell is compacted before the watch resumes:
    # the re-watch gets 410 and only a fresh LIST can notice the deletion.
    api.compact_on_delete = True
    await api.delete("Ingress", "default", "old")
    await api.finish_watches()
    await eventually(lambda: _is(served(proxy), {"default/site"}))
    assert api.requests.count("LIST Ingress") > lists_before
    assert "is gone; listing again" in proxy.log()


async def served(proxy: EdgeProxy) -> set[str]:
    routes = json.loads((await fetch(proxy.admin, "GET", "/debug/routes")).body)
    return {r["ingress"] for r in routes["routes"]}


async def test_rewatch_answered_http_410_lists_again(pods: Pods, tmp_path: Path) -> None:
    api = FakeApiServer(gone_as_event=False)  # 410 as the HTTP status of the re-watch
    await api.start()
    port = await pods.start("127.0.0.2")
    await api.apply(*simple_site(port, "127.0.0.2"))
    await api.apply(k8s.ingress("old", [("old.example.com", [k8s.path("/", "web")])]))
    kubeconfig = tmp_path / "kc.yaml"
    kubeconfig.write_text(api.kubeconfig())
    proxy = await EdgeProxy(None, tmp_path / "p.log").start("--kubeconfig", str(kubeconfig))
    try:
        assert await served(proxy) == {"default/old", "default/site"}
        # The deletion's history is compacted before the watch resumes (cleanly, as after
        # timeoutSeconds): only a fresh LIST, which the 410 calls for, can notice it.
        api.compact_on_delete = True
        await api.delete("Ingress", "default", "old")
        await api.finish_watches()
        await eventually(lambda: _is(served(proxy), {"default/site"}))
        log = proxy.log()
        assert "is gone; listing again" in log
        assert "410:" not in log  # not taken for an API error and retried with backoff
    finally:
        await proxy.stop()
        await api.stop()


async def test_bad_objects_are_skipped_and_the_watch_goes_on(api: FakeApiServer, pods: Pods, kube_proxy: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2")
    fqdn = k8s.endpoint_slice("web", k8s.ready("127.0.0.2"), port, suffix="fqdn")
    fqdn["addressType"] = "FQDN"
    await api.apply(*simple_site(port, "127.0.0.2"), fqdn,
                    k8s.ingress("broken", [("broken.example.com", [k8s.path("/", "nope")])]))  # fmt: skip
    proxy = await kube_proxy()
    assert await pod_of(proxy) == "127.0.0.2"
    log = proxy.log()
    assert "addressType 'FQDN'" in log and "Service default/nope not found" in log


async def test_only_referenced_tls_secrets_are_held(api: FakeApiServer, pods: Pods, kube_proxy: Any) -> None:  # fmt: skip
    ca = trustme.CA()
    port = await pods.start("127.0.0.2")

    def secret(name: str) -> dict[str, Any]:
        cert = ca.issue_cert(f"{name}.example.com")
        return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                "metadata": {"name": name, "namespace": "default"},
                "data": {"tls.crt": base64.b64encode(cert.cert_chain_pems[0].bytes()).decode(),
                         "tls.key": base64.b64encode(cert.private_key_pem.bytes()).decode()}}  # fmt: skip

    opaque = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
              "metadata": {"name": "db-password", "namespace": "default"}, "data": {"p": "eA=="}}  # fmt: skip
    await api.apply(*simple_site(port, "127.0.0.2"), secret("used"), secret("unused"), opaque)
    await api.apply(k8s.ingress("tls", [("used.example.com", [k8s.path("/", "web")])],
                                tls=[{"hosts": ["used.example.com"], "secretName": "used"}]))  # fmt: skip
    proxy = await kube_proxy()

    async def held() -> int:
        routes = json.loads((await fetch(proxy.admin, "GET", "/debug/routes")).body)
        return int(routes["objects"].get("Secret", 0))

    await eventually(lambda: _is(held(), 1))
    # A new reference: read by name, then again whenever the metadata watch shows a change.
    await api.apply(k8s.ingress("tls2", [("unused.example.com", [k8s.path("/", "web")])],
                                tls=[{"hosts": ["unused.example.com"], "secretName": "unused"}]))  # fmt: skip
    await eventually(lambda: _is(held(), 2))
    assert all("db-password" not in r for r in api.requests)  # never read
    assert "GET Secret default/used" in api.requests


async def test_ingress_status_is_written_once_by_the_leader(api: FakeApiServer, pods: Pods, kube_proxy: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2")
    await api.apply(*simple_site(port, "127.0.0.2"))
    await kube_proxy("--publish-address", "192.0.2.10")
    await kube_proxy("--publish-address", "192.0.2.10")  # a second replica

    async def written() -> bool:
        ing = api.objects[("Ingress", "default", "site")]
        return (ing.get("status") or {}).get("loadBalancer", {}).get("ingress") == [{"ip": "192.0.2.10"}]  # fmt: skip

    await eventually(written, timeout=10)
    await asyncio.sleep(1.0)
    assert api.requests.count("PATCH Ingress status") == 1  # one writer, and only on change
    lease = api.objects[("Lease", "default", "edgeproxy-status-writer")]
    assert lease["spec"]["holderIdentity"]


async def test_status_lists_every_node_a_ready_edgeproxy_pod_runs_on(
    api: FakeApiServer, pods: Pods, kube_proxy: Any
) -> None:
    """A DaemonSet: clients may be sent to any node, so status names them all (not only the
    status writer's own)."""

    def pod(name: str, node_ip: str, ready: bool) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "default", "labels": {"app": "edgeproxy"}},
                "status": {"hostIP": node_ip,
                           "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}  # fmt: skip

    port = await pods.start("127.0.0.2")
    other = {"apiVersion": "v1", "kind": "Pod", "status": {"hostIP": "192.0.2.99"},
             "metadata": {"name": "unrelated", "namespace": "default", "labels": {"app": "web"}}}  # fmt: skip
    await api.apply(*simple_site(port, "127.0.0.2"), pod("ep-a", "192.0.2.11", True),
                    pod("ep-b", "192.0.2.10", True), pod("ep-c", "192.0.2.12", False), other)  # fmt: skip
    await kube_proxy("--publish-pods", "app=edgeproxy")

    def addresses() -> list[str]:
        ing = api.objects[("Ingress", "default", "site")]
        return [e["ip"] for e in (ing.get("status") or {}).get("loadBalancer", {}).get("ingress", [])]

    await eventually(lambda: _is(_value(addresses()), ["192.0.2.10", "192.0.2.11"]))
    await api.apply(pod("ep-c", "192.0.2.12", True))  # a node whose pod turned ready
    await eventually(lambda: _is(_value(addresses()), ["192.0.2.10", "192.0.2.11", "192.0.2.12"]))


async def _value(value: Any) -> Any:
    return value


async def test_routes_explains_against_the_api_server(api: FakeApiServer, pods: Pods,
                                                      tmp_path: Path) -> None:  # fmt: skip
    import subprocess
    import sys

    from tests.conftest import ROOT

    port = await pods.start("127.0.0.2")
    await api.apply(*simple_site(port, "127.0.0.2"))
    kubeconfig = tmp_path / "kubeconfig.yaml"
    kubeconfig.write_text(api.kubeconfig())
    argv = [sys.executable, "-m", "edgeproxy.cli", "routes", "--kubeconfig", str(kubeconfig),
            "--explain", "http://any.example.com/x", "--json"]  # fmt: skip
    # In a thread: the emulator answers on this loop meanwhile.
    result = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True,
                                     cwd=ROOT, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["route"]["ingress"] == "default/site"
    assert answer["route"]["endpoints"] == [f"127.0.0.2:{port}"]
    assert "LIST Ingress" in api.requests and not any(r.startswith("WATCH") for r in api.requests)


async def test_rolling_update_under_load_fails_no_request(api: FakeApiServer, kube_proxy: Any) -> None:  # fmt: skip
    """maxUnavailable=0: each new pod is added and ready before an old one starts terminating."""
    old = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    new = ["127.0.0.5", "127.0.0.6", "127.0.0.7"]
    servers = {a: Pods() for a in old + new}
    port = await servers[old[0]].start(old[0])
    for address in old[1:] + new:
        await servers[address].start(address, port=port)
    conditions: dict[str, dict[str, bool]] = {a: {"ready": True} for a in old}

    def slice_now() -> dict[str, Any]:
        return k8s.endpoint_slice("web", [(a, dict(c)) for a, c in conditions.items()], port)

    objs = simple_site(port, *old)
    await api.apply(*objs)
    proxy = await kube_proxy()
    failures: list[str] = []
    answered: list[str] = []
    stop = asyncio.Event()

    async def client_loop(method: str) -> None:
        client = await Client.connect(proxy.http)
        while not stop.is_set():
            try:  # POSTs too: a pod that leaves must not cost a non-idempotent request either
                resp = await client.request(method, "/", body=b"order" if method == "POST" else None)
            except (OSError, ConnectionError) as exc:
                failures.append(repr(exc))
                client = await Client.connect(proxy.http)
                continue
            if resp.status != 200:
                failures.append(str(resp.status))
            else:
                answered.append(json.loads(resp.body)["pod"])
            if (resp.header("connection") or "").lower() == "close":  # as any client does
                await client.close()
                client = await Client.connect(proxy.http)
        await client.close()

    clients = [asyncio.create_task(client_loop(m)) for m in ("GET", "POST", "GET", "POST")]
    await asyncio.sleep(0.3)
    for gone, fresh in zip(old, new, strict=True):
        conditions[fresh] = {"ready": False}  # the new pod is scheduled, not ready yet
        await api.apply(slice_now())
        await asyncio.sleep(0.1)
        conditions[fresh] = {"ready": True}
        await api.apply(slice_now())
        await asyncio.sleep(0.2)
        conditions[gone] = {"ready": False, "serving": True, "terminating": True}
        await api.apply(slice_now())
        await asyncio.sleep(0.1)
        conditions[gone] = {"ready": False, "serving": False, "terminating": True}
        await api.apply(slice_now())
        await asyncio.sleep(0.1)
        del conditions[gone]
        await api.apply(slice_now())
        await asyncio.sleep(0.05)
        await servers[gone].stop_address(gone)  # the pod really stops: listener and connections
        await asyncio.sleep(0.2)
    answered.clear()
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*clients)
    assert failures == []
    assert answered and set(answered) <= set(new)
    assert all(servers[a].connections.get(a) for a in old)  # the old pods did serve before
    for server in servers.values():
        await server.close()


async def test_referenced_backend_ca_secret_survives_a_relist(api: FakeApiServer, pods: Pods, kube_proxy: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2")
    ca_secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                 "metadata": {"name": "backend-ca", "namespace": "default"},
                 "data": {"ca.crt": base64.b64encode(trustme.CA().cert_pem.bytes()).decode()}}  # fmt: skip
    objs = simple_site(port, "127.0.0.2")
    objs[1] = k8s.ingress("site", [(None, [k8s.path("/", "web")])], annotations={
        "edgeproxy.io/backend-protocol": "HTTPS", "edgeproxy.io/backend-ca-secret": "backend-ca"})  # fmt: skip
    await api.apply(*objs, ca_secret)
    proxy = await kube_proxy()

    async def held() -> int:
        routes = json.loads((await fetch(proxy.admin, "GET", "/debug/routes")).body)
        return int(routes["objects"].get("Secret", 0))

    await eventually(lambda: _is(held(), 1))  # read by name
    lists = api.requests.count("LIST Secret")
    api.compact(including_current=True)  # every watcher's version is gone: 410, lists again
    await api.end_watches()
    await eventually(lambda: _is_true(api.requests.count("LIST Secret") > lists))
    await eventually(lambda: _is_true(api.requests.count("WATCH Secret") >= 2))
    assert await held() == 1


async def _is_true(value: bool) -> bool:
    return value


KINDS = ("Ingress", "IngressClass", "Service", "EndpointSlice", "Secret")


@pytest.mark.parametrize("workers", [1, 4])
async def test_one_list_and_one_watch_per_kind_whatever_the_workers(
    api: FakeApiServer, pods: Pods, kube_proxy: Any, workers: int
) -> None:
    port = await pods.start("127.0.0.2")
    await api.apply(*simple_site(port, "127.0.0.2"))
    proxy = await kube_proxy("--workers", str(workers))
    # Every worker serves (connections spread over them), and each one got the table.
    clients = [await Client.connect(proxy.http) for _ in range(4 * workers)]
    for client in clients:
        assert (await client.request("GET", "/", host="site.example.com")).status == 200
        await client.close()
    routes = json.loads((await fetch(proxy.admin, "GET", "/debug/routes")).body)
    assert len(routes["workers"]) == workers and all(w["serving"] for w in routes["workers"])
    await api.apply(k8s.endpoint_slice("web", k8s.ready("127.0.0.2", "127.0.0.3"), port))
    await eventually(lambda: _is_true(api.watch_count >= len(KINDS)))
    for kind in KINDS:
        assert api.requests.count(f"LIST {kind}") == 1, (kind, api.requests)
        assert api.requests.count(f"WATCH {kind}") == 1, (kind, api.requests)


async def test_lists_are_paginated(api: FakeApiServer, pods: Pods, kube_proxy: Any) -> None:
    port = await pods.start("127.0.0.2")
    objs = simple_site(port, "127.0.0.2")
    # 1,200 Services: three pages of 500; the one that routes is on the last page.
    await api.apply(*[k8s.service(f"filler-{i:04}", 80) for i in range(1200)])
    await api.apply(*objs)
    proxy = await kube_proxy()
    assert await pod_of(proxy) == "127.0.0.2"
    assert api.requests.count("LIST Service") == 3
    routes = json.loads((await fetch(proxy.admin, "GET", "/debug/routes")).body)
    assert routes["objects"]["Service"] == 1201


async def test_watches_that_end_at_once_are_resumed_with_backoff_not_relisted(
    api: FakeApiServer, pods: Pods, kube_proxy: Any
) -> None:
    port = await pods.start("127.0.0.2", "127.0.0.3")
    await api.apply(*simple_site(port, "127.0.0.2"))
    proxy = await kube_proxy()
    api.watch_lifetime = 0.0  # from now on every watch ends as soon as it starts
    await api.finish_watches()
    await eventually(lambda: _is_true(api.watch_count >= 3 * len(KINDS)), timeout=10)
    before, loop = api.watch_count, asyncio.get_running_loop()
    started = loop.time()
    await eventually(lambda: _is_true(api.watch_count >= before + 2 * len(KINDS)), timeout=20)
    rate = (api.watch_count - before) / (loop.time() - started)
    assert rate < 5 * len(KINDS), rate  # backing off: not thousands per second
    assert all(api.requests.count(f"LIST {kind}") == 1 for kind in KINDS)  # resumed, not listed
    # The resumed watches still deliver.
    api.watch_lifetime = None
    await api.apply(k8s.endpoint_slice("web", k8s.ready("127.0.0.3"), port))
    await eventually(lambda: _is(pod_of(proxy), "127.0.0.3"), timeout=20)


async def test_a_dropped_watch_connection_resumes_from_its_version(
    api: FakeApiServer, pods: Pods, kube_proxy: Any
) -> None:
    port = await pods.start("127.0.0.2", "127.0.0.3")
    await api.apply(*simple_site(port, "127.0.0.2"))
    proxy = await kube_proxy()
    watches = api.watch_count
    await api.end_watches()  # connections cut, as a load balancer in front of the API would
    await api.apply(k8s.endpoint_slice("web", k8s.ready("127.0.0.3"), port))
    await eventually(lambda: _is(pod_of(proxy), "127.0.0.3"), timeout=20)
    assert api.watch_count > watches
    assert all(api.requests.count(f"LIST {kind}") == 1 for kind in KINDS)


async def test_ready_only_once_the_referenced_certificate_is_loaded(
    api: FakeApiServer, pods: Pods, kube_proxy: Any
) -> None:
    import ssl

    ca = trustme.CA()
    port = await pods.start("127.0.0.2")
    cert = ca.issue_cert("site.example.com")
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
              "metadata": {"name": "site-tls", "namespace": "default"},
              "data": {"tls.crt": base64.b64encode(cert.cert_chain_pems[0].bytes()).decode(),
                       "tls.key": base64.b64encode(cert.private_key_pem.bytes()).decode()}}  # fmt: skip
    objs = simple_site(port, "127.0.0.2")
    objs[1] = k8s.ingress("site", [("site.example.com", [k8s.path("/", "web")])],
                          tls=[{"hosts": ["site.example.com"], "secretName": "site-tls"}])
    await api.apply(*objs, secret)
    api.get_delay = 0.5  # the Secret is read slowly: ready must wait for it
    proxy = await kube_proxy(https=True)
    api.get_delay = 0.0
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(ctx)  # the self-signed default would fail verification

    def first_request() -> bytes:  # a plain blocking TLS client, in a thread (as test_tls)
        import socket

        raw = socket.create_connection(("127.0.0.1", proxy.https), timeout=5)
        with ctx.wrap_socket(raw, server_hostname="site.example.com") as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: site.example.com\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            return data

    assert (await asyncio.to_thread(first_request)).startswith(b"HTTP/1.1 200")
    assert "GET Secret default/site-tls" in api.requests

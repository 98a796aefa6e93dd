"""edgeproxy's own life as a pod: several workers, a worker's death, pod-wide health, SIGTERM,
and a new edgeproxy taking over the same ports. Real processes, real sockets."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

from tests import k8s
from tests.backends import Pods
from tests.conftest import EdgeProxy, eventually, simple_site
from tests.http1 import Client, fetch
from tests.traffic import Traffic


async def routes_of(proxy: EdgeProxy) -> dict[str, Any]:
    return json.loads((await fetch(proxy.admin, "GET", "/debug/routes")).body)  # type: ignore[no-any-return]


async def ready_status(proxy: EdgeProxy) -> int:
    try:
        return (await fetch(proxy.admin, "GET", "/readyz")).status
    except OSError:
        return 0


def worker_of(pods: Pods, address: str) -> str:
    """The worker that sent the last request `address` received (its request-id prefix)."""
    msg = [m for a, m in pods.requests if a == address][-1]
    return (msg.header("x-request-id") or "")[:16]


async def test_a_killed_worker_is_replaced_and_only_its_requests_in_flight_fail(
    pods: Pods, proxy_factory: Any
) -> None:
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"), "--workers", "2")
    traffic = Traffic(proxy.http, clients=8, path="/slow/20").start()
    await traffic.answered(40)
    victim = (await routes_of(proxy))["workers"][0]
    os.kill(victim["pid"], signal.SIGKILL)

    async def replaced() -> bool:
        workers = (await routes_of(proxy))["workers"]
        return all(w["serving"] for w in workers) and victim["pid"] not in [w["pid"] for w in workers]

    await eventually(replaced, timeout=10, what="a replacement worker serving")
    await traffic.answered(80)  # both workers serve again, the survivor throughout
    await traffic.stop()
    # Only what the dead worker had in flight is lost: at most one request per client
    # connection it held (each client has one request outstanding at a time).
    assert len(traffic.failures) <= 8, traffic.failures
    log = proxy.log()
    assert re.search(rf"worker 0 \(pid {victim['pid']}\) exited with status -9; starting a replacement", log)
    assert "replacement in 1 s" not in log  # a first death is replaced at once, no backoff
    assert "worker 0 (pid" in log and "replaced and serving" in log


async def test_consecutive_failures_are_counted_across_workers(pods: Pods, proxy_factory: Any) -> None:
    port = await pods.start("127.0.0.2", "127.0.0.3")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2", "127.0.0.3"), "--workers", "2",
                                "--outlier-consecutive-failures", "4",
                                "--outlier-base-ejection-time", "30",
                                "--outlier-max-ejection-percent", "50")  # fmt: skip
    # One client connection on each worker (told apart by their request-id prefixes).
    by_worker: dict[str, Client] = {}
    spare: list[Client] = []
    for _ in range(40):
        client = await Client.connect(proxy.http)
        assert (await client.request("GET", "/")).status == 200
        worker = worker_of(pods, pods.requests[-1][0])
        if worker in by_worker:
            spare.append(client)
        else:
            by_worker[worker] = client
        if len(by_worker) == 2:
            break
    assert len(by_worker) == 2, "the kernel never spread 40 connections over two workers"
    pods.fail_with["127.0.0.2"] = 503
    failures: dict[str, int] = dict.fromkeys(by_worker, 0)
    for _ in range(40):
        if sum(failures.values()) == 4:
            break
        for worker, client in by_worker.items():
            if (await client.request("GET", "/")).status == 503:
                failures[worker] += 1
            if sum(failures.values()) == 4:
                break
    # Four failures in all, each worker short of four on its own: only a pod-wide count ejects.
    assert sum(failures.values()) == 4 and all(0 < n < 4 for n in failures.values()), failures

    async def ejected() -> bool:
        states = {e["endpoint"]: e for e in (await routes_of(proxy))["routes"][0]["endpoints"]}
        return states[f"127.0.0.2:{port}"]["in_rotation"] is False

    await eventually(ejected, timeout=5, what="the ejection")
    hits = pods.hits("127.0.0.2")
    for client in by_worker.values():  # the verdict applies in every worker
        for _ in range(6):
            assert (await client.request("GET", "/")).status == 200
    assert pods.hits("127.0.0.2") == hits
    assert proxy.log().count(f"127.0.0.2:{port} ejected") == 1  # decided once, for the pod
    from tests.test_observability import scrape, value

    metrics = await scrape(proxy.admin)
    web = {"namespace": "default", "service": "web"}
    assert value(metrics, "edgeproxy_endpoint_ejections_total", **web) == 1
    assert value(metrics, "edgeproxy_endpoints_ejected", **web) == 1
    assert value(metrics, "edgeproxy_endpoints_in_rotation", **web) == 1
    for client in [*by_worker.values(), *spare]:
        await client.close()


async def test_sigterm_keeps_serving_through_the_delay_then_drains_and_exits_0(
    pods: Pods, proxy_factory: Any
) -> None:
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"), "--workers", "2",
                                "--shutdown-delay", "1.5", "--drain-timeout", "5")  # fmt: skip
    traffic = Traffic(proxy.http, clients=4, new_connections=2).start()
    await traffic.answered(50)
    assert proxy.proc is not None
    proxy.proc.send_signal(signal.SIGTERM)
    await eventually(lambda: _equal(ready_status(proxy), 503), timeout=2, what="/readyz 503")
    answered = traffic.ok
    await eventually(lambda: _true("draining: accepting stops" in proxy.log()), timeout=10,
                     what="the end of the shutdown delay")  # fmt: skip
    drain_began = time.time()
    await traffic.stop()
    assert traffic.ok > answered  # served during the delay, new connections included
    assert traffic.failed_before(drain_began - 0.2) == [], traffic.failures
    await eventually(lambda: _true(proxy.proc.poll() is not None), timeout=10, what="the exit")  # type: ignore[union-attr]
    assert proxy.proc.returncode == 0


async def test_requests_in_flight_finish_during_the_drain(pods: Pods, proxy_factory: Any) -> None:
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"), "--workers", "1",
                                "--shutdown-delay", "0", "--drain-timeout", "10")  # fmt: skip
    client = await Client.connect(proxy.http)
    pending = asyncio.create_task(client.request("GET", "/slow/1500"))
    await eventually(lambda: _true(len(pods.requests) == 1), what="the request at the pod")
    assert proxy.proc is not None
    proxy.proc.send_signal(signal.SIGTERM)
    resp = await pending
    assert resp.status == 200 and resp.header("connection") == "close"
    await eventually(lambda: _true(proxy.proc.poll() is not None), timeout=10, what="the exit")  # type: ignore[union-attr]
    assert proxy.proc.returncode == 0
    await client.close()


async def test_a_second_signal_cuts_the_delay_short(pods: Pods, proxy_factory: Any) -> None:
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"), "--shutdown-delay", "600")
    assert proxy.proc is not None
    proxy.proc.send_signal(signal.SIGTERM)
    await eventually(lambda: _equal(ready_status(proxy), 503), timeout=2, what="/readyz 503")
    proxy.proc.send_signal(signal.SIGINT)
    await eventually(lambda: _true(proxy.proc.poll() is not None), timeout=10, what="the exit")  # type: ignore[union-attr]
    assert proxy.proc.returncode == 0
    assert "the shutdown delay is cut short" in proxy.log()


async def test_a_new_edgeproxy_takes_over_the_ports_without_a_failed_request(
    pods: Pods, manifests: Path, tmp_path: Path
) -> None:
    port = await pods.start("127.0.0.2")
    k8s.write(manifests, simple_site(port, "127.0.0.2"))
    handover = str(tmp_path / "run" / "handover.sock")
    old = EdgeProxy(manifests, tmp_path / "old.log")
    new = EdgeProxy(manifests, tmp_path / "new.log")
    new.http, new.admin = old.http, old.admin  # the same ports, as on a host-network node
    common = ("--workers", "2", "--handover-socket", handover, "--drain-timeout", "5")
    try:
        await old.start(*common, "--shutdown-delay", "0.5")
        traffic = Traffic(old.http, clients=6, new_connections=3).start()
        await traffic.answered(50)
        await new.start(*common, wait_ready=False)
        await eventually(lambda: _true("every worker serves" in new.log()), timeout=15,
                         what="the new edgeproxy serving")  # fmt: skip
        assert "took over 2 listening sockets" in new.log()
        await traffic.answered(50)
        assert old.proc is not None
        old.proc.send_signal(signal.SIGTERM)
        await eventually(lambda: _true(old.proc.poll() is not None), timeout=15, what="the old one's exit")  # type: ignore[union-attr]
        assert old.proc.returncode == 0
        await traffic.answered(100)  # the new one serves alone now
        await traffic.stop()
        assert traffic.failures == []
    finally:
        await old.stop()
        await new.stop()


async def _equal(value: Any, expected: Any) -> bool:
    return await value == expected


async def _true(value: bool) -> bool:
    return value

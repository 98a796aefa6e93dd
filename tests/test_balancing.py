"""Balancers, passive health ejection, panic mode and retries."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

from edgeproxy.balancing import BUILTIN, ConsistentHash, LeastConnections, RoundRobin
from edgeproxy.config import OutlierSettings
from edgeproxy.health import EndpointRegistry
from edgeproxy.hosts import EndpointState
from edgeproxy.proxy.binding import ClusterBinding
from edgeproxy.routing import Cluster
from tests import k8s
from tests.backends import Pods
from tests.conftest import ROOT, eventually, simple_site
from tests.http1 import Client, fetch


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Req:
    """What a balancer may read of a request."""

    def __init__(self, client_ip: str = "10.0.0.1", path: str = "/", headers: dict[bytes, bytes] | None = None) -> None:  # fmt: skip
        self.client_ip = client_ip
        self.path = path
        self.headers = headers or {}

    def header(self, name: bytes) -> bytes | None:
        return self.headers.get(name)


def hosts(n: int) -> list[EndpointState]:
    return [EndpointState((f"10.1.{i // 250}.{i % 250}", 8080)) for i in range(n)]


def cluster_of(states: list[EndpointState], outlier: OutlierSettings | None = None) -> ClusterBinding:  # fmt: skip
    c = Cluster("ns/svc:80", tuple(s.key for s in states), outlier=outlier)
    return ClusterBinding(c, c.keys, tuple(states), dict(BUILTIN), None)


# -- the algorithms, on their own -------------------------------------------------------

def test_round_robin_spreads_evenly() -> None:
    states = hosts(7)
    rr = RoundRobin(states, {})
    counts = Counter(rr.pick(Req()).key for _ in range(700))  # type: ignore[union-attr]
    assert set(counts.values()) == {100}


def test_round_robin_workers_start_at_different_offsets() -> None:
    states = hosts(50)
    starts = {RoundRobin(states, {}).pick(Req()).key for _ in range(20)}  # type: ignore[union-attr]
    assert len(starts) > 1


def test_least_conn_picks_fewest_in_flight_with_random_ties() -> None:
    states = hosts(4)
    lc = LeastConnections(states, {})
    for s, n in zip(states, (3, 1, 1, 5), strict=True):
        s.in_flight = n
    picks = Counter(lc.pick(Req()).key for _ in range(400))  # type: ignore[union-attr]
    assert set(picks) == {states[1].key, states[2].key}
    assert min(picks.values()) > 120  # both tied hosts get a fair share


def test_least_conn_large_sets_use_two_choices() -> None:
    states = hosts(1000)
    for i, s in enumerate(states):
        s.in_flight = 0 if i < 500 else 10
    lc = LeastConnections(states, {})
    picks = [lc.pick(Req()) for _ in range(2000)]
    assert sum(1 for p in picks if p is not None and p.in_flight == 0) > 1400  # ~75% expected


def test_hash_keeps_a_key_on_its_endpoint() -> None:
    ch = ConsistentHash(hosts(10), {"hash_by": "header:x-user"})
    first = ch.pick(Req(headers={b"x-user": b"alice"}))
    assert all(ch.pick(Req(headers={b"x-user": b"alice"})) is first for _ in range(50))


def test_hash_moves_only_the_keys_of_a_leaving_endpoint() -> None:
    states = hosts(10)
    before = ConsistentHash(states, {"hash_by": "path"})
    after = ConsistentHash(states[:4] + states[5:], {"hash_by": "path"})
    keys = [f"/item/{i}" for i in range(10_000)]
    moved = sum(1 for k in keys if before.pick(Req(path=k)) is not after.pick(Req(path=k)))
    owned_by_leaver = sum(1 for k in keys if before.pick(Req(path=k)) is states[4])
    assert moved == owned_by_leaver  # nobody else's keys move
    assert moved / len(keys) <= 1 / 10 + 0.05


def test_hash_by_cookie_and_client_ip() -> None:
    ch = ConsistentHash(hosts(10), {"hash_by": "cookie:session"})
    a = ch.pick(Req(headers={b"cookie": b"theme=dark; session=abc"}))
    b = ch.pick(Req(client_ip="10.9.9.9", headers={b"cookie": b"session=abc"}))
    assert a is b
    by_ip = ConsistentHash(hosts(10), {})
    assert by_ip.pick(Req(client_ip="192.0.2.7")) is by_ip.pick(Req(client_ip="192.0.2.7"))


# -- outlier detection, on an injected clock ------------------------------------------

def test_ejection_time_grows_with_each_ejection_up_to_the_cap() -> None:
    clock = FakeClock()
    registry = EndpointRegistry(clock, OutlierSettings(max_ejection_percent=100))
    states = [registry.get(k.key) for k in hosts(2)]
    cluster = cluster_of(states)
    bad = states[0]
    durations = []
    for _ in range(12):
        for _ in range(5):
            registry.record_failure(bad, cluster.hosts, cluster.outlier)
        durations.append(round(bad.ejected_until - clock.now))
        clock.now = bad.ejected_until + 0.001
        registry.refresh_ejections()
        assert bad.ejected_until == 0.0  # returned to rotation after its time
    assert durations[:4] == [30, 60, 90, 120]
    assert durations[-1] == 300


def test_fewer_than_consecutive_failures_do_not_eject() -> None:
    registry = EndpointRegistry(FakeClock(), OutlierSettings(max_ejection_percent=100))
    states = [registry.get(k.key) for k in hosts(2)]
    cluster = cluster_of(states)
    for _ in range(4):
        registry.record_failure(states[0], cluster.hosts, cluster.outlier)
    registry.record_success(states[0])
    for _ in range(4):
        registry.record_failure(states[0], cluster.hosts, cluster.outlier)
    assert states[0].ejected_until == 0.0


def test_ejection_is_capped_by_max_ejection_percent() -> None:
    registry = EndpointRegistry(FakeClock(), OutlierSettings())  # 10%
    states = [registry.get(k.key) for k in hosts(10)]
    cluster = cluster_of(states)
    for bad in states[:3]:
        for _ in range(5):
            registry.record_failure(bad, cluster.hosts, cluster.outlier)
    assert sum(1 for s in states if s.ejected_until) == 1  # 10% of 10, at least one


def test_panic_mode_balances_over_all_when_too_few_are_healthy() -> None:
    clock = FakeClock()
    states = hosts(3)
    cluster = cluster_of(states)
    states[0].ejected_until = states[1].ejected_until = clock.now + 30
    picks = {cluster.pick(Req(), clock.now, 2, 1, 50.0, None).key for _ in range(30)}  # type: ignore[union-attr]
    assert len(picks) == 3  # 1 of 3 healthy < 50%: everyone takes traffic
    states[1].ejected_until = 0.0
    picks = {cluster.pick(Req(), clock.now, 1, 2, 50.0, None).key for _ in range(30)}  # type: ignore[union-attr]
    assert picks == {states[1].key, states[2].key}


# -- through the proxy --------------------------------------------------------------

async def test_failing_endpoint_is_ejected_and_returns_after_its_time(pods: Pods, proxy_factory: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2", "127.0.0.3")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2", "127.0.0.3"),
                                "--outlier-consecutive-failures", "3",
                                "--outlier-base-ejection-time", "1",
                                "--outlier-max-ejection-percent", "50")  # fmt: skip
    pods.fail_with["127.0.0.2"] = 503
    client = await Client.connect(proxy.http)
    # Round robin over two: six requests give 127.0.0.2 its three strikes.
    statuses = [(await client.request("GET", "/")).status for _ in range(6)]
    assert statuses.count(503) == 3
    routes_url = "/debug/routes"

    async def ejected() -> bool:  # workers report, the supervisor decides, workers apply
        routes = json.loads((await fetch(proxy.admin, "GET", routes_url)).body)
        states = {e["endpoint"]: e for e in routes["routes"][0]["endpoints"]}
        return states[f"127.0.0.2:{port}"]["in_rotation"] is False

    await eventually(ejected, timeout=5, what="the ejection")
    hits_while_ejected = pods.hits("127.0.0.2")
    for _ in range(10):
        assert (await client.request("GET", "/")).status == 200
    assert pods.hits("127.0.0.2") == hits_while_ejected
    assert f"127.0.0.2:{port} ejected" in proxy.log()
    routes = json.loads((await fetch(proxy.admin, "GET", "/debug/routes")).body)
    states = {e["endpoint"]: e for e in routes["routes"][0]["endpoints"]}
    assert states[f"127.0.0.2:{port}"]["in_rotation"] is False
    del pods.fail_with["127.0.0.2"]  # it recovers

    async def back_in_rotation() -> bool:
        routes = json.loads((await fetch(proxy.admin, "GET", "/debug/routes")).body)
        states = {e["endpoint"]: e for e in routes["routes"][0]["endpoints"]}
        return bool(states[f"127.0.0.2:{port}"]["in_rotation"])

    await eventually(back_in_rotation, timeout=10, what="the ejection's end")
    for _ in range(40):
        assert (await client.request("GET", "/")).status == 200
        if pods.hits("127.0.0.2") > hits_while_ejected:
            break
        await asyncio.sleep(0.05)
    assert pods.hits("127.0.0.2") > hits_while_ejected

    async def logged() -> bool:  # the supervisor's sweep logs it; the end itself is by time
        return "returns to rotation" in proxy.log()

    await eventually(logged, timeout=5, what="the return logged")
    await client.close()


async def test_reset_request_is_retried_once_on_a_different_endpoint(pods: Pods, proxy_factory: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2", "127.0.0.3")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2", "127.0.0.3"),
                                "--outlier-consecutive-failures", "1000")  # no ejection here
    pods.fail_with["127.0.0.2"] = 0  # resets every request
    for _ in range(6):
        resp = await fetch(proxy.http, "GET", "/")
        assert resp.status == 200 and json.loads(resp.body)["pod"] == "127.0.0.3"
    # Both endpoints reset: one retry, then 502; never the same endpoint twice.
    pods.fail_with["127.0.0.3"] = 0
    before = len(pods.requests)
    assert (await fetch(proxy.http, "GET", "/")).status == 502
    tried = [a for a, _ in pods.requests[before:]]
    assert sorted(tried) == ["127.0.0.2", "127.0.0.3"]


async def test_least_conn_sends_fewer_requests_to_the_slow_backend(pods: Pods, proxy_factory: Any) -> None:  # fmt: skip
    slow, fast = Pods(), Pods()
    port = await slow.start("127.0.0.2")
    await fast.start("127.0.0.3", port=port)
    objs = simple_site(port, "127.0.0.2", "127.0.0.3")
    objs[1] = k8s.ingress("site", [(None, [k8s.path("/", "web")])],
                          annotations={"edgeproxy.io/load-balance": "least_conn"})  # fmt: skip
    slow.fail_with = {}
    proxy = await proxy_factory(objs)

    async def worker(target: str) -> None:
        client = await Client.connect(proxy.http)
        for _ in range(15):
            await client.request("GET", target)
        await client.close()

    # The same path is slow on .2 only: the slow pod answers /slow/..., the fast one too,
    # so route by pod instead: the slow pod sleeps on every request.
    slow_orig = slow._respond

    async def slow_respond(*args: Any) -> bool:
        await asyncio.sleep(0.05)
        return await slow_orig(*args)

    slow._respond = slow_respond  # type: ignore[method-assign]
    await asyncio.gather(*(worker("/") for _ in range(6)))
    assert slow.hits("127.0.0.2") < fast.hits("127.0.0.3") / 2
    await slow.close()
    await fast.close()


async def test_hash_annotation_keeps_a_client_on_one_pod(pods: Pods, proxy_factory: Any) -> None:
    port = await pods.start("127.0.0.2", "127.0.0.3", "127.0.0.4")
    objs = simple_site(port, "127.0.0.2", "127.0.0.3", "127.0.0.4")
    objs[1] = k8s.ingress("site", [(None, [k8s.path("/", "web")])], annotations={
        "edgeproxy.io/load-balance": "hash", "edgeproxy.io/hash-by": "header:X-User"})  # fmt: skip
    proxy = await proxy_factory(objs)
    for user in ("alice", "bob", "carol", "dave"):
        pods_seen = {json.loads((await fetch(proxy.http, "GET", "/", headers=[("X-User", user)])).body)["pod"]  # fmt: skip
                     for _ in range(5)}
        assert len(pods_seen) == 1


async def test_balancer_plugin_registered_by_entry_point_is_selected_by_annotation(pods: Pods, proxy_factory: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2", "127.0.0.3")
    objs = simple_site(port, "127.0.0.2", "127.0.0.3")
    objs[1] = k8s.ingress("site", [(None, [k8s.path("/", "web")])],
                          annotations={"edgeproxy.io/load-balance": "test-last"})  # fmt: skip
    proxy = await proxy_factory(objs, pythonpath=str(ROOT / "tests" / "plugins"))
    for _ in range(5):
        assert json.loads((await fetch(proxy.http, "GET", "/")).body)["pod"] == "127.0.0.3"


async def test_unknown_balancer_logs_once_and_uses_the_default(pods: Pods, proxy_factory: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2", "127.0.0.3")
    objs = simple_site(port, "127.0.0.2", "127.0.0.3")
    objs[1] = k8s.ingress("site", [(None, [k8s.path("/", "web")])],
                          annotations={"edgeproxy.io/load-balance": "no-such-thing"})  # fmt: skip
    proxy = await proxy_factory(objs)
    pods_seen = {json.loads((await fetch(proxy.http, "GET", "/")).body)["pod"] for _ in range(4)}
    assert pods_seen == {"127.0.0.2", "127.0.0.3"}
    assert proxy.log().count("unknown load-balance 'no-such-thing'") == 1


async def test_endpoint_state_survives_a_table_rebuild(pods: Pods, proxy_factory: Any, manifests: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2", "127.0.0.3")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"))
    client = await Client.connect(proxy.http)
    await client.request("GET", "/")
    k8s.write(manifests, simple_site(port, "127.0.0.2", "127.0.0.3"))  # a rebuild; .2 stays
    for _ in range(50):
        await asyncio.sleep(0.05)
        routes = json.loads((await fetch(proxy.admin, "GET", "/debug/routes")).body)
        if len(routes["routes"][0]["endpoints"]) == 2:
            break
    for _ in range(4):
        await client.request("GET", "/")
    assert pods.connections["127.0.0.2"] == 1  # its pooled connection outlived the rebuild
    await client.close()

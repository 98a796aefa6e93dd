"""RouteCompiler.update must give, after any sequence of changes, the table a fresh build
gives; and tablesync's deltas must bring a worker's table to that same table.

Random objects from a small universe (so that Ingresses collide on hosts and paths, share
Services, lose and regain them), seeded: each seed is one reproducible sequence.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from edgeproxy.compile import CompileResult, RouteCompiler, compile_routes
from edgeproxy.objects import ObjectStore
from edgeproxy.routing import Cluster, HostRoutes, Route, RouteTable
from edgeproxy.tablesync import TableReceiver, TableSender
from tests import k8s

HOSTS = ["a.example", "b.example", "*.example", None, "Bad_Host"]
PATHS = ["/", "/a", "/a/", "/a/b", "/b", "/a(.*)"]
TYPES = ["Prefix", "Exact", "ImplementationSpecific"]
SERVICES = ["s0", "s1", "s2", "s3"]
INGRESSES = [f"i{n}" for n in range(7)]
TIMES = ["2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z", None]


def random_ingress(rng: random.Random, name: str) -> dict[str, Any]:
    rules = []
    for _ in range(rng.randrange(0, 3)):
        paths = [k8s.path(rng.choice(PATHS), rng.choice(SERVICES), rng.choice(TYPES),
                          rng.choice([80, 80, 81, "http"]))
                 for _ in range(rng.randrange(1, 4))]  # fmt: skip
        rules.append((rng.choice(HOSTS), paths))
    annotations: dict[str, str] = {}
    if rng.random() < 0.2:
        annotations["edgeproxy.io/load-balance"] = rng.choice(["least_request", "nope", "round_robin"])
    if rng.random() < 0.15:
        annotations["edgeproxy.io/backend-protocol"] = "HTTPS"
        annotations["edgeproxy.io/backend-ca-secret"] = "ca"
    if rng.random() < 0.1:
        annotations["edgeproxy.io/outlier-consecutive-failures"] = rng.choice(["3", "x"])
    tls = None
    if rng.random() < 0.3:
        tls = [{"hosts": [h for h in ("a.example", "b.example") if rng.random() < 0.6],
                "secretName": rng.choice(["cert", "other", ""])}]  # fmt: skip
    return k8s.ingress(
        name, rules, default_backend=rng.choice(SERVICES) if rng.random() < 0.2 else None,
        cls=rng.choice(["edgeproxy", "edgeproxy", "other", None]),
        annotations=annotations or None, created=rng.choice(TIMES), tls=tls,
    )  # fmt: skip


def random_service(rng: random.Random, name: str) -> dict[str, Any]:
    if rng.random() < 0.15:
        return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
                "spec": {"type": "ExternalName", "externalName": rng.choice(["x.test", "y.test"]),
                         "ports": [{"name": "http", "port": 80,
                                    "targetPort": rng.choice([8000, 9000])}]}}  # fmt: skip
    return k8s.service(name, port=rng.choice([80, 80, 81]), port_name=rng.choice(["http", "web"]))


def random_slice(rng: random.Random, service: str) -> dict[str, Any]:
    addresses = [f"10.0.{SERVICES.index(service)}.{n}" for n in range(1, 5) if rng.random() < 0.5]
    endpoints = [(a, rng.choice([{"ready": True}, {"ready": False, "serving": True,
                                                    "terminating": True}, None]))
                 for a in addresses]  # fmt: skip
    return k8s.endpoint_slice(service, endpoints, 8000, port_name=rng.choice(["http", "http", "web"]))


def change(rng: random.Random, store: ObjectStore) -> None:
    """One object appears, changes or goes."""
    roll = rng.random()
    if roll < 0.5:
        obj = random_ingress(rng, rng.choice(INGRESSES))
    elif roll < 0.7:
        obj = random_service(rng, rng.choice(SERVICES))
    elif roll < 0.9:
        obj = random_slice(rng, rng.choice(SERVICES))
    elif roll < 0.95:
        obj = k8s.ingress_class(default=rng.random() < 0.5)
    else:
        obj = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
               "metadata": {"name": rng.choice(["cert", "ca"]), "namespace": "default"},
               "data": {"n": str(rng.random())}}  # fmt: skip
    if rng.random() < 0.2:
        store.delete("test", obj)
    else:
        store.upsert("test", obj)


def route_form(route: Route, keys_of: Any) -> tuple[Any, ...]:
    return (route.ingress, route.host, route.path, route.path_type, route.ssl_redirect,
            route.hsts, route.cluster.config(), keys_of(route.cluster))  # fmt: skip


def group_form(group: HostRoutes, keys_of: Any) -> tuple[Any, ...]:
    return (sorted((p, route_form(r, keys_of)) for p, r in group.exact.items()),
            sorted((p, route_form(r, keys_of)) for p, r in group.prefix.items()))  # fmt: skip


def table_form(table: RouteTable, keys_of: Any) -> tuple[Any, ...]:
    """What a request sees of a table: every host group's routes, with their endpoints."""
    return (
        sorted((h, group_form(g, keys_of)) for h, g in table.exact_hosts.items()),
        sorted((h, group_form(g, keys_of)) for h, g in table.wildcard_hosts.items()),
        table.any_host and group_form(table.any_host, keys_of),
        table.default_route and route_form(table.default_route, keys_of),
        table.tls_hosts,
    )


def result_form(result: CompileResult, keys_of: Any) -> tuple[Any, ...]:
    return (table_form(result.table, keys_of), result.tls, result.served_ingresses,
            sorted(result.diagnostics))  # fmt: skip


class Incremental:
    """The supervisor's path in miniature: store changes -> update or refresh -> sender ->
    a worker's receiver."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.compiler: RouteCompiler | None = None
        self.sender = TableSender()
        self.receiver = TableReceiver()
        self.result: CompileResult | None = None
        self.worker_keys: dict[Cluster, tuple[Any, ...]] = {}  # as the worker binds them

    def step(self) -> None:
        kinds, services, keys = self.store.take_changes()
        if self.compiler is None or "IngressClass" in kinds:
            self.compiler = RouteCompiler(self.store)
            self.result = self.compiler.build(self.store.generation)
            self._send(self.sender.update(self.result.table, None, self.result.endpoints))
            return
        if services:
            changes = self.compiler.refresh_endpoints(services, [])
            message = self.sender.refresh(changes, self.store.generation)
            for cluster, keys_now in self.receiver.apply_endpoints(message):
                self.worker_keys[cluster] = keys_now
        if kinds - {"EndpointSlice"}:
            self.result = self.compiler.update(keys, self.store.generation)
            self._send(self.sender.update(self.result.table, self.result.delta,
                                          self.result.endpoints))  # fmt: skip

    def _send(self, message: tuple[Any, ...]) -> None:
        if self.receiver.table is None:  # as a worker starts: everything once
            message = self.sender.full()
        if message[0] != "table":
            return
        _, defined, gone, changed = self.receiver.apply_table(message)
        for cluster in gone:
            self.worker_keys.pop(cluster, None)
        for cluster in defined:
            self.worker_keys[cluster] = cluster.keys
        for cluster, keys in changed:
            self.worker_keys[cluster] = keys


@pytest.mark.parametrize("seed", range(30))
def test_updates_give_the_table_a_fresh_build_gives(seed: int) -> None:
    rng = random.Random(seed)
    store = ObjectStore()
    store.replace("test", [k8s.ingress_class()] + [random_service(rng, s) for s in SERVICES]
                  + [random_slice(rng, s) for s in SERVICES]
                  + [random_ingress(rng, i) for i in INGRESSES[:4]])  # fmt: skip
    path = Incremental(store)
    path.step()
    for step in range(80):
        change(rng, store)
        path.step()
        assert path.compiler is not None and path.result is not None
        full = compile_routes(store.snapshot())
        endpoints = path.compiler.endpoints
        incremental = result_form(path.result, lambda c, e=endpoints: e.get(c, c.keys))
        assert incremental == result_form(full, lambda c: c.keys), f"seed {seed}, step {step}"
        # The clusters it counts as routed are exactly the table's.
        assert set(path.compiler.live) == set(path.result.table.clusters())
        # A worker fed only the deltas holds the same table, with the same endpoints.
        assert path.receiver.table is not None
        worker = table_form(path.receiver.table, lambda c: path.worker_keys[c])
        assert worker[:4] == table_form(full.table, lambda c: c.keys)[:4], f"seed {seed}, step {step}"
        # A worker that starts now gets the same from full().
        fresh = TableReceiver()
        fresh.apply_table(path.sender.full())
        assert fresh.table is not None
        assert table_form(fresh.table, lambda c: c.keys)[:4] == worker[:4]


def test_an_ingress_update_touches_only_its_hosts_and_keeps_the_other_clusters() -> None:
    store = ObjectStore()
    objs = [k8s.ingress_class(), k8s.service("a"), k8s.service("b"),
            k8s.endpoint_slice("a", k8s.ready("10.0.0.1"), 8000),
            k8s.endpoint_slice("b", k8s.ready("10.0.0.2"), 8000),
            k8s.ingress("one", [("one.example", [k8s.path("/", "a")])]),
            k8s.ingress("two", [("two.example", [k8s.path("/", "b")])])]  # fmt: skip
    store.replace("test", objs)
    store.take_changes()
    compiler = RouteCompiler(store)
    first = compiler.build(store.generation)
    store.upsert("test", k8s.ingress("one", [("one.example", [k8s.path("/", "a"), k8s.path("/v2", "b")])]))
    _, _, keys = store.take_changes()
    second = compiler.update(keys, store.generation)
    assert second.delta is not None and second.delta.hosts == {"one.example"}
    assert second.delta.added == second.delta.removed == []  # both Services were routed already
    # The untouched host's group is the same object, and so is every cluster.
    assert second.table.exact_hosts["two.example"] is first.table.exact_hosts["two.example"]
    assert {id(c) for c in second.table.clusters()} == {id(c) for c in first.table.clusters()}
    route = second.table.lookup("one.example", "/v2/x")
    assert route is not None and route.cluster.name == "default/b:80"

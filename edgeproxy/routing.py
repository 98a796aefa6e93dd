"""The route table and its lookup: host, then longest path, per networking.k8s.io/v1 Ingress.

Lookup cost does not depend on the number of rules: a dict by exact host, a dict by wildcard
suffix, then per host a dict of Exact paths and a dict of Prefix paths probed once per path
element of the request (longest first).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

from edgeproxy.config import OutlierSettings
from edgeproxy.hosts import EndpointKey


class TransportProfile(NamedTuple):
    """How a cluster connects to its endpoints. Pooled connections are keyed by endpoint and
    profile (Envoy: cluster, host and transport socket): two clusters reaching one pod with
    different TLS settings never share a connection."""

    tls: bool = False
    ca_secret: tuple[str, str] | None = None  # Secret with ca.crt that verifies the endpoints
    server_name: str | None = None  # SNI and the name the certificate must carry


PLAIN = TransportProfile()


@dataclass(frozen=True, slots=True, eq=False)
class Cluster:
    """One Service port as compiled: its endpoints and how to reach and pick among them.

    Immutable once published, like the whole table. What is bound at run time (endpoint
    states, the balancer, backend TLS contexts) lives in the data plane's ClusterBinding; an
    EndpointSlice-only change rebinds the cluster with new keys (Envoy's EDS) and never
    writes here. eq=False: compared and hashed by identity (the data plane's binding key).
    """

    name: str  # namespace/service:port
    keys: tuple[EndpointKey, ...]
    balancer_name: str = "round_robin"
    balancer_options: Mapping[str, Any] = field(default_factory=dict)
    transport: TransportProfile = PLAIN
    external_name: str | None = None  # Service type ExternalName: resolve on connect
    outlier: OutlierSettings | None = None  # per-Ingress override of the global flags
    service: tuple[str, str] | None = None  # (namespace, name) whose EndpointSlices feed keys
    port_name: str = ""

    def config(self) -> tuple[Any, ...]:
        """All but the endpoints: two clusters with the same config are the same to a worker."""
        return (self.name, self.balancer_name, tuple(sorted(self.balancer_options.items())),
                self.transport, self.external_name, self.outlier, self.service, self.port_name)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Route:
    ingress: str  # namespace/name, for logs and /debug/routes
    host: str  # "" for host-less rules, "*.x" for wildcard
    path: str
    path_type: str
    cluster: Cluster
    ssl_redirect: bool = False
    hsts: bytes | None = None  # the whole Strict-Transport-Security line, for HTTPS responses


NO_ROUTES: Mapping[str, Route] = MappingProxyType({})  # shared by every group without such paths


@dataclass(frozen=True, slots=True)
class HostRoutes:
    """One host's paths. The Prefix "/" route (every path) sits apart from the other Prefix
    paths: most hosts have only that one, and their groups then hold no dict of their own
    (a dict and its proxy were 230 bytes per host, in the supervisor and in every worker)."""

    exact: Mapping[str, Route]
    below: Mapping[str, Route]  # Prefix paths but "/", keyed by path without trailing slash
    root: Route | None = None  # Prefix "/"

    @classmethod
    def of(cls, exact: dict[str, Route], prefix: dict[str, Route]) -> HostRoutes:
        """From the Exact and the Prefix paths (keyed as in `prefix`, "/" among them)."""
        root = prefix.pop("/", None)
        return cls(MappingProxyType(exact) if exact else NO_ROUTES,
                   MappingProxyType(prefix) if prefix else NO_ROUTES, root)  # fmt: skip

    def routes(self) -> list[Route]:
        """Every route of the host: Exact, then Prefix ("/" last)."""
        routes = [*self.exact.values(), *self.below.values()]
        if self.root is not None:
            routes.append(self.root)
        return routes

    @property
    def prefix(self) -> Mapping[str, Route]:
        """Every Prefix path, "/" included (for listing; match() reads below and root)."""
        if self.root is None:
            return self.below
        return {**self.below, "/": self.root}

    def match(self, path: str) -> Route | None:
        """Longest match; Exact beats Prefix at equal length (an Exact hit is always longest)."""
        exact = self.exact
        if exact:
            route = exact.get(path)
            if route is not None:
                return route
        below = self.below
        if below:
            # Prefix matching is by path element (Ingress API reference, "Examples"): /foo
            # matches /foo, /foo/ and /foo/bar, never /foobar. Probe the path, then each
            # parent element; "/" is the root, below every path.
            end = len(path)
            while end > 1 and path[end - 1] == "/":
                end -= 1
            while end > 0:
                route = below.get(path[:end])
                if route is not None:
                    return route
                end = path.rfind("/", 0, end)
        return self.root


@dataclass(frozen=True, slots=True)
class RouteTable:
    exact_hosts: Mapping[str, HostRoutes]
    wildcard_hosts: Mapping[str, HostRoutes]  # keyed by suffix with its dot: ".example.com"
    any_host: HostRoutes | None
    default_route: Route | None
    tls_hosts: frozenset[str] = frozenset()
    generation: int = 0

    def lookup(self, host: str, path: str) -> Route | None:
        """Most specific host group first (exact, wildcard, host-less); then its longest path."""
        group = self.exact_hosts.get(host)
        if group is None:
            dot = host.find(".")
            if dot > 0:
                group = self.wildcard_hosts.get(host[dot:])
            if group is None:
                group = self.any_host
        if group is not None:
            route = group.match(path)
            if route is not None:
                return route
        return self.default_route

    def clusters(self) -> list[Cluster]:
        seen: dict[int, Cluster] = {}
        for route in self.routes():
            seen.setdefault(id(route.cluster), route.cluster)
        return list(seen.values())

    def routes(self) -> list[Route]:
        out: list[Route] = []
        groups = list(self.exact_hosts.values()) + list(self.wildcard_hosts.values())
        if self.any_host is not None:
            groups.append(self.any_host)
        for group in groups:
            out.extend(group.routes())
        if self.default_route is not None:
            out.append(self.default_route)
        return out


EMPTY_TABLE = RouteTable(MappingProxyType({}), MappingProxyType({}), None, None)

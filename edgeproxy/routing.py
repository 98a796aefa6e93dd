"""The route table and its lookup: host, then longest path, per networking.k8s.io/v1 Ingress.

Lookup cost does not depend on the number of rules: a dict by exact host, a dict by wildcard
suffix, then per host a dict of Exact paths and a dict of Prefix paths probed once per path
element of the request (longest first).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from edgeproxy.config import OutlierSettings

if TYPE_CHECKING:
    from edgeproxy.balancing import Balancer
    from edgeproxy.health import EndpointState

EndpointKey = tuple[str, int]
MISSING = object()  # (address, port): the identity per-endpoint state is keyed by


@dataclass(slots=True, eq=False)
class Cluster:
    """One Service port: the endpoints in rotation and how to pick among them.

    compile() fills the fields up to `external_name`; Dataplane.publish attaches `hosts` and
    `balancer` from the per-endpoint registry before the table goes live. Routes and clusters
    never change after that, except `keys`, `hosts` and `balancer`, which an EndpointSlice-only
    change replaces in place (Dataplane.refresh_endpoints), as Envoy's EDS updates a cluster's
    hosts without touching routes. The loop is single-threaded, so a request sees either the
    old set or the new one.
    """

    name: str  # namespace/service:port
    keys: tuple[EndpointKey, ...]
    balancer_name: str = "round_robin"
    balancer_options: Mapping[str, Any] = field(default_factory=dict)
    upstream_tls: bool = False
    external_name: str | None = None  # Service type ExternalName: resolve on connect
    outlier: OutlierSettings | None = None  # per-Ingress override of the global flags
    hosts: tuple[EndpointState, ...] = ()
    balancer: Balancer | None = None
    healthy: int = 0  # hosts not ejected, as of the registry's ejection epoch healthy_epoch
    healthy_epoch: int = -1
    service: tuple[str, str] | None = None  # (namespace, name) whose EndpointSlices feed keys
    port_name: str = ""
    backend_ca: tuple[str, str] | None = None  # Secret with ca.crt: verify the backends
    backend_server_name: str | None = None  # SNI and the name to verify, if given
    upstream_ssl: ssl.SSLContext | None = None  # set after publish when backend_ca is given


@dataclass(frozen=True, slots=True)
class Route:
    ingress: str  # namespace/name, for logs and /debug/routes
    host: str  # "" for host-less rules, "*.x" for wildcard
    path: str
    path_type: str
    cluster: Cluster
    ssl_redirect: bool = False
    hsts: bytes | None = None  # the whole Strict-Transport-Security line, for HTTPS responses


PATH_MEMO_SIZE = 1024  # per host: recent paths -> route; cleared when full


@dataclass(frozen=True, slots=True)
class HostRoutes:
    exact: Mapping[str, Route]
    prefix: Mapping[str, Route]  # keyed by path without trailing slash ("/" for the root)
    # Memo of match(): the table stays immutable in meaning; a path's route never changes
    # within one table, so remembering it is safe, and repeated paths skip the element walk.
    memo: dict[str, Route | None] = field(default_factory=dict, compare=False)

    def match(self, path: str) -> Route | None:
        """Longest match; Exact beats Prefix at equal length (an Exact hit is always longest)."""
        route = self.exact.get(path)
        if route is not None:
            return route
        prefix = self.prefix
        if not prefix:
            return None
        # Prefix matching is by path element (Ingress API reference, "Examples"): /foo matches
        # /foo, /foo/ and /foo/bar, never /foobar. Probe the path, then each parent element.
        end = len(path)
        while end > 1 and path[end - 1] == "/":
            end -= 1
        while end > 0:
            route = prefix.get(path[:end])
            if route is not None:
                return route
            end = path.rfind("/", 0, end)
        return prefix.get("/")


@dataclass(frozen=True, slots=True)
class RouteTable:
    exact_hosts: Mapping[str, HostRoutes]
    wildcard_hosts: Mapping[str, HostRoutes]  # keyed by suffix with its dot: ".example.com"
    any_host: HostRoutes | None
    default_route: Route | None
    tls_hosts: frozenset[str] = frozenset()
    generation: int = 0
    # Like Envoy's EDS: an EndpointSlice change replaces these clusters' endpoints in place.
    clusters_by_service: Mapping[tuple[str, str], tuple[Cluster, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )

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
            memo = group.memo
            route = memo.get(path, MISSING)
            if route is MISSING:
                route = group.match(path)
                if len(memo) >= PATH_MEMO_SIZE:
                    memo.clear()  # many distinct paths (IDs in URLs): start over, stay bounded
                memo[path] = route
            if route is not None:
                return route  # type: ignore[return-value]
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
            out.extend(group.exact.values())
            out.extend(group.prefix.values())
        if self.default_route is not None:
            out.append(self.default_route)
        return out


EMPTY_TABLE = RouteTable(MappingProxyType({}), MappingProxyType({}), None, None)

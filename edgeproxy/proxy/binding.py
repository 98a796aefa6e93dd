"""What the data plane binds to each compiled cluster at run time, outside the immutable table:
the endpoints' states, the balancer over them, and the TLS context for the transport profile.

Built on publish and rebuilt on an EndpointSlice-only change (Envoy's cluster manager holds the
same; the route table only names clusters). Picking applies health with an accept check that
keeps ejection, panic mode and "not an endpoint already tried" out of the balancers (Pingora's
select_with).
"""

from __future__ import annotations

import ssl
from typing import Any

from edgeproxy.balancing import RoundRobin, build_balancer
from edgeproxy.config import OutlierSettings
from edgeproxy.hosts import EndpointKey, EndpointState
from edgeproxy.routing import Cluster, TransportProfile


class ClusterBinding:
    __slots__ = ("balancer", "cluster", "figures", "healthy", "healthy_epoch", "hosts", "keys",
                 "outlier", "pools", "profile", "service_figures", "tls_context")  # fmt: skip

    def __init__(self, cluster: Cluster, keys: tuple[EndpointKey, ...],
                 hosts: tuple[EndpointState, ...], balancer_types: dict[str, type[Any]],
                 tls_context: ssl.SSLContext | None,
                 pools: dict[EndpointState, list[Any]] | None = None) -> None:  # fmt: skip
        self.cluster = cluster
        # Each host's idle connections for this cluster's transport profile: the pool's own
        # lists (shared with every cluster of the same profile), found here without building
        # the (endpoint, profile) key on every request.
        self.pools: dict[EndpointState, list[Any]] = pools or {}
        self.keys = keys
        self.hosts = hosts
        self.outlier: OutlierSettings | None = cluster.outlier
        self.profile: TransportProfile = cluster.transport
        self.tls_context = tls_context
        factory = balancer_types.get(cluster.balancer_name, RoundRobin)
        self.balancer: Any = build_balancer(factory, hosts, cluster.balancer_options, cluster.name)
        self.healthy = 0  # hosts not ejected, as of the registry's ejection epoch healthy_epoch
        self.healthy_epoch = -1
        # The data plane's counters for this cluster, found here without building label keys
        # per request: by Ingress name (observe.RouteFigures), and the Service's own.
        self.figures: dict[str, Any] = {}
        self.service_figures: Any = None

    def pick(self, request: Any, now: float, ejected_anywhere: int, ejection_epoch: int,
             panic_percent: float, tried: list[EndpointState] | None) -> EndpointState | None:  # fmt: skip
        """An endpoint for this request, honouring ejection, panic mode and endpoints tried."""
        balancer = self.balancer
        if self.outlier is not None:
            panic_percent = self.outlier.panic_threshold_percent
        hosts = self.hosts
        if self.healthy_epoch != ejection_epoch:  # recount only after an ejection or a return
            self.healthy = sum(1 for h in hosts if h.ejected_until <= now)
            self.healthy_epoch = ejection_epoch
        excluded = tried or ()
        if hosts and self.healthy * 100 < panic_percent * len(hosts):
            # Panic mode (Envoy): too few healthy hosts; balance over all rather than fail.
            def accept(h: EndpointState) -> bool:
                return h not in excluded
        else:
            def accept(h: EndpointState) -> bool:
                return h.ejected_until <= now and h not in excluded
        return balancer.pick(request, accept)  # type: ignore[no-any-return]

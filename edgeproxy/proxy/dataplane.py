"""What every connection of one worker shares: the live table, endpoint registry, coarse clock.

Timeouts are deadlines checked by one periodic sweep rather than a timer per request, like
nginx's cached time: the hot path only adds a number. The sweep's tick is a quarter of the
shortest timeout (at least 50 ms, at most MAX_TICK), which bounds how late a timeout fires.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from typing import TYPE_CHECKING

from edgeproxy.config import Settings
from edgeproxy.health import EndpointRegistry
from edgeproxy.proxy.headers import DateHeader
from edgeproxy.routing import EMPTY_TABLE, Cluster, EndpointKey, RouteTable

if TYPE_CHECKING:
    from edgeproxy.proxy.downstream import DownstreamProtocol

POOL_SWEEP_INTERVAL = 1.0
MAX_TICK = 0.25  # bounds how late a deadline or an ejection's end is noticed
HOST_CACHE_SIZE = 4096


class Dataplane:
    """One worker's shared state (compiled, an extension type: dataplane.pxd)."""

    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = settings
        self.loop = loop
        self.now = loop.time()
        self.table: RouteTable = EMPTY_TABLE
        self.registry = EndpointRegistry(loop.time, settings.outlier)
        self.connections: set[DownstreamProtocol] = set()
        self.date = DateHeader()
        # Responses by status code: a list, indexed by the code (llhttp allows 3 digits), because
        # incrementing a Counter goes through its Python-level __setitem__ slot.
        self.status_counts: list[int] = [0] * 1000
        self.upstream_connects = 0
        self.retries = 0
        self.draining = False
        self.host_names: dict[bytes, str] = {}  # Host header -> normalised name, bounded
        self.upstream_ssl: ssl.SSLContext | None = None  # for backend-protocol: HTTPS
        # X-Request-ID: a per-process random prefix and a counter; unique without a syscall
        # (the client side formats it: DownstreamProtocol._headers_complete).
        self.rid_prefix = os.urandom(8).hex().encode()
        self.rid_counter = 0
        shortest = min(
            settings.connect_timeout, settings.read_timeout, settings.client_header_timeout,
            settings.keepalive_timeout,
        )  # fmt: skip
        self.tick = min(MAX_TICK, max(0.05, shortest / 4))
        self._sweeper: asyncio.TimerHandle | None = None
        self._last_pool_sweep = self.now
        self.balancer_types: dict[str, type] = {}  # name -> Balancer class (load_balancers)

    def publish(self, table: RouteTable) -> None:
        """Swap the table in; attach per-endpoint state and balancers first (Cluster.hosts)."""
        live: set[EndpointKey] = set()
        for cluster in table.clusters():
            self._bind(cluster, cluster.keys)
            live.update(cluster.keys)
        self.table = table
        self.registry.retain(live)

    def _bind(self, cluster: Cluster, keys: tuple[EndpointKey, ...]) -> None:
        """Give the cluster these endpoints' states and a balancer over them."""
        from edgeproxy.balancing import RoundRobin

        hosts = tuple(self.registry.get(k) for k in keys)
        factory = self.balancer_types.get(cluster.balancer_name, RoundRobin)
        balancer = factory(hosts, cluster.balancer_options)
        cluster.keys, cluster.hosts, cluster.balancer = keys, hosts, balancer
        cluster.healthy_epoch = -1

    def refresh_endpoints(self, cluster: Cluster, keys: tuple[EndpointKey, ...]) -> None:
        """An EndpointSlice-only change: new endpoints for a live cluster (Envoy's EDS)."""
        self._bind(cluster, keys)

    def retain_live(self) -> None:
        """Drop per-endpoint state no cluster of the live table refers to any more."""
        self.registry.retain(k for c in self.table.clusters() for k in c.keys)

    def remember_host(self, raw: bytes, name: str) -> str:
        if len(self.host_names) >= HOST_CACHE_SIZE:
            self.host_names.clear()  # a flood of distinct Host values must not grow memory
        self.host_names[raw] = name
        return name

    def start(self) -> None:
        self._sweeper = self.loop.call_later(self.tick, self._sweep)

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()

    def _sweep(self) -> None:
        now = self.now = self.loop.time()
        self.date.at(time.time())
        for conn in [c for c in self.connections if c.deadline and c.deadline <= now]:
            conn.deadline_passed()
        if now - self._last_pool_sweep >= POOL_SWEEP_INTERVAL:
            self._last_pool_sweep = now
            expire = now - self.settings.upstream_idle_timeout
            for state in self.registry.states.values():
                if state.idle and state.idle[0].idle_since < expire:
                    stale = [c for c in state.idle if c.idle_since < expire]
                    state.idle = [c for c in state.idle if c.idle_since >= expire]
                    for c in stale:
                        c.close()
        self.registry.refresh_ejections()
        self._sweeper = self.loop.call_later(self.tick, self._sweep)

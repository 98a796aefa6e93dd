"""What every connection of one worker shares: the live table and what is bound to it
(ClusterBinding per cluster), the endpoint registry, the upstream pool and a coarse clock.

Publishing builds the bindings for the new table beside the live ones and swaps both in one
step; the table itself is never written to. Timeouts are deadlines checked by one periodic
sweep rather than a timer per request, like nginx's cached time: the hot path only adds a
number. The sweep's tick is a quarter of the shortest timeout (at least 50 ms, at most
MAX_TICK), which bounds how late a timeout fires.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any

from edgeproxy.config import Settings
from edgeproxy.health import EndpointRegistry
from edgeproxy.hosts import EndpointKey
from edgeproxy.proxy.binding import ClusterBinding
from edgeproxy.proxy.headers import prefixed_hex16
from edgeproxy.proxy.local import DateHeader
from edgeproxy.proxy.observe import UNROUTED, RouteFigures, ServiceFigures
from edgeproxy.proxy.pool import UpstreamPool
from edgeproxy.proxy.tls_server import HANDSHAKE_RESULTS
from edgeproxy.routing import EMPTY_TABLE, Cluster, Route, RouteTable, TransportProfile

POOL_SWEEP_INTERVAL = 1.0
SHRINK_INTERVAL = 1.0  # idle this long (seconds), a keep-alive connection sheds its parser
MAX_TICK = 0.25  # bounds how late a deadline or an ejection's end is noticed
HOST_CACHE_SIZE = 4096
ROUTE_MEMO_SIZE = 1024  # per host: recent paths -> route; cleared when full and on publish
MISSING = object()

# (profile, cluster name) -> the context that verifies that profile's backends.
BackendContexts = Callable[[TransportProfile, str], ssl.SSLContext]


class Dataplane:
    """One worker's shared state (compiled, an extension type: dataplane.pxd)."""

    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = settings
        self.loop = loop
        self.now = loop.time()
        self.table: RouteTable = EMPTY_TABLE
        self.bindings: dict[Cluster, ClusterBinding] = {}
        self.key_refs: dict[EndpointKey, int] = {}  # endpoint -> bindings that list it
        self.route_memo: dict[str, dict[str, Route | None]] = {}
        self.registry = EndpointRegistry(loop.time, settings.outlier)
        self.pool = UpstreamPool(loop, settings.upstream_max_idle_per_endpoint,
                                 settings.max_upstream_header_bytes)  # fmt: skip
        self.connections: set[Any] = set()  # client connections, for the deadline sweep
        self.handshaking: set[Any] = set()  # TLS connections not handed to a codec yet, too
        self.tls_results: list[int] = [0] * len(HANDSHAKE_RESULTS)  # handshakes by how they ended
        self.loop_sets_nodelay = type(loop).__module__.startswith("uvloop")
        self.connection_infos: dict[Any, Any] = {}  # (port, client ip) -> ConnectionInfo, shared
        self._last_shrink = 0.0
        self.date = DateHeader()
        # Responses by status code: a list, indexed by the code (llhttp allows 3 digits), because
        # incrementing a Counter goes through its Python-level __setitem__ slot.
        self.status_counts: list[int] = [0] * 1000
        self.retries = 0
        # Traffic figures by (namespace, ingress, service) and upstream ones by (namespace,
        # service): they outlive tables and bindings (counters never go back).
        self.figures: dict[tuple[str, str, str], RouteFigures] = {UNROUTED: RouteFigures()}
        self.unrouted = self.figures[UNROUTED]
        self.service_figures: dict[tuple[str, str], ServiceFigures] = {}
        self.access_log: Any = None  # edgeproxy.accesslog.AccessLog, unless --access-log off
        self.draining = False
        self.host_names: dict[bytes, str] = {}  # authority -> normalised name, bounded
        self.upstream_ssl: ssl.SSLContext | None = None  # backend-protocol: HTTPS, unverified
        self.backend_contexts: BackendContexts | None = None  # with a backend CA (server.py)
        self.balancer_types: dict[str, type] = {}  # name -> Balancer class (load_balancers)
        # X-Request-ID: a per-process random prefix and a counter; unique without a syscall.
        self.rid_prefix = os.urandom(8).hex().encode()
        self.rid_counter = 0
        # The timeouts and limits the hot path reads, as plain fields (C fields when compiled).
        self.connect_timeout = settings.connect_timeout
        self.read_timeout = settings.read_timeout
        self.panic_percent = settings.outlier.panic_threshold_percent
        self.client_header_timeout = settings.client_header_timeout
        self.keepalive_timeout = settings.keepalive_timeout
        self.max_header_bytes = settings.max_header_bytes
        self.max_body_bytes = settings.max_body_bytes
        self.max_request_line = settings.max_request_line
        self.max_header_line = settings.max_header_line
        self.max_header_count = settings.max_header_count
        self.client_body_timeout = settings.client_body_timeout
        self.max_requests_per_connection = settings.max_requests_per_connection
        self.max_connections = settings.max_connections
        self.max_pipelined = settings.max_pipelined
        # Accepting pauses at max_connections (the worker's hook) and resumes under 90% of it.
        self.accept_paused = False
        self.accept_hook: Any = None  # callable(pause: bool), set by the worker
        shortest = min(
            settings.connect_timeout, settings.read_timeout, settings.client_header_timeout,
            settings.keepalive_timeout, settings.client_body_timeout,
        )  # fmt: skip
        self.tick = min(MAX_TICK, max(0.05, shortest / 4))
        self._sweeper: asyncio.TimerHandle | None = None
        self._last_pool_sweep = self.now

    # -- publishing ----------------------------------------------------------------------

    def publish(self, table: RouteTable,
                endpoints: Mapping[Cluster, tuple[EndpointKey, ...]] | None = None) -> None:  # fmt: skip
        """Bind the new table's clusters (with their current endpoints, when the compiler
        keeps them apart), then swap table and bindings in together."""
        contexts: dict[TransportProfile, ssl.SSLContext | None] = {}
        current = endpoints or {}
        bindings = {c: self._bind(c, current.get(c, c.keys), contexts) for c in table.clusters()}
        self.table = table
        self.bindings = bindings
        self.route_memo = {}
        self.retain_live()

    def apply(self, table: RouteTable, defined: list[Cluster], gone: list[Cluster],
              changed: list[tuple[Cluster, tuple[EndpointKey, ...]]]) -> None:  # fmt: skip
        """A table delta from the supervisor (tablesync): bind what is new, unbind what went,
        rebind what got new endpoints, swap the table. Costs what changed, not the table."""
        contexts: dict[TransportProfile, ssl.SSLContext | None] = {}
        for cluster in gone:
            old = self.bindings.pop(cluster, None)
            if old is not None:
                self._unref(old.keys)
        for cluster in defined:
            self.bindings[cluster] = self._bind(cluster, cluster.keys, contexts)
            self._ref(cluster.keys)
        for cluster, keys in changed:
            self.refresh_endpoints(cluster, keys)
        self.table = table
        self.route_memo = {}

    def refresh_endpoints(self, cluster: Cluster, keys: tuple[EndpointKey, ...]) -> None:
        """An EndpointSlice-only change: new endpoints for a live cluster (Envoy's EDS)."""
        old = self.bindings.get(cluster)
        if old is None:
            return
        self.bindings[cluster] = self._bind(cluster, keys, {cluster.transport: old.tls_context})
        self._ref(keys)
        self._unref(old.keys)

    def rebind(self, clusters: list[Cluster]) -> None:
        """New TLS contexts for these clusters (their backend CA changed); endpoints kept."""
        for cluster in clusters:
            old = self.bindings.get(cluster)
            if old is not None:
                self.bindings[cluster] = self._bind(cluster, old.keys, {})

    def _ref(self, keys: tuple[EndpointKey, ...]) -> None:
        refs = self.key_refs
        for key in keys:
            refs[key] = refs.get(key, 0) + 1

    def _unref(self, keys: tuple[EndpointKey, ...]) -> None:
        """Endpoints no binding refers to any more lose their state and idle connections."""
        refs = self.key_refs
        unused = []
        for key in keys:
            count = refs.get(key, 0) - 1
            if count > 0:
                refs[key] = count
            else:
                refs.pop(key, None)
                unused.append(key)
        if unused:
            self.registry.forget(unused)
            self.pool.forget(unused)

    def _bind(self, cluster: Cluster, keys: tuple[EndpointKey, ...],
              contexts: dict[TransportProfile, ssl.SSLContext | None]) -> ClusterBinding:  # fmt: skip
        profile = cluster.transport
        if profile not in contexts:
            contexts[profile] = self._tls_context(profile, cluster.name)
        hosts = tuple(self.registry.get(k) for k in keys)
        pools = {h: self.pool.idle_list(h.key, profile) for h in hosts}
        binding = ClusterBinding(cluster, keys, hosts, self.balancer_types, contexts[profile], pools)
        service = service_labels(cluster)
        figures = self.service_figures.get(service)
        if figures is None:
            figures = self.service_figures[service] = ServiceFigures()
        binding.service_figures = figures
        return binding

    def _tls_context(self, profile: TransportProfile, where: str) -> ssl.SSLContext | None:
        if not profile.tls:
            return None
        if profile.ca_secret is not None and self.backend_contexts is not None:
            return self.backend_contexts(profile, where)
        return self.upstream_ssl

    def retain_live(self) -> None:
        """Drop per-endpoint state and idle connections no live binding refers to (after a
        whole table was published; deltas count references instead, _ref/_unref)."""
        refs: dict[EndpointKey, int] = {}
        for binding in self.bindings.values():
            for key in binding.keys:
                refs[key] = refs.get(key, 0) + 1
        self.key_refs = refs
        self.registry.retain(refs)
        self.pool.retain(refs)

    # -- lookups for the hot path -----------------------------------------------------------

    def route(self, host: str, path: str) -> Route | None:
        """The table's lookup, memoized per host (a path's route never changes within one
        table; the memo belongs to the data plane and is dropped with the table)."""
        memo = self.route_memo.get(host)
        if memo is None:
            if len(self.route_memo) >= HOST_CACHE_SIZE:
                self.route_memo.clear()
            memo = self.route_memo[host] = {}
        route = memo.get(path, MISSING)
        if route is MISSING:
            route = self.table.lookup(host, path)
            if len(memo) >= ROUTE_MEMO_SIZE:
                memo.clear()  # many distinct paths (IDs in URLs): start over, stay bounded
            memo[path] = route
        return route  # type: ignore[return-value]

    def remember_host(self, raw: bytes, name: str) -> str:
        if len(self.host_names) >= HOST_CACHE_SIZE:
            self.host_names.clear()  # a flood of distinct Host values must not grow memory
        self.host_names[raw] = name
        return name

    def figures_for(self, route: Route | None, binding: ClusterBinding | None) -> RouteFigures:
        """The figures an exchange on `route` counts into (once per Ingress and binding: the
        binding keeps the reference for the next request)."""
        if route is None:
            return self.unrouted
        namespace, _, name = route.ingress.partition("/")
        labels = (namespace, name, service_labels(route.cluster)[1])
        figures = self.figures.get(labels)
        if figures is None:
            figures = self.figures[labels] = RouteFigures()
        if binding is not None:
            binding.figures[route.ingress] = figures
        return figures

    def request_id(self) -> bytes:
        self.rid_counter += 1
        return prefixed_hex16(self.rid_prefix, self.rid_counter)

    # -- the sweep ---------------------------------------------------------------------------

    def start(self) -> None:
        self._sweeper = self.loop.call_later(self.tick, self._sweep)

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()

    def _sweep(self) -> None:
        now = self.now = self.loop.time()
        self.date.at(time.time())
        # A connection's deadline is its exchange's while one is in progress (connect, read),
        # and its own for a request body still arriving; else its own (header, keep-alive
        # idle); 0 is none.
        due = []
        for conn in self.connections:
            exchange = conn.exchange
            deadline = conn.deadline
            if exchange is not None:
                if exchange.req_done or not deadline or (exchange.deadline and exchange.deadline < deadline):
                    deadline = exchange.deadline
            if deadline and deadline <= now:
                due.append(conn)
        for conn in due:
            conn.deadline_passed()
        if self.handshaking:  # TLS connections still in their handshake (tls_server)
            for tls in [t for t in self.handshaking if t.deadline <= now]:
                tls.deadline_passed()
        if now - self._last_shrink >= SHRINK_INTERVAL:
            # Keep-alive connections idle for SHRINK_INTERVAL give back their parser (their
            # deadline is their last activity plus the keep-alive timeout).
            self._last_shrink = now
            quiet = now - SHRINK_INTERVAL + self.keepalive_timeout
            for conn in self.connections:
                if conn.exchange is None and conn.parser is not None and 0 < conn.deadline <= quiet:
                    conn.shrink_idle()
        if now - self._last_pool_sweep >= POOL_SWEEP_INTERVAL:
            self._last_pool_sweep = now
            self.pool.expire(now - self.settings.upstream_idle_timeout)
        self.registry.refresh_ejections()
        self._sweeper = self.loop.call_later(self.tick, self._sweep)


def service_labels(cluster: Cluster) -> tuple[str, str]:
    """(namespace, service name) of a cluster, for metric labels (ExternalName ones too)."""
    if cluster.service is not None:
        return cluster.service
    namespace, _, rest = cluster.name.partition("/")
    return namespace, rest.rpartition(":")[0] or rest

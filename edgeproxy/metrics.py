"""/metrics for the whole pod, through prometheus-client (the supervisor's registry).

Two kinds of figures. The supervisor's own (compiles, endpoint refreshes, watch events,
convergence, ejections) are prometheus-client metrics updated where they happen. The
workers' traffic figures (proxy.observe) are polled and summed at each scrape by
WorkerCollector: counters and histogram buckets add up over the workers, and over workers that
exited (WorkerTotals.retire), so nothing goes back when a worker is replaced. Labels are
bounded by the configuration: namespace, ingress, service, method (8 values), status class.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from edgeproxy.proxy.observe import BUCKETS, METHODS, N_BUCKETS, N_CLASSES, STATUS_CLASSES
from edgeproxy.proxy.tls_server import HANDSHAKE_RESULTS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ROUTE_LABELS = ("namespace", "ingress", "service")
SERVICE_LABELS = ("namespace", "service")
# Watch event -> live in every worker: milliseconds matter here.
CONVERGENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                       10.0, 30.0)  # fmt: skip
COMPILE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MAX_PENDING_CHANGES = 100_000  # changes waiting for every worker; beyond, the oldest are dropped

RouteSnapshot = tuple[list[int], list[int], list[float], list[int], list[float], int, int]


def _add_lists(into: list[Any], more: list[Any]) -> None:
    for i, n in enumerate(more):
        into[i] += n


class WorkerTotals:
    """Worker counters summed: the retired part (exited workers) plus the live ones per scrape."""

    def __init__(self) -> None:
        self.status: dict[int, int] = {}
        self.routes: dict[tuple[str, str, str], list[Any]] = {}
        self.services: dict[tuple[str, str], list[int]] = {}
        self.retries = 0
        self.connects = 0
        self.access_log_dropped = 0
        self.tls_handshakes = [0] * len(HANDSHAKE_RESULTS)
        # Gauges: live workers only.
        self.connections = 0
        self.connections_shed = 0
        self.accept_paused = 0
        self.upstream_connections = 0

    def copy(self) -> WorkerTotals:
        """The counters (not the gauges), to add the live workers' to."""
        other = WorkerTotals()
        other.retire({"status": self.status, "routes": self.routes, "services": self.services,
                      "retries": self.retries, "connects": self.connects,
                      "access_log_dropped": self.access_log_dropped,
                      "tls_handshakes": self.tls_handshakes})  # fmt: skip
        return other

    def retire(self, stats: dict[str, Any]) -> None:
        """A worker exited: its last counters stay in the sums (its gauges go with it)."""
        self.add(stats, gauges=False)

    def add(self, stats: dict[str, Any], gauges: bool = True) -> None:
        """Add one worker's stats (the dict worker.Worker.stats returns)."""
        get = stats.get
        for code, n in (get("status") or {}).items():
            self.status[code] = self.status.get(code, 0) + n
        for labels, snap in (get("routes") or {}).items():
            held = self.routes.get(labels)
            if held is None:
                self.routes[labels] = [list(snap[0]), list(snap[1]), list(snap[2]),
                                       list(snap[3]), list(snap[4]), snap[5], snap[6]]  # fmt: skip
                continue
            for i in range(5):
                _add_lists(held[i], snap[i])
            held[5] += snap[5]
            held[6] += snap[6]
        for labels, figures in (get("services") or {}).items():
            held_s = self.services.setdefault(labels, [0, 0, 0])
            _add_lists(held_s, list(figures))
        self.retries += get("retries", 0) or 0
        self.connects += get("connects", 0) or 0
        self.access_log_dropped += get("access_log_dropped", 0) or 0
        _add_lists(self.tls_handshakes, get("tls_handshakes") or [])
        if gauges:
            self.connections += get("connections", 0) or 0
            self.connections_shed += get("connections_shed", 0) or 0
            self.accept_paused += get("accept_paused", 0) or 0
            self.upstream_connections += get("upstream_connections", 0) or 0


def _histogram(family: HistogramMetricFamily, labels: list[str], counts: list[int],
               offset: int, total: float) -> None:  # fmt: skip
    buckets = []
    running = 0
    for i in range(N_BUCKETS):
        running += counts[offset + i]
        le = "+Inf" if i == N_BUCKETS - 1 else repr(BUCKETS[i])
        buckets.append((le, running))
    if running:
        family.add_metric(labels, buckets, total)


class WorkerCollector(Collector):
    """The workers' figures at scrape time (`totals` is set by the admin handler first)."""

    def __init__(self, supervisor: Any) -> None:
        self.sup = supervisor
        self.totals = WorkerTotals()

    def collect(self) -> Iterator[Any]:
        totals = self.totals
        sup = self.sup
        requests = CounterMetricFamily(
            "edgeproxy_requests", "Requests answered, by route, method and status class.",
            labels=[*ROUTE_LABELS, "method", "status_class"])  # fmt: skip
        duration = HistogramMetricFamily(
            "edgeproxy_request_duration_seconds",
            "From the request head parsed to the last response byte written.",
            labels=[*ROUTE_LABELS, "status_class"])  # fmt: skip
        upstream = HistogramMetricFamily(
            "edgeproxy_upstream_response_duration_seconds",
            "From the last attempt's start (connect or pooled send) to its response's end.",
            labels=[*ROUTE_LABELS, "status_class"])  # fmt: skip
        bytes_in = CounterMetricFamily("edgeproxy_request_bytes",
                                       "Request bytes received (head and body).", labels=ROUTE_LABELS)  # fmt: skip
        bytes_out = CounterMetricFamily("edgeproxy_response_bytes",
                                        "Response bytes sent to clients.", labels=ROUTE_LABELS)  # fmt: skip
        for labels, held in sorted(totals.routes.items()):
            counts, dur, dur_sum, up, up_sum, n_in, n_out = held
            base = list(labels)
            for m, method in enumerate(METHODS):
                for c, klass in enumerate(STATUS_CLASSES):
                    n = counts[m * N_CLASSES + c]
                    if n:
                        requests.add_metric([*base, method, klass], n)
            for c, klass in enumerate(STATUS_CLASSES):
                _histogram(duration, [*base, klass], dur, c * N_BUCKETS, dur_sum[c])
                _histogram(upstream, [*base, klass], up, c * N_BUCKETS, up_sum[c])
            if n_in or n_out:
                bytes_in.add_metric(base, n_in)
                bytes_out.add_metric(base, n_out)
        yield from (requests, duration, upstream, bytes_in, bytes_out)

        connects = CounterMetricFamily("edgeproxy_upstream_connects",
                                       "Upstream connections opened.", labels=SERVICE_LABELS)  # fmt: skip
        errors = CounterMetricFamily(
            "edgeproxy_upstream_connect_errors",
            "Upstream connections that failed (refused, unreachable, TLS, timed out).",
            labels=SERVICE_LABELS)  # fmt: skip
        retries = CounterMetricFamily("edgeproxy_retries",
                                      "Requests sent again to another endpoint.", labels=SERVICE_LABELS)  # fmt: skip
        for service, (n_connects, n_errors, n_retries) in sorted(totals.services.items()):
            connects.add_metric(list(service), n_connects)
            errors.add_metric(list(service), n_errors)
            retries.add_metric(list(service), n_retries)
        yield from (connects, errors, retries)

        responses = CounterMetricFamily("edgeproxy_responses",
                                        "Responses sent to clients, by status code.", labels=["code"])  # fmt: skip
        for code, n in sorted(totals.status.items()):
            responses.add_metric([str(code)], n)
        yield responses
        yield GaugeMetricFamily("edgeproxy_client_connections", "Open client connections.",
                                value=totals.connections)  # fmt: skip
        yield GaugeMetricFamily("edgeproxy_client_connections_shed",
                                "Idle keep-alive client connections that gave back their parser "
                                "(memory shed; one is made again at their next request).",
                                value=totals.connections_shed)  # fmt: skip
        yield GaugeMetricFamily("edgeproxy_workers_not_accepting",
                                "Workers at --max-connections, not accepting new connections.",
                                value=totals.accept_paused)  # fmt: skip
        yield GaugeMetricFamily("edgeproxy_upstream_connections",
                                "Open upstream connections (idle in pools and in use).",
                                value=totals.upstream_connections)  # fmt: skip
        handshakes = CounterMetricFamily(
            "edgeproxy_tls_handshakes", "TLS handshakes on the HTTPS listeners, by how they ended: "
            "completed, failed (refused or broken), timed_out (--client-header-timeout), plain_http "
            "(a plain HTTP request on the TLS port, answered 400).", labels=["result"])  # fmt: skip
        for result, n in zip(HANDSHAKE_RESULTS, totals.tls_handshakes, strict=True):
            handshakes.add_metric([result], n)
        yield handshakes
        yield CounterMetricFamily("edgeproxy_access_log_dropped_lines",
                                  "Access log lines dropped because the log's reader fell behind.",
                                  value=totals.access_log_dropped)  # fmt: skip
        yield GaugeMetricFamily("edgeproxy_workers", "Worker processes serving traffic.",
                                value=sum(1 for w in sup.workers if w is not None and w.serving))  # fmt: skip
        yield from self._endpoints()
        yield from self._pipeline()
        yield from self._watches()

    def _endpoints(self) -> Iterator[Any]:
        """Endpoints in rotation and ejected, per Service, from the pod-wide verdicts."""
        sup = self.sup
        now = sup.loop.time()
        states = sup.registry.states
        per_service: dict[tuple[str, str], list[int]] = {}
        for cluster, keys in sup.pipeline.routed():
            if cluster.service is None:
                continue
            counts = per_service.setdefault(cluster.service, [0, 0])
            for key in keys:
                state = states.get(key)
                if state is not None and state.ejected_until > now:
                    counts[1] += 1
                else:
                    counts[0] += 1
        rotation = GaugeMetricFamily("edgeproxy_endpoints_in_rotation",
                                     "Ready endpoints not ejected, per Service (summed over its ports).",
                                     labels=SERVICE_LABELS)  # fmt: skip
        ejected = GaugeMetricFamily("edgeproxy_endpoints_ejected",
                                    "Endpoints passive health checking has ejected now.",
                                    labels=SERVICE_LABELS)  # fmt: skip
        for service, (n_in, n_out) in sorted(per_service.items()):
            rotation.add_metric(list(service), n_in)
            ejected.add_metric(list(service), n_out)
        yield rotation
        yield ejected

    def _pipeline(self) -> Iterator[Any]:
        pipeline = self.sup.pipeline
        invalid = GaugeMetricFamily("edgeproxy_invalid_objects",
                                    "Objects or parts of objects skipped by the last compile, by reason.",
                                    labels=["reason"])  # fmt: skip
        reasons: dict[str, int] = {}
        if pipeline.last is not None:
            for line in pipeline.last.diagnostics:
                reason = getattr(line, "reason", "other")
                reasons[reason] = reasons.get(reason, 0) + 1
        for reason, n in sorted(reasons.items()):
            invalid.add_metric([reason], n)
        yield invalid
        errors = GaugeMetricFamily("edgeproxy_manifest_files_unreadable",
                                   "Manifest files whose last read failed (their last good objects serve).")  # fmt: skip
        errors.add_metric([], len(self.sup.manifest_errors))
        yield errors

    def _watches(self) -> Iterator[Any]:
        kube = self.sup.kube
        events = CounterMetricFamily("edgeproxy_watch_events", "Watch events received, by kind.",
                                     labels=["kind"])  # fmt: skip
        restarts = CounterMetricFamily("edgeproxy_watch_restarts",
                                       "Watches started again after they ended or dropped, by kind.",
                                       labels=["kind"])  # fmt: skip
        relists = CounterMetricFamily("edgeproxy_watch_relists",
                                      "Lists made again after 410 Gone (resourceVersion too old), by kind.",
                                      labels=["kind"])  # fmt: skip
        if kube is not None:
            for kind, (n_events, n_restarts, n_relists) in sorted(kube.watch_figures().items()):
                events.add_metric([kind], n_events)
                restarts.add_metric([kind], n_restarts)
                relists.add_metric([kind], n_relists)
        yield from (events, restarts, relists)


class PodMetrics:
    """The supervisor's registry: its own metrics plus the workers' (WorkerCollector)."""

    def __init__(self, supervisor: Any) -> None:
        registry = self.registry = CollectorRegistry(auto_describe=False)
        self.compile_seconds = Histogram(
            "edgeproxy_table_compile_duration_seconds",
            "Route table compiles: whole builds and per-change updates (an Ingress, Service, IngressClass or Secret change).",
            buckets=COMPILE_BUCKETS, registry=registry)  # fmt: skip
        self.refresh_seconds = Histogram(
            "edgeproxy_endpoint_refresh_duration_seconds",
            "EndpointSlice-only updates applied to live clusters in place.",
            buckets=COMPILE_BUCKETS, registry=registry)  # fmt: skip
        self.last_success = Gauge("edgeproxy_table_last_success_timestamp_seconds",
                                  "When a table or endpoint update was last published (Unix time).",
                                  registry=registry)  # fmt: skip
        self.compile_failures = Counter("edgeproxy_table_compile_failures",
                                        "Compiles that raised; the last good table kept serving.",
                                        registry=registry)  # fmt: skip
        self.convergence = Histogram(
            "edgeproxy_convergence_seconds",
            "From a change received (watch event, manifest file) to the table that includes it "
            "being live in every worker.", buckets=CONVERGENCE_BUCKETS, registry=registry)  # fmt: skip
        self.ejections = Counter("edgeproxy_endpoint_ejections",
                                 "Endpoints ejected by passive health checking (outlier detection).",
                                 SERVICE_LABELS, registry=registry)  # fmt: skip
        self.collector = WorkerCollector(supervisor)
        registry.register(self.collector)
        # (store generation, perf_counter when received) of changes not yet live everywhere.
        self.pending: deque[tuple[int, float]] = deque()

    def changed(self, generation: int) -> None:
        if len(self.pending) >= MAX_PENDING_CHANGES:
            self.pending.popleft()
        self.pending.append((generation, time.perf_counter()))

    def live_everywhere(self, generation: int) -> None:
        """Every serving worker runs `generation` or later: the changes up to it converged."""
        pending = self.pending
        if not pending or pending[0][0] > generation:
            return
        now = time.perf_counter()
        while pending and pending[0][0] <= generation:
            self.convergence.observe(now - pending.popleft()[1])

    def published(self, seconds: float, full: bool) -> None:
        (self.compile_seconds if full else self.refresh_seconds).observe(seconds)
        self.last_success.set(time.time())

    def exposition(self, totals: WorkerTotals) -> bytes:
        self.collector.totals = totals
        return generate_latest(self.registry)

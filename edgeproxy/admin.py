"""Admin listener (aiohttp): /healthz, /readyz, Prometheus /metrics, /debug/routes.

Off the hot path, so a framework is fine here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import orjson
from aiohttp import web

from edgeproxy.pipeline import RoutePipeline
from edgeproxy.proxy.dataplane import Dataplane


class AdminApp:
    def __init__(
        self, dataplane: Dataplane, pipeline: RoutePipeline, ready: Callable[[], bool]
    ) -> None:
        self.dp = dataplane
        self.pipeline = pipeline
        self.ready = ready
        self.app = web.Application()
        self.app.add_routes(
            [
                web.get("/healthz", self.healthz),
                web.get("/readyz", self.readyz),
                web.get("/metrics", self.metrics),
                web.get("/debug/routes", self.routes),
            ]
        )

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        if self.dp.draining:
            return web.Response(status=503, text="shutting down\n")
        if not self.ready():
            return web.Response(status=503, text="no complete routing table yet\n")
        return web.Response(text="ready\n")

    async def metrics(self, request: web.Request) -> web.Response:
        dp = self.dp
        lines = [
            "# HELP edgeproxy_responses_total Responses sent to clients, by status code.",
            "# TYPE edgeproxy_responses_total counter",
        ]
        for status, count in enumerate(dp.status_counts):
            if not count:
                continue
            lines.append(f'edgeproxy_responses_total{{code="{status}"}} {count}')
        now = dp.loop.time()
        lines += [
            "# HELP edgeproxy_downstream_connections Open client connections.",
            "# TYPE edgeproxy_downstream_connections gauge",
            f"edgeproxy_downstream_connections {len(dp.connections)}",
            "# HELP edgeproxy_upstream_connects_total Upstream connections opened.",
            "# TYPE edgeproxy_upstream_connects_total counter",
            f"edgeproxy_upstream_connects_total {dp.pool.connects}",
            "# HELP edgeproxy_retries_total Requests retried on another endpoint.",
            "# TYPE edgeproxy_retries_total counter",
            f"edgeproxy_retries_total {dp.retries}",
            "# HELP edgeproxy_route_rebuilds_total Route tables compiled and published.",
            "# TYPE edgeproxy_route_rebuilds_total counter",
            f"edgeproxy_route_rebuilds_total {self.pipeline.rebuilds}",
            "# HELP edgeproxy_endpoint_refreshes_total EndpointSlice-only updates applied in place.",
            "# TYPE edgeproxy_endpoint_refreshes_total counter",
            f"edgeproxy_endpoint_refreshes_total {self.pipeline.endpoint_refreshes}",
            "# HELP edgeproxy_route_update_seconds Time the last table update took.",
            "# TYPE edgeproxy_route_update_seconds gauge",
            f"edgeproxy_route_update_seconds {self.pipeline.last_rebuild_seconds:.6f}",
            "# HELP edgeproxy_endpoint_in_flight Requests in flight per endpoint.",
            "# TYPE edgeproxy_endpoint_in_flight gauge",
        ]
        states = list(dp.registry.states.values())
        for st in states:
            lines.append(f'edgeproxy_endpoint_in_flight{{endpoint="{st.label}"}} {st.in_flight}')
        lines += [
            "# HELP edgeproxy_endpoint_ejected Whether passive health checking ejected it.",
            "# TYPE edgeproxy_endpoint_ejected gauge",
        ]
        for st in states:
            ejected = 1 if st.ejected_until > now else 0
            lines.append(f'edgeproxy_endpoint_ejected{{endpoint="{st.label}"}} {ejected}')
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def routes(self, request: web.Request) -> web.Response:
        table = self.dp.table
        now = self.dp.loop.time()
        routes = []
        for route in table.routes():
            cluster = route.cluster
            binding = self.dp.bindings.get(cluster)
            hosts = binding.hosts if binding is not None else ()
            routes.append(
                {
                    "ingress": route.ingress,
                    "host": route.host or "*",
                    "path": route.path,
                    "pathType": route.path_type,
                    "default_backend": route is table.default_route,
                    "backend": cluster.name,
                    "balancer": cluster.balancer_name,
                    "endpoints": [h.describe(now) | {"idle_connections":
                                  self.dp.pool.idle_count(h.key)} for h in hosts],
                }
            )
        result = self.pipeline.last
        kinds = Counter(key[0] for key in self.pipeline.store.snapshot().objects)
        body = {
            "generation": table.generation,
            "objects": dict(sorted(kinds.items())),
            "routes": routes,
            "tls_hosts": sorted(table.tls_hosts),
            "diagnostics": result.diagnostics if result else [],
        }
        return web.Response(body=orjson.dumps(body, option=orjson.OPT_INDENT_2),
                            content_type="application/json")  # fmt: skip

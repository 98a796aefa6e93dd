"""Admin listener (aiohttp, in the supervisor): /healthz, /readyz, Prometheus /metrics and
/debug/routes, for the whole pod: counters are summed over the workers (and over workers that
exited, so counters never go back), endpoint state is the pod-wide verdict.

Off the hot path, so a framework is fine here.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web


class AdminApp:
    # `supervisor`: edgeproxy.supervisor.Supervisor, which imports this module (so not typed
    # by import here: the imports stay one-way).
    def __init__(self, supervisor: Any) -> None:
        self.sup = supervisor
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
        if self.sup.draining:
            return web.Response(status=503, text="shutting down\n")
        if not self.sup.ready():
            return web.Response(status=503, text="no complete routing table in every worker yet\n")
        return web.Response(text="ready\n")

    async def metrics(self, request: web.Request) -> web.Response:
        sup = self.sup
        stats = await sup.worker_stats()
        totals = sup.totals(stats)
        pipeline = sup.pipeline
        lines = [
            "# HELP edgeproxy_responses_total Responses sent to clients, by status code.",
            "# TYPE edgeproxy_responses_total counter",
        ]
        for status, count in sorted(totals["status"].items()):
            lines.append(f'edgeproxy_responses_total{{code="{status}"}} {count}')
        now = sup.loop.time()
        lines += [
            "# HELP edgeproxy_workers Worker processes serving traffic.",
            "# TYPE edgeproxy_workers gauge",
            f"edgeproxy_workers {sum(1 for w in sup.workers if w is not None and w.serving)}",
            "# HELP edgeproxy_downstream_connections Open client connections.",
            "# TYPE edgeproxy_downstream_connections gauge",
            f"edgeproxy_downstream_connections {totals['connections']}",
            "# HELP edgeproxy_upstream_connects_total Upstream connections opened.",
            "# TYPE edgeproxy_upstream_connects_total counter",
            f"edgeproxy_upstream_connects_total {totals['connects']}",
            "# HELP edgeproxy_retries_total Requests retried on another endpoint.",
            "# TYPE edgeproxy_retries_total counter",
            f"edgeproxy_retries_total {totals['retries']}",
            "# HELP edgeproxy_route_rebuilds_total Route tables compiled and published.",
            "# TYPE edgeproxy_route_rebuilds_total counter",
            f"edgeproxy_route_rebuilds_total {pipeline.rebuilds}",
            "# HELP edgeproxy_endpoint_refreshes_total EndpointSlice-only updates applied in place.",
            "# TYPE edgeproxy_endpoint_refreshes_total counter",
            f"edgeproxy_endpoint_refreshes_total {pipeline.endpoint_refreshes}",
            "# HELP edgeproxy_route_update_seconds Time the last table update took.",
            "# TYPE edgeproxy_route_update_seconds gauge",
            f"edgeproxy_route_update_seconds {pipeline.last_rebuild_seconds:.6f}",
            "# HELP edgeproxy_endpoint_ejected Whether passive health checking ejected it.",
            "# TYPE edgeproxy_endpoint_ejected gauge",
        ]
        for st in sup.registry.states.values():
            ejected = 1 if st.ejected_until > now else 0
            lines.append(f'edgeproxy_endpoint_ejected{{endpoint="{st.label}"}} {ejected}')
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def routes(self, request: web.Request) -> web.Response:
        sup = self.sup
        result = sup.pipeline.last
        stats = await sup.worker_stats(endpoints=True)
        per_endpoint: dict[Any, list[int]] = {}
        for s in stats:
            for key, figures in s.get("endpoints", {}).items():
                summed = per_endpoint.setdefault(key, [0, 0, 0, 0])
                for i, n in enumerate(figures):
                    summed[i] += n
        now = sup.loop.time()
        routes = []
        if result is not None:
            table = result.table
            for route in table.routes():
                cluster = route.cluster
                keys = sup.pipeline.endpoints.get(cluster, cluster.keys)
                endpoints = []
                for key in keys:
                    state = sup.registry.states.get(key)
                    in_flight, requests, failures, idle = per_endpoint.get(key, (0, 0, 0, 0))
                    described = state.describe(now) if state is not None else {}
                    described |= {"in_flight": in_flight, "requests": requests,
                                  "failures": failures, "idle_connections": idle}  # fmt: skip
                    endpoints.append(described)
                routes.append(
                    {
                        "ingress": route.ingress,
                        "host": route.host or "*",
                        "path": route.path,
                        "pathType": route.path_type,
                        "default_backend": route is table.default_route,
                        "backend": cluster.name,
                        "balancer": cluster.balancer_name,
                        "endpoints": endpoints,
                    }
                )
        kinds = {kind: sup.store.count(kind) for kind in ("Ingress", "IngressClass", "Service",
                                                          "EndpointSlice", "Secret")}  # fmt: skip
        body = {
            "generation": sup.pipeline.published_generation,
            "workers": [{"slot": w.slot, "pid": w.proc.pid, "serving": w.serving,
                         "generation": w.generation} for w in sup.workers if w is not None],  # fmt: skip
            "objects": {k: v for k, v in sorted(kinds.items()) if v},
            "routes": routes,
            "tls_hosts": sorted(result.table.tls_hosts) if result else [],
            "diagnostics": result.diagnostics if result else [],
        }
        return web.Response(body=orjson.dumps(body, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS),
                            content_type="application/json")  # fmt: skip

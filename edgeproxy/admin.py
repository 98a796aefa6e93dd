"""Admin listener (aiohttp, in the supervisor): /healthz, /readyz, Prometheus /metrics
(edgeproxy.metrics) and /debug/routes, for the whole pod: counters are summed over the workers
(and over workers that exited, so counters never go back), endpoint state is the pod-wide
verdict.

Off the hot path, so a framework is fine here.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import orjson
from aiohttp import web

from edgeproxy.metrics import CONTENT_TYPE


class AdminApp:
    # `supervisor`: edgeproxy.supervisor.Supervisor, which imports this module (so not typed
    # by import here: the imports stay one-way).
    def __init__(self, supervisor: Any) -> None:
        self.sup = supervisor
        self.debug_allow = tuple(getattr(supervisor.args, "debug_allow", ()) or ())
        # GET (and HEAD) only: anything else is 405 (aiohttp answers it for routes it knows).
        self.app = web.Application(middlewares=[self.guard_debug])
        self.app.add_routes(
            [
                web.get("/healthz", self.healthz),
                web.get("/readyz", self.readyz),
                web.get("/metrics", self.metrics),
                web.get("/debug/routes", self.routes),
                web.get("/debug/explain", self.explain),
            ]
        )

    @web.middleware
    async def guard_debug(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """/debug/* lists every host, backend and pod address: loopback clients only, unless
        --debug-allow names the client's network. Probes and /metrics answer everyone the
        listener lets in (the kubelet and Prometheus reach it on the pod or node address)."""
        if request.path.startswith("/debug/") and not self._debug_allowed(request.remote):
            return web.Response(status=403, text="debug views answer loopback clients only "
                                                 "(see --debug-allow)\n")  # fmt: skip
        return await handler(request)  # type: ignore[no-any-return]

    def _debug_allowed(self, remote: str | None) -> bool:
        try:
            address = ipaddress.ip_address((remote or "").split("%")[0])
        except ValueError:
            return False
        if address.is_loopback or (getattr(address, "ipv4_mapped", None) or address).is_loopback:
            return True
        return any(address in network for network in self.debug_allow)

    async def explain(self, request: web.Request) -> web.Response:
        """Where a request would go: ?url=http://host/path (or ?host=&path=)."""
        from edgeproxy.explain import explain_request, request_of

        result = self.sup.pipeline.last
        if result is None:
            return web.Response(status=503, text="no routing table yet\n")
        url = request.query.get("url")
        if url:
            host, path = request_of(url, [f"Host: {request.query['host']}"] if "host" in request.query else [])
        else:
            host, path = request.query.get("host", ""), request.query.get("path", "/")
        answer = explain_request(result.table, host, path, self.sup.pipeline.endpoints)
        return web.Response(body=orjson.dumps(answer, option=orjson.OPT_INDENT_2),
                            content_type="application/json")  # fmt: skip

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
        totals = sup.totals(await sup.worker_stats())
        return web.Response(body=sup.metrics.exposition(totals),
                            headers={"Content-Type": CONTENT_TYPE})  # fmt: skip

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
            "unreadable_manifests": {str(p): e for p, e in sup.manifest_errors.items()},
        }
        return web.Response(body=orjson.dumps(body, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS),
                            content_type="application/json")  # fmt: skip

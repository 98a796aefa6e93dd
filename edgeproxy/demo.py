"""Demo backends: one small HTTP server per endpoint the manifests list, on loopback only.

`edgeproxy demo` starts these "pods" and then edgeproxy itself, so the quick start needs no
cluster. Each pod answers with JSON naming itself, which makes host/path routing and the
spread over pods visible with curl.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from pathlib import Path

import orjson
from aiohttp import web

from edgeproxy.sources.manifests import load_file, manifest_files

log = logging.getLogger("edgeproxy.demo")


def demo_pods(paths: list[Path]) -> list[tuple[str, str, int]]:
    """(pod name, address, port) for every loopback endpoint in the manifests' EndpointSlices."""
    pods: list[tuple[str, str, int]] = []
    for path in manifest_files(paths):
        for obj in load_file(path):
            if obj.get("kind") != "EndpointSlice":
                continue
            meta = obj.get("metadata") or {}
            service = (meta.get("labels") or {}).get("kubernetes.io/service-name", "?")
            ports = [p["port"] for p in obj.get("ports") or []
                     if isinstance(p, dict) and isinstance(p.get("port"), int)]  # fmt: skip
            for ep in obj.get("endpoints") or []:
                name = (ep.get("targetRef") or {}).get("name") or service
                for address in ep.get("addresses") or []:
                    if not ipaddress.ip_address(address).is_loopback:
                        continue  # the demo only ever listens on this machine
                    for port in ports:
                        pods.append((name, address, port))
    return sorted(set(pods))


async def start_pods(pods: list[tuple[str, str, int]]) -> list[web.AppRunner]:
    runners = []
    for name, address, port in pods:

        async def echo(request: web.Request, pod: str = name) -> web.Response:
            body = {
                "pod": pod,
                "host": request.host,
                "path": request.path_qs,
                "method": request.method,
                "x-forwarded-for": request.headers.get("X-Forwarded-For"),
                "x-request-id": request.headers.get("X-Request-ID"),
            }
            return web.Response(body=orjson.dumps(body) + b"\n", content_type="application/json")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", echo)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, address, port).start()
        runners.append(runner)
        log.info("demo pod %s listening on %s:%d", name, address, port)
    return runners


async def serve_pods_forever(paths: list[Path]) -> None:
    await start_pods(demo_pods(paths))
    await asyncio.Event().wait()

"""Process and listener lifecycle: workers, listeners, admin, graceful shutdown.

With --workers N the parent forks N-1 children before it starts its loop; each process runs
its own loop, table and pools, and the kernel spreads connections over them (SO_REUSEPORT).
Only the parent serves the admin listener.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import ssl
from pathlib import Path

from edgeproxy.config import Settings
from edgeproxy.routing import TransportProfile

log = logging.getLogger("edgeproxy")

SHUTDOWN_POLL_INTERVAL = 0.05


def run_workers(args: argparse.Namespace, settings: Settings) -> int:
    import uvloop

    children: list[int] = []
    primary = True
    for _ in range(max(1, args.workers) - 1):
        pid = os.fork()
        if pid == 0:
            primary = False
            children = []
            break
        children.append(pid)
    try:
        uvloop.run(serve(args, settings, primary=primary, children=children))
    except KeyboardInterrupt:
        pass
    for pid in children:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    return 0


async def serve(
    args: argparse.Namespace, settings: Settings, *, primary: bool, children: list[int]
) -> None:
    from edgeproxy.balancing import load_balancers
    from edgeproxy.compile import CompileResult
    from edgeproxy.objects import ObjectStore
    from edgeproxy.pipeline import RoutePipeline
    from edgeproxy.proxy import compiled, protocol_factory
    from edgeproxy.proxy.dataplane import Dataplane
    from edgeproxy.proxy.http1_server import ClientConnection
    from edgeproxy.sources.manifests import ManifestSource
    from edgeproxy.tls import CertificateStore

    loop = asyncio.get_running_loop()
    balancer_types = load_balancers()
    dp = Dataplane(settings, loop)
    dp.balancer_types = balancer_types
    store = ObjectStore()
    pipeline = RoutePipeline(
        store, [dp], only_class=args.ingress_class, balancers=balancer_types,
        default_balancer=settings.default_balancer, loop=loop, outlier=settings.outlier,
    )  # fmt: skip
    certificates = CertificateStore(args.default_certificate)
    def certificates_for(result: CompileResult) -> None:
        certificates.update(store.snapshot(), result.tls)

    def backend_context(profile: TransportProfile, where: str) -> ssl.SSLContext:
        assert profile.ca_secret is not None
        return certificates.backend_context(store.snapshot(), *profile.ca_secret, where,
                                            profile.server_name)  # fmt: skip

    pipeline.on_published.append(certificates_for)
    dp.upstream_ssl = certificates.upstream_context()
    dp.backend_contexts = backend_context

    sources_ready: list[bool] = []
    listed_generation = [0]
    background: list[asyncio.Task[None]] = []
    if args.manifests:
        manifests = ManifestSource([Path(p) for p in args.manifests], store,
                                   settings.reload_interval)  # fmt: skip
        manifests.load()
        background.append(loop.create_task(manifests.watch()))
    if args.kubeconfig or args.in_cluster:
        from edgeproxy.sources.kube import KubeSource

        kube = KubeSource(store, namespaces=args.watch_namespace, kubeconfig=args.kubeconfig,
                          in_cluster=args.in_cluster, default_secret=args.default_certificate)  # fmt: skip
        pipeline.on_published.append(
            lambda result: kube.references_changed(result.secrets()))
        sources_ready.append(False)

        def kube_listed() -> None:
            # Ready once a table compiled from at least this generation is live.
            listed_generation[0] = store.generation
            sources_ready[0] = True

        background.append(loop.create_task(kube.run(on_listed=kube_listed)))
        if primary and (args.publish_address or args.publish_service):
            from edgeproxy.status import StatusWriter

            async def write_status() -> None:
                while kube.api is None:  # the API client is made by kube.run
                    await asyncio.sleep(0.05)
                writer = StatusWriter(store, kube.api, publish_address=args.publish_address,
                                      publish_service=args.publish_service,
                                      lease_namespace=args.lease_namespace)  # fmt: skip
                pipeline.on_published.append(lambda r: writer.published(r.served_ingresses))
                if pipeline.last is not None:
                    writer.published(pipeline.last.served_ingresses)
                await writer.run()

            background.append(loop.create_task(write_status()))
    pipeline.rebuild()
    dp.start()
    import gc
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)

    reuse_port = args.workers > 1
    servers: list[asyncio.base_events.Server] = []
    if args.http:
        host, port = args.http
        servers.append(await loop.create_server(
            protocol_factory(lambda: ClientConnection(dp, b"http", str(port).encode())), host, port,
            reuse_port=reuse_port, backlog=1024,
        ))  # fmt: skip
        log.info("HTTP listener on %s:%d (hot path: %s)", host, port,
                 "compiled" if compiled() else "pure Python")
    if args.https:
        host, port = args.https
        servers.append(await loop.create_server(
            protocol_factory(lambda: ClientConnection(dp, b"https", str(port).encode())), host, port,
            ssl=certificates.server_context(), reuse_port=reuse_port, backlog=1024,
        ))  # fmt: skip
        log.info("HTTPS listener on %s:%d", host, port)
    listening = True

    def ready() -> bool:
        return (listening and pipeline.last is not None and all(sources_ready)
                and pipeline.published_generation >= listed_generation[0])  # fmt: skip

    admin_runner = None
    if primary and args.admin:
        from aiohttp import web

        from edgeproxy.admin import AdminApp

        admin = AdminApp(dp, pipeline, ready)
        admin_runner = web.AppRunner(admin.app, access_log=None)
        await admin_runner.setup()
        await web.TCPSite(admin_runner, args.admin[0], args.admin[1]).start()
        log.info("admin listener on %s:%d", *args.admin)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    # Graceful stop: not ready, stop accepting, let exchanges in flight end, then close.
    log.info("shutting down: draining %d connections", len(dp.connections))
    dp.draining = True
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for server in servers:
        server.close()
    deadline = loop.time() + args.shutdown_grace
    while loop.time() < deadline:
        busy = [c for c in dp.connections if c.exchange is not None]
        if not busy:
            break
        await asyncio.sleep(SHUTDOWN_POLL_INTERVAL)
    for conn in list(dp.connections):
        if conn.transport is not None:
            conn.transport.close()
    for task in background:
        task.cancel()
    dp.stop()
    if admin_runner is not None:
        await admin_runner.cleanup()

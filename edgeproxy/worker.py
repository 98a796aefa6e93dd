"""A worker: one process, one event loop, serving traffic and nothing else.

Started by the supervisor (`python -m edgeproxy.worker FD`) with its listening sockets and one
end of a socketpair. Everything it knows arrives on that channel: settings, the route table as
deltas (tablesync), certificates, the pod-wide health verdicts, and when to start and stop
serving. It reports back what the supervisor decides on: the generation it serves, endpoint
failures and recoveries, and its counters when asked. No Kubernetes client, compile or YAML
here: the control plane never runs on this loop.

Lifecycle: wait for the first complete table ("serve"), accept on the sockets of its slot,
and on "stop" (or when the supervisor is gone) stop accepting, answer with Connection: close,
close idle connections, give requests and tunnels in flight the drain timeout, exit 0.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from edgeproxy.channel import Channel
from edgeproxy.hosts import EndpointState
from edgeproxy.listeners import BACKLOG
from edgeproxy.memory import first_table_served, hold_collection, keep_buffer_memory
from edgeproxy.tablesync import TableReceiver
from edgeproxy.tls import SniCertificates, upstream_context

log = logging.getLogger("edgeproxy.worker")

DRAIN_POLL_S = 0.05
IDLE_GRACE_S = 1.0  # while draining, a keep-alive connection idle this long is closed


class Worker:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.channel: Channel | None = None
        self.dp: Any = None
        self.slot = -1
        self.listeners: list[tuple[str, int, list[int]]] = []
        self.receiver = TableReceiver()
        self.certificates = SniCertificates()
        self.generation = -1
        self.servers: list[Any] = []
        self.accepting: list[tuple[socket.socket, Any, Any]] = []  # socket, factory, TLS context
        self.ticket_keys = b""
        self.keys_warned = False
        self.serving = False
        self.done = asyncio.Event()
        self.stopping = False

    # -- messages from the supervisor ------------------------------------------------------

    def on_message(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "table":
            table, defined, gone, changed = self.receiver.apply_table(message)
            self.dp.apply(table, defined, gone, changed)
            self._live(message[1])
        elif kind == "endpoints":
            for cluster, keys in self.receiver.apply_endpoints(message):
                self.dp.refresh_endpoints(cluster, keys)
            self._live(message[1])
        elif kind == "generation":
            self._live(message[1])
        elif kind == "health":
            for key, consecutive, ejected_until, ejections in message[1]:
                self.dp.registry.set_health(key, consecutive, ejected_until, ejections)
        elif kind == "ticket_keys":
            self._ticket_keys(message[1])
        elif kind == "certs":
            self._certificates(*message[1:])
        elif kind == "stats":
            self._send(("stats", message[1], self.stats(message[2])))
        elif kind == "serve":
            self.loop.create_task(self.serve())
        elif kind == "stop":
            self.loop.create_task(self.stop(message[1]))
        elif kind == "init":
            self._init(*message[1:])

    def _init(self, slot: int, settings: Any, listeners: list[tuple[str, int, list[int]]]) -> None:
        from edgeproxy.balancing import load_balancers
        from edgeproxy.proxy.dataplane import Dataplane

        self.slot = slot
        self.listeners = listeners
        self.certificates.options = {"min_version": settings.tls_min_version,
                                     "max_version": settings.tls_max_version,
                                     "resumption": settings.tls_session_resumption}  # fmt: skip
        dp = self.dp = Dataplane(settings, self.loop)
        dp.balancer_types = load_balancers()
        dp.registry.reporter = self.report
        dp.backend_contexts = self.certificates.backend_context
        dp.upstream_ssl = upstream_context()
        if settings.access_log != "off":
            from edgeproxy.accesslog import AccessLog

            dp.access_log = AccessLog(settings.access_log, self.loop,
                                      settings.access_log_buffer)
            dp.access_log.start()
        dp.start()

    def _certificates(self, exact: dict[str, bytes], wildcard: dict[str, bytes], default_id: bytes,
                      pems: dict[bytes, tuple[bytes, bytes]],
                      cas: dict[tuple[str, str], bytes | None]) -> None:  # fmt: skip
        self.certificates.update(exact, wildcard, default_id, pems)
        changed = {ref for ref in cas.keys() | self.certificates.cas.keys()
                   if cas.get(ref) != self.certificates.cas.get(ref)}  # fmt: skip
        self.certificates.cas = cas
        if changed and self.dp is not None:
            self.dp.rebind([c for c in self.dp.bindings if c.transport.ca_secret in changed])

    def _ticket_keys(self, keys: bytes) -> None:
        """The pod's session ticket keys: on every TLS listener, so a session resumes in any
        worker (and, keyed from a Secret, in any replica)."""
        self.ticket_keys = keys
        for _, _, context in self.accepting:
            if context is not None:
                self._apply_ticket_keys(context)

    def _apply_ticket_keys(self, context: Any) -> None:
        from edgeproxy.tls import set_ticket_keys

        if self.ticket_keys and not set_ticket_keys(context, self.ticket_keys) and not self.keys_warned:
            self.keys_warned = True
            log.warning("worker %d cannot set TLS session ticket keys (this Python's ssl module "
                        "is not the layout expected); its tickets resume only in it", self.slot)  # fmt: skip

    def _live(self, generation: int) -> None:
        self.generation = generation
        self._send(("live", generation))

    def _send(self, message: tuple[Any, ...]) -> None:
        if self.channel is not None:
            self.channel.send(message)

    # -- reports ----------------------------------------------------------------------------

    def report(self, state: EndpointState, failed: bool) -> None:
        """An outcome the pod-wide outlier detection counts (health.EndpointRegistry)."""
        self._send(("outcome", state.key, failed))

    def stats(self, with_endpoints: bool) -> dict[str, Any]:
        """Counters (polled every second), per endpoint only when asked."""
        dp = self.dp
        endpoints = {}
        if with_endpoints:
            idle: dict[Any, int] = {}
            for (key, _), connections in dp.pool.idle.items():  # one pass, not one per endpoint
                if connections:
                    idle[key] = idle.get(key, 0) + len(connections)
            for key, state in dp.registry.states.items():
                endpoints[key] = (state.in_flight, state.requests, state.failures,
                                  idle.get(key, 0))  # fmt: skip
        upstream_open = dp.pool.idle_count()
        for conn in dp.connections:
            exchange = conn.exchange
            if (exchange is not None and exchange.up is not None) or conn.tunnel is not None:
                upstream_open += 1
        log = dp.access_log
        shed = sum(1 for conn in dp.connections if conn.parser is None)
        return {
            "connections_shed": shed,
            "accept_paused": int(dp.accept_paused),
            "status": {code: n for code, n in enumerate(dp.status_counts) if n},
            "retries": dp.retries,
            "tls_handshakes": list(dp.tls_results),
            "connects": dp.pool.connects,
            "connections": len(dp.connections),
            "upstream_connections": upstream_open,
            "routes": {labels: f.snapshot() for labels, f in dp.figures.items()},
            # Every bound Service has figures (10,000 Services: 10,000 entries); those still at
            # zero are left out, or this poll would stall the loop for milliseconds each second.
            "services": {labels: (f.connects, f.connect_errors, f.retries)
                         for labels, f in dp.service_figures.items() if f.connects or f.retries},  # fmt: skip
            "access_log_dropped": 0 if log is None else log.dropped,
            "endpoints": endpoints,
            "generation": self.generation,
        }

    # -- serving ----------------------------------------------------------------------------

    async def serve(self) -> None:
        if self.serving or self.stopping:
            return
        from edgeproxy.proxy import protocol_factory
        from edgeproxy.proxy.http1_server import ClientConnection

        dp = self.dp
        gc.set_threshold(100_000, 50, 1000)
        first_table_served()
        for scheme, port, fds in self.listeners:
            context = self.certificates.server_context() if scheme == "https" else None
            if context is not None:
                self._apply_ticket_keys(context)
            factory = _connections(ClientConnection, dp, scheme.encode(), str(port).encode())
            if context is not None:
                factory = _tls_terminated(context, factory, dp)
            for fd in fds:
                self.accepting.append((socket.socket(fileno=fd), protocol_factory(factory), context))
        await self._accept()
        dp.accept_hook = self._accept_paused
        self.serving = True
        from edgeproxy.proxy import compiled

        self._send(("serving", compiled()))

    async def _accept(self) -> None:
        """Serve the listening sockets. The servers get duplicates, so that pausing (closing
        them) leaves the sockets, and their accept queues, open."""
        for sock, factory, _ in self.accepting:
            # uvloop calls listen() again on the socket: the same queue length as bind_socket's.
            # TLS is the factory's (tls_server), not the loop's.
            self.servers.append(await self.loop.create_server(
                factory, sock=sock.dup(), backlog=BACKLOG))  # fmt: skip
        if self.dp.accept_paused or self.stopping:  # paused again while these were made
            self._close_servers()

    def _close_servers(self) -> None:
        for server in self.servers:
            server.close()
        self.servers = []

    def _accept_paused(self, paused: bool) -> None:
        """--max-connections reached (or, `paused` false, left): new connections wait in the
        kernel's accept queue meanwhile (or go to the other workers' sockets)."""
        if self.stopping:
            return
        if paused:
            log.warning("worker %d holds %d client connections (--max-connections): not "
                        "accepting until it holds fewer", self.slot, len(self.dp.connections))  # fmt: skip
            self._close_servers()
        else:
            log.info("worker %d accepts again", self.slot)
            self.loop.create_task(self._accept())

    async def stop(self, drain_timeout: float) -> None:
        """Stop accepting, finish what is in flight (bounded), exit."""
        if self.stopping:
            return
        self.stopping = True
        dp = self.dp
        self._close_servers()
        if dp is not None:
            dp.draining = True  # responses from now on carry Connection: close
            deadline = self.loop.time() + drain_timeout
            while self.loop.time() < deadline:
                # A keep-alive connection idle for IDLE_GRACE_S is closed; one that was busy
                # just now gets its next response with Connection: close instead, so a
                # client's request already on the way is answered, not cut off.
                # (An idle connection's deadline is its last activity plus the keep-alive time.)
                last_quiet = dp.now - IDLE_GRACE_S + dp.keepalive_timeout
                for conn in list(dp.connections):
                    if (conn.exchange is None and conn.tunnel is None and not conn.in_head
                            and conn.deadline <= last_quiet):  # fmt: skip
                        conn.close()
                if not dp.connections:
                    break
                await asyncio.sleep(DRAIN_POLL_S)
            for conn in list(dp.connections):
                conn.abort()  # past the drain timeout (tunnels included)
            dp.stop()
            if dp.access_log is not None:
                dp.access_log.close()
        self.done.set()

    def supervisor_gone(self) -> None:
        if not self.stopping:
            self.loop.create_task(self.stop(5.0))


def _connections(cls: Any, dp: Any, scheme: bytes, port: bytes) -> Callable[[], Any]:
    return lambda: cls(dp, scheme, port)


def _tls_terminated(context: Any, codec: Callable[[], Any], dp: Any) -> Callable[[], Any]:
    """Each connection TLS-terminated (tls_server), then given to a codec from `codec`."""
    from edgeproxy.proxy.local import local_response
    from edgeproxy.proxy.tls_server import TLSServerTransport

    body = b"400 Bad Request: the plain HTTP request was sent to HTTPS port\n"

    def plain_refusal() -> bytes:
        dp.status_counts[400] += 1
        return local_response(400, body, dp.date.at_now(), close=True)

    return lambda: TLSServerTransport(context, codec, dp, plain_refusal)


async def run(fd: int) -> None:
    loop = asyncio.get_running_loop()
    hold_collection(loop)  # until serve()
    keep_buffer_memory()
    worker = Worker(loop)
    # The channel is the worker's before the first message arrives (which can be before
    # create_unix_connection returns).
    channel = worker.channel = Channel(worker.on_message, worker.supervisor_gone)
    await loop.create_unix_connection(lambda: channel, sock=socket.socket(fileno=fd))
    await worker.done.wait()
    channel.close()


def main() -> None:
    # The supervisor decides when to stop (signals go to it; a terminal's Ctrl-C reaches
    # the whole process group, and the supervisor turns it into an orderly drain).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=os.environ.get("EDGEPROXY_LOG_LEVEL", "INFO").upper(),
        format=f"%(asctime)s %(levelname)s %(name)s[worker {os.getpid()}]: %(message)s",
        stream=sys.stderr,
    )
    import uvloop

    uvloop.run(run(int(sys.argv[1])))


if __name__ == "__main__":
    main()

"""Upstream connections by (endpoint, transport profile): connect, pool, expire.

Envoy keys a connection pool by cluster, host and transport socket; here the key is the
endpoint's (address, port) and the cluster's TransportProfile (plain, or TLS with its CA and
SNI), so a connection made for one profile is never reused for another. Idle connections are
kept LIFO (the warmest first), at most `max_idle` per key (--upstream-max-idle), and closed after
the idle timeout or when their endpoint leaves every live table.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterable
from typing import cast

from edgeproxy.hosts import EndpointKey, EndpointState
from edgeproxy.proxy.http1_client import MAX_RESPONSE_HEAD, UpstreamConnection
from edgeproxy.routing import TransportProfile

PoolKey = tuple[EndpointKey, TransportProfile]


def take_idle(idle: list[UpstreamConnection] | None) -> UpstreamConnection | None:
    """A pooled connection of this list (ClusterBinding.pools) that is still open, or None."""
    while idle:
        conn: UpstreamConnection = idle.pop()
        if not conn.closed:
            conn.reused = True
            return conn
    return None


class UpstreamPool:
    def __init__(self, loop: asyncio.AbstractEventLoop, max_idle: int,
                 max_head: int = MAX_RESPONSE_HEAD) -> None:  # fmt: skip
        self.loop = loop
        self.max_idle = max_idle
        self.max_head = max_head  # bytes of a response head (502 beyond)
        self.idle: dict[PoolKey, list[UpstreamConnection]] = {}
        # The profiles each endpoint has a list for: forget() costs the endpoints it is
        # given, not the pool (an EndpointSlice event with 20,000 endpoints in the table).
        self.profiles: dict[EndpointKey, list[TransportProfile]] = {}
        self.connects = 0

    def idle_list(self, key: EndpointKey, profile: TransportProfile) -> list[UpstreamConnection]:
        """The list of idle connections for (endpoint, profile); the same list object for as
        long as the endpoint is live, so bindings may hold it (ClusterBinding.pools)."""
        idle = self.idle.get((key, profile))
        if idle is None:
            idle = self.idle[(key, profile)] = []
            self.profiles.setdefault(key, []).append(profile)
        return idle


    def put(self, conn: UpstreamConnection, now: float) -> None:
        """Keep a connection whose response ended cleanly, or close it."""
        if conn.closed or not conn.reusable or conn.endpoint.draining:
            conn.close()
            return
        idle = conn.idle_list
        if len(idle) >= self.max_idle:
            conn.close()
            return
        conn.receiver = None
        conn.idle_since = now
        conn.flow.resume(-1)  # a pooled connection reads, so that its close is seen at once
        idle.append(conn)

    async def connect(self, endpoint: EndpointState, profile: TransportProfile,
                      context: ssl.SSLContext | None) -> UpstreamConnection:  # fmt: skip
        """A new connection; raises OSError (refused, unreachable, TLS failure)."""
        self.connects += 1
        idle = self.idle_list(endpoint.key, profile)
        server_name = None
        if profile.tls:
            server_name = profile.server_name or endpoint.address
        _, protocol = await self.loop.create_connection(
            lambda: cast(asyncio.BaseProtocol, UpstreamConnection(endpoint, idle, self.max_head)),
            endpoint.address, endpoint.port, ssl=context if profile.tls else None,
            server_hostname=server_name,
        )  # fmt: skip
        conn = cast(UpstreamConnection, protocol)
        sock = conn.transport.get_extra_info("socket") if conn.transport is not None else None
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        return conn

    def expire(self, before: float) -> None:
        """Close idle connections unused since `before` (the periodic sweep). The lists stay:
        bindings hold them (they go with their endpoint, in retain)."""
        # Every bound endpoint has a list (empty ones are skipped at C speed, about 0.5 ms per
        # 20,000). Tracking the lists in use instead cost put(), on every response, 1.4% of an
        # exchange's instructions (callgrind, benchmarks/hot_path.py).
        for idle in self.idle.values():
            if idle and idle[0].idle_since < before:
                for conn in [c for c in idle if c.idle_since < before]:
                    conn.close()
                idle[:] = [c for c in idle if not c.closed]

    def idle_count(self) -> int:
        """Idle connections in the pool now."""
        return sum(map(len, self.idle.values()))

    def retain(self, live: Iterable[EndpointKey]) -> None:
        """Close the idle connections of endpoints no live table refers to."""
        keep = set(live)
        self.forget([key for key in self.profiles if key not in keep])

    def forget(self, keys: Iterable[EndpointKey]) -> None:
        """Close the idle connections of these endpoints, whatever their profile."""
        for key in keys:
            for profile in self.profiles.pop(key, ()):
                idle = self.idle.pop((key, profile), None)
                if idle is not None:
                    for conn in idle:
                        conn.close()
                    idle.clear()

"""Load balancers behind one small interface, and the health-aware selection around them.

A balancer is built once per cluster per table from an immutable tuple of endpoints and only
proposes; `choose` decides with an `accept` check that keeps health (ejection, panic mode,
"not the endpoint that just failed") out of the algorithms, as Pingora's select_with does.

Writing one (registered through the entry-point group ``edgeproxy.balancers``)::

    class Random:
        def __init__(self, hosts, options):
            self.hosts = hosts

        def pick(self, request, accept=None):
            for host in random.sample(self.hosts, len(self.hosts)):
                if accept is None or accept(host):
                    return host
            return None
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import random
import zlib
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any, Protocol

from edgeproxy.hosts import EndpointKey, EndpointState

log = logging.getLogger("edgeproxy.balancing")

Accept = Callable[[EndpointState], bool]


class RequestView(Protocol):
    """What a balancer may read of the request (the downstream exchange implements it)."""

    client_ip: str
    path: str

    def header(self, name: bytes) -> bytes | None: ...


class Balancer(Protocol):
    def __init__(self, hosts: Sequence[EndpointState], options: Mapping[str, Any]) -> None: ...

    def pick(self, request: RequestView, accept: Accept | None = None) -> EndpointState | None: ...


class RoundRobin:
    """Even spread; each worker starts at a random offset so workers do not march in step."""

    __slots__ = ("hosts", "n", "next")

    def __init__(self, hosts: Sequence[EndpointState], options: Mapping[str, Any]) -> None:
        self.hosts = tuple(hosts)
        self.n = len(self.hosts)
        self.next = random.randrange(self.n) if self.n else 0

    def pick(self, request: RequestView, accept: Accept | None = None) -> EndpointState | None:
        n = self.n
        if not n:
            return None
        i = self.next
        self.next = i + 1 if i + 1 < n else 0
        host = self.hosts[i]
        if accept is None or accept(host):
            return host
        for step in range(1, n):
            host = self.hosts[(i + step) % n]
            if accept(host):
                self.next = (i + step + 1) % n
                return host
        return None


class LeastConnections:
    """Fewest requests in flight; ties at random. Power of two choices above FULL_SCAN_MAX."""

    FULL_SCAN_MAX = 16  # below this a full scan is cheap and exact
    __slots__ = ("hosts", "n")

    def __init__(self, hosts: Sequence[EndpointState], options: Mapping[str, Any]) -> None:
        self.hosts = tuple(hosts)
        self.n = len(self.hosts)

    def pick(self, request: RequestView, accept: Accept | None = None) -> EndpointState | None:
        n = self.n
        if not n:
            return None
        if n > self.FULL_SCAN_MAX:
            a = self.hosts[int(random.random() * n)]  # random() is C; randrange is Python
            b = self.hosts[int(random.random() * n)]
            best = a if a.in_flight <= b.in_flight else b
            if accept is None or accept(best):
                return best
        lowest = 1 << 62
        ties: list[EndpointState] = []
        for host in self.hosts:
            if accept is not None and not accept(host):
                continue
            in_flight = host.in_flight
            if in_flight < lowest:
                lowest = in_flight
                ties = [host]
            elif in_flight == lowest:
                ties.append(host)
        if len(ties) > 1:
            return ties[int(random.random() * len(ties))]
        return ties[0] if ties else None


VNODES_PER_HOST = 160  # ketama's default; keeps load within a few percent of even


def _point(data: bytes) -> int:
    """Ring position of a virtual node: 32 bits of BLAKE2b, well spread, built once per set."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=4).digest(), "big")


def _key_hash(key: bytes) -> int:
    """Ring position of a request key: CRC-32 (C, fast, the same in every worker process;
    Python's hash() is salted per process, which would split a client across workers)."""
    return zlib.crc32(key)


@lru_cache(maxsize=256)
def _ring(keys: tuple[EndpointKey, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(sorted point hashes, index of the host owning each point); cached per endpoint set."""
    points = sorted(
        (_point(f"{addr}:{port}-{v}".encode()), i)
        for i, (addr, port) in enumerate(keys)
        for v in range(VNODES_PER_HOST)
    )
    return tuple(p for p, _ in points), tuple(i for _, i in points)


class ConsistentHash:
    """Ring hash with virtual nodes: a key keeps its endpoint; only a leaving endpoint's keys move.

    hash_by: client-ip (default; kube-proxy sessionAffinity: ClientIP), header:NAME,
    cookie:NAME or path. A request without the key falls back to its client IP.
    """

    __slots__ = ("hosts", "name", "owners", "points", "source")

    def __init__(self, hosts: Sequence[EndpointState], options: Mapping[str, Any]) -> None:
        self.hosts = tuple(hosts)
        self.points, self.owners = _ring(tuple(h.key for h in self.hosts))
        spec = str(options.get("hash_by", "client-ip"))
        self.source, _, name = spec.partition(":")
        self.name = name.lower().encode("latin-1")

    def key_of(self, request: RequestView) -> bytes:
        source = self.source
        if source == "client-ip":
            return request.client_ip.encode()
        if source == "header":
            value = request.header(self.name)
            if value is not None:
                return value
        elif source == "cookie":
            cookies = request.header(b"cookie")
            if cookies is not None:
                for part in cookies.split(b";"):
                    k, _, v = part.strip().partition(b"=")
                    if k.lower() == self.name:
                        return v
        elif source == "path":
            return request.path.encode("latin-1", "replace")
        return request.client_ip.encode()

    def pick(self, request: RequestView, accept: Accept | None = None) -> EndpointState | None:
        if not self.hosts:
            return None
        points = self.points
        i = bisect.bisect(points, _key_hash(self.key_of(request)))
        count = len(points)
        if accept is None:
            return self.hosts[self.owners[i % count]]
        # Walk the ring to the next acceptable owner: the keys of an ejected host spread out.
        for step in range(count):
            host = self.hosts[self.owners[(i + step) % count]]
            if accept(host):
                return host
        return None


BUILTIN: dict[str, type[Any]] = {
    "round_robin": RoundRobin,
    "least_conn": LeastConnections,
    "hash": ConsistentHash,
}


def load_balancers() -> dict[str, type[Any]]:
    """Built-ins plus whatever is registered under the entry-point group edgeproxy.balancers."""
    found = dict(BUILTIN)
    for ep in entry_points(group="edgeproxy.balancers"):
        if ep.name in found and ep.value.startswith("edgeproxy.balancing:"):
            continue
        try:
            found[ep.name] = ep.load()
        except Exception as exc:  # a broken plug-in must not stop the proxy
            log.error("balancer %r (%s) cannot be loaded: %s", ep.name, ep.value, exc)
    return found


def build_balancer(factory: type[Any], hosts: tuple[EndpointState, ...], options: Mapping[str, Any],
                   where: str) -> Any:  # fmt: skip
    """The cluster's balancer; a plug-in that fails is confined to its cluster.

    A constructor that raises gives round_robin for this cluster (one log line); a plug-in's
    pick that raises is answered the same way at request time (GuardedBalancer). The table keeps
    updating either way.
    """
    try:
        balancer = factory(hosts, options)
    except Exception as exc:
        log.error("cluster %s: balancer %s failed (%s: %s); using round_robin",
                  where, getattr(factory, "__name__", factory), type(exc).__name__, exc)  # fmt: skip
        return RoundRobin(hosts, options)
    if factory in BUILTIN_TYPES:
        return balancer
    return GuardedBalancer(balancer, hosts, options, where)


class GuardedBalancer:
    """A plug-in's pick, with round_robin standing in when it raises (logged once)."""

    __slots__ = ("fallback", "inner", "reported", "where")

    def __init__(self, inner: Any, hosts: tuple[EndpointState, ...], options: Mapping[str, Any],
                 where: str) -> None:  # fmt: skip
        self.inner = inner
        self.fallback = RoundRobin(hosts, options)
        self.where = where
        self.reported = False

    def pick(self, request: RequestView, accept: Accept | None = None) -> EndpointState | None:
        try:
            host: EndpointState | None = self.inner.pick(request, accept)
            return host
        except Exception as exc:
            if not self.reported:
                self.reported = True
                log.error("cluster %s: balancer pick failed (%s: %s); using round_robin",
                          self.where, type(exc).__name__, exc)  # fmt: skip
            return self.fallback.pick(request, accept)


BUILTIN_TYPES = frozenset(BUILTIN.values())

"""A third-party balancer, registered through the entry-point group edgeproxy.balancers."""

from __future__ import annotations

from typing import Any


class Last:
    """Always the last endpoint (by address): easy to recognise in a test."""

    def __init__(self, hosts: Any, options: Any) -> None:
        self.hosts = sorted(hosts, key=lambda h: h.key)

    def pick(self, request: Any, accept: Any = None) -> Any:
        for host in reversed(self.hosts):
            if accept is None or accept(host):
                return host
        return None


class Broken:
    """A plug-in whose constructor always raises: it must stay confined to its cluster."""

    def __init__(self, hosts: Any, options: Any) -> None:
        raise RuntimeError("this balancer never builds")

    def pick(self, request: Any, accept: Any = None) -> Any:
        return None

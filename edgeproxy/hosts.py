"""Endpoints: the identity per-endpoint state is keyed by, and that state.

At the bottom of the package (it imports nothing of edgeproxy), so that routing, health,
balancing and the proxy can all use it without importing each other.
"""

from __future__ import annotations

from typing import Any

EndpointKey = tuple[str, int]  # (address, port)


class EndpointState:
    """One endpoint's counters and health, kept across table rebuilds (Envoy's host object).

    Pooled connections are not here: they depend on how a cluster connects, not only on the
    endpoint (proxy/pool.py keys them by endpoint and transport profile).
    """

    __slots__ = (
        "address",
        "consecutive_failures",
        "draining",
        "ejected_until",
        "ejections",
        "failures",
        "in_flight",
        "key",
        "label",
        "port",
        "requests",
    )  # fmt: skip

    def __init__(self, key: EndpointKey) -> None:
        self.key = key
        self.address, self.port = key
        self.label = f"[{key[0]}]:{key[1]}" if ":" in key[0] else f"{key[0]}:{key[1]}"
        self.in_flight = 0
        self.requests = 0
        self.failures = 0
        self.consecutive_failures = 0
        self.ejections = 0
        self.ejected_until = 0.0  # loop time; 0 = in rotation
        self.draining = False  # no live table refers to it any more

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "endpoint": self.label,
            "in_rotation": self.ejected_until <= now,
            "ejected_for_s": round(max(0.0, self.ejected_until - now), 3),
            "ejections": self.ejections,
            "in_flight": self.in_flight,
            "requests": self.requests,
            "failures": self.failures,
        }

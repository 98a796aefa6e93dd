"""Per-endpoint state that outlives route-table rebuilds, and passive outlier detection.

Like Envoy's host matching on EDS updates (BaseDynamicClusterImpl::updateDynamicHostList) and
Pingora's Backends::do_update: an endpoint key that stays keeps its EndpointState (in-flight
count, failure counters, ejection); state goes only with the endpoint.
Ejection follows Envoy's outlier.rst: consecutive gateway failures eject for
base_ejection_time x ejections (capped), never more than max_ejection_percent of a cluster.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence

from edgeproxy.config import OutlierSettings
from edgeproxy.hosts import EndpointKey, EndpointState

log = logging.getLogger("edgeproxy.health")


class EndpointRegistry:
    """EndpointKey -> EndpointState, for every endpoint a live table (or a request) still uses."""

    def __init__(self, clock: Callable[[], float], outlier: OutlierSettings) -> None:
        self.states: dict[EndpointKey, EndpointState] = {}
        self.clock = clock
        self.outlier = outlier
        self.ejected_count = 0  # lets the hot path skip health checks when nothing is ejected
        self.ejection_epoch = 0  # bumped on every ejection and return: clusters recount then
        # In a worker of several: outcomes go to the supervisor, which decides for the whole
        # pod (health messages come back through set_health). None: decide here.
        self.reporter: Callable[[EndpointState, bool], None] | None = None

    def set_health(self, key: EndpointKey, consecutive_failures: int, ejected_until: float,
                   ejections: int) -> None:  # fmt: skip
        """The pod-wide verdict on one endpoint, from the supervisor (workers apply it)."""
        state = self.states.get(key)
        if state is None:
            return
        now = self.clock()
        was = state.ejected_until > now
        state.consecutive_failures = consecutive_failures
        state.ejected_until = ejected_until
        state.ejections = ejections
        if was != (ejected_until > now):
            self.ejected_count += -1 if was else 1
            self.ejection_epoch += 1

    def forget(self, keys: Iterable[EndpointKey]) -> None:
        """Drop these endpoints' states (no live binding refers to them any more)."""
        now = self.clock()
        for key in keys:
            state = self.states.pop(key, None)
            if state is None:
                continue
            state.draining = True
            if state.ejected_until > now:
                self.ejected_count -= 1
                self.ejection_epoch += 1

    def get(self, key: EndpointKey) -> EndpointState:
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = EndpointState(key)
        state.draining = False
        return state

    def retain(self, live: Iterable[EndpointKey]) -> list[EndpointState]:
        """Drop the endpoints no live table refers to.

        Requests in flight to a dropped endpoint finish on their own connection, which is then
        closed instead of pooled (EndpointState.draining; the pool drops its idle ones).
        """
        keep = set(live)
        gone = [s for k, s in self.states.items() if k not in keep]
        for state in gone:
            del self.states[state.key]
            state.draining = True
            if state.ejected_until > self.clock():
                self.ejected_count -= 1
                self.ejection_epoch += 1
        return gone

    # -- outlier detection -------------------------------------------------------------

    def record_success(self, state: EndpointState) -> None:
        state.consecutive_failures = 0
        if self.reporter is not None:
            self.reporter(state, False)

    def record_failure(self, state: EndpointState, peers: Sequence[EndpointState],
                       outlier: OutlierSettings | None) -> None:  # fmt: skip
        """A gateway failure: connect refused, reset, timeout, or 502/503/504 from the upstream.

        `peers`: the endpoints of the cluster the request went to (the ejection cap's base);
        `outlier`: that cluster's settings, if its Ingress overrides the global ones.
        """
        state.failures += 1
        state.consecutive_failures += 1
        if self.reporter is not None:
            self.reporter(state, True)
            return
        settings = outlier or self.outlier
        if state.consecutive_failures < settings.consecutive_gateway_failures:
            return
        now = self.clock()
        if state.ejected_until > now or state.draining:
            return
        ejected = sum(1 for p in peers if p.ejected_until > now)
        cap = max(1, math.floor(len(peers) * settings.max_ejection_percent / 100))
        if ejected >= cap:
            log.warning(
                "endpoint %s: %d consecutive gateway failures, not ejected: %d of %d "
                "endpoints already ejected (max %.0f%%)",
                state.label, state.consecutive_failures, ejected, len(peers),
                settings.max_ejection_percent,
            )  # fmt: skip
            return
        state.ejections += 1
        duration = min(settings.base_ejection_time * state.ejections, settings.max_ejection_time)
        state.ejected_until = now + duration
        state.consecutive_failures = 0
        self.ejected_count += 1
        self.ejection_epoch += 1
        log.warning(
            "endpoint %s ejected for %.0fs after %d consecutive gateway failures (ejection #%d)",
            state.label, duration, settings.consecutive_gateway_failures, state.ejections,
        )  # fmt: skip

    def refresh_ejections(self) -> list[EndpointState]:
        """Return endpoints whose ejection time has passed (called by the periodic sweeper);
        -> those returned."""
        returned: list[EndpointState] = []
        if not self.ejected_count:
            return returned
        now = self.clock()
        count = 0
        for state in self.states.values():
            if state.ejected_until:
                if state.ejected_until <= now:
                    state.ejected_until = 0.0
                    self.ejection_epoch += 1
                    returned.append(state)
                    if self.reporter is None:  # a worker's supervisor says it, once per pod
                        log.warning("endpoint %s returns to rotation", state.label)
                else:
                    count += 1
        self.ejected_count = count
        return returned

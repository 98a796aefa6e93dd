"""Store changes -> compile -> publish: the one-way pipe between sources and the hot path.

A burst of changes (a manifest directory rewritten, a watch delivering many events) is
coalesced into one rebuild: a change schedules a rebuild on the next loop turn unless one is
already scheduled.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Collection
from typing import Any, Protocol

from edgeproxy.compile import (
    CompileResult,
    compile_routes,
    resolve_endpoints,
)
from edgeproxy.config import OutlierSettings
from edgeproxy.hosts import EndpointKey
from edgeproxy.objects import ObjectStore, Snapshot
from edgeproxy.routing import Cluster

log = logging.getLogger("edgeproxy.pipeline")

EndpointChanges = list[tuple[Cluster, tuple[EndpointKey, ...]]]


class Publisher(Protocol):
    """Where compiled tables go: one in-process data plane (LocalPublisher), or every worker
    of the pod (supervisor.Workers)."""

    def publish(self, result: CompileResult) -> None: ...

    def refresh_endpoints(self, changes: EndpointChanges) -> None: ...


class LocalPublisher:
    """Publishes into a Dataplane in this process (tests, benchmarks/hot_path.py)."""

    def __init__(self, dataplane: Any) -> None:
        self.dp = dataplane

    def publish(self, result: CompileResult) -> None:
        self.dp.publish(result.table)

    def refresh_endpoints(self, changes: EndpointChanges) -> None:
        for cluster, keys in changes:
            self.dp.refresh_endpoints(cluster, keys)


class RoutePipeline:
    def __init__(
        self,
        store: ObjectStore,
        publishers: list[Publisher],
        *,
        only_class: str | None,
        balancers: Collection[str],
        default_balancer: str,
        loop: asyncio.AbstractEventLoop,
        outlier: OutlierSettings | None = None,
    ) -> None:
        self.outlier = outlier
        self.store = store
        self.publishers = publishers
        self.only_class = only_class
        self.balancers = balancers
        self.default_balancer = default_balancer
        self.loop = loop
        self.last: CompileResult | None = None
        # Each live cluster's endpoints as last published (the table itself is never written).
        self.endpoints: dict[Cluster, tuple[EndpointKey, ...]] = {}
        self.published_generation = -1
        self.rebuilds = 0
        self.endpoint_refreshes = 0
        self.last_rebuild_seconds = 0.0
        self._scheduled = False
        self._compiling = False
        self._carried_kinds: set[str] = set()  # changes that came while a compile ran
        self._carried_services: set[tuple[str, str]] = set()
        # Set by the supervisor: compile there (a one-thread executor); None: on the loop.
        self.compile_thread: concurrent.futures.Executor | None = None
        self._reported: set[str] = set()
        self.on_published: list[Callable[[CompileResult], None]] = []
        # (seconds, full compile?) of each update published: metrics.PodMetrics.published.
        self.on_timed: list[Callable[[float, bool], None]] = []
        self.compile_failures = 0
        store.subscribe(self.changed)

    def changed(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self.rebuild)

    def rebuild(self) -> None:
        self._scheduled = False
        started = time.perf_counter()
        kinds, services = self.store.take_changes()
        kinds |= self._carried_kinds
        services |= self._carried_services
        self._carried_kinds, self._carried_services = set(), set()
        generation = self.store.generation
        if self.last is not None and kinds == {"EndpointSlice"}:
            self._refresh_endpoints(services)
            if not self._compiling:
                self.published_generation = generation
            else:  # the compile in flight read older slices: resolve these again after it
                self._carried_kinds.add("EndpointSlice")
                self._carried_services |= services
            self.endpoint_refreshes += 1
            self.last_rebuild_seconds = time.perf_counter() - started
            for timed in self.on_timed:
                timed(self.last_rebuild_seconds, False)
            return
        if self._compiling:  # one compile at a time; this change is compiled after it
            self._carried_kinds |= kinds
            self._carried_services |= services
            return
        snapshot = self.store.snapshot()
        if self.compile_thread is None:
            self._compiled(self._compile(snapshot), snapshot.generation, started)
            return
        # Off the loop, in a thread: the loop goes on applying EndpointSlice events meanwhile.
        self._compiling = True
        future = self.loop.run_in_executor(self.compile_thread, self._compile, snapshot)
        future.add_done_callback(lambda f: self._compiled(f.result(), snapshot.generation, started))

    def _compile(self, snapshot: Snapshot) -> CompileResult | None:
        try:
            return compile_routes(
                snapshot,
                only_class=self.only_class,
                balancers=self.balancers,
                default_balancer=self.default_balancer,
                outlier=self.outlier,
            )
        except Exception:  # compile is meant to be total; if not, keep the last good table
            self.compile_failures += 1
            log.exception("compiling routes failed; the last good table keeps serving")
            return None

    def _compiled(self, result: CompileResult | None, generation: int, started: float) -> None:
        self._compiling = False
        if result is not None:
            self._publish(result, generation, started)
        if self._carried_kinds:  # what changed while it compiled
            self.changed()

    def _publish(self, result: CompileResult, generation: int, started: float) -> None:
        # One line per problem, when it appears: not again on every rebuild.
        current = set(result.diagnostics)
        for line in result.diagnostics:
            if line not in self._reported:
                log.warning("%s", line)
        self._reported = current
        self.endpoints = {c: c.keys for c in result.table.clusters()}
        for publisher in self.publishers:
            publisher.publish(result)
        self.last = result
        self.published_generation = generation
        self.rebuilds += 1
        self.last_rebuild_seconds = time.perf_counter() - started
        for callback in self.on_published:
            callback(result)
        for timed in self.on_timed:
            timed(self.last_rebuild_seconds, True)

    def _refresh_endpoints(self, services: set[tuple[str, str]]) -> None:
        """Only EndpointSlices changed: the routes stand; the affected clusters get new keys.

        Reads only the changed Services' slices (the store indexes them), so an event costs
        what changed. Gives the same endpoints a full compile would (test_compile checks).
        """
        assert self.last is not None
        table = self.last.table
        diagnostics: list[str] = []
        changes: EndpointChanges = []
        for service in services:
            slices = self.store.slices_of(service)
            for cluster in table.clusters_by_service.get(service, ()):
                keys = resolve_endpoints(slices, service[0], cluster.port_name, diagnostics)
                if keys != self.endpoints.get(cluster):
                    self.endpoints[cluster] = keys
                    changes.append((cluster, keys))
        # Sent even when nothing changed: the workers then acknowledge the new generation
        # (readiness and the convergence histogram count on every change being acknowledged).
        for publisher in self.publishers:
            publisher.refresh_endpoints(changes)
        for line in diagnostics:
            if line not in self._reported:
                self._reported.add(line)
                log.warning("%s", line)

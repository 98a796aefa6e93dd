"""Store changes -> compile -> publish: the one-way pipe between sources and the hot path.

A burst of changes (a manifest directory rewritten, a watch delivering many events) is
coalesced into one update: a change schedules one on the next loop turn unless one is
already scheduled. What it costs follows what changed:
- EndpointSlices only: the changed Services' clusters get new endpoints (Envoy's EDS);
- Ingresses, Services, Secrets: RouteCompiler.update recompiles the Ingresses they touch
  (on the loop: a fraction of a millisecond each);
- the first table and IngressClass changes (which Ingresses are ours): a full build, in the
  supervisor's compile thread over a snapshot, while the loop keeps applying endpoint events.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import time
from collections.abc import Callable, Collection, Mapping
from types import MappingProxyType
from typing import Any, Protocol

from edgeproxy.compile import CompileResult, RouteCompiler, SnapshotSource
from edgeproxy.config import OutlierSettings
from edgeproxy.hosts import EndpointKey
from edgeproxy.objects import ObjectKey, ObjectStore
from edgeproxy.routing import Cluster

log = logging.getLogger("edgeproxy.pipeline")

EndpointChanges = list[tuple[Cluster, tuple[EndpointKey, ...]]]
# An update that would recompile more Ingresses than this (a Service that thousands of them
# name, a manifest directory rewritten) is a whole build in the compile thread instead: about
# 50 us per Ingress either way, but off the supervisor's loop.
LARGE_UPDATE = 2000


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
        self.dp.publish(result.table, result.endpoints)

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
        self.compiler: RouteCompiler | None = None  # the table's state since the last build
        self.last: CompileResult | None = None
        self.published_generation = -1
        self.rebuilds = 0  # tables published (full builds and updates)
        self.full_builds = 0
        self.endpoint_refreshes = 0
        self.last_rebuild_seconds = 0.0
        self._scheduled = False
        self._compiling = False  # a full build runs in the compile thread
        self._need_build = False  # an IngressClass change, or a failed update: build anew
        # Changes that came while a full build ran, applied to its result after it.
        self._carried_kinds: set[str] = set()
        self._carried_services: set[tuple[str, str]] = set()
        self._carried_keys: set[ObjectKey] = set()
        # Set by the supervisor: build there (a one-thread executor); None: on the loop.
        self.compile_thread: concurrent.futures.Executor | None = None
        self._reported: set[str] = set()
        self.on_published: list[Callable[[CompileResult], None]] = []
        # (seconds, table compiled?) of each update published: metrics.PodMetrics.published.
        self.on_timed: list[Callable[[float, bool], None]] = []
        self.compile_failures = 0
        store.subscribe(self.changed)

    @property
    def endpoints(self) -> Mapping[Cluster, tuple[EndpointKey, ...]]:
        """Each cluster's endpoints as last published (the table is never written)."""
        return MappingProxyType(self.compiler.endpoints) if self.compiler is not None else {}

    def routed(self) -> list[tuple[Cluster, tuple[EndpointKey, ...]]]:
        """(cluster, endpoints) of each cluster the table routes to."""
        compiler = self.compiler
        if compiler is None:
            return []
        return [(c, compiler.endpoints.get(c, c.keys)) for c in compiler.live]

    def changed(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self.rebuild)

    def rebuild(self) -> None:
        self._scheduled = False
        started = time.perf_counter()
        kinds, services, keys = self.store.take_changes()
        kinds |= self._carried_kinds
        services |= self._carried_services
        keys |= self._carried_keys
        self._carried_kinds, self._carried_services, self._carried_keys = set(), set(), set()
        generation = self.store.generation
        if self._compiling:
            # The build in flight read older objects: all of this is applied again after it.
            self._carried_kinds |= kinds
            self._carried_services |= services
            self._carried_keys |= keys
            if services and self.compiler is not None:  # meanwhile, the serving table's too
                self._refresh_endpoints(services)
            return
        if (self.compiler is None or self._need_build or "IngressClass" in kinds
                or self.compiler.reach(keys) > LARGE_UPDATE):  # fmt: skip
            self._build(started)
            return
        if services:
            self._refresh_endpoints(services)
        if kinds - {"EndpointSlice"}:
            try:
                result = self.compiler.update(keys, generation)
            except Exception:  # meant to be total; if not, build anew from the store
                self.compile_failures += 1
                log.exception("updating routes failed; building the table anew")
                self._need_build = True
                self.changed()
                return
            self._publish(result, generation, started, full=False)
            return
        self.published_generation = generation
        self.endpoint_refreshes += 1
        self.last_rebuild_seconds = time.perf_counter() - started
        for timed in self.on_timed:
            timed(self.last_rebuild_seconds, False)

    def _build(self, started: float) -> None:
        snapshot = self.store.snapshot()
        compiler = RouteCompiler(SnapshotSource(snapshot), only_class=self.only_class,
                                 balancers=self.balancers, default_balancer=self.default_balancer,
                                 outlier=self.outlier)  # fmt: skip

        def build() -> CompileResult | None:
            # A build makes an object or more per route: no cycle collections meanwhile
            # (each would walk the whole table being built).
            collecting = gc.isenabled()
            gc.disable()
            try:
                return compiler.build(snapshot.generation)
            except Exception:  # meant to be total; if not, keep the last good table
                self.compile_failures += 1
                log.exception("compiling routes failed; the last good table keeps serving")
                return None
            finally:
                if collecting:
                    gc.enable()

        self._need_build = False
        if self.compile_thread is None:
            self._built(compiler, build(), snapshot.generation, started)
            return
        # Off the loop, in a thread: the loop goes on applying EndpointSlice events meanwhile.
        self._compiling = True
        future = self.loop.run_in_executor(self.compile_thread, build)
        future.add_done_callback(
            lambda f: self._built(compiler, f.result(), snapshot.generation, started))

    def _built(self, compiler: RouteCompiler, result: CompileResult | None, generation: int,
               started: float) -> None:  # fmt: skip
        self._compiling = False
        if result is None:
            self._need_build = True  # the next change tries again
        else:
            compiler.source = self.store  # from now on, updates read the live store
            self.compiler = compiler
            self.full_builds += 1
            self._publish(result, generation, started, full=True)
        if self._carried_kinds:  # what changed while it compiled
            self.changed()

    def _publish(self, result: CompileResult, generation: int, started: float,
                 full: bool) -> None:  # fmt: skip
        # One line per problem, when it appears: not again on every update.
        current = set(result.diagnostics)
        for line in result.diagnostics:
            if line not in self._reported:
                log.warning("%s", line)
        self._reported = current
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
        """EndpointSlices changed: the routes stand; the affected clusters get new keys.

        Reads only the changed Services' slices (the store indexes them), so an event costs
        what changed. Gives the same endpoints a full compile would (test_compile checks).
        """
        assert self.compiler is not None
        diagnostics: list[str] = []
        changes = self.compiler.refresh_endpoints(services, diagnostics)
        # Sent even when nothing changed: the workers then acknowledge the new generation
        # (readiness and the convergence histogram count on every change being acknowledged).
        for publisher in self.publishers:
            publisher.refresh_endpoints(changes)
        for line in diagnostics:
            if line not in self._reported:
                self._reported.add(line)
                log.warning("%s", line)

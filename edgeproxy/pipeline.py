"""Store changes -> compile -> publish: the one-way pipe between sources and the hot path.

A burst of changes (a manifest directory rewritten, a watch delivering many events) is
coalesced into one rebuild: a change schedules a rebuild on the next loop turn unless one is
already scheduled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection

from edgeproxy.compile import (
    CompileResult,
    compile_routes,
    index_endpoint_slices,
    resolve_endpoints,
)
from edgeproxy.config import OutlierSettings
from edgeproxy.objects import ObjectStore, Snapshot
from edgeproxy.proxy.dataplane import Dataplane

log = logging.getLogger("edgeproxy.pipeline")


class RoutePipeline:
    def __init__(
        self,
        store: ObjectStore,
        dataplanes: list[Dataplane],
        *,
        only_class: str | None,
        balancers: Collection[str],
        default_balancer: str,
        loop: asyncio.AbstractEventLoop,
        outlier: OutlierSettings | None = None,
    ) -> None:
        self.outlier = outlier
        self.store = store
        self.dataplanes = dataplanes
        self.only_class = only_class
        self.balancers = balancers
        self.default_balancer = default_balancer
        self.loop = loop
        self.last: CompileResult | None = None
        self.published_generation = -1
        self.rebuilds = 0
        self.endpoint_refreshes = 0
        self.last_rebuild_seconds = 0.0
        self._scheduled = False
        self._reported: set[str] = set()
        self.on_published: list[Callable[[CompileResult], None]] = []
        store.subscribe(self.changed)

    def changed(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self.rebuild)

    def rebuild(self) -> None:
        self._scheduled = False
        started = time.perf_counter()
        kinds, services = self.store.take_changes()
        snapshot = self.store.snapshot()
        if self.last is not None and kinds == {"EndpointSlice"}:
            self._refresh_endpoints(snapshot, services)
            self.published_generation = snapshot.generation
            self.endpoint_refreshes += 1
            self.last_rebuild_seconds = time.perf_counter() - started
            return
        try:
            result = compile_routes(
                snapshot,
                only_class=self.only_class,
                balancers=self.balancers,
                default_balancer=self.default_balancer,
                outlier=self.outlier,
            )
        except Exception:  # compile is meant to be total; if not, keep the last good table
            log.exception("compiling routes failed; the last good table keeps serving")
            return
        # One line per problem, when it appears: not again on every rebuild.
        current = set(result.diagnostics)
        for line in result.diagnostics:
            if line not in self._reported:
                log.warning("%s", line)
        self._reported = current
        for dp in self.dataplanes:
            dp.publish(result.table)
        self.last = result
        self.published_generation = snapshot.generation
        self.rebuilds += 1
        self.last_rebuild_seconds = time.perf_counter() - started
        for callback in self.on_published:
            callback(result)

    def _refresh_endpoints(self, snapshot: Snapshot, services: set[tuple[str, str]]) -> None:
        """Only EndpointSlices changed: the routes stand; the affected clusters get new keys.

        Gives the same endpoints a full compile would (test_compile checks both ways agree).
        """
        assert self.last is not None
        table = self.last.table
        index = index_endpoint_slices(snapshot, only=services)
        diagnostics: list[str] = []
        for service in services:
            for cluster in table.clusters_by_service.get(service, ()):
                keys = resolve_endpoints(index.get(service, []), service[0], cluster.port_name,
                                         diagnostics)  # fmt: skip
                for dp in self.dataplanes:
                    binding = dp.bindings.get(cluster)
                    if binding is not None and keys != binding.keys:
                        dp.refresh_endpoints(cluster, keys)
        for dp in self.dataplanes:
            dp.retain_live()
        for line in diagnostics:
            if line not in self._reported:
                self._reported.add(line)
                log.warning("%s", line)

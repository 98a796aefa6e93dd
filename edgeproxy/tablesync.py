"""The route table on its way from the supervisor's compile to every worker, as deltas.

The supervisor compiles once per change; each worker must then serve the new table without
a pause proportional to the table's size (a worker's event loop is the hot path). So what
crosses the process boundary is what changed since the last message, not the table:

- clusters get a stable id (cid) from their configuration (everything but the endpoints): a
  recompile that leaves a Service port's settings alone keeps its cid, so the worker keeps
  its binding, balancer position and pooled connections (Envoy's CDS keeps a cluster whose
  config did not change);
- per host group, a comparison with the group last sent (clusters compared by their config)
  decides whether the group is sent again;
- endpoints travel per cid (Envoy's EDS): an EndpointSlice event is a few bytes.

Routes travel as plain tuples with cids in place of clusters (pickled in C), rebuilt by the
worker around its own Cluster objects. A worker that (re)starts gets the whole state once (`TableSender.full`).
Cost: after a full build the supervisor compares every host group with the one last sent
(O(table), beside the build; nothing for the first table); after an update
(compile.TableDelta) only the groups and clusters it touched. A worker's
apply costs one dict copy per host kind plus what changed.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from edgeproxy.compile import TableDelta
from edgeproxy.hosts import EndpointKey
from edgeproxy.routing import EMPTY_TABLE, Cluster, HostRoutes, Route, RouteTable

# Host groups of a table: exact host, wildcard suffix, host-less rules, the default backend.
EXACT, WILDCARD, ANY, DEFAULT = 0, 1, 2, 3
GroupKey = tuple[int, str]
Keys = tuple[EndpointKey, ...]


# A route crosses as a plain tuple with its cluster's cid, so pickle runs in C from end to end
# (a Pickler with persistent ids calls back into Python for every object it writes: most of
# the time of sending a 50,000-host table).
RouteData = tuple[str, str, str, str, int, bool, "bytes | None"]


def _route_data(route: Route, cids: Mapping[Cluster, int]) -> RouteData:
    return (route.ingress, route.host, route.path, route.path_type, cids[route.cluster],
            route.ssl_redirect, route.hsts)  # fmt: skip


def _route(data: RouteData, clusters: Mapping[int, Cluster]) -> Route:
    ingress, host, path, path_type, cid, ssl_redirect, hsts = data
    return Route(ingress, host, path, path_type, clusters[cid], ssl_redirect, hsts)


def _encode_group(group: HostRoutes | Route | None, cids: Mapping[Cluster, int]) -> Any:
    if group is None:
        return None
    if isinstance(group, Route):
        return _route_data(group, cids)
    prefix = [(p, _route_data(r, cids)) for p, r in group.below.items()]
    if group.root is not None:
        prefix.append(("/", _route_data(group.root, cids)))
    return ([(p, _route_data(r, cids)) for p, r in group.exact.items()], prefix)


def _decode_group(data: Any, clusters: Mapping[int, Cluster]) -> HostRoutes | Route | None:
    if data is None:
        return None
    if isinstance(data[0], str):  # a route's tuple starts with its Ingress
        return _route(data, clusters)
    exact, prefix = data
    return HostRoutes.of({p: _route(r, clusters) for p, r in exact},
                         {p: _route(r, clusters) for p, r in prefix})  # fmt: skip


def group_key(host: str) -> GroupKey:
    """The group a compiled host's routes travel as ("" is the host-less group)."""
    if host == "":
        return (ANY, "")
    if host.startswith("*."):
        return (WILDCARD, host[1:])
    return (EXACT, host)


def _group(table: RouteTable, key: GroupKey) -> HostRoutes | Route | None:
    kind, host = key
    if kind == EXACT:
        return table.exact_hosts.get(host)
    if kind == WILDCARD:
        return table.wildcard_hosts.get(host)
    return table.any_host if kind == ANY else table.default_route


def _same_route(a: Route, b: Route) -> bool:
    """Whether a worker holding route a would serve b the same (clusters compare by their
    config: one config is one cid, and endpoints travel per cid)."""
    return a is b or (a.ingress == b.ingress and a.path == b.path and a.host == b.host
                      and a.path_type == b.path_type and a.ssl_redirect == b.ssl_redirect
                      and a.hsts == b.hsts
                      and (a.cluster is b.cluster or a.cluster.config() == b.cluster.config()))  # fmt: skip


def _same_paths(a: Mapping[str, Route], b: Mapping[str, Route]) -> bool:
    if len(a) != len(b):
        return False
    for path, route in a.items():
        other = b.get(path)
        if other is None or not _same_route(route, other):
            return False
    return True


def _same_group(a: HostRoutes | Route | None, b: HostRoutes | Route) -> bool:
    if a is b:
        return True
    if a is None or type(a) is not type(b):
        return False
    if isinstance(a, Route):
        return _same_route(a, b)  # type: ignore[arg-type]
    root, other = a.root, b.root  # type: ignore[union-attr]
    if (root is None) != (other is None) or (root is not None and not _same_route(root, other)):  # type: ignore[arg-type]
        return False
    return _same_paths(a.exact, b.exact) and _same_paths(a.below, b.below)  # type: ignore[union-attr]


def _groups(table: RouteTable) -> dict[GroupKey, HostRoutes | Route]:
    groups: dict[GroupKey, HostRoutes | Route] = {}
    for host, hr in table.exact_hosts.items():
        groups[(EXACT, host)] = hr
    for suffix, hr in table.wildcard_hosts.items():
        groups[(WILDCARD, suffix)] = hr
    if table.any_host is not None:
        groups[(ANY, "")] = table.any_host
    if table.default_route is not None:
        groups[(DEFAULT, "")] = table.default_route
    return groups


class TableSender:
    """Supervisor side: compiled tables in, messages for the workers out."""

    def __init__(self) -> None:
        self._next_cid = 0
        self._cid_by_signature: dict[tuple[Any, ...], int] = {}
        self.cids: dict[Cluster, int] = {}  # the current table's cluster objects -> cid
        self.cid_refs: dict[int, int] = {}  # cid -> cluster objects of the table that have it
        self.clusters: dict[int, Cluster] = {}  # cid -> definition as the workers hold it
        self.keys: dict[int, Keys] = {}  # cid -> endpoints as the workers hold them
        # (cid, endpoints before, after) of the last update or refresh; None after a full one.
        self.key_changes: list[tuple[int, Keys, Keys]] | None = None
        # The last table sent: its groups are what the workers hold (no copy kept per group).
        self._sent: RouteTable = EMPTY_TABLE
        self.tls_hosts: frozenset[str] = frozenset()
        self.generation = 0

    def update(self, table: RouteTable, delta: TableDelta | None,
               current: Mapping[Cluster, Keys]) -> tuple[Any, ...]:  # fmt: skip
        """The message that brings workers from the last table to this one. `current`: each
        cluster's endpoints now (a cluster's own keys are those it was compiled with)."""
        if delta is not None:
            return self._update(table, delta, current)
        self.key_changes = None
        cids: dict[Cluster, int] = {}
        refs: dict[int, int] = {}
        defines: list[tuple[int, Cluster]] = []
        endpoints: list[tuple[int, Keys]] = []
        for cluster in table.clusters():
            keys = current.get(cluster, cluster.keys)
            signature = cluster.config()
            cid = self._cid_by_signature.get(signature)
            if cid is None:
                cid = self._define(cluster, keys, defines)
            elif self.keys[cid] != keys:
                self.keys[cid] = keys
                endpoints.append((cid, keys))
            cids[cluster] = cid
            refs[cid] = refs.get(cid, 0) + 1
        self.cids, self.cid_refs = cids, refs
        undefines = [cid for cid in self.clusters if cid not in refs]
        for cid in undefines:
            self._undefine(cid)
        groups = _groups(table)
        changes = self._changed(groups.items())
        changes.extend((key, None) for key in _groups(self._sent) if key not in groups)
        return self._message(table, defines, undefines, endpoints, changes)

    def _update(self, table: RouteTable, delta: TableDelta,
                current: Mapping[Cluster, Keys]) -> tuple[Any, ...]:  # fmt: skip
        """After compile.RouteCompiler.update: only what the delta names."""
        key_changes: list[tuple[int, Keys, Keys]] = []
        defines: list[tuple[int, Cluster]] = []
        endpoints: list[tuple[int, Keys]] = []
        undefines: list[int] = []
        for cluster in delta.added:  # before the removed: a replacement keeps its cid
            keys = current.get(cluster, cluster.keys)
            cid = self._cid_by_signature.get(cluster.config())
            if cid is None:
                cid = self._define(cluster, keys, defines)
                key_changes.append((cid, (), keys))
            else:
                self.cid_refs[cid] += 1
                if self.keys[cid] != keys:
                    key_changes.append((cid, self.keys[cid], keys))
                    self.keys[cid] = keys
                    endpoints.append((cid, keys))
            self.cids[cluster] = cid
        for cluster in delta.removed:
            cid = self.cids.pop(cluster)
            self.cid_refs[cid] -= 1
            if self.cid_refs[cid] == 0:
                key_changes.append((cid, self.keys[cid], ()))
                self._undefine(cid)
                undefines.append(cid)
        for cluster, keys in delta.endpoints:
            cid = self.cids.get(cluster)
            if cid is not None and self.keys[cid] != keys:
                key_changes.append((cid, self.keys[cid], keys))
                self.keys[cid] = keys
                endpoints.append((cid, keys))
        touched = [group_key(host) for host in delta.hosts]
        if delta.default:
            touched.append((DEFAULT, ""))
        groups = [(key, _group(table, key)) for key in touched]
        changes = self._changed([(key, group) for key, group in groups if group is not None])
        changes.extend((key, None) for key, group in groups
                       if group is None and _group(self._sent, key) is not None)  # fmt: skip
        self.key_changes = key_changes
        return self._message(table, defines, undefines, endpoints, changes)

    def _define(self, cluster: Cluster, keys: Keys, defines: list[tuple[int, Cluster]]) -> int:
        cid = self._cid_by_signature[cluster.config()] = self._next_cid
        self._next_cid += 1
        self.clusters[cid] = cluster
        self.keys[cid] = keys
        self.cid_refs[cid] = 1
        defines.append((cid, cluster if keys == cluster.keys else replace(cluster, keys=keys)))
        return cid

    def _undefine(self, cid: int) -> None:
        del self._cid_by_signature[self.clusters.pop(cid).config()]
        del self.keys[cid]
        self.cid_refs.pop(cid, None)

    def _changed(self, groups: Iterable[tuple[GroupKey, HostRoutes | Route]]
                 ) -> list[tuple[GroupKey, HostRoutes | Route | None]]:  # fmt: skip
        """The groups whose routes differ from what the workers hold. Compared with the group
        last sent, when there is one (nothing is kept per group but the group itself, and a
        first table compares nothing)."""
        held = self._sent
        return [(key, group) for key, group in groups
                if not _same_group(_group(held, key), group)]  # fmt: skip

    def _message(self, table: RouteTable, defines: list[tuple[int, Cluster]], undefines: list[int],
                 endpoints: list[tuple[int, Keys]],
                 changes: list[tuple[GroupKey, HostRoutes | Route | None]]) -> tuple[Any, ...]:  # fmt: skip
        tls_hosts = table.tls_hosts if table.tls_hosts != self.tls_hosts else None
        self.tls_hosts = table.tls_hosts
        self.generation = table.generation
        self._sent = table
        if not (defines or undefines or endpoints or changes or tls_hosts is not None):
            return ("generation", table.generation)
        return ("table", table.generation, defines, undefines, endpoints,
                self._encode(changes, tls_hosts))  # fmt: skip

    def refresh(self, changes: list[tuple[Cluster, Keys]], generation: int) -> tuple[Any, ...]:
        """An EndpointSlice-only change: new endpoints for live clusters."""
        endpoints = []
        key_changes = []
        for cluster, keys in changes:
            cid = self.cids.get(cluster)
            if cid is not None and self.keys[cid] != keys:
                key_changes.append((cid, self.keys[cid], keys))
                self.keys[cid] = keys
                endpoints.append((cid, keys))
        self.key_changes = key_changes
        self.generation = generation
        return ("endpoints", generation, endpoints)

    def full(self) -> tuple[Any, ...]:
        """Everything, for a worker that starts with nothing."""
        defines = [(cid, replace(c, keys=self.keys[cid])) for cid, c in self.clusters.items()]
        return ("table", self.generation, defines, [], [],
                self._encode(list(_groups(self._sent).items()), self.tls_hosts))  # fmt: skip

    def _encode(self, changes: list[tuple[GroupKey, HostRoutes | Route | None]],
                tls_hosts: frozenset[str] | None) -> bytes:  # fmt: skip
        cids = self.cids
        data = [(key, _encode_group(group, cids)) for key, group in changes]
        return pickle.dumps((data, tls_hosts), protocol=pickle.HIGHEST_PROTOCOL)


class TableReceiver:
    """Worker side: messages in, the next immutable RouteTable out."""

    def __init__(self) -> None:
        self.clusters: dict[int, Cluster] = {}
        self.exact: dict[str, HostRoutes] = {}
        self.wildcard: dict[str, HostRoutes] = {}
        self.any_host: HostRoutes | None = None
        self.default_route: Route | None = None
        self.tls_hosts: frozenset[str] = frozenset()
        self.table: RouteTable | None = None

    def apply_table(self, message: tuple[Any, ...]
                    ) -> tuple[RouteTable, list[Cluster], list[Cluster], list[tuple[Cluster, Keys]]]:  # fmt: skip
        """-> (table, clusters defined, clusters gone, (cluster, endpoints) changed)."""
        _, generation, defines, undefines, endpoints, blob = message
        defined = []
        for cid, cluster in defines:
            self.clusters[cid] = cluster
            defined.append(cluster)
        gone = [self.clusters.pop(cid) for cid in undefines]
        changed = [(self.clusters[cid], keys) for cid, keys in endpoints]
        data, tls_hosts = pickle.loads(blob)
        clusters = self.clusters
        changes: list[tuple[GroupKey, Any]] = [(key, _decode_group(group, clusters))
                                               for key, group in data]  # fmt: skip
        if changes:
            exact, wildcard = dict(self.exact), dict(self.wildcard)
            for (kind, host), group in changes:
                if kind == EXACT:
                    _set(exact, host, group)
                elif kind == WILDCARD:
                    _set(wildcard, host, group)
                elif kind == ANY:
                    self.any_host = group
                else:
                    self.default_route = group
            self.exact, self.wildcard = exact, wildcard
        if tls_hosts is not None:
            self.tls_hosts = tls_hosts
        self.table = RouteTable(MappingProxyType(self.exact), MappingProxyType(self.wildcard),
                                self.any_host, self.default_route, self.tls_hosts, generation)  # fmt: skip
        return self.table, defined, gone, changed

    def apply_endpoints(self, message: tuple[Any, ...]) -> list[tuple[Cluster, Keys]]:
        return [(self.clusters[cid], keys) for cid, keys in message[2] if cid in self.clusters]


def _set(groups: dict[str, Any], host: str, group: Any) -> None:
    if group is None:
        groups.pop(host, None)
    else:
        groups[host] = group

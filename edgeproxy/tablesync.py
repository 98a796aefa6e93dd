"""The route table on its way from the supervisor's compile to every worker, as deltas.

The supervisor compiles once per change; each worker must then serve the new table without
a pause proportional to the table's size (a worker's event loop is the hot path). So what
crosses the process boundary is what changed since the last message, not the table:

- clusters get a stable id (cid) from their configuration (everything but the endpoints): a
  recompile that leaves a Service port's settings alone keeps its cid, so the worker keeps
  its binding, balancer position and pooled connections (Envoy's CDS keeps a cluster whose
  config did not change);
- per host group, the routes' signature (with cids in place of clusters) decides whether the
  group is sent again;
- endpoints travel per cid (Envoy's EDS): an EndpointSlice event is a few bytes.

Routes are pickled with clusters as persistent ids, resolved by the worker to its own Cluster
objects. A worker that (re)starts gets the whole state once (`TableSender.full`).
Cost: after a full build the supervisor signs every host group (O(table), beside the build);
after an update (compile.TableDelta) only the groups and clusters it touched. A worker's
apply costs one dict copy per host kind plus what changed.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterable, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from edgeproxy.compile import TableDelta
from edgeproxy.hosts import EndpointKey
from edgeproxy.routing import Cluster, HostRoutes, Route, RouteTable

# Host groups of a table: exact host, wildcard suffix, host-less rules, the default backend.
EXACT, WILDCARD, ANY, DEFAULT = 0, 1, 2, 3
GroupKey = tuple[int, str]
Keys = tuple[EndpointKey, ...]


def _frozen(mapping: dict[Any, Any]) -> Mapping[Any, Any]:
    return MappingProxyType(mapping)


class _Pickler(pickle.Pickler):
    def __init__(self, buffer: io.BytesIO, cids: dict[Cluster, int]) -> None:
        super().__init__(buffer, protocol=pickle.HIGHEST_PROTOCOL)
        self.cids = cids

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is Cluster:
            return self.cids[obj]
        return None

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is MappingProxyType:
            return _frozen, (dict(obj),)
        return NotImplemented


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, clusters: dict[int, Cluster]) -> None:
        super().__init__(io.BytesIO(data))
        self.clusters = clusters

    def persistent_load(self, pid: Any) -> Any:
        return self.clusters[pid]


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
        self._signatures: dict[GroupKey, int] = {}
        self._groups: dict[GroupKey, HostRoutes | Route] = {}
        self.tls_hosts: frozenset[str] = frozenset()
        self.generation = 0

    def _route_signature(self, route: Route) -> tuple[Any, ...]:
        return (route.ingress, route.host, route.path, route.path_type, self.cids[route.cluster],
                route.ssl_redirect, route.hsts)  # fmt: skip

    def _group_signature(self, group: HostRoutes | Route) -> tuple[Any, ...]:
        if isinstance(group, Route):
            return self._route_signature(group)
        sign = self._route_signature
        return (tuple((p, sign(r)) for p, r in group.exact.items()),
                tuple((p, sign(r)) for p, r in group.prefix.items()))  # fmt: skip

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
        changes = self._sign(groups.items())
        changes.extend((key, None) for key in self._signatures if key not in groups)
        for key, _ in changes:
            if key not in groups:
                del self._signatures[key]
        self._groups = groups
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
        changes = self._sign([(key, group) for key, group in groups if group is not None])
        for key, group in groups:
            if group is None:
                self._groups.pop(key, None)
                if self._signatures.pop(key, None) is not None:
                    changes.append((key, None))
            else:
                self._groups[key] = group
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

    def _sign(self, groups: Iterable[tuple[GroupKey, HostRoutes | Route]]
              ) -> list[tuple[GroupKey, HostRoutes | Route | None]]:  # fmt: skip
        """The groups whose routes differ from what the workers hold."""
        changes: list[tuple[GroupKey, HostRoutes | Route | None]] = []
        signatures = self._signatures
        for key, group in groups:
            # Kept as a hash, not the tuple: one int per host instead of a copy of its routes
            # (the supervisor's memory per Ingress). Hashes are salted per process (SipHash for
            # the strings in it), so a collision cannot be aimed at; by chance it is ~2**-64.
            digest = hash(self._group_signature(group))
            if signatures.get(key) != digest:
                signatures[key] = digest
                changes.append((key, group))
        return changes

    def _message(self, table: RouteTable, defines: list[tuple[int, Cluster]], undefines: list[int],
                 endpoints: list[tuple[int, Keys]],
                 changes: list[tuple[GroupKey, HostRoutes | Route | None]]) -> tuple[Any, ...]:  # fmt: skip
        tls_hosts = table.tls_hosts if table.tls_hosts != self.tls_hosts else None
        self.tls_hosts = table.tls_hosts
        self.generation = table.generation
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
                self._encode(list(self._groups.items()), self.tls_hosts))  # fmt: skip

    def _encode(self, changes: list[tuple[GroupKey, HostRoutes | Route | None]],
                tls_hosts: frozenset[str] | None) -> bytes:  # fmt: skip
        buffer = io.BytesIO()
        _Pickler(buffer, self.cids).dump((changes, tls_hosts))
        return buffer.getvalue()


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
        changes, tls_hosts = _Unpickler(blob, self.clusters).load()
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

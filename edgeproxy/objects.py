"""The object store: the Kubernetes objects edgeproxy knows, as plain dicts.

Sources (manifest files, the API server watch) put objects here and call `changed()`; they never
touch the route table. A consumer takes an immutable `Snapshot` and compiles it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

# The kinds compile() reads; everything else in a manifest is ignored.
KINDS = ("Ingress", "IngressClass", "Service", "EndpointSlice", "Secret")

ObjectKey = tuple[str, str, str]  # (kind, namespace, name); namespace "" for cluster objects
K8sObject = dict[str, Any]


# What no compile reads and a real cluster's objects carry, often as most of their bytes.
DROPPED_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration",)


def slim(obj: K8sObject) -> K8sObject:
    """Drop metadata.managedFields and kubectl's last-applied copy: memory per object."""
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        meta.pop("managedFields", None)
        annotations = meta.get("annotations")
        if isinstance(annotations, dict):
            for name in DROPPED_ANNOTATIONS:
                annotations.pop(name, None)
    return obj


def object_key(obj: Mapping[str, Any]) -> ObjectKey | None:
    kind = obj.get("kind")
    meta = obj.get("metadata") or {}
    name = meta.get("name") if isinstance(meta, dict) else None
    if kind not in KINDS or not isinstance(name, str) or not name:
        return None
    namespace = "" if kind == "IngressClass" else (meta.get("namespace") or "default")
    return (kind, namespace, name)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What compile() sees: every object by key, and the same objects grouped by kind."""

    objects: Mapping[ObjectKey, K8sObject]
    generation: int
    kinds: Mapping[str, Mapping[ObjectKey, K8sObject]] = field(
        default_factory=lambda: MappingProxyType({}))

    def of_kind(self, kind: str) -> Iterable[tuple[ObjectKey, K8sObject]]:
        return (self.kinds.get(kind) or {}).items()


def service_label(obj: K8sObject | None) -> str | None:
    """The Service an EndpointSlice belongs to (label kubernetes.io/service-name)."""
    labels = ((obj or {}).get("metadata") or {}).get("labels") or {}
    service = labels.get("kubernetes.io/service-name") if isinstance(labels, dict) else None
    return service if isinstance(service, str) and service else None


class ObjectStore:
    """Objects grouped by the source that supplied them, so a source can replace its own set.

    Beside the per-source sets it keeps the merged view by kind and the EndpointSlices by
    Service, updated per object: a change costs what changed, not the size of the store (an
    EndpointSlice event reads only its Service's slices).
    """

    def __init__(self) -> None:
        self._by_source: dict[str, dict[ObjectKey, K8sObject]] = {}
        self._kinds: dict[str, dict[ObjectKey, K8sObject]] = {kind: {} for kind in KINDS}
        self._slices: dict[tuple[str, str], dict[ObjectKey, K8sObject]] = {}
        self._generation = 0
        self._listeners: list[Callable[[], None]] = []
        # What changed since the last take_changes(): which kinds, and for EndpointSlices,
        # which Services (namespace, name) they belong to, before and after the change.
        self._changed_kinds: set[str] = set()
        self._changed_services: set[tuple[str, str]] = set()
        self._changed_keys: set[ObjectKey] = set()  # of the other kinds

    @property
    def generation(self) -> int:
        return self._generation

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def replace(self, source: str, objects: Iterable[K8sObject]) -> None:
        fresh: dict[ObjectKey, K8sObject] = {}
        for obj in objects:
            key = object_key(obj)
            if key is not None:
                fresh[key] = slim(obj)
        old = self._by_source.get(source, {})
        self._by_source[source] = fresh
        changed = False
        for key in old.keys() | fresh.keys():
            before, after = old.get(key), fresh.get(key)
            if before is not after and before != after:
                self._merge(key)
                changed = True
        if changed:
            self._changed()

    def upsert(self, source: str, obj: K8sObject) -> None:
        key = object_key(obj)
        if key is not None:
            self._by_source.setdefault(source, {})[key] = slim(obj)
            self._merge(key)
            self._changed()

    def delete(self, source: str, obj: K8sObject) -> None:
        key = object_key(obj)
        if key is None:
            return
        if self._by_source.get(source, {}).pop(key, None) is not None:
            self._merge(key)
            self._changed()

    def get(self, key: ObjectKey) -> K8sObject | None:
        return self._kinds[key[0]].get(key)

    def of_kind(self, kind: str) -> Iterable[tuple[ObjectKey, K8sObject]]:
        return self._kinds[kind].items()

    def count(self, kind: str) -> int:
        return len(self._kinds[kind])

    def slices_of(self, service: tuple[str, str]) -> list[K8sObject]:
        """A Service's EndpointSlices in name order (deterministic, as compile sorts them)."""
        slices = self._slices.get(service) or {}
        return [slices[k] for k in sorted(slices)]

    def _merge(self, key: ObjectKey) -> None:
        """Recompute the merged object for key: the last source (in order added) that has it."""
        after = None
        for objects in self._by_source.values():
            obj = objects.get(key)
            if obj is not None:
                after = obj
        kind = self._kinds[key[0]]
        before = kind.get(key)
        if after is None:
            kind.pop(key, None)
        else:
            kind[key] = after
        self._changed_kinds.add(key[0])
        if key[0] != "EndpointSlice":
            self._changed_keys.add(key)
        else:
            for obj, present in ((before, False), (after, True)):
                service = service_label(obj)
                if service is None:
                    continue
                self._changed_services.add((key[1], service))
                group = self._slices.setdefault((key[1], service), {})
                if present:
                    group[key] = obj  # type: ignore[assignment]
                else:
                    group.pop(key, None)
                    if not group:
                        del self._slices[(key[1], service)]

    def take_changes(self) -> tuple[set[str], set[tuple[str, str]], set[ObjectKey]]:
        """(kinds changed, Services whose EndpointSlices changed, the other objects changed)
        since the last call."""
        changes = (self._changed_kinds, self._changed_services, self._changed_keys)
        self._changed_kinds, self._changed_services, self._changed_keys = set(), set(), set()
        return changes

    def view(self) -> Snapshot:
        """The live objects as a Snapshot, without copying (for readers on the loop that are
        done before the next change: certificates, status)."""
        return Snapshot(_LiveObjects(self._kinds), self._generation, MappingProxyType(self._kinds))

    def snapshot(self) -> Snapshot:
        """A copy that later changes do not reach (one dict copy per kind, in C)."""
        kinds = {kind: dict(objects) for kind, objects in self._kinds.items()}
        merged: dict[ObjectKey, K8sObject] = {}
        for objects in kinds.values():
            merged.update(objects)
        return Snapshot(MappingProxyType(merged), self._generation,
                        MappingProxyType({k: MappingProxyType(v) for k, v in kinds.items()}))  # fmt: skip

    def _changed(self) -> None:
        self._generation += 1
        for listener in self._listeners:
            listener()


class _LiveObjects(Mapping[ObjectKey, K8sObject]):
    """Every kind's live dict as one mapping by key (ObjectStore.view)."""

    def __init__(self, kinds: dict[str, dict[ObjectKey, K8sObject]]) -> None:
        self.kinds = kinds

    def __getitem__(self, key: ObjectKey) -> K8sObject:
        objects = self.kinds.get(key[0])
        if objects is None:
            raise KeyError(key)
        return objects[key]

    def __iter__(self) -> Iterator[ObjectKey]:
        for objects in self.kinds.values():
            yield from objects

    def __len__(self) -> int:
        return sum(len(objects) for objects in self.kinds.values())

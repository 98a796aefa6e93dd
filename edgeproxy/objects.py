"""The object store: the Kubernetes objects edgeproxy knows, as plain dicts.

Sources (manifest files, the API server watch) put objects here and call `changed()`; they never
touch the route table. A consumer takes an immutable `Snapshot` and compiles it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

# The kinds compile() reads; everything else in a manifest is ignored.
KINDS = ("Ingress", "IngressClass", "Service", "EndpointSlice", "Secret")

ObjectKey = tuple[str, str, str]  # (kind, namespace, name); namespace "" for cluster objects
K8sObject = dict[str, Any]


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
    """What compile() sees: every object by key, plus which sources have listed fully."""

    objects: Mapping[ObjectKey, K8sObject]
    generation: int

    def of_kind(self, kind: str) -> Iterable[tuple[ObjectKey, K8sObject]]:
        return ((k, v) for k, v in self.objects.items() if k[0] == kind)


class ObjectStore:
    """Objects grouped by the source that supplied them, so a source can replace its own set."""

    def __init__(self) -> None:
        self._by_source: dict[str, dict[ObjectKey, K8sObject]] = {}
        self._generation = 0
        self._listeners: list[Callable[[], None]] = []
        # What changed since the last take_changes(): which kinds, and for EndpointSlices,
        # which Services (namespace, name) they belong to, before and after the change.
        self._changed_kinds: set[str] = set()
        self._changed_services: set[tuple[str, str]] = set()

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
                fresh[key] = obj
        old = self._by_source.get(source, {})
        changed = False
        for key in old.keys() | fresh.keys():
            before, after = old.get(key), fresh.get(key)
            if before is not after and before != after:
                self._note(key, before, after)
                changed = True
        self._by_source[source] = fresh
        if changed:
            self._changed()

    def upsert(self, source: str, obj: K8sObject) -> None:
        key = object_key(obj)
        if key is not None:
            objects = self._by_source.setdefault(source, {})
            self._note(key, objects.get(key), obj)
            objects[key] = obj
            self._changed()

    def delete(self, source: str, obj: K8sObject) -> None:
        key = object_key(obj)
        if key is None:
            return
        before = self._by_source.get(source, {}).pop(key, None)
        if before is not None:
            self._note(key, before, None)
            self._changed()

    def _note(self, key: ObjectKey, before: K8sObject | None, after: K8sObject | None) -> None:
        self._changed_kinds.add(key[0])
        if key[0] == "EndpointSlice":
            for obj in (before, after):
                labels = ((obj or {}).get("metadata") or {}).get("labels") or {}
                service = labels.get("kubernetes.io/service-name") if isinstance(labels, dict) else None  # fmt: skip
                if isinstance(service, str):
                    self._changed_services.add((key[1], service))

    def take_changes(self) -> tuple[set[str], set[tuple[str, str]]]:
        """(kinds changed, Services whose EndpointSlices changed) since the last call."""
        changes = (self._changed_kinds, self._changed_services)
        self._changed_kinds, self._changed_services = set(), set()
        return changes

    def snapshot(self) -> Snapshot:
        merged: dict[ObjectKey, K8sObject] = {}
        for objects in self._by_source.values():
            merged.update(objects)
        return Snapshot(MappingProxyType(merged), self._generation)

    def _changed(self) -> None:
        self._generation += 1
        for listener in self._listeners:
            listener()

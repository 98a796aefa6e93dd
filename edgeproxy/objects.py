"""The object store: the Kubernetes objects edgeproxy knows.

Sources (manifest files, the API server watch) put objects here and call `changed()`; they never
touch the route table. A consumer takes an immutable `Snapshot` and compiles it.

Objects are kept packed, as their JSON bytes (orjson), and handed out as fresh dicts. A parsed
Ingress is a dozen small containers, about 2 KiB; its bytes are a few hundred. At 50,000
Ingresses that was the largest part of the supervisor. What it costs: a decode (about a
microsecond) per object read, which the compile does once per Ingress it compiles. A reader
may change the dict it got; the store never sees it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import orjson

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


Packed = bytes | dict[str, Any]  # an object's JSON bytes; the dict itself if it has no JSON form


def pack(obj: K8sObject) -> Packed:
    """The object as JSON bytes. YAML can give what JSON cannot hold (integers beyond 64 bits,
    keys that are not strings, binary): such an object is kept as it is."""
    try:
        raw = orjson.dumps(obj)
    except TypeError:  # orjson.JSONEncodeError
        return obj
    # Copied: orjson's bytes keep the whole buffer it wrote into (4 KiB whatever the length).
    return bytes(memoryview(raw))


def unpack(packed: Packed) -> K8sObject:
    if type(packed) is bytes:
        return orjson.loads(packed)  # type: ignore[no-any-return]
    return copy.deepcopy(packed)  # type: ignore[arg-type]


def pack_all(objects: Iterable[K8sObject]) -> list[tuple[ObjectKey, Packed]]:
    """Slimmed and packed, with their keys; objects of no kind edgeproxy reads are left out."""
    packed = []
    for obj in objects:
        key = object_key(obj)
        if key is not None:
            packed.append((key, pack(slim(obj))))
    return packed


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
    EndpointSlice event reads only its Service's slices). Every set holds the same packed
    objects (one copy of each).
    """

    def __init__(self) -> None:
        self._by_source: dict[str, dict[ObjectKey, Packed]] = {}
        self._kinds: dict[str, dict[ObjectKey, Packed]] = {kind: {} for kind in KINDS}
        self._slices: dict[tuple[str, str], dict[ObjectKey, Packed]] = {}
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
        self.replace_packed(source, pack_all(objects))

    def replace_packed(self, source: str, objects: Iterable[tuple[ObjectKey, Packed]]) -> None:
        """This source's objects are these now (from pack_all: a source that keeps its objects
        keeps them packed)."""
        fresh = dict(objects)
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
            self._by_source.setdefault(source, {})[key] = pack(slim(obj))
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
        packed = self._kinds[key[0]].get(key)
        return None if packed is None else unpack(packed)

    def of_kind(self, kind: str) -> Iterable[tuple[ObjectKey, K8sObject]]:
        return ((key, unpack(packed)) for key, packed in self._kinds[kind].items())

    def count(self, kind: str) -> int:
        return len(self._kinds[kind])

    def slices_of(self, service: tuple[str, str]) -> list[K8sObject]:
        """A Service's EndpointSlices in name order (deterministic, as compile sorts them)."""
        slices = self._slices.get(service) or {}
        return [unpack(slices[k]) for k in sorted(slices)]

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
            for packed, present in ((before, False), (after, True)):
                service = None if packed is None else service_label(unpack(packed))
                if service is None:
                    continue
                self._changed_services.add((key[1], service))
                group = self._slices.setdefault((key[1], service), {})
                if present:
                    group[key] = packed  # type: ignore[assignment]
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
        kinds = self._kinds
        return Snapshot(_Unpacking(_LiveObjects(kinds)), self._generation,
                        MappingProxyType({k: _Unpacking(v) for k, v in kinds.items()}))  # fmt: skip

    def snapshot(self) -> Snapshot:
        """A copy that later changes do not reach (one dict copy per kind, in C)."""
        kinds = {kind: dict(objects) for kind, objects in self._kinds.items()}
        merged: dict[ObjectKey, Packed] = {}
        for objects in kinds.values():
            merged.update(objects)
        return Snapshot(_Unpacking(merged), self._generation,
                        MappingProxyType({k: _Unpacking(v) for k, v in kinds.items()}))  # fmt: skip

    def _changed(self) -> None:
        self._generation += 1
        for listener in self._listeners:
            listener()


class _Unpacking(Mapping[ObjectKey, K8sObject]):
    """Packed objects by key, read as dicts (a fresh one per read)."""

    __slots__ = ("packed",)

    def __init__(self, packed: Mapping[ObjectKey, Packed]) -> None:
        self.packed = packed

    def __getitem__(self, key: ObjectKey) -> K8sObject:
        return unpack(self.packed[key])

    def get(self, key: ObjectKey, default: Any = None) -> Any:
        packed = self.packed.get(key)
        return default if packed is None else unpack(packed)

    def __contains__(self, key: object) -> bool:
        return key in self.packed

    def __iter__(self) -> Iterator[ObjectKey]:
        return iter(self.packed)

    def __len__(self) -> int:
        return len(self.packed)

    def items(self) -> Iterator[tuple[ObjectKey, K8sObject]]:  # type: ignore[override]
        return ((key, unpack(packed)) for key, packed in self.packed.items())


class _LiveObjects(Mapping[ObjectKey, Packed]):
    """Every kind's live dict as one mapping by key (ObjectStore.view)."""

    def __init__(self, kinds: dict[str, dict[ObjectKey, Packed]]) -> None:
        self.kinds = kinds

    def __getitem__(self, key: ObjectKey) -> Packed:
        objects = self.kinds.get(key[0])
        if objects is None:
            raise KeyError(key)
        return objects[key]

    def __iter__(self) -> Iterator[ObjectKey]:
        for objects in self.kinds.values():
            yield from objects

    def __len__(self) -> int:
        return sum(len(objects) for objects in self.kinds.values())

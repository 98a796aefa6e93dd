"""Builders for the Kubernetes objects the tests write as manifests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

CONTROLLER = "edgeproxy.io/ingress-controller"
NS = "default"


def ingress_class(name: str = "edgeproxy", default: bool = False, controller: str = CONTROLLER) -> dict[str, Any]:  # fmt: skip
    meta: dict[str, Any] = {"name": name}
    if default:
        meta["annotations"] = {"ingressclass.kubernetes.io/is-default-class": "true"}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass", "metadata": meta,
            "spec": {"controller": controller}}  # fmt: skip


def backend(service: str, port: int | str = 80) -> dict[str, Any]:
    key = "number" if isinstance(port, int) else "name"
    return {"service": {"name": service, "port": {key: port}}}


def path(p: str, service: str, path_type: str = "Prefix", port: int | str = 80) -> dict[str, Any]:
    return {"path": p, "pathType": path_type, "backend": backend(service, port)}


def ingress(
    name: str,
    rules: list[tuple[str | None, list[dict[str, Any]]]] | None = None,
    *,
    default_backend: str | None = None,
    cls: str | None = "edgeproxy",
    annotations: dict[str, str] | None = None,
    created: str | None = None,
    namespace: str = NS,
    tls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if cls:
        spec["ingressClassName"] = cls
    if default_backend:
        spec["defaultBackend"] = backend(default_backend)
    if rules is not None:
        spec["rules"] = [
            ({"host": host} if host else {}) | {"http": {"paths": paths}} for host, paths in rules
        ]
    if tls:
        spec["tls"] = tls
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if annotations:
        meta["annotations"] = annotations
    if created:
        meta["creationTimestamp"] = created
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": meta, "spec": spec}


def service(name: str, port: int = 80, port_name: str = "http", namespace: str = NS,
            target_port: int = 8000) -> dict[str, Any]:  # fmt: skip
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
            "spec": {"ports": [{"name": port_name, "port": port, "targetPort": target_port}]}}  # fmt: skip


def endpoint_slice(
    service_name: str,
    endpoints: list[tuple[str, dict[str, bool] | None]],
    port: int,
    port_name: str = "http",
    namespace: str = NS,
    suffix: str = "a",
) -> dict[str, Any]:
    eps = []
    for address, conditions in endpoints:
        ep: dict[str, Any] = {"addresses": [address]}
        if conditions is not None:
            ep["conditions"] = conditions
        eps.append(ep)
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{service_name}-{suffix}", "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service_name}},
        "addressType": "IPv4", "ports": [{"name": port_name, "port": port}], "endpoints": eps,
    }  # fmt: skip


def ready(*addresses: str) -> list[tuple[str, dict[str, bool] | None]]:
    return [(a, {"ready": True}) for a in addresses]


def write(directory: Path, objects: list[dict[str, Any]], name: str = "objects.json") -> Path:
    """Write as a JSON List (atomically: readers never see half a file)."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    tmp = directory / f".{name}.tmp"
    tmp.write_bytes(orjson.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
    tmp.replace(target)
    return target

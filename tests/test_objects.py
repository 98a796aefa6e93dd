"""The object store keeps objects packed and hands out copies: what a reader does to an object
it got never reaches the store, and an object JSON cannot hold is kept as it is."""

from __future__ import annotations

from edgeproxy.compile import compile_routes
from edgeproxy.objects import ObjectStore, pack, unpack


def ingress(name: str, **annotations: object) -> dict[str, object]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": name, "namespace": "default", "annotations": dict(annotations),
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"rules": [{"host": f"{name}.example.com", "http": {"paths": [
                {"path": "/", "pathType": "Prefix",
                 "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]}}  # fmt: skip


# Ours and the default: Ingresses without a class are served.
CLASS = {"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
         "metadata": {"name": "ep", "annotations": {"ingressclass.kubernetes.io/is-default-class": "true"}},
         "spec": {"controller": "edgeproxy.io/ingress-controller"}}  # fmt: skip
SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
           "spec": {"ports": [{"port": 80}]}}  # fmt: skip


def test_a_reader_changing_an_object_does_not_change_the_store() -> None:
    store = ObjectStore()
    store.replace("m", [ingress("a"), SERVICE, CLASS])
    key = ("Ingress", "default", "a")
    got = store.get(key)
    assert got is not None and "managedFields" not in got["metadata"]  # slimmed on the way in
    got["spec"]["rules"][0]["host"] = "changed.example.com"
    dict(store.of_kind("Ingress"))[key]["metadata"]["name"] = "changed"
    store.view().objects[key]["spec"].clear()  # type: ignore[index]
    again = store.get(key)
    assert again is not None and again["spec"]["rules"][0]["host"] == "a.example.com"
    assert again["metadata"]["name"] == "a"
    table = compile_routes(store.snapshot()).table
    assert table.lookup("a.example.com", "/") is not None


def test_an_object_json_cannot_hold_is_kept_and_compiled() -> None:
    odd = ingress("odd", big=123456789012345678901234567890)  # an int beyond 64 bits (YAML has them)
    assert isinstance(pack(odd), dict) and unpack(pack(odd)) == odd
    store = ObjectStore()
    store.replace("m", [odd, ingress("plain"), SERVICE, CLASS])
    got = store.get(("Ingress", "default", "odd"))
    assert got is not None and got["metadata"]["annotations"]["big"] == 123456789012345678901234567890
    got["metadata"]["annotations"].clear()  # a copy, even of an unpacked one
    assert store.get(("Ingress", "default", "odd"))["metadata"]["annotations"]  # type: ignore[index]
    table = compile_routes(store.snapshot()).table
    assert table.lookup("odd.example.com", "/") is not None
    assert table.lookup("plain.example.com", "/") is not None


def test_the_same_objects_again_are_no_change() -> None:
    store = ObjectStore()
    store.replace("m", [ingress("a"), SERVICE, CLASS])
    generation = store.generation
    store.replace("m", [ingress("a"), SERVICE, CLASS])  # a manifest file read again, unchanged
    assert store.generation == generation
    store.replace("m", [ingress("a", note="x"), SERVICE, CLASS])
    assert store.generation == generation + 1

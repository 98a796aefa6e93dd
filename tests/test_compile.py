"""compile(): objects in, RouteTable out. Pure, so no sockets here."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from types import MappingProxyType
from typing import Any

import pytest

from edgeproxy.compile import compile_routes
from edgeproxy.objects import ObjectStore, Snapshot
from tests import k8s


def snapshot(objects: list[dict[str, Any]]) -> Snapshot:
    store = ObjectStore()
    store.replace("test", objects)
    return store.snapshot()


def base(*extra: dict[str, Any]) -> list[dict[str, Any]]:
    objs = [k8s.ingress_class()]
    for name, addr in (("a", "10.0.0.1"), ("b", "10.0.0.2"), ("c", "10.0.0.3"), ("d", "10.0.0.4")):
        objs += [k8s.service(name), k8s.endpoint_slice(name, k8s.ready(addr), 8000)]
    return objs + list(extra)


def served_by(objects: list[dict[str, Any]], host: str, path: str, **kw: Any) -> str | None:
    result = compile_routes(snapshot(objects), **kw)
    route = result.table.lookup(host, path)
    return None if route is None else route.cluster.name.split("/")[1].split(":")[0]


def test_exact_host_beats_wildcard_beats_hostless() -> None:
    objs = base(k8s.ingress("i", [
        ("foo.example.com", [k8s.path("/", "a")]),
        ("*.example.com", [k8s.path("/", "b")]),
        (None, [k8s.path("/", "c")]),
    ]))  # fmt: skip
    assert served_by(objs, "foo.example.com", "/") == "a"
    assert served_by(objs, "bar.example.com", "/") == "b"
    assert served_by(objs, "other.org", "/") == "c"


@pytest.mark.parametrize("host, expected", [
    ("bar.foo.com", "a"), ("baz.bar.foo.com", None), ("foo.com", None),
])  # fmt: skip
def test_wildcard_host_matches_exactly_one_label(host: str, expected: str | None) -> None:
    objs = base(k8s.ingress("i", [("*.foo.com", [k8s.path("/", "a")])]))
    assert served_by(objs, host, "/") == expected


@pytest.mark.parametrize("request_path, expected", [
    ("/foo", "a"), ("/foo/", "a"), ("/foo/bar", "a"), ("/foobar", None), ("/FOO", None),
])  # fmt: skip
def test_prefix_matches_by_path_element_and_case(request_path: str, expected: str | None) -> None:
    objs = base(k8s.ingress("i", [(None, [k8s.path("/foo", "a")])]))
    assert served_by(objs, "h", request_path) == expected


def test_trailing_slash_in_prefix_rule_is_ignored() -> None:
    objs = base(k8s.ingress("i", [(None, [k8s.path("/aaa/bbb/", "a")])]))
    assert served_by(objs, "h", "/aaa/bbb") == "a"
    assert served_by(objs, "h", "/aaa/bbb/ccc") == "a"
    assert served_by(objs, "h", "/aaa/bbbccc") is None


@pytest.mark.parametrize("request_path, expected", [
    ("/foo", "a"), ("/foo/", None), ("/FOO", None), ("/foo/bar", None),
])  # fmt: skip
def test_exact_is_a_case_sensitive_whole_string_match(request_path: str, expected: str | None) -> None:  # fmt: skip
    objs = base(k8s.ingress("i", [(None, [k8s.path("/foo", "a", "Exact")])]))
    assert served_by(objs, "h", request_path) == expected


def test_longest_path_wins_and_exact_beats_prefix_at_equal_length() -> None:
    objs = base(k8s.ingress("i", [(None, [
        k8s.path("/", "a"), k8s.path("/aaa", "b"), k8s.path("/aaa/bbb", "c"),
        k8s.path("/aaa/bbb", "d", "Exact"),
    ])]))  # fmt: skip
    assert served_by(objs, "h", "/x") == "a"
    assert served_by(objs, "h", "/aaa/ccc") == "b"
    assert served_by(objs, "h", "/aaa/bbb") == "d"
    assert served_by(objs, "h", "/aaa/bbb/ccc") == "c"


def test_implementation_specific_behaves_as_prefix() -> None:
    objs = base(k8s.ingress("i", [(None, [k8s.path("/x", "a", "ImplementationSpecific")])]))
    assert served_by(objs, "h", "/x/y") == "a"


def test_default_backend_catches_what_no_rule_matches() -> None:
    objs = base(k8s.ingress("i", [("h", [k8s.path("/a", "a", "Exact")])], default_backend="b"))
    assert served_by(objs, "h", "/a") == "a"
    assert served_by(objs, "h", "/zzz") == "b"
    assert served_by(objs, "other", "/") == "b"


def test_rules_of_several_ingresses_merge_and_the_oldest_wins_a_conflict() -> None:
    objs = base(
        k8s.ingress("young", [("h", [k8s.path("/", "a"), k8s.path("/y", "c")])],
                    created="2024-02-01T00:00:00Z"),
        k8s.ingress("old", [("h", [k8s.path("/", "b")])], created="2024-01-01T00:00:00Z"),
    )  # fmt: skip
    result = compile_routes(snapshot(objs))
    assert result.table.lookup("h", "/").ingress == "default/old"  # type: ignore[union-attr]
    assert result.table.lookup("h", "/y").ingress == "default/young"  # type: ignore[union-attr]
    assert any("conflicts" in d and "default/old" in d for d in result.diagnostics)


def test_ingress_class_rules() -> None:
    objs = base(
        k8s.ingress_class("other", controller="example.com/other"),
        k8s.ingress("mine", [("mine", [k8s.path("/", "a")])]),
        k8s.ingress("theirs", [("theirs", [k8s.path("/", "a")])], cls="other"),
        k8s.ingress("classless", [("classless", [k8s.path("/", "a")])], cls=None),
        k8s.ingress("legacy", [("legacy", [k8s.path("/", "a")])], cls=None,
                    annotations={"kubernetes.io/ingress.class": "edgeproxy"}),
    )  # fmt: skip
    assert served_by(objs, "mine", "/") == "a"
    assert served_by(objs, "theirs", "/") is None
    assert served_by(objs, "classless", "/") is None  # no default class yet
    assert served_by(objs, "legacy", "/") == "a"
    objs[0] = k8s.ingress_class(default=True)
    assert served_by(objs, "classless", "/") == "a"
    assert served_by(objs, "mine", "/", only_class="other") is None


def test_invalid_objects_are_skipped_and_the_rest_serves() -> None:
    objs = base(
        k8s.ingress("bad", [
            ("ok", [k8s.path("/missing", "nope"), k8s.path("/port", "a", port=9999),
                    k8s.path("relative", "a"), k8s.path("/good", "a")]),
            ("bad host!", [k8s.path("/", "a")]),
        ]),
    )  # fmt: skip
    result = compile_routes(snapshot(objs))
    assert result.table.lookup("ok", "/good") is not None
    assert result.table.lookup("ok", "/missing") is None
    assert len(result.diagnostics) == 4
    assert all("default/bad" in d for d in result.diagnostics)


@pytest.mark.parametrize("path", ["/a b", "/a\x00b", "/a\r\nX-Injected: 1", "/api/(.*)", "/a.*",
                                  "/v[0-9]+", "/a?b", "/a#b", "//a", "/a/../b", "/a/.", "/%zz",
                                  "/a|b", "/a\\b", "/" + "a" * 5000])  # fmt: skip
def test_a_path_that_is_not_a_literal_absolute_path_is_skipped(path: str) -> None:
    """Ingress objects are hostile input too: no control characters, spaces, regex syntax or
    dot segments reach the table (each would be a route no request can take, or worse)."""
    for path_type in ("Exact", "Prefix", "ImplementationSpecific"):
        objs = base(k8s.ingress("hostile", [("ok", [k8s.path(path, "a", path_type), k8s.path("/good", "a")])]))
        result = compile_routes(snapshot(objs))
        assert result.table.lookup("ok", "/good") is not None  # the rest of the object serves
        assert [d.reason for d in result.diagnostics] == ["invalid_path"], path
        assert "default/hostile" in result.diagnostics[0]


def test_literal_paths_with_pchars_and_escapes_are_kept() -> None:
    paths = ["/.well-known/acme-challenge", "/~user", "/a:b@c", "/caf%C3%A9", "/a/", "/a,b;c=d"]
    objs = base(k8s.ingress("fine", [("ok", [k8s.path(p, "a", "Exact") for p in paths])]))
    result = compile_routes(snapshot(objs))
    assert result.diagnostics == []
    assert all(result.table.lookup("ok", p) is not None for p in paths)


def test_backend_port_by_name_and_endpoint_slice_port() -> None:
    objs = base(k8s.ingress("i", [(None, [k8s.path("/", "a", port="http")])]))
    route = compile_routes(snapshot(objs)).table.lookup("h", "/")
    assert route is not None and route.cluster.keys == (("10.0.0.1", 8000),)


def test_endpoint_conditions_follow_kep_1669() -> None:
    eps = [
        ("10.1.0.1", {"ready": True}),
        ("10.1.0.2", None),  # no conditions: ready
        ("10.1.0.3", {"ready": False, "serving": False}),
        ("10.1.0.4", {"ready": False, "serving": True, "terminating": True}),
    ]
    objs = [k8s.ingress_class(), k8s.service("s"), k8s.endpoint_slice("s", eps, 8000),
            k8s.ingress("i", [(None, [k8s.path("/", "s")])])]  # fmt: skip
    keys = compile_routes(snapshot(objs)).table.lookup("h", "/").cluster.keys  # type: ignore[union-attr]
    assert keys == (("10.1.0.1", 8000), ("10.1.0.2", 8000))
    # With no ready endpoint left, serving-and-terminating ones take new requests.
    objs[2] = k8s.endpoint_slice("s", eps[2:], 8000)
    keys = compile_routes(snapshot(objs)).table.lookup("h", "/").cluster.keys  # type: ignore[union-attr]
    assert keys == (("10.1.0.4", 8000),)


def test_external_name_service_routes_to_its_dns_name() -> None:
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ext", "namespace": "default"},
           "spec": {"type": "ExternalName", "externalName": "backend.example.org"}}  # fmt: skip
    objs = [k8s.ingress_class(), svc, k8s.ingress("i", [(None, [k8s.path("/", "ext", port=8443)])])]
    route = compile_routes(snapshot(objs)).table.lookup("h", "/")
    assert route is not None and route.cluster.keys == (("backend.example.org", 8443),)


def test_compile_is_deterministic() -> None:
    objs = base(k8s.ingress("i", [("h", [k8s.path("/", "a")])], default_backend="b"))
    one, two = compile_routes(snapshot(objs)), compile_routes(snapshot(list(reversed(objs))))
    assert [r.cluster.keys for r in one.table.routes()] == [r.cluster.keys for r in two.table.routes()]


def test_lookup_among_10000_ingresses_finds_the_right_host() -> None:
    objs = base(*[
        k8s.ingress(f"i{i}", [(f"host{i}.example.com", [k8s.path(f"/p{i % 7}", "abcd"[i % 4])])])
        for i in range(10_000)
    ])  # fmt: skip
    table = compile_routes(snapshot(objs)).table
    assert len(table.exact_hosts) == 10_000
    route = table.lookup("host4242.example.com", f"/p{4242 % 7}/x")
    assert route is not None and route.ingress == "default/i4242"
    assert table.lookup("host4242.example.com", "/p9") is None


def test_table_is_immutable() -> None:
    table = compile_routes(snapshot(base())).table
    assert isinstance(table.exact_hosts, MappingProxyType)
    with pytest.raises(AttributeError):
        table.default_route = None  # type: ignore[misc]


@contextlib.contextmanager
def local_pipeline() -> Iterator[tuple[Any, ObjectStore, Any]]:
    """(data plane, store, pipeline) in this process, on a loop of their own."""
    from edgeproxy.balancing import load_balancers
    from edgeproxy.config import Settings
    from edgeproxy.pipeline import LocalPublisher, RoutePipeline
    from edgeproxy.proxy.dataplane import Dataplane

    loop = asyncio.new_event_loop()
    try:
        dp = Dataplane(Settings(), loop)
        dp.balancer_types = load_balancers()
        store = ObjectStore()
        pipeline = RoutePipeline(store, [LocalPublisher(dp)], only_class=None, balancers=["round_robin"],
                                 default_balancer="round_robin", loop=loop)  # fmt: skip
        yield dp, store, pipeline
    finally:
        loop.close()


def test_endpoint_slice_only_change_updates_clusters_in_place_like_a_full_compile() -> None:
    with local_pipeline() as (dp, store, pipeline):
        objs = base(k8s.ingress("i", [("h", [k8s.path("/", "a"), k8s.path("/b", "b")])]))
        store.replace("test", objs)
        pipeline.rebuild()
        table = dp.table
        kept = dp.registry.get(("10.0.0.1", 8000))
        kept.requests = 42  # per-endpoint state that must survive
        objs[2] = k8s.endpoint_slice("a", k8s.ready("10.0.0.1", "10.0.0.9"), 8000)
        store.replace("test", objs)
        pipeline.rebuild()
        assert dp.table is table and pipeline.endpoint_refreshes == 1  # routes untouched
        route = dp.table.lookup("h", "/")
        assert route is not None
        full = compile_routes(store.snapshot()).table.lookup("h", "/")
        binding = dp.bindings[route.cluster]
        assert full is not None and binding.keys == full.cluster.keys
        assert route.cluster.keys == (("10.0.0.1", 8000),)  # the published table is not written
        assert [h.key for h in binding.hosts] == [("10.0.0.1", 8000), ("10.0.0.9", 8000)]
        assert binding.hosts[0] is kept and kept.requests == 42
        # An Ingress changing is an update: only it is compiled, and the table is new.
        objs.append(k8s.ingress("j", [("j", [k8s.path("/", "c")])]))
        store.replace("test", objs)
        pipeline.rebuild()
        assert dp.table is not table and pipeline.rebuilds == 2 and pipeline.full_builds == 1
        assert dp.table.exact_hosts["h"] is table.exact_hosts["h"]  # the other host untouched
        route = dp.table.lookup("j", "/")
        assert route is not None and dp.bindings[route.cluster].keys == (("10.0.0.3", 8000),)
        # Which Ingresses are ours changing (an IngressClass) is a whole build.
        objs[0] = k8s.ingress_class(default=True)
        store.replace("test", objs)
        pipeline.rebuild()
        assert pipeline.full_builds == 2 and dp.table.lookup("j", "/") is not None


def test_a_service_change_that_reaches_many_ingresses_is_a_whole_build(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeproxy import pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "LARGE_UPDATE", 2)
    with local_pipeline() as (dp, store, pipeline):
        objs = base(*(k8s.ingress(f"i{n}", [(f"h{n}", [k8s.path("/", "a")])]) for n in range(3)))
        store.replace("test", objs)
        pipeline.rebuild()
        objs[1] = k8s.service("a", port=80, port_name="web")  # the Service all three name
        objs[2] = k8s.endpoint_slice("a", k8s.ready("10.0.0.7"), 8000, port_name="web")
        store.replace("test", objs)
        pipeline.rebuild()
        assert pipeline.full_builds == 2  # three Ingresses reached, more than LARGE_UPDATE
        route = dp.table.lookup("h2", "/")
        assert route is not None and dp.bindings[route.cluster].keys == (("10.0.0.7", 8000),)

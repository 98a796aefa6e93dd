"""Explain: the compiled table for a human, and where one request goes and why.

`explain_request` walks the same lookup the hot path does (routing.RouteTable.lookup: the
exact host's group, else the wildcard one, else the host-less one; in the group the longest
path; else the default backend), keeps the reason each nearer rule did not match, and takes
its answer from lookup() itself, so the explanation cannot drift from what traffic does.
Used by `edgeproxy routes` (this module's main) and the admin listener's /debug/explain.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any
from urllib.parse import urlsplit

import orjson

from edgeproxy.compile import CompileResult, compile_routes
from edgeproxy.hosts import EndpointKey
from edgeproxy.objects import ObjectStore
from edgeproxy.routing import Cluster, HostRoutes, Route, RouteTable


def describe_route(route: Route, endpoints: tuple[EndpointKey, ...] | None = None) -> dict[str, Any]:
    cluster = route.cluster
    keys = cluster.keys if endpoints is None else endpoints
    return {
        "ingress": route.ingress,
        "host": route.host or "*",
        "path": route.path,
        "pathType": route.path_type,
        "service": cluster.name,
        "balancer": cluster.balancer_name,
        "endpoints": [f"{a}:{p}" if ":" not in a else f"[{a}]:{p}" for a, p in keys],
        "ssl_redirect": route.ssl_redirect,
    }


def _path_verdicts(group: HostRoutes, path: str) -> list[dict[str, Any]]:
    """Every rule of the group with whether it matches `path`, and why not."""
    verdicts = []
    for rule_path, route in sorted(group.exact.items()):
        ok = rule_path == path
        verdicts.append({"rule": route, "matches": ok,
                         "why": "equal" if ok else f"Exact {rule_path} is not {path}"})  # fmt: skip
    for key, route in sorted(group.prefix.items()):
        ok = key == "/" or path == key or path.startswith(key + "/") or path.rstrip("/") == key
        why = (f"{path} is {route.path} or below it, by path element" if ok else
               f"{path} is not {route.path} or below it (Prefix matches whole path elements)")  # fmt: skip
        verdicts.append({"rule": route, "matches": ok, "why": why})
    return verdicts


def explain_request(table: RouteTable, host: str, path: str,
                    endpoints: dict[Cluster, tuple[EndpointKey, ...]] | None = None) -> dict[str, Any]:  # fmt: skip
    """Where a request for host/path goes: the answer, and each step of the lookup."""
    from edgeproxy.proxy.message import host_name  # the hot path's own normalization

    name = host_name(host.encode("latin-1"))
    steps: list[dict[str, Any]] = []
    group = table.exact_hosts.get(name)
    chosen_group = None
    if group is not None:
        chosen_group = ("exact host", name, group)
    else:
        steps.append({"step": "exact host", "host": name, "result": "no rule names this host"})
        dot = name.find(".")
        suffix = name[dot:] if dot > 0 else None
        wild = table.wildcard_hosts.get(suffix) if suffix else None
        if wild is not None:
            chosen_group = ("wildcard host", "*" + suffix, wild)  # type: ignore[operator]
        else:
            steps.append({"step": "wildcard host", "host": "*" + suffix if suffix else None,
                          "result": "no wildcard rule covers this host (a wildcard covers one "
                                    "label only)"})  # fmt: skip
            if table.any_host is not None:
                chosen_group = ("rules without host", "*", table.any_host)
            else:
                steps.append({"step": "rules without host", "result": "there are none"})
    route = table.lookup(name, path)
    if chosen_group is not None:
        kind, label, hosts = chosen_group
        verdicts = _path_verdicts(hosts, path)
        matched = hosts.match(path)
        rules = []
        for v in verdicts:
            rule: Route = v["rule"]
            verdict = "chosen" if rule is matched else (
                "matches, but a longer (or Exact) rule wins" if v["matches"] else "no match")  # fmt: skip
            rules.append({"ingress": rule.ingress, "path": rule.path, "pathType": rule.path_type,
                          "service": rule.cluster.name, "verdict": verdict, "why": v["why"]})  # fmt: skip
        steps.append({"step": kind, "host": label, "result": "host matched", "rules": rules,
                      "note": None if matched is not None else
                      "no path matched in this host's rules; more general hosts are not "
                      "consulted once a host matched, only the default backend"})  # fmt: skip
    if route is not None and route is table.default_route:
        steps.append({"step": "default backend", "result": f"from Ingress {route.ingress}"})
    elif route is None and table.default_route is None:
        steps.append({"step": "default backend", "result": "none is defined: 404"})
    answer: dict[str, Any] = {"host": name, "path": path, "status": 404 if route is None else None}
    if route is not None:
        keys = (endpoints or {}).get(route.cluster, route.cluster.keys)
        answer["route"] = describe_route(route, keys)
        answer["default_backend"] = route is table.default_route
        answer["status"] = 503 if not keys else None  # None: whatever the endpoint answers
        if route.ssl_redirect:
            answer["note"] = "over plain HTTP: 308 to https (ssl-redirect)"
    answer["steps"] = steps
    return answer


def describe_table(result: CompileResult) -> dict[str, Any]:
    table = result.table
    return {
        "routes": [describe_route(r) | {"default_backend": r is table.default_route}
                   for r in table.routes()],  # fmt: skip
        "tls_hosts": sorted(table.tls_hosts),
        "invalid": list(result.diagnostics),
    }


# -- `edgeproxy routes` ------------------------------------------------------------------------


async def _load(args: argparse.Namespace) -> tuple[ObjectStore, dict[str, str]]:
    """The objects `run` would read: manifests, or one LIST per kind (Secrets' data unread)."""
    store = ObjectStore()
    errors: dict[str, str] = {}
    if args.manifests:
        from edgeproxy.sources.manifests import ManifestSource

        source = ManifestSource(list(args.manifests), store, 0)
        source.load()
        errors = {str(p): e for p, e in source.errors.items()}
    if args.kubeconfig or args.in_cluster:
        from edgeproxy.sources.kube import KIND_SPECS, ApiTransport, KindWatcher, api_client_from

        client = await api_client_from(args.kubeconfig, args.in_cluster)
        try:
            api = ApiTransport(client)
            for spec in KIND_SPECS:
                if spec.kind == "Secret":
                    continue  # certificates are not needed to explain a route
                for ns in [None] if not spec.namespaced else (args.watch_namespace or [None]):
                    await KindWatcher(spec, ns, store, api)._list()
        finally:
            await client.close()
    return store, errors


def _text_table(result: CompileResult, errors: dict[str, str]) -> str:
    lines = []
    table = result.table
    for route in table.routes():
        described = describe_route(route)
        default = "  (default backend)" if route is table.default_route else ""
        lines.append(f"{described['host']:30s} {route.path_type:8s} {route.path:24s} -> "
                     f"{described['service']} [{described['balancer']}, "
                     f"{len(described['endpoints'])} endpoints] from Ingress {route.ingress}{default}")  # fmt: skip
    if not lines:
        lines.append("(no routes)")
    if table.tls_hosts:
        lines.append("TLS for: " + ", ".join(sorted(table.tls_hosts)))
    for path, error in sorted(errors.items()):
        lines.append(f"unreadable manifest {path}: {error} (its last good objects would serve)")
    for line in result.diagnostics:
        lines.append(f"invalid: {line}")
    return "\n".join(lines)


def _text_explain(answer: dict[str, Any]) -> str:
    lines = [f"request: host {answer['host'] or '(none)'} path {answer['path']}"]
    for step in answer["steps"]:
        lines.append(f"  {step['step']}: {step.get('host') or ''} {step['result']}".rstrip())
        for rule in step.get("rules", ()):
            lines.append(f"    {rule['verdict']:44s} {rule['pathType']:8s} {rule['path']:20s} "
                         f"-> {rule['service']} (Ingress {rule['ingress']}): {rule['why']}")  # fmt: skip
        if step.get("note"):
            lines.append(f"    {step['note']}")
    route = answer.get("route")
    if route is None:
        lines.append("=> 404: no rule and no default backend")
    else:
        eps = ", ".join(route["endpoints"]) or "none (503)"
        lines.append(f"=> Ingress {route['ingress']} {route['pathType']} {route['path']} -> "
                     f"Service {route['service']}, {route['balancer']} over: {eps}")  # fmt: skip
        if answer.get("note"):
            lines.append(f"   {answer['note']}")
    return "\n".join(lines)


def request_of(url: str, headers: list[str]) -> tuple[str, str]:
    """(host, path) of `--explain URL` with `--header` lines (Host wins over the URL's)."""
    parts = urlsplit(url if "//" in url else "http://" + url)
    host = parts.netloc
    for header in headers:
        name, _, value = header.partition(":")
        if name.strip().lower() == "host":
            host = value.strip()
    return host, parts.path or "/"


def main(args: argparse.Namespace) -> int:
    from edgeproxy.balancing import load_balancers

    store, errors = asyncio.run(_load(args))
    result = compile_routes(store.snapshot(), only_class=args.ingress_class,
                            balancers=load_balancers(), default_balancer=args.default_balancer)  # fmt: skip
    if args.explain:
        host, path = request_of(args.explain, args.header)
        answer = explain_request(result.table, host, path)
        out = orjson.dumps(answer, option=orjson.OPT_INDENT_2).decode() if args.json else _text_explain(answer)
    elif args.json:
        out = orjson.dumps(describe_table(result) | {"unreadable_manifests": errors},
                           option=orjson.OPT_INDENT_2).decode()  # fmt: skip
    else:
        out = _text_table(result, errors)
    sys.stdout.write(out + "\n")
    return 0

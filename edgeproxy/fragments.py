"""One Ingress -> its IngressFragment: the routes, default backend and TLS entries it asks
for, each path's Cluster resolved. Pure: no I/O, no clock. What the fragments of all Ingresses
make together (the winner of a conflict, the table) is compile.py's job.

A bad object is reported as a diagnostic and skipped; it never aborts the compile.
References: networking.k8s.io/v1 Ingress API reference (path types, host wildcards, default
backend), IngressClass (is-default-class), discovery.k8s.io/v1 EndpointSlice and KEP-1669
(ready / serving / terminating conditions).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from edgeproxy.config import CONTROLLER_NAME, OutlierSettings
from edgeproxy.hosts import EndpointKey
from edgeproxy.objects import K8sObject, ObjectKey
from edgeproxy.routing import PLAIN, Cluster, Route, TransportProfile

DEFAULT_CLASS_ANNOTATION = "ingressclass.kubernetes.io/is-default-class"
LEGACY_CLASS_ANNOTATION = "kubernetes.io/ingress.class"
ANNOTATION_PREFIX = "edgeproxy.io/"
PATH_TYPES = ("Exact", "Prefix", "ImplementationSpecific")
# Each object read from the store is a fresh decode: strings kept from it are made shared
# ones (path types by this table, paths by sys.intern), or every route keeps copies.
_PATH_TYPE = {t: t for t in PATH_TYPES}
HASH_BY = re.compile(r"^(client-ip|path|header:[A-Za-z0-9!#$%&'*+.^_`|~-]+|cookie:[^\s;=,]+)$")
# edgeproxy.io/<annotation> -> OutlierSettings field (per Ingress; flags set the defaults).
OUTLIER_ANNOTATIONS = (
    ("outlier-consecutive-failures", "consecutive_gateway_failures", int),
    ("outlier-base-ejection-time", "base_ejection_time", float),
    ("outlier-max-ejection-time", "max_ejection_time", float),
    ("outlier-max-ejection-percent", "max_ejection_percent", float),
    ("outlier-panic-threshold", "panic_threshold_percent", float),
)
# RFC 1123 DNS subdomain, optionally with one leading "*." label (Ingress host rules).
HOST_RE = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass(frozen=True, slots=True)
class TlsBinding:
    """spec.tls entry of a served Ingress: these hosts use that Secret's certificate."""

    hosts: tuple[str, ...]
    secret: tuple[str, str]  # (namespace, name)
    ingress: str


class Diagnostic(str):
    """One problem found in the objects (logged once, shown in /debug/routes and explain),
    with a short reason for the edgeproxy_invalid_objects metric. A str: it reads as its message."""

    reason: str

    def __new__(cls, reason: str, message: str) -> Diagnostic:
        self = super().__new__(cls, message)
        self.reason = reason
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (Diagnostic, (self.reason, str(self)))


def _meta(obj: K8sObject) -> dict[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _annotations(obj: K8sObject) -> dict[str, str]:
    ann = _meta(obj).get("annotations")
    return ann if isinstance(ann, dict) else {}


def _spec(obj: K8sObject) -> dict[str, Any]:
    spec = obj.get("spec")
    return spec if isinstance(spec, dict) else {}


def served_classes(ingress_classes: Iterable[tuple[ObjectKey, K8sObject]],
                   only_class: str | None) -> tuple[set[str], bool]:  # fmt: skip
    """(names of edgeproxy's IngressClasses, whether an Ingress without a class is ours)."""
    ours: set[str] = set()
    default = False
    for (_, _, name), obj in ingress_classes:
        if _spec(obj).get("controller") != CONTROLLER_NAME:
            continue
        if only_class is not None and name != only_class:
            continue
        ours.add(name)
        if str(_annotations(obj).get(DEFAULT_CLASS_ANNOTATION, "")).lower() == "true":
            default = True
    if only_class is not None and not ours:
        # --ingress-class names a class that has no IngressClass object (yet): serve it by name.
        ours.add(only_class)
    return ours, default


def is_served(ingress: K8sObject, classes: set[str], default: bool) -> bool:
    cls = _spec(ingress).get("ingressClassName") or _annotations(ingress).get(
        LEGACY_CLASS_ANNOTATION
    )
    if cls:
        return cls in classes
    return default


Memo = tuple[Any, ...]  # what makes two paths' backends one Cluster
SHARED_TUPLES = 200_000  # ClusterResolver.shared: cleared past this many
Keys = tuple[EndpointKey, ...]


class ClusterResolver:
    """Service + port -> Cluster, with a cache that outlives one Ingress.

    Ingresses naming the same Service port with the same settings share one Cluster (the data
    plane binds clusters by identity), and recompiling one Ingress finds the Cluster objects
    the others already hold. The compiler (compile.py) decides when an entry goes: when no
    fragment uses it, or when its Service changed (`replaced`: a Cluster whose configuration
    came out the same is reused, so its binding, balancer and pooled connections stay).
    """

    def __init__(self, service: Callable[[str, str], K8sObject | None],
                 slices: Callable[[tuple[str, str]], list[K8sObject]],
                 balancers: Collection[str], default_balancer: str,
                 outlier_defaults: OutlierSettings) -> None:  # fmt: skip
        self.service = service
        self.slices = slices
        self.balancers = balancers
        self.default_balancer = default_balancer
        self.outlier_defaults = outlier_defaults
        self.clusters: dict[Memo, Cluster] = {}
        self.memo_keys: dict[Memo, Memo] = {}  # each cache key to itself (fragments share it)
        self.cluster_diagnostics: dict[Memo, list[str]] = {}  # its endpoints' problems
        self.replaced: dict[Memo, Cluster] = {}
        self.created: list[tuple[Memo, Cluster, Keys]] = []  # since the compiler last looked
        # What the Ingress being compiled used (begin() resets them).
        self.diagnostics: list[str] = []
        self.memos: set[Memo] = set()
        self.services: set[tuple[str, str]] = set()
        # One tuple for equal ones: the Ingresses naming a Service share its (namespace,
        # name) and their (Service,) and (memo,) tuples (about 150 bytes an Ingress).
        self._shared: dict[tuple[Any, ...], tuple[Any, ...]] = {}

    def begin(self) -> None:
        self.diagnostics, self.memos, self.services = [], set(), set()

    def shared(self, value: tuple[Any, ...]) -> tuple[Any, ...]:
        shared = self._shared
        if len(shared) > SHARED_TUPLES:  # bounded (entries of what is gone are not tracked)
            shared.clear()
        return shared.setdefault(value, value)

    def balancer_of(self, where: str, annotations: dict[str, str]) -> tuple[str, dict[str, Any]]:
        name = annotations.get(ANNOTATION_PREFIX + "load-balance", self.default_balancer)
        if name not in self.balancers:
            self.diagnostics.append(Diagnostic("bad_annotation",
                f"Ingress {where}: unknown load-balance {name!r}; using {self.default_balancer}"
            ))
            name = self.default_balancer
        options: dict[str, Any] = {}
        hash_by = annotations.get(ANNOTATION_PREFIX + "hash-by")
        if hash_by is not None:
            if HASH_BY.match(hash_by):
                options["hash_by"] = hash_by
            else:
                self.diagnostics.append(Diagnostic("bad_annotation",
                    f"Ingress {where}: malformed hash-by {hash_by!r}; using client-ip"
                ))
        return name, options

    def outlier_of(self, where: str, annotations: dict[str, str]) -> OutlierSettings | None:
        """Per-Ingress outlier settings from edgeproxy.io/outlier-* annotations, if any."""
        overrides: dict[str, float] = {}
        for suffix, field_name, kind in OUTLIER_ANNOTATIONS:
            raw = annotations.get(ANNOTATION_PREFIX + suffix)
            if raw is None:
                continue
            try:
                value = kind(raw)
                if value < 0:
                    raise ValueError
            except ValueError:
                self.diagnostics.append(Diagnostic("bad_annotation", f"Ingress {where}: {suffix}={raw!r} is not a number >= 0; ignored"))  # fmt: skip
                continue
            overrides[field_name] = value
        if not overrides:
            return None
        return replace(self.outlier_defaults, **overrides)  # type: ignore[arg-type]

    def cluster(
        self, where: str, namespace: str, backend: Any, annotations: dict[str, str]
    ) -> Cluster | None:
        if not isinstance(backend, dict):
            self.diagnostics.append(Diagnostic("missing_backend", f"Ingress {where}: backend is missing"))
            return None
        service = backend.get("service")
        if not isinstance(service, dict):
            if backend.get("resource"):
                self.diagnostics.append(Diagnostic("unsupported_backend", f"Ingress {where}: resource backends are not supported"))
            else:
                self.diagnostics.append(Diagnostic("missing_backend", f"Ingress {where}: backend names no service"))
            return None
        svc_name = service.get("name")
        raw_port = service.get("port")
        port: dict[str, Any] = raw_port if isinstance(raw_port, dict) else {}
        port_number, port_name = port.get("number"), port.get("name")
        svc = None
        if isinstance(svc_name, str):
            svc_name = sys.intern(svc_name)  # kept in indexes and memos (see _PATH_TYPE)
            self.services.add(self.shared((namespace, svc_name)))  # found or not: its arrival recompiles us
            svc = self.service(namespace, svc_name)
        if svc is None or not isinstance(svc_name, str):
            self.diagnostics.append(Diagnostic("service_not_found",
                f"Ingress {where}: Service {namespace}/{svc_name} not found; path skipped"
            ))
            return None
        balancer, options = self.balancer_of(where, annotations)
        backend_tls = annotations.get(ANNOTATION_PREFIX + "backend-protocol", "").upper() == "HTTPS"
        ca_name = annotations.get(ANNOTATION_PREFIX + "backend-ca-secret")
        backend_ca = (namespace, ca_name) if backend_tls and ca_name else None
        server_name = annotations.get(ANNOTATION_PREFIX + "backend-server-name") if backend_ca else None
        outlier = self.outlier_of(where, annotations)
        transport = TransportProfile(backend_tls, backend_ca, server_name) if backend_tls else PLAIN
        memo = (namespace, svc_name, port_number, port_name, balancer,
                tuple(sorted(options.items())), transport, outlier)  # fmt: skip
        cached = self.clusters.get(memo)
        if cached is not None:
            self.memos.add(self.memo_keys.get(memo, memo))  # the cache's own tuple: one per cluster
            return cached
        spec = _spec(svc)
        svc_ports = [p for p in spec.get("ports") or [] if isinstance(p, dict)]
        svc_port = next(
            (
                p
                for p in svc_ports
                if (port_number is not None and p.get("port") == port_number)
                or (port_name is not None and p.get("name") == port_name)
            ),
            None,
        )
        label = f"{namespace}/{svc_name}:{port_number if port_number is not None else port_name}"
        if spec.get("type") == "ExternalName":
            target = spec.get("externalName")
            tport = port_number
            if svc_port is not None:
                tp = svc_port.get("targetPort")
                tport = tp if isinstance(tp, int) else svc_port.get("port")
            if not isinstance(target, str) or not isinstance(tport, int):
                self.diagnostics.append(Diagnostic("bad_service", f"Ingress {where}: ExternalName {label} has no name/port"))
                return None
            keys: Keys = ((target.rstrip("."), tport),)
            cluster = Cluster(label, keys, balancer, options, transport, target.rstrip("."),
                              outlier=outlier)  # fmt: skip
        else:
            if svc_port is None:
                self.diagnostics.append(Diagnostic("service_port_not_found",
                    f"Ingress {where}: Service {namespace}/{svc_name} has no port "
                    f"{port_number if port_number is not None else port_name!r}; path skipped"
                ))
                return None
            problems: list[str] = []
            keys = resolve_endpoints(self.slices((namespace, svc_name)), namespace,
                                     svc_port.get("name") or "", problems)  # fmt: skip
            if problems:
                self.cluster_diagnostics[memo] = problems
            cluster = Cluster(label, keys, balancer, options, transport, outlier=outlier,
                              service=(namespace, svc_name), port_name=svc_port.get("name") or "")  # fmt: skip
        previous = self.replaced.pop(memo, None)
        if previous is not None and previous.config() == cluster.config():
            cluster = previous  # same configuration: same object, new endpoints only
        self.clusters[memo] = cluster
        self.memo_keys[memo] = memo
        self.created.append((memo, cluster, keys))
        self.memos.add(memo)
        return cluster


def resolve_endpoints(
    slices: list[K8sObject], namespace: str, port_name: str, diagnostics: list[str]
) -> tuple[EndpointKey, ...]:
    """Ready endpoints of a Service port; if none, serving-and-terminating ones (KEP-1669)."""
    ready: list[EndpointKey] = []
    fallback: list[EndpointKey] = []
    for eps in slices:
        where = f"EndpointSlice {namespace}/{_meta(eps).get('name')}"
        if eps.get("addressType", "IPv4") not in ("IPv4", "IPv6"):
            diagnostics.append(Diagnostic("unsupported_endpoints", f"{where}: addressType {eps.get('addressType')!r} skipped"))
            continue
        port = next(
            (p.get("port") for p in eps.get("ports") or []
             if isinstance(p, dict) and (p.get("name") or "") == port_name),
            None,
        )  # fmt: skip
        if not isinstance(port, int):
            continue
        for ep in eps.get("endpoints") or []:
            if not isinstance(ep, dict):
                continue
            cond = ep.get("conditions") or {}
            is_ready = cond.get("ready") is not False  # absent counts as ready
            serving = cond.get("serving", is_ready) is not False
            terminating = cond.get("terminating") is True
            for address in ep.get("addresses") or []:
                if not isinstance(address, str):
                    continue
                if is_ready and not terminating:
                    ready.append((address, port))
                elif serving and terminating:
                    fallback.append((address, port))
    return tuple(sorted(set(ready or fallback)))


def created(obj: K8sObject) -> str:
    """When the object was created, as the API server writes it ("" when absent). The older
    Ingress wins a conflict: by this, then by namespace/name (IngressFragment.age)."""
    value = _meta(obj).get("creationTimestamp")
    return str(value) if value else ""


# An Exact or Prefix path is a literal absolute path (RFC 3986 3.3): pchars and "/", with
# percent escapes. Never regex syntax (ingress-nginx's strict path validation refuses it too;
# a path meant as a regex would otherwise match only itself), no control characters or
# spaces, no empty or dot segments (requests are normalized, so those would never match).
LITERAL_PATH_RE = re.compile(r"^(/(?:[A-Za-z0-9\-._~!&',;=:@]|%[0-9A-Fa-f]{2})*)+$|^/$")
DOT_SEGMENT_RE = re.compile(r"//|/\.\.?(?:/|$)")


def _valid_path(path: Any) -> bool:
    return (isinstance(path, str) and len(path) <= 4096 and LITERAL_PATH_RE.match(path) is not None
            and DOT_SEGMENT_RE.search(path) is None)  # fmt: skip


@dataclass(slots=True, eq=False)
class IngressFragment:
    """What one Ingress asks for, before it meets the others (conflicts are settled when the
    fragments are put together: the older Ingress wins)."""

    # Tuples, and the key not copied into an age tuple: 50,000 fragments live as long as the
    # compiler, and each container saved is 50-200 bytes apiece.
    key: ObjectKey
    where: str  # namespace/name
    created: str
    served: bool
    routes: tuple[Route, ...]  # in rule order; each knows its host ("" for none)
    default: Route | None
    tls: tuple[TlsBinding, ...]
    diagnostics: tuple[str, ...]
    # Tuples, not sets: usually one member, and 48 bytes against a set's 216 (50,000 of them).
    services: tuple[tuple[str, str], ...]  # every Service it names, found or not
    memos: tuple[Memo, ...]  # the clusters it resolved

    @property
    def age(self) -> tuple[str, ObjectKey]:
        """Older first: creation time, then namespace/name."""
        return (self.created, self.key)

    def hosts(self) -> Iterable[str]:
        routes = self.routes
        if len(routes) == 1:
            return (routes[0].host,)
        return dict.fromkeys(route.host for route in routes)

    def on(self, host: str) -> Iterator[Route]:
        return (route for route in self.routes if route.host == host)


def compile_ingress(key: ObjectKey, ingress: K8sObject, resolver: ClusterResolver,
                    classes: set[str], default_class: bool) -> IngressFragment:  # fmt: skip
    _, ns, name = key
    where = f"{ns}/{name}"
    when = created(ingress)
    if not is_served(ingress, classes, default_class):
        return IngressFragment(key, where, when, False, (), None, (), (), (), ())
    resolver.begin()
    diagnostics = resolver.diagnostics
    spec = _spec(ingress)
    ann = _annotations(ingress)
    tls: list[TlsBinding] = []
    tls_hosts = _tls(spec, ns, where, tls, diagnostics)
    ssl_redirect = ann.get(ANNOTATION_PREFIX + "ssl-redirect", "true").lower() != "false"
    hsts = _hsts(ann.get(ANNOTATION_PREFIX + "hsts"))
    default: Route | None = None
    if spec.get("defaultBackend") is not None:
        cluster = resolver.cluster(where, ns, spec["defaultBackend"], ann)
        if cluster is not None:
            default = Route(where, "", "/", "Prefix", cluster)
    routes: list[Route] = []
    for rule in spec.get("rules") or []:
        if not isinstance(rule, dict):
            continue
        host = rule.get("host") or ""
        if not isinstance(host, str) or (host and not HOST_RE.match(host.lower())):
            diagnostics.append(Diagnostic("invalid_host", f"Ingress {where}: invalid host {host!r}; rule skipped"))
            continue
        host = host.lower()
        http = rule.get("http") or {}
        for entry in http.get("paths") or [] if isinstance(http, dict) else []:
            if not isinstance(entry, dict):
                continue
            path = entry.get("path") or "/"
            asked = entry.get("pathType") or "ImplementationSpecific"
            path_type = _PATH_TYPE.get(asked) if isinstance(asked, str) else None
            if path_type is None or not _valid_path(path):
                diagnostics.append(Diagnostic("invalid_path",
                    f"Ingress {where}: invalid path {path!r} ({asked}); path skipped"
                ))
                continue
            cluster = resolver.cluster(where, ns, entry.get("backend"), ann)
            if cluster is None:
                continue
            path = sys.intern(path)
            # ImplementationSpecific is matched as Prefix (documented in README).
            routes.append(Route(
                where, host, path, path_type, cluster,
                ssl_redirect=ssl_redirect and _covered(host, tls_hosts),
                hsts=hsts,
            ))  # fmt: skip
    return IngressFragment(key, where, when, True, tuple(routes), default, tuple(tls),
                           tuple(diagnostics), resolver.shared(tuple(resolver.services)),
                           resolver.shared(tuple(resolver.memos)))  # fmt: skip



def _hsts(value: str | None) -> bytes | None:
    """edgeproxy.io/hsts: "true" for a year, or the Strict-Transport-Security value itself."""
    if value is None or value.lower() == "false":
        return None
    if value.lower() == "true":
        value = "max-age=31536000"
    return b"Strict-Transport-Security: " + value.encode("latin-1", "replace") + b"\r\n"


def match_key(route: Route) -> str:
    """What the route is found by in its group: an Exact path as it is, a Prefix path without
    its trailing slash ("/" for the root)."""
    path = route.path
    if route.path_type == "Exact":
        return path
    stripped = path.rstrip("/")
    return sys.intern(stripped) if stripped else "/"


def _covered(host: str, tls_hosts: Iterable[str]) -> bool:
    return bool(host) and host in tls_hosts


def _tls(
    spec: dict[str, Any], ns: str, where: str, out: list[TlsBinding], diagnostics: list[str]
) -> set[str]:
    hosts_here: set[str] = set()
    for entry in spec.get("tls") or []:
        if not isinstance(entry, dict):
            continue
        hosts = tuple(h.lower() for h in entry.get("hosts") or [] if isinstance(h, str))
        secret = entry.get("secretName")
        hosts_here.update(hosts)
        if not secret:
            diagnostics.append(Diagnostic("missing_tls_secret", f"Ingress {where}: tls entry without secretName uses the default"))
            continue
        out.append(TlsBinding(hosts, (ns, secret), where))
    return hosts_here

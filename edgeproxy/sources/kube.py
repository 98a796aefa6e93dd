"""Kubernetes source: LIST then WATCH each kind, feeding the same ObjectStore as the manifests.

Three layers, one job each (as kopf's watching.py):
- `KindWatcher.run` reconnects forever, with jittered exponential backoff when the API server
  is unreachable or answers 5xx; the last good table keeps serving meanwhile;
- `KindWatcher._list_then_watch` lists once (replacing this kind's objects in the store, so
  objects deleted meanwhile disappear), then watches from the list's resourceVersion,
  re-watching from the last version seen whenever a stream ends;
- `KindWatcher._watch_once` sends one watch request with allowWatchBookmarks and reads its
  newline-delimited JSON events. 410 Gone (as HTTP status or as an ERROR event) goes back to
  the list.

kubernetes-asyncio supplies configuration, authentication and the HTTP requests; responses are
read raw (`_preload_content=False`) and compiled from dicts, as the watch's raw_object would
be: no model objects are built on this path. kubernetes_asyncio's own Watch retries a 410 once
with the same version and then raises; the re-list is ours to do (its PR #327).

TLS Secrets are watched narrowly (fieldSelector type=kubernetes.io/tls) and only those that
served Ingresses reference are kept; a newly referenced one is fetched by name.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from edgeproxy.objects import ObjectStore, object_key

log = logging.getLogger("edgeproxy.kube")

WATCH_TIMEOUT_S = 290  # server-side timeoutSeconds; jittered so watchers do not renew in step
READ_TIMEOUT_S = 120  # no byte (bookmarks included) for this long: the stream is dead
BACKOFF_START_S = 0.2
BACKOFF_MAX_S = 15.0
TLS_SECRET_SELECTOR = "type=kubernetes.io/tls"
BY_NAME_SOURCE = "kube:Secret:by-name"  # referenced Secrets the narrow watch does not cover


class Gone(Exception):
    """410: the resourceVersion is too old; list again."""


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


@dataclass(frozen=True)
class KindSpec:
    kind: str
    group_path: str  # "/api/v1" or "/apis/<group>/<version>"
    plural: str
    namespaced: bool = True
    field_selector: str | None = None

    def path(self, namespace: str | None) -> str:
        if self.namespaced and namespace:
            return f"{self.group_path}/namespaces/{namespace}/{self.plural}"
        return f"{self.group_path}/{self.plural}"


KIND_SPECS = (
    KindSpec("IngressClass", "/apis/networking.k8s.io/v1", "ingressclasses", namespaced=False),
    KindSpec("Ingress", "/apis/networking.k8s.io/v1", "ingresses"),
    KindSpec("Service", "/api/v1", "services"),
    KindSpec("EndpointSlice", "/apis/discovery.k8s.io/v1", "endpointslices"),
    KindSpec("Secret", "/api/v1", "secrets", field_selector=TLS_SECRET_SELECTOR),
)


class ApiTransport:
    """HTTP to the API server through kubernetes-asyncio's configured ApiClient (auth, TLS)."""

    def __init__(self, api_client: Any) -> None:
        self.api_client = api_client

    async def request(self, method: str, path: str, query: list[tuple[str, Any]] | None = None,
                      body: Any = None, content_type: str = "application/json",
                      timeout: Any = None) -> Any:  # fmt: skip
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        return await self.api_client.call_api(
            path, method, query_params=query or [], header_params=headers, body=body,
            auth_settings=["BearerToken"], _preload_content=False, _request_timeout=timeout,
        )  # fmt: skip

    async def get_json(self, path: str, query: list[tuple[str, Any]] | None = None) -> Any:
        resp = await self.request("GET", path, query, timeout=30)
        try:
            data = await resp.read()
            if resp.status == 410:
                raise Gone()
            if resp.status >= 400:
                raise ApiError(resp.status, data[:200].decode("utf-8", "replace"))
            return orjson.loads(data)
        finally:
            resp.release()


async def api_client_from(kubeconfig: Path | None, in_cluster: bool) -> Any:
    from kubernetes_asyncio import client, config

    if in_cluster:
        config.load_incluster_config()
        return client.ApiClient()
    return await config.new_client_from_config(config_file=str(kubeconfig) if kubeconfig else None)


class KindWatcher:
    def __init__(self, spec: KindSpec, namespace: str | None, store: ObjectStore,
                 api: ApiTransport, keep: Callable[[dict[str, Any]], bool] | None = None,
                 on_listed: Callable[[], None] | None = None) -> None:  # fmt: skip
        self.spec = spec
        self.namespace = namespace
        self.store = store
        self.api = api
        self.keep = keep
        self.on_listed = on_listed
        self.source = f"kube:{spec.kind}:{namespace or '*'}"
        self.resource_version = ""
        self.listed = False
        self.events = 0

    async def run(self, *, _iterations: int | None = None) -> None:
        """Forever (or `_iterations` turns, for tests): list+watch, back off on failure."""
        backoff = BACKOFF_START_S
        turn = 0
        while _iterations is None or turn < _iterations:
            turn += 1
            try:
                await self._list_then_watch()
                backoff = BACKOFF_START_S
            except Gone:
                log.info("%s: resourceVersion %s is gone; listing again", self.source,
                         self.resource_version)  # fmt: skip
                backoff = BACKOFF_START_S
            except asyncio.CancelledError:
                raise
            except (TimeoutError, aiohttp.ClientError, OSError, ApiError, ValueError) as exc:
                delay = backoff * (0.5 + random.random())  # full jitter around the step
                log.warning("%s: %s; retrying in %.1fs (the last good table keeps serving)",
                            self.source, exc or type(exc).__name__, delay)  # fmt: skip
                await asyncio.sleep(delay)
                backoff = min(BACKOFF_MAX_S, backoff * 2)

    def _query(self) -> list[tuple[str, Any]]:
        query: list[tuple[str, Any]] = []
        if self.spec.field_selector:
            query.append(("fieldSelector", self.spec.field_selector))
        return query

    async def _list(self) -> None:
        data = await self.api.get_json(self.spec.path(self.namespace), self._query())
        items = []
        for item in data.get("items") or []:
            if not isinstance(item, dict):
                continue
            # List items carry no kind/apiVersion of their own (only the List does).
            item.setdefault("kind", self.spec.kind)
            if self.keep is None or self.keep(item):
                items.append(item)
        self.resource_version = str((data.get("metadata") or {}).get("resourceVersion") or "")
        self.store.replace(self.source, items)
        if not self.listed:
            self.listed = True
            log.info("%s: listed %d objects at resourceVersion %s", self.source, len(items),
                     self.resource_version)  # fmt: skip
            if self.on_listed is not None:
                self.on_listed()

    async def _list_then_watch(self) -> None:
        await self._list()
        while True:
            await self._watch_once()

    async def _watch_once(self) -> None:
        query = self._query() + [
            ("watch", "true"),
            ("resourceVersion", self.resource_version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", int(WATCH_TIMEOUT_S * (0.9 + random.random() * 0.2))),
        ]
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=READ_TIMEOUT_S)
        resp = await self.api.request("GET", self.spec.path(self.namespace), query, timeout=timeout)
        try:
            if resp.status == 410:
                raise Gone()
            if resp.status >= 400:
                raise ApiError(resp.status, (await resp.read())[:200].decode("utf-8", "replace"))
            buffer = b""
            while True:
                chunk = await resp.content.readany()
                if not chunk:
                    return  # the server ended the watch (timeoutSeconds): watch again
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        self._apply(orjson.loads(line))
        finally:
            resp.release()

    def _apply(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object")
        if not isinstance(obj, dict):
            log.warning("%s: watch event without an object skipped", self.source)
            return
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone()
            raise ApiError(int(obj.get("code") or 500), str(obj.get("message")))
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if version:
            self.resource_version = str(version)  # bookmarks too (KEP-956)
        if kind == "BOOKMARK":
            return
        self.events += 1
        obj.setdefault("kind", self.spec.kind)
        if kind in ("ADDED", "MODIFIED"):
            if object_key(obj) is None:
                log.warning("%s: object without a name skipped", self.source)
            elif self.keep is None or self.keep(obj):
                self.store.upsert(self.source, obj)
            else:
                self.store.delete(self.source, obj)  # e.g. a Secret no longer referenced
        elif kind == "DELETED":
            self.store.delete(self.source, obj)
        else:
            log.warning("%s: unknown watch event type %r skipped", self.source, kind)


class KubeSource:
    def __init__(self, store: ObjectStore, *, namespaces: Iterable[str], kubeconfig: Path | None,
                 in_cluster: bool, default_secret: str | None = None) -> None:  # fmt: skip
        self.store = store
        self.namespaces: list[str | None] = list(namespaces) or [None]
        self.kubeconfig = kubeconfig
        self.in_cluster = in_cluster
        self.default_refs: set[tuple[str, str]] = set()
        if default_secret and "/" in default_secret:
            ns, _, name = default_secret.partition("/")
            self.default_refs.add((ns, name))
        self.referenced: set[tuple[str, str]] = set(self.default_refs)
        self.watchers: list[KindWatcher] = []
        self.api: ApiTransport | None = None
        self.fetching: set[tuple[str, str]] = set()

    def _keep_secret(self, obj: dict[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        return (meta.get("namespace") or "default", meta.get("name")) in self.referenced

    def references_changed(self, secrets: Iterable[tuple[str, str]]) -> None:
        """Called after each compile with the Secrets served Ingresses name."""
        wanted = set(secrets) | self.default_refs
        added = wanted - self.referenced
        removed = self.referenced - wanted
        self.referenced = wanted
        for ns, name in removed:
            gone = {"kind": "Secret", "metadata": {"namespace": ns, "name": name}}
            self.store.delete(BY_NAME_SOURCE, gone)
            for watcher in self.watchers:
                if watcher.spec.kind == "Secret":
                    self.store.delete(watcher.source, gone)
        for ref in added:
            if ref not in self.fetching and self.api is not None:
                self.fetching.add(ref)
                asyncio.get_running_loop().create_task(self._fetch_secret(*ref))

    async def _fetch_secret(self, namespace: str, name: str) -> None:
        """A newly referenced Secret, fetched by name (the narrow watch keeps it fresh after)."""
        assert self.api is not None
        try:
            obj = await self.api.get_json(f"/api/v1/namespaces/{namespace}/secrets/{name}")
            obj.setdefault("kind", "Secret")
            if (namespace, name) in self.referenced:
                # A TLS Secret joins its watcher's objects (the narrow watch keeps it fresh);
                # any other type (a backend CA) is kept apart, so a re-list does not drop it.
                watcher = next((w for w in self.watchers if w.spec.kind == "Secret"
                                and w.namespace in (None, namespace)), None)  # fmt: skip
                tls = obj.get("type") == "kubernetes.io/tls"
                source = watcher.source if (watcher and tls) else BY_NAME_SOURCE
                self.store.upsert(source, obj)
        except ApiError as exc:
            log.warning("Secret %s/%s: %s; its hosts use the default certificate", namespace, name, exc)
        except (TimeoutError, aiohttp.ClientError, OSError, Gone) as exc:
            log.warning("Secret %s/%s could not be fetched: %s", namespace, name, exc)
        finally:
            self.fetching.discard((namespace, name))

    async def run(self, on_listed: Callable[[], None]) -> None:
        api_client = await api_client_from(self.kubeconfig, self.in_cluster)
        self.api = ApiTransport(api_client)
        pending: set[str] = set()

        def listed(source: str) -> Callable[[], None]:
            def done() -> None:
                pending.discard(source)
                if not pending:
                    log.info("every kind listed: the routing table is complete")
                    on_listed()

            return done

        for spec in KIND_SPECS:
            for namespace in ([None] if not spec.namespaced else self.namespaces):
                keep = self._keep_secret if spec.kind == "Secret" else None
                watcher = KindWatcher(spec, namespace, self.store, self.api, keep=keep)
                pending.add(watcher.source)
                watcher.on_listed = listed(watcher.source)
                self.watchers.append(watcher)
        try:
            await asyncio.gather(*(w.run() for w in self.watchers))
        finally:
            await api_client.close()

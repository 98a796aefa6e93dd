"""Kubernetes source: LIST then WATCH each kind, feeding the same ObjectStore as the manifests.

Three layers, one job each (as kopf's watching.py):
- `KindWatcher.run` lists and watches forever, with jittered exponential backoff when the API
  server is unreachable or answers 5xx; the last good table keeps serving meanwhile;
- `KindWatcher._list` lists in pages (limit/continue, so a large cluster lists within its
  timeout) and replaces this kind's objects in the store, so objects deleted meanwhile go;
- `KindWatcher._watch` watches from the list's resourceVersion and, whenever a stream ends
  (cleanly at timeoutSeconds, or because the connection dropped), watches again from the last
  version seen: only 410 Gone (as HTTP status or as an ERROR event) goes back to the list. A
  stream that ends at once without an event backs off before the next, so a server or proxy
  that closes watches immediately is not hammered;
- `KindWatcher._watch_once` sends one watch request with allowWatchBookmarks and reads its
  newline-delimited JSON events.

kubernetes-asyncio supplies configuration, authentication and the HTTP requests; responses are
read raw (`_preload_content=False`) and compiled from dicts, as the watch's raw_object would
be: no model objects are built on this path. kubernetes_asyncio's own Watch retries a 410 once
with the same version and then raises; the re-list is ours to do (its PR #327).

Secrets are watched as metadata only (PartialObjectMetadata: names and resourceVersions, no
keys); only the Secrets that served Ingresses reference are read, by name, when first
referenced and whenever their resourceVersion changes. No Secret's data is streamed.
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

from edgeproxy.objects import ObjectKey, ObjectStore, Packed, object_key, pack_all

log = logging.getLogger("edgeproxy.kube")

WATCH_TIMEOUT_S = 290  # server-side timeoutSeconds; jittered so watchers do not renew in step
READ_TIMEOUT_S = 120  # no byte (bookmarks included) for this long: the stream is dead
BACKOFF_START_S = 0.2
BACKOFF_MAX_S = 15.0
LIST_PAGE = 500  # items per LIST page (kubectl and client-go use 500)
QUICK_END_S = 1.0  # a watch that ends sooner than this without an event backs off
SECRETS_SOURCE = "kube:Secret:by-name"  # the referenced Secrets, read by name
METADATA_ACCEPT = ("application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,"
                   "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json")  # fmt: skip


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
    metadata_only: bool = False  # names and versions only (Secrets: their data is read by name)

    def path(self, namespace: str | None) -> str:
        if self.namespaced and namespace:
            return f"{self.group_path}/namespaces/{namespace}/{self.plural}"
        return f"{self.group_path}/{self.plural}"


KIND_SPECS = (
    KindSpec("IngressClass", "/apis/networking.k8s.io/v1", "ingressclasses", namespaced=False),
    KindSpec("Ingress", "/apis/networking.k8s.io/v1", "ingresses"),
    KindSpec("Service", "/api/v1", "services"),
    KindSpec("EndpointSlice", "/apis/discovery.k8s.io/v1", "endpointslices"),
    KindSpec("Secret", "/api/v1", "secrets", metadata_only=True),
)


class ApiTransport:
    """HTTP to the API server through kubernetes-asyncio's configured ApiClient (auth, TLS)."""

    def __init__(self, api_client: Any) -> None:
        self.api_client = api_client

    async def request(self, method: str, path: str, query: list[tuple[str, Any]] | None = None,
                      body: Any = None, content_type: str = "application/json",
                      timeout: Any = None, accept: str = "application/json") -> Any:  # fmt: skip
        headers = {"Accept": accept}
        if body is not None:
            headers["Content-Type"] = content_type
        return await self.api_client.call_api(
            path, method, query_params=query or [], header_params=headers, body=body,
            auth_settings=["BearerToken"], _preload_content=False, _request_timeout=timeout,
        )  # fmt: skip

    async def get_json(self, path: str, query: list[tuple[str, Any]] | None = None,
                       accept: str = "application/json") -> Any:  # fmt: skip
        resp = await self.request("GET", path, query, timeout=30, accept=accept)
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
                 api: ApiTransport, on_listed: Callable[[], None] | None = None) -> None:  # fmt: skip
        self.spec = spec
        self.namespace = namespace
        self.store = store
        self.api = api
        self.on_listed = on_listed
        # Metadata-only kinds hand their items and events to these instead of the store.
        self.metadata_listed: Callable[[list[dict[str, Any]], str | None], None] | None = None
        self.metadata_event: Callable[[str, dict[str, Any]], None] | None = None
        self.source = f"kube:{spec.kind}:{namespace or '*'}"
        self.resource_version = ""
        self.listed = False
        self.events = 0
        self.lists = 0
        self.watches = 0
        self.relists = 0  # lists again after 410 Gone

    @property
    def accept(self) -> str:
        return METADATA_ACCEPT if self.spec.metadata_only else "application/json"

    async def run(self, *, _iterations: int | None = None) -> None:
        """Forever (or `_iterations` turns, for tests): list, then watch; back off on failure."""
        backoff = BACKOFF_START_S
        turn = 0
        need_list = True
        while _iterations is None or turn < _iterations:
            turn += 1
            try:
                if need_list:
                    await self._list()
                    need_list = False
                    backoff = BACKOFF_START_S
                await self._watch()
            except Gone:
                log.info("%s: resourceVersion %s is gone; listing again", self.source,
                         self.resource_version)  # fmt: skip
                need_list = True
                self.relists += 1
                backoff = BACKOFF_START_S
            except asyncio.CancelledError:
                raise
            except (TimeoutError, aiohttp.ClientError, OSError, ApiError, ValueError) as exc:
                # The store stays as it is; the next watch resumes from the last version seen
                # (a list only if nothing was listed yet, or the version is gone).
                delay = backoff * (0.5 + random.random())  # full jitter around the step
                log.warning("%s: %s; retrying in %.1fs (the last good table keeps serving)",
                            self.source, exc or type(exc).__name__, delay)  # fmt: skip
                await asyncio.sleep(delay)
                backoff = min(BACKOFF_MAX_S, backoff * 2)

    async def _list(self) -> None:
        items: list[dict[str, Any]] = []
        # Packed page by page (as the store keeps them): a large cluster's objects never all
        # exist as dicts at once, and the heap they leave behind is not strewn with them.
        packed: list[tuple[ObjectKey, Packed]] = []
        query: list[tuple[str, Any]] = [("limit", LIST_PAGE)]
        version = ""
        while True:
            self.lists += 1
            data = await self.api.get_json(self.spec.path(self.namespace), query, self.accept)
            meta = data.get("metadata") or {}
            version = version or str(meta.get("resourceVersion") or "")
            page = []
            for item in data.get("items") or []:
                if isinstance(item, dict):
                    # List items carry no kind/apiVersion of their own (only the List does).
                    item["kind"] = self.spec.kind
                    page.append(item)
            if self.metadata_listed is not None:
                items.extend(page)
            else:
                packed.extend(pack_all(page))
            del data, page  # this page's dicts go before the next one is fetched
            token = meta.get("continue")
            if not token:
                break
            query = [("limit", LIST_PAGE), ("continue", token)]  # an expired token is 410
        self.resource_version = version
        if self.metadata_listed is not None:
            self.metadata_listed(items, self.namespace)
        else:
            self.store.replace_packed(self.source, packed)
        if not self.listed:
            self.listed = True
            log.info("%s: listed %d objects at resourceVersion %s", self.source, len(items),
                     self.resource_version)  # fmt: skip
            if self.on_listed is not None:
                self.on_listed()

    async def _watch(self) -> None:
        """Watch again and again from the last version seen; returns only by exception."""
        quick_ends = 0
        loop = asyncio.get_running_loop()
        while True:
            started, events = loop.time(), self.events
            await self._watch_once()
            if self.events == events and loop.time() - started < QUICK_END_S:
                quick_ends += 1  # ended at once, nothing delivered: do not spin
                delay = min(BACKOFF_MAX_S, BACKOFF_START_S * 2 ** min(quick_ends, 7))
                await asyncio.sleep(delay * (0.5 + random.random()))
            else:
                quick_ends = 0

    async def _watch_once(self) -> None:
        self.watches += 1
        query: list[tuple[str, Any]] = [
            ("watch", "true"),
            ("resourceVersion", self.resource_version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", int(WATCH_TIMEOUT_S * (0.9 + random.random() * 0.2))),
        ]
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=READ_TIMEOUT_S)
        resp = await self.api.request("GET", self.spec.path(self.namespace), query,
                                      timeout=timeout, accept=self.accept)  # fmt: skip
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
        obj["kind"] = self.spec.kind
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            log.warning("%s: unknown watch event type %r skipped", self.source, kind)
        elif object_key(obj) is None:
            log.warning("%s: object without a name skipped", self.source)
        elif self.metadata_event is not None:
            self.metadata_event(kind, obj)
        elif kind == "DELETED":
            self.store.delete(self.source, obj)
        else:
            self.store.upsert(self.source, obj)


class KubeSource:
    def __init__(self, store: ObjectStore, *, namespaces: Iterable[str], kubeconfig: Path | None,
                 in_cluster: bool, default_secret: str | None = None,
                 more_secrets: Iterable[str] = ()) -> None:  # fmt: skip
        self.store = store
        self.namespaces: list[str | None] = list(namespaces) or [None]
        self.kubeconfig = kubeconfig
        self.in_cluster = in_cluster
        self.default_refs: set[tuple[str, str]] = set()
        for ref in (default_secret, *more_secrets):  # Secrets named by flags: always read
            if ref and "/" in ref:
                ns, _, name = ref.partition("/")
                self.default_refs.add((ns, name))
        self.referenced: set[tuple[str, str]] = set(self.default_refs)
        self.watchers: list[KindWatcher] = []
        self.api: ApiTransport | None = None
        self.fetching: set[tuple[str, str]] = set()  # referenced Secrets being read now
        # Secret -> resourceVersion: as the metadata watch last saw it, and as last read.
        self.secret_versions: dict[tuple[str, str], str] = {}
        self.fetched_versions: dict[tuple[str, str], str] = {}
        self.secrets_listed = False  # every namespace's Secret metadata listed once
        self._secret_lists: set[str | None] = set()

    def watch_figures(self) -> dict[str, tuple[int, int, int]]:
        """Per kind: watch events, watches started again, lists again after 410 (metrics)."""
        figures: dict[str, tuple[int, int, int]] = {}
        for w in self.watchers:
            events, restarts, relists = figures.get(w.spec.kind, (0, 0, 0))
            figures[w.spec.kind] = (events + w.events, restarts + max(w.watches - 1, 0),
                                    relists + w.relists)  # fmt: skip
        return figures

    # -- Secrets: metadata watch, data read by name -------------------------------------

    def _secrets_listed(self, items: list[dict[str, Any]], namespace: str | None) -> None:
        versions: dict[tuple[str, str], str] = {}
        for item in items:
            meta = item.get("metadata") or {}
            ref = (str(meta.get("namespace") or "default"), str(meta.get("name")))
            versions[ref] = str(meta.get("resourceVersion") or "")
        for ref in [r for r in self.secret_versions if namespace in (None, r[0])]:
            if ref not in versions:
                del self.secret_versions[ref]
        self.secret_versions.update(versions)
        self._secret_lists.add(namespace)
        self.secrets_listed = len(self._secret_lists) == len(self.namespaces)
        for ref in self.referenced:
            if namespace in (None, ref[0]) and ref not in versions:
                self._drop_secret(ref)
            self._read_if_stale(ref)

    def _secret_event(self, kind: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        ref = (meta.get("namespace") or "default", meta.get("name"))
        if kind == "DELETED":
            self.secret_versions.pop(ref, None)  # type: ignore[arg-type]
            if ref in self.referenced:
                self._drop_secret(ref)  # type: ignore[arg-type]
            return
        self.secret_versions[ref] = str(meta.get("resourceVersion") or "")  # type: ignore[index]
        self._read_if_stale(ref)  # type: ignore[arg-type]

    def _read_if_stale(self, ref: tuple[str, str]) -> None:
        if ref not in self.referenced or ref in self.fetching or self.api is None:
            return
        version = self.secret_versions.get(ref)
        if self.secrets_listed and version is None:
            return  # it does not exist (yet): its ADDED event will bring it
        if version is None or version != self.fetched_versions.get(ref):
            self.fetching.add(ref)
            asyncio.get_running_loop().create_task(self._fetch_secret(*ref))

    def _drop_secret(self, ref: tuple[str, str]) -> None:
        self.fetched_versions.pop(ref, None)
        self.store.delete(SECRETS_SOURCE, {"kind": "Secret", "metadata": {"namespace": ref[0], "name": ref[1]}})

    def references_changed(self, secrets: Iterable[tuple[str, str]]) -> None:
        """Called after each compile with the Secrets served Ingresses name."""
        wanted = set(secrets) | self.default_refs
        removed = self.referenced - wanted
        added = wanted - self.referenced
        self.referenced = wanted
        for ref in removed:
            self._drop_secret(ref)
        for ref in added:
            self._read_if_stale(ref)

    async def _fetch_secret(self, namespace: str, name: str) -> None:
        """A referenced Secret, read by name (again whenever the metadata watch shows a new
        resourceVersion)."""
        assert self.api is not None
        ref = (namespace, name)
        try:
            obj = await self.api.get_json(f"/api/v1/namespaces/{namespace}/secrets/{name}")
            obj["kind"] = "Secret"
            if ref in self.referenced:
                self.fetched_versions[ref] = str((obj.get("metadata") or {}).get("resourceVersion") or "")
                self.store.upsert(SECRETS_SOURCE, obj)
        except ApiError as exc:
            log.warning("Secret %s/%s: %s; its hosts use the default certificate", namespace, name, exc)
        except (TimeoutError, aiohttp.ClientError, OSError, Gone, ValueError) as exc:
            log.warning("Secret %s/%s could not be read: %s", namespace, name, exc)
        finally:
            self.fetching.discard(ref)
        if ref in self.referenced and self.secret_versions.get(ref) not in (None, self.fetched_versions.get(ref)):
            self._read_if_stale(ref)  # changed again while it was being read

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
                watcher = KindWatcher(spec, namespace, self.store, self.api)
                if spec.kind == "Secret":
                    watcher.metadata_listed = self._secrets_listed
                    watcher.metadata_event = self._secret_event
                pending.add(watcher.source)
                watcher.on_listed = listed(watcher.source)
                self.watchers.append(watcher)
        try:
            await asyncio.gather(*(w.run() for w in self.watchers))
        finally:
            await api_client.close()

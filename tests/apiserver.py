"""A small Kubernetes API server emulator: LIST and WATCH over real HTTP, for edgeproxy's watch.

It speaks what kubernetes-asyncio and edgeproxy use: lists with metadata.resourceVersion,
chunked newline-delimited JSON watch streams from a resourceVersion, BOOKMARK events when
allowWatchBookmarks is set, 410 Gone for versions older than the retained history (as an ERROR
event, like the real API server, or as an HTTP status), fieldSelector type=... for Secrets,
paginated lists (limit/continue, from one snapshot), metadata-only lists and watches (Accept
as=PartialObjectMetadata[List]), watches that end early (watch_lifetime), GET of a single
object, and Lease / Ingress status writes. `requests` records each LIST, WATCH and GET. Tests drive it from the same loop:
apply, delete, compact the history, end the open watches, stop and start it.
"""

from __future__ import annotations

import asyncio
import bisect
import copy
import time
from typing import Any

import orjson
from aiohttp import web

ROUTES = {
    # plural -> (kind, namespaced)
    "ingresses": ("Ingress", True),
    "ingressclasses": ("IngressClass", False),
    "services": ("Service", True),
    "endpointslices": ("EndpointSlice", True),
    "secrets": ("Secret", True),
    "leases": ("Lease", True),
    "pods": ("Pod", True),
}
GROUPS = ("/api/v1", "/apis/networking.k8s.io/v1", "/apis/discovery.k8s.io/v1",
          "/apis/coordination.k8s.io/v1")  # fmt: skip


class FakeApiServer:
    def __init__(self, bookmark_interval: float = 0.5, gone_as_event: bool = True) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.history: list[tuple[int, str, str, dict[str, Any]]] = []  # (rv, kind, type, obj)
        self.rv = 100
        self.oldest_rv = 100  # watches from before this get 410
        self.bookmark_interval = bookmark_interval
        self.gone_as_event = gone_as_event
        self.changed = asyncio.Condition()
        self.requests: list[str] = []
        self.watch_count = 0
        self.runner: web.AppRunner | None = None
        self.port = 0
        self._streams: set[web.StreamResponse] = set()
        self.event_sent_at: dict[int, float] = {}  # rv -> perf_counter time the event left the server (fine-grained: uvloop's loop time is in ms)
        self.finish_epoch = 0
        self.compact_on_delete = False
        self.get_delay = 0.0  # seconds before a GET of one object answers
        self.watch_lifetime: float | None = None  # end every watch after this long (0: at once)
        self._pages: dict[str, list[dict[str, Any]]] = {}  # continue token -> the rest
        self._page_rv: dict[str, str] = {}

    # -- control, for tests ----------------------------------------------------------

    async def start(self, port: int = 0) -> int:
        app = web.Application()
        for group in GROUPS:
            app.router.add_get(group + "/{plural}", self._collection)
            app.router.add_get(group + "/namespaces/{ns}/{plural}", self._collection)
            app.router.add_get(group + "/namespaces/{ns}/{plural}/{name}", self._get)
            app.router.add_get(group + "/{plural}/{name}", self._get)
            app.router.add_post(group + "/namespaces/{ns}/{plural}", self._create)
            app.router.add_put(group + "/namespaces/{ns}/{plural}/{name}", self._replace)
            app.router.add_patch(group + "/namespaces/{ns}/{plural}/{name}/status", self._patch_status)
        self.runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port or self.port or 0, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.port

    async def stop(self) -> None:
        await self.end_watches()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def finish_watches(self) -> None:
        """End every open watch cleanly, as timeoutSeconds does: clients watch again."""
        self.finish_epoch += 1
        async with self.changed:
            self.changed.notify_all()

    async def end_watches(self) -> None:
        """Close every open watch stream, as an API server restart or a load balancer would."""
        for stream in list(self._streams):
            transport = stream._req.transport if stream._req else None  # type: ignore[attr-defined]
            if transport is not None:
                transport.close()
        self._streams.clear()

    def compact(self, including_current: bool = False) -> None:
        """Forget the event history: resuming a watch from an older version gets 410 Gone
        (from any version, current included, if asked: as after an etcd restore)."""
        self.history.clear()
        self.oldest_rv = self.rv + 1 if including_current else self.rv

    def kubeconfig(self) -> str:
        return f"""apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "http://127.0.0.1:{self.port}"}}}}]
users: [{{name: fake, user: {{token: test-token}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]
current-context: fake
"""

    async def apply(self, *objects: dict[str, Any]) -> int:
        for obj in objects:
            obj = copy.deepcopy(obj)
            meta = obj.setdefault("metadata", {})
            key = self._key(obj)
            event = "MODIFIED" if key in self.objects else "ADDED"
            self.rv += 1
            meta["resourceVersion"] = str(self.rv)
            meta.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
            self.objects[key] = obj
            self.history.append((self.rv, obj["kind"], event, obj))
        async with self.changed:
            self.changed.notify_all()
        return self.rv

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        obj = self.objects.pop((kind, namespace if kind != "IngressClass" else "", name))
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.rv)
        if self.compact_on_delete:
            # Compacted at once, never delivered: only a LIST after 410 Gone can tell.
            self.history.clear()
            self.oldest_rv = self.rv + 1
            return
        self.history.append((self.rv, kind, "DELETED", obj))
        async with self.changed:
            self.changed.notify_all()

    @staticmethod
    def _key(obj: dict[str, Any]) -> tuple[str, str, str]:
        meta = obj["metadata"]
        ns = "" if obj["kind"] == "IngressClass" else meta.get("namespace", "default")
        return (obj["kind"], ns, meta["name"])

    # -- HTTP ------------------------------------------------------------------------

    def _matches(self, obj: dict[str, Any], kind: str, ns: str | None, selector: str | None,
                 labels: str | None = None) -> bool:  # fmt: skip
        if obj["kind"] != kind:
            return False
        for term in (labels or "").split(","):  # equality terms only: key=value
            key, _, value = term.partition("=")
            if key and (obj["metadata"].get("labels") or {}).get(key) != value:
                return False
        if ns is not None and obj["metadata"].get("namespace", "default") != ns:
            return False
        if selector:
            field, _, value = selector.partition("=")
            if field == "type" and obj.get("type") != value:
                return False
            if field == "metadata.name" and obj["metadata"]["name"] != value:
                return False
        return True

    async def _collection(self, request: web.Request) -> web.StreamResponse:
        plural = request.match_info["plural"]
        if plural not in ROUTES:
            raise web.HTTPNotFound()
        kind, _ = ROUTES[plural]
        ns = request.match_info.get("ns")
        selector = request.query.get("fieldSelector")
        self.requests.append(f"{'WATCH' if request.query.get('watch') else 'LIST'} {kind}")
        if request.query.get("watch") in ("true", "1"):
            return await self._watch(request, kind, ns, selector)
        metadata_only = "as=PartialObjectMetadata" in request.headers.get("Accept", "")
        token = request.query.get("continue")
        if token:
            if token not in self._pages:
                return web.json_response({"kind": "Status", "code": 410, "reason": "Expired"}, status=410)  # fmt: skip
            items, rv = self._pages.pop(token), self._page_rv.pop(token)
        else:
            items = [self._shape(o, metadata_only) for o in sorted(self.objects.values(), key=self._key)
                     if self._matches(o, kind, ns, selector, request.query.get("labelSelector"))]  # fmt: skip
            rv = str(self.rv)
        limit = int(request.query.get("limit") or 0)
        meta: dict[str, Any] = {"resourceVersion": rv}
        if limit and len(items) > limit:
            next_token = f"page-{len(self.requests)}"
            self._pages[next_token], self._page_rv[next_token] = items[limit:], rv
            items = items[:limit]
            meta["continue"] = next_token
        body = {"kind": "PartialObjectMetadataList" if metadata_only else f"{kind}List",
                "apiVersion": "v1", "metadata": meta,
                "items": [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")} for o in items]}  # fmt: skip
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    @staticmethod
    def _shape(obj: dict[str, Any], metadata_only: bool) -> dict[str, Any]:
        if not metadata_only:
            return obj
        return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                "metadata": obj["metadata"]}  # fmt: skip

    async def _watch(self, request: web.Request, kind: str, ns: str | None, selector: str | None) -> web.StreamResponse:  # fmt: skip
        self.watch_count += 1
        since = int(request.query.get("resourceVersion") or self.rv)
        bookmarks = request.query.get("allowWatchBookmarks") == "true"
        timeout = float(request.query.get("timeoutSeconds") or 300)
        if since < self.oldest_rv:
            gone = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
                    "reason": "Expired", "message": f"too old resource version: {since}"}  # fmt: skip
            if not self.gone_as_event:
                return web.Response(status=410, body=orjson.dumps(gone), content_type="application/json")  # fmt: skip
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            await resp.write(orjson.dumps({"type": "ERROR", "object": gone}) + b"\n")
            return resp
        metadata_only = "as=PartialObjectMetadata" in request.headers.get("Accept", "")
        resp = web.StreamResponse()
        resp.content_type = "application/json"
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        self._streams.add(resp)
        loop = asyncio.get_running_loop()
        if self.watch_lifetime is not None:
            timeout = min(timeout, self.watch_lifetime)
        deadline = loop.time() + timeout
        sent = since
        epoch = self.finish_epoch
        task = asyncio.current_task()
        try:
            # cancelling(): Python 3.11's wait_for can swallow a cancel that lands as the
            # Condition wakes; the stream must still end (a test's teardown waits for it).
            while loop.time() < deadline and epoch == self.finish_epoch and not (task and task.cancelling()):
                # History is in resourceVersion order: start after what this stream has sent.
                start = bisect.bisect_right(self.history, sent, key=lambda event: event[0])
                for rv, ev_kind, ev_type, obj in self.history[start:]:
                    if rv > sent and ev_kind == kind and self._matches(obj, kind, ns, selector):
                        shaped = self._shape(obj, metadata_only)
                        await resp.write(orjson.dumps({"type": ev_type, "object": shaped}) + b"\n")
                        self.event_sent_at.setdefault(rv, time.perf_counter())
                    if rv > sent:
                        sent = rv
                sent = max(sent, self.rv)
                async with self.changed:
                    try:
                        wait = min(self.bookmark_interval, max(0.0, deadline - loop.time()))
                        await asyncio.wait_for(self.changed.wait(), wait)
                    except TimeoutError:
                        if bookmarks:
                            mark = {"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": "v1",
                                    "metadata": {"resourceVersion": str(self.rv)}}}  # fmt: skip
                            await resp.write(orjson.dumps(mark) + b"\n")
                            sent = max(sent, self.rv)
        except (ConnectionError, RuntimeError):
            pass
        finally:
            self._streams.discard(resp)
        return resp

    async def _get(self, request: web.Request) -> web.Response:
        plural = request.match_info["plural"]
        kind, namespaced = ROUTES.get(plural, ("", False))
        ns = request.match_info.get("ns", "") if namespaced else ""
        self.requests.append(f"GET {kind} {ns}/{request.match_info['name']}")
        if self.get_delay:
            await asyncio.sleep(self.get_delay)
        obj = self.objects.get((kind, ns, request.match_info["name"]))
        if obj is None:
            return web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)  # fmt: skip
        return web.Response(body=orjson.dumps(obj), content_type="application/json")

    async def _create(self, request: web.Request) -> web.Response:
        obj = await request.json()
        kind, _ = ROUTES[request.match_info["plural"]]
        obj["kind"] = kind
        obj["metadata"]["namespace"] = request.match_info["ns"]
        if self._key(obj) in self.objects:
            return web.json_response({"kind": "Status", "code": 409, "reason": "AlreadyExists"}, status=409)  # fmt: skip
        await self.apply(obj)
        return web.Response(body=orjson.dumps(self.objects[self._key(obj)]), status=201,
                            content_type="application/json")  # fmt: skip

    async def _replace(self, request: web.Request) -> web.Response:
        obj = await request.json()
        kind, _ = ROUTES[request.match_info["plural"]]
        obj["kind"] = kind
        key = (kind, request.match_info["ns"], request.match_info["name"])
        current = self.objects.get(key)
        if current is None:
            return web.json_response({"kind": "Status", "code": 404}, status=404)
        want = obj.get("metadata", {}).get("resourceVersion")
        if want and want != current["metadata"]["resourceVersion"]:
            return web.json_response({"kind": "Status", "code": 409, "reason": "Conflict"}, status=409)  # fmt: skip
        obj["metadata"]["namespace"] = request.match_info["ns"]
        await self.apply(obj)
        return web.Response(body=orjson.dumps(self.objects[key]), content_type="application/json")

    async def _patch_status(self, request: web.Request) -> web.Response:
        patch = await request.json()
        kind, _ = ROUTES[request.match_info["plural"]]
        key = (kind, request.match_info["ns"], request.match_info["name"])
        current = self.objects.get(key)
        if current is None:
            return web.json_response({"kind": "Status", "code": 404}, status=404)
        updated = copy.deepcopy(current)
        updated["status"] = patch.get("status", {})
        self.requests.append(f"PATCH {kind} status")
        await self.apply(updated)
        return web.Response(body=orjson.dumps(self.objects[key]), content_type="application/json")

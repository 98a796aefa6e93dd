"""Ingress status: write status.loadBalancer.ingress of served Ingresses, from one replica only.

Leader election uses a coordination.k8s.io/v1 Lease (as client-go's leaderelection): the holder
renews it every RENEW_INTERVAL_S; another replica takes it over once renewTime is older than
leaseDurationSeconds. Updates carry the Lease's resourceVersion, so two replicas racing for an
expired Lease cannot both win. Only the leader writes status, and only when the value differs
from what the Ingress already has.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import os
import socket
from collections.abc import Iterable
from typing import Any

import orjson

from edgeproxy.objects import ObjectStore
from edgeproxy.sources.kube import ApiError, ApiTransport

log = logging.getLogger("edgeproxy.status")

LEASE_NAME = "edgeproxy-status-writer"
LEASE_DURATION_S = 15
RENEW_INTERVAL_S = 2.0
MICROTIME = "%Y-%m-%dT%H:%M:%S.%fZ"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def load_balancer_entries(addresses: Iterable[str]) -> list[dict[str, str]]:
    entries = []
    for address in addresses:
        try:
            ipaddress.ip_address(address)
            entries.append({"ip": address})
        except ValueError:
            entries.append({"hostname": address})
    return entries


class StatusWriter:
    def __init__(self, store: ObjectStore, api: ApiTransport, *, publish_address: str | None,
                 publish_service: str | None, lease_namespace: str,
                 publish_pods: str | None = None) -> None:  # fmt: skip
        self.store = store
        self.api = api
        self.publish_address = publish_address
        self.publish_service = publish_service
        self.publish_pods = publish_pods  # a label selector: every node such a pod runs on
        self.pod_addresses: list[str] = []
        self.lease_namespace = lease_namespace
        self.identity = f"{socket.gethostname()}-{os.getpid()}"
        self.leader = False
        self.served: tuple[str, ...] = ()
        self.writes = 0
        self._dirty = asyncio.Event()

    def published(self, served_ingresses: tuple[str, ...]) -> None:
        self.served = served_ingresses
        self._dirty.set()

    def desired(self) -> list[dict[str, str]]:
        if self.publish_pods:
            return load_balancer_entries(self.pod_addresses)
        if self.publish_address:
            return load_balancer_entries([self.publish_address])
        if self.publish_service:
            ns, _, name = self.publish_service.partition("/")
            svc = self.store.snapshot().objects.get(("Service", ns, name)) or {}
            lb = ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
            if lb:
                return [{k: v for k, v in e.items() if k in ("ip", "hostname")} for e in lb]
            return load_balancer_entries((svc.get("spec") or {}).get("externalIPs") or [])
        return []

    async def run(self) -> None:
        while True:
            try:
                await self._elect()
                if self.leader and self.publish_pods:
                    await self._read_pods()
                if self.leader and self._dirty.is_set():
                    self._dirty.clear()
                    await self._write_all()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # status is best effort; routing never waits on it
                log.warning("ingress status: %s", exc)
                self._dirty.set()
            try:
                await asyncio.wait_for(self._dirty.wait(), RENEW_INTERVAL_S)
            except TimeoutError:
                pass

    async def _elect(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{self.lease_namespace}/leases"
        now = _now()
        spec = {"holderIdentity": self.identity, "leaseDurationSeconds": LEASE_DURATION_S,
                "renewTime": now.strftime(MICROTIME)}  # fmt: skip
        resp = await self.api.request("GET", f"{path}/{LEASE_NAME}", timeout=10)
        try:
            body = await resp.read()
            status = resp.status
        finally:
            resp.release()
        if status == 404:
            lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                     "metadata": {"name": LEASE_NAME, "namespace": self.lease_namespace},
                     "spec": spec | {"acquireTime": now.strftime(MICROTIME)}}  # fmt: skip
            became = await self._send("POST", path, lease)
        elif status >= 400:
            raise ApiError(status, body[:200].decode("utf-8", "replace"))
        else:
            lease = orjson.loads(body)
            current = lease.get("spec") or {}
            holder = current.get("holderIdentity")
            renewed = current.get("renewTime")
            expired = True
            if renewed:
                renewed_at = datetime.datetime.strptime(renewed, MICROTIME).replace(
                    tzinfo=datetime.UTC)  # fmt: skip
                duration = current.get("leaseDurationSeconds") or LEASE_DURATION_S
                expired = (now - renewed_at).total_seconds() > duration
            if holder != self.identity and not expired:
                became = False
            else:
                if holder != self.identity:
                    spec["acquireTime"] = now.strftime(MICROTIME)
                lease["spec"] = current | spec
                became = await self._send("PUT", f"{path}/{LEASE_NAME}", lease)
        if became != self.leader:
            log.info("ingress status writer: %s", "leading" if became else "following")
            if became:
                self._dirty.set()
        self.leader = became

    async def _send(self, method: str, path: str, body: dict[str, Any]) -> bool:
        resp = await self.api.request(method, path, body=body, timeout=10)
        try:
            await resp.read()
            return resp.status < 300  # 409: another replica won the race
        finally:
            resp.release()

    async def _read_pods(self) -> None:
        """The node addresses of the ready pods of this DaemonSet (its --publish-pods selector):
        a client may be sent to any node edgeproxy serves on, not only the leader's."""
        path = f"/api/v1/namespaces/{self.lease_namespace}/pods"
        data = await self.api.get_json(path, [("labelSelector", self.publish_pods)])
        addresses = set()
        for pod in data.get("items") or []:
            status = pod.get("status") or {}
            ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                        for c in status.get("conditions") or [])  # fmt: skip
            if ready and status.get("hostIP"):
                addresses.add(status["hostIP"])
        found = sorted(addresses, key=lambda a: (":" in a, a))
        if found != self.pod_addresses:
            self.pod_addresses = found
            self._dirty.set()

    async def _write_all(self) -> None:
        want = self.desired()
        objects = self.store.snapshot().objects
        for ref in self.served:
            ns, _, name = ref.partition("/")
            ing = objects.get(("Ingress", ns, name))
            if ing is None:
                continue
            have = ((ing.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
            if have == want:
                continue
            patch = {"status": {"loadBalancer": {"ingress": want}}}
            resp = await self.api.request(
                "PATCH", f"/apis/networking.k8s.io/v1/namespaces/{ns}/ingresses/{name}/status",
                body=patch, content_type="application/merge-patch+json", timeout=10,
            )  # fmt: skip
            try:
                await resp.read()
                if resp.status >= 300:
                    raise ApiError(resp.status, f"status of Ingress {ref} not written")
            finally:
                resp.release()
            self.writes += 1
            log.info("Ingress %s: status.loadBalancer.ingress = %s", ref, want)

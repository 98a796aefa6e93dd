"""The pod's control plane, one process: sources, compile, certificates, pod-wide health, the
admin listener, the listening sockets, and the workers that serve traffic.

    sources (manifests | one LIST+WATCH per kind) -> ObjectStore -> RoutePipeline (compile)
        -> Workers.publish -> TableSender deltas -> every worker's channel (worker.py)

Workers are separate processes (`python -m edgeproxy.worker`) started with their slot's
listening sockets; nothing on their loops lists, watches, parses YAML or compiles. Workers
report endpoint outcomes; the supervisor counts them for the whole pod and sends verdicts back
(Envoy: workers report, the main thread decides). A worker that dies is started again at once.

Stopping (SIGTERM/SIGINT): /readyz turns 503, the workers keep serving for --shutdown-delay
(a second signal cuts it short), then they stop accepting and drain for --drain-timeout, and
the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edgeproxy.channel import Channel, frame
from edgeproxy.compile import CompileResult
from edgeproxy.config import Settings
from edgeproxy.health import EndpointRegistry
from edgeproxy.hosts import EndpointKey
from edgeproxy.listeners import (
    HandoverServer,
    Listener,
    migrate_req_enabled,
    open_listeners,
    take_over,
)
from edgeproxy.memory import first_table_served, hold_collection
from edgeproxy.metrics import PodMetrics, WorkerTotals
from edgeproxy.objects import ObjectStore
from edgeproxy.pipeline import EndpointChanges, RoutePipeline
from edgeproxy.tablesync import Keys, TableSender
from edgeproxy.tls import (
    TICKET_KEY_BYTES,
    BadCertificate,
    CertificateStore,
    derive_ticket_keys,
    secret_ticket_material,
)

log = logging.getLogger("edgeproxy")
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)  # where `edgeproxy` was found

TICK_S = 0.1  # health verdict ends, readiness checks, counter polls are looked at this often
STATS_POLL_S = 1.0  # workers' counters are fetched this often (what a crash can lose)
RESPAWN_BACKOFF_S = 1.0  # a replacement that crashes within this of its start waits this long
STATS_TIMEOUT_S = 1.0


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, bounded by a cgroup CPU quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = None
    try:  # cgroup v2
        max_, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if max_ != "max":
            quota = int(max_) / int(period)
    except (OSError, ValueError):
        try:  # cgroup v1
            max_v1 = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
            period_v1 = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
            if max_v1 > 0:
                quota = max_v1 / period_v1
        except (OSError, ValueError):
            pass
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


class WorkerProcess:
    """The supervisor's handle on one worker."""

    def __init__(self, slot: int, proc: subprocess.Popen[bytes], replacement: bool) -> None:
        self.slot = slot
        self.proc = proc
        self.channel: Channel | None = None
        self.started = time.monotonic()
        self.replacement = replacement
        self.generation = -1
        self.serving = False
        self.gone = False
        self.counters: dict[str, Any] = {}
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.sent_pems: set[bytes] = set()

    def send(self, message: tuple[Any, ...]) -> None:
        if self.channel is not None and not self.gone:
            self.channel.send(message)


class Supervisor:
    def __init__(self, args: argparse.Namespace, settings: Settings,
                 loop: asyncio.AbstractEventLoop) -> None:  # fmt: skip
        from edgeproxy.balancing import load_balancers

        self.args = args
        self.settings = settings
        self.loop = loop
        self.slots = args.workers or available_cpus()
        self.store = ObjectStore()
        self.sender = TableSender()
        self.certificates = CertificateStore(args.default_certificate)
        self.registry = EndpointRegistry(loop.time, settings.outlier)  # the pod-wide verdicts
        self.key_cids: dict[EndpointKey, set[int]] = {}  # endpoint -> the clusters listing it
        self.pipeline = RoutePipeline(
            self.store, [self], only_class=args.ingress_class, balancers=load_balancers(),
            default_balancer=settings.default_balancer, loop=loop, outlier=settings.outlier,
        )  # fmt: skip
        self.pipeline.on_published.append(self._certificates_changed)
        # Session ticket keys: random for this pod unless a Secret names them (all replicas).
        self.ticket_keys = os.urandom(TICKET_KEY_BYTES)
        self.ticket_secret = getattr(args, "tls_ticket_key_secret", None)
        self._ticket_problem = ""
        if self.ticket_secret:
            self.pipeline.on_published.append(self._ticket_keys_changed)
        # A thread, so watch events and health verdicts keep flowing while a large table
        # compiles (the GIL switches every 5 ms). Not niced: a low-priority thread holding the
        # GIL would stall the loop behind it (priority inversion; measured worse).
        self.pipeline.compile_thread = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="compile")
        self.workers: list[WorkerProcess | None] = [None] * self.slots
        self.listeners: list[Listener] = []
        self.handover: HandoverServer | None = None
        self.retired = WorkerTotals()  # counters of workers that exited (they never go back)
        self.metrics = PodMetrics(self)
        self.store.subscribe(lambda: self.metrics.changed(self.store.generation))
        self.pipeline.on_timed.append(self.metrics.published)
        self.sources_listed: list[bool] = []
        self.listed_generation = 0
        self.kube: Any = None
        self.manifest_errors: dict[Path, str] = {}  # manifest files whose last read failed
        self.serving = False  # "serve" was sent: the first complete table is out
        self.draining = False  # SIGTERM seen: /readyz says 503
        self.stopping = False  # the drain has begun: no more respawns
        self.stop_requested = asyncio.Event()
        self.cut_short = asyncio.Event()
        self.background: list[asyncio.Task[Any]] = []
        self._health_dirty: set[EndpointKey] = set()
        self._token = 0
        self._last_poll = 0.0

    # -- Publisher (pipeline.py): tables and endpoints to every worker ------------------------

    def publish(self, result: CompileResult) -> None:
        message = self.sender.update(result.table, result.delta, result.endpoints)
        self.broadcast(message)
        if self.sender.key_changes is not None:  # an update: the index follows its changes
            self._reindex(self.sender.key_changes)
            return
        index: dict[EndpointKey, set[int]] = {}
        for cid, keys in self.sender.keys.items():
            for key in keys:
                index.setdefault(key, set()).add(cid)
        self.key_cids = index
        for key in index:
            self.registry.get(key)
        self.registry.retain(index)

    def refresh_endpoints(self, changes: EndpointChanges) -> None:
        """An EndpointSlice event: costs the clusters it changed, not the table."""
        message = self.sender.refresh(changes, self.store.generation)
        self.broadcast(message)
        assert self.sender.key_changes is not None
        self._reindex(self.sender.key_changes)

    def _reindex(self, changes: list[tuple[int, Keys, Keys]]) -> None:
        """Endpoint -> clusters listing it, after these (cid, before, after) changes; an
        endpoint no cluster lists any more loses its pod-wide health state."""
        index = self.key_cids
        for cid, old, new in changes:  # additions first: a key moving between clusters stays
            for key in set(new) - set(old):
                index.setdefault(key, set()).add(cid)
                self.registry.get(key)
        gone = []
        for cid, old, new in changes:
            for key in set(old) - set(new):
                cids = index.get(key)
                if cids is not None:
                    cids.discard(cid)
                    if not cids:
                        del index[key]
                        gone.append(key)
        self.registry.forget(gone)

    def broadcast(self, message: tuple[Any, ...]) -> None:
        data = frame(message)  # pickled once, whatever the number of workers
        for worker in self.workers:
            if worker is not None and worker.channel is not None and not worker.gone:
                worker.channel.send_frame(data)

    def _certificates_changed(self, result: CompileResult) -> None:
        if not result.touches_certificates():
            return
        snapshot = self.store.view()
        reading = self._reading()
        self.certificates.reading = reading
        self.certificates.update(snapshot, result.tls)
        by_ca: dict[tuple[str, str], Any] = {}  # backend CA Secret -> one cluster naming it
        for cluster in result.ca_clusters:
            if cluster.transport.ca_secret is not None:
                by_ca.setdefault(cluster.transport.ca_secret, cluster)
        for ref, cluster in by_ca.items():  # a missing or bad CA is reported here, once
            if ref not in reading:
                self.certificates.backend_context(snapshot, *ref, cluster.name,
                                                  cluster.transport.server_name)  # fmt: skip
        self.cas = self.certificates.backend_cas(snapshot, by_ca)
        for worker in self.workers:
            if worker is not None:
                self._send_certificates(worker)

    def _ticket_keys_changed(self, result: CompileResult) -> None:
        """The ticket key Secret, read again at each publish; a new key goes to every worker.
        Tickets made with the old key then get a full handshake, never a failed one."""
        ns, _, name = (self.ticket_secret or "").partition("/")
        if result.delta is not None and (ns, name) not in result.delta.secrets:
            return
        secret = self.store.get(("Secret", ns, name))
        label = f"Secret {ns}/{name} (--tls-ticket-key-secret)"
        problem = ""
        if secret is None:
            problem = f"{label} not found; session tickets use this pod's own key meanwhile"
        else:
            try:
                keys = derive_ticket_keys(secret_ticket_material(secret, label))
            except BadCertificate as exc:
                problem = f"{exc}; session tickets keep their last key"
            else:
                if keys != self.ticket_keys:
                    self.ticket_keys = keys
                    log.info("session ticket keys from %s now in use", label)
                    self.broadcast(("ticket_keys", keys))
        if problem and problem != self._ticket_problem and (ns, name) not in self._reading():
            log.warning("%s", problem)
        self._ticket_problem = problem

    def _reading(self) -> set[tuple[str, str]]:
        return self.kube.fetching if self.kube is not None else set()

    def _send_certificates(self, worker: WorkerProcess) -> None:
        exact, wildcard, default_id, pems = self.certificates.state()
        new = {fp: pem for fp, pem in pems.items() if fp not in worker.sent_pems}
        worker.sent_pems.update(new)
        worker.send(("certs", exact, wildcard, default_id, new, getattr(self, "cas", {})))

    # -- pod-wide passive health ----------------------------------------------------------

    def _outcome(self, key: EndpointKey, failed: bool) -> None:
        state = self.registry.states.get(key)
        if state is None:
            return  # an endpoint that left the table meanwhile
        if failed:
            cid = min(self.key_cids.get(key) or {-1})  # one of its clusters: the cap's base
            peers_keys = self.sender.keys.get(cid, (key,))
            peers = [self.registry.states[k] for k in peers_keys if k in self.registry.states]
            outlier = self.sender.clusters[cid].outlier if cid in self.sender.clusters else None
            state.failures += 1
            ejections = state.ejections
            self.registry.record_failure(state, peers, outlier)
            state.failures -= 1  # record_failure counted it; workers count requests and failures
            if state.ejections > ejections:
                services = {self.sender.clusters[c].service for c in self.key_cids.get(key, ())
                            if c in self.sender.clusters}  # fmt: skip
                for service in services:
                    if service is not None:
                        self.metrics.ejections.labels(*service).inc()
        elif state.consecutive_failures:
            self.registry.record_success(state)
        else:
            return
        self._health_dirty.add(key)
        if len(self._health_dirty) == 1:
            self.loop.call_soon(self._send_health)

    def _send_health(self) -> None:
        verdicts = []
        for key in self._health_dirty:
            state = self.registry.states.get(key)
            if state is not None:
                verdicts.append((key, state.consecutive_failures, state.ejected_until,
                                 state.ejections))  # fmt: skip
        self._health_dirty.clear()
        if verdicts:
            self.broadcast(("health", verdicts))

    def _health_state(self) -> list[tuple[EndpointKey, int, float, int]]:
        return [(s.key, s.consecutive_failures, s.ejected_until, s.ejections)
                for s in self.registry.states.values() if s.consecutive_failures or s.ejections]  # fmt: skip

    # -- workers ------------------------------------------------------------------------------

    async def spawn(self, slot: int, replacement: bool = False) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        described = []
        fds = [child.fileno()]
        for listener in self.listeners:
            socks = listener.for_slot(slot, self.slots)
            described.append((listener.scheme, listener.port, [s.fileno() for s in socks]))
            fds.extend(s.fileno() for s in socks)
        env = dict(os.environ, EDGEPROXY_LOG_LEVEL=self.args.log_level)
        # Started in the directory this edgeproxy was imported from: `-m` puts the working
        # directory first on sys.path, and a worker started in a checkout would otherwise
        # import its source tree (pure Python) instead of the installed, compiled build.
        proc = subprocess.Popen([sys.executable, "-m", "edgeproxy.worker", str(child.fileno())],
                                pass_fds=fds, env=env, cwd=PACKAGE_ROOT)  # fmt: skip
        child.close()
        worker = WorkerProcess(slot, proc, replacement)
        channel = worker.channel = Channel(lambda m: self._from_worker(worker, m),
                                           lambda: self._lost(worker))  # fmt: skip
        await self.loop.create_unix_connection(lambda: channel, sock=parent)
        self.workers[slot] = worker  # from here on, broadcasts reach it; before, full() below
        worker.send(("init", slot, self.settings, described))
        worker.send(("ticket_keys", self.ticket_keys))
        if self.pipeline.last is not None:
            worker.send(self.sender.full())
            self._send_certificates(worker)
            worker.send(("health", self._health_state()))
        if self.serving:
            worker.send(("serve",))

    def _from_worker(self, worker: WorkerProcess, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "outcome":
            self._outcome(message[1], message[2])
        elif kind == "live":
            worker.generation = message[1]
            live = [w.generation for w in self.workers if w is not None and not w.gone]
            self.metrics.live_everywhere(min(live))
        elif kind == "stats":
            future = worker.waiting.pop(message[1], None)
            worker.counters = message[2]
            if future is not None and not future.done():
                future.set_result(message[2])
        elif kind == "serving":
            worker.serving = True
            from edgeproxy.proxy import compiled

            if message[1] != compiled():
                log.warning("worker %d runs the %s hot path, unlike the supervisor", worker.slot,
                            "compiled" if message[1] else "pure-Python")  # fmt: skip
            if worker.replacement:
                log.info("worker %d (pid %d) replaced and serving", worker.slot, worker.proc.pid)
            elif all(w is not None and w.serving for w in self.workers):
                log.info("every worker serves the first complete table: ready")

    def _lost(self, worker: WorkerProcess) -> None:
        worker.gone = True
        worker.serving = False
        for future in worker.waiting.values():
            if not future.done():
                future.set_result({})
        self.retired.retire(worker.counters)
        self.loop.create_task(self._reap(worker))

    async def _reap(self, worker: WorkerProcess) -> None:
        for _ in range(200):  # the channel closes as the process exits; reaping follows
            code = worker.proc.poll()
            if code is not None:
                break
            await asyncio.sleep(0.01)
        else:
            worker.proc.kill()
            code = worker.proc.wait()
        if self.stopping or self.workers[worker.slot] is not worker:
            return
        # A replacement that dies as fast as it started is a crash loop: wait before the next.
        quick = worker.replacement and time.monotonic() - worker.started < RESPAWN_BACKOFF_S
        log.warning("worker %d (pid %d) exited with status %s; starting a replacement%s",
                    worker.slot, worker.proc.pid, code, " in 1 s" if quick else "")  # fmt: skip
        if quick:
            await asyncio.sleep(RESPAWN_BACKOFF_S)
        if not self.stopping:
            await self.spawn(worker.slot, replacement=True)

    async def worker_stats(self, endpoints: bool = False) -> list[dict[str, Any]]:
        """Every live worker's counters (and per-endpoint figures if asked), fetched now."""
        futures = []
        for worker in self.workers:
            if worker is None or worker.gone:
                continue
            self._token += 1
            future: asyncio.Future[dict[str, Any]] = self.loop.create_future()
            worker.waiting[self._token] = future
            worker.send(("stats", self._token, endpoints))
            futures.append(future)
        if not futures:
            return []
        done, _ = await asyncio.wait(futures, timeout=STATS_TIMEOUT_S)
        return [f.result() for f in done if f.result()]

    def totals(self, stats: list[dict[str, Any]]) -> WorkerTotals:
        """Counters summed over the workers, including those that exited (counters only rise)."""
        totals = self.retired.copy()
        for s in stats:
            totals.add(s)
        return totals

    # -- readiness -------------------------------------------------------------------------------

    def complete(self) -> bool:
        """Every source listed, every referenced Secret fetched, and that state compiled."""
        pipeline = self.pipeline
        if pipeline.last is None or not all(self.sources_listed):
            return False
        if self.kube is not None and self.kube.fetching:
            return False
        return (pipeline.published_generation >= self.listed_generation
                and pipeline.published_generation == self.store.generation)  # fmt: skip

    def ready(self) -> bool:
        if self.draining or not self.serving:
            return False
        live = [w for w in self.workers if w is not None and not w.gone]
        return any(w.serving for w in live) and all(w.serving or w.replacement for w in live)

    # -- sources -------------------------------------------------------------------------------

    def start_sources(self) -> None:
        args = self.args
        if args.manifests:
            from edgeproxy.sources.manifests import ManifestSource

            manifests = ManifestSource([Path(p) for p in args.manifests], self.store,
                                       self.settings.reload_interval)  # fmt: skip
            manifests.load()
            self.manifest_errors = manifests.errors
            self.background.append(self.loop.create_task(manifests.watch()))
        if args.kubeconfig or args.in_cluster:
            from edgeproxy.sources.kube import KubeSource

            kube = self.kube = KubeSource(
                self.store, namespaces=args.watch_namespace, kubeconfig=args.kubeconfig,
                in_cluster=args.in_cluster, default_secret=args.default_certificate,
                more_secrets=[args.tls_ticket_key_secret] if args.tls_ticket_key_secret else [],
            )  # fmt: skip
            # Before the certificates' turn: a Secret being read is not reported missing.
            self.pipeline.on_published.insert(0, lambda r: kube.references_changed(r.secrets())
                                              if r.touches_certificates() else None)  # fmt: skip
            self.sources_listed.append(False)

            def listed() -> None:
                self.listed_generation = self.store.generation
                self.sources_listed[0] = True

            self.background.append(self.loop.create_task(kube.run(on_listed=listed)))
            if args.publish_address or args.publish_service or args.publish_pods:
                self.background.append(self.loop.create_task(self._write_status(kube)))

    async def _write_status(self, kube: Any) -> None:
        from edgeproxy.status import StatusWriter

        while kube.api is None:  # the API client is made by kube.run
            await asyncio.sleep(0.05)
        writer = StatusWriter(self.store, kube.api, publish_address=self.args.publish_address,
                              publish_service=self.args.publish_service,
                              publish_pods=self.args.publish_pods,
                              lease_namespace=self.args.lease_namespace)  # fmt: skip
        self.pipeline.on_published.append(lambda r: writer.published(r.served_ingresses)
                                          if r.delta is None or r.delta.served else None)  # fmt: skip
        if self.pipeline.last is not None:
            writer.published(self.pipeline.last.served_ingresses)
        await writer.run()

    # -- the periodic tick -------------------------------------------------------------------

    async def tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            returned = self.registry.refresh_ejections()
            if returned:
                for state in returned:
                    self._health_dirty.add(state.key)
                self._send_health()
            if not self.serving and self.complete():
                self.serving = True
                log.info("routing table complete (generation %d): workers start serving",
                         self.pipeline.published_generation)  # fmt: skip
                self.broadcast(("serve",))
                first_table_served()
            now = self.loop.time()
            if now - self._last_poll >= STATS_POLL_S:
                self._last_poll = now
                await self.worker_stats()

    # -- the whole life ------------------------------------------------------------------------

    async def run(self) -> int:
        args = self.args
        loop = self.loop
        hold_collection(loop)
        wanted = []
        if args.http:
            wanted.append(("http", *args.http))
        if args.https:
            wanted.append(("https", *args.https))
        handover_path = Path(args.handover_socket) if args.handover_socket else None
        inherited = take_over(handover_path) if handover_path else {}
        if handover_path is None and not migrate_req_enabled():
            log.info("no --handover-socket and net.ipv4.tcp_migrate_req is off: a replacement "
                     "on these ports loses what the old listeners had queued when they close")  # fmt: skip
        try:  # before anything starts: a port in use is one line and exit 2, not a traceback
            self.listeners = open_listeners(wanted, self.slots, inherited)
            admin_runner = await self._start_admin()
        except OSError as exc:
            log.error("cannot listen: %s", exc)
            return 2
        if handover_path is not None:
            self.handover = HandoverServer(handover_path, self.listeners)
            loop.add_reader(self.handover.start(), self.handover.serve_one)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._signalled)
        self.start_sources()
        self.pipeline.rebuild()
        for slot in range(self.slots):
            await self.spawn(slot)
        from edgeproxy.proxy import compiled

        for listener in self.listeners:
            log.info("%s listener on %s:%d, %d workers (hot path: %s)", listener.scheme.upper(),
                     listener.host, listener.port, self.slots,
                     "compiled" if compiled() else "pure Python")  # fmt: skip
        ticker = loop.create_task(self.tick())

        await self.stop_requested.wait()
        self.draining = True
        delay = args.shutdown_delay
        log.info("stopping: not ready; serving on for %.1fs (--shutdown-delay)", delay)
        try:
            await asyncio.wait_for(self.cut_short.wait(), delay)
            log.info("second signal: the shutdown delay is cut short")
        except TimeoutError:
            pass
        self.stopping = True
        log.info("draining: accepting stops; requests in flight get %.0fs", args.drain_timeout)
        self.broadcast(("stop", args.drain_timeout))
        deadline = loop.time() + args.drain_timeout + 2.0
        while loop.time() < deadline and any(w is not None and not w.gone for w in self.workers):
            await asyncio.sleep(0.05)
        for worker in self.workers:
            if worker is not None and worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait()
        ticker.cancel()
        for task in self.background:
            task.cancel()
        if self.handover is not None:
            loop.remove_reader(self.handover.sock)  # type: ignore[arg-type]
            self.handover.close()
        for listener in self.listeners:
            for sock in listener.sockets:
                sock.close()
        if admin_runner is not None:
            await admin_runner.cleanup()
        log.info("stopped")
        return 0

    def _signalled(self) -> None:
        if not self.stop_requested.is_set():
            self.stop_requested.set()
        else:
            self.cut_short.set()

    async def _start_admin(self) -> Any:
        if not self.args.admin:
            return None
        from aiohttp import web

        from edgeproxy.admin import AdminApp

        runner = web.AppRunner(AdminApp(self).app, access_log=None)
        await runner.setup()
        # SO_REUSEPORT: a successor taking over the data ports (listeners.py) binds the same
        # admin port while this one drains; probes reach either until this one exits.
        await web.TCPSite(runner, self.args.admin[0], self.args.admin[1], reuse_port=True).start()
        log.info("admin listener on %s:%d", *self.args.admin)
        return runner


def run(args: argparse.Namespace, settings: Settings) -> int:
    import uvloop

    async def main() -> int:
        return await Supervisor(args, settings, asyncio.get_running_loop()).run()

    return uvloop.run(main())

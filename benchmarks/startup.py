#!/usr/bin/env python3
"""Scale of the first table: time to ready and memory, from manifests or from the API server.

Writes --ingresses Ingresses (one host each), --services Services and --endpoints endpoints as
one YAML file, starts the installed edgeproxy on it (--python; from outside the checkout, so
the installed build runs) and measures the time from start to /readyz 200, and the resident
memory (RSS) of the supervisor and of each worker once ready, against the same with an empty
manifest. Prints per-Ingress memory above the empty process. With --source api the same
objects are served by tests/apiserver.py's emulator (paginated LISTs, then watches; in a
thread of this process) and edgeproxy reads them through --kubeconfig.

    python benchmarks/startup.py [--ingresses 50000] [--services 10000] [--endpoints 20000]
                                 [--workers 1] [--python PY] [--source manifests|api]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from http_vs_nginx import build_of, free_port, tree, wait_ready  # noqa: E402

from tests.apiserver import FakeApiServer  # noqa: E402


class ApiInThread:
    """The API server emulator on a loop of its own, in a thread."""

    def __init__(self, objs: list[dict]) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.api = FakeApiServer(bookmark_interval=5.0)
        self._run(self.api.start())
        self._run(self.api.apply(*objs))

    def _run(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(600)

    def stop(self) -> None:
        self._run(self.api.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)


def objects(ingresses: int, services: int, endpoints: int) -> list[dict]:
    objs: list[dict] = [{"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
                         "metadata": {"name": "ep", "annotations": {
                             "ingressclass.kubernetes.io/is-default-class": "true"}},
                         "spec": {"controller": "edgeproxy.io/ingress-controller"}}]  # fmt: skip
    per_service = max(1, endpoints // max(1, services))
    for i in range(services):
        objs.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"s{i}", "namespace": "default"},
                     "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})  # fmt: skip
        objs.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                     "metadata": {"name": f"s{i}-1", "namespace": "default",
                                  "labels": {"kubernetes.io/service-name": f"s{i}"}},
                     "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
                     "endpoints": [{"addresses": [f"10.{(i * per_service + j) // 65536 % 256}."
                                                  f"{(i * per_service + j) // 256 % 256}.{(i * per_service + j) % 256}"],
                                    "conditions": {"ready": True}} for j in range(per_service)]})  # fmt: skip
    for i in range(ingresses):
        objs.append({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                     "metadata": {"name": f"i{i}", "namespace": "default"},
                     "spec": {"rules": [{"host": f"h{i}.example.com", "http": {"paths": [
                         {"path": "/", "pathType": "Prefix", "backend": {
                             "service": {"name": f"s{i % max(1, services)}", "port": {"number": 80}}}}]}}]}})  # fmt: skip
    return objs


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def run(python: str, source: list[str], workers: int) -> tuple[float, int, list[int]]:
    admin = free_port()
    started = time.monotonic()
    proc = subprocess.Popen([python, "-m", "edgeproxy.cli", "run", *source,
                             "--http", f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{admin}",
                             "--workers", str(workers), "--log-level", "warning", "--shutdown-delay", "0"],
                            cwd=tempfile.gettempdir())  # fmt: skip
    try:
        wait_ready(admin, 600)
        ready = time.monotonic() - started
        time.sleep(1.0)  # let the first stats poll and collections settle
        pids = tree(proc.pid)
        return ready, rss_kib(proc.pid), [rss_kib(p) for p in pids[1:]]
    finally:
        proc.terminate()
        proc.wait(30)


def from_api(args: argparse.Namespace, tmp: Path, objs: list[dict]) -> tuple[float, int, list[int]]:
    api = ApiInThread(objs)
    try:
        kubeconfig = tmp / "kubeconfig"
        kubeconfig.write_text(api.api.kubeconfig())
        return run(args.python, ["--kubeconfig", str(kubeconfig)], args.workers)
    finally:
        api.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ingresses", type=int, default=50_000)
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--source", choices=("manifests", "api"), default="manifests")
    args = parser.parse_args()
    print(f"edgeproxy build measured: {build_of(args.python)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.source == "api":
            ready0, sup0, workers0 = from_api(args, Path(tmp), objects(0, 0, 0))
            ready, sup, workers = from_api(args, Path(tmp), objects(args.ingresses, args.services,
                                                                    args.endpoints))  # fmt: skip
        else:
            empty = Path(tmp) / "empty.yaml"
            empty.write_text(yaml.safe_dump_all(objects(0, 0, 0)))
            full = Path(tmp) / "objects.yaml"
            t0 = time.monotonic()
            full.write_text(yaml.dump_all(objects(args.ingresses, args.services, args.endpoints),
                                          Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper)))  # fmt: skip
            print(f"{args.ingresses} Ingresses, {args.services} Services, {args.endpoints} endpoints: "
                  f"{full.stat().st_size / 1e6:.0f} MB of YAML (written in {time.monotonic() - t0:.1f} s)")  # fmt: skip
            ready0, sup0, workers0 = run(args.python, ["--manifests", str(empty)], args.workers)
            ready, sup, workers = run(args.python, ["--manifests", str(full)], args.workers)
    print(f"empty: ready in {ready0:.2f} s; supervisor {sup0 / 1024:.0f} MiB, "
          f"workers {[round(w / 1024) for w in workers0]} MiB")  # fmt: skip
    print(f"full:  ready in {ready:.2f} s; supervisor {sup / 1024:.0f} MiB, "
          f"workers {[round(w / 1024) for w in workers]} MiB")  # fmt: skip
    n = max(1, args.ingresses)
    print(f"per Ingress above the empty process: supervisor {(sup - sup0) / n:.2f} KiB, "
          f"each worker {(sum(workers) - sum(workers0)) / max(1, len(workers)) / n:.2f} KiB, "
          f"pod {(sup - sup0 + sum(workers) - sum(workers0)) / n:.2f} KiB")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

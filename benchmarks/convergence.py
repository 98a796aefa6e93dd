#!/usr/bin/env python3
"""Watch convergence and the CPU cost of churn, against the API server emulator of tests/.

1. Convergence: an EndpointSlice flips a Service between two pods, --changes times. For each
   change: from the moment the emulator wrote the watch event to the stream, to the first
   request (by the time it left the client) answered by the new pod, in every worker
   (keep-alive clients poll every --poll-interval). p50, p99.
   Run with --ingresses N to have N other Ingresses (5 endpoints each) in the table meanwhile.
   With --workers N, convergence is "served by every worker": pollers are spread over the
   workers (told apart by their X-Request-ID prefix) and a change counts as converged when
   each worker has answered from the new pod.
2. Churn: with --ingresses Ingresses and 5 endpoints per Service, --churn-rate EndpointSlice
   updates per second for --churn-seconds; CPU time per second and per event, for the
   supervisor (the control plane) and the workers (the data plane) apart.
3. Stall (--stall): a steady client (--stall-rate requests per second, one at a time) measures
   its latency idle, then while Ingresses and EndpointSlices churn at --churn-rate events per
   second (half each); p50/p99/max of both, and the difference of the p99s. The client and its
   backend run in a process of their own, so that what this process does for the churn (the
   API server emulator encoding events) is not counted as edgeproxy's latency.

    python benchmarks/convergence.py [--changes 200] [--ingresses 1000] [--churn-rate 50]
                                     [--workers 2] [--stall]

Loopback only; the filler endpoints (10.x addresses) only sit in the table and never get traffic.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import k8s  # noqa: E402
from tests.apiserver import FakeApiServer  # noqa: E402
from tests.backends import Pods  # noqa: E402
from tests.conftest import EdgeProxy, simple_site  # noqa: E402
from tests.http1 import Client, fetch  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


ENDPOINTS = 5  # per filler Service (--endpoints)


def request_id(echo: dict) -> str:
    """The worker that forwarded a request: its X-Request-ID prefix (per process)."""
    return next(v for k, v in echo["headers"] if k.lower() == "x-request-id")[:16]


def filler(n: int) -> list[dict]:
    objs = []
    for i in range(n):
        objs.append(k8s.ingress(f"other-{i}", [(f"h{i}.example.org", [k8s.path("/", f"svc-{i}")])]))
        objs.append(k8s.service(f"svc-{i}"))
        objs.append(k8s.endpoint_slice(f"svc-{i}", k8s.ready(*[f"10.{i // 250}.{i % 250}.{j}" for j in range(1, ENDPOINTS + 1)]), 8080))  # fmt: skip
    return objs


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--ingresses", type=int, default=1000)
    parser.add_argument("--churn-rate", type=float, default=50.0)
    parser.add_argument("--churn-seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4, help="pollers per worker")
    parser.add_argument("--poll-interval", type=float, default=0.002,
                        help="each poller's pause between requests: the pollers measure, they "
                             "must not saturate the two cores they share with what they measure")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--endpoints", type=int, default=5, help="per filler Service")
    parser.add_argument("--stall", action="store_true")
    parser.add_argument("--stall-rate", type=float, default=200.0)
    parser.add_argument("--stall-seconds", type=float, default=10.0)
    parser.add_argument("--steady-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steady_child:
        await steady_child()
        return 0
    global ENDPOINTS
    ENDPOINTS = args.endpoints
    loop = asyncio.get_running_loop()

    api = FakeApiServer(bookmark_interval=5.0)
    await api.start()
    pods = Pods()
    port = await pods.start("127.0.0.2", "127.0.0.3")
    await api.apply(*simple_site(port, "127.0.0.2"), *filler(args.ingresses))
    with tempfile.TemporaryDirectory() as tmp:
        kubeconfig = Path(tmp) / "kubeconfig"
        kubeconfig.write_text(api.kubeconfig())
        proxy = EdgeProxy(None, Path(tmp) / "edgeproxy.log")
        await proxy.start("--kubeconfig", str(kubeconfig), "--log-level", "warning",
                          "--workers", str(args.workers),
                          # The pollers and the steady client each keep one connection for
                          # thousands of requests: no per-connection request cap.
                          "--max-requests-per-connection", "0")  # fmt: skip
        from edgeproxy.proxy import compiled

        print(f"edgeproxy from {ROOT} (hot path: {'compiled' if compiled() else 'pure Python'}), "
              f"{args.workers} worker(s)")  # fmt: skip
        answers: list[tuple[float, str, str]] = []  # (time, pod, worker)
        stop = asyncio.Event()

        async def poll(client: Client) -> None:
            while not stop.is_set():
                # The time the request left: it reached the new pod, so the worker that got it
                # (a loopback hop later) had the change live. The response's own trip back through
                # this busy process is not the data plane's latency.
                sent_at = time.perf_counter()
                resp = await client.request("GET", "/", host="site.example.com")
                echo = json.loads(resp.body)
                answers.append((sent_at, echo["pod"], request_id(echo)))
                await asyncio.sleep(args.poll_interval)
            await client.close()

        # Pollers on every worker: connect until each worker has --clients of them.
        per_worker: dict[str, list[Client]] = {}
        for _ in range(200 * args.workers):
            client = await Client.connect(proxy.http)
            echo = json.loads((await client.request("GET", "/", host="site.example.com")).body)
            group = per_worker.setdefault(request_id(echo), [])
            if len(group) < args.clients:
                group.append(client)
            else:
                await client.close()
            if len(per_worker) == args.workers and all(len(g) == args.clients for g in per_worker.values()):
                break
        workers = set(per_worker)
        pollers = [asyncio.create_task(poll(c)) for g in per_worker.values() for c in g]
        await asyncio.sleep(0.5)
        latencies = []
        target = "127.0.0.2"
        for i in range(args.changes):
            target = "127.0.0.3" if target == "127.0.0.2" else "127.0.0.2"
            rv = await api.apply(k8s.endpoint_slice("web", k8s.ready(target), port))
            deadline = loop.time() + 5
            while rv not in api.event_sent_at and loop.time() < deadline:
                await asyncio.sleep(0.0005)
            sent = api.event_sent_at[rv]

            def converged(target: str = target, sent: float = sent) -> bool:
                return {w for t, pod, w in answers if pod == target and t > sent} >= workers

            while not converged() and loop.time() < deadline:
                await asyncio.sleep(0.0005)
            if not converged():
                print(f"change {i}: not converged in every worker in 5 s")
                continue
            # Per worker, its first answer from the new pod after the event; the slowest counts.
            first = max(min(t for t, pod, w in answers if pod == target and t > sent and w == worker)
                        for worker in workers)  # fmt: skip
            latencies.append((first - sent) * 1000)
            answers.clear()
            await asyncio.sleep(random.uniform(0.01, 0.03))
        latencies.sort()
        p99 = latencies[max(0, int(len(latencies) * 0.99) - 1)]
        print(f"convergence (every worker) over {len(latencies)} changes with {args.ingresses} other Ingresses: "
              f"p50 {statistics.median(latencies):.1f} ms, p99 {p99:.1f} ms, max {latencies[-1]:.1f} ms")  # fmt: skip

        # Churn: EndpointSlice updates of the filler Services at a fixed rate.
        assert proxy.proc is not None
        worker_pids = [w["pid"] for w in json.loads((await fetch(proxy.admin, "GET", "/debug/routes")).body)["workers"]]  # fmt: skip
        pid = proxy.proc.pid
        before = cpu_seconds(pid), sum(cpu_seconds(w) for w in worker_pids)
        started = loop.time()
        events = 0
        while loop.time() - started < args.churn_seconds:
            i = random.randrange(args.ingresses)
            ready = [f"10.{i // 250}.{i % 250}.{j}" for j in random.sample(range(1, ENDPOINTS + 2), ENDPOINTS)]
            await api.apply(k8s.endpoint_slice(f"svc-{i}", k8s.ready(*ready), 8080))
            events += 1
            await asyncio.sleep(1 / args.churn_rate)
        await asyncio.sleep(1.0)  # let the last rebuilds finish
        elapsed = loop.time() - started
        used = cpu_seconds(pid) - before[0], sum(cpu_seconds(w) for w in worker_pids) - before[1]
        metrics = (await fetch(proxy.admin, "GET", "/metrics")).body.decode()
        rebuilds = next(line.split()[1] for line in metrics.splitlines()
                        if line.startswith("edgeproxy_table_compile_duration_seconds_count"))  # fmt: skip
        print(f"churn: {events} EndpointSlice events in {elapsed:.1f} s with {args.ingresses} Ingresses "
              f"and {args.ingresses * ENDPOINTS} endpoints: supervisor CPU {used[0] / elapsed * 100:.0f}% of a core "
              f"({used[0] / events * 1000:.2f} ms per event), workers {used[1] / elapsed * 100:.0f}% "
              f"({used[1] / events * 1000:.2f} ms per event, pollers' traffic included); "
              f"{rebuilds} table compiles in all")  # fmt: skip
        stop.set()
        await asyncio.gather(*pollers)
        if args.stall:
            await stall(args, api, proxy, port)
        await proxy.stop()
    await pods.close()
    await api.stop()
    return 0


async def steady(port: int, rate: float, seconds: float) -> list[float]:
    """One client, one request at a time, paced at `rate`: its latencies in ms."""
    loop = asyncio.get_running_loop()
    client = await Client.connect(port)
    latencies = []
    started = loop.time()
    n = 0
    while loop.time() - started < seconds:
        t0 = time.perf_counter()
        resp = await client.request("GET", "/", host="steady.example.com")
        assert resp.status == 200, resp.status
        latencies.append((time.perf_counter() - t0) * 1000)
        n += 1
        pause = started + n / rate - loop.time()
        if pause > 0:
            await asyncio.sleep(pause)
    await client.close()
    return sorted(latencies)


def summary(latencies: list[float]) -> str:
    p99 = latencies[max(0, int(len(latencies) * 0.99) - 1)]
    return f"p50 {statistics.median(latencies):.2f} ms, p99 {p99:.2f} ms, max {latencies[-1]:.2f} ms"


async def steady_child() -> None:
    """--steady-child: a backend on 127.0.0.4 (its port on stdout), then one steady run per
    line on stdin ({"port", "rate", "seconds"}), its latencies on stdout."""
    pods = Pods()
    print(json.dumps({"port": await pods.start("127.0.0.4")}), flush=True)
    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)  # the backend serves meanwhile
    while line := await reader.readline():
        run = json.loads(line)
        print(json.dumps(await steady(run["port"], run["rate"], run["seconds"])), flush=True)
    await pods.close()


async def stall(args: argparse.Namespace, api: FakeApiServer, proxy: EdgeProxy, port: int) -> None:
    """The data plane's latency while the control plane churns (Ingresses and EndpointSlices)."""
    assert proxy.proc is not None
    routes = json.loads((await fetch(proxy.admin, "GET", "/debug/routes")).body)
    pids = [proxy.proc.pid] + [w["pid"] for w in routes["workers"]]
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--steady-child", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE)  # fmt: skip
    assert child.stdin is not None and child.stdout is not None
    backend = json.loads(await child.stdout.readline())["port"]
    await api.apply(k8s.ingress("steady", [("steady.example.com", [k8s.path("/", "steady")])]),
                    k8s.service("steady"), k8s.endpoint_slice("steady", k8s.ready("127.0.0.4"), backend))  # fmt: skip
    for _ in range(500):  # until it is routed (bounded: 5 s)
        if (await fetch(proxy.http, "GET", "/", host="steady.example.com")).status == 200:
            break
        await asyncio.sleep(0.01)

    async def run_steady() -> list[float]:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(json.dumps({"port": proxy.http, "rate": args.stall_rate,
                                      "seconds": args.stall_seconds}).encode() + b"\n")  # fmt: skip
        await child.stdin.drain()
        return json.loads(await child.stdout.readline())

    def cpu() -> list[float]:
        return [cpu_seconds(p) for p in pids]

    before = cpu()
    idle = await run_steady()
    idle_cpu = [b - a for a, b in zip(before, cpu(), strict=True)]
    done = asyncio.Event()

    async def churn() -> int:
        events = 0
        while not done.is_set():
            i = random.randrange(args.ingresses)
            if events % 2:
                ready = [f"10.{i // 250}.{i % 250}.{j}" for j in random.sample(range(1, ENDPOINTS + 2), ENDPOINTS)]
                await api.apply(k8s.endpoint_slice(f"svc-{i}", k8s.ready(*ready), 8080))
            else:  # an Ingress changes: a new path on its host
                await api.apply(k8s.ingress(f"other-{i}", [(f"h{i}.example.org", [
                    k8s.path("/", f"svc-{i}"), k8s.path(f"/v{events}", f"svc-{i}")])]))  # fmt: skip
            events += 1
            await asyncio.sleep(1 / args.churn_rate)
        return events

    before = cpu()
    churner = asyncio.create_task(churn())
    busy = await run_steady()
    done.set()
    events = await churner
    child.stdin.close()
    await child.wait()
    busy_cpu = [b - a for a, b in zip(before, cpu(), strict=True)]
    p99 = lambda xs: xs[max(0, int(len(xs) * 0.99) - 1)]  # noqa: E731
    print(f"steady client, idle: {summary(idle)}")
    print(f"steady client, {events} Ingress+EndpointSlice events at {args.churn_rate:.0f}/s: "
          f"{summary(busy)}; p99 +{p99(busy) - p99(idle):.2f} ms")  # fmt: skip
    extra = busy_cpu[0] - idle_cpu[0], sum(busy_cpu[1:]) - sum(idle_cpu[1:])
    print(f"CPU for the churn (busy minus idle): supervisor {extra[0] * 1000 / events:.2f} ms per event "
          f"({extra[0] / args.stall_seconds * 100:.0f}% of a core), workers "
          f"{extra[1] * 1000 / events:.2f} ms per event")  # fmt: skip


if __name__ == "__main__":
    import uvloop

    sys.exit(uvloop.run(main()))

#!/usr/bin/env python3
"""Watch convergence and the CPU cost of churn, against the API server emulator of tests/.

1. Convergence: an EndpointSlice flips a Service between two pods, --changes times. For each
   change: from the moment the emulator wrote the watch event to the stream, to the first
   response answered by the new pod (keep-alive clients poll without pause). p50 and p99.
   Run with --ingresses N to have N other Ingresses (5 endpoints each) in the table meanwhile.
2. Churn: with --ingresses Ingresses and 5 endpoints per Service, --churn-rate EndpointSlice
   updates per second for --churn-seconds; edgeproxy's CPU time per second and per event.

    python benchmarks/convergence.py [--changes 200] [--ingresses 1000] [--churn-rate 50]

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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import k8s  # noqa: E402
from tests.apiserver import FakeApiServer  # noqa: E402
from tests.backends import Pods  # noqa: E402
from tests.conftest import EdgeProxy, simple_site  # noqa: E402
from tests.http1 import Client, fetch  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def filler(n: int) -> list[dict]:
    objs = []
    for i in range(n):
        objs.append(k8s.ingress(f"other-{i}", [(f"h{i}.example.org", [k8s.path("/", f"svc-{i}")])]))
        objs.append(k8s.service(f"svc-{i}"))
        objs.append(k8s.endpoint_slice(f"svc-{i}", k8s.ready(*[f"10.{i // 250}.{i % 250}.{j}" for j in range(1, 6)]), 8080))  # fmt: skip
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
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
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
        await proxy.start("--kubeconfig", str(kubeconfig), "--log-level", "warning")
        answers: list[tuple[float, str]] = []
        stop = asyncio.Event()

        async def poll() -> None:
            client = await Client.connect(proxy.http)
            while not stop.is_set():
                resp = await client.request("GET", "/", host="site.example.com")
                answers.append((loop.time(), json.loads(resp.body)["pod"]))
            await client.close()

        pollers = [asyncio.create_task(poll()) for _ in range(args.clients)]
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
            seen = None
            while seen is None and loop.time() < deadline:
                seen = next((t for t, pod in reversed(answers) if pod == target and t > sent), None)  # fmt: skip
                if seen is None:
                    await asyncio.sleep(0.0005)
            if seen is None:
                print(f"change {i}: not converged in 5 s")
                continue
            # The first answer from the new pod after the event: scan forward for accuracy.
            first = min(t for t, pod in answers if pod == target and t > sent)
            latencies.append((first - sent) * 1000)
            answers.clear()
            await asyncio.sleep(random.uniform(0.01, 0.03))
        stop.set()
        await asyncio.gather(*pollers)
        latencies.sort()
        p99 = latencies[max(0, int(len(latencies) * 0.99) - 1)]
        print(f"convergence over {len(latencies)} changes with {args.ingresses} other Ingresses: "
              f"p50 {statistics.median(latencies):.1f} ms, p99 {p99:.1f} ms, max {latencies[-1]:.1f} ms")  # fmt: skip

        # Churn: EndpointSlice updates of the filler Services at a fixed rate.
        assert proxy.proc is not None
        pid = proxy.proc.pid
        before = cpu_seconds(pid)
        started = loop.time()
        events = 0
        while loop.time() - started < args.churn_seconds:
            i = random.randrange(args.ingresses)
            ready = [f"10.{i // 250}.{i % 250}.{j}" for j in random.sample(range(1, 7), 5)]
            await api.apply(k8s.endpoint_slice(f"svc-{i}", k8s.ready(*ready), 8080))
            events += 1
            await asyncio.sleep(1 / args.churn_rate)
        await asyncio.sleep(1.0)  # let the last rebuilds finish
        elapsed = loop.time() - started
        used = cpu_seconds(pid) - before
        metrics = (await fetch(proxy.admin, "GET", "/metrics")).body.decode()
        rebuilds = next(line.split()[1] for line in metrics.splitlines()
                        if line.startswith("edgeproxy_route_rebuilds_total"))  # fmt: skip
        print(f"churn: {events} EndpointSlice events in {elapsed:.1f} s with {args.ingresses} Ingresses "
              f"and {args.ingresses * 5} endpoints: edgeproxy CPU {used / elapsed * 100:.0f}% of a core, "
              f"{used / events * 1000:.1f} ms per event, {rebuilds} rebuilds in all")  # fmt: skip
        await proxy.stop()
    await pods.close()
    await api.stop()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

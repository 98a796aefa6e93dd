#!/usr/bin/env python3
"""Microseconds per pick for each built-in balancer, with 10 and 1,000 endpoints.

Two cases: the fast path (nothing ejected: the balancer alone) and the health-aware path
(`choose` with one endpoint ejected, as after an outlier ejection). Median of 5 runs.

    python benchmarks/balancers.py [--picks 200000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeproxy.balancing import BUILTIN  # noqa: E402
from edgeproxy.hosts import EndpointState  # noqa: E402
from edgeproxy.proxy.binding import ClusterBinding  # noqa: E402
from edgeproxy.routing import Cluster  # noqa: E402


class Request:
    client_ip = "192.0.2.10"
    path = "/api/items"

    def header(self, name: bytes) -> bytes | None:
        return None


def per_pick_us(fn, picks: int) -> float:  # type: ignore[no-untyped-def]
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(picks):
            fn()
        runs.append((time.perf_counter() - started) / picks * 1e6)
    return statistics.median(runs)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--picks", type=int, default=200_000)
    args = parser.parse_args()
    request = Request()
    print(f"{'balancer':12s} {'endpoints':>9s} {'pick us':>8s} {'choose us (1 ejected)':>22s}")
    for name, factory in BUILTIN.items():
        for n in (10, 1000):
            hosts = [EndpointState((f"10.0.{i // 250}.{i % 250}", 8080)) for i in range(n)]
            balancer = factory(hosts, {})
            cluster = Cluster("bench", tuple(h.key for h in hosts), balancer_name=name)
            binding = ClusterBinding(cluster, cluster.keys, tuple(hosts), BUILTIN, None)
            fast = per_pick_us(lambda b=balancer: b.pick(request), args.picks)
            hosts[3].ejected_until = 1e12
            slow = per_pick_us(lambda c=binding: c.pick(request, 0.0, 1, 7, 50.0, None), args.picks // 10)  # fmt: skip
            hosts[3].ejected_until = 0.0
            print(f"{name:12s} {n:9d} {fast:8.2f} {slow:22.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

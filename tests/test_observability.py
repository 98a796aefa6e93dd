"""What an operator reads: /metrics (parsed by prometheus-client's own parser), the access log
and the convergence histogram, checked against the requests really sent. Real processes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests import k8s
from tests.apiserver import FakeApiServer
from tests.backends import Pods
from tests.conftest import eventually, simple_site
from tests.http1 import Client, fetch


def site_with_api(web_port: int, api_port: int) -> list[dict[str, Any]]:
    """site.example.com: / -> web (127.0.0.2), /api -> api (127.0.0.3)."""
    return [
        k8s.ingress_class(),
        k8s.ingress("site", [("site.example.com", [k8s.path("/", "web"), k8s.path("/api", "api")])]),
        k8s.service("web"),
        k8s.endpoint_slice("web", k8s.ready("127.0.0.2"), web_port),
        k8s.service("api"),
        k8s.endpoint_slice("api", k8s.ready("127.0.0.3"), api_port),
    ]


async def scrape(admin: int) -> dict[str, list[Any]]:
    """Every sample of /metrics by metric family name."""
    text = (await fetch(admin, "GET", "/metrics")).body.decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(families: dict[str, list[Any]], sample: str, **labels: str) -> float:
    family = sample.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    family = family.removesuffix("_bucket")
    found = [s.value for s in families.get(family, []) if s.name == sample
             and all(s.labels.get(k) == v for k, v in labels.items())]  # fmt: skip
    return sum(found)


async def test_metrics_count_each_request_by_route_and_status_class_across_two_workers(
    pods: Pods, proxy_factory: Any
) -> None:
    port = await pods.start("127.0.0.2", "127.0.0.3")
    pods.fail_with["127.0.0.3"] = 500
    proxy = await proxy_factory(site_with_api(port, port), "--workers", "2",
                                "--outlier-consecutive-failures", "1000")  # fmt: skip
    workers = set()
    sent = {"web": 0, "api": 0, "none": 0}
    body_bytes = 0
    for i in range(60):  # new connections: the kernel spreads them over both workers
        if i % 3 == 0:
            resp = await fetch(proxy.http, "GET", "/", host="site.example.com")
            assert resp.status == 200
            body_bytes += len(resp.body)
            workers.add((pods.requests[-1][1].header("x-request-id") or "")[:16])
            sent["web"] += 1
        elif i % 3 == 1:
            resp = await fetch(proxy.http, "POST", "/api/items", host="site.example.com", body=b"x" * 10)
            assert resp.status == 500
            sent["api"] += 1
        else:
            assert (await fetch(proxy.http, "GET", "/", host="unknown.example.com")).status == 404
            sent["none"] += 1
    assert len(workers) == 2, "the kernel never spread the connections over both workers"
    m = await scrape(proxy.admin)
    web = {"namespace": "default", "ingress": "site", "service": "web"}
    api = {"namespace": "default", "ingress": "site", "service": "api"}
    assert value(m, "edgeproxy_requests_total", **web, method="GET", status_class="2xx") == sent["web"]
    assert value(m, "edgeproxy_requests_total", **api, method="POST", status_class="5xx") == sent["api"]
    assert value(m, "edgeproxy_requests_total", ingress="", status_class="4xx") == sent["none"]
    assert value(m, "edgeproxy_requests_total") == 60
    assert value(m, "edgeproxy_request_duration_seconds_count", **web, status_class="2xx") == sent["web"]
    assert value(m, "edgeproxy_request_duration_seconds_bucket", **web, status_class="2xx",
                 le="+Inf") == sent["web"]  # fmt: skip
    assert value(m, "edgeproxy_upstream_response_duration_seconds_count", **api) == sent["api"]
    # Only requests that reached an upstream have an upstream time.
    assert value(m, "edgeproxy_upstream_response_duration_seconds_count", ingress="") == 0
    assert value(m, "edgeproxy_response_bytes_total", **web) > body_bytes  # bodies plus heads
    assert value(m, "edgeproxy_request_bytes_total", **api) >= sent["api"] * 10
    assert value(m, "edgeproxy_upstream_connects_total", namespace="default", service="web") >= 1
    assert value(m, "edgeproxy_upstream_connect_errors_total", service="web") == 0
    assert value(m, "edgeproxy_endpoints_in_rotation", namespace="default", service="api") == 1
    assert value(m, "edgeproxy_workers") == 2
    assert value(m, "edgeproxy_table_compile_duration_seconds_count") >= 1
    assert value(m, "edgeproxy_table_last_success_timestamp_seconds") > 0
    # Labels stay bounded: nothing carries a path, a client address or a pod IP.
    for samples in m.values():
        for s in samples:
            assert not any("127.0.0." in v or v.startswith("/") for v in s.labels.values()), s


async def test_refused_connects_count_as_connect_errors_and_retries(pods: Pods, proxy_factory: Any) -> None:
    port = await pods.start("127.0.0.2")
    objects = [k8s.ingress_class(), k8s.ingress("site", [(None, [k8s.path("/", "web")])]),
               k8s.service("web"), k8s.endpoint_slice("web", k8s.ready("127.0.0.2", "127.0.0.9"), port)]  # fmt: skip
    proxy = await proxy_factory(objects, "--workers", "1", "--outlier-consecutive-failures", "1000")
    for _ in range(6):  # some try 127.0.0.9 first (nothing listens there) and go on to .2
        assert (await fetch(proxy.http, "GET", "/")).status == 200
    m = await scrape(proxy.admin)
    errors = value(m, "edgeproxy_upstream_connect_errors_total", namespace="default", service="web")
    assert 1 <= errors <= 6
    assert value(m, "edgeproxy_retries_total", namespace="default", service="web") == errors
    assert value(m, "edgeproxy_upstream_connects_total", service="web") == errors + 1  # one pooled


async def test_the_access_log_has_one_line_per_request_with_what_happened(
    pods: Pods, proxy_factory: Any, tmp_path: Path
) -> None:
    port = await pods.start("127.0.0.2")
    log = tmp_path / "access.log"
    proxy = await proxy_factory(site_with_api(port, port), "--workers", "1",
                                "--access-log", str(log))  # fmt: skip
    client = await Client.connect(proxy.http)
    first = await client.request("GET", "/shop?q=1", host="site.example.com",
                                 headers=[("User-Agent", 'probe/1.0 "x" \\ \xe9'), ("X-Request-ID", "req-42")])  # fmt: skip
    second = await client.request("POST", "/", host="site.example.com", body=b"hello")
    await client.close()
    assert (await fetch(proxy.http, "GET", "/", host="nowhere.example.com")).status == 404
    added_id = pods.requests[-1][1].header("x-request-id")

    async def three_lines() -> bool:
        return log.exists() and len(log.read_text().splitlines()) >= 3

    await eventually(three_lines, timeout=5, what="three access log lines")
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 3
    one, two, three = lines
    assert one["method"] == "GET" and one["path"] == "/shop?q=1" and one["status"] == 200
    assert one["host"] == "site.example.com" and one["protocol"] == "HTTP/1.1"
    assert one["client"] == "127.0.0.1" and one["user_agent"] == 'probe/1.0 "x" \\ \xe9'  # escaped, obs-text as latin-1
    assert one["request_id"] == "req-42" and one["retries"] == 0
    assert one["ingress"] == "default/site" and one["service"] == "default/web:80"
    assert one["upstream"] == f"127.0.0.2:{port}"
    assert one["bytes_sent"] == len(first.raw_head) + 2 + len(first.body)  # head, CRLF, body
    assert one["bytes_received"] > 0 and one["duration"] > 0
    assert 0 <= one["upstream_connect_time"] <= one["upstream_header_time"] <= one["upstream_response_time"]
    assert one["upstream_response_time"] <= one["duration"]
    assert one["time"].endswith("Z") and one["time"][:2] == "20"
    assert two["method"] == "POST" and two["status"] == second.status == 200
    assert two["upstream_connect_time"] is None  # the pooled connection of the first
    assert two["bytes_received"] >= 5 and two["request_id"] == added_id is not None
    assert three["status"] == 404 and three["upstream"] is None and three["ingress"] is None


async def test_a_reader_that_stops_reading_costs_log_lines_not_requests(
    pods: Pods, proxy_factory: Any
) -> None:
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(site_with_api(port, port), "--workers", "1",
                                "--access-log-buffer", "16k",
                                stdout=subprocess.PIPE)  # nobody reads it: full at 64 KiB  # fmt: skip
    client = await Client.connect(proxy.http)
    # The first line is longer than the formatter's 8 KiB window (each quote escapes to two
    # bytes, the worst case is counted at six): it takes the long way into the buffer.
    agent = '"' * 2000
    assert (await client.request("GET", "/long", host="site.example.com",
                                 headers=[("User-Agent", agent)])).status == 200  # fmt: skip
    for i in range(600):  # ~250 bytes a line: far more than the pipe and the buffer hold
        assert (await client.request("GET", f"/{i}", host="site.example.com")).status == 200
    await client.close()

    async def dropped() -> bool:
        return value(await scrape(proxy.admin), "edgeproxy_access_log_dropped_lines_total") > 0

    await eventually(dropped, timeout=5, what="dropped lines counted")
    m = await scrape(proxy.admin)
    assert value(m, "edgeproxy_requests_total", status_class="2xx") == 601

    # Now read: what was kept comes out whole, in order, and with the dropped ones adds up.
    stdout = proxy.proc.stdout
    os.set_blocking(stdout.fileno(), False)
    data = bytearray()

    async def all_accounted_for() -> bool:
        while chunk := stdout.read(1 << 16):
            data.extend(chunk)
        dropped = value(await scrape(proxy.admin), "edgeproxy_access_log_dropped_lines_total")
        return data.count(b"\n") + dropped == 601

    await eventually(all_accounted_for, timeout=10, what="every line written or counted dropped")
    lines = [json.loads(line) for line in data.splitlines()]
    assert lines[0]["path"] == "/long" and lines[0]["user_agent"] == agent
    paths = [int(line["path"][1:]) for line in lines[1:]]
    assert paths == sorted(paths) and len(paths) < 600  # in order, some dropped


async def test_the_convergence_histogram_counts_each_endpoint_slice_change(
    api: FakeApiServer, pods: Pods, kube_proxy: Any
) -> None:
    port = await pods.start("127.0.0.2", "127.0.0.3")
    await api.apply(*simple_site(port, "127.0.0.2"))
    proxy = await kube_proxy("--workers", "2")

    async def converged() -> float:
        return value(await scrape(proxy.admin), "edgeproxy_convergence_seconds_count")

    async def settled() -> bool:
        # Every store change so far observed (the first table's included: those are counted
        # once both workers run it, which can come after /readyz turned 200).
        generation = json.loads((await fetch(proxy.admin, "GET", "/debug/routes")).body)["generation"]
        return await converged() == generation

    await eventually(settled, timeout=10, what="the first changes in the histogram")
    before = await converged()
    for i, pod in enumerate(["127.0.0.3", "127.0.0.2", "127.0.0.3"], start=1):
        await api.apply(k8s.endpoint_slice("web", k8s.ready(pod), port))

        async def counted(n: int = i) -> bool:
            return await converged() == before + n

        await eventually(counted, timeout=20, what=f"change {i} in the convergence histogram")
    m = await scrape(proxy.admin)
    assert value(m, "edgeproxy_watch_events_total", kind="EndpointSlice") >= 3
    # Every change is live in both workers within the histogram's largest finite bucket.
    assert value(m, "edgeproxy_convergence_seconds_bucket", le="30.0") == before + 3


def test_bucket_of_agrees_with_bisect() -> None:
    import random
    from bisect import bisect_left

    from edgeproxy.proxy.observe import BUCKETS, bucket_of

    values = [0.0, 1e-9, 60.0, 61.0, 1e9, *BUCKETS, *(random.uniform(0, 70) for _ in range(2000))]
    for seconds in values:
        assert bucket_of(seconds) == bisect_left(BUCKETS, seconds), seconds


async def test_the_grafana_dashboard_queries_only_metrics_edgeproxy_exports(
    pods: Pods, proxy_factory: Any
) -> None:
    import re

    from tests.conftest import ROOT

    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(site_with_api(port, port))
    assert (await fetch(proxy.http, "GET", "/", host="site.example.com")).status == 200
    text = (await fetch(proxy.admin, "GET", "/metrics")).body.decode()
    # Families by name, with or without samples yet (a labelled counter before its first
    # increment, the watch figures in manifest mode).
    families = {f.name for f in text_string_to_metric_families(text)}
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "edgeproxy-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 12
    used = {re.sub(r"_(total|bucket|count|sum)$", "", name)
            for e in exprs for name in re.findall(r"\b(edgeproxy_[a-z_]+)", e)}  # fmt: skip
    assert used and used <= families, used - families

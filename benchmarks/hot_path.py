#!/usr/bin/env python3
"""Python cost of one proxied exchange, without sockets: request in, response back, per exchange.

Drives a ClientConnection (http1_server) and a pooled UpstreamConnection (http1_client) with
transports that only count bytes, so the figure is the interpreter's share of the hot path (the kernel's is not in it).

    python benchmarks/hot_path.py [--exchanges 200000] [--profile] [--opcodes] [--browser]
                                  [--ingresses N] [--tls-connections N [--resume]]

--tls-connections: instead, N new TLS connections with one request each (Connection: close),
through tls_server's TLS layer and the codec, the handshake over memory BIOs with a client in
the same process (whose crypto is counted too: compare builds, not absolute figures).

For a figure that does not depend on the machine's noise, count instructions: run it under
`valgrind --tool=callgrind` with --exchanges 2000 and 12000 and divide the difference by 10,000.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeproxy.balancing import load_balancers
from edgeproxy.compile import compile_routes
from edgeproxy.config import Settings
from edgeproxy.objects import ObjectStore
from edgeproxy.proxy import compiled
from edgeproxy.proxy.dataplane import Dataplane
from edgeproxy.proxy.http1_client import UpstreamConnection
from edgeproxy.proxy.http1_server import ClientConnection

REQUEST = b"GET /api/items HTTP/1.1\r\nHost: bench.example.com\r\nUser-Agent: wrk\r\n\r\n"
BROWSER_REQUEST = (
    b"GET /api/items?page=2 HTTP/1.1\r\nHost: bench.example.com\r\nConnection: keep-alive\r\n"
    b"sec-ch-ua: \"Chromium\";v=\"124\"\r\nsec-ch-ua-mobile: ?0\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64)"
    b" AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
    b"Sec-Fetch-Site: same-origin\r\nSec-Fetch-Mode: navigate\r\nSec-Fetch-Dest: document\r\n"
    b"Referer: https://bench.example.com/\r\nAccept-Encoding: gzip, deflate, br\r\n"
    b"Accept-Language: en-US,en;q=0.9\r\nCookie: session=abc123; theme=dark\r\n\r\n"
)
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sun, 22 Nov 2026 14:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 23\r\nConnection: keep-alive\r\n\r\n"
            b"hello from the backend\n")


def tls_connections(dp: Dataplane, upstream: UpstreamConnection, n: int, resume: bool,
                    requests: int = 1) -> None:  # fmt: skip
    """n connections: handshake, `requests` requests (the last with Connection: close), their
    responses, close (as uvloop would drive it)."""
    import ssl

    from edgeproxy.proxy.tls_server import TLSServerTransport
    from edgeproxy.tls import SniCertificates, self_signed_pem

    certs = SniCertificates()
    certs.update({"bench.example.com": b"c"}, {}, b"c", {b"c": self_signed_pem("bench.example.com")})
    server_ctx = certs.server_context()
    client_ctx = ssl.create_default_context()
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    request = b"GET /api/items HTTP/1.1\r\nHost: bench.example.com\r\n\r\n"
    last = b"GET /api/items HTTP/1.1\r\nHost: bench.example.com\r\nConnection: close\r\n\r\n"
    session = None
    for _ in range(n):
        tcp = PipeTransport()
        server = TLSServerTransport(server_ctx, lambda: ClientConnection(dp, b"https", b"443"), dp)
        server.connection_made(tcp)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = client_ctx.wrap_bio(incoming, outgoing, server_hostname="bench.example.com",
                                     session=session if resume else None)  # fmt: skip
        for _ in range(10):
            try:
                client.do_handshake()
                break
            except ssl.SSLWantReadError:
                server.data_received(outgoing.read())
                incoming.write(tcp.take())
        for i in range(requests):
            client.write(last if i == requests - 1 else request)
            server.data_received(outgoing.read())
            upstream.data_received(RESPONSE)
            incoming.write(tcp.take())
            answer = b""
            for _ in range(10):
                try:
                    chunk = client.read(65536)
                except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                    break
                if not chunk:
                    break
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
            if not upstream.idle_list:
                upstream.idle_list.append(upstream)
        assert tcp.closed
        session = client.session
        server.connection_lost(None)


class CountingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = 0
        self.writes = 0

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.written += len(data)
        self.writes += 1

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class PipeTransport(CountingTransport):
    """The TCP side of a TLS connection: keeps what is written, for the client to read."""

    def __init__(self) -> None:
        super().__init__()
        self.out: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.out.append(data)

    def take(self) -> bytes:
        data, self.out = b"".join(self.out), []
        return data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True


def objects() -> list[dict]:
    return [
        {"kind": "IngressClass", "metadata": {"name": "ep"},
         "spec": {"controller": "edgeproxy.io/ingress-controller"}},
        {"kind": "Service", "metadata": {"name": "api", "namespace": "b"},
         "spec": {"ports": [{"name": "http", "port": 80}]}},
        {"kind": "EndpointSlice", "metadata": {"name": "a", "namespace": "b",
                                               "labels": {"kubernetes.io/service-name": "api"}},
         "addressType": "IPv4", "ports": [{"name": "http", "port": 8000}],
         "endpoints": [{"addresses": ["127.0.0.1"]}]},
        {"kind": "Ingress", "metadata": {"name": "i", "namespace": "b"},
         "spec": {"ingressClassName": "ep", "rules": [{"host": "bench.example.com", "http": {
             "paths": [{"path": "/api", "pathType": "Prefix", "backend": {
                 "service": {"name": "api", "port": {"number": 80}}}}]}}]}},
    ]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--exchanges", type=int, default=200_000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--browser", action="store_true", help="a 13-field browser request")
    parser.add_argument("--ingresses", type=int, default=0, help="other Ingresses in the table")
    parser.add_argument("--access-log", metavar="PATH",
                        help="write the access log there (e.g. /dev/null), as a worker does")
    parser.add_argument("--opcodes", action="store_true",
                        help="count bytecodes per exchange, by function (sys.settrace; slow)")
    parser.add_argument("--tls-connections", type=int, default=0, metavar="N",
                        help="N new TLS connections of one request each, instead of exchanges")
    parser.add_argument("--resume", action="store_true", help="with --tls-connections: resumed")
    parser.add_argument("--tls-requests", type=int, default=1, metavar="R",
                        help="with --tls-connections: R keep-alive requests on each")
    args = parser.parse_args()
    loop = asyncio.new_event_loop()
    # One client connection carries every exchange: no cap on its requests.
    dp = Dataplane(Settings(max_requests_per_connection=0), loop)
    dp.balancer_types = load_balancers()
    if args.access_log:
        from edgeproxy.accesslog import AccessLog

        dp.access_log = AccessLog(args.access_log, loop, 1 << 30)
    store = ObjectStore()
    filler = [
        {"kind": "Ingress", "metadata": {"name": f"other-{i}", "namespace": "b"},
         "spec": {"ingressClassName": "ep", "rules": [{"host": f"h{i}.example.org", "http": {
             "paths": [{"path": "/", "pathType": "Prefix", "backend": {
                 "service": {"name": "api", "port": {"number": 80}}}}]}}]}}
        for i in range(args.ingresses)
    ]  # fmt: skip
    store.replace("bench", objects() + filler)
    dp.publish(compile_routes(store.snapshot()).table)
    binding = next(b for b in dp.bindings.values() if b.cluster.name.startswith("b/api"))
    state = binding.hosts[0]
    idle = binding.pools[state]
    upstream = UpstreamConnection(state, idle)
    up_transport = CountingTransport()
    upstream.connection_made(up_transport)
    idle.append(upstream)
    if args.tls_connections:
        started = time.perf_counter()
        tls_connections(dp, upstream, args.tls_connections, args.resume, args.tls_requests)
        elapsed = time.perf_counter() - started
        print(f"build: {'compiled' if compiled() else 'pure Python'}")
        print(f"{elapsed / args.tls_connections * 1e6:.1f} us per TLS connection, client included "
              f"({args.tls_connections}, {'resumed' if args.resume else 'full'} handshakes, "
              f"{args.tls_requests} request(s) each)")  # fmt: skip
        return 0
    client = ClientConnection(dp, b"http", b"80")
    down_transport = CountingTransport()
    client.connection_made(down_transport)

    request = BROWSER_REQUEST if args.browser else REQUEST

    log = getattr(dp, "access_log", None)

    def run(n: int) -> None:
        for i in range(n):
            client.data_received(request)
            upstream.data_received(RESPONSE)
            if log is not None and i % 256 == 0:
                log.flush()  # the worker's 100 ms timer, at about this rate

    run(1000)
    assert down_transport.writes == 1000 and up_transport.writes == 1000, "not one write per side"
    if args.opcodes:
        counts: Counter[tuple[str, str]] = Counter()

        def tracer(frame: Any, event: str, arg: Any) -> Any:
            frame.f_trace_opcodes = True
            if event == "opcode":
                counts[(frame.f_code.co_filename.rsplit("/", 1)[-1], frame.f_code.co_name)] += 1
            return tracer

        sys.settrace(tracer)
        run(200)
        sys.settrace(None)
        print(f"{sum(counts.values()) / 200:.0f} bytecodes per exchange; the heaviest functions:")
        for (file, name), n in counts.most_common(15):
            print(f"  {n / 200:6.0f}  {file}:{name}")
        return 0
    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    started = time.perf_counter()
    run(args.exchanges)
    elapsed = time.perf_counter() - started
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    print(f"build: {'compiled' if compiled() else 'pure Python'}")
    print(f"{elapsed / args.exchanges * 1e6:.2f} us of Python per exchange "
          f"({args.exchanges} exchanges, {down_transport.writes / (args.exchanges + 1000):.2f} "
          f"client writes and {up_transport.writes / (args.exchanges + 1000):.2f} upstream writes each)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

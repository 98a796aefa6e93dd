#!/usr/bin/env python3
"""What an attacker can make edgeproxy spend, against nginx in the same run (issue "Hardening").

Three figures per proxy (edgeproxy with one worker, nginx with one worker; both pinned to
core 0, the clients and wrk on core 1, the backend an nginx on core 1):

- `idle`: memory per idle keep-alive client connection: open --idle connections (default
  10,000), one request each, then hold them; (RSS of the process tree after - before) / N.
- `slowloris`: req/s and p99 of wrk -c64 while --slow connections (default 2,000) each hold
  a header section open, one line every 10 s, against the same run without them.
- `rejected`: CPU per rejected malformed request (two differing Content-Length fields, which
  both refuse with 400 and a close), each on a new connection; proxy CPU / requests.

    python benchmarks/resources.py [--rounds 3] [--idle 10000] [--slow 2000] [--duration 8]

Medians over rounds. Measures the edgeproxy installed for --python (printed), run from a
directory outside the checkout. Loopback only. Writes results/resources.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_vs_nginx import (  # noqa: E402  # fmt: skip
    HOST,
    PATH,
    ROOT,
    build_of,
    ensure_tools,
    free_port,
    manifests,
    proc_cpu_seconds,
    run_wrk,
    start_nginx,
    tree,
    wait_port,
    wait_ready,
)

REJECTED = b"GET /api/items HTTP/1.1\r\nHost: bench.example.com\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"


def rss_kib(pid: int) -> int:
    total = 0
    for p in tree(pid):
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


async def open_idle(port: int, count: int, tls: ssl.SSLContext | None = None) -> list[asyncio.StreamWriter]:  # fmt: skip
    """`count` keep-alive connections (over TLS with `tls`), each after one complete request,
    held open."""
    request = f"GET {PATH} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
    writers: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(200 if tls is None else 100)

    async def one() -> None:
        async with gate:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=tls, server_hostname=HOST if tls is not None else None)  # fmt: skip
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            writers.append(writer)

    await asyncio.gather(*(one() for _ in range(count)))
    return writers


def idle_figure(pid: int, port: int, count: int, tls: ssl.SSLContext | None = None,
                warm: int = 0) -> float:  # fmt: skip
    """KiB of the proxy's RSS per idle connection, after `warm` connections opened and closed."""
    async def run() -> float:
        if warm:
            for writer in await open_idle(port, warm, tls):  # code paths, pools, SNI contexts
                writer.close()
            await asyncio.sleep(1.0)
        before = rss_kib(pid)
        writers = await open_idle(port, count, tls)
        await asyncio.sleep(1.0)  # let the proxy settle (lazy frees, its sweep)
        after = rss_kib(pid)
        for w in writers:
            w.close()
        return (after - before) / count

    return asyncio.run(run())


def slowloris(port: int, count: int, duration: int) -> dict[str, float]:
    """wrk -c64 while `count` connections dribble a never-ending header section."""
    script = f"""
import asyncio
async def main():
    conns = []
    for i in range({count}):
        try:
            r, w = await asyncio.open_connection("127.0.0.1", {port})
        except OSError:
            break
        w.write(b"GET / HTTP/1.1\\r\\nHost: {HOST}\\r\\n")
        conns.append(w)
    print(len(conns), flush=True)
    n = 0
    # One line per connection every 10 s (under both proxies' 60 s header timeout), spread
    # evenly: a hundredth of the connections every 0.1 s, so the client itself stays cheap
    # (it shares core 1 with wrk).
    step = max(1, len(conns) // 100)
    while True:
        for at in range(0, len(conns), step):
            for w in conns[at:at + step]:
                w.write(b"X-%d: a\\r\\n" % n)
            await asyncio.sleep(0.1)
        n += 1
asyncio.run(main())
"""
    loris = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-c", script],
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        held = int(loris.stdout.readline())  # type: ignore[union-attr]
        result = run_wrk(port, duration, 64, 1)
        result["held"] = held
        result["still_open"] = loris.poll() is None
        return result
    finally:
        loris.kill()
        loris.wait()


def rejected_cpu(pid: int, port: int, duration: int) -> dict[str, float]:
    """New connections each sending REJECTED (wrk checks its Lua requests with its own parser
    and refuses this one, so the client is a small asyncio loop on core 1)."""
    script = f"""
import asyncio, time
REQ = {REJECTED!r}
async def one(end, counts):
    while time.monotonic() < end:
        r, w = await asyncio.open_connection("127.0.0.1", {port})
        w.write(REQ)
        data = await r.read()
        counts[0] += 1
        counts[1] += data.startswith(b"HTTP/1.1 400")
        w.close()
async def main():
    counts = [0, 0]
    end = time.monotonic() + {duration}
    await asyncio.gather(*(one(end, counts) for _ in range(16)))
    print(counts[0], counts[1])
asyncio.run(main())
"""
    cpu0 = sum(proc_cpu_seconds(pid))
    out = subprocess.run(["taskset", "-c", "1", sys.executable, "-c", script], capture_output=True,
                         text=True, check=True).stdout.split()  # fmt: skip
    cpu1 = sum(proc_cpu_seconds(pid))
    requests, rejected = int(out[0]), int(out[1])
    return {"requests": requests, "rejected": rejected,
            "cpu_us_per_req": (cpu1 - cpu0) / max(1, requests) * 1e6}  # fmt: skip


FLOOR = """
import asyncio, sys, uvloop
class Idle(asyncio.Protocol):
    __slots__ = ("transport",)
    def connection_made(self, transport):
        self.transport = transport
async def main():
    server = await asyncio.get_running_loop().create_server(Idle, "127.0.0.1", int(sys.argv[1]), backlog=4096)
    await asyncio.Event().wait()
uvloop.run(main())
"""


def floor_figure(count: int) -> float:
    """The same idle measure against a bare uvloop server whose protocol holds only its
    transport: what uvloop itself costs per connection, below which edgeproxy cannot go."""
    port = free_port()
    proc = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", FLOOR, str(port)])
    try:
        wait_port(port)

        async def run() -> float:
            before = rss_kib(proc.pid)
            conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]
            await asyncio.sleep(1.0)
            after = rss_kib(proc.pid)
            for _, w in conns:
                w.close()
            return (after - before) / count

        return asyncio.run(run())
    finally:
        proc.kill()
        proc.wait()


def start_proxy(name: str, work: Path, backend_port: int, args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], int]:  # fmt: skip
    """A fresh proxy (each round starts from an empty process, so memory freed by an earlier
    round cannot hide what a connection costs)."""
    port = free_port()
    if name == "nginx":
        proc = start_nginx(work, f"proxy-{port}", f"""
  upstream api {{ server 127.0.0.1:{backend_port}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    server_name {HOST};
    location /api {{ proxy_pass http://api; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}""", 0, connections=args.idle + args.slow + 1000)  # fmt: skip
        wait_port(port)
        return proc, port
    return start_edgeproxy(args.python, work, backend_port)


def start_backend(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    """The backend: an nginx on core 1 answering every request with a line."""
    port = free_port()
    proc = start_nginx(work, "backend", f"""
  server {{ listen 127.0.0.1:{port} backlog=4096;
           location / {{ default_type text/plain; return 200 "hello from the backend\\n"; }} }}""", 1)  # fmt: skip
    wait_port(port)
    return proc, port


def start_edgeproxy(python: str, work: Path, backend_port: int,
                    tls: tuple[bytes, bytes] | None = None) -> tuple[subprocess.Popen[bytes], int]:  # fmt: skip
    """The edgeproxy installed for `python`, one worker on core 0, access log off; HTTPS with
    `tls` (certificate and key PEM). -> (process, its listening port)."""
    port, admin = free_port(), free_port()
    proc = subprocess.Popen(
        ["taskset", "-c", "0", python, "-m", "edgeproxy.cli", "run",
         "--manifests", str(manifests(work, backend_port, 0, tls)),
         "--https" if tls else "--http", f"127.0.0.1:{port}",
         "--admin", f"127.0.0.1:{admin}", "--workers", "1", "--access-log", "off",
         "--log-level", "warning"], cwd=work)  # fmt: skip
    wait_ready(admin, 120)
    return proc, port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", type=int, default=10_000)
    parser.add_argument("--slow", type=int, default=2_000)
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter whose installed edgeproxy is measured (default: this one)")
    args = parser.parse_args()
    ensure_tools()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the clients, and the proxies after
    if hard < args.idle + args.slow + 1000:
        print(f"RLIMIT_NOFILE hard limit {hard} is below what --idle/--slow need", file=sys.stderr)
        return 2
    print(f"edgeproxy build measured: {build_of(args.python)}", flush=True)
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="edgeproxy-resources-") as tmp:
        work = Path(tmp)
        backend, backend_port = start_backend(work)
        try:
            names = ["nginx", "edgeproxy"]
            for r in range(args.rounds):
                results.setdefault("uvloop-floor", {}).setdefault("idle_kib_per_conn", []).append(floor_figure(args.idle))
                for name in (names if r % 2 == 0 else list(reversed(names))):
                    proc, port = start_proxy(name, work, backend_port, args)
                    try:
                        figures = results.setdefault(name, {})
                        run_wrk(port, 2, 64, 1)  # warm: pools, code paths
                        figures.setdefault("idle_kib_per_conn", []).append(idle_figure(proc.pid, port, args.idle))
                        time.sleep(1)
                        base = run_wrk(port, args.duration, 64, 1)
                        loris = slowloris(port, args.slow, args.duration)
                        figures.setdefault("base_rps", []).append(base["rps"])
                        figures.setdefault("base_p99_ms", []).append(base["p99_ms"])
                        figures.setdefault("slowloris_rps", []).append(loris["rps"])
                        figures.setdefault("slowloris_p99_ms", []).append(loris["p99_ms"])
                        figures.setdefault("slowloris_held", []).append(loris["held"])
                        rej = rejected_cpu(proc.pid, port, args.duration)
                        figures.setdefault("rejected_cpu_us", []).append(rej["cpu_us_per_req"])
                        figures.setdefault("rejected_share", []).append(rej["rejected"] / max(1, rej["requests"]))
                        print(f"round {r + 1} {name}: idle {figures['idle_kib_per_conn'][-1]:.2f} KiB/conn "
                              f"(uvloop floor {results['uvloop-floor']['idle_kib_per_conn'][-1]:.2f}), "
                              f"rps {base['rps']:.0f} -> {loris['rps']:.0f} with {loris['held']} slowloris "
                              f"(p99 {base['p99_ms']:.2f} -> {loris['p99_ms']:.2f} ms), rejected "
                              f"{rej['cpu_us_per_req']:.1f} us CPU each ({rej['rejected']}/{rej['requests']})",
                              flush=True)  # fmt: skip
                    finally:
                        proc.terminate()
                        proc.wait(10)
        finally:
            backend.terminate()
            backend.wait(10)
    summary = {name: {k: statistics.median(v) for k, v in figs.items()} for name, figs in results.items()}
    ep, ng = summary["edgeproxy"], summary["nginx"]
    print("\nmedians:")
    for name in ("nginx", "edgeproxy"):
        s = summary[name]
        print(f"  {name:10} idle {s['idle_kib_per_conn']:.2f} KiB/conn; with {args.slow} slowloris: "
              f"{s['slowloris_rps'] / s['base_rps']:.3f}x req/s, {s['slowloris_p99_ms'] / s['base_p99_ms']:.2f}x p99 "
              f"of its own run without; {s['rejected_cpu_us']:.1f} us CPU per rejected request")  # fmt: skip
    print(f"  uvloop floor (bare transport): {summary['uvloop-floor']['idle_kib_per_conn']:.2f} KiB/conn")
    print(f"edgeproxy / nginx: idle memory {ep['idle_kib_per_conn'] / ng['idle_kib_per_conn']:.2f}x, "
          f"CPU per rejected request {ep['rejected_cpu_us'] / ng['rejected_cpu_us']:.2f}x")
    out = ROOT / "results" / "resources.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"build": build_of(args.python), "args": vars(args), "rounds": results,
                               "medians": summary}, indent=2))  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

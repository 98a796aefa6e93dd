#!/usr/bin/env python3
"""edgeproxy vs nginx as an HTTP/1.1 reverse proxy, in one run, reported as ratios.

Layout (2 cores): the proxy under test (edgeproxy with one worker, or nginx with one worker
and upstream keepalive) is pinned to core 0; wrk and the backend (nginx, one worker, a small
fixed response) share core 1. Both proxies route by host and path and set X-Forwarded-* and
X-Request-ID. Rounds alternate which proxy goes first; medians are reported. Every round
starts the proxies anew: a process's own luck (its hash seed, where its objects landed in
memory) moved one edgeproxy process by up to 10% against a copy of itself, so a process kept
for all rounds would carry it into every one (each round a new draw, the median over them).

Per proxy and round: req/s and p99 from wrk, the proxy process's CPU time per request
(utime+stime from /proc/PID/stat) and its read/write syscalls per request (/proc/PID/io).

Scenarios: `edgeproxy` (1 Ingress), `edgeproxy-10k` (the same route among 10,000 Ingresses:
lookup cost must not grow), and optionally `--balancers` runs least_conn and hash.

Modes: `http` (default), `https` (TLS, keep-alive: the same certificate, ECDSA P-256, for both
proxies) and `handshake` (TLS with `Connection: close`, so every request is a new handshake).

    python benchmarks/http_vs_nginx.py [--mode http|https|handshake] [--rounds 5] [--duration 10]

Every core (--workers 2): nothing is pinned; edgeproxy with 2 workers, edgeproxy with 1 worker
and nginx with 2 worker processes share both cores with wrk (-t2) and the backend, as on a
node where the load is local. Ratios: 2 workers against 1, and against nginx's 2.

CPU and syscalls are those of the whole process tree (edgeproxy's supervisor and workers).

Installs wrk and nginx with apt-get when missing. Loopback only. Writes results/http.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "bench.example.com"
# nginx's access log line, with the fields of edgeproxy's (README, "Access log").
NGINX_LOG_FORMAT = (
    '{"time":"$time_iso8601","client":"$remote_addr","method":"$request_method","host":"$host",'
    '"path":"$request_uri","protocol":"$server_protocol","status":$status,'
    '"bytes_sent":$bytes_sent,"bytes_received":$request_length,"duration":$request_time,'
    '"upstream":"$upstream_addr","upstream_connect_time":"$upstream_connect_time",'
    '"upstream_header_time":"$upstream_header_time",'
    '"upstream_response_time":"$upstream_response_time","request_id":"$request_id",'
    '"ingress":"bench/bench","service":"bench/api:80","user_agent":"$http_user_agent"}'
)
PATH = "/api/items"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def ensure_tools() -> None:
    missing = [p for p in ("wrk", "nginx") if not shutil.which(p) and not Path(f"/usr/sbin/{p}").exists()]  # fmt: skip
    if missing:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})  # fmt: skip


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """Never the same port twice (SO_REUSEPORT listeners would share it rather than fail)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def wait_ready(admin_port: int, timeout: float) -> None:
    """Until edgeproxy's /readyz answers 200 (its data port accepts before it is ready)."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("edgeproxy never became ready")


def build_of(python: str) -> str:
    """Which edgeproxy that interpreter imports, asked from outside any checkout."""
    return subprocess.run(
        [python, "-c", "import edgeproxy, edgeproxy.proxy as p; "
         "print('compiled' if p.compiled() else 'pure Python', 'from', edgeproxy.__file__)"],
        cwd=tempfile.gettempdir(), capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip


def nginx_bin() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def start_nginx(workdir: Path, name: str, http_block: str, core: int, workers: int = 1,
                connections: int = 4096, keepalive_requests: int = 1_000_000) -> subprocess.Popen[bytes]:  # fmt: skip
    conf = workdir / f"{name}.conf"
    conf.write_text(f"""
worker_processes {workers};
worker_rlimit_nofile {connections * 2};
daemon off;
master_process {"on" if workers > 1 else "off"};
user root;
pid {workdir}/{name}.pid;
error_log {workdir}/{name}.err warn;
events {{ worker_connections {connections}; }}
http {{
  access_log off;
  keepalive_requests {keepalive_requests};
  client_body_temp_path {workdir}/{name}-body;
  proxy_temp_path {workdir}/{name}-proxy;
  {http_block}
}}
""")
    return subprocess.Popen(["taskset", "-c", cores(core), nginx_bin(), "-c", str(conf),
                             "-p", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def manifests(workdir: Path, backend_port: int, extra_ingresses: int, tls: tuple[bytes, bytes] | None = None) -> Path:  # fmt: skip
    import base64

    import yaml

    objs: list[dict] = [
        {"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass", "metadata": {"name": "ep"},
         "spec": {"controller": "edgeproxy.io/ingress-controller"}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api", "namespace": "bench"},
         "spec": {"ports": [{"name": "http", "port": 80}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "api-1", "namespace": "bench",
                      "labels": {"kubernetes.io/service-name": "api"}},
         "addressType": "IPv4", "ports": [{"name": "http", "port": backend_port}],
         "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]},
    ]  # fmt: skip

    def ingress(name: str, host: str) -> dict:
        return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                "metadata": {"name": name, "namespace": "bench"},
                "spec": {"ingressClassName": "ep", "rules": [{"host": host, "http": {"paths": [
                    {"path": "/", "pathType": "Prefix",
                     "backend": {"service": {"name": "api", "port": {"number": 80}}}},
                    {"path": "/api", "pathType": "Prefix",
                     "backend": {"service": {"name": "api", "port": {"number": 80}}}}]}}]}}  # fmt: skip

    bench = ingress("bench", HOST)
    if tls is not None:
        bench["spec"]["tls"] = [{"hosts": [HOST], "secretName": "bench-tls"}]
        objs.append({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                     "metadata": {"name": "bench-tls", "namespace": "bench"},
                     "data": {"tls.crt": base64.b64encode(tls[0]).decode(),
                              "tls.key": base64.b64encode(tls[1]).decode()}})  # fmt: skip
    objs.append(bench)
    objs += [ingress(f"other-{i}", f"host-{i}.example.org") for i in range(extra_ingresses)]
    path = workdir / f"manifests-{extra_ingresses}"
    path.mkdir(exist_ok=True)
    (path / "objects.yaml").write_text(yaml.safe_dump_all(objs))
    return path


def tree(pid: int) -> list[int]:
    """The process and its descendants (edgeproxy's workers are its children)."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            pids.extend(tree(int(child)))
    return pids


def proc_cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the process tree so far."""
    user = system = 0.0
    for p in tree(pid):
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        user += int(fields[11]) / CLK_TCK
        system += int(fields[12]) / CLK_TCK
    return user, system


def proc_syscalls(pid: int) -> tuple[int, int]:
    reads = writes = 0
    for p in tree(pid):
        io = dict(line.split(": ") for line in Path(f"/proc/{p}/io").read_text().splitlines())
        reads += int(io["syscr"])
        writes += int(io["syscw"])
    return reads, writes


MODE = "http"
# Both proxies close a client connection after this many requests (nginx keepalive_requests,
# edgeproxy --max-requests-per-connection; 1000 is each one's default). The proxy nginx had
# 1,000,000 while edgeproxy kept 1000, so only edgeproxy reconnected (and re-handshook) under wrk.
CLIENT_REQUESTS_PER_CONNECTION = 1000
WORKERS = 1  # --workers: 1 pins proxy and load apart; more shares every core unpinned


def cores(core: int) -> str:
    return str(core) if WORKERS == 1 else f"0-{os.cpu_count() - 1}"  # type: ignore[operator]


def run_wrk(port: int, duration: int, connections: int, core: int) -> dict[str, float]:
    scheme = "http" if MODE == "http" else "https"
    extra = ["-H", "Connection: close"] if MODE == "handshake" else []
    out = subprocess.run(
        ["taskset", "-c", cores(core), "wrk", f"-t{WORKERS}", f"-c{connections}", f"-d{duration}s",
         "--latency", "-H", f"Host: {HOST}", *extra, f"{scheme}://127.0.0.1:{port}{PATH}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    assert p99 is not None
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[p99.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {"requests": requests, "rps": rps, "p99_ms": float(p99.group(1)) * scale,
            "non_2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": socket_errors.group(1) if socket_errors else ""}  # type: ignore[dict-item]  # fmt: skip


SOMAXCONN = Path("/proc/sys/net/core/somaxconn")


def accept_queue_for(connections: int) -> None:
    """Both proxies listen with a backlog the kernel caps at net.core.somaxconn (4096 by
    default): wrk opening more connections at once than that drops SYNs, for either proxy,
    and each costs a 1 s retry in p99. Raise it (as a node serving that many would be tuned)."""
    try:
        current = int(SOMAXCONN.read_text())
        if current < 2 * connections:
            SOMAXCONN.write_text(str(2 * connections))
            print(f"net.core.somaxconn {current} -> {2 * connections} (for -c{connections})")
    except (OSError, ValueError) as exc:
        print(f"net.core.somaxconn left as it is ({exc}): expect listen drops at -c{connections}")


def listen_drops() -> int:
    """The machine's TcpExt ListenDrops: connections a full accept queue dropped (the client
    retries its SYN after 1 s, a latency no proxy work explains)."""
    lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()
             if line.startswith("TcpExt:")]  # fmt: skip
    return int(dict(zip(lines[0], lines[1], strict=True)).get("ListenDrops", 0)) if len(lines) == 2 else 0


def measure(pid: int, port: int, args: argparse.Namespace) -> dict[str, float]:
    run_wrk(port, 2, args.connections, 1)  # warm-up: pools filled, code paths hot
    cpu0, (r0, w0), drops0 = proc_cpu_seconds(pid), proc_syscalls(pid), listen_drops()
    result = run_wrk(port, args.duration, args.connections, 1)
    cpu1, (r1, w1), drops1 = proc_cpu_seconds(pid), proc_syscalls(pid), listen_drops()
    result["listen_drops"] = drops1 - drops0
    n = max(1, result["requests"])
    result["user_us_per_req"] = (cpu1[0] - cpu0[0]) / n * 1e6
    result["sys_us_per_req"] = (cpu1[1] - cpu0[1]) / n * 1e6
    result["cpu_us_per_req"] = result["user_us_per_req"] + result["sys_us_per_req"]
    result["reads_per_req"] = (r1 - r0) / n
    result["writes_per_req"] = (w1 - w0) / n
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--balancers", action="store_true", help="also least_conn and hash")
    parser.add_argument("--skip-10k", action="store_true")
    parser.add_argument("--mode", choices=("http", "https", "handshake"), default="http")
    parser.add_argument("--tls-version", choices=("1.2", "1.3"),
                        help="pin both proxies to this TLS version (default: both offered)")
    parser.add_argument("--no-resume", action="store_true",
                        help="session resumption off in both proxies: every handshake is full")
    parser.add_argument("--body-size", type=int, default=0,
                        help="the backend answers with a body of this many bytes (default: a line)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--workers", type=int, default=1,
                        help="proxy workers (edgeproxy --workers, nginx worker_processes); with "
                             "more than 1, nothing is pinned and edgeproxy with 1 worker runs too")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter whose installed edgeproxy is measured (default: this one)")
    parser.add_argument("--access-log", choices=("on", "off"), default="on",
                        help="access logs of both proxies, to a file (default on: nginx logs "
                             "a JSON line per request with edgeproxy's fields, buffered as edgeproxy's)")
    parser.add_argument("--access-log-cost", action="store_true",
                        help="also edgeproxy with --access-log off (the others log to a file, "
                             "as a container runtime's log would)")
    parser.add_argument("--compare", metavar="PYTHON",
                        help="also measure the edgeproxy installed for this interpreter "
                             "(another build, e.g. the previous commit) in the same rounds")
    args = parser.parse_args()
    global MODE, WORKERS
    MODE = args.mode
    WORKERS = args.workers
    args.out = args.out or ROOT / "results" / f"{args.mode}.json"
    ensure_tools()
    accept_queue_for(args.connections)
    tls: tuple[bytes, bytes] | None = None
    if args.mode != "http":
        sys.path.insert(0, str(ROOT))
        from edgeproxy.tls import self_signed_pem

        tls = self_signed_pem(HOST)
    # Run from a directory without the checkout, so the installed build is what runs (a
    # checkout's source tree on sys.path would be the pure-Python modules, silently).
    edgeproxy = [args.python, "-m", "edgeproxy.cli"]
    print(f"edgeproxy build measured: {build_of(args.python)}", flush=True)
    if args.compare:
        print(f"edgeproxy-compare build: {build_of(args.compare)}", flush=True)

    with tempfile.TemporaryDirectory(prefix="edgeproxy-bench-") as tmp:
        work = Path(tmp)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            backend_port = free_port()
            body = ""
            if args.body_size:
                (work / "body.bin").write_bytes(os.urandom(args.body_size))
                body = f"location = {PATH} {{ default_type application/octet-stream; alias {work}/body.bin; }}"
            nginx_connections = max(4096, 2 * args.connections)  # clients and upstreams
            procs.append(start_nginx(work, "backend", f"""
  server {{ listen 127.0.0.1:{backend_port} backlog=65535; {body}
           location / {{ default_type text/plain; return 200 "hello from the backend\\n"; }} }}""", 1,
                connections=nginx_connections))  # fmt: skip
            wait_port(backend_port)
            nginx_port = free_port()
            ssl_directives = ""
            if tls is not None:
                (work / "cert.pem").write_bytes(tls[0])
                (work / "key.pem").write_bytes(tls[1])
                protocols = f"TLSv{args.tls_version}" if args.tls_version else "TLSv1.2 TLSv1.3"
                resume = ("ssl_session_tickets off; ssl_session_cache off;" if args.no_resume
                          else "ssl_session_cache shared:SSL:10m;")  # fmt: skip
                ssl_directives = (f"ssl_certificate {work}/cert.pem; ssl_certificate_key {work}/key.pem; "
                                  f"ssl_protocols {protocols}; {resume}")  # fmt: skip
            # The same access log work on both sides (ingress-nginx logs every request too): one
            # JSON line per request with edgeproxy's fields, buffered as edgeproxy buffers
            # (64 KiB, flushed every 100 ms); --access-log off turns both off.
            access_log = ("access_log off;" if args.access_log == "off" else
                          f"log_format json escape=json '{NGINX_LOG_FORMAT}'; "
                          f"access_log {work}/nginx.access.log json buffer=64k flush=100ms;")  # fmt: skip
            nginx_block = f"""
  upstream api {{ server 127.0.0.1:{backend_port}; keepalive 128; keepalive_requests 1000000; }}
  {access_log}
  server {{
    listen 127.0.0.1:{nginx_port} backlog=65535 {"ssl" if tls else ""};
    server_name {HOST};
    {ssl_directives}
    location / {{ return 404; }}
    location /api {{
      proxy_pass http://api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $host;
      proxy_set_header X-Forwarded-Port $server_port;
      proxy_set_header X-Request-ID $request_id;
    }}
  }}"""  # fmt: skip
            log_flags = ["--access-log", "off"] if args.access_log == "off" else []
            variants = [("edgeproxy", 0, ["--workers", str(args.workers)], edgeproxy)]
            if args.workers > 1:
                variants.append(("edgeproxy-1-worker", 0, ["--workers", "1"], edgeproxy))
            if args.access_log_cost:
                variants.append(("edgeproxy-log-off", 0, ["--workers", str(args.workers),
                                                          "--access-log", "off"], edgeproxy))  # fmt: skip
            if args.compare:
                variants.append(("edgeproxy-compare", 0, ["--workers", str(args.workers)],
                                 [args.compare, "-m", "edgeproxy.cli"]))  # fmt: skip
            if not args.skip_10k and args.workers == 1:
                variants.append(("edgeproxy-10k", 10_000, [], edgeproxy))
            if args.balancers:
                variants += [("edgeproxy-least_conn", 0, ["--default-balancer", "least_conn"], edgeproxy),
                             ("edgeproxy-hash", 0, ["--default-balancer", "hash"], edgeproxy)]  # fmt: skip
            tls_flags: list[str] = []
            if args.tls_version:
                tls_flags += ["--tls-min-version", args.tls_version, "--tls-max-version", args.tls_version]
            if args.no_resume:
                tls_flags += ["--tls-session-resumption", "off"]

            def start_proxies() -> dict[str, tuple[subprocess.Popen[bytes], int]]:
                """nginx and every edgeproxy variant, each new: name -> (process, port)."""
                started = {"nginx": (start_nginx(work, "proxy", nginx_block, 0, args.workers,
                                                 connections=nginx_connections,
                                                 keepalive_requests=CLIENT_REQUESTS_PER_CONNECTION), nginx_port)}  # fmt: skip
                wait_port(nginx_port)
                for name, extra, flags, command in variants:
                    flags = log_flags + flags + tls_flags  # a variant's own --access-log comes last
                    port, admin = free_port(), free_port()
                    with (work / f"{name}.access.log").open("ab") as log:
                        proc = subprocess.Popen(
                            ["taskset", "-c", cores(0), *command, "run",
                             "--manifests", str(manifests(work, backend_port, extra, tls)),
                             "--https" if tls else "--http", f"127.0.0.1:{port}",
                             "--admin", f"127.0.0.1:{admin}",
                             "--log-level", "warning", "--max-requests-per-connection",
                             str(CLIENT_REQUESTS_PER_CONNECTION), *flags],
                            cwd=work, stdout=log,
                        )  # fmt: skip
                    started[name] = (proc, port)
                    wait_ready(admin, 180)  # the data port accepts early (backlog); ready is later
                return started

            names = ["nginx"] + [v[0] for v in variants]
            rounds: dict[str, list[dict[str, float]]] = {name: [] for name in names}
            for r in range(args.rounds):
                order = names if r % 2 == 0 else list(reversed(names))
                targets = start_proxies()
                procs += [proc for proc, _ in targets.values()]
                for name in order:
                    proc, port = targets[name]
                    pid = proc.pid
                    result = measure(pid, port, args)
                    rounds[name].append(result)
                    print(f"round {r + 1} {name:22s} {result['rps']:9.0f} req/s  "
                          f"p99 {result['p99_ms']:6.2f} ms  cpu {result['cpu_us_per_req']:5.1f} us/req "
                          f"(user {result['user_us_per_req']:4.1f})  "
                          f"r/w {result['reads_per_req']:.2f}/{result['writes_per_req']:.2f} per req"
                          f"{'  non-2xx ' + str(result['non_2xx']) if result['non_2xx'] else ''}"
                          f"{'  listen drops ' + str(result['listen_drops']) if result['listen_drops'] else ''}"
                          f"{'  wrk socket errors: ' + str(result['socket_errors']) if result['socket_errors'] else ''}",
                          flush=True)  # fmt: skip
                stop([proc for proc, _ in targets.values()])
        finally:
            stop(procs)

    summary = {}
    for name, results in rounds.items():
        summary[name] = {key: statistics.median(r[key] for r in results)
                         for key in ("rps", "p99_ms", "cpu_us_per_req", "user_us_per_req", "reads_per_req", "writes_per_req")}  # fmt: skip
    base = summary["nginx"]
    print(f"\n{args.mode}: medians over {args.rounds} rounds, wrk -t{args.workers} -c{args.connections} "
          f"-d{args.duration}s, {args.workers} proxy worker(s), access logs {args.access_log}")  # fmt: skip
    print(f"{'proxy':22s} {'req/s':>9s} {'p99 ms':>8s} {'cpu us/req':>11s} {'(user)':>7s} {'reads/req':>10s} {'writes/req':>11s}  ratios vs nginx (req/s, p99, cpu)")  # fmt: skip
    for name, s in summary.items():
        print(f"{name:22s} {s['rps']:9.0f} {s['p99_ms']:8.2f} {s['cpu_us_per_req']:11.1f} {s['user_us_per_req']:7.1f} "
              f"{s['reads_per_req']:10.2f} {s['writes_per_req']:11.2f}  "
              f"{s['rps'] / base['rps']:.2f}x {s['p99_ms'] / base['p99_ms']:.2f}x "
              f"{s['cpu_us_per_req'] / base['cpu_us_per_req']:.2f}x")  # fmt: skip
    if "edgeproxy-1-worker" in summary:
        one, two = summary["edgeproxy-1-worker"], summary["edgeproxy"]
        print(f"edgeproxy {args.workers} workers vs 1: {two['rps'] / one['rps']:.2f}x req/s, "
              f"{two['cpu_us_per_req'] / one['cpu_us_per_req']:.2f}x CPU per request")  # fmt: skip
    if "edgeproxy-log-off" in summary:
        on, off = summary["edgeproxy"], summary["edgeproxy-log-off"]
        print(f"access log to a file vs off: {on['rps'] / off['rps']:.3f}x req/s, "
              f"{on['cpu_us_per_req'] / off['cpu_us_per_req']:.3f}x CPU per request")  # fmt: skip
    if "edgeproxy-compare" in summary:
        new = summary.get("edgeproxy-log-off", summary["edgeproxy"])
        old = summary["edgeproxy-compare"]
        print(f"this build ({'log off' if 'edgeproxy-log-off' in summary else 'as run'}) vs the "
              f"compared build: {new['rps'] / old['rps']:.3f}x req/s, "
              f"{new['cpu_us_per_req'] / old['cpu_us_per_req']:.3f}x CPU per request")  # fmt: skip
    if "edgeproxy-10k" in summary:
        print(f"lookup among 10,000 Ingresses: {summary['edgeproxy-10k']['rps'] / summary['edgeproxy']['rps']:.3f}x "
              "the req/s with one")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rounds": rounds,
                                    "median": summary}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

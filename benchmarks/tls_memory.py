#!/usr/bin/env python3
"""Memory per idle HTTPS keep-alive connection, edgeproxy against nginx in the same run.

Each round starts each proxy afresh (one worker, pinned to core 0; the backend an nginx on
core 1), warms it with a few connections, then opens --idle TLS connections (TLS 1.3, the same
ECDSA P-256 certificate for both), one request each, holds them, and reports the growth of the
proxy's process tree's RSS divided by --idle. The kernel's socket buffers are not in it.

    python benchmarks/tls_memory.py [--idle 3000] [--rounds 3] [--python PY] [--compare PY]

Medians over rounds. Loopback only. Writes results/tls_memory.json.
"""

from __future__ import annotations

import argparse
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
    ROOT,
    build_of,
    ensure_tools,
    free_port,
    start_nginx,
    wait_port,
)
from resources import idle_figure, start_backend, start_edgeproxy  # noqa: E402


def start_proxy(name: str, python: str, work: Path, backend_port: int, tls: tuple[bytes, bytes],
                idle: int) -> tuple[subprocess.Popen[bytes], int]:  # fmt: skip
    port = free_port()
    if name == "nginx":
        proc = start_nginx(work, f"proxy-{port}", f"""
  upstream api {{ server 127.0.0.1:{backend_port}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096 ssl;
    server_name {HOST};
    ssl_certificate {work}/cert.pem; ssl_certificate_key {work}/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:SSL:10m;
    location /api {{ proxy_pass http://api; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}""", 0, connections=idle + 1000)  # fmt: skip
        wait_port(port)
        return proc, port
    return start_edgeproxy(python, work, backend_port, tls)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", type=int, default=3000)
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter whose installed edgeproxy is measured (default: this one)")
    parser.add_argument("--compare", metavar="PYTHON",
                        help="also the edgeproxy installed for this interpreter, in the same rounds")
    args = parser.parse_args()
    ensure_tools()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.idle + 1000:
        print(f"RLIMIT_NOFILE hard limit {hard} is below what --idle needs", file=sys.stderr)
        return 2
    variants = {"nginx": "", "edgeproxy": args.python}
    print(f"edgeproxy build measured: {build_of(args.python)}", flush=True)
    if args.compare:
        variants["edgeproxy-compare"] = args.compare
        print(f"edgeproxy-compare build: {build_of(args.compare)}", flush=True)
    from edgeproxy.tls import self_signed_pem

    tls = self_signed_pem(HOST)
    client = ssl.create_default_context()
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE  # the self-signed certificate
    results: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="edgeproxy-tls-memory-") as tmp:
        work = Path(tmp)
        (work / "cert.pem").write_bytes(tls[0])
        (work / "key.pem").write_bytes(tls[1])
        backend, backend_port = start_backend(work)
        try:
            names = list(variants)
            for r in range(args.rounds):
                for name in (names if r % 2 == 0 else list(reversed(names))):
                    proc, port = start_proxy(name, variants[name], work, backend_port, tls, args.idle)
                    try:
                        results[name].append(idle_figure(proc.pid, port, args.idle, client, warm=50))
                        print(f"round {r + 1} {name}: {results[name][-1]:.1f} KiB per idle HTTPS "
                              f"connection", flush=True)  # fmt: skip
                    finally:
                        proc.terminate()
                        proc.wait(10)
                    time.sleep(0.5)
        finally:
            backend.terminate()
            backend.wait(10)
    medians = {name: statistics.median(v) for name, v in results.items()}
    print(f"\nmedians over {args.rounds} rounds, {args.idle} idle HTTPS connections:")
    for name, kib in medians.items():
        print(f"  {name:18} {kib:6.1f} KiB per connection  {kib / medians['nginx']:.2f}x nginx")
    out = ROOT / "results" / "tls_memory.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"build": build_of(args.python), "args": vars(args),
                               "rounds": results, "medians": medians}, indent=2))  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

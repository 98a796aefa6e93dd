#!/usr/bin/env python3
"""The performance table of issue 13 in one command: each scenario a row, edgeproxy and nginx
side by side in one run of benchmarks/http_vs_nginx.py (alternating rounds, medians), the
ratios edgeproxy / nginx for req/s, CPU per request and p99. Both proxies write an access log
line per request to a file (http_vs_nginx.py --access-log), except in the row that says so.

    python benchmarks/table.py [--rounds 3] [--duration 8] [--only ROW ...] [--python PY]

Writes results/table.json, results/table.md and results/table.svg (the ratios as bars, with
the 1.0x line). Measures the edgeproxy installed for --python (each row prints the build).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent

ROWS: list[tuple[str, str, list[str]]] = [
    ("http-c64", "http, wrk -c64", ["--mode", "http", "--connections", "64"]),
    ("http-c64-no-logs", "http, wrk -c64, access logs off in both",
     ["--mode", "http", "--connections", "64", "--access-log", "off"]),
    ("http-c1000", "http, wrk -c1000", ["--mode", "http", "--connections", "1000"]),
    ("http-c5000", "http, wrk -c5000", ["--mode", "http", "--connections", "5000"]),
    ("https-c64", "https keep-alive, -c64", ["--mode", "https", "--connections", "64"]),
    ("https-c1000", "https keep-alive, -c1000", ["--mode", "https", "--connections", "1000"]),
    ("handshake-resumed", "a new TLS connection per request, resumed", ["--mode", "handshake"]),
    ("handshake-full-13", "a new TLS connection per request, full handshake, TLS 1.3",
     ["--mode", "handshake", "--no-resume", "--tls-version", "1.3"]),
    ("handshake-full-12", "a new TLS connection per request, full handshake, TLS 1.2",
     ["--mode", "handshake", "--no-resume", "--tls-version", "1.2"]),
    ("bodies-1m-c16", "http, 1 MiB bodies, -c16", ["--mode", "http", "--body-size", "1048576", "--connections", "16"]),
]  # fmt: skip


def svg(rows: list[dict[str, object]]) -> str:
    """Grouped bars (req/s, CPU/request, p99 ratios) per row, a dashed line at 1.0x."""
    width, row_h, left, scale = 900, 54, 330, 180.0  # scale: pixels per 1.0x
    height = 40 + row_h * len(rows) + 30
    colors = {"rps": "#2b7bb9", "cpu": "#e08a1e", "p99": "#7a7a7a"}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           'font-family="sans-serif" font-size="12">',
           '<text x="10" y="20" font-size="14">edgeproxy / nginx (req/s: higher is better; '
           'CPU per request and p99: lower is better)</text>']  # fmt: skip
    for i, row in enumerate(rows):
        y = 40 + i * row_h
        out.append(f'<text x="10" y="{y + 22}">{row["title"]}</text>')
        for j, key in enumerate(("rps", "cpu", "p99")):
            value = float(row[f"{key}_ratio"])  # type: ignore[arg-type]
            bar = min(value, (width - left - 60) / scale) * scale
            out.append(f'<rect x="{left}" y="{y + j * 15}" width="{bar:.0f}" height="12" fill="{colors[key]}"/>')
            out.append(f'<text x="{left + bar + 4:.0f}" y="{y + j * 15 + 10}">{key} {value:.2f}x</text>')
    line = left + scale
    out.append(f'<line x1="{line}" y1="32" x2="{line}" y2="{height - 20}" stroke="black" stroke-dasharray="4 3"/>')
    out.append(f'<text x="{line - 12}" y="{height - 6}">1.0x</text></svg>')
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--only", nargs="*", choices=[r[0] for r in ROWS], help="these rows only")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter whose installed edgeproxy is measured (default: this one)")
    args = parser.parse_args()
    results = ROOT / "results"
    results.mkdir(exist_ok=True)
    rows: list[dict[str, object]] = []
    for key, title, flags in ROWS:
        if args.only and key not in args.only:
            continue
        out = results / f"table-{key}.json"
        print(f"== {title}", flush=True)
        subprocess.run([sys.executable, str(HERE / "http_vs_nginx.py"), *flags, "--skip-10k",
                        "--rounds", str(args.rounds), "--duration", str(args.duration),
                        "--python", args.python, "--out", str(out)], check=True)  # fmt: skip
        median = json.loads(out.read_text())["median"]
        ep, ng = median["edgeproxy"], median["nginx"]
        rows.append({"row": key, "title": title, "edgeproxy": ep, "nginx": ng,
                     "rps_ratio": ep["rps"] / ng["rps"], "cpu_ratio": ep["cpu_us_per_req"] / ng["cpu_us_per_req"],
                     "p99_ratio": ep["p99_ms"] / ng["p99_ms"]})  # fmt: skip
    lines = ["| scenario | req/s, edgeproxy / nginx | CPU per request, edgeproxy / nginx | p99, edgeproxy / nginx |",
             "|---|---|---|---|"]  # fmt: skip
    for row in rows:
        lines.append(f"| {row['title']} | {row['rps_ratio']:.2f}x | {row['cpu_ratio']:.2f}x | {row['p99_ratio']:.2f}x |")
    table = "\n".join(lines)
    print(f"\nmedians of {args.rounds} rounds, one worker each:\n{table}")
    (results / "table.json").write_text(json.dumps({"rounds": args.rounds, "duration": args.duration, "rows": rows}, indent=2))
    (results / "table.md").write_text(table + "\n")
    (results / "table.svg").write_text(svg(rows))
    print(f"wrote {results / 'table.json'}, table.md, table.svg")
    return 0


if __name__ == "__main__":
    sys.exit(main())

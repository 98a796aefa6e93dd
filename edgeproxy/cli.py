"""Command line: parse arguments, build the pieces, run the loop.

    edgeproxy run --manifests PATH [...] --http HOST:PORT [--https HOST:PORT] --admin HOST:PORT
                  [--ingress-class NAME] [--workers N] [--shutdown-delay S] [--drain-timeout S]
    edgeproxy demo   (demo backends from config/ plus edgeproxy, all on loopback)
    edgeproxy routes --manifests PATH | --kubeconfig FILE  [--explain URL [--header 'Host: x']]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from edgeproxy import __version__
from edgeproxy.config import OutlierSettings, Settings

log = logging.getLogger("edgeproxy")



def host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    if not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range (1-65535)")
    return host.strip("[]") or "0.0.0.0", int(port)


def cidr_list(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    try:
        return tuple(ipaddress.ip_network(c.strip(), strict=False) for c in text.split(",") if c)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def size(text: str) -> int:
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    text = text.strip().lower()
    try:
        if text and text[-1] in units:
            value = int(float(text[:-1]) * units[text[-1]])
        else:
            value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 512k or 8m, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a size cannot be negative: {text!r}")
    return value


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"seconds cannot be negative: {text!r}")
    return value


def add_source_options(p: argparse.ArgumentParser) -> None:
    """Where objects come from (run, demo and routes)."""
    p.add_argument("--manifests", action="append", type=Path, default=[], metavar="PATH",
                   help="YAML/JSON file or directory of Kubernetes objects (repeatable)")
    p.add_argument("--kubeconfig", type=Path, metavar="FILE",
                   help="watch the API server of this kubeconfig")
    p.add_argument("--in-cluster", action="store_true",
                   help="watch the API server with the pod's service account")
    p.add_argument("--watch-namespace", action="append", default=[], metavar="NAMESPACE",
                   help="namespace to watch (repeatable; default: all)")
    p.add_argument("--ingress-class", metavar="NAME",
                   help="serve only this IngressClass (default: ours by controller name, and "
                        "Ingresses without a class when ours is the default class)")
    p.add_argument("--default-balancer", default=Settings.default_balancer, metavar="NAME",
                   help="load balancer where no Ingress annotation names one: round_robin, "
                        "least_conn, hash, or a plugin's name (default: %(default)s)")


class TerseParser(argparse.ArgumentParser):
    """A usage error is one line (the whole usage is one --help away)."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = TerseParser(prog="edgeproxy", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"edgeproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=TerseParser)
    routes = sub.add_parser("routes", help="print the compiled routing table, or explain one request",
                            description="Compile the objects as `run` would and print the "
                                        "routing table, the invalid objects and why; with "
                                        "--explain, where one request would go and why.")  # fmt: skip
    add_source_options(routes)
    routes.add_argument("--explain", metavar="URL",
                        help="the request to explain, e.g. http://shop.example.com/api/items")
    routes.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                        help="a request header for --explain (Host overrides the URL's host)")
    routes.add_argument("--json", action="store_true", help="print JSON instead of text")
    routes.add_argument("--log-level", default="warning",
                        choices=("debug", "info", "warning", "error"), help="edgeproxy's own log")
    for name, help_text in (
        ("run", "run the ingress data plane"),
        ("demo", "start demo backends from the manifests, then edgeproxy"),
    ):
        p = sub.add_parser(name, help=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_source_options(p)
        p.add_argument("--http", type=host_port, metavar="HOST:PORT",
                       default=("127.0.0.1", 8080) if name == "demo" else None,
                       help="plain HTTP listener")
        p.add_argument("--https", type=host_port, metavar="HOST:PORT",
                       default=("127.0.0.1", 8443) if name == "demo" else None,
                       help="HTTPS listener (certificates from the Ingresses' TLS Secrets)")
        p.add_argument("--admin", type=host_port, metavar="HOST:PORT",
                       default=("127.0.0.1", 9901) if name == "demo" else None,
                       help="/healthz, /readyz, /metrics and /debug/* (debug views answer "
                            "loopback clients only, unless --debug-allow)")
        p.add_argument("--debug-allow", type=cidr_list, default=(), metavar="CIDR,...",
                       help="also answer /debug/* for clients in these networks (the views list "
                            "every host, backend and pod address)")
        p.add_argument("--workers", type=int, default=None,
                       help="processes serving traffic (default: the CPUs this process may use, "
                            "from its affinity and cgroup CPU quota)")
        p.add_argument("--default-certificate", metavar="NAMESPACE/NAME",
                       help="kubernetes.io/tls Secret for names no Ingress covers (default: a "
                            "self-signed one)")
        p.add_argument("--tls-min-version", choices=("1.2", "1.3"), default=Settings.tls_min_version,
                       help="lowest TLS version offered (1.0 and 1.1 never are, RFC 8996)")
        p.add_argument("--tls-max-version", choices=("1.2", "1.3"), default=Settings.tls_max_version,
                       help="highest TLS version offered")
        p.add_argument("--tls-session-resumption", choices=("on", "off"), default="on",
                       help="session tickets and the session cache (off: every handshake is full)")
        p.add_argument("--tls-ticket-key-secret", metavar="NAMESPACE/NAME",
                       help="Secret whose data tls.ticket-key (32+ random bytes) keys TLS session "
                            "tickets, so every replica resumes every other's sessions (default: "
                            "a random key shared by this pod's workers)")
        p.add_argument("--publish-address", metavar="IP|HOSTNAME",
                       help="write this address to Ingress status")
        p.add_argument("--publish-service", metavar="NAMESPACE/NAME",
                       help="a Service whose addresses go to Ingress status")
        p.add_argument("--publish-pods", metavar="LABEL=VALUE,...",
                       help="write the nodes of the pods matching this selector (in the "
                            "--lease-namespace) to Ingress status: a DaemonSet's every node")
        p.add_argument("--lease-namespace", default=os.environ.get("POD_NAMESPACE", "default"),
                       help="namespace of the Lease that elects the one status writer")
        p.add_argument("--connect-timeout", type=seconds, default=Settings.connect_timeout,
                       help="seconds to connect to an endpoint (then the next, or 504)")
        p.add_argument("--read-timeout", type=seconds, default=Settings.read_timeout,
                       help="seconds an upstream may stay silent (then 504)")
        p.add_argument("--client-header-timeout", type=seconds,
                       default=Settings.client_header_timeout,
                       help="seconds a client has to send a request head (then 408)")
        p.add_argument("--keepalive-timeout", type=seconds, default=Settings.keepalive_timeout,
                       help="seconds an idle client connection is kept")
        p.add_argument("--upstream-idle-timeout", type=seconds,
                       default=Settings.upstream_idle_timeout,
                       help="seconds an idle pooled upstream connection is kept")
        p.add_argument("--upstream-max-idle", type=int,
                       default=Settings.upstream_max_idle_per_endpoint,
                       help="idle pooled connections kept per endpoint (the pool follows demand "
                            "up to this; --upstream-idle-timeout shrinks it)")
        p.add_argument("--max-header-size", type=size, default=Settings.max_header_bytes,
                       help="bytes of request line and fields (431 beyond)")
        p.add_argument("--max-body-size", type=size, default=Settings.max_body_bytes,
                       help="413 beyond this many request body bytes; 0 = unlimited")
        p.add_argument("--max-request-line", type=size, default=Settings.max_request_line,
                       help="bytes of a request target (414 beyond)")
        p.add_argument("--max-header-line", type=size, default=Settings.max_header_line,
                       help="bytes of one header field line (431 beyond)")
        p.add_argument("--max-header-count", type=int, default=Settings.max_header_count,
                       help="header fields in a request (431 beyond)")
        p.add_argument("--client-body-timeout", type=seconds,
                       default=Settings.client_body_timeout,
                       help="seconds a request body may stay silent (then 408)")
        p.add_argument("--max-requests-per-connection", type=int,
                       default=Settings.max_requests_per_connection,
                       help="requests on one client connection; the last gets Connection: close; "
                            "0 = unlimited")
        p.add_argument("--max-connections", type=int, default=Settings.max_connections,
                       help="client connections per worker; at the limit accepting pauses")
        p.add_argument("--max-pipelined", type=int, default=Settings.max_pipelined,
                       help="parsed events of pipelined requests held; beyond, reading pauses")
        p.add_argument("--max-upstream-header-size", type=size,
                       default=Settings.max_upstream_header_bytes,
                       help="bytes of an upstream response head (502 beyond)")
        p.add_argument("--reload-interval", type=seconds, default=Settings.reload_interval,
                       help="seconds between checks of the manifest files for changes")
        p.add_argument("--trusted-proxies", type=cidr_list, default=(), metavar="CIDR,...",
                       help="peers whose X-Forwarded-For/-Proto are trusted")
        p.add_argument("--outlier-consecutive-failures", type=int,
                       default=OutlierSettings.consecutive_gateway_failures,
                       help="502/503/504s or connect failures in a row that eject an endpoint")
        p.add_argument("--outlier-base-ejection-time", type=seconds,
                       default=OutlierSettings.base_ejection_time,
                       help="seconds of the first ejection (times the ejection count after)")
        p.add_argument("--outlier-max-ejection-time", type=seconds,
                       default=OutlierSettings.max_ejection_time,
                       help="longest ejection, seconds")
        p.add_argument("--outlier-max-ejection-percent", type=float,
                       default=OutlierSettings.max_ejection_percent,
                       help="at most this share of a cluster's endpoints is ejected (at least one)")
        p.add_argument("--panic-threshold", type=float,
                       default=OutlierSettings.panic_threshold_percent,
                       help="below this percent of healthy endpoints, balance over all of them")
        p.add_argument("--shutdown-delay", type=seconds, default=5.0,
                       help="seconds to keep accepting after SIGTERM, with /readyz 503 (time for "
                            "EndpointSlices, kube-proxy and load balancers to drop the pod)")
        p.add_argument("--drain-timeout", type=seconds, default=30.0,
                       help="then, seconds requests and tunnels in flight get to finish")
        p.add_argument("--handover-socket", type=Path, metavar="PATH",
                       help="Unix socket through which a new edgeproxy on the same ports takes "
                            "this one's listening sockets (and this one takes its predecessor's)")
        p.add_argument("--access-log", default=Settings.access_log, metavar="off|-|PATH",
                       help="one JSON line per request: - for stdout, off, or a file to append to")
        p.add_argument("--access-log-buffer", type=size, default=Settings.access_log_buffer,
                       help="bytes of access log held while its reader is slow; lines beyond "
                            "are dropped and counted, traffic never waits")
        p.add_argument("--log-level", default="info",
                       choices=("debug", "info", "warning", "error"), help="edgeproxy's own log")
    return parser


def check_sources(args: argparse.Namespace) -> str | None:
    """What is wrong with where objects come from, in one line; None if nothing."""
    if not args.manifests and not (args.kubeconfig or args.in_cluster):
        return "give --manifests PATH, --kubeconfig FILE or --in-cluster"
    if getattr(args, "tls_min_version", "1.2") > getattr(args, "tls_max_version", "1.3"):
        return f"--tls-min-version {args.tls_min_version} is above --tls-max-version {args.tls_max_version}"
    for path in args.manifests:
        if not path.exists():
            return f"--manifests {path}: no such file or directory"
    if args.kubeconfig is not None and not args.kubeconfig.is_file():
        return f"--kubeconfig {args.kubeconfig}: no such file"
    if args.in_cluster:
        token = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
        if not os.environ.get("KUBERNETES_SERVICE_HOST") or not token.is_file():
            return ("--in-cluster: not running in a Kubernetes pod (no KUBERNETES_SERVICE_HOST or "
                    f"no {token})")  # fmt: skip
    from edgeproxy.balancing import load_balancers

    known = load_balancers()
    if args.default_balancer not in known:
        return f"--default-balancer {args.default_balancer!r}: unknown (known: {', '.join(sorted(known))})"
    return None


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(
        connect_timeout=args.connect_timeout,
        read_timeout=args.read_timeout,
        client_header_timeout=args.client_header_timeout,
        keepalive_timeout=args.keepalive_timeout,
        upstream_idle_timeout=args.upstream_idle_timeout,
        upstream_max_idle_per_endpoint=args.upstream_max_idle,
        max_header_bytes=args.max_header_size,
        max_body_bytes=args.max_body_size,
        max_request_line=args.max_request_line,
        max_header_line=args.max_header_line,
        max_header_count=args.max_header_count,
        client_body_timeout=args.client_body_timeout,
        max_requests_per_connection=args.max_requests_per_connection,
        max_connections=args.max_connections,
        max_pipelined=args.max_pipelined,
        max_upstream_header_bytes=args.max_upstream_header_size,
        tls_min_version=args.tls_min_version,
        tls_max_version=args.tls_max_version,
        tls_session_resumption=args.tls_session_resumption == "on",
        reload_interval=args.reload_interval,
        trusted_proxies=args.trusted_proxies,
        default_balancer=args.default_balancer,
        access_log=args.access_log,
        access_log_buffer=args.access_log_buffer,
        outlier=OutlierSettings(
            consecutive_gateway_failures=args.outlier_consecutive_failures,
            base_ejection_time=args.outlier_base_ejection_time,
            max_ejection_time=args.outlier_max_ejection_time,
            max_ejection_percent=args.outlier_max_ejection_percent,
            panic_threshold_percent=args.panic_threshold,
        ),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "demo" and not args.manifests and not (args.kubeconfig or args.in_cluster):
        if Path("config").is_dir():
            args.manifests = [Path("config")]
    problem = check_sources(args)
    if problem is not None:
        log.error("%s", problem)
        return 2
    if args.command == "routes":
        from edgeproxy.explain import main as routes_main

        return routes_main(args)
    if args.workers is not None and args.workers < 1:
        log.error("--workers must be at least 1")
        return 2
    if args.http is None and args.https is None:
        log.error("give --http HOST:PORT and/or --https HOST:PORT")
        return 2
    given = [a for a in (args.http, args.https, args.admin) if a is not None]
    if len({port for _, port in given}) < len(given):
        # Listeners bind with SO_REUSEPORT (workers, replacements): two of ours on one port
        # would share it silently instead of failing.
        log.error("--http, --https and --admin need different ports")
        return 2
    settings = settings_from(args)

    from edgeproxy.supervisor import run  # imported late: argument errors stay fast

    if args.command == "demo":
        from edgeproxy.demo import demo_pods

        pods = demo_pods(args.manifests)
        if pods and os.fork() == 0:
            _run_demo_pods(args.manifests)
            os._exit(0)
        _print_demo_help(args)
    return run(args, settings)


def _run_demo_pods(paths: list[Path]) -> None:
    from edgeproxy.demo import serve_pods_forever

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: die with edgeproxy
    except (OSError, AttributeError):
        pass
    asyncio.run(serve_pods_forever(paths))


def _print_demo_help(args: argparse.Namespace) -> None:
    host, port = args.http
    print(
        f"\nedgeproxy demo: routes from {', '.join(map(str, args.manifests))}\n"
        f"  curl -s -H 'Host: shop.example.com' http://{host}:{port}/\n"
        f"  curl -s -H 'Host: shop.example.com' http://{host}:{port}/api/items\n"
        f"  curl -s http://{host}:{args.admin[1]}/debug/routes\n",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())

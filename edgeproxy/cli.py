"""Command line: parse arguments, build the pieces, run the loop.

    edgeproxy run --manifests PATH [...] --http HOST:PORT [--https HOST:PORT] --admin HOST:PORT
                  [--ingress-class NAME] [--workers N] [--shutdown-delay S] [--drain-timeout S]
    edgeproxy demo   (demo backends from config/ plus edgeproxy, all on loopback)
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

from edgeproxy.config import OutlierSettings, Settings

log = logging.getLogger("edgeproxy")



def host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def cidr_list(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    try:
        return tuple(ipaddress.ip_network(c.strip(), strict=False) for c in text.split(",") if c)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def size(text: str) -> int:
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    text = text.strip().lower()
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeproxy", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "run the ingress data plane"),
        ("demo", "start demo backends from the manifests, then edgeproxy"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--manifests", action="append", type=Path, default=[],
                       help="YAML/JSON file or directory of Kubernetes objects (repeatable)")
        p.add_argument("--http", type=host_port,
                       default=("127.0.0.1", 8080) if name == "demo" else None)
        p.add_argument("--https", type=host_port,
                       default=("127.0.0.1", 8443) if name == "demo" else None)
        p.add_argument("--admin", type=host_port,
                       default=("127.0.0.1", 9901) if name == "demo" else None)
        p.add_argument("--ingress-class", help="serve only this IngressClass")
        p.add_argument("--workers", type=int, default=None,
                       help="processes serving traffic (default: the CPUs this process may use, "
                            "from its affinity and cgroup CPU quota)")
        p.add_argument("--kubeconfig", type=Path, help="watch the API server of this kubeconfig")
        p.add_argument("--in-cluster", action="store_true",
                       help="watch the API server with the pod's service account")
        p.add_argument("--watch-namespace", action="append", default=[],
                       help="namespace to watch (repeatable; default all)")
        p.add_argument("--default-certificate", help="NAMESPACE/NAME of a kubernetes.io/tls Secret")
        p.add_argument("--publish-address", help="write this IP or hostname to Ingress status")
        p.add_argument("--publish-service",
                       help="NAMESPACE/NAME of a Service whose addresses go to Ingress status")
        p.add_argument("--lease-namespace", default=os.environ.get("POD_NAMESPACE", "default"),
                       help="namespace of the Lease that elects the one status writer")
        p.add_argument("--connect-timeout", type=float, default=Settings.connect_timeout)
        p.add_argument("--read-timeout", type=float, default=Settings.read_timeout)
        p.add_argument("--client-header-timeout", type=float,
                       default=Settings.client_header_timeout)
        p.add_argument("--keepalive-timeout", type=float, default=Settings.keepalive_timeout)
        p.add_argument("--upstream-idle-timeout", type=float,
                       default=Settings.upstream_idle_timeout)
        p.add_argument("--max-header-size", type=size, default=Settings.max_header_bytes)
        p.add_argument("--max-body-size", type=size, default=Settings.max_body_bytes,
                       help="413 beyond this many request body bytes; 0 = unlimited")
        p.add_argument("--reload-interval", type=float, default=Settings.reload_interval)
        p.add_argument("--trusted-proxies", type=cidr_list, default=(),
                       help="CIDR,... whose X-Forwarded-For/-Proto are trusted")
        p.add_argument("--default-balancer", default=Settings.default_balancer)
        p.add_argument("--outlier-consecutive-failures", type=int,
                       default=OutlierSettings.consecutive_gateway_failures)
        p.add_argument("--outlier-base-ejection-time", type=float,
                       default=OutlierSettings.base_ejection_time)
        p.add_argument("--outlier-max-ejection-time", type=float,
                       default=OutlierSettings.max_ejection_time)
        p.add_argument("--outlier-max-ejection-percent", type=float,
                       default=OutlierSettings.max_ejection_percent)
        p.add_argument("--panic-threshold", type=float,
                       default=OutlierSettings.panic_threshold_percent)
        p.add_argument("--shutdown-delay", type=float, default=5.0,
                       help="seconds to keep accepting after SIGTERM, with /readyz 503 (time for "
                            "EndpointSlices, kube-proxy and load balancers to drop the pod)")
        p.add_argument("--drain-timeout", type=float, default=30.0,
                       help="then, seconds requests and tunnels in flight get to finish")
        p.add_argument("--handover-socket", type=Path,
                       help="Unix socket through which a new edgeproxy on the same ports takes "
                            "this one's listening sockets (and this one takes its predecessor's)")
        p.add_argument("--access-log", default=Settings.access_log, metavar="off|-|PATH",
                       help="one JSON line per request: - for stdout, off, or a file to append to "
                            "(default: %(default)s)")
        p.add_argument("--access-log-buffer", type=size, default=Settings.access_log_buffer,
                       help="bytes of access log held while its reader is slow; lines beyond "
                            "are dropped and counted, traffic never waits (default: 4m)")
        p.add_argument("--log-level", default="info")
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(
        connect_timeout=args.connect_timeout,
        read_timeout=args.read_timeout,
        client_header_timeout=args.client_header_timeout,
        keepalive_timeout=args.keepalive_timeout,
        upstream_idle_timeout=args.upstream_idle_timeout,
        max_header_bytes=args.max_header_size,
        max_body_bytes=args.max_body_size,
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
    if not args.manifests and not (args.kubeconfig or args.in_cluster):
        default = Path("config")
        if args.command == "demo" and default.is_dir():
            args.manifests = [default]
        else:
            log.error("give --manifests PATH, --kubeconfig FILE or --in-cluster")
            return 2
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

"""Typed settings and their defaults.

Defaults follow nginx where a user would compare the two (timeouts, header and body limits)
and Envoy for outlier detection.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

CONTROLLER_NAME = "edgeproxy.io/ingress-controller"
SERVER_NAME = "edgeproxy"
# Client connections per worker, and the upstream pool's default idle bound (see Settings).
MAX_CONNECTIONS = 16384


@dataclass(frozen=True)
class OutlierSettings:
    """Envoy's outlier-detection defaults (outlier.rst)."""

    consecutive_gateway_failures: int = 5
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: float = 10.0
    panic_threshold_percent: float = 50.0


@dataclass(frozen=True)
class Settings:
    # Upstream timeouts (nginx proxy_connect_timeout / proxy_read_timeout).
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    # Downstream: a client that started a request must finish its header section in this time
    # (nginx client_header_timeout); an idle keep-alive connection is closed after keepalive_timeout.
    client_header_timeout: float = 60.0
    keepalive_timeout: float = 75.0
    # Idle pooled upstream connections are closed after this (shorter than common backends'
    # keep-alive timeouts, so we rarely reuse a connection the backend is about to close).
    upstream_idle_timeout: float = 30.0
    # Idle connections kept per endpoint (and transport profile): the pool follows demand (a
    # burst's connections stay for the next one) up to this bound, and the idle timeout above
    # shrinks it when demand falls. Idle ones were all in use at once, so demand bounds them
    # anyway; the default is max_connections (HAProxy keeps every idle one, pool-max-conn -1).
    # At 1024, wrk -c5000 reopened thousands of upstream connections per run, and under a
    # saturated loop each connect waited 0.3-1.6 s: p99 1.6-2 s and requests over 2 s.
    upstream_max_idle_per_endpoint: int = MAX_CONNECTIONS
    # nginx large_client_header_buffers is 4 x 8k; 32 KiB of header section -> 431 beyond.
    max_header_bytes: int = 32 * 1024
    # One line must fit one of nginx's 8k buffers: a longer request line is 414, a longer
    # field line 431. Envoy and HAProxy count fields: 100 (max_headers_count, tune.http.maxhdr 101).
    max_request_line: int = 8 * 1024
    max_header_line: int = 8 * 1024
    max_header_count: int = 100
    # A request body silent this long is 408 (nginx client_body_timeout).
    client_body_timeout: float = 60.0
    # Requests on one client connection; the last one's response carries Connection: close
    # (nginx keepalive_requests 1000).
    max_requests_per_connection: int = 1000
    # Client connections per worker; at the limit the worker stops accepting until it is under
    # 90% of it (nginx worker_connections, HAProxy maxconn). Others wait in the accept queue.
    max_connections: int = MAX_CONNECTIONS
    # Parsed events of pipelined requests (a head, a body piece, an end) held while one is in
    # flight; beyond, reading pauses.
    max_pipelined: int = 64
    # TLS protocol versions offered, and session resumption (tickets and the session cache).
    tls_min_version: str = "1.2"
    tls_max_version: str = "1.3"
    tls_session_resumption: bool = True
    # An upstream response head larger than this is 502 (Envoy 60 KiB; nginx proxy_buffer_size 4k/8k).
    max_upstream_header_bytes: int = 64 * 1024
    # nginx client_max_body_size defaults to 1m, which surprises users; 0 = unlimited.
    max_body_bytes: int = 100 * 1024 * 1024
    # Manifest files are re-read when their mtime changes; checked this often.
    reload_interval: float = 1.0
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    outlier: OutlierSettings = field(default_factory=OutlierSettings)
    default_balancer: str = "round_robin"
    # One JSON line per request: "-" is stdout, "off" none, else a file (appended to).
    access_log: str = "-"
    access_log_buffer: int = 4 * 1024 * 1024  # bytes held for a slow reader; beyond, lines drop

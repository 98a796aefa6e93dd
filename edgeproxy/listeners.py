"""Listening sockets: made by the supervisor, shared by its workers, handed to the next edgeproxy.

Each data listener is a SO_REUSEPORT group of one socket per worker slot, so the kernel spreads
new connections over the workers. The supervisor keeps every socket open: a worker that dies
leaves its socket's accept queue intact for its replacement, and only the connections that
worker had accepted are lost.

Replacing edgeproxy on the same ports (a DaemonSet update with maxSurge on a host-network
node) uses a handover socket, as HAProxy's seamless reload does: the new process connects to
the old one's Unix socket (--handover-socket, on a hostPath both pods mount) and receives its
listening sockets (SCM_RIGHTS). Both serve the same accept queues while they overlap; when the
old one stops, the queues live on in the new process, so nothing queued is reset. Without a
handover socket the new process binds its own sockets into the same SO_REUSEPORT group; then
what the old listeners had queued when they close is migrated to the new ones only where the
kernel has net.ipv4.tcp_migrate_req=1 (Linux 5.14+), and is reset elsewhere.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("edgeproxy.listeners")

# The accept queue: the kernel takes min(this, net.core.somaxconn), so the node's setting
# decides (ingress-nginx sets its backlog to somaxconn). A fixed 4096 dropped SYNs of a burst
# of 5,000 connections on a node tuned higher (each costs the client a 1 s SYN retry).
BACKLOG = 65535
HANDOVER_TIMEOUT_S = 2.0
MAX_HANDED_FDS = 250  # SCM_RIGHTS carries at most 253 descriptors per message


@dataclass
class Listener:
    scheme: str  # "http" or "https"
    host: str
    port: int
    sockets: list[socket.socket] = field(default_factory=list)

    def for_slot(self, slot: int, slots: int) -> list[socket.socket]:
        """The sockets worker `slot` of `slots` accepts on (several when more were handed over
        than there are workers, so no handed-over queue is left unserved)."""
        return [s for i, s in enumerate(self.sockets) if i % slots == slot]


def bind_socket(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"{host}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def open_listeners(wanted: list[tuple[str, str, int]], slots: int,
                   inherited: dict[tuple[str, int], list[socket.socket]]) -> list[Listener]:  # fmt: skip
    """One Listener per (scheme, host, port): the inherited sockets first, then new ones up to
    one per slot."""
    listeners = []
    for scheme, host, port in wanted:
        listener = Listener(scheme, host, port, inherited.pop((host, port), []))
        shared = not listener.sockets and in_use(host, port)
        while len(listener.sockets) < slots:
            listener.sockets.append(bind_socket(host, port))  # raises if it is not ours to share
        if shared:
            log.warning("%s:%d is already listened on (SO_REUSEPORT): sharing it, as a replacement "
                        "without --handover-socket does; new connections are split between both",
                        host, port)  # fmt: skip
        listeners.append(listener)
    for (host, port), socks in inherited.items():  # handed over but no longer wanted
        log.warning("handed-over listener %s:%d is not configured here; closed", host, port)
        for sock in socks:
            sock.close()
    return listeners


def in_use(host: str, port: int) -> bool:
    """Whether something already listens on host:port (a bind without SO_REUSEPORT fails)."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def migrate_req_enabled() -> bool | None:
    try:
        return Path("/proc/sys/net/ipv4/tcp_migrate_req").read_text().strip() == "1"
    except OSError:
        return None


def take_over(path: Path) -> dict[tuple[str, int], list[socket.socket]]:
    """The listening sockets of the edgeproxy serving the handover socket at `path`, if any."""
    if not path.exists():
        return {}
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(HANDOVER_TIMEOUT_S)
    try:
        client.connect(str(path))
        message, fds, _, _ = socket.recv_fds(client, 1 << 16, MAX_HANDED_FDS)
    except OSError as exc:
        log.info("handover socket %s: no edgeproxy answers (%s); binding new listeners",
                 path, exc)  # fmt: skip
        return {}
    finally:
        client.close()
    inherited: dict[tuple[str, int], list[socket.socket]] = {}
    try:
        described = json.loads(message)
    except ValueError:
        described = []
    if len(described) != len(fds):
        for fd in fds:
            os.close(fd)
        log.warning("handover socket %s: malformed answer; binding new listeners", path)
        return {}
    for (host, port), fd in zip(described, fds, strict=True):
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        inherited.setdefault((host, port), []).append(sock)
    log.info("took over %d listening sockets from the edgeproxy at %s", len(fds), path)
    return inherited


class HandoverServer:
    """Hands this process's listening sockets to whoever connects (the next edgeproxy)."""

    def __init__(self, path: Path, listeners: list[Listener]) -> None:
        self.path = path
        self.listeners = listeners
        self.sock: socket.socket | None = None
        self.inode = 0

    def start(self) -> socket.socket:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.path.unlink()  # the previous owner's; it keeps its own open descriptor
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # only this user may take the listeners
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        sock.listen(8)
        sock.setblocking(False)
        self.sock = sock
        self.inode = self.path.stat().st_ino
        return sock

    def serve_one(self) -> None:
        """Called when the handover socket is readable: answer one taker."""
        assert self.sock is not None
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        with conn:
            conn.settimeout(HANDOVER_TIMEOUT_S)
            described, fds = [], []
            for listener in self.listeners:
                for sock in listener.sockets:
                    described.append([listener.host, listener.port])
                    fds.append(sock.fileno())
            try:
                socket.send_fds(conn, [json.dumps(described[:MAX_HANDED_FDS]).encode()],
                                fds[:MAX_HANDED_FDS])  # fmt: skip
                log.info("handed %d listening sockets to a new edgeproxy", len(fds))
            except OSError as exc:
                log.warning("handover failed: %s", exc)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            # Remove the path only if it is still ours (a successor binds its own there).
            try:
                if self.path.stat().st_ino == self.inode:
                    self.path.unlink()
            except OSError:
                pass

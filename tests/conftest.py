"""Fixtures: edgeproxy as a real process on free loopback ports, fed from manifests in tmp_path."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests import k8s
from tests.apiserver import FakeApiServer
from tests.backends import Pods
from tests.http1 import fetch

READY_TIMEOUT = 15.0
ROOT = Path(__file__).resolve().parent.parent


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, never the same twice in this process (edgeproxy binds with
    SO_REUSEPORT, so two of its listeners given one port would share it instead of failing)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


class EdgeProxy:
    """`edgeproxy run` in a subprocess, exactly as a user starts it."""

    def __init__(self, manifests: Path | None, log: Path) -> None:
        self.manifests = manifests
        self.log_path = log
        self.http = free_port()
        self.https = free_port()
        self.admin = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, *extra: str, https: bool = False, pythonpath: str | None = None,
                    wait_ready: bool = True, stdout: Any = None) -> EdgeProxy:  # fmt: skip
        """`stdout`: where the access log goes (default: the log file, with stderr)."""
        source = ["--manifests", str(self.manifests)] if self.manifests else []
        argv = [sys.executable, "-m", "edgeproxy.cli", "run", *source,
                "--http", f"127.0.0.1:{self.http}", "--admin", f"127.0.0.1:{self.admin}",
                "--reload-interval", "0.1", "--shutdown-delay", "0", *extra]  # fmt: skip
        if https:
            argv += ["--https", f"127.0.0.1:{self.https}"]
        self._log = open(self.log_path, "ab")
        env = dict(os.environ)
        if pythonpath:
            env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(argv, stdout=self._log if stdout is None else stdout,
                                     stderr=self._log, cwd=ROOT, env=env)  # fmt: skip
        deadline = time.monotonic() + READY_TIMEOUT
        while wait_ready and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"edgeproxy exited: {self.log()}")
            try:
                if (await fetch(self.admin, "GET", "/readyz")).status == 200:
                    return self
            except (TimeoutError, OSError, ConnectionError):
                pass
            await asyncio.sleep(0.05)
        if not wait_ready:
            return self
        raise RuntimeError(f"edgeproxy not ready: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_kib(self, field: str = "VmHWM") -> int:
        """`field` of /proc/PID/status, summed over the supervisor and its workers (the data
        plane's memory is in the workers)."""
        assert self.proc is not None
        total = 0
        for pid in [self.proc.pid, *self._children(self.proc.pid)]:
            try:
                lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            except FileNotFoundError:
                continue  # a worker that has just exited
            total += next(int(line.split()[1]) for line in lines if line.startswith(field + ":"))
        return total

    @staticmethod
    def _children(pid: int) -> list[int]:
        try:
            return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except FileNotFoundError:
            return []

    async def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            for _ in range(100):
                if self.proc.poll() is not None:
                    break
                await asyncio.sleep(0.05)
            else:
                self.proc.kill()
        self._log.close()


@pytest.fixture
async def pods() -> AsyncIterator[Pods]:
    p = Pods()
    yield p
    await p.close()


@pytest.fixture
def manifests(tmp_path: Path) -> Path:
    return tmp_path / "manifests"


@pytest.fixture
async def proxy_factory(tmp_path: Path, manifests: Path) -> AsyncIterator[Any]:
    started: list[EdgeProxy] = []

    async def start(objects: list[dict[str, Any]], *extra: str, https: bool = False,
                    pythonpath: str | None = None, stdout: Any = None) -> EdgeProxy:  # fmt: skip
        k8s.write(manifests, objects)
        proxy = EdgeProxy(manifests, tmp_path / f"edgeproxy-{len(started)}.log")
        started.append(proxy)
        return await proxy.start(*extra, https=https, pythonpath=pythonpath, stdout=stdout)

    yield start
    for proxy in started:
        await proxy.stop()


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    """The Kubernetes API server emulator (tests/apiserver.py), serving list and watch."""
    server = FakeApiServer(bookmark_interval=0.3)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def kube_proxy(tmp_path: Path, api: FakeApiServer) -> AsyncIterator[Any]:
    started: list[EdgeProxy] = []

    async def start(*extra: str, wait_ready: bool = True, https: bool = False) -> EdgeProxy:
        kubeconfig = tmp_path / "kubeconfig.yaml"
        kubeconfig.write_text(api.kubeconfig())
        proxy = EdgeProxy(None, tmp_path / f"edgeproxy-{len(started)}.log")
        started.append(proxy)
        return await proxy.start("--kubeconfig", str(kubeconfig), *extra, wait_ready=wait_ready,
                                 https=https)  # fmt: skip

    yield start
    for proxy in started:
        await proxy.stop()


async def eventually(check: Any, timeout: float = 5.0, what: str = "the condition") -> None:
    """Wait until `await check()` is true: polled on the loop, bounded by `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"{what} never held within {timeout} s")
        await asyncio.sleep(0.02)


def simple_site(port: int, *addresses: str, service: str = "web") -> list[dict[str, Any]]:
    """One class, one catch-all Ingress, one Service whose pods are `addresses`."""
    return [
        k8s.ingress_class(),
        k8s.ingress("site", [(None, [k8s.path("/", service)])]),
        k8s.service(service),
        k8s.endpoint_slice(service, k8s.ready(*addresses), port),
    ]


if "PYTHONPATH" not in os.environ:  # the subprocess imports edgeproxy from this checkout
    os.environ["PYTHONPATH"] = str(ROOT)

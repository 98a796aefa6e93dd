"""Steady client traffic for lifecycle tests: clients sending requests back to back over real
sockets, counting what a user would call a failure.

A failure is a refused or reset connection, a connection closed before its response, or a
status other than the expected one. A response with Connection: close is not a failure: the
client opens a new connection for its next request, as any HTTP client does.
"""

from __future__ import annotations

import asyncio
import time

from tests.http1 import Client

REQUEST_TIMEOUT_S = 10.0


class Traffic:
    def __init__(self, port: int, *, clients: int = 8, host: str = "site.example.com",
                 path: str = "/", new_connections: int = 0, expect: int = 200) -> None:  # fmt: skip
        self.port = port
        self.clients = clients
        self.new_connections = new_connections  # clients opening a connection per request
        self.host = host
        self.path = path
        self.expect = expect
        self.ok = 0
        self.failures: list[tuple[float, str]] = []  # (time.time(), what)
        self.request_ids: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> Traffic:
        for _ in range(self.clients):
            self._tasks.append(asyncio.create_task(self._client(keep_alive=True)))
        for _ in range(self.new_connections):
            self._tasks.append(asyncio.create_task(self._client(keep_alive=False)))
        return self

    async def answered(self, count: int, timeout: float = 10.0) -> None:
        """Wait until `count` more requests were answered."""
        target = self.ok + count
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.ok < target:
            if loop.time() > deadline:
                raise AssertionError(f"only {self.ok} answered, failures: {self.failures[-3:]}")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def failed_before(self, moment: float) -> list[tuple[float, str]]:
        return [f for f in self.failures if f[0] < moment]

    async def _client(self, keep_alive: bool) -> None:
        client: Client | None = None
        while not self._stop.is_set():
            try:
                if client is None:
                    client = await Client.connect(self.port)
                headers = [] if keep_alive else [("Connection", "close")]
                resp = await asyncio.wait_for(
                    client.request("GET", self.path, host=self.host, headers=headers),
                    REQUEST_TIMEOUT_S)  # fmt: skip
                if resp.status != self.expect:
                    self.failures.append((time.time(), f"status {resp.status}"))
                else:
                    self.ok += 1
                if not keep_alive or (resp.header("connection") or "").lower() == "close":
                    await client.close()
                    client = None
            except (OSError, ConnectionError, TimeoutError, asyncio.IncompleteReadError) as exc:
                self.failures.append((time.time(), f"{type(exc).__name__}: {exc}"))
                if client is not None:
                    await client.close()
                client = None
                await asyncio.sleep(0.01)  # a refused connect does not spin
        if client is not None:
            await client.close()

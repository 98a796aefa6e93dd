"""Backend "pods": real HTTP/1.1 servers on loopback addresses, with behaviours chosen by path.

    /anything            JSON echo: pod, method, target, headers, body length
    /slow/<ms>           answer after a delay
    /chunked             chunked response (three chunks)
    /until-close         no Content-Length, no chunking: the body ends when the connection does
    /big/<bytes>         a body of that size, written with backpressure
    /status/<code>       that status, with an empty body (and Content-Length: 0 where allowed)
    /reset               close the connection without answering
    /upgrade             101 Switching Protocols, then echo every byte back
    /head-length         Content-Length: 1234 on HEAD too
POST/PUT bodies are read (counted, hashed) and reported in the echo.
"""

from __future__ import annotations

import asyncio
import hashlib
import json

from tests.http1 import Message, read_body, read_head

BIG_CHUNK = b"x" * 65536


class Pods:
    def __init__(self) -> None:
        self.servers: list[asyncio.AbstractServer] = []
        self.connections: dict[str, int] = {}
        self.requests: list[tuple[str, Message]] = []
        self.port = 0
        self.fail_with: dict[str, int] = {}  # address -> status for every request (0: reset)
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle: dict[asyncio.Task[None], str] = {}  # connections waiting for a request
        self.stopping: set[str] = set()

    async def start(self, *addresses: str, port: int = 0) -> int:
        for address in addresses:
            server = await asyncio.start_server(
                lambda r, w, a=address: self._serve(a, r, w), address, port or self.port or 0,
                reuse_address=True, limit=1 << 20,
            )  # fmt: skip
            self.port = server.sockets[0].getsockname()[1]
            self.servers.append(server)
        return self.port

    def hits(self, address: str) -> int:
        return sum(1 for a, _ in self.requests if a == address)

    async def stop_address(self, address: str) -> None:
        """As a pod that got SIGTERM: stop accepting, finish the requests in flight, close the
        idle keep-alive connections (and each busy one after its response)."""
        self.stopping.add(address)
        for server in list(self.servers):
            if server.sockets and server.sockets[0].getsockname()[0] == address:
                server.close()
                self.servers.remove(server)
        for task, where in list(self._idle.items()):
            if where == address:
                task.cancel()

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        self.servers.clear()

    async def _serve(self, address: str, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:  # fmt: skip
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections[address] = self.connections.get(address, 0) + 1
        try:
            while address not in self.stopping:
                self._idle[task] = address
                try:
                    msg = await read_head(reader)
                finally:
                    self._idle.pop(task, None)
                if msg is None:
                    break
                self.requests.append((address, msg))
                if (msg.header("expect") or "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                count = [0]
                digest = hashlib.sha256()
                if msg.header("content-length") or msg.header("transfer-encoding"):
                    body = await read_body(reader, msg, request=True)
                    count[0] = len(body)
                    digest.update(body)
                msg.extra["body_len"] = count[0]
                keep = await self._respond(address, msg, count[0], digest.hexdigest(), reader, writer)
                if not keep:
                    break
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, ValueError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _respond(self, address: str, msg: Message, body_len: int, sha: str,
                       reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:  # fmt: skip
        target = msg.target
        method = msg.method
        if address in self.fail_with:
            status = self.fail_with[address]
            if status == 0:  # reset without answering
                writer.transport.abort()
                return False
            writer.write(b"HTTP/1.1 %d Failing\r\nContent-Length: 0\r\n\r\n" % status)
            await writer.drain()
            return True
        if target.startswith("/slow/"):
            await asyncio.sleep(int(target.split("/")[2]) / 1000)
        if target == "/reset":
            writer.transport.abort()
            return False
        if target == "/chunked" and msg.start.endswith("HTTP/1.0"):
            writer.write(b"HTTP/1.0 200 OK\r\n\r\nhello world")  # no chunking for 1.0 (RFC 9112 7)
            await writer.drain()
            return False
        if target == "/chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"5\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n")  # fmt: skip
            await writer.drain()
            return True
        if target == "/until-close":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close body")
            await writer.drain()
            return False
        if target.startswith("/big/"):
            size = int(target.split("/")[2])
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            sent = 0
            while sent < size:
                piece = BIG_CHUNK[: min(len(BIG_CHUNK), size - sent)]
                writer.write(piece)
                sent += len(piece)
                await writer.drain()
            return True
        if target.startswith("/status/"):
            status = int(target.split("/")[2])
            length = b"" if status in (204, 304) else b"Content-Length: 0\r\n"
            writer.write(b"HTTP/1.1 %d Whatever\r\n%sX-Pod: %s\r\n\r\n" % (status, length, address.encode()))  # fmt: skip
            await writer.drain()
            return True
        if target == "/early-hints":
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                         b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal")  # fmt: skip
            await writer.drain()
            return True
        if target == "/close":
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 6\r\n\r\nclosed")
            await writer.drain()
            return False
        if target == "/garbage":
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")
            await writer.drain()
            return False
        if target == "/head-length":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
            if method != "HEAD":
                writer.write(b"y" * 1234)
            await writer.drain()
            return True
        if target == "/upgrade":
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                         b"Upgrade: " + (msg.header("upgrade") or "").encode() + b"\r\n\r\n")  # fmt: skip
            await writer.drain()
            while True:
                data = await reader.read(65536)
                if not data:
                    return False
                writer.write(data)
                await writer.drain()
        body = json.dumps({
            "pod": address, "method": method, "target": target,
            "headers": [[k, v] for k, v in msg.headers], "body_len": body_len, "sha256": sha,
        }).encode()  # fmt: skip
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % len(body)  # fmt: skip
        keep = (msg.header("connection") or "").lower() != "close"
        if not keep:
            head += b"Connection: close\r\n"
        writer.write(head + b"\r\n" + (b"" if method == "HEAD" else body))
        await writer.drain()
        return keep

"""A small, independent HTTP/1.1 implementation for the tests' clients and backends.

Deliberately not httptools: the proxy's parser should not grade its own homework.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

IO_TIMEOUT = 10.0


@dataclass
class Message:
    start: str  # request line or status line
    headers: list[tuple[str, str]]
    body: bytes = b""
    raw_head: bytes = b""
    extra: dict[str, object] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    @property
    def status(self) -> int:
        return int(self.start.split(" ")[1])

    @property
    def method(self) -> str:
        return self.start.split(" ")[0]

    @property
    def target(self) -> str:
        return self.start.split(" ")[1]


async def read_head(reader: asyncio.StreamReader) -> Message | None:
    lines: list[bytes] = []
    while True:
        line = await asyncio.wait_for(reader.readline(), IO_TIMEOUT)
        if not line:
            if lines:
                raise ConnectionError("stream ended inside a head")
            return None
        if line in (b"\r\n", b"\n"):
            if lines:
                break
            continue
        lines.append(line)
    start = lines[0].decode("latin-1").rstrip("\r\n")
    headers = []
    for raw in lines[1:]:
        name, _, value = raw.decode("latin-1").rstrip("\r\n").partition(":")
        headers.append((name, value.strip()))
    return Message(start, headers, raw_head=b"".join(lines))


async def read_body(
    reader: asyncio.StreamReader, msg: Message, *, request: bool, no_body: bool = False,
    sink: list[int] | None = None,
) -> bytes:
    """Body by RFC 9112 6.3 precedence; with `sink`, count bytes instead of keeping them."""
    if no_body:
        return b""
    chunks: list[bytes] = []

    def take(data: bytes) -> None:
        if sink is not None:
            sink[0] += len(data)
        else:
            chunks.append(data)

    async def take_exactly(remaining: int, inside: str) -> None:
        while remaining:
            data = await asyncio.wait_for(reader.read(min(remaining, 1 << 16)), IO_TIMEOUT)
            if not data:
                raise ConnectionError(f"stream ended inside {inside}")
            take(data)
            remaining -= len(data)

    te = (msg.header("transfer-encoding") or "").lower()
    if te.endswith("chunked"):
        while True:
            size_line = await asyncio.wait_for(reader.readline(), IO_TIMEOUT)
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while (await asyncio.wait_for(reader.readline(), IO_TIMEOUT)) not in (b"\r\n", b""):
                    pass
                break
            await take_exactly(size, "a chunk")
            await asyncio.wait_for(reader.readexactly(2), IO_TIMEOUT)
    elif msg.header("content-length") is not None:
        await take_exactly(int(msg.header("content-length") or 0), "a body")
    elif not request:
        while True:
            data = await asyncio.wait_for(reader.read(1 << 16), IO_TIMEOUT)
            if not data:
                break
            take(data)
    return b"".join(chunks)


class Client:
    """One keep-alive client connection over a real socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> Client:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=1 << 20), IO_TIMEOUT
        )
        return cls(reader, writer)

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def request(
        self, method: str, target: str, *, host: str | None = "example.com",
        headers: list[tuple[str, str]] | None = None, body: bytes | None = None,
        version: str = "HTTP/1.1",
    ) -> Message:
        lines = [f"{method} {target} {version}"]
        if host is not None:
            lines.append(f"Host: {host}")
        for k, v in headers or []:
            lines.append(f"{k}: {v}")
        if body is not None and not any(k.lower() in ("content-length", "transfer-encoding")
                                        for k, _ in headers or []):  # fmt: skip
            lines.append(f"Content-Length: {len(body)}")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
        await self.send_raw(data)
        return await self.response(method)

    async def response(self, method: str = "GET") -> Message:
        while True:
            msg = await read_head(self.reader)
            if msg is None:
                raise ConnectionError("connection closed before a response")
            if 100 <= msg.status < 200 and msg.status != 101:
                continue
            break
        no_body = method == "HEAD" or msg.status in (204, 304) or msg.status == 101
        msg.body = await read_body(self.reader, msg, request=False, no_body=no_body)
        return msg

    async def closed_by_peer(self, timeout: float = 5.0) -> bool:
        try:
            data = await asyncio.wait_for(self.reader.read(1), timeout)
        except (TimeoutError, ConnectionError):
            return False
        return data == b""

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        except (TimeoutError, ConnectionError):
            pass


async def fetch(port: int, method: str, target: str, **kwargs: object) -> Message:
    """One request on a new connection."""
    client = await Client.connect(port)
    try:
        return await client.request(method, target, **kwargs)  # type: ignore[arg-type]
    finally:
        await client.close()

"""Random and mutated HTTP/1 requests, and what must hold for each (shared by tests/test_fuzz.py
and benchmarks/fuzz.py): edgeproxy answers or closes within its timeouts, never crashes, and
the backend never parses more requests than the client got backend answers for (so nothing
it rejected, or smuggled inside it, was forwarded)."""

from __future__ import annotations

import asyncio
import re

from hypothesis import strategies as st

from tests.recorder import RECORDED, Recorder

TEMPLATES = [
    b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
    b"POST /upload HTTP/1.1\r\nHost: example.com\r\nContent-Length: 5\r\n\r\nhello",
    b"POST / HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET /a?b=c HTTP/1.0\r\nHost: example.com\r\nConnection: keep-alive\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: example.com\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: example.com\r\n\r\n",
]
GADGETS = [
    b"\r\n", b"\n", b"\r", b" ", b"\t", b"\x00", b"\x0b", b":", b";", b",", b"0", b"-1", b"+",
    b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: gzip\r\n",
    b"Host: other.example.com\r\n", b"GET /smuggled HTTP/1.1\r\nHost: example.com\r\n\r\n",
    b"0\r\n\r\n", b"ffffffffffffffff\r\n", b"HTTP/1.1", b"\xff", b"%00", b"/../",
]  # fmt: skip
RESPONSE_START = re.compile(rb"HTTP/1\.[01] [1-5][0-9][0-9] ")


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """A valid request mutated a few times, several pipelined, or plain random bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(min_size=1, max_size=300))
    data = bytearray(b"".join(draw(st.lists(st.sampled_from(TEMPLATES), min_size=1, max_size=3))))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.integers(0, 3))
        if kind == 0:  # insert a gadget
            data[at:at] = draw(st.sampled_from(GADGETS))
        elif kind == 1 and data:  # delete a run
            del data[at:at + draw(st.integers(1, 8))]
        elif kind == 2 and at < len(data):  # replace one byte
            data[at] = draw(st.integers(0, 255))
        else:  # duplicate a run (a field twice, a line twice)
            data[at:at] = data[max(0, at - draw(st.integers(1, 40))):at]
    return bytes(data)


async def exercise(port: int, raw: bytes, recorder: Recorder, bound: float) -> tuple[bool, str]:
    """Send `raw`, half-close, read until edgeproxy closes. Returns (ok, why not)."""
    before = len(recorder.requests)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got = bytearray()
    try:
        writer.write(raw)
        await writer.drain()
        writer.write_eof()
        loop = asyncio.get_running_loop()
        end = loop.time() + bound
        while True:
            left = end - loop.time()
            if left <= 0:
                return False, f"no close within {bound} s; got {bytes(got[:200])!r}"
            try:
                data = await asyncio.wait_for(reader.read(65536), left)
            except TimeoutError:
                continue
            if not data:
                break
            got += data
    except ConnectionError:
        pass  # a reset after an error answer is a close too
    finally:
        writer.close()
    if got and not RESPONSE_START.match(got):
        return False, f"the answer is not HTTP: {bytes(got[:100])!r}"
    # Quiet backend: what it parsed is complete once edgeproxy closed (answers come after).
    forwarded = len(recorder.requests) - before
    answered = bytes(got).lower().count(RECORDED)
    if forwarded != answered:
        return False, f"backend parsed {forwarded} requests, client got {answered} answers"
    if recorder.parse_errors:
        return False, f"the backend could not parse what it got: {recorder.parse_errors[-1]}"
    return True, ""

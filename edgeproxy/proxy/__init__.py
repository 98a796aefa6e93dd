"""The hot path: the client side (downstream), the upstream side, header rules, and what the
connections of one worker share (dataplane)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast


def protocol_factory(factory: Callable[[], Any]) -> Callable[[], asyncio.BaseProtocol]:
    """The protocols are not asyncio.Protocol subclasses (compiled, they are extension types);
    asyncio and uvloop only call their methods. This tells the type checker so."""
    return cast("Callable[[], asyncio.BaseProtocol]", factory)


def compiled() -> bool:
    """True when the hot path runs as Cython-compiled extension modules (see setup.py)."""
    from edgeproxy import balancing, health
    from edgeproxy.proxy import dataplane, downstream, headers, upstream

    modules = (balancing, health, dataplane, downstream, upstream)
    return (not any(str(m.__file__).endswith(".py") for m in modules)
            and headers.scan_response_head is not headers.scan_response_head_py)  # fmt: skip

"""The hot path: the HTTP/1 codec of each side (http1_server, http1_client), the exchange
between them, pools, flow control, header rules, and what one worker shares (dataplane)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast


def protocol_factory(factory: Callable[[], Any]) -> Callable[[], asyncio.BaseProtocol]:
    """The protocols are not asyncio.Protocol subclasses (compiled, they are extension types);
    asyncio and uvloop only call their methods. This tells the type checker so."""
    return cast("Callable[[], asyncio.BaseProtocol]", factory)


def compiled_modules() -> list[str]:
    """The modules setup.py compiles (besides _heads.pyx and edgeproxy/_accesslog.pyx)."""
    return ["edgeproxy.hosts", "edgeproxy.health", "edgeproxy.balancing"] + [
        f"edgeproxy.proxy.{name}" for name in (
            "flow", "observe", "message", "http1_client", "pool", "forward", "binding", "dataplane", "exchange", "http1_server",
            "tls_server")
    ]  # fmt: skip


def compiled() -> bool:
    """True when the hot path runs as Cython-compiled extension modules (see setup.py)."""
    import importlib

    from edgeproxy.proxy import headers

    modules = [importlib.import_module(name) for name in compiled_modules()]
    return (not any(str(m.__file__).endswith(".py") for m in modules)
            and headers.scan_response_head is not headers.scan_response_head_py)  # fmt: skip

"""Property: for random and mutated requests (tests/fuzz.py), edgeproxy answers or closes
within its timeouts, never crashes, and forwards nothing it rejected. Bounded to seconds here;
benchmarks/fuzz.py runs the long campaign."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from tests.conftest import simple_site
from tests.fuzz import exercise, requests
from tests.recorder import Recorder

TIMEOUT = 1.0  # the header, body and keep-alive timeouts edgeproxy runs with here


@pytest.fixture
async def fuzzed(proxy_factory: Any) -> AsyncIterator[tuple[Any, Recorder]]:
    recorder = Recorder()
    await recorder.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(recorder.port, "127.0.0.2"), "--workers", "1",
                                "--client-header-timeout", str(TIMEOUT), "--client-body-timeout",
                                str(TIMEOUT), "--keepalive-timeout", str(TIMEOUT))  # fmt: skip
    yield proxy, recorder
    recorder.close()


# One edgeproxy for every example (it is what is under test, and must survive them all).
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=requests())
async def test_random_and_mutated_requests_are_answered_or_closed_and_never_smuggled(fuzzed: tuple[Any, Recorder], raw: bytes) -> None:  # fmt: skip
    proxy, recorder = fuzzed
    ok, why = await exercise(proxy.http, raw, recorder, bound=4 * TIMEOUT + 3)
    assert ok, f"{why}\nfor {raw!r}"
    assert proxy.proc.poll() is None, proxy.log()
    assert "exited with status" not in proxy.log()  # no worker crashed on it either
    assert "Traceback" not in proxy.log()

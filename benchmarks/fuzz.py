#!/usr/bin/env python3
"""The long fuzz campaign: tests/fuzz.py's random and mutated requests against the installed
edgeproxy (one worker) with a recording backend, many more than the suite's bounded run.

Each input must be answered or closed within the timeouts, crash nothing, and never make the
backend parse more requests than the client got answers for. Prints how many inputs were
tried and, on a failure, hypothesis's smallest failing input.

    python benchmarks/fuzz.py [--examples 20000] [--python PY]

Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from http_vs_nginx import build_of, free_port, wait_ready  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

from tests.conftest import simple_site  # noqa: E402
from tests.fuzz import exercise, requests  # noqa: E402
from tests.recorder import Recorder  # noqa: E402

TIMEOUT = 1.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter whose installed edgeproxy is fuzzed (default: this one)")
    args = parser.parse_args()
    print(f"edgeproxy build fuzzed: {build_of(args.python)}", flush=True)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    recorder = Recorder()
    asyncio.run_coroutine_threadsafe(recorder.start("127.0.0.2"), loop).result(10)
    with tempfile.TemporaryDirectory(prefix="edgeproxy-fuzz-") as tmp:
        work = Path(tmp)
        (work / "site.json").write_text(json.dumps({"kind": "List", "items": simple_site(recorder.port, "127.0.0.2")}))
        port, admin = free_port(), free_port()
        log = (work / "edgeproxy.log").open("wb")
        proc = subprocess.Popen(
            [args.python, "-m", "edgeproxy.cli", "run", "--manifests", str(work / "site.json"),
             "--http", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}", "--workers", "1",
             "--access-log", "off", "--client-header-timeout", str(TIMEOUT),
             "--client-body-timeout", str(TIMEOUT), "--keepalive-timeout", str(TIMEOUT)],
            cwd=work, stderr=log)  # fmt: skip
        tried = [0]
        started = time.monotonic()
        try:
            wait_ready(admin, 60)

            # Generation only, failures collected: a campaign reports every failing input
            # (shrinking one that waits on a timeout would take hours).
            @settings(max_examples=args.examples, deadline=None, database=None,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))  # fmt: skip
            @given(raw=requests())
            def campaign(raw: bytes) -> None:
                tried[0] += 1
                ok, why = asyncio.run_coroutine_threadsafe(
                    exercise(port, raw, recorder, 4 * TIMEOUT + 3), loop).result(30)
                if not ok:
                    failures.append(f"{why}\n    for {raw!r}")
                if proc.poll() is not None:
                    failures.append("edgeproxy exited")
                    raise SystemExit(1)

            failures: list[str] = []
            campaign()
        finally:
            proc.terminate()
            proc.wait(10)
            log.close()
        text = (work / "edgeproxy.log").read_text(errors="replace")
        crashes = text.count("exited with status") + text.count("Traceback")
    elapsed = time.monotonic() - started
    print(f"inputs tried: {tried[0]} in {elapsed:.0f} s; backend requests {len(recorder.requests)}, "
          f"backend parse errors {len(recorder.parse_errors)}, worker crashes or tracebacks {crashes}")  # fmt: skip
    for line in failures[:20]:
        print(f"FAILED: {line}")
    print(f"failing inputs: {len(failures)}")
    return 1 if crashes or failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Mistakes are loud: each bad start is one clear line and a non-zero exit; a manifest file that
stops parsing keeps its last good objects; `edgeproxy routes --explain` names the rule traffic
really takes. Real processes, real sockets."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edgeproxy.cli import build_parser
from tests import k8s
from tests.backends import Pods
from tests.conftest import ROOT, eventually, free_port
from tests.http1 import fetch
from tests.test_observability import scrape, value


def edgeproxy(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeproxy.cli", *argv], capture_output=True,
                          text=True, cwd=ROOT, timeout=60, env=env)  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--http", "127.0.0.1:99999"], "port 99999 is out of range"),
        (["--http", "127.0.0.1:8080", "--manifests", "/nonexistent/objects.yaml"],
         "--manifests /nonexistent/objects.yaml: no such file or directory"),
        (["--http", "127.0.0.1:8080", "--kubeconfig", "/nonexistent/kubeconfig"],
         "--kubeconfig /nonexistent/kubeconfig: no such file"),
        (["--http", "127.0.0.1:8080", "--in-cluster"], "--in-cluster: not running in a Kubernetes pod"),
        (["--http", "127.0.0.1:8080", "--manifests", "config", "--default-balancer", "fastest"],
         "--default-balancer 'fastest': unknown"),
        (["--http", "127.0.0.1:8080", "--manifests", "config", "--shutdown-delay", "-1"],
         "seconds cannot be negative"),
    ],
)
def test_a_bad_start_is_one_clear_line_and_exit_2(argv: list[str], expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    result = edgeproxy("run", *argv, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_a_port_in_use_is_one_clear_line_and_exit_2() -> None:
    with socket.socket() as taken:  # not SO_REUSEPORT: not ours to share
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = edgeproxy("run", "--manifests", "config", "--http", f"127.0.0.1:{port}",
                           "--admin", f"127.0.0.1:{free_port()}", "--workers", "1")  # fmt: skip
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"127.0.0.1:{port}: Address already in use" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and "sharing it" not in result.stderr


def test_every_option_has_help_with_its_default_and_there_is_a_version() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("run", "demo", "routes"):
        for action in commands.choices[name]._actions:
            assert action.help, f"{name} {action.option_strings} has no help"
    help_text = edgeproxy("run", "--help").stdout
    assert "--shutdown-delay" in help_text and "(default: 5.0)" in help_text
    assert "(default: round_robin)" in help_text
    result = edgeproxy("--version")
    assert result.returncode == 0 and result.stdout.startswith("edgeproxy ")


async def test_a_manifest_file_that_stops_parsing_keeps_its_last_good_objects(
    pods: Pods, proxy_factory: Any, manifests: Path
) -> None:
    port = await pods.start("127.0.0.2", "127.0.0.3")
    proxy = await proxy_factory([
        k8s.ingress_class(),
        k8s.ingress("site", [("site.example.com", [k8s.path("/", "web")])]),
        k8s.service("web"), k8s.endpoint_slice("web", k8s.ready("127.0.0.2"), port),
    ])  # fmt: skip
    other = manifests / "other.yaml"
    other.write_text(json.dumps({"kind": "List", "items": [
        k8s.ingress("other", [("other.example.com", [k8s.path("/", "other")])]),
        k8s.service("other"), k8s.endpoint_slice("other", k8s.ready("127.0.0.3"), port)]}))  # fmt: skip

    async def other_served() -> bool:
        return (await fetch(proxy.http, "GET", "/", host="other.example.com")).status == 200

    await eventually(other_served, what="other.yaml served")
    other.write_text("kind: Ingress\nmetadata: {name: other\n  spec: [\n")  # a YAML syntax error

    async def reported() -> bool:
        return value(await scrape(proxy.admin), "edgeproxy_manifest_files_unreadable") == 1

    await eventually(reported, what="the unreadable file in /metrics")
    assert await other_served()  # its last good objects still serve
    assert (await fetch(proxy.admin, "GET", "/readyz")).status == 200
    routes = json.loads((await fetch(proxy.admin, "GET", "/debug/routes")).body)
    assert list(routes["unreadable_manifests"]) == [str(other)]
    assert f"manifest file {other} cannot be parsed" in proxy.log()
    assert proxy.log().count(f"manifest file {other} cannot be parsed") == 1  # once, not per poll
    other.write_text(json.dumps(k8s.ingress("other", [("other.example.com", [k8s.path("/", "web")])])))

    async def mended() -> bool:
        return value(await scrape(proxy.admin), "edgeproxy_manifest_files_unreadable") == 0

    await eventually(mended, what="the mended file")
    # The Service and slice that were only in the broken file are gone with its new content.
    assert (await fetch(proxy.http, "GET", "/", host="other.example.com")).status == 200


def test_a_file_being_rewritten_in_place_is_read_once_it_is_still(tmp_path: Path) -> None:
    """`cat > file` truncates, then writes: a poll in between must not serve half a stream
    (here the first of two documents, which parses on its own)."""
    from edgeproxy.objects import ObjectStore
    from edgeproxy.sources.manifests import ManifestSource

    path = tmp_path / "site.yaml"
    full = "\n---\n".join(json.dumps(o) for o in (k8s.service("web"), k8s.service("api")))
    path.write_text(full)
    store = ObjectStore()
    source = ManifestSource([tmp_path], store, 0.1)
    source.load()  # the start reads at once
    assert store.count("Service") == 2
    with path.open("w") as half:
        half.write(full.split("---")[0])
        half.flush()
        source.load(settle_s=3600)  # the file was modified just now: not read yet
        assert store.count("Service") == 2 and source.changed_on_disk()
        source.load(settle_s=0)  # once still, it is read
        assert store.count("Service") == 1
    new = tmp_path / "new.yaml"
    new.write_text(json.dumps(k8s.service("db")))
    source.load(settle_s=3600)  # a new file waits too
    assert store.count("Service") == 1 and source.changed_on_disk()
    source.load(settle_s=0)
    assert store.count("Service") == 2 and not source.changed_on_disk()


EXPLAINED_SITE = [
    k8s.ingress_class(),
    k8s.ingress("exact", [("shop.example.com", [k8s.path("/cart", "cart", "Exact")])]),
    k8s.ingress("prefix", [("shop.example.com", [k8s.path("/cart", "catalog"), k8s.path("/", "web")])]),
    k8s.ingress("wild", [("*.example.com", [k8s.path("/", "wild")])]),
    k8s.ingress("fallback", default_backend="fallback"),
]
SERVICES = {"cart": "127.0.0.2", "catalog": "127.0.0.3", "web": "127.0.0.4", "wild": "127.0.0.5",
            "fallback": "127.0.0.6"}  # fmt: skip


async def test_explain_names_the_rule_the_request_really_reaches(
    pods: Pods, proxy_factory: Any, manifests: Path
) -> None:
    port = await pods.start(*SERVICES.values())
    objects = list(EXPLAINED_SITE)
    for name, address in SERVICES.items():
        objects += [k8s.service(name), k8s.endpoint_slice(name, k8s.ready(address), port)]
    proxy = await proxy_factory(objects)
    cases = [("shop.example.com", "/cart", "cart"), ("shop.example.com", "/cart/items", "catalog"),
             ("shop.example.com", "/cartography", "web"), ("api.example.com", "/x", "wild"),
             ("a.b.example.com", "/", "fallback"), ("other.org", "/", "fallback")]  # fmt: skip
    for host, path, service in cases:
        result = edgeproxy("routes", "--manifests", str(manifests), "--explain",
                           f"http://{host}{path}", "--json")  # fmt: skip
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        explained = answer["route"]["service"]
        assert explained == f"default/{service}:80", (host, path, answer)
        resp = await fetch(proxy.http, "GET", path, host=host)
        assert json.loads(resp.body)["pod"] == SERVICES[service]  # the pod that answered
        assert answer["route"]["endpoints"] == [f"{SERVICES[service]}:{port}"]
        live = json.loads((await fetch(proxy.admin, "GET", f"/debug/explain?url=http://{host}{path}")).body)
        assert live["route"] == answer["route"]
    # Why /cartography did not take /cart: Prefix matches whole path elements.
    answer = json.loads(edgeproxy("routes", "--manifests", str(manifests), "--explain",
                                  "http://shop.example.com/cartography", "--json").stdout)  # fmt: skip
    verdicts = {(r["pathType"], r["path"]): r for r in answer["steps"][-1]["rules"]}
    assert verdicts[("Prefix", "/cart")]["verdict"] == "no match"
    assert "whole path elements" in verdicts[("Prefix", "/cart")]["why"]
    assert verdicts[("Exact", "/cart")]["verdict"] == "no match"
    table = edgeproxy("routes", "--manifests", str(manifests))
    assert "shop.example.com" in table.stdout and "default/fallback:80" in table.stdout


def test_routes_lists_invalid_objects_with_their_reasons(manifests: Path) -> None:
    k8s.write(manifests, [k8s.ingress_class(),
                          k8s.ingress("broken", [("bad_host!", [k8s.path("/", "web")])]),
                          k8s.ingress("nosvc", [("ok.example.com", [k8s.path("/", "missing")])])])  # fmt: skip
    out = edgeproxy("routes", "--manifests", str(manifests)).stdout
    assert "invalid: Ingress default/broken: invalid host 'bad_host!'; rule skipped" in out
    assert "invalid: Ingress default/nosvc: Service default/missing not found" in out


async def test_debug_views_answer_loopback_only_and_the_admin_takes_only_get(
    pods: Pods, proxy_factory: Any
) -> None:
    from edgeproxy.admin import AdminApp

    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory([k8s.ingress_class(), k8s.ingress("site", default_backend="web"),
                                 k8s.service("web"), k8s.endpoint_slice("web", k8s.ready("127.0.0.2"), port)])  # fmt: skip
    assert (await fetch(proxy.admin, "GET", "/debug/routes")).status == 200
    assert (await fetch(proxy.admin, "POST", "/metrics", body=b"")).status == 405
    assert (await fetch(proxy.admin, "DELETE", "/debug/routes")).status == 405
    # From a node or pod address (not loopback): 403 unless --debug-allow covers it.
    sup = argparse.Namespace(args=argparse.Namespace(debug_allow=()))
    guard = AdminApp(sup)
    assert guard._debug_allowed("127.0.0.1") and guard._debug_allowed("::1")
    assert guard._debug_allowed("::ffff:127.0.0.1")
    assert not guard._debug_allowed("10.1.2.3") and not guard._debug_allowed(None)
    from edgeproxy.cli import cidr_list

    sup.args.debug_allow = cidr_list("10.0.0.0/8")
    assert AdminApp(sup)._debug_allowed("10.1.2.3")

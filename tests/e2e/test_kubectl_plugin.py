"""`kubectl pcipt`, run as kubectl runs plugins (kubectl-pcipt on PATH), against a lab with the
controller and two node plugins running the examples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pcipt.devcluster import LocalCluster
from pcipt.devcluster.lab import Lab
from tests.conftest import REPO_ROOT

EX = REPO_ROOT / "examples"
NS = "gpu-tenants"
TOO_BIG = (EX / "vm-too-big.yaml").read_text()


def plugin(kubectl: str, kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ,
        KUBECONFIG=str(kubeconfig),
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    )
    return subprocess.run(
        [kubectl, "pcipt", *args], capture_output=True, text=True, env=env, check=False, timeout=60
    )


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(
        tmp_path_factory.mktemp("lab"),
        REPO_ROOT / "demo" / "hardware.yaml",
        REPO_ROOT / "demo" / "node-config.yaml",
        plugin_args=["--rescan-interval", "2", "--lease-interval", "1", "--resync-interval", "1"],
    )
    lab.start()
    try:
        for f in ("namespace-gpu-tenant.yaml", "flavor-gpu-a100.yaml", "flavor-nic-vf.yaml"):
            lab.kubectl("apply", "-f", str(EX / f))
        lab.wait_for("{.status.total}", "4", "pciflavor", "a100", timeout=60)
        lab.kubectl("apply", "-n", NS, "-f", str(EX / "vm-2gpu.yaml"))
        lab.kubectl("apply", "-n", NS, "-f", "-", input=TOO_BIG)
        lab.wait_for("{.status.phase}", "Running", "ptvm", "trainer", "-n", NS, timeout=60)
        lab.wait_for("{.status.phase}", "Pending", "ptvm", "too-big", "-n", NS, timeout=60)
        lab.wait_for("{.status.free}", "2", "pciflavor", "a100", timeout=30)
        yield lab
    finally:
        lab.stop()


def test_inventory_per_node_and_flavor(lab: Lab) -> None:
    out = plugin(lab.kubectl_path, lab.kubeconfig, "inventory")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == [
        "NODE",
        "FLAVOR",
        "TOTAL",
        "FREE",
        "ALLOCATED",
        "UNHEALTHY",
        "CORDONED",
        "RESERVED",
        "SCRUBBING",
        "QUARANTINED",
        "ALIVE",
    ]
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in lines[1:]}
    assert rows[("node-a", "a100")] == ["3", "1", "2", "0", "0", "0", "0", "0", "yes"]
    assert rows[("node-b", "a100")] == ["1", "1", "0", "0", "0", "0", "0", "0", "yes"]
    assert rows[("node-b", "e810-vf-physnet2")][:2] == ["8", "8"]
    assert rows[("node-a", "<none>")][0] == "1"  # the GPU's audio function: published, in no flavor
    as_json = json.loads(plugin(lab.kubectl_path, lab.kubeconfig, "inventory", "-o", "json").stdout)
    assert {
        "node": "node-a",
        "flavor": "a100",
        "total": 3,
        "free": 1,
        "allocated": 2,
    }.items() <= next(
        r for r in as_json["items"] if r["node"] == "node-a" and r["flavor"] == "a100"
    ).items()


def test_explain_a_running_vm(lab: Lab) -> None:
    out = plugin(lab.kubectl_path, lab.kubeconfig, "explain", "trainer", "-n", NS)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"VM {NS}/trainer: Running on node-a")
    assert "CPUs and memory: NUMA 0: 16 shared vCPUs, 65536 MiB" in out.stdout
    assert "device  gpus         0000:3b:00.0  NUMA 0  node-a.0000-3b-00-0" in out.stdout
    assert (
        f"domain  {NS}_trainer (running), passing through 0000:3b:00.0, 0000:3c:00.0" in out.stdout
    )


def test_explain_says_why_a_vm_is_pending(lab: Lab) -> None:
    out = plugin(lab.kubectl_path, lab.kubeconfig, "explain", "too-big", "-n", NS)
    assert out.returncode == 0, out.stderr
    assert "why not placed: 0/2 nodes are available:" in out.stdout
    assert "    node-a: have only 1 free a100 (need 3)" in out.stdout


def test_cordon_and_uncordon(lab: Lab) -> None:
    out = plugin(lab.kubectl_path, lab.kubeconfig, "cordon", "node-b.0000-3b-00-0")
    assert out.returncode == 0 and "node-b.0000-3b-00-0 cordoned" in out.stdout
    assert (
        lab.kubectl(
            "get", "pcidev", "node-b.0000-3b-00-0", "-o", "jsonpath={.spec.unschedulable}"
        ).stdout
        == "true"
    )
    inv = plugin(
        lab.kubectl_path, lab.kubeconfig, "inventory", "--node", "node-b", "--flavor", "a100"
    ).stdout
    assert inv.splitlines()[1].split()[2:] == ["1", "0", "0", "0", "1", "0", "0", "0", "yes"]
    assert (
        plugin(lab.kubectl_path, lab.kubeconfig, "uncordon", "node-b.0000-3b-00-0").returncode == 0
    )
    assert (
        lab.kubectl(
            "get", "pcidev", "node-b.0000-3b-00-0", "-o", "jsonpath={.spec.unschedulable}"
        ).stdout
        == "false"
    )


def test_describe_node(lab: Lab) -> None:
    out = plugin(lab.kubectl_path, lab.kubeconfig, "describe", "node", "node-a")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Node node-a: alive; 4 published device(s)")
    row = next(line for line in out.stdout.splitlines() if line.startswith("0000:3b:00.0"))
    assert "a100" in row and "allocated" in row and f"{NS}/trainer" in row


def test_unknown_objects_and_missing_crds_get_clear_messages(lab: Lab, tmp_path: Path) -> None:
    out = plugin(lab.kubectl_path, lab.kubeconfig, "explain", "nope", "-n", NS)
    assert out.returncode == 1 and f"passthroughvm {NS}/nope not found" in out.stderr
    bare = LocalCluster(tmp_path / "bare")
    bare.up()
    try:
        out = plugin(lab.kubectl_path, bare.kubeconfig, "inventory")
        assert out.returncode == 1
        assert (
            "pcipt is not installed in this cluster" in out.stderr and "helm install" in out.stderr
        )
    finally:
        bare.down()

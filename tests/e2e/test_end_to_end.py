"""End to end: the real API server, the controller, and two node plugin processes (node-a,
node-b), each on its own simulated host with libvirt's test driver. The examples are applied as
a user would; each VM must end Running on the right node with a domain whose PCI devices are
exactly the claimed ones; stop, start and delete work; devices come back free."""

from __future__ import annotations

import json
import os
import re
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from pcipt.devcluster.lab import Lab
from tests.conftest import REPO_ROOT

# Slow by nature: the demo's lab: a control plane, a controller, two hosts.
pytestmark = pytest.mark.timeout(900)

EX = REPO_ROOT / "examples"
NS = "gpu-tenants"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(
        tmp_path_factory.mktemp("lab"),
        REPO_ROOT / "demo" / "hardware.yaml",
        REPO_ROOT / "demo" / "node-config.yaml",
        controller_args=["--node-dead-after", "15", "--audit-interval", "5"],
        plugin_args=["--rescan-interval", "2", "--lease-interval", "1", "--resync-interval", "1"],
    )
    lab.start()
    try:
        yield lab
    finally:
        lab.stop()


def get(lab: Lab, *args: str) -> dict[str, Any]:
    return json.loads(lab.kubectl("get", *args, "-o", "json").stdout)


def claimed(lab: Lab, vm_uid: str) -> list[str]:
    devices = get(lab, "pcidev")["items"]
    return sorted(
        d["spec"]["address"]
        for d in devices
        if (d["spec"].get("claimRef") or {}).get("uid") == vm_uid
    )


def driver(lab: Lab, host: str, address: str) -> str | None:
    link = lab.host_root(host) / "bus" / "pci" / "devices" / address / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def test_examples_run_on_the_right_nodes_with_exactly_their_devices(lab: Lab) -> None:
    for f in ("namespace-gpu-tenant.yaml", "flavor-gpu-a100.yaml", "flavor-nic-vf.yaml"):
        lab.kubectl("apply", "-f", str(EX / f))
    lab.wait_for("{.status.total}", "4", "pciflavor", "a100", timeout=60)
    lab.wait_for("{.status.total}", "8", "pciflavor", "e810-vf-physnet2", timeout=60)
    for f in ("vm-2gpu.yaml", "vm-sriov-vlan.yaml"):
        lab.kubectl("apply", "-n", NS, "-f", str(EX / f))
    lab.wait_for("{.status.phase}", "Running", "ptvm", "trainer", "-n", NS, timeout=60)
    lab.wait_for("{.status.phase}", "Running", "ptvm", "router", "-n", NS, timeout=60)

    trainer = get(lab, "ptvm", "trainer", "-n", NS)
    assert trainer["status"]["nodeName"] == "node-a"
    gpus = sorted(d["address"] for d in trainer["status"]["devices"])
    assert gpus == ["0000:3b:00.0", "0000:3c:00.0"]  # the two A100s sharing NUMA node 0
    assert trainer["status"]["numaNode"] == 0
    assert (
        trainer["status"]["domain"]["devices"] == gpus == claimed(lab, trainer["metadata"]["uid"])
    )
    assert {c["type"]: c["status"] for c in trainer["status"]["conditions"]}["Ready"] == "True"
    assert driver(lab, "node-a", "0000:3b:00.0") == "vfio-pci"
    xml = (lab.state_dir("node-a") / "domains" / f"{NS}_trainer.xml").read_text()
    assert (
        "<vcpupin vcpu='15' cpuset='0-15'/>" in xml and "<memory mode='strict' nodeset='0'/>" in xml
    )

    router = get(lab, "ptvm", "router", "-n", NS)
    assert router["status"]["nodeName"] == "node-b"
    (net,) = router["status"]["networks"]
    assert net["vlan"] == 120 and net["mac"] == "52:54:00:6e:10:01"
    assert (
        router["status"]["domain"]["devices"]
        == [net["address"]]
        == claimed(lab, router["metadata"]["uid"])
    )
    assert net["address"].startswith("0000:5e:02.")  # a VF of ens1f0, cabled to physnet2
    xml = (lab.state_dir("node-b") / "domains" / f"{NS}_router.xml").read_text()
    assert "<tag id='120'/>" in xml and "<mac address='52:54:00:6e:10:01'/>" in xml

    # Stop and start.
    lab.kubectl(
        "patch", "ptvm", "trainer", "-n", NS, "--type=merge", "-p", '{"spec":{"running":false}}'
    )
    lab.wait_for("{.status.phase}", "Stopped", "ptvm", "trainer", "-n", NS)
    assert lab.wait_for("{.status.domain.state}", "shut off", "ptvm", "trainer", "-n", NS)
    lab.kubectl(
        "patch", "ptvm", "trainer", "-n", NS, "--type=merge", "-p", '{"spec":{"running":true}}'
    )
    lab.wait_for("{.status.phase}", "Running", "ptvm", "trainer", "-n", NS)

    # Delete: the devices are released, scrubbed (reset, back to their own drivers: the node
    # plugin answers the release), and only then free again.
    uid = trainer["metadata"]["uid"]
    lab.kubectl("delete", "ptvm", "trainer", "-n", NS, "--wait=true", "--timeout=60s")
    assert claimed(lab, uid) == []
    assert not (lab.state_dir("node-a") / "domains" / f"{NS}_trainer.xml").exists()
    dev = "node-a.0000-3b-00-0"
    release = get(lab, "pcidev", dev)["spec"]["release"]
    assert release["uid"] == uid and release["scrub"] is True and release["reason"] == "Deleted"
    lab.wait_for("{.status.scrub.releaseID}", release["id"], "pcidev", dev, timeout=30)
    scrub = get(lab, "pcidev", dev)["status"]["scrub"]
    assert scrub["phase"] == "Done" and scrub["reset"] == "flr" and scrub["driver"] == "nvidia"
    assert driver(lab, "node-a", "0000:3b:00.0") == "nvidia"
    lab.kubectl("delete", "ptvm", "router", "-n", NS, "--wait=true", "--timeout=60s")
    lab.wait_for("{.status.free}", "4", "pciflavor", "a100", timeout=30)


def test_a_vm_that_cannot_fit_says_why(lab: Lab) -> None:
    lab.kubectl("apply", "-n", NS, "-f", str(EX / "vm-too-big.yaml"))
    msg = lab.wait_for("{.status.phase}", "Pending", "ptvm", "too-big", "-n", NS)
    assert msg == "Pending"
    got = get(lab, "ptvm", "too-big", "-n", NS)["status"]["scheduling"]["message"]
    assert got.startswith("0/2 nodes are available:")
    assert "cannot place gpus on a single NUMA node (at most 2 free a100 on one)" in got
    assert "have only 1 free a100 (need 3)" in got
    lab.kubectl("delete", "ptvm", "too-big", "-n", NS)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def test_controller_and_node_plugins_serve_metrics(lab: Lab) -> None:
    ctl = scrape(lab.metrics_ports["controller"])
    assert re.search(r"^pcipt_binds_total [1-9]", ctl, re.M)
    # Label order is not part of the format (prometheus_client writes them sorted).
    assert re.search(
        r'^pcipt_devices\{flavor="e810-vf-physnet2",node="node-b",state="free"\} [0-9]', ctl, re.M
    )
    assert re.search(r'^pcipt_scheduling_refusals_total\{reason="Unschedulable"\} [1-9]', ctl, re.M)
    assert re.search(r"^pcipt_scheduling_latency_seconds_count [1-9]", ctl, re.M)
    assert re.search(r'^pcipt_nodes_alive\{alive="true"\} 2(\.0)?$', ctl, re.M)
    node = scrape(lab.metrics_ports["node-a"])
    assert re.search(
        r'^pcipt_libvirt_operation_seconds_count\{operation="start"\} [1-9]', node, re.M
    )
    assert re.search(
        r'^pcipt_libvirt_operation_seconds_count\{operation="define"\} [1-9]', node, re.M
    )
    assert re.search(r"^pcipt_discovery_duration_seconds_count [1-9]", node, re.M)
    assert re.search(r'^pcipt_published_devices\{health="Healthy"\} 4(\.0)?$', node, re.M)

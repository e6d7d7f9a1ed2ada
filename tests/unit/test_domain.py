"""Domain rendering: golden files, each validated with libvirt's own schema
(virt-xml-validate). Set PCIPT_UPDATE_GOLDEN=1 to rewrite the golden files after a deliberate
change, then read the diff."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from nodeplugin.domain.build import BuildError, HostFacts, build_domain, domain_name
from nodeplugin.domain.render import (
    device_xml,
    live_device_xml,
    macvtap_netdevs,
    passthrough_addresses,
    render,
    retarget,
    tuning_of,
    vm_ref_of,
)
from pcipt.api.v1alpha1 import PassthroughVM

GOLDEN = Path(__file__).resolve().parent.parent / "data" / "domains"
HOST = HostFacts(
    numa_cpus={0: (0, 1, 2, 3, 8, 9, 10, 11), 1: (4, 5, 6, 7, 12, 13, 14, 15)},
    reserved_cpus=(0, 8),
)
UID = "3f9a1c2e-5b7d-4e8f-9a0b-1c2d3e4f5a6b"


def vm(spec: dict[str, Any], status: dict[str, Any]) -> PassthroughVM:
    return PassthroughVM.model_validate(
        {
            "metadata": {"name": "trainer", "namespace": "ml", "uid": UID, "generation": 3},
            "spec": {"memory": "16Gi", **spec},
            "status": {"nodeName": "node-a", **status},
        }
    )


CASES: dict[str, PassthroughVM] = {
    "two-gpus-numa-pinned": vm(
        {
            "cpu": {"cores": 4},
            "disks": [{"name": "root", "image": "file:///var/lib/pcipt/images/ubuntu.qcow2"}],
            "devices": [{"name": "gpus", "flavor": "a100", "count": 2, "numaPolicy": "required"}],
        },
        {
            "numaNode": 1,
            "devices": [
                {
                    "request": "gpus",
                    "pciDevice": "node-a.0000-af-00-0",
                    "address": "0000:af:00.0",
                    "numaNode": 1,
                },
                {
                    "request": "gpus",
                    "pciDevice": "node-a.0000-af-00-1",
                    "address": "0000:af:00.1",
                    "numaNode": 1,
                    "companion": True,
                },
                {
                    "request": "gpus",
                    "pciDevice": "node-a.0000-b0-00-0",
                    "address": "0000:b0:00.0",
                    "numaNode": 1,
                },
            ],
        },
    ),
    "sriov-vf-on-vlan": vm(
        {
            "cpu": {"cores": 2, "pinning": "none"},
            "memory": "4Gi",
            "disks": [
                {"name": "root", "image": "file:///images/router.qcow2"},
                {
                    "name": "data",
                    "image": "file:///images/data.raw",
                    "bus": "sata",
                    "readOnly": True,
                },
            ],
            "networks": [
                {"name": "uplink", "flavor": "vf", "vlan": 120, "mac": "52:54:00:6e:10:01"}
            ],
        },
        {
            "networks": [
                {
                    "name": "uplink",
                    "pciDevice": "node-b.0000-5e-02-1",
                    "address": "0000:5e:02.1",
                    "mac": "52:54:00:6e:10:01",
                    "vlan": 120,
                }
            ]
        },
    ),
    "macvtap-and-http-image": vm(
        {
            "cpu": {"cores": 1},
            "memory": "2Gi",
            "disks": [{"name": "boot", "image": "https://images.example.com/debian-12.qcow2"}],
            "networks": [{"name": "mgmt", "flavor": "vf", "mode": "macvtap"}],
        },
        {
            "networks": [
                {
                    "name": "mgmt",
                    "pciDevice": "node-b.0000-5e-02-2",
                    "address": "0000:5e:02.2",
                    "netdev": "ens1f0v2",
                }
            ]
        },
    ),
    "kernel-boot-under-tcg": vm(
        {
            "cpu": {"cores": 1, "pinning": "none"},
            "memory": "256Mi",
            "kernelBoot": {
                "kernel": "file:///boot/vmlinuz",
                "initrd": "file:///var/lib/pcipt/images/guest.cpio",
                "cmdline": "console=ttyS0 quiet",
            },
            "devices": [{"name": "nic", "flavor": "e1000e"}],
        },
        {
            "devices": [
                {"request": "nic", "pciDevice": "lab.0000-03-00-0", "address": "0000:03:00.0"}
            ]
        },
    ),
    "dedicated-on-hugepages": vm(
        {
            "cpu": {"cores": 4, "policy": "dedicated"},
            "memory": "4Gi",
            "hugepages": {"pageSize": "1Gi"},
            "disks": [{"name": "root", "image": "file:///images/dpdk.qcow2"}],
        },
        {
            "numaNode": 0,
            "compute": {
                "policy": "dedicated",
                "vcpus": 4,
                "memoryMiB": 4096,
                "pageSizeKiB": 1048576,
                "numa": [
                    {"node": 0, "vcpus": [0, 1, 2, 3], "cpus": [2, 10, 3, 11], "memoryMiB": 4096}
                ],
            },
        },
    ),
    "spans-two-numa-nodes": vm(
        {
            "cpu": {"cores": 4, "numaNodes": 2},
            "memory": "8Gi",
            "devices": [{"name": "gpu", "flavor": "a100", "numaPolicy": "required"}],
            "networks": [{"name": "uplink", "flavor": "vf", "mac": "52:54:00:6e:10:02"}],
        },
        {
            "numaNode": 1,
            "devices": [
                {
                    "request": "gpu",
                    "pciDevice": "node-a.0000-af-00-0",
                    "address": "0000:af:00.0",
                    "numaNode": 1,
                }
            ],
            "networks": [
                {
                    "name": "uplink",
                    "pciDevice": "node-a.0000-5e-02-1",
                    "address": "0000:5e:02.1",
                    "numaNode": 0,
                }
            ],
            "compute": {
                "vcpus": 4,
                "memoryMiB": 8192,
                "numa": [
                    {"node": 0, "vcpus": [0, 1], "memoryMiB": 4096},
                    {"node": 1, "vcpus": [2, 3], "memoryMiB": 4096},
                ],
            },
        },
    ),
}
TCG = HostFacts(numa_cpus={0: (0,), 1: (1,)}, domain_type="qemu", console_log_dir="/var/log/c")


def validate(xml: str, tmp_path: Path) -> None:
    exe = shutil.which("virt-xml-validate")
    assert exe, (
        "virt-xml-validate is missing: install libvirt-clients (hack/install-system-deps.sh does)"
    )
    f = tmp_path / "domain.xml"
    f.write_text(xml)
    proc = subprocess.run([exe, str(f), "domain"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("case", list(CASES))
def test_golden_domain(case: str, tmp_path: Path) -> None:
    xml = render(build_domain(CASES[case], TCG if "tcg" in case else HOST))
    golden = GOLDEN / f"{case}.xml"
    if os.environ.get("PCIPT_UPDATE_GOLDEN") == "1":
        golden.write_text(xml)
    assert xml == golden.read_text(), f"{golden} differs; PCIPT_UPDATE_GOLDEN=1 rewrites it"
    validate(xml, tmp_path)


@pytest.mark.parametrize("golden", sorted(GOLDEN.glob("*.xml")), ids=lambda p: p.name)
def test_every_golden_file_is_valid_libvirt_xml(golden: Path, tmp_path: Path) -> None:
    validate(golden.read_text(), tmp_path)


def test_pinning_follows_the_numa_node_the_controller_chose() -> None:
    # Not counted (the node published no topology): vCPUs on the devices' NUMA node, memory
    # not bound, since nobody counted it there.
    d = build_domain(CASES["two-gpus-numa-pinned"], HOST)
    assert d.placement is not None and d.placement.vcpu_cpus[0] == HOST.numa_cpus[1]
    assert d.placement.memory_nodes == ()
    xml = render(d)
    assert '<vcpupin vcpu="3" cpuset="4-7,12-15" />' in xml and "numatune" not in xml


def test_dedicated_vcpus_are_pinned_one_to_one_and_emulators_on_reserved_cpus() -> None:
    d = build_domain(CASES["dedicated-on-hugepages"], HOST)
    assert d.placement is not None
    assert d.placement.vcpu_cpus == ((2,), (10,), (3,), (11,))
    assert d.placement.emulator_cpus == (0, 8) and d.placement.memory_nodes == (0,)
    xml = render(d)
    assert '<vcpupin vcpu="1" cpuset="10" />' in xml
    assert '<emulatorpin cpuset="0,8" />' in xml
    assert '<memory mode="strict" nodeset="0" />' in xml
    assert '<page size="1048576" unit="KiB" />' in xml


def test_shared_vcpus_keep_off_reserved_and_dedicated_cpus() -> None:
    v = CASES["spans-two-numa-nodes"]
    host = HostFacts(HOST.numa_cpus, reserved_cpus=(0, 8), dedicated_elsewhere=frozenset({1, 9}))
    d = build_domain(v, host)
    assert d.placement is not None and d.placement.vcpu_cpus[0] == (2, 3, 10, 11)
    assert d.placement.vcpu_cpus[2] == HOST.numa_cpus[1]


def test_a_vm_spanning_numa_nodes_gets_a_guest_numa_topology() -> None:
    xml = render(build_domain(CASES["spans-two-numa-nodes"], HOST))
    assert '<cell id="0" cpus="0-1" memory="4194304" unit="KiB" />' in xml
    assert '<cell id="1" cpus="2-3" memory="4194304" unit="KiB" />' in xml
    assert '<memnode cellid="1" mode="strict" nodeset="1" />' in xml
    assert '<memory mode="strict" nodeset="0-1" />' in xml
    # Each device behind an expander bus on the guest NUMA node of its host node: the VF
    # (host node 0) on guest node 0, the GPU (host node 1) on guest node 1.
    d = build_domain(CASES["spans-two-numa-nodes"], HOST)
    assert d.placement is not None
    assert [(b.cell, b.ports) for b in d.placement.buses] == [(0, (2,)), (1, (4,))]
    assert d.hostdevs[0].guest_bus == 4 and d.interfaces[0].guest_bus == 2  # type: ignore[union-attr]
    assert '<controller type="pci" index="3" model="pcie-expander-bus">' in xml
    assert '<address type="pci" domain="0x0000" bus="0x04" slot="0x00" function="0x0" />' in xml


def test_no_pinning_when_asked_not_to() -> None:
    v = CASES["two-gpus-numa-pinned"].model_copy(deep=True)
    v.spec.cpu.pinning = "none"
    assert build_domain(v, HOST).placement is None


def test_hostdevs_are_exactly_the_bound_devices_and_read_back() -> None:
    xml = render(build_domain(CASES["two-gpus-numa-pinned"], HOST))
    assert passthrough_addresses(xml) == ["0000:af:00.0", "0000:af:00.1", "0000:b0:00.0"]
    assert passthrough_addresses(render(build_domain(CASES["sriov-vf-on-vlan"], HOST))) == [
        "0000:5e:02.1"
    ]


def test_metadata_names_the_vm() -> None:
    ref = vm_ref_of(render(build_domain(CASES["sriov-vf-on-vlan"], HOST)))
    assert ref is not None and (ref.namespace, ref.name, ref.uid, ref.generation) == (
        "ml",
        "trainer",
        UID,
        3,
    )
    assert vm_ref_of("<domain type='kvm'><name>foreign</name></domain>") is None


def test_names_sizes_and_generated_mac() -> None:
    d = build_domain(CASES["macvtap-and-http-image"], HOST)
    assert d.name == domain_name("ml", "trainer") == "ml_trainer"
    assert d.memory_kib == 2 * 1024 * 1024 and d.vcpus == 1
    (iface,) = d.interfaces
    assert iface.mac is not None and iface.mac.startswith("52:54:00:")
    assert iface.mac == build_domain(CASES["macvtap-and-http-image"], HOST).interfaces[0].mac


def test_rendering_is_deterministic() -> None:
    for v in CASES.values():
        assert render(build_domain(v, HOST)) == render(build_domain(v, HOST))


def test_status_compute_must_place_every_vcpu() -> None:
    v = CASES["dedicated-on-hugepages"].model_copy(deep=True)
    assert v.status.compute is not None
    v.status.compute.numa[0].vcpus = [0, 1, 2, 5]
    with pytest.raises(BuildError, match="places vCPUs"):
        build_domain(v, HOST)


def test_a_numa_node_the_host_lacks_is_refused() -> None:
    v = CASES["two-gpus-numa-pinned"].model_copy(deep=True)
    v.status.numa_node = 5
    with pytest.raises(BuildError, match="NUMA node 5 has no CPUs on this host"):
        build_domain(v, HOST)


@pytest.mark.parametrize(
    "case", ["sriov-vf-on-vlan", "macvtap-and-http-image", "two-gpus-numa-pinned"]
)
def test_each_passthrough_device_renders_alone_for_attach_and_is_found_for_detach(
    case: str, tmp_path: Path
) -> None:
    d = build_domain(CASES[case], HOST)
    xml = render(d)
    keys = set(passthrough_addresses(xml)) | {f"netdev:{n}" for n in macvtap_netdevs(xml)}
    assert keys
    for key in keys:
        alone = device_xml(d, key)
        assert alone is not None and "<address type" not in alone.split("</source>")[-1]
        found = live_device_xml(xml, key)
        assert found is not None and (key.removeprefix("netdev:") in found or "address" in found)
        # Wrapped in a domain of its own, the attach XML is valid libvirt XML.
        one = xml.split("<devices>")[0] + "<devices>" + alone + "</devices>\n</domain>\n"
        validate(one, tmp_path)
    assert device_xml(d, "0000:ff:1f.7") is None and live_device_xml(xml, "0000:ff:1f.7") is None


def test_a_placed_vm_keeps_the_cpus_and_memory_counted_for_it_after_an_edit() -> None:
    placed = CASES["dedicated-on-hugepages"]
    edited = placed.model_copy(
        update={
            "spec": placed.spec.model_copy(
                update={
                    "memory": "8Gi",
                    "cpu": placed.spec.cpu.model_copy(update={"cores": 6}),
                }
            )
        }
    )
    d = build_domain(edited, HOST)
    assert d.vcpus == 4 and d.memory_kib == 4096 * 1024  # what status.compute counted
    assert render(d) == render(build_domain(placed, HOST))


def test_a_domain_moved_live_gets_the_targets_vf_and_pinning_and_stays_valid(
    tmp_path: Path,
) -> None:
    """retarget: what the old node sends to the target (macvtap source, pinning); tuning_of:
    what the target says its pinning is. Nothing else of the domain changes."""
    source = render(build_domain(CASES["macvtap-and-http-image"], HOST))
    (netdev,) = macvtap_netdevs(source)
    target = tuning_of(render(build_domain(CASES["dedicated-on-hugepages"], HOST)))
    assert target.startswith("<tuning>") and '<vcpupin vcpu="1" cpuset="10" />' in target
    moved = retarget(source, {netdev: "ens2f0v7"}, target)
    assert macvtap_netdevs(moved) == ["ens2f0v7"]
    assert '<vcpupin vcpu="1" cpuset="10" />' in moved
    assert '<memory mode="strict" nodeset="0" />' in moved
    assert moved.count("<cputune>") == 1
    validate(moved, tmp_path)
    # A target with no pinning (the VM floats there): the source's pinning goes.
    floating = retarget(source, {}, "<tuning />")
    assert "<cputune>" not in floating and "numatune" not in floating
    assert macvtap_netdevs(floating) == [netdev]
    validate(floating, tmp_path)
    # No tuning given: pinning left as it is.
    assert retarget(source, {}, None).count("<vcpupin") == source.count("<vcpupin")


def test_a_macvtap_with_a_rate_limit_is_shaped_by_libvirt_too(tmp_path: Path) -> None:
    v = CASES["macvtap-and-http-image"].model_copy(deep=True)
    v.status.networks[0].max_tx_rate = 100
    xml = render(build_domain(v, HOST))
    assert '<outbound average="12500" />' in xml  # 100 Mbps in kilobytes per second
    validate(xml, tmp_path)

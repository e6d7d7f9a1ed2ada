"""Discovery over fake sysfs trees laid out as the kernel lays them out."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nodeplugin.discovery import discover, format_cpulist, parse_cpulist, pcie_root
from nodeplugin.pciids import load, parse
from nodeplugin.simulate import build_host, load_profile
from tests.conftest import REPO_ROOT
from tests.unit.hosts import build_lab


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    build_lab(tmp_path / "sys")
    return tmp_path / "sys"


def test_tree_uses_kernel_style_relative_symlinks(lab: Path) -> None:
    assert (
        os.readlink(lab / "bus/pci/devices/0000:3b:00.0")
        == "../../../devices/pci0000:00/0000:3b:00.0"
    )
    dev = lab / "devices/pci0000:00/0000:3b:00.0"
    assert os.readlink(dev / "driver") == "../../../bus/pci/drivers/nvidia"
    assert os.readlink(dev / "iommu_group") == "../../../kernel/iommu_groups/7"
    assert os.readlink(lab / "kernel/iommu_groups/7/devices/0000:3b:00.1").endswith(
        "devices/pci0000:00/0000:3b:00.1"
    )
    assert os.readlink(lab / "devices/pci0000:00/0000:5e:02.0/physfn") == "../0000:5e:00.0"
    assert (dev / "vendor").read_text() == "0x10de\n"


def test_gpu_and_audio_share_a_group_and_the_bridge_is_not_a_peer(lab: Path) -> None:
    host = discover(lab).by_address()
    gpu, audio = host["0000:3b:00.0"], host["0000:3b:00.1"]
    assert gpu.iommu_group == audio.iommu_group == 7
    assert gpu.iommu_group_peers == ("0000:3b:00.1",)
    assert audio.iommu_group_peers == ("0000:3b:00.0",)
    assert host["0000:3a:00.0"].is_bridge


def test_ids_class_driver_numa_and_subsystem(lab: Path) -> None:
    gpu = discover(lab).by_address()["0000:3b:00.0"]
    assert (gpu.vendor_id, gpu.product_id, gpu.class_code) == ("10de", "20b0", "030200")
    assert (gpu.subsystem_vendor_id, gpu.subsystem_id) == ("10de", "134f")
    assert gpu.driver == "nvidia" and gpu.numa_node == 0 and gpu.revision == "a1"


def test_sriov_pfs_and_vfs_on_two_numa_nodes(lab: Path) -> None:
    host = discover(lab).by_address()
    pf0, pf1 = host["0000:5e:00.0"], host["0000:d8:00.0"]
    assert (pf0.sriov_role, pf0.total_vfs, pf0.num_vfs, pf0.netdevs) == ("PF", 64, 4, ("ens1f0",))
    assert pf0.virtfns == ("0000:5e:02.0", "0000:5e:02.1", "0000:5e:02.2", "0000:5e:02.3")
    vf = host["0000:5e:02.2"]
    assert (vf.sriov_role, vf.phys_fn, vf.vf_index, vf.netdev, vf.driver) == (
        "VF",
        "0000:5e:00.0",
        2,
        "ens1f0v2",
        "iavf",
    )
    assert {host[a].numa_node for a in pf0.virtfns} == {0}
    assert {host[a].numa_node for a in pf1.virtfns} == {1}
    assert len({host[a].iommu_group for a in pf0.virtfns}) == 4  # a group each (ACS)


def test_nvme_and_a_function_without_a_driver(lab: Path) -> None:
    host = discover(lab).by_address()
    assert host["0000:af:00.0"].class_code == "010802" and host["0000:af:00.0"].driver == "nvme"
    assert host["0000:b0:00.0"].driver is None and host["0000:b0:00.0"].driver_override is None


def test_numa_cpu_lists(lab: Path) -> None:
    numa = discover(lab).numa_cpus
    assert numa[0] == (*range(0, 8), *range(16, 24)) and numa[1] == (*range(8, 16), *range(24, 32))


def test_single_node_hosts_report_numa_zero_for_unknown(tmp_path: Path) -> None:
    (host,) = load_profile(
        "hosts: {h: {numa: {0: '0-3'}, devices: [{address: '0000:01:00.0', vendor: '10de', "
        "device: '20b0', class: '030200', iommuGroup: 1}]}}"
    )
    build_host(tmp_path / "sys", host)
    assert discover(tmp_path / "sys").functions[0].numa_node == 0


def test_no_iommu_means_no_group(tmp_path: Path) -> None:
    (host,) = load_profile(
        "hosts: {h: {numa: {0: '0-3', 1: '4-7'}, devices: [{address: '0000:01:00.0', "
        "vendor: '10de', device: '20b0', class: '030200'}]}}"
    )
    build_host(tmp_path / "sys", host)
    f = discover(tmp_path / "sys").functions[0]
    assert f.iommu_group is None and f.iommu_group_peers == () and f.numa_node == -1


def test_the_demo_profile_builds_and_discovers(tmp_path: Path) -> None:
    hosts = load_profile((REPO_ROOT / "demo" / "hardware.yaml").read_text())
    assert [h.name for h in hosts] == ["node-a", "node-b"]
    build_host(tmp_path / "b", hosts[1])
    found = discover(tmp_path / "b").by_address()
    assert (
        found["0000:5e:0a.3"].phys_fn == "0000:5e:00.1"
        and found["0000:5e:0a.3"].netdev == "ens1f1v3"
    )


@pytest.mark.parametrize(
    ("text", "cpus"), [("0-3", (0, 1, 2, 3)), ("0-1,8,10-11", (0, 1, 8, 10, 11)), ("", ())]
)
def test_cpulists_round_trip(text: str, cpus: tuple[int, ...]) -> None:
    assert parse_cpulist(text) == cpus
    assert format_cpulist(list(cpus)) == text


def test_pci_ids_parsing() -> None:
    ids = parse(
        "# c\n10de  NVIDIA Corporation\n\t20b0  GA100 [A100 SXM4 40GB]\n\t\t10de 134f  A100-SXM4-40GB\n"
        "C 03  Display controller\n\t02  3D controller\n"
    )
    assert ids.vendor("10DE") == "NVIDIA Corporation"
    assert ids.device("10de", "20B0") == "GA100 [A100 SXM4 40GB]"
    assert (
        ids.class_name("030200") == "3D controller"
        and ids.class_name("0380") == "Display controller"
    )
    assert ids.device("10de", "ffff") is None


def test_missing_pci_ids_gives_an_empty_database(tmp_path: Path) -> None:
    assert load(tmp_path / "absent").vendor("10de") is None


def test_the_pcie_root_is_the_root_complex_in_the_device_path(lab: Path, tmp_path: Path) -> None:
    by = {f.address: f for f in discover(lab).functions}
    assert by["0000:3b:00.0"].pcie_root == "pci0000:00"  # the simulator's one root complex
    # A device under another host bridge, as the kernel links it; a folder named like a root
    # complex only above /sys does not count, nor does a device with no root in its path.
    other = tmp_path / "pci0000:ff" / "sys"
    (other / "devices" / "pci0000:d7" / "0000:d7:00.0" / "0000:d8:00.0").mkdir(parents=True)
    (other / "bus" / "pci" / "devices").mkdir(parents=True)
    link = other / "bus" / "pci" / "devices" / "0000:d8:00.0"
    link.symlink_to("../../../devices/pci0000:d7/0000:d7:00.0/0000:d8:00.0")
    assert pcie_root(link) == "pci0000:d7"
    assert pcie_root(other / "bus" / "pci" / "devices" / "0000:00:00.9") is None

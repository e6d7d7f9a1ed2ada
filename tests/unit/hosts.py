"""Fake hosts for node plugin tests, built with nodeplugin.simulate: the shapes a real host
has, with kernel-style symlinks."""

from __future__ import annotations

from pathlib import Path

from nodeplugin.simulate import DeviceSpec, HostProfile, SriovSpec, SysfsTree, build_host


def lab_host() -> HostProfile:
    """A GPU with its audio function in one IOMMU group (behind a bridge in that group), a
    dual-port NIC with PFs and VFs on two NUMA nodes, an NVMe drive, a PCIe bridge, and a
    device with no driver."""
    return HostProfile(
        name="node-a",
        numa={0: "0-7,16-23", 1: "8-15,24-31"},
        smt_offset=16,
        hugepages={0: {1048576: 4}, 1: {2048: 1024}},
        devices=[
            DeviceSpec(
                "0000:3a:00.0", "8086", "2030", "060400", numa=0, driver="pcieport", iommu_group=7
            ),
            DeviceSpec(
                "0000:3b:00.0",
                "10de",
                "20b0",
                "030200",
                numa=0,
                driver="nvidia",
                iommu_group=7,
                subsystem_vendor="10de",
                subsystem="134f",
            ),
            DeviceSpec(
                "0000:3b:00.1",
                "10de",
                "1aef",
                "040300",
                numa=0,
                driver="snd_hda_intel",
                iommu_group=7,
            ),
            DeviceSpec(
                "0000:5e:00.0",
                "8086",
                "1592",
                "020000",
                numa=0,
                driver="ice",
                iommu_group=10,
                netdev="ens1f0",
                sriov=SriovSpec(64, 4, "1889", "iavf", "ens1f0v"),
                serial="MT2048X12345",
            ),
            DeviceSpec(
                "0000:d8:00.0",
                "8086",
                "1592",
                "020000",
                numa=1,
                driver="ice",
                iommu_group=11,
                netdev="ens2f0",
                sriov=SriovSpec(64, 2, "1889", "iavf", "ens2f0v"),
            ),
            DeviceSpec(
                "0000:af:00.0", "144d", "a808", "010802", numa=1, driver="nvme", iommu_group=12
            ),
            DeviceSpec("0000:b0:00.0", "1af4", "1045", "ff0000", numa=1, iommu_group=13),
        ],
    )


def build_lab(root: Path) -> SysfsTree:
    return build_host(root, lab_host())

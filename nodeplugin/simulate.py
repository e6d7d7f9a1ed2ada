"""Simulated hosts: a hardware profile becomes a sysfs tree laid out as the kernel lays it out
(devices under the root complex, bus/pci/devices and driver symlinks, IOMMU groups, SR-IOV
physfn/virtfnN links, net/ folders, NUMA nodes), and a simulated kernel reacts to the writes
that bind drivers the way Linux does.

Tests build fake hosts with it; `make demo` and the end-to-end test run node plugins on such
hosts (`--simulate`). Production never uses it: there the tree is /sys and the kernel is real.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nodeplugin.discovery import format_cpulist, parse_cpulist
from pcipt.pci import PciAddress

ROOT_COMPLEX = "pci0000:00"
SIM_STATE = ".simulated.json"
KNOWN_DRIVERS = ("vfio-pci",)


@dataclass
class SriovSpec:
    total_vfs: int
    num_vfs: int
    vf_device: str
    vf_driver: str | None = "iavf"
    vf_netdev_prefix: str | None = None


@dataclass
class DeviceSpec:
    address: str
    vendor: str
    device: str
    cls: str
    numa: int = -1
    driver: str | None = None
    iommu_group: int | None = None
    subsystem_vendor: str | None = None
    subsystem: str | None = None
    revision: str = "a1"
    netdev: str | None = None
    sriov: SriovSpec | None = None
    serial: str | None = None
    """The card serial number its PCI VPD carries; None: no VPD."""


@dataclass
class HostProfile:
    name: str
    numa: dict[int, str] = field(default_factory=lambda: {0: "0-7"})
    """NUMA node -> cpulist"""
    devices: list[DeviceSpec] = field(default_factory=list)
    memory_mib: int = 65536
    """Memory of each NUMA node."""
    smt_offset: int | None = None
    """CPU c and c + smt_offset are one core's two threads (the usual x86 numbering); None:
    one thread per core."""
    hugepages: dict[int, dict[int, int]] = field(default_factory=dict)
    """NUMA node -> page size KiB -> pages."""


def _dev(d: Mapping[str, Any]) -> DeviceSpec:
    sriov = d.get("sriov")
    return DeviceSpec(
        address=str(d["address"]),
        vendor=str(d["vendor"]),
        device=str(d["device"]),
        cls=str(d["class"]),
        numa=int(d.get("numa", -1)),
        driver=d.get("driver"),
        iommu_group=d.get("iommuGroup"),
        subsystem_vendor=d.get("subsystemVendor"),
        subsystem=d.get("subsystem"),
        netdev=d.get("netdev"),
        serial=d.get("serial"),
        sriov=SriovSpec(
            total_vfs=int(sriov["totalVFs"]),
            num_vfs=int(sriov.get("numVFs", sriov["totalVFs"])),
            vf_device=str(sriov["vfDevice"]),
            vf_driver=sriov.get("vfDriver", "iavf"),
            vf_netdev_prefix=sriov.get("vfNetdevPrefix"),
        )
        if sriov
        else None,
    )


def load_profile(text: str) -> list[HostProfile]:
    """A hardware profile: `hosts: {name: {numa: {0: "0-15"}, devices: [...]}}`."""
    doc = yaml.safe_load(text) or {}
    hosts = []
    for name, h in (doc.get("hosts") or {}).items():
        hosts.append(
            HostProfile(
                name=name,
                numa={int(k): str(v) for k, v in (h.get("numa") or {0: "0-7"}).items()},
                devices=[_dev(d) for d in h.get("devices") or []],
                memory_mib=int(h.get("memoryMiB", 65536)),
                smt_offset=h.get("smtOffset"),
                hugepages={
                    int(n): {int(k): int(v) for k, v in sizes.items()}
                    for n, sizes in (h.get("hugepages") or {}).items()
                },
            )
        )
    return hosts


def vf_address(
    pf: str, index: int, per_slot: int = 8, slots_per_pf: int | None = None, total: int = 0
) -> str:
    """VFs sit on the PF's bus from slot 2 on, eight functions a slot, each PF's VFs after the
    previous PF's (function 1's VFs after function 0's), as common NICs place them."""
    a = PciAddress.parse(pf)
    span = slots_per_pf or max(1, math.ceil(total / per_slot))
    slot = 2 + a.function * span + index // per_slot
    return str(PciAddress(a.domain, a.bus, slot, index % per_slot))


class SysfsTree:
    """Builds and edits a fake sysfs tree under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.devices = root / "devices" / ROOT_COMPLEX
        self.bus = root / "bus" / "pci"

    def _rel(self, src: Path, dst: Path) -> None:
        src.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink() or src.exists():
            src.unlink()
        os.symlink(os.path.relpath(dst, src.parent), src)

    def ensure_driver(self, name: str) -> Path:
        d = self.bus / "drivers" / name
        if not d.exists():
            d.mkdir(parents=True)
            for f in ("bind", "unbind", "new_id", "remove_id"):
                (d / f).write_text("")
        return d

    def add_function(
        self,
        address: str,
        vendor: str,
        device: str,
        cls: str,
        *,
        numa: int = -1,
        driver: str | None = None,
        subsystem_vendor: str | None = None,
        subsystem: str | None = None,
        revision: str = "a1",
        iommu_group: int | None = None,
        netdev: str | None = None,
    ) -> Path:
        dev = self.devices / address
        dev.mkdir(parents=True, exist_ok=True)
        files = {
            "vendor": f"0x{vendor}",
            "device": f"0x{device}",
            "class": f"0x{cls}",
            "subsystem_vendor": f"0x{subsystem_vendor or vendor}",
            "subsystem_device": f"0x{subsystem or device}",
            "revision": f"0x{revision}",
            "numa_node": str(numa),
            "driver_override": "(null)",
            "enable": "1",
            "reset_method": "flr",
            "reset": "",
            "aer_dev_fatal": aer_counters(0),
        }
        for k, v in files.items():
            (dev / k).write_text(v + "\n")
        self._rel(self.bus / "devices" / address, dev)
        if driver:
            self.bind(address, driver)
        if iommu_group is not None:
            group = self.root / "kernel" / "iommu_groups" / str(iommu_group)
            self._rel(group / "devices" / address, dev)
            self._rel(dev / "iommu_group", group)
        if netdev:
            (dev / "net" / netdev).mkdir(parents=True, exist_ok=True)
        return dev

    def write_vpd(self, address: str, serial: str, product: str = "Simulated adapter") -> None:
        """A PCI VPD image as a card's EEPROM holds it: the identifier string, a read-only
        section with the part and serial numbers, the end tag."""
        (self.devices / address / "vpd").write_bytes(vpd_image(serial, product))

    def bind(self, address: str, driver: str) -> None:
        drv = self.ensure_driver(driver)
        dev = self.devices / address
        self._rel(dev / "driver", drv)
        self._rel(drv / address, dev)

    def unbind(self, address: str) -> str | None:
        dev = self.devices / address
        link = dev / "driver"
        if not link.is_symlink():
            return None
        name = os.path.basename(os.readlink(link))
        link.unlink()
        (self.bus / "drivers" / name / address).unlink(missing_ok=True)
        return name

    def driver(self, address: str) -> str | None:
        link = self.devices / address / "driver"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    def set_numa(
        self,
        numa: Mapping[int, str],
        memory_mib: int = 65536,
        smt_offset: int | None = None,
        hugepages: Mapping[int, Mapping[int, int]] | None = None,
    ) -> None:
        """NUMA nodes as sysfs shows them: cpulist, meminfo, hugepages; and each CPU's
        thread siblings."""
        base = self.root / "devices" / "system" / "node"
        base.mkdir(parents=True, exist_ok=True)
        every = {c for cpus in numa.values() for c in parse_cpulist(cpus)}
        for n, cpus in numa.items():
            node = base / f"node{n}"
            node.mkdir(exist_ok=True)
            (node / "cpulist").write_text(format_cpulist(parse_cpulist(cpus)) + "\n")
            (node / "meminfo").write_text(
                f"Node {n} MemTotal:       {memory_mib * 1024} kB\n"
                f"Node {n} MemFree:        {memory_mib * 1024 // 2} kB\n"
            )
            for size, pages in (hugepages or {}).get(n, {}).items():
                d = node / "hugepages" / f"hugepages-{size}kB"
                d.mkdir(parents=True, exist_ok=True)
                (d / "nr_hugepages").write_text(f"{pages}\n")
                (d / "free_hugepages").write_text(f"{pages}\n")
            for c in parse_cpulist(cpus):
                siblings = [c]
                if smt_offset:
                    siblings += [x for x in (c - smt_offset, c + smt_offset) if x in every]
                topo = self.root / "devices" / "system" / "cpu" / f"cpu{c}" / "topology"
                topo.mkdir(parents=True, exist_ok=True)
                (topo / "thread_siblings_list").write_text(format_cpulist(siblings) + "\n")
        (base / "online").write_text(format_cpulist(list(numa)) + "\n")
        (base / "possible").write_text(format_cpulist(list(numa)) + "\n")

    def add_vfs(
        self,
        pf: str,
        spec: Mapping[str, Any],
        count: int,
        next_group: int,
        native: dict[str, str | None],
    ) -> int:
        """Create `count` VFs of `pf` (each its own IOMMU group, bound to the VF driver) as the
        kernel does on a write to sriov_numvfs; returns the next free IOMMU group."""
        dev = self.devices / pf
        for k in range(count):
            vf = vf_address(pf, k, total=spec["total"])
            prefix = spec.get("netdevPrefix")
            self.add_function(
                vf,
                spec["vendor"],
                spec["device"],
                spec["cls"],
                numa=spec["numa"],
                driver=spec["driver"],
                iommu_group=next_group,
                netdev=f"{prefix}{k}" if prefix else None,
            )
            next_group += 1
            native[vf] = spec["driver"]
            self._rel(dev / f"virtfn{k}", self.devices / vf)
            self._rel(self.devices / vf / "physfn", dev)
        (dev / "sriov_numvfs").write_text(f"{count}\n")
        return next_group

    def remove_vfs(self, pf: str) -> None:
        """Remove every VF of `pf`, as writing 0 to its sriov_numvfs does."""
        dev = self.devices / pf
        for link in sorted(dev.glob("virtfn*")):
            vf = os.path.basename(os.readlink(link))
            group = (self.devices / vf / "iommu_group").resolve()
            self.remove_function(vf)
            link.unlink()
            shutil.rmtree(group, ignore_errors=True)
        (dev / "sriov_numvfs").write_text("0\n")

    def remove_function(self, address: str) -> None:
        """The device is gone (unplugged, or the host rebooted without it)."""
        self.unbind(address)
        (self.bus / "devices" / address).unlink(missing_ok=True)
        shutil.rmtree(self.devices / address, ignore_errors=True)


def vpd_image(serial: str, product: str = "Simulated adapter") -> bytes:
    """Identifier string (large resource 0x82), VPD-R (0x90) with PN, SN and the RV checksum
    keyword, end (small resource 0x78)."""

    def large(tag: int, body: bytes) -> bytes:
        return bytes([tag, len(body) & 0xFF, len(body) >> 8]) + body

    def keyword(key: bytes, value: bytes) -> bytes:
        return key + bytes([len(value)]) + value

    ident = large(0x82, product.encode())
    ro = keyword(b"PN", b"SIM-0001") + keyword(b"SN", serial.encode())
    head = ident + bytes([0x90, 0, 0]) + ro + b"RV" + bytes([1])
    checksum = (-sum(head)) & 0xFF
    ro += keyword(b"RV", bytes([checksum]))
    return ident + large(0x90, ro) + bytes([0x78])


def build_host(root: Path, host: HostProfile) -> SysfsTree:
    """Write the host's sysfs tree under `root` (which must be empty or absent)."""
    tree = SysfsTree(root)
    root.mkdir(parents=True, exist_ok=True)
    (tree.bus / "devices").mkdir(parents=True, exist_ok=True)
    for f in ("drivers_probe", "rescan"):
        (tree.bus / f).write_text("")
    for name in KNOWN_DRIVERS:
        tree.ensure_driver(name)
    tree.set_numa(host.numa, host.memory_mib, host.smt_offset, host.hugepages)
    used = {d.iommu_group for d in host.devices if d.iommu_group is not None}
    next_group = max(used, default=0) + 1
    native: dict[str, str | None] = {}
    sriov: dict[str, dict[str, Any]] = {}
    for d in host.devices:
        tree.add_function(
            d.address,
            d.vendor,
            d.device,
            d.cls,
            numa=d.numa,
            driver=d.driver,
            subsystem_vendor=d.subsystem_vendor,
            subsystem=d.subsystem,
            revision=d.revision,
            iommu_group=d.iommu_group,
            netdev=d.netdev,
        )
        native[d.address] = d.driver
        if d.serial is not None:
            tree.write_vpd(d.address, d.serial)
        if d.sriov is None:
            continue
        pf = {
            "vendor": d.vendor,
            "cls": d.cls,
            "numa": d.numa,
            "total": d.sriov.total_vfs,
            "device": d.sriov.vf_device,
            "driver": d.sriov.vf_driver,
            "netdevPrefix": d.sriov.vf_netdev_prefix,
        }
        sriov[d.address] = pf
        (tree.devices / d.address / "sriov_totalvfs").write_text(f"{d.sriov.total_vfs}\n")
        (tree.devices / d.address / "sriov_vf_device").write_text(f"{d.sriov.vf_device}\n")
        next_group = tree.add_vfs(d.address, pf, d.sriov.num_vfs, next_group, native)
    state = {"host": host.name, "native": native, "sriov": sriov, "nextGroup": next_group}
    (root / SIM_STATE).write_text(json.dumps(state, indent=1))
    return tree


AER_FATAL_NAMES = ("Undefined", "DLP", "SDES", "TLP", "FCP", "CmpltTO", "CmpltAbrt", "UnxCmplt")


def aer_counters(total: int) -> str:
    """An aer_dev_fatal file as Linux writes it: a count per error kind, then the total."""
    lines = [f"{n} {total if n == 'CmpltTO' else 0}" for n in AER_FATAL_NAMES]
    return "\n".join([*lines, f"TOTAL_ERR_FATAL {total}"])


class SimulatedKernel:
    """Writes into a fake sysfs tree and answers as Linux does to the driver-binding files:
    driver_override, drivers/<d>/bind and unbind, drivers_probe (which binds the override, or
    the device's own driver). Anything else is written as a plain file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tree = SysfsTree(root)
        self.state = (
            json.loads((root / SIM_STATE).read_text()) if (root / SIM_STATE).exists() else {}
        )
        self.native: dict[str, str | None] = self.state.setdefault("native", {})

    def write(self, path: Path, value: str) -> None:
        rel = path.relative_to(self.root).parts
        text = value.strip()
        if rel[-1] == "sriov_numvfs":
            self._sriov_numvfs(path.parent.name, text)
            return
        if rel[:3] == ("bus", "pci", "drivers_probe"):
            self._probe(text)
        elif (
            rel[:3] == ("bus", "pci", "drivers") and len(rel) == 5 and rel[4] in ("bind", "unbind")
        ):
            driver, op = rel[3], rel[4]
            if op == "unbind":
                if self.tree.driver(text) != driver:
                    raise OSError(19, f"{text} is not bound to {driver}")  # ENODEV
                self.tree.unbind(text)
            else:
                self._bind(text, driver)
        elif rel[-1] == "driver_override":
            path.write_text((text or "(null)") + "\n")
            return
        elif rel[-1] == "reset":
            self._reset(path.parent.name, text)
            return
        path.write_text(value)

    def _reset(self, address: str, text: str) -> None:
        """As Linux's reset_store: only "1" is taken (EINVAL else); the reset is counted in the
        state file (`resets`), so tests can see it happened."""
        if text != "1":
            raise OSError(22, "Invalid argument")  # EINVAL
        if self.state.get("resetFails", {}).get(address):
            raise OSError(25, "Inappropriate ioctl for device")  # ENOTTY: no method worked
        resets = self.state.setdefault("resets", {})
        resets[address] = resets.get(address, 0) + 1
        (self.root / SIM_STATE).write_text(json.dumps(self.state, indent=1))

    def _sriov_numvfs(self, pf: str, text: str) -> None:
        """As Linux's sriov_numvfs_store: a count above sriov_totalvfs is ERANGE; a PF without
        a driver that configures SR-IOV is ENOENT; a nonzero count while VFs exist is EBUSY
        (write 0 first); 0 removes every VF."""
        spec = self.state.get("sriov", {}).get(pf)
        if spec is None:
            raise OSError(2, f"{pf} has no SR-IOV capability")  # ENOENT (no such file)
        n = int(text)
        current = int((self.tree.devices / pf / "sriov_numvfs").read_text())
        if n > spec["total"]:
            raise OSError(34, f"{pf} supports at most {spec['total']} VFs")  # ERANGE
        if n == current:
            return
        if self.tree.driver(pf) is None:
            raise OSError(2, f"{pf} has no driver to configure SR-IOV")  # ENOENT
        if n and current:
            raise OSError(16, f"{current} VFs already enabled; disable before enabling {n}")
        if n == 0:
            self.tree.remove_vfs(pf)
        else:
            self.state["nextGroup"] = self.tree.add_vfs(
                pf, spec, n, int(self.state.get("nextGroup", 1000)), self.native
            )
        (self.root / SIM_STATE).write_text(json.dumps(self.state, indent=1))

    def _bind(self, address: str, driver: str) -> None:
        """As Linux's bind_store: the driver must match the device (its driver_override, or
        its own driver when none is set): ENODEV otherwise; EBUSY when already bound; and the
        driver's probe may refuse: vfio-pci takes no bridge (EINVAL)."""
        if self.tree.driver(address) is not None:
            raise OSError(16, f"{address} is already bound")  # EBUSY
        override = (self.tree.devices / address / "driver_override").read_text().strip()
        matches = (
            override == driver
            if override not in ("", "(null)")
            else (self.native.get(address) == driver)
        )
        if not matches:
            raise OSError(19, f"{driver} does not match {address}")  # ENODEV
        klass = (self.tree.devices / address / "class").read_text().strip()
        if driver == "vfio-pci" and klass.startswith("0x0604"):
            raise OSError(22, "Invalid argument")  # vfio_pci_probe: not a normal header
        self.tree.bind(address, driver)

    def _probe(self, address: str) -> None:
        if self.tree.driver(address) is not None:
            return
        override = (self.tree.devices / address / "driver_override").read_text().strip()
        driver = override if override not in ("", "(null)") else self.native.get(address)
        if driver:
            self.tree.bind(address, driver)


def write_profile(hosts: Sequence[HostProfile]) -> str:
    """The inverse of load_profile, for tests that build profiles in code."""
    doc: dict[str, Any] = {"hosts": {}}
    for h in hosts:
        doc["hosts"][h.name] = {
            "numa": {k: v for k, v in h.numa.items()},
            "memoryMiB": h.memory_mib,
            **({"smtOffset": h.smt_offset} if h.smt_offset else {}),
            **(
                {"hugepages": {n: dict(sizes) for n, sizes in h.hugepages.items()}}
                if h.hugepages
                else {}
            ),
            "devices": [
                {
                    k: v
                    for k, v in {
                        "address": d.address,
                        "vendor": d.vendor,
                        "device": d.device,
                        "class": d.cls,
                        "numa": d.numa,
                        "driver": d.driver,
                        "iommuGroup": d.iommu_group,
                        "netdev": d.netdev,
                        "serial": d.serial,
                        "sriov": {
                            "totalVFs": d.sriov.total_vfs,
                            "numVFs": d.sriov.num_vfs,
                            "vfDevice": d.sriov.vf_device,
                            "vfDriver": d.sriov.vf_driver,
                            "vfNetdevPrefix": d.sriov.vf_netdev_prefix,
                        }
                        if d.sriov
                        else None,
                    }.items()
                    if v is not None
                }
                for d in h.devices
            ],
        }
    return yaml.safe_dump(doc, sort_keys=False)

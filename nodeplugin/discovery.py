"""Discover a host's PCI functions and NUMA topology from a sysfs tree.

PURE over a root path: reads files and symlinks under `root` (the real `/sys`, or a fake tree
in tests and simulated hosts), imports no client, writes nothing. What to publish is decided
elsewhere (devicespec.py); names come from pci.ids (pciids.py).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from pcipt.compute import NodeCompute, NumaCompute
from pcipt.cpulist import format_cpulist, parse_cpulist
from pcipt.pci import PciAddress

__all__ = ["format_cpulist", "parse_cpulist"]

BRIDGE_CLASS_PREFIX = "0604"  # PCI-to-PCI bridges share IOMMU groups but are never passed through


@dataclass(frozen=True)
class PciFunction:
    """One PCI function as sysfs describes it."""

    address: str
    vendor_id: str
    product_id: str
    subsystem_vendor_id: str
    subsystem_id: str
    class_code: str
    revision: str = ""
    driver: str | None = None
    driver_override: str | None = None
    numa_node: int = -1
    iommu_group: int | None = None
    iommu_group_peers: tuple[str, ...] = ()
    """Other endpoint functions in the IOMMU group (bridges excluded)."""
    sriov_role: str = "None"
    phys_fn: str | None = None
    vf_index: int | None = None
    total_vfs: int | None = None
    num_vfs: int | None = None
    virtfns: tuple[str, ...] = ()
    netdevs: tuple[str, ...] = ()
    vf_product_id: str | None = None
    """A PF's VFs' device ID (`sriov_vf_device`)."""
    serial: str | None = None
    """The card's serial number from the PCI VPD (`SN`); a VF without VPD of its own has its
    PF's, as Nova reads it."""
    aer_fatal: int | None = None
    """Fatal PCIe errors the kernel's AER driver has counted for it since boot
    (`aer_dev_fatal`'s TOTAL_ERR_FATAL); None when the kernel does not report them."""
    reset_methods: tuple[str, ...] | None = None
    """How the kernel can reset it (`reset_method`, in the order it tries them); () when it
    cannot; None when the kernel does not say (it still may, through `reset`)."""
    pcie_root: str | None = None
    """The PCI root complex (host bridge) it sits under, as the kernel names it in the
    device's sysfs path (`pci0000:3a`): devices under one root reach each other without
    crossing the CPU's interconnect (Kubernetes DRA's `pcieRoot` attribute)."""

    @property
    def is_bridge(self) -> bool:
        return self.class_code.startswith(BRIDGE_CLASS_PREFIX)

    @property
    def netdev(self) -> str | None:
        return self.netdevs[0] if self.netdevs else None


@dataclass(frozen=True)
class HostInventory:
    functions: tuple[PciFunction, ...]
    numa_cpus: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """CPU IDs of each NUMA node."""

    def by_address(self) -> dict[str, PciFunction]:
        return {f.address: f for f in self.functions}

    def by_netdev(self) -> dict[str, PciFunction]:
        return {n: f for f in self.functions for n in f.netdevs}


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _hex(path: Path, width: int) -> str:
    text = _read(path) or ""
    text = text.lower().removeprefix("0x")
    try:
        return f"{int(text, 16):0{width}x}"
    except ValueError:
        return ""


def _int(path: Path) -> int | None:
    text = _read(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _link_name(path: Path) -> str | None:
    """The last component a symlink points to (driver name, group number, PF address)."""
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def _netdevs(dev: Path) -> tuple[str, ...]:
    names: list[str] = []
    for net in [dev / "net", *sorted(dev.glob("virtio*/net"))]:
        if net.is_dir():
            names.extend(sorted(p.name for p in net.iterdir()))
    return tuple(names)


def _group_members(root: Path, group: int) -> list[str]:
    folder = root / "kernel" / "iommu_groups" / str(group) / "devices"
    try:
        return sorted(p.name for p in folder.iterdir())
    except OSError:
        return []


def read_function(
    root: Path, address: str, vf_indexes: dict[str, int] | None = None
) -> PciFunction:
    """One function; `vf_indexes` (VF address -> index under its PF) saves reading every PF's
    links once per VF when the caller already has them."""
    dev = root / "bus" / "pci" / "devices" / address
    group_name = _link_name(dev / "iommu_group")
    group = int(group_name) if group_name and group_name.isdigit() else None
    virtfns = sorted(
        (p for p in dev.glob("virtfn*") if p.name[6:].isdigit()), key=lambda p: int(p.name[6:])
    )
    phys_fn = _link_name(dev / "physfn")
    total_vfs = _int(dev / "sriov_totalvfs")
    vf_index = None
    if phys_fn is not None:
        if vf_indexes is None:
            vf_indexes = _vf_indexes(root / "bus" / "pci" / "devices" / phys_fn)
        vf_index = vf_indexes.get(address)
    # A PF is a function that can have VFs: the kernel creates sriov_totalvfs for every
    # function with an SR-IOV capability, even one whose firmware gives it 0 VFs (Nova too
    # counts a PF only when sriov_totalvfs > 0).
    role = "VF" if phys_fn is not None else ("PF" if total_vfs else "None")
    numa = _int(dev / "numa_node")
    override = _read(dev / "driver_override")
    class_code = _hex(dev / "class", 6)
    return PciFunction(
        address=address,
        vendor_id=_hex(dev / "vendor", 4),
        product_id=_hex(dev / "device", 4),
        subsystem_vendor_id=_hex(dev / "subsystem_vendor", 4),
        subsystem_id=_hex(dev / "subsystem_device", 4),
        class_code=class_code,
        revision=_hex(dev / "revision", 2),
        driver=_link_name(dev / "driver"),
        driver_override=None if override in (None, "", "(null)") else override,
        numa_node=numa if numa is not None else -1,
        iommu_group=group,
        sriov_role=role,
        phys_fn=phys_fn,
        vf_index=vf_index,
        total_vfs=total_vfs,
        num_vfs=_int(dev / "sriov_numvfs"),
        virtfns=tuple(n for p in virtfns if (n := _link_name(p)) is not None),
        netdevs=_netdevs(dev),
        vf_product_id=(_hex(dev / "sriov_vf_device", 4) or None) if total_vfs else None,
        serial=vpd_serial(dev / "vpd") if class_code.startswith(VPD_CLASSES) else None,
        aer_fatal=aer_total(dev / "aer_dev_fatal"),
        reset_methods=_reset_methods(dev),
        pcie_root=pcie_root(dev),
    )


ROOT_COMPLEX = re.compile(r"^pci[0-9a-f]{4,8}:[0-9a-f]{2}$")


def pcie_root(dev: Path) -> str | None:
    """The root complex in the device's resolved sysfs path
    (/sys/devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0 -> pci0000:3a); None when the path
    names none (a virtual device, a tree that is not sysfs)."""
    try:
        parts = dev.resolve().parts
    except OSError:
        return None
    # Right under sysfs's devices/ folder: a folder elsewhere that looks like one does not count.
    below = [parts[i + 1] for i, x in enumerate(parts[:-1]) if x == "devices"]
    return below[-1] if below and ROOT_COMPLEX.match(below[-1]) else None


def aer_total(path: Path) -> int | None:
    """The TOTAL_ERR_FATAL line of an aer_dev_fatal file (one `NAME COUNT` per line)."""
    text = _read(path)
    if text is None:
        return None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "TOTAL_ERR_FATAL" and parts[1].isdigit():
            return int(parts[1])
    return None


def _reset_methods(dev: Path) -> tuple[str, ...] | None:
    methods = _read(dev / "reset_method")
    if methods is not None:
        return tuple(methods.split())
    return None if (dev / "reset").exists() else ()


VPD_READ_ONLY, VPD_END = 0x10, 0x0F
VPD_CLASSES = ("02",)
"""Functions whose VPD is read: network controllers, the cards `remote_managed` is about (a
read of some devices' VPD is slow, so not every function's at every rescan)."""


def parse_vpd_serial(data: bytes) -> str | None:
    """The `SN` keyword of a PCI VPD image's read-only section (PCI Local Bus 3.0, section
    6.4 / appendix I): large resources are a tag byte with bit 7 set and a 16-bit
    little-endian length, small ones carry a 3-bit length in the tag byte, keywords are two
    letters, a length byte and the value. Stops quietly at anything malformed."""
    i = 0
    while i < len(data):
        tag = data[i]
        if tag & 0x80:
            if i + 3 > len(data):
                return None
            name, length, start = tag & 0x7F, data[i + 1] | (data[i + 2] << 8), i + 3
        else:
            name, length, start = (tag >> 3) & 0x0F, tag & 0x07, i + 1
            if name == VPD_END:
                return None
        body = data[start : start + length]
        if len(body) < length:
            return None
        if name == VPD_READ_ONLY:
            j = 0
            while j + 3 <= len(body):
                key, size = body[j : j + 2], body[j + 2]
                value = body[j + 3 : j + 3 + size]
                if key == b"SN":
                    text = value.decode("ascii", "replace").strip(" \x00")
                    return text or None
                j += 3 + size
        i = start + length
    return None


def vpd_serial(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            return parse_vpd_serial(f.read(4096))
    except OSError:
        return None


def _vf_indexes(pf: Path) -> dict[str, int]:
    out = {}
    for link in pf.glob("virtfn*"):
        if link.name[6:].isdigit() and (vf := _link_name(link)) is not None:
            out[vf] = int(link.name[6:])
    return out


def read_numa(root: Path) -> dict[int, tuple[int, ...]]:
    nodes: dict[int, tuple[int, ...]] = {}
    base = root / "devices" / "system" / "node"
    for d in sorted(base.glob("node[0-9]*")) if base.is_dir() else []:
        text = _read(d / "cpulist")
        if text is not None and d.name[4:].isdigit():
            nodes[int(d.name[4:])] = parse_cpulist(text)
    return nodes


def _meminfo_kib(path: Path, key: str) -> int | None:
    """`Node 0 MemTotal:  65843252 kB` -> 65843252."""
    for line in (_read(path) or "").splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] == f"{key}:":
            try:
                return int(parts[3])
            except ValueError:
                return None
    return None


def read_compute(
    root: Path,
    reserved_cpus: tuple[int, ...] = (),
    reserved_memory_mib: int = 0,
) -> NodeCompute | None:
    """CPUs (with thread siblings), memory and hugepages per NUMA node, less what is kept
    for the host: `reserved_cpus`, and `reserved_memory_mib` on every NUMA node. Memory in
    hugepages is the hugepages' alone. None when sysfs shows no NUMA nodes."""
    numa = read_numa(root)
    if not numa:
        return None
    cpu_dir = root / "devices" / "system" / "cpu"
    reserved = set(reserved_cpus)
    out: dict[int, NumaCompute] = {}
    for n, cpus in numa.items():
        node = root / "devices" / "system" / "node" / f"node{n}"
        usable = tuple(c for c in cpus if c not in reserved)
        cores: dict[tuple[int, ...], None] = {}
        for cpu in usable:
            text = _read(cpu_dir / f"cpu{cpu}" / "topology" / "thread_siblings_list")
            siblings = parse_cpulist(text) if text else (cpu,)
            cores[tuple(x for x in siblings if x in usable) or (cpu,)] = None
        hugepages: dict[int, int] = {}
        for d in sorted((node / "hugepages").glob("hugepages-*kB")):
            size = d.name.removeprefix("hugepages-").removesuffix("kB")
            pages = _int(d / "nr_hugepages")
            if size.isdigit() and pages is not None:
                hugepages[int(size)] = pages
        total_kib = _meminfo_kib(node / "meminfo", "MemTotal") or 0
        in_pages_kib = sum(size * pages for size, pages in hugepages.items())
        memory_mib = max(0, (total_kib - in_pages_kib) // 1024 - reserved_memory_mib)
        out[n] = NumaCompute(usable, tuple(cores), memory_mib, hugepages)
    return NodeCompute(
        out,
        tuple(sorted(reserved)),
        {n: reserved_memory_mib for n in numa} if reserved_memory_mib else {},
    )


def discover(root: Path) -> HostInventory:
    """Every PCI function under `root`/bus/pci/devices, and the host's NUMA nodes."""
    devices_dir = root / "bus" / "pci" / "devices"
    addresses = sorted(
        (p.name for p in devices_dir.iterdir()) if devices_dir.is_dir() else [],
        key=PciAddress.parse,
    )
    vf_indexes: dict[str, int] = {}
    for a in addresses:
        if (devices_dir / a / "sriov_totalvfs").exists():
            vf_indexes.update(_vf_indexes(devices_dir / a))
    functions = [read_function(root, a, vf_indexes) for a in addresses]
    numa = read_numa(root)
    by_addr = {f.address: f for f in functions}
    single_node = len(numa) == 1
    out = []
    for f in functions:
        peers: tuple[str, ...] = ()
        if f.iommu_group is not None:
            members = _group_members(root, f.iommu_group)
            peers = tuple(
                m for m in members if m != f.address and not (m in by_addr and by_addr[m].is_bridge)
            )
        numa_node = f.numa_node
        if numa_node < 0 and single_node:
            # Single-socket hosts report -1: every device is local to the only node there is.
            numa_node = next(iter(numa))
        serial = f.serial
        if serial is None and f.phys_fn is not None and f.phys_fn in by_addr:
            serial = by_addr[f.phys_fn].serial
        out.append(replace(f, iommu_group_peers=peers, numa_node=numa_node, serial=serial))
    return HostInventory(tuple(out), numa)

"""Typed model of the libvirt domain XML subset pcipt writes. Types only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pcipt.pci import PciAddress

XMLNS = "https://pcipt.io/xmlns/domain/v1alpha1"


@dataclass(frozen=True)
class Disk:
    target: str
    """Guest device name: vda, sda, ..."""
    bus: Literal["virtio", "sata", "scsi", "usb"]
    file: str | None = None
    """Host path, for file:// images."""
    url: str | None = None
    """http(s) URL, for network images (read-only)."""
    read_only: bool = False
    format: Literal["qcow2", "raw"] = "qcow2"


@dataclass(frozen=True)
class HostdevPci:
    """A PCI function passed through (`<hostdev mode='subsystem' type='pci'>`)."""

    address: PciAddress
    alias: str
    """ua-<request>-<n>: user aliases let `virsh` and humans tell devices apart."""
    guest_bus: int | None = None
    """The guest PCI bus (a root port behind its guest NUMA node's expander bus), when the
    VM has a guest NUMA topology; None: wherever libvirt puts it."""


@dataclass(frozen=True)
class HostdevInterface:
    """An SR-IOV VF given to the guest as a NIC (`<interface type='hostdev'>`)."""

    address: PciAddress
    alias: str
    mac: str | None = None
    vlan: int | None = None
    guest_bus: int | None = None


@dataclass(frozen=True)
class DirectInterface:
    """A macvtap in passthrough mode over a VF's netdev (`<interface type='direct'>`)."""

    netdev: str
    alias: str
    mac: str | None = None
    max_tx_rate: int | None = None
    """Mbps: libvirt shapes the guest's outbound traffic on the macvtap too (`<bandwidth>`),
    on top of the VF's own limit."""


@dataclass(frozen=True)
class GuestCell:
    """A guest NUMA node, backed by one host NUMA node."""

    id: int
    vcpus: tuple[int, ...]
    memory_kib: int
    host_node: int


@dataclass(frozen=True)
class NumaBus:
    """A PCIe expander bus on one guest NUMA node, with a root port per device behind it:
    how a passed-through device shows the guest the NUMA node it has on the host."""

    index: int
    """Controller index of the expander bus."""
    cell: int
    """The guest NUMA node."""
    ports: tuple[int, ...]
    """Controller indexes of its root ports; a device's guest bus is its port's index."""


@dataclass(frozen=True)
class Placement:
    """Where the vCPUs run and where the memory lives."""

    vcpu_cpus: tuple[tuple[int, ...], ...]
    """Per vCPU, the host CPUs it may run on (one each for dedicated vCPUs)."""
    emulator_cpus: tuple[int, ...]
    memory_nodes: tuple[int, ...] = ()
    """Host NUMA nodes the memory is bound to (strict); empty: not bound, because the
    controller did not count it there."""
    cells: tuple[GuestCell, ...] = ()
    """A guest NUMA topology, when the VM spans host NUMA nodes."""
    hugepage_kib: int | None = None
    buses: tuple[NumaBus, ...] = ()
    """Expander buses putting devices on the guest NUMA node of their host node."""

    @property
    def numa_node(self) -> int | None:
        return self.memory_nodes[0] if len(self.memory_nodes) == 1 else None


@dataclass(frozen=True)
class VmRef:
    """Which PassthroughVM the domain belongs to (kept in the domain's metadata)."""

    namespace: str
    name: str
    uid: str
    generation: int = 0


@dataclass(frozen=True)
class KernelBoot:
    """Direct kernel boot (`<os><kernel>`): host paths."""

    kernel: str
    initrd: str | None = None
    cmdline: str | None = None


@dataclass(frozen=True)
class Domain:
    name: str
    uuid: str
    memory_kib: int
    vcpus: int
    vm: VmRef
    domain_type: str = "kvm"
    machine: str | None = "q35"
    placement: Placement | None = None
    disks: tuple[Disk, ...] = ()
    hostdevs: tuple[HostdevPci, ...] = ()
    interfaces: tuple[HostdevInterface | DirectInterface, ...] = ()
    kernel_boot: KernelBoot | None = None
    console_log: str | None = None
    """A host file the serial console is copied to (libvirt's `<serial><log file=...>`)."""
    extra: dict[str, str] = field(default_factory=dict)

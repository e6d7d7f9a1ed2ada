"""A scheduled PassthroughVM + the host's facts -> the domain model. PURE.

The VM's status says which devices it holds (the controller wrote them, claims verified by the
caller); spec says how the guest sees them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

from nodeplugin.domain.model import (
    DirectInterface,
    Disk,
    Domain,
    GuestCell,
    HostdevInterface,
    HostdevPci,
    KernelBoot,
    NumaBus,
    Placement,
    VmRef,
)
from pcipt.api.v1alpha1 import PassthroughVM
from pcipt.pci import PciAddress, generated_mac
from pcipt.quantity import quantity_bytes


class BuildError(ValueError):
    """The VM cannot become a domain on this host; the message says why."""


@dataclass(frozen=True)
class HostFacts:
    numa_cpus: Mapping[int, tuple[int, ...]]
    reserved_cpus: tuple[int, ...] = ()
    """The host's own CPUs: no vCPU runs there; dedicated VMs' emulator threads do."""
    dedicated_elsewhere: frozenset[int] = frozenset()
    """Host CPUs dedicated to other VMs on this host: shared vCPUs keep off them."""
    domain_type: str = "kvm"
    machine: str | None = "q35"
    console_log_dir: str | None = None
    """Where each domain's serial console is copied to, as <dir>/<domain>.log; None: nowhere."""


def _host_path(url: str) -> str:
    return url[len("file://") :]


def domain_name(namespace: str, name: str) -> str:
    """`<namespace>_<name>`: unique per cluster, and '_' cannot occur in either part."""
    return f"{namespace}_{name}"


def _targets(bus: str, index: int) -> str:
    prefix = "vd" if bus == "virtio" else "sd"
    return prefix + "abcdefghijklmnopqrstuvwxyz"[index]


def build_domain(vm: PassthroughVM, host: HostFacts) -> Domain:
    ns = vm.metadata.namespace or "default"
    uid = vm.metadata.uid or ""
    spec, status = vm.spec, vm.status
    counters: dict[str, int] = {}
    disks = []
    for d in spec.disks:
        n = counters.get(d.bus, 0)
        counters[d.bus] = n + 1
        fmt: Literal["qcow2", "raw"] = "qcow2" if d.image.endswith(".qcow2") else "raw"
        target = _targets(d.bus, n)
        if d.image.startswith("file://"):
            path = d.image[len("file://") :]
            disks.append(Disk(target, d.bus, file=path, read_only=d.read_only, format=fmt))
        else:
            disks.append(Disk(target, d.bus, url=d.image, read_only=True, format=fmt))
    per_request: dict[str, int] = {}
    hostdevs = []
    for b in status.devices:
        i = per_request.get(b.request, 0)
        per_request[b.request] = i + 1
        hostdevs.append(HostdevPci(PciAddress.parse(b.address), f"ua-{b.request}-{i}"))
    requests = {n.name: n for n in spec.networks}
    interfaces: list[HostdevInterface | DirectInterface] = []
    for nb in status.networks:
        req = requests.get(nb.name)
        if req is None:
            # Removed from the spec, and about to be detached (the controller moves it to
            # status.detaching): a domain defined now does without it.
            continue
        mac = nb.mac or req.mac or generated_mac(uid, nb.name)
        alias = f"ua-net-{nb.name}"
        if req.mode == "macvtap":
            if not nb.netdev:
                raise BuildError(f"network {nb.name}: VF {nb.address} has no netdev for macvtap")
            interfaces.append(DirectInterface(nb.netdev, alias, mac, nb.max_tx_rate))
        else:
            interfaces.append(HostdevInterface(PciAddress.parse(nb.address), alias, mac, req.vlan))
    placement = _placement(vm, host)
    if placement is not None and placement.cells:
        placement, hostdevs, interfaces = _devices_on_cells(placement, vm, hostdevs, interfaces)
    kernel_boot = None
    if spec.kernel_boot is not None:
        kb = spec.kernel_boot
        kernel_boot = KernelBoot(
            _host_path(kb.kernel), kb.initrd and _host_path(kb.initrd), kb.cmdline
        )
    name = domain_name(ns, vm.metadata.name)
    return Domain(
        name=name,
        uuid=uid,
        memory_kib=_memory_kib(vm),
        vcpus=_vcpus(vm),
        vm=VmRef(ns, vm.metadata.name, uid, vm.metadata.generation or 0),
        domain_type=host.domain_type,
        machine=host.machine,
        placement=placement,
        disks=tuple(disks),
        hostdevs=tuple(hostdevs),
        interfaces=tuple(interfaces),
        kernel_boot=kernel_boot,
        console_log=f"{host.console_log_dir.rstrip('/')}/{name}.log"
        if host.console_log_dir
        else None,
    )


def _shared_cpus(host: HostFacts, node: int) -> tuple[int, ...]:
    cpus = host.numa_cpus.get(node)
    if not cpus:
        raise BuildError(f"NUMA node {node} has no CPUs on this host")
    keep_off = set(host.reserved_cpus) | host.dedicated_elsewhere
    return tuple(c for c in cpus if c not in keep_off) or tuple(cpus)


def _vcpus(vm: PassthroughVM) -> int:
    """What the controller counted when it placed the VM (a later edit of the spec takes effect
    when the VM is placed again: RestartRequired says so); the spec where nothing was counted."""
    c = vm.status.compute
    return c.vcpus if c is not None and c.vcpus else vm.spec.cpu.cores


def _memory_kib(vm: PassthroughVM) -> int:
    c = vm.status.compute
    if c is not None and c.memory_mib:
        return c.memory_mib * 1024
    return -(-quantity_bytes(vm.spec.memory) // 1024)


def _placement(vm: PassthroughVM, host: HostFacts) -> Placement | None:
    """What the controller counted decides: dedicated vCPUs one-to-one on their host CPUs
    (emulator threads on the host's reserved CPUs, else on the VM's own), shared vCPUs over
    their NUMA node's shared CPUs, memory strictly on the node(s) it was counted on, a guest
    NUMA node per host node when the VM spans several. A VM the controller did not count
    (the node published no topology) keeps the older rule: vCPUs on the NUMA node of its
    devices, memory not bound."""
    spec, status = vm.spec, vm.status
    c = status.compute
    if c is None or not c.numa:
        if c is None and status.numa_node is not None and spec.cpu.pinning == "auto":
            cpus = _shared_cpus(host, status.numa_node)
            return Placement(tuple(cpus for _ in range(spec.cpu.cores)), cpus)
        return None
    vcpu_cpus: dict[int, tuple[int, ...]] = {}
    for share in c.numa:
        if c.policy == "dedicated":
            if share.cpus is None or len(share.cpus) != len(share.vcpus):
                raise BuildError(f"status.compute gives NUMA node {share.node} no host CPUs")
            for v, cpu in zip(share.vcpus, share.cpus, strict=True):
                vcpu_cpus[v] = (cpu,)
        else:
            pool = _shared_cpus(host, share.node)
            for v in share.vcpus:
                vcpu_cpus[v] = pool
    vcpus = _vcpus(vm)
    if sorted(vcpu_cpus) != list(range(vcpus)):
        raise BuildError(
            f"status.compute places vCPUs {sorted(vcpu_cpus)}, not the {vcpus} it counted"
        )
    ordered = tuple(vcpu_cpus[v] for v in range(vcpus))
    own = tuple(sorted({x for cpus in ordered for x in cpus}))
    emulator = tuple(host.reserved_cpus) if c.policy == "dedicated" and host.reserved_cpus else own
    cells: tuple[GuestCell, ...] = ()
    if len(c.numa) > 1:
        cells = tuple(
            GuestCell(i, tuple(s.vcpus), s.memory_mib * 1024, s.node) for i, s in enumerate(c.numa)
        )
    return Placement(
        ordered,
        emulator,
        tuple(s.node for s in c.numa),
        cells,
        c.page_size_kib,
    )


def _devices_on_cells(
    placement: Placement,
    vm: PassthroughVM,
    hostdevs: list[HostdevPci],
    interfaces: list[HostdevInterface | DirectInterface],
) -> tuple[Placement, list[HostdevPci], list[HostdevInterface | DirectInterface]]:
    """Each passed-through device behind an expander bus on the guest NUMA node that backs
    its host NUMA node, so the guest sees where it is (Nova's guest NUMA + PCI affinity)."""
    cell_of = {c.host_node: c.id for c in placement.cells}
    numa_of = {b.address: b.numa_node for b in vm.status.devices}
    numa_of.update({n.address: n.numa_node for n in vm.status.networks})
    by_cell: dict[int, list[str]] = {}
    for h in [*hostdevs, *interfaces]:
        if isinstance(h, DirectInterface):
            continue
        cell = cell_of.get(numa_of.get(str(h.address), -1))
        if cell is not None:
            by_cell.setdefault(cell, []).append(str(h.address))
    buses = []
    bus_of: dict[str, int] = {}
    index = 1  # 0 is pcie-root
    for cell in sorted(by_cell):
        ports = tuple(range(index + 1, index + 1 + len(by_cell[cell])))
        buses.append(NumaBus(index, cell, ports))
        bus_of.update(zip(by_cell[cell], ports, strict=True))
        index += 1 + len(ports)
    hostdevs = [replace(h, guest_bus=bus_of.get(str(h.address))) for h in hostdevs]
    interfaces = [
        replace(i, guest_bus=bus_of.get(str(i.address))) if isinstance(i, HostdevInterface) else i
        for i in interfaces
    ]
    return replace(placement, buses=tuple(buses)), hostdevs, interfaces

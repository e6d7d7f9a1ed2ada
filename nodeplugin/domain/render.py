"""Domain model -> libvirt domain XML, with ElementTree (never by pasting strings), and back
to the few facts a running domain is checked for. PURE."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import replace
from urllib.parse import urlparse

from nodeplugin.domain.model import (
    XMLNS,
    DirectInterface,
    Disk,
    Domain,
    HostdevInterface,
    HostdevPci,
    NumaBus,
    VmRef,
)
from pcipt.cpulist import format_cpulist
from pcipt.pci import PciAddress

ET.register_namespace("pcipt", XMLNS)


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, {k.rstrip("_"): v for k, v in attrs.items()})
    if text is not None:
        el.text = text
    return el


def _pci_attrs(a: PciAddress) -> dict[str, str]:
    return {
        "domain": f"0x{a.domain:04x}",
        "bus": f"0x{a.bus:02x}",
        "slot": f"0x{a.device:02x}",
        "function": f"0x{a.function:x}",
    }


def _disk(devices: ET.Element, d: Disk) -> None:
    if d.file is not None:
        el = _sub(devices, "disk", type_="file", device="disk")
        _sub(el, "driver", name="qemu", type_=d.format)
        _sub(el, "source", file=d.file)
    else:
        assert d.url is not None
        u = urlparse(d.url)
        el = _sub(devices, "disk", type_="network", device="disk")
        _sub(el, "driver", name="qemu", type_=d.format)
        src = _sub(el, "source", protocol=u.scheme, name=u.path or "/")
        port = u.port or (443 if u.scheme == "https" else 80)
        _sub(src, "host", name=u.hostname or "", port=str(port))
    _sub(el, "target", dev=d.target, bus=d.bus)
    if d.read_only or d.url is not None:
        _sub(el, "readonly")


def _guest_address(el: ET.Element, bus: int | None) -> None:
    if bus is not None:
        _sub(
            el,
            "address",
            type_="pci",
            domain="0x0000",
            bus=f"0x{bus:02x}",
            slot="0x00",
            function="0x0",
        )


def _numa_buses(devices: ET.Element, buses: tuple[NumaBus, ...]) -> None:
    for b in buses:
        pxb = _sub(
            devices, "controller", type_="pci", index=str(b.index), model="pcie-expander-bus"
        )
        _sub(_sub(pxb, "target"), "node", str(b.cell))
        for slot, port in enumerate(b.ports):
            rp = _sub(devices, "controller", type_="pci", index=str(port), model="pcie-root-port")
            _sub(
                rp,
                "address",
                type_="pci",
                domain="0x0000",
                bus=f"0x{b.index:02x}",
                slot=f"0x{slot:02x}",
                function="0x0",
            )


def _hostdev(devices: ET.Element, h: HostdevPci) -> None:
    el = _sub(devices, "hostdev", mode="subsystem", type_="pci", managed="no")
    src = _sub(el, "source")
    _sub(src, "address", **_pci_attrs(h.address))
    _sub(el, "alias", name=h.alias)
    _guest_address(el, h.guest_bus)


def _interface(devices: ET.Element, i: HostdevInterface | DirectInterface) -> None:
    if isinstance(i, HostdevInterface):
        el = _sub(devices, "interface", type_="hostdev", managed="no")
        if i.mac:
            _sub(el, "mac", address=i.mac)
        src = _sub(el, "source")
        _sub(src, "address", type_="pci", **_pci_attrs(i.address))
        if i.vlan is not None:
            vlan = _sub(el, "vlan")
            _sub(vlan, "tag", id=str(i.vlan))
        _guest_address(el, i.guest_bus)
    else:
        el = _sub(devices, "interface", type_="direct")
        if i.mac:
            _sub(el, "mac", address=i.mac)
        _sub(el, "source", dev=i.netdev, mode="passthrough")
        if i.max_tx_rate:
            # libvirt's unit is kilobytes per second; Mbps * 1000 / 8.
            bw = _sub(el, "bandwidth")
            _sub(bw, "outbound", average=str(i.max_tx_rate * 125))
        _sub(el, "model", type_="virtio")
    _sub(el, "alias", name=i.alias)


def _metadata(root: ET.Element, vm: VmRef) -> None:
    meta = _sub(root, "metadata")
    el = ET.SubElement(meta, f"{{{XMLNS}}}vm")
    for tag, value in (
        ("namespace", vm.namespace),
        ("name", vm.name),
        ("uid", vm.uid),
        ("generation", str(vm.generation)),
    ):
        ET.SubElement(el, f"{{{XMLNS}}}{tag}").text = value


def render(d: Domain) -> str:
    """The domain's XML, deterministic for the same model."""
    root = ET.Element("domain", {"type": d.domain_type})
    _sub(root, "name", d.name)
    _sub(root, "uuid", d.uuid)
    _metadata(root, d.vm)
    _sub(root, "memory", str(d.memory_kib), unit="KiB")
    _sub(root, "vcpu", str(d.vcpus), placement="static")
    p = d.placement
    if p is not None and p.hugepage_kib:
        backing = _sub(_sub(root, "memoryBacking"), "hugepages")
        _sub(backing, "page", size=str(p.hugepage_kib), unit="KiB")
    if p is not None:
        cputune = _sub(root, "cputune")
        for v, cpus in enumerate(p.vcpu_cpus):
            _sub(cputune, "vcpupin", vcpu=str(v), cpuset=format_cpulist(list(cpus)))
        _sub(cputune, "emulatorpin", cpuset=format_cpulist(list(p.emulator_cpus)))
        if p.memory_nodes:
            numatune = _sub(root, "numatune")
            nodeset = format_cpulist(list(p.memory_nodes))
            _sub(numatune, "memory", mode="strict", nodeset=nodeset)
            for cell in p.cells:
                _sub(
                    numatune,
                    "memnode",
                    cellid=str(cell.id),
                    mode="strict",
                    nodeset=str(cell.host_node),
                )
    os_el = _sub(root, "os")
    type_attrs = {"arch": "x86_64"}
    if d.machine:
        type_attrs["machine"] = d.machine
    _sub(os_el, "type", "hvm", **type_attrs)
    if d.kernel_boot is not None:
        _sub(os_el, "kernel", d.kernel_boot.kernel)
        if d.kernel_boot.initrd:
            _sub(os_el, "initrd", d.kernel_boot.initrd)
        if d.kernel_boot.cmdline:
            _sub(os_el, "cmdline", d.kernel_boot.cmdline)
    else:
        _sub(os_el, "boot", dev="hd")
    features = _sub(root, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    # host-passthrough needs KVM; under TCG (type qemu) the emulator's most capable model.
    cpu = _sub(root, "cpu", mode="host-passthrough" if d.domain_type == "kvm" else "maximum")
    if p is not None and p.cells:
        numa = _sub(cpu, "numa")
        for cell in p.cells:
            _sub(
                numa,
                "cell",
                id=str(cell.id),
                cpus=format_cpulist(list(cell.vcpus)),
                memory=str(cell.memory_kib),
                unit="KiB",
            )
    _sub(root, "on_poweroff", "destroy")
    _sub(root, "on_reboot", "restart")
    _sub(root, "on_crash", "destroy")
    devices = _sub(root, "devices")
    for disk in d.disks:
        _disk(devices, disk)
    if d.placement is not None:
        _numa_buses(devices, d.placement.buses)
    for h in d.hostdevs:
        _hostdev(devices, h)
    for i in d.interfaces:
        _interface(devices, i)
    serial = _sub(devices, "serial", type_="pty")
    if d.console_log:
        _sub(serial, "log", file=d.console_log, append="off")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type_="pty")
    _sub(console, "target", type_="serial", port="0")
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def vm_ref_of(xml: str) -> VmRef | None:
    """Which PassthroughVM a domain belongs to, from its metadata; None for foreign domains."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    el = root.find(f"metadata/{{{XMLNS}}}vm")
    if el is None:
        return None

    def text(tag: str) -> str:
        child = el.find(f"{{{XMLNS}}}{tag}")
        return (child.text or "") if child is not None else ""

    gen = text("generation")
    return VmRef(text("namespace"), text("name"), text("uid"), int(gen) if gen.isdigit() else 0)


def passthrough_addresses(xml: str) -> list[str]:
    """PCI addresses a domain passes through (hostdevs and hostdev interfaces)."""
    root = ET.fromstring(xml)
    out = []
    for el in root.iterfind(".//devices/*/source/address"):
        try:
            out.append(
                str(
                    PciAddress(
                        int(el.get("domain", "0"), 16),
                        int(el.get("bus", "0"), 16),
                        int(el.get("slot", "0"), 16),
                        int(el.get("function", "0"), 16),
                    )
                )
            )
        except ValueError:
            continue
    return sorted(out)


def macvtap_netdevs(xml: str) -> list[str]:
    """Host netdevs a domain's macvtap interfaces sit on (`<interface type='direct'>`)."""
    root = ET.fromstring(xml)
    return sorted(
        dev
        for el in root.iterfind(".//devices/interface[@type='direct']/source")
        if (dev := el.get("dev"))
    )


def device_xml(d: Domain, key: str) -> str | None:
    """One passthrough device of the domain model as libvirt's attach takes it: `key` is a PCI
    address (hostdev, hostdev interface) or `netdev:<name>` (macvtap). Without a guest address:
    libvirt puts a hot-plugged device in a free slot."""
    holder = ET.Element("devices")
    for h in d.hostdevs:
        if str(h.address) == key:
            _hostdev(holder, replace(h, guest_bus=None))
    for i in d.interfaces:
        if isinstance(i, DirectInterface):
            if f"netdev:{i.netdev}" == key:
                _interface(holder, i)
        elif str(i.address) == key:
            _interface(holder, replace(i, guest_bus=None))
    if not len(holder):
        return None
    return ET.tostring(holder[0], encoding="unicode")


def live_device_xml(xml: str, key: str) -> str | None:
    """The element of a defined domain that passes `key` through (as device_xml names it), as
    libvirt's detach takes it."""
    root = ET.fromstring(xml)
    for el in root.iterfind(".//devices/*"):
        src = el.find("source")
        if src is None:
            continue
        if el.tag == "interface" and el.get("type") == "direct":
            if f"netdev:{src.get('dev')}" == key:
                return ET.tostring(el, encoding="unicode")
            continue
        a = src.find("address")
        if a is None:
            continue
        try:
            addr = PciAddress(
                int(a.get("domain", "0"), 16),
                int(a.get("bus", "0"), 16),
                int(a.get("slot", "0"), 16),
                int(a.get("function", "0"), 16),
            )
        except ValueError:
            continue
        if str(addr) == key:
            return ET.tostring(el, encoding="unicode")
    return None


TUNING = ("cputune", "numatune")
"""The elements that pin a domain to a host's CPUs and NUMA nodes: host-specific, rewritten
when a running domain moves to another host."""


def tuning_of(xml: str) -> str:
    """A rendered domain's host-specific pinning, as `<tuning>` holding its cputune and
    numatune elements (empty when it floats): what a live migration's target writes for the
    source to put in the domain it sends."""
    root = ET.fromstring(xml)
    holder = ET.Element("tuning")
    for tag in TUNING:
        el = root.find(tag)
        if el is not None:
            holder.append(el)
    return ET.tostring(holder, encoding="unicode")


def retarget(xml: str, netdevs: dict[str, str], tuning: str | None) -> str:
    """A running domain's XML as its target host should run it: each macvtap interface on the
    target's VF (`netdevs`: this host's netdev -> the target's), and the target's pinning
    (`tuning`, from tuning_of) instead of this host's. Nothing the guest sees changes."""
    root = ET.fromstring(xml)
    for src in root.iterfind(".//devices/interface[@type='direct']/source"):
        dev = src.get("dev")
        if dev in netdevs:
            src.set("dev", netdevs[dev])
    if tuning is not None:
        for tag in TUNING:
            for el in root.findall(tag):
                root.remove(el)
        # libvirt's schema wants them after <vcpu> (and any <iothreads>).
        anchor = next((i for i, el in enumerate(root) if el.tag in ("iothreads", "vcpu")), None)
        at = 0 if anchor is None else anchor + 1
        while at < len(root) and root[at].tag == "iothreads":
            at += 1
        for el in reversed(list(ET.fromstring(tuning))):
            root.insert(at, el)
    return ET.tostring(root, encoding="unicode")

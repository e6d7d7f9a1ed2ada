"""PassthroughVM: a virtual machine with requests for host PCI devices and SR-IOV networks.

Tenants write spec; the controller writes the scheduling part of status (node, devices,
networks, Scheduled/DevicesBound), the node plugin the domain part (DomainReady, phase).
Types and per-object rules only.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import AfterValidator, ConfigDict, Field, field_validator, model_validator

from pcipt import constants as c
from pcipt.api.v1alpha1.meta import (
    QUANTITY_RULE,
    ApiModel,
    Conditions,
    RequestName,
    ResourceKind,
    cel,
    cel_matches,
    cel_value_message,
    check_quantity,
    k8s,
    printer_column,
)
from pcipt.api.v1alpha1.pcidevice import PciAddressStr, check_address
from pcipt.api.v1alpha1.pciflavor import NumaPolicy
from pcipt.api.v1alpha1.selector import DeviceSelector
from pcipt.quantity import quantity_bytes

MAC_PATTERN = r"^[0-9a-fA-F][02468aceACE](:[0-9a-fA-F]{2}){5}$"
IMAGE_SCHEMES = ("file:///", "http://", "https://")
DNS_SUBDOMAIN_MAX = 253

Quantity = Annotated[
    int | str,
    Field(json_schema_extra=k8s(QUANTITY_RULE, int_or_string=True)),
    AfterValidator(check_quantity),
]

FlavorName = Annotated[str, Field(min_length=1, max_length=DNS_SUBDOMAIN_MAX)]


class CpuSpec(ApiModel):
    """Virtual CPUs and how they are placed on the host."""

    cores: int = Field(default=1, ge=1, le=512)
    """Number of vCPUs."""
    pinning: Literal["auto", "none"] = "auto"
    """auto: pin vCPUs and memory to the NUMA node of the VM's devices when a request's NUMA
    policy asks for locality; none: let the host scheduler place them."""
    policy: Literal["shared", "dedicated"] = "shared"
    """shared: vCPUs float over the host's shared CPUs (counted with the controller's CPU
    allocation ratio); dedicated: each vCPU gets a host CPU of its own, chosen at bind and
    recorded in status.compute, thread siblings kept together (Nova's hw:cpu_policy)."""
    numa_nodes: int = Field(default=1, alias="numaNodes", ge=1, le=8)
    """Host NUMA nodes the VM may span (Nova's hw:numa_nodes). 1: vCPUs and memory on one
    NUMA node when they are bound to one; more: a VM too big for one node is split evenly
    over that many, with a guest NUMA topology to match."""


class HugepagesSpec(ApiModel):
    """Back guest memory with the host's hugepages (counted per NUMA node)."""

    page_size: Literal["2Mi", "1Gi"] = "2Mi"
    """The page size; guest memory must be a multiple of it."""


class Disk(ApiModel):
    """A disk image attached to the VM."""

    name: RequestName
    """Name of the disk, unique in the VM."""
    image: str = Field(
        min_length=1,
        max_length=2048,
        json_schema_extra=k8s(
            cel(
                "self.startsWith('file:///') || self.startsWith('http://') || "
                "self.startsWith('https://')",
                message_expression=cel_value_message(
                    "is not a disk image location: use file:///path or an http(s):// URL"
                ),
            )
        ),
    )
    """The image: file:///path/on/the/host.qcow2, or an http:// or https:// URL."""
    bus: Literal["virtio", "sata", "scsi", "usb"] = "virtio"
    """The bus the guest sees the disk on."""
    read_only: bool = False
    """Attach the disk read-only."""

    @field_validator("image")
    @classmethod
    def _image(cls, v: str) -> str:
        if not v.startswith(IMAGE_SCHEMES):
            raise ValueError(
                f"'{v}' is not a disk image location: use file:///path or an http(s):// URL"
            )
        return v


class DeviceAlternative(ApiModel):
    """Another way to satisfy a device request, tried when the ones before it do not fit
    (Kubernetes DRA's firstAvailable)."""

    flavor: FlavorName
    """The PciFlavor to take devices from."""
    count: int = Field(default=1, ge=1, le=16)
    """How many devices of the flavor."""
    numa_policy: NumaPolicy | None = None
    """Overrides the flavor's NUMA policy for this alternative."""
    selector: DeviceSelector | None = None
    """Extra constraints on top of the flavor's selector."""


class DeviceRequest(ApiModel):
    """A request for PCI devices of one flavor (or, with alternatives, of the first of several
    that fits)."""

    model_config = ConfigDict(
        json_schema_extra=k8s(
            cel(
                "!has(self.address) || self.count == 1",
                "address pins one device, so count must be 1",
                field_path=".address",
            ),
            cel(
                "!has(self.attachWhenFree) || !self.attachWhenFree || "
                "(has(self.optional) && self.optional)",
                "attachWhenFree is for optional requests",
                field_path=".attachWhenFree",
            ),
            cel(
                "!has(self.address) || !has(self.alternatives) || size(self.alternatives) == 0",
                "a pinned address has no alternatives",
                field_path=".alternatives",
            ),
        )
    )

    name: RequestName
    """Name of the request, unique among the VM's devices and networks."""
    flavor: FlavorName
    """The PciFlavor to take devices from."""
    count: int = Field(default=1, ge=1, le=16)
    """How many devices of the flavor."""
    optional: bool = False
    """Boot without the devices when none are free, instead of staying Pending; status.skipped
    says so."""
    attach_when_free: bool = False
    """With optional: a request the VM was placed without is hot-plugged into the running VM
    once a device for it is free on its node."""
    numa_policy: NumaPolicy | None = None
    """Overrides the flavor's NUMA policy for this request: none, preferred or required."""
    selector: DeviceSelector | None = None
    """Extra constraints on top of the flavor's selector, e.g. a product ID or an attribute."""
    address: PciAddressStr | None = None
    """Pin one specific device by PCI address (with spec.nodeSelector to choose the host)."""
    alternatives: list[DeviceAlternative] = Field(default_factory=list, max_length=7)
    """Other ways to satisfy the request, in order of preference after flavor and count (up
    to 7, so 8 in all, as in Kubernetes DRA): on each node the first that fits is taken, and
    a node where an earlier one fits is preferred. status.devices[].alternative says which.
    E.g. an H100, else two A100s."""

    def options(self) -> list[DeviceAlternative]:
        """The request's ways, in order: its own flavor and count first."""
        own = DeviceAlternative(
            flavor=self.flavor, count=self.count, numa_policy=self.numa_policy,
            selector=self.selector,
        )  # fmt: skip
        return [own, *self.alternatives]

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        return None if v is None else check_address(v)

    @model_validator(mode="after")
    def _pin_is_single(self) -> Self:
        if self.address is not None and self.count != 1:
            raise ValueError("address pins one device, so count must be 1")
        if self.attach_when_free and not self.optional:
            raise ValueError("attachWhenFree is for optional requests")
        if self.address is not None and self.alternatives:
            raise ValueError("a pinned address has no alternatives")
        return self


class NetworkRequest(ApiModel):
    """A request for an SR-IOV virtual function on a physical network."""

    model_config = ConfigDict(
        json_schema_extra=k8s(
            cel(
                "!has(self.minTxRate) || !has(self.maxTxRate) || self.maxTxRate == 0 "
                "|| self.minTxRate <= self.maxTxRate",
                "minTxRate must not be above maxTxRate",
                field_path=".minTxRate",
            )
        )
    )

    name: RequestName
    """Name of the network, unique among the VM's devices and networks."""
    flavor: FlavorName
    """The PciFlavor (of deviceType nic) to take the VF from."""
    physical_network: str | None = Field(default=None, min_length=1, max_length=253)
    """The physical network the VF's port must be cabled to, e.g. physnet2."""
    vlan: int | None = Field(default=None, ge=1, le=4094)
    """VLAN ID the VF is put on (1-4094); absent means untagged."""
    mac: str | None = Field(
        default=None,
        max_length=17,
        json_schema_extra=k8s(
            cel(
                cel_matches(MAC_PATTERN),
                message_expression=cel_value_message(
                    "is not a unicast MAC address: use six hex pairs separated by colons, "
                    "e.g. 52:54:00:12:34:56"
                ),
            )
        ),
    )
    """MAC address for the guest's interface; absent means one is generated."""
    mode: Literal["hostdev", "macvtap"] = "hostdev"
    """hostdev: the VF is passed to the guest; macvtap: the guest gets a virtio NIC on a macvtap
    in passthrough mode over the VF's netdev (slower, but live-migratable)."""
    trusted: bool = False
    """Trusted VF: the guest may change its MAC and enter promiscuous mode. The flavor must
    allow it."""
    spoof_check: bool = True
    """MAC spoof checking on the VF. Turning it off needs the flavor's permission."""
    min_tx_rate: int | None = Field(default=None, alias="minTxRate", ge=0, le=1_000_000)
    """Guaranteed transmit rate of the VF in Mbps (`ip link ... vf N min_tx_rate`); the
    flavor must allow it (networking.allowMinTxRate). Absent or 0: none."""
    max_tx_rate: int | None = Field(default=None, alias="maxTxRate", ge=0, le=1_000_000)
    """Transmit rate limit of the VF in Mbps (`max_tx_rate`); at most the flavor's
    networking.maxTxRate. Absent or 0: no limit (unless the flavor sets one)."""
    link_state: Literal["auto", "enable", "disable"] | None = Field(default=None, alias="linkState")
    """The VF's link as the guest sees it: auto (follows the PF's), enable (up even with the
    PF's link down, for VF-to-VF traffic), disable. Anything but auto needs the flavor's
    networking.allowLinkState. Absent: auto."""

    @model_validator(mode="after")
    def _rates(self) -> NetworkRequest:
        if self.min_tx_rate and self.max_tx_rate and self.min_tx_rate > self.max_tx_rate:
            raise ValueError(f"minTxRate {self.min_tx_rate} is above maxTxRate {self.max_tx_rate}")
        return self

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str | None) -> str | None:
        if v is not None and not re.match(MAC_PATTERN, v):
            raise ValueError(
                f"'{v}' is not a unicast MAC address: use six hex pairs separated by colons, "
                "e.g. 52:54:00:12:34:56"
            )
        return v


class Placement(ApiModel):
    """Constraints across requests."""

    same_numa: list[RequestName] | None = Field(
        default=None, alias="sameNUMA", max_length=48, json_schema_extra=k8s(list_type="set")
    )
    """Names of device and network requests whose devices must all be on one NUMA node."""
    same_pcie_root: list[RequestName] | None = Field(
        default=None, alias="samePCIeRoot", max_length=48, json_schema_extra=k8s(list_type="set")
    )
    """Names of device and network requests whose devices must all be under one PCI root
    complex (their PciDevices' status.pcieRoot), e.g. a GPU and a NIC for GPUDirect RDMA
    traffic that must not cross the CPU interconnect (Kubernetes DRA's pcieRoot)."""


_UNIQUE_NAMES = cel(
    "!has(self.devices) || !has(self.networks) || "
    "self.devices.all(d, !self.networks.exists(n, n.name == d.name))",
    "request names must be unique across devices and networks",
)
_SAME_ROOT_KNOWN = cel(
    "!has(self.placement) || !has(self.placement.samePCIeRoot) || "
    "self.placement.samePCIeRoot.all(r, "
    "(has(self.devices) && self.devices.exists(d, d.name == r)) || "
    "(has(self.networks) && self.networks.exists(n, n.name == r)))",
    "placement.samePCIeRoot may only name requests listed in devices or networks",
    field_path=".placement.samePCIeRoot",
)
_SAME_NUMA_KNOWN = cel(
    "!has(self.placement) || !has(self.placement.sameNUMA) || self.placement.sameNUMA.all(r, "
    "(has(self.devices) && self.devices.exists(d, d.name == r)) || "
    "(has(self.networks) && self.networks.exists(n, n.name == r)))",
    "placement.sameNUMA may only name requests listed in devices or networks",
    field_path=".placement.sameNUMA",
)


HostPath = Annotated[
    str,
    Field(
        min_length=9,
        max_length=2048,
        json_schema_extra=k8s(
            cel(
                "self.startsWith('file:///')",
                message_expression=cel_value_message("is not a file on the host: use file:///path"),
            )
        ),
    ),
]


class KernelBoot(ApiModel):
    """Boot a kernel and initrd kept on the host instead of a disk's boot loader (libvirt's
    direct kernel boot; KubeVirt's kernelBoot, with host files in place of a container image)."""

    kernel: HostPath
    """The kernel: file:///path/on/the/host."""
    initrd: HostPath | None = None
    """The initial ramdisk: file:///path/on/the/host."""
    cmdline: str | None = Field(default=None, max_length=4096)
    """The kernel command line, e.g. console=ttyS0."""

    @field_validator("kernel", "initrd")
    @classmethod
    def _file_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("file:///"):
            raise ValueError(f"'{v}' is not a file on the host: use file:///path")
        return v


_HUGEPAGES_FIT = cel(
    "!has(self.hugepages) || quantity(string(self.memory)).asInteger() % "
    "quantity(self.hugepages.pageSize).asInteger() == 0",
    "memory must be a multiple of hugepages.pageSize",
    field_path=".memory",
)


class PassthroughVMSpec(ApiModel):
    """The VM the tenant wants: size, disks, devices, networks and placement."""

    model_config = ConfigDict(
        json_schema_extra=k8s(_UNIQUE_NAMES, _SAME_NUMA_KNOWN, _SAME_ROOT_KNOWN, _HUGEPAGES_FIT)
    )

    running: bool = True
    """Whether the VM should run. false stops it but keeps its devices bound."""
    cpu: CpuSpec = Field(default_factory=CpuSpec)
    """vCPUs and their placement."""
    memory: Quantity
    """Guest memory, e.g. 8Gi."""
    hugepages: HugepagesSpec | None = None
    """Back memory with hugepages of this size, from the NUMA node(s) the VM is bound to."""
    disks: list[Disk] = Field(
        default_factory=list, max_length=16, json_schema_extra=k8s(list_map_keys=["name"])
    )
    """Disk images, the first one boots (unless kernelBoot is given)."""
    kernel_boot: KernelBoot | None = None
    """Boot this kernel directly; disks are still attached."""
    node_selector: dict[str, str] | None = None
    """Node labels the host must have, e.g. kubernetes.io/hostname: node-a."""
    devices: list[DeviceRequest] = Field(
        default_factory=list, max_length=32, json_schema_extra=k8s(list_map_keys=["name"])
    )
    """PCI devices to pass through."""
    networks: list[NetworkRequest] = Field(
        default_factory=list, max_length=16, json_schema_extra=k8s(list_map_keys=["name"])
    )
    """SR-IOV networks to attach."""
    placement: Placement | None = None
    """Constraints across requests, such as a shared NUMA node."""
    evacuation_policy: Literal["Restart", "Wait"] = "Restart"
    """What happens when the VM's node is known to be down (the Node carries the
    node.kubernetes.io/out-of-service taint, or its lease lapsed on a node group whose admin
    opted in): Restart releases its devices and places it on another node; Wait keeps its
    devices and waits for the node to come back."""

    @model_validator(mode="after")
    def _cross_request_rules(self) -> Self:
        for field, items in (
            ("disks", self.disks),
            ("devices", self.devices),
            ("networks", self.networks),
        ):
            seen: set[str] = set()
            for item in items:
                if item.name in seen:
                    raise ValueError(f"{field}: duplicate name '{item.name}'")
                seen.add(item.name)
        device_names = {d.name for d in self.devices}
        network_names = {n.name for n in self.networks}
        if device_names & network_names:
            raise ValueError("request names must be unique across devices and networks")
        if self.hugepages is not None:
            page = quantity_bytes(self.hugepages.page_size)
            if quantity_bytes(self.memory) % page:
                raise ValueError(
                    f"memory ({self.memory}) is not a multiple of hugepages.pageSize "
                    f"({self.hugepages.page_size})"
                )
        for field_name, names in (
            ("sameNUMA", self.placement.same_numa if self.placement else None),
            ("samePCIeRoot", self.placement.same_pcie_root if self.placement else None),
        ):
            if set(names or []) - (device_names | network_names):
                raise ValueError(
                    f"placement.{field_name} may only name requests listed in devices or networks"
                )
        return self

    def request_names(self) -> list[str]:
        return [d.name for d in self.devices] + [n.name for n in self.networks]


Phase = Literal[
    "Pending", "Scheduled", "Starting", "Running", "Stopped", "Failed", "Terminating", "Migrating"
]


class DeviceBinding(ApiModel):
    """A device bound to the VM."""

    request: str
    """The device request it satisfies."""
    pci_device: str
    """Name of the PciDevice object."""
    address: str
    """PCI address on the node."""
    numa_node: int = -1
    """NUMA node of the device (-1 unknown)."""
    companion: bool = False
    """True when bound only because it shares an IOMMU group with a requested device."""
    alternative: int | None = Field(default=None, ge=1, le=7)
    """Which of the request's alternatives it was bound for (1 = the first of
    spec.devices[].alternatives); absent: the request's own flavor and count."""
    since: datetime | None = None
    """When it was bound to the VM (its device time, for charging, counts from its claim,
    made a moment before: `kubectl pcipt usage`)."""


class NetworkBinding(ApiModel):
    """An SR-IOV VF bound to the VM for a network request."""

    name: str
    """The network request."""
    pci_device: str
    """Name of the PciDevice object (the VF)."""
    address: str
    """PCI address of the VF on the node."""
    numa_node: int = -1
    """NUMA node of the VF (-1 unknown)."""
    mac: str | None = None
    """MAC address given to the guest's interface."""
    netdev: str | None = None
    """Host interface name of the VF (for macvtap mode)."""
    vlan: int | None = None
    """VLAN ID the VF is on."""
    min_tx_rate: int | None = Field(default=None, alias="minTxRate")
    """Guaranteed transmit rate set on the VF, Mbps."""
    max_tx_rate: int | None = Field(default=None, alias="maxTxRate")
    """Transmit rate limit set on the VF, Mbps (the request's, or its flavor's maximum)."""
    link_state: str | None = Field(default=None, alias="linkState")
    """Link state set on the VF (enable, disable); absent: auto."""
    since: datetime | None = None
    """When it was bound to the VM (its device time, for charging, counts from its claim,
    made a moment before: `kubectl pcipt usage`)."""


class DetachingDevice(ApiModel):
    """A device of a request removed from the running VM's spec: the node plugin detaches it
    live; the controller releases it once the domain no longer has it."""

    request: str
    """The request it was bound for."""
    pci_device: str
    """Name of the PciDevice object."""
    address: str
    """PCI address on the node."""


class SkippedRequest(ApiModel):
    """An optional request the VM booted without."""

    request: str
    """The request."""
    reason: str
    """Why no device was given."""


class NodeRefusal(ApiModel):
    """Why one node could not take the VM."""

    node_name: str
    """The node."""
    reasons: list[str] = Field(default_factory=list)
    """Each constraint the node failed, in words."""


class SchedulingStatus(ApiModel):
    """The scheduler's last verdict on a VM it could not place."""

    message: str = ""
    """Aggregated reasons, e.g. '0/5 nodes are available: 3 node(s) have only 1 free a100
    (need 2); 2 node(s) not alive'."""
    nodes: list[NodeRefusal] = Field(default_factory=list)
    """Per-node reasons, capped (see truncated)."""
    truncated: bool = False
    """True when more nodes were refused than are listed."""
    last_attempt_time: datetime | None = None
    """When the scheduler last tried."""


class DomainStatus(ApiModel):
    """The libvirt domain that runs the VM."""

    name: str | None = None
    """Domain name on the host."""
    uuid: str | None = None
    """Domain UUID."""
    state: str | None = None
    """libvirt's state of the domain: running, shut off, paused, ..."""
    devices: list[str] = Field(default_factory=list)
    """PCI addresses the domain passes through, read back from libvirt: what the guest really
    got, to compare with status.devices and status.networks."""


class NumaShare(ApiModel):
    """What the VM takes of one host NUMA node."""

    node: int
    """The host NUMA node."""
    vcpus: list[int] = Field(default_factory=list)
    """The VM's vCPU indexes placed on it (the guest NUMA node's CPUs when it spans)."""
    cpus: list[int] | None = None
    """Dedicated policy: the host CPUs, one per vCPU, in the same order (vcpupin)."""
    memory_mib: int = Field(default=0, alias="memoryMiB")
    """Guest memory bound to this node, MiB."""


class ComputeStatus(ApiModel):
    """The host CPUs and memory the controller counted for the VM when it placed it."""

    policy: Literal["shared", "dedicated"] = "shared"
    """As spec.cpu.policy."""
    vcpus: int = 0
    """vCPUs counted."""
    memory_mib: int = Field(default=0, alias="memoryMiB")
    """Memory counted, MiB."""
    page_size_kib: int | None = Field(default=None, alias="pageSizeKiB")
    """Hugepage size backing the memory, KiB."""
    numa: list[NumaShare] = Field(default_factory=list)
    """Host NUMA nodes the vCPUs and memory are bound to; empty: they float over the host."""


class Evacuation(ApiModel):
    """The VM's last evacuation from a node that was down."""

    from_node: str
    """The node it was on."""
    time: datetime | None = None
    """When the controller released it from that node."""
    reason: str = ""
    """Why the node was known to be down."""
    devices: list[str] = Field(default_factory=list)
    """The PciDevices it held there, released."""


class Migration(ApiModel):
    """A migration (`kubectl pcipt migrate [--live]`, i.e. the pcipt.io/migrate annotation).
    Cold: the VM is stopped on its node, its devices released once the domain is gone, and it
    is placed again on the target (or any other node) and started there. Live: the VM is
    placed on the target while it runs on its node; its VFs are unplugged, the running domain
    is moved by libvirt, new VFs are plugged in at the target, and only then are the old
    node's devices released."""

    id: str = Field(min_length=1, max_length=64)
    """The request's ID, from the annotation."""
    from_node: str
    """The node it leaves."""
    to_node: str | None = None
    """The node asked for (live: the node chosen); absent: any node but from_node."""
    live: bool = False
    """A live migration: the guest keeps running."""
    phase: Literal[
        "Stopping",
        "Placing",
        "Preparing",
        "Ready",
        "Transferring",
        "Transferred",
        "Completed",
        "Failed",
    ] = "Stopping"
    """Cold: Stopping (waiting for the old domain to go), Placing (released there, being
    placed again). Live: Preparing (devices claimed on the target, its node plugin prepares
    them), Ready (the target is ready), Transferring (the old node unplugged the VFs and
    libvirt is moving the domain), Transferred (the domain runs on the target). Both:
    Completed (placed on the new node), Failed (message says why; the VM stays where it
    was)."""
    networks: list[NetworkBinding] = Field(default_factory=list)
    """Live: the VFs claimed for the VM's networks on the target, while the migration runs."""
    compute: ComputeStatus | None = None
    """Live: the CPUs and memory counted for the VM on the target, while the migration runs."""
    target_uri: str | None = Field(default=None, alias="targetURI")
    """Live: the libvirt URI the old node migrates the domain to (the target's Lease says)."""
    tuning: str | None = None
    """Live: the target's CPU pinning and NUMA memory binding for the domain (libvirt's
    cputune and numatune elements), written by the target's node plugin."""
    started_at: datetime | None = None
    """When the controller took the request."""
    completed_at: datetime | None = None
    """When it was placed again (or refused)."""
    message: str = ""
    """What happened, in words."""


class PassthroughVMStatus(ApiModel):
    """Where the VM is, what it was given, and why it is not running yet."""

    phase: Phase = "Pending"
    """Pending, Scheduled, Starting, Running, Stopped, Failed, Terminating or Migrating."""
    node_name: str | None = None
    """The node the VM is placed on."""
    devices: list[DeviceBinding] = Field(default_factory=list)
    """Devices bound to the VM, IOMMU companions included."""
    networks: list[NetworkBinding] = Field(default_factory=list)
    """VFs bound for the network requests."""
    skipped: list[SkippedRequest] = Field(default_factory=list)
    """Optional requests the VM was placed without."""
    detaching: list[DetachingDevice] = Field(default_factory=list)
    """Devices of requests removed from the spec, being detached from the running domain;
    still claimed until the domain no longer has them."""
    device_summary: str | None = None
    """Bound/requested device count, e.g. 2/2, for kubectl get."""
    numa_node: int | None = None
    """The host NUMA node the VM's vCPUs and memory are pinned to: set when a request's NUMA
    policy (or placement.sameNUMA) asks for locality, all those devices share one node, and
    cpu.pinning is auto."""
    compute: ComputeStatus | None = None
    """The CPUs and memory counted for the VM on its node (absent when the node publishes no
    compute topology)."""
    scheduling: SchedulingStatus | None = None
    """Why the VM is not placed yet, when it is Pending."""
    domain: DomainStatus | None = None
    """The libvirt domain."""
    evacuation: Evacuation | None = None
    """The last evacuation from a node that was down, if any."""
    migration: Migration | None = None
    """The last migration (cold or live), if any."""
    conditions: Conditions
    """Scheduled, DevicesBound, DomainReady and Ready, each with reason and message."""
    observed_generation: int | None = None
    """The metadata.generation this status was computed for."""


class PassthroughVM(ResourceKind):
    """A virtual machine with host PCI devices and SR-IOV networks passed through."""

    crd_plural: ClassVar[str] = c.PLURAL_PASSTHROUGHVM
    crd_scope: ClassVar[Literal["Cluster", "Namespaced"]] = "Namespaced"
    crd_short_names: ClassVar[list[str]] = ["ptvm"]
    crd_description: ClassVar[str] = (
        "PassthroughVM is a virtual machine with host PCI devices (GPUs, NVMe drives, FPGAs) "
        "and SR-IOV networks passed through. The controller places it on a node and binds "
        "free PciDevices to it; the node plugin runs it as a libvirt domain."
    )
    # A node plugin watches the VMs of its node by this field: placing a VM is then its status
    # write alone, with no label to write besides.
    crd_selectable_fields: ClassVar[list[str]] = [".status.nodeName"]
    crd_printer_columns: ClassVar[list[dict[str, Any]]] = [
        printer_column("Phase", ".status.phase"),
        printer_column("Node", ".status.nodeName"),
        printer_column("Devices", ".status.deviceSummary"),
        printer_column("Ready", '.status.conditions[?(@.type=="Ready")].status'),
        printer_column("Age", ".metadata.creationTimestamp", type="date"),
        printer_column("Reason", '.status.conditions[?(@.type=="Ready")].message', priority=1),
    ]

    spec: PassthroughVMSpec
    status: PassthroughVMStatus = Field(default_factory=PassthroughVMStatus)

"""PciDevice: one PCI function on one host that may be passed through to a VM.

The node plugin creates it and writes its status; the controller writes spec.claimRef; an
admin may set spec.unschedulable. Types and naming rules only.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import ConfigDict, Field, field_validator, model_validator

from pcipt import constants as c
from pcipt.api.v1alpha1.meta import (
    ApiModel,
    Conditions,
    ResourceKind,
    cel,
    cel_matches,
    cel_value_message,
    k8s,
    printer_column,
)
from pcipt.api.v1alpha1.selector import SriovRole
from pcipt.pci import ADDRESS_HINT, ADDRESS_PATTERN, PciAddress, is_canonical_address

PciAddressStr = Annotated[
    str,
    Field(
        max_length=12,
        json_schema_extra=k8s(
            cel(
                cel_matches(ADDRESS_PATTERN),
                message_expression=cel_value_message(f"is not a PCI address: use {ADDRESS_HINT}"),
            )
        ),
    ),
]
"""A PCI address in the kernel's canonical form: 0000:3b:00.0."""


HexID = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{4}$")]
"""A PCI vendor, device or subsystem ID: 4 hex digits, as sysfs shows them without 0x."""

Name = Annotated[str, Field(max_length=256)]
"""A name from the pci.ids database or a host's configuration."""


def check_address(v: str) -> str:
    if not is_canonical_address(v):
        raise ValueError(f"'{v}' is not a PCI address: use {ADDRESS_HINT}")
    return v


def pcidevice_name(node_name: str, address: str) -> str:
    """The PciDevice object name for a function: `<node>.<address with ':' and '.' as '-'>`."""
    return f"{node_name}.{PciAddress.parse(address).dashed()}"


class ClaimRef(ApiModel):
    """The VM a device is bound to. Written only by the controller, with a precondition."""

    namespace: str = Field(min_length=1, max_length=63)
    """Namespace of the PassthroughVM."""
    name: str = Field(min_length=1, max_length=253)
    """Name of the PassthroughVM."""
    uid: str = Field(min_length=1, max_length=64)
    """UID of the PassthroughVM, so a VM re-created under the same name is a different owner."""
    request: str = Field(min_length=1, max_length=63)
    """The VM's device or network request this device satisfies."""
    flavor: str | None = Field(default=None, max_length=253)
    """The PciFlavor of that request (absent for IOMMU companions): quotas and usage count it."""
    companion: bool = False
    """True when claimed only because it shares an IOMMU group with a requested device."""
    bind_id: str | None = Field(default=None, alias="bindID", max_length=64)
    """The bind attempt that wrote the claim. A failed attempt rolls back only claims carrying
    its own ID, so it never frees a device another attempt has since taken over."""
    claimed_at: datetime | None = None
    """When the claim was written; the audit gives half-done claims a grace period from here."""


class ReservedAfterUse(ApiModel):
    """Set by the controller when it releases a device marked one-time-use (the device spec's
    `one_time_use` / `oneTimeUse`): the device is given to no VM until an admin, having done
    what the device needs between tenants (erase, firmware, checks), removes this."""

    vm: str = Field(min_length=1, max_length=317)
    """namespace/name of the VM that last had it."""
    uid: str = Field(min_length=1, max_length=64)
    """That VM's UID."""
    released_at: datetime | None = None
    """When it was released."""


class Release(ApiModel):
    """The device's last release from a VM that had it, written by the controller in the same
    write that removes the claim. Until the node plugin has scrubbed the device for this release
    (when `scrub` says it must) and the quarantine has passed, no VM is given it. The next claim
    removes it."""

    id: str = Field(min_length=1, max_length=64)
    """Identifies this release; the node plugin's status.scrub answers it by this ID."""
    vm: str = Field(min_length=1, max_length=317)
    """namespace/name of the VM that had it."""
    uid: str = Field(min_length=1, max_length=64)
    """That VM's UID."""
    released_at: datetime | None = None
    """When it was released."""
    reason: str | None = Field(default=None, max_length=64)
    """Why: Deleted (the VM went), Evacuated (its node was out of service), ..."""
    scrub: bool = False
    """The node plugin must reset the device and return it to its own driver first (set when
    the node's plugin scrubs released devices)."""
    quarantine_until: datetime | None = None
    """Not offered before this time, scrubbed or not."""


class PciDeviceSpec(ApiModel):
    """What the device is (node and address) and who may use it."""

    model_config = ConfigDict(
        json_schema_extra=k8s(
            cel(
                "self.nodeName == oldSelf.nodeName", "nodeName is immutable", field_path=".nodeName"
            ),
            cel("self.address == oldSelf.address", "address is immutable", field_path=".address"),
        )
    )

    node_name: str = Field(min_length=1, max_length=253)
    """The node (host) the device is in."""
    address: PciAddressStr
    """The PCI address on that node, domain:bus:device.function, e.g. 0000:3b:00.0."""
    unschedulable: bool = False
    """Admin maintenance switch: when true no new VM is given this device (existing claims stay)."""
    claim_ref: ClaimRef | None = None
    """The VM this device is bound to; absent when free. Set and cleared only by the controller."""
    reserved: ReservedAfterUse | None = None
    """A one-time-use device a VM has had: no new VM is given it until an admin removes this
    (`kubectl pcipt uncordon DEVICE` does)."""
    release: Release | None = None
    """The last release from a VM that used it, while it is scrubbed and quarantined; written
    by the controller, removed by the next claim (or an admin: `kubectl pcipt uncordon`)."""

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        return check_address(v)


class SriovInfo(ApiModel):
    """The device's place in SR-IOV."""

    role: SriovRole = "None"
    """PF for a physical function with SR-IOV capability, VF for a virtual function, else None."""
    phys_fn: PciAddressStr | None = None
    """For a VF: the address of its PF."""
    vf_index: int | None = Field(default=None, ge=0, le=65535)
    """For a VF: its index under the PF (virtfnN)."""
    total_vfs: int | None = Field(default=None, alias="totalVFs", ge=0, le=65535)
    """For a PF: how many VFs the hardware supports (sriov_totalvfs)."""
    num_vfs: int | None = Field(default=None, alias="numVFs", ge=0, le=65535)
    """For a PF: how many VFs are enabled now (sriov_numvfs)."""


Health = Literal["Healthy", "Unhealthy", "Missing"]


class ScrubStatus(ApiModel):
    """The node plugin's answer to a release: what it did to the device before it is offered
    again."""

    release_id: str = Field(alias="releaseID", min_length=1, max_length=64)
    """The spec.release this answers."""
    phase: Literal["Done", "Failed"]
    """Done: the device may be offered again (after any quarantine); Failed: it stays held
    back, Unhealthy, and the node plugin tries again at each rescan."""
    reset: str | None = Field(default=None, max_length=64)
    """How the device was reset: the kernel's reset through sysfs (`function-level reset`, or
    the method the kernel chose), or `none` with why in the message."""
    driver: str | None = Field(default=None, max_length=64)
    """The driver the device was returned to (absent: none)."""
    completed_at: datetime | None = None
    """When it finished."""
    message: str = Field(default="", max_length=1024)
    """Each step, or what failed, in words."""


class PciDeviceStatus(ApiModel):
    """What the node plugin discovered about the device, and its health."""

    vendor_id: HexID | None = Field(default=None, alias="vendorID")
    """PCI vendor ID, 4 hex digits."""
    product_id: HexID | None = Field(default=None, alias="productID")
    """PCI device ID, 4 hex digits."""
    subsystem_vendor_id: HexID | None = Field(default=None, alias="subsystemVendorID")
    """PCI subsystem vendor ID, 4 hex digits."""
    subsystem_id: HexID | None = Field(default=None, alias="subsystemID")
    """PCI subsystem device ID, 4 hex digits."""
    vendor_name: Name | None = None
    """Vendor name from the pci.ids database, when the host has it."""
    product_name: Name | None = None
    """Device name from the pci.ids database, when the host has it."""
    class_code: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{6}$")
    """PCI class code, 6 hex digits (class, subclass, programming interface)."""
    class_name: Name | None = None
    """Name of the class from the pci.ids database, e.g. 3D controller."""
    driver: str | None = Field(default=None, max_length=64)
    """Kernel driver bound to the device now; absent when none is."""
    numa_node: int = Field(default=-1, ge=-1, le=1023)
    """NUMA node of the device; -1 when the platform does not say."""
    pcie_root: str | None = Field(
        default=None,
        alias="pcieRoot",
        max_length=32,
        pattern=r"^pci[0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}$",
    )
    """The PCI root complex the device sits under, as the kernel names it (pci0000:3a):
    devices under one root talk peer to peer without crossing the CPU interconnect (what
    placement.samePCIeRoot asks for; Kubernetes DRA's pcieRoot)."""
    iommu_group: int | None = Field(default=None, ge=0)
    """IOMMU group number; absent when the host has no IOMMU enabled."""
    iommu_group_peers: list[PciAddressStr] = Field(default_factory=list, max_length=256)
    """Addresses of the other functions in the same IOMMU group (passed through together)."""
    sriov: SriovInfo | None = None
    """SR-IOV facts for PFs and VFs."""
    netdev: str | None = Field(default=None, max_length=15)
    """Network interface name on the host, for NICs that have one (e.g. ens1f0)."""
    physical_network: str | None = Field(default=None, max_length=253)
    """The physical network the port is cabled to, as the host's device spec declares."""
    attributes: dict[str, Name] = Field(default_factory=dict, max_length=64)
    """Free attributes from the host's device spec, for flavor and request selectors."""
    health: Health = "Healthy"
    """Healthy, Unhealthy (present but not usable) or Missing (gone from the host)."""
    aer_fatal: int | None = Field(default=None, alias="aerFatal", ge=0)
    """Fatal PCIe errors (AER) the kernel has counted for the device since boot, when it
    reports them (aer_dev_fatal)."""
    scrub: ScrubStatus | None = None
    """The last scrub after a release (see spec.release)."""
    conditions: Conditions
    """Details of the device's state."""


class PciDevice(ResourceKind):
    """A PCI function on a host that pcipt may pass through to a PassthroughVM."""

    crd_plural: ClassVar[str] = c.PLURAL_PCIDEVICE
    crd_scope: ClassVar[Literal["Cluster", "Namespaced"]] = "Cluster"
    crd_short_names: ClassVar[list[str]] = ["pcidev"]
    crd_description: ClassVar[str] = (
        "PciDevice is one PCI function on one host that may be passed through to a "
        "PassthroughVM. The node plugin publishes it (spec.nodeName, spec.address, status); "
        "the controller binds it to a VM (spec.claimRef); an admin may cordon it "
        "(spec.unschedulable). Its name is <node>.<address with ':' and '.' as '-'>."
    )
    crd_printer_columns: ClassVar[list[dict[str, Any]]] = [
        printer_column("Node", ".spec.nodeName"),
        printer_column("Address", ".spec.address"),
        printer_column("Vendor", ".status.vendorName"),
        printer_column("Product", ".status.productName"),
        printer_column("Driver", ".status.driver"),
        printer_column("NUMA", ".status.numaNode", type="integer"),
        printer_column("Claimed-By", ".spec.claimRef.name"),
        printer_column("Health", ".status.health"),
        printer_column("Why", '.status.conditions[?(@.type=="Healthy")].reason', priority=1),
        printer_column("Released-From", ".spec.release.vm", priority=1),
        printer_column("Claim-Namespace", ".spec.claimRef.namespace", priority=1),
        printer_column("Vendor-ID", ".status.vendorID", priority=1),
        printer_column("Product-ID", ".status.productID", priority=1),
        printer_column("IOMMU", ".status.iommuGroup", type="integer", priority=1),
        printer_column("Unschedulable", ".spec.unschedulable", type="boolean", priority=1),
        printer_column("Age", ".metadata.creationTimestamp", type="date"),
    ]
    crd_validations: ClassVar[list[dict[str, str]]] = [
        cel(
            "self.metadata.name == self.spec.nodeName + '.' + "
            "self.spec.address.replace(':', '-').replace('.', '-')",
            message_expression=(
                "\"metadata.name must be <node>.<address with ':' and '.' as '-'>, here '\" + "
                "self.spec.nodeName + '.' + self.spec.address.replace(':', '-').replace('.', '-')"
                ' + "\'"'
            ),
        )
    ]

    spec: PciDeviceSpec
    status: PciDeviceStatus = Field(default_factory=PciDeviceStatus)

    @model_validator(mode="after")
    def _name_follows_node_and_address(self) -> Self:
        expected = pcidevice_name(self.spec.node_name, self.spec.address)
        if self.metadata.name and self.metadata.name != expected:
            raise ValueError(
                f"metadata.name must be <node>.<address with ':' and '.' as '-'>, here '{expected}'"
            )
        return self

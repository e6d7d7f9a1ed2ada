"""PciFlavor: a class of device a tenant may ask for, with who may use it and how many.

It plays the part of Nova's PCI alias plus flavor extra spec, and of DRA's DeviceClass.
Types only; the controller keeps status current.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Final, Literal, Self

from pydantic import ConfigDict, Field, field_validator, model_validator

from pcipt import constants as c
from pcipt.api.v1alpha1.meta import (
    ApiModel,
    Conditions,
    LabelSelector,
    ResourceKind,
    cel,
    cel_matches,
    cel_value_message,
    k8s,
    printer_column,
)
from pcipt.api.v1alpha1.selector import DeviceSelector, ShortName

DeviceType = Literal["gpu", "nic", "nvme", "fpga", "accelerator", "other"]
NumaPolicy = Literal["none", "preferred", "required"]

VLAN_RANGE_PATTERN = r"^[0-9]{1,4}(-[0-9]{1,4})?$"

VlanRange = Annotated[
    str,
    Field(
        max_length=9,
        json_schema_extra=k8s(
            cel(
                cel_matches(VLAN_RANGE_PATTERN)
                + " && self.split('-').all(v, int(v) >= 1 && int(v) <= 4094)",
                message_expression=cel_value_message(
                    "is not a VLAN or VLAN range: use N or N-M with VLAN IDs 1-4094, e.g. 100-199"
                ),
            )
        ),
    ),
]


def parse_vlan_range(text: str) -> tuple[int, int]:
    """`100` -> (100, 100); `100-199` -> (100, 199). Raises ValueError when malformed."""
    if not re.match(VLAN_RANGE_PATTERN, text):
        raise ValueError(f"'{text}' is not a VLAN or VLAN range: use N or N-M, e.g. 100-199")
    lo, _, hi = text.partition("-")
    first, last = int(lo), int(hi or lo)
    if not (1 <= first <= 4094 and 1 <= last <= 4094):
        raise ValueError(f"'{text}' is not a VLAN range: VLAN IDs are 1-4094")
    return first, last


class FlavorAccess(ApiModel):
    """Who may use the flavor."""

    namespace_selector: LabelSelector | None = None
    """Namespaces (by their labels) whose VMs may use this flavor; absent or empty means all."""


class FlavorLimits(ApiModel):
    """How many devices of this flavor one VM, or one namespace, may hold."""

    max_per_vm: int | None = Field(default=None, alias="maxPerVM", ge=1, le=64)
    """Most devices of this flavor a single VM may be given."""
    max_per_namespace: int | None = Field(default=None, ge=0, le=100000)
    """Most devices of this flavor all VMs of one namespace may hold together (0 forbids use)."""


class FlavorNetworking(ApiModel):
    """What VMs may ask of an SR-IOV VF of this flavor (NIC flavors only)."""

    allow_trusted: bool = False
    """Whether a VM may ask for trusted mode (the guest may change MAC, enter promiscuous mode)."""
    allow_spoof_check_off: bool = False
    """Whether a VM may turn the VF's MAC spoof check off."""
    vlan_ranges: list[VlanRange] | None = Field(default=None, alias="vlanRanges", max_length=64)
    """VLAN IDs a VM may put its VF on, as N or N-M; absent means any VLAN, 1-4094."""
    max_tx_rate: int | None = Field(default=None, alias="maxTxRate", ge=1, le=1_000_000)
    """The highest transmit rate limit (Mbps) a VM may ask for its VF; a VM that asks for none
    gets this one. Absent: any, and none by default."""
    allow_min_tx_rate: bool = Field(default=False, alias="allowMinTxRate")
    """Whether a VM may reserve a guaranteed transmit rate (minTxRate) on its VF."""
    allow_link_state: bool = Field(default=False, alias="allowLinkState")
    """Whether a VM may set its VF's link state to enable or disable (else it follows the PF)."""

    @field_validator("vlan_ranges")
    @classmethod
    def _ranges(cls, v: list[str] | None) -> list[str] | None:
        for r in v or []:
            parse_vlan_range(r)
        return v


class PciFlavorSpec(ApiModel):
    """A class of device: what qualifies, who may have it, how many, and NUMA placement."""

    model_config = ConfigDict(
        json_schema_extra=k8s(
            cel(
                "!has(self.networking) || self.deviceType == 'nic'",
                "networking applies only to flavors of deviceType nic",
                field_path=".networking",
            )
        )
    )

    device_type: DeviceType
    """Kind of device: gpu, nic, nvme, fpga, accelerator or other."""
    description: str = Field(default="", max_length=1024)
    """What the flavor offers, for tenants (shown by kubectl pcipt inventory)."""
    selector: DeviceSelector
    """Which devices belong to the flavor. An empty selector ({}) takes every published device."""
    numa_policy: NumaPolicy = "none"
    """Whether a request's devices must share a NUMA node: none, preferred or required. A VM's
    request may override it."""
    access: FlavorAccess | None = None
    """Who may use the flavor; absent means every namespace."""
    limits: FlavorLimits | None = None
    """Per-VM and per-namespace caps."""
    networking: FlavorNetworking | None = None
    """For NIC flavors: which VF settings tenants may ask for."""
    price_class: str | None = Field(
        default=None,
        alias="priceClass",
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
    )
    """A name billing charges the flavor's device time by (gpu-premium, nic-standard): the
    device-seconds counters and `kubectl pcipt usage` carry it."""
    image_support: Literal["Optional", "Required"] = "Optional"
    """Required: a VM gets the flavor's devices only when the image it boots is marked in the
    image catalog as supporting them; Optional: images the catalog does not mark are fine
    (marked ones must still support the flavor)."""
    guest_drivers: list[ShortName] = Field(default_factory=list, max_length=16)
    """Drivers the guest needs for these devices (nvidia, mlx5_core): an image marked in the
    image catalog supports the flavor only when its entry lists each of them."""

    @model_validator(mode="after")
    def _networking_only_for_nics(self) -> Self:
        if self.networking is not None and self.device_type != "nic":
            raise ValueError("networking applies only to flavors of deviceType nic")
        return self


MAX_STATUS_NODES: Final = 32
"""Rows in a flavor's status.nodes at most (the status would otherwise grow with the cluster)."""


class NodeCounts(ApiModel):
    """Device counts of a flavor on one node."""

    node_name: str
    """The node."""
    total: int = 0
    """Devices of the flavor on the node."""
    allocatable: int = 0
    """Devices that could be given to VMs: healthy, schedulable, on a live node."""
    allocated: int = 0
    """Devices bound to VMs."""
    free: int = 0
    """Allocatable devices not bound to any VM."""
    unhealthy: int = 0
    """Devices that are Unhealthy or Missing."""


class PciFlavorStatus(ApiModel):
    """Counts of the devices in the flavor, kept current by the controller."""

    total: int = 0
    """Published devices that match the flavor."""
    allocatable: int = 0
    """Of those, devices that could be given to VMs: healthy, schedulable, on a live node."""
    allocated: int = 0
    """Devices bound to VMs."""
    free: int = 0
    """Allocatable devices not bound to any VM: what a new VM can get now."""
    unhealthy: int = 0
    """Devices that are Unhealthy or Missing."""
    node_count: int = 0
    """Nodes with devices of the flavor."""
    nodes: list[NodeCounts] = Field(
        default_factory=list,
        max_length=MAX_STATUS_NODES,
        json_schema_extra=k8s(list_map_keys=["nodeName"]),
    )
    """The same counts per node: every node while there are at most 32, else the 32 with the
    most free devices (`kubectl pcipt inventory --flavor` lists every node)."""
    conditions: Conditions
    """Details of the flavor's state."""
    observed_generation: int | None = None
    """The metadata.generation these counts were computed for."""


class PciFlavor(ResourceKind):
    """A class of PCI device that tenants may request for their VMs."""

    crd_plural: ClassVar[str] = c.PLURAL_PCIFLAVOR
    crd_scope: ClassVar[Literal["Cluster", "Namespaced"]] = "Cluster"
    crd_short_names: ClassVar[list[str]] = ["pciflavor"]
    crd_description: ClassVar[str] = (
        "PciFlavor is a class of PCI device that tenants may request for their "
        "PassthroughVMs: a selector over published PciDevices, who may use it, per-VM and "
        "per-namespace limits, NUMA policy and, for NICs, which VF settings are allowed."
    )
    crd_printer_columns: ClassVar[list[dict[str, Any]]] = [
        printer_column("Type", ".spec.deviceType"),
        printer_column("Total", ".status.total", type="integer"),
        printer_column("Free", ".status.free", type="integer"),
        printer_column("Allocated", ".status.allocated", type="integer", priority=1),
        printer_column("Unhealthy", ".status.unhealthy", type="integer", priority=1),
        printer_column("NUMA-Policy", ".spec.numaPolicy", priority=1),
        printer_column("Age", ".metadata.creationTimestamp", type="date"),
    ]

    spec: PciFlavorSpec
    status: PciFlavorStatus = Field(default_factory=PciFlavorStatus)

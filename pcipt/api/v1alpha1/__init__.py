"""pcipt.io/v1alpha1: the PciDevice, PciFlavor and PassthroughVM kinds.

These pydantic models are the single source of truth of the API: the CRDs in crds/ are
generated from them (`python -m pcipt.crdgen`), and every component parses objects into them.
"""

from pcipt.api.v1alpha1.meta import (
    ApiModel,
    Condition,
    LabelSelector,
    ObjectMeta,
    ResourceKind,
    SelectorRequirement,
)
from pcipt.api.v1alpha1.passthroughvm import (
    ComputeStatus,
    CpuSpec,
    DetachingDevice,
    DeviceBinding,
    DeviceRequest,
    Disk,
    DomainStatus,
    Evacuation,
    HugepagesSpec,
    Migration,
    NetworkBinding,
    NetworkRequest,
    NodeRefusal,
    NumaShare,
    PassthroughVM,
    PassthroughVMSpec,
    PassthroughVMStatus,
    Placement,
    SchedulingStatus,
    SkippedRequest,
)
from pcipt.api.v1alpha1.pcidevice import (
    ClaimRef,
    PciDevice,
    PciDeviceSpec,
    PciDeviceStatus,
    Release,
    ReservedAfterUse,
    ScrubStatus,
    SriovInfo,
    pcidevice_name,
)
from pcipt.api.v1alpha1.pciflavor import (
    FlavorAccess,
    FlavorLimits,
    FlavorNetworking,
    NodeCounts,
    PciFlavor,
    PciFlavorSpec,
    PciFlavorStatus,
    parse_vlan_range,
)
from pcipt.api.v1alpha1.selector import DeviceSelector

KINDS: tuple[type[ResourceKind], ...] = (PciDevice, PciFlavor, PassthroughVM)
"""Every top-level kind, in the order their CRDs are written."""

__all__ = [
    "KINDS",
    "ApiModel",
    "ClaimRef",
    "ComputeStatus",
    "Condition",
    "CpuSpec",
    "DetachingDevice",
    "DeviceBinding",
    "DeviceRequest",
    "DeviceSelector",
    "Disk",
    "DomainStatus",
    "Evacuation",
    "FlavorAccess",
    "FlavorLimits",
    "FlavorNetworking",
    "HugepagesSpec",
    "LabelSelector",
    "Migration",
    "NetworkBinding",
    "NetworkRequest",
    "NodeCounts",
    "NodeRefusal",
    "NumaShare",
    "ObjectMeta",
    "PassthroughVM",
    "PassthroughVMSpec",
    "PassthroughVMStatus",
    "PciDevice",
    "PciDeviceSpec",
    "PciDeviceStatus",
    "PciFlavor",
    "PciFlavorSpec",
    "PciFlavorStatus",
    "Placement",
    "Release",
    "ReservedAfterUse",
    "ResourceKind",
    "SchedulingStatus",
    "ScrubStatus",
    "SelectorRequirement",
    "SkippedRequest",
    "SriovInfo",
    "parse_vlan_range",
    "pcidevice_name",
]

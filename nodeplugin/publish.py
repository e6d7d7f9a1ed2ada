"""What this node's PciDevice objects should say, and what to write to make them say it.

PURE: discovered functions + device-spec decisions + what the API server holds -> a plan of
writes. A rescan that finds nothing changed plans no writes. A device that vanished, or that
a config edit no longer offers, is deleted only when no VM holds it; while one does, it stays,
marked Missing or Unhealthy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nodeplugin.devicespec import Decision
from nodeplugin.discovery import HostInventory, PciFunction
from nodeplugin.pciids import PciIds
from nodeplugin.vfio import is_vfio_driver
from pcipt import constants as c
from pcipt.api.v1alpha1 import PciDevice, pcidevice_name

COND_HEALTHY = "Healthy"


@dataclass(frozen=True)
class Desired:
    name: str
    labels: dict[str, str]
    spec: dict[str, Any]
    status: dict[str, Any]


def device_labels(node: str, f: PciFunction) -> dict[str, str]:
    return {
        c.LABEL_NODE: node,
        c.LABEL_VENDOR: f.vendor_id,
        c.LABEL_PRODUCT: f.product_id,
        c.LABEL_CLASS: f.class_code,
    }


def _health(
    f: PciFunction, failure: tuple[str, str] | None = None, unmanaged: bool = False
) -> tuple[str, str, str]:
    """(health, reason, message); `failure` is what the kernel said when preparing it failed;
    `unmanaged`: the device spec says `managed: false`, so it must already be on vfio-pci."""
    if failure is not None:
        return "Unhealthy", *failure
    if unmanaged and not is_vfio_driver(f.driver):
        return (
            "Unhealthy",
            c.REASON_NOT_BOUND_TO_VFIO,
            f"the device spec says managed: false, so the admin binds it to vfio-pci (or a "
            f"variant) and pcipt never rebinds it; it is on {f.driver or 'no driver'}",
        )
    if f.iommu_group is None:
        return (
            "Unhealthy",
            "NoIommuGroup",
            "the function is in no IOMMU group: enable the IOMMU (intel_iommu=on or "
            "amd_iommu=on, and VT-d/AMD-Vi in firmware) to pass it through",
        )
    return "Healthy", c.REASON_PRESENT, "found on the host"


def desired_status(
    f: PciFunction,
    d: Decision,
    ids: PciIds,
    failure: tuple[str, str] | None = None,
    *,
    group: tuple[int, list[str]] | None = None,
    scrub: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """`group`: the (IOMMU group, peers) to publish instead of the discovered ones (a claim's,
    see nodeplugin.health); `scrub`: the last scrub's record."""
    health, reason, message = _health(f, failure, d.attributes.get("managed") == "false")
    status: dict[str, Any] = {
        "vendorID": f.vendor_id,
        "productID": f.product_id,
        "subsystemVendorID": f.subsystem_vendor_id,
        "subsystemID": f.subsystem_id,
        "classCode": f.class_code,
        "numaNode": f.numa_node,
        "health": health,
        "sriov": {"role": f.sriov_role},
        "conditions": [
            {
                "type": COND_HEALTHY,
                "status": "True" if health == "Healthy" else "False",
                "reason": reason,
                "message": message,
            }
        ],
    }
    names = {
        "vendorName": ids.vendor(f.vendor_id),
        "productName": ids.device(f.vendor_id, f.product_id),
        "className": ids.class_name(f.class_code),
        "driver": f.driver,
        "iommuGroup": f.iommu_group if group is None else group[0],
        "netdev": f.netdev,
        "physicalNetwork": d.physical_network,
        "aerFatal": f.aer_fatal,
        "pcieRoot": f.pcie_root,
    }
    status.update({k: v for k, v in names.items() if v is not None})
    if scrub:
        status["scrub"] = dict(scrub)
    # Empty collections are left out: server-side apply then removes what we set before, while
    # an explicit empty map would be stored as null.
    peers = list(f.iommu_group_peers) if group is None else group[1]
    if peers:
        status["iommuGroupPeers"] = peers
    if d.attributes:
        status["attributes"] = dict(d.attributes)
    sriov = status["sriov"]
    for key, value in (
        ("physFn", f.phys_fn),
        ("vfIndex", f.vf_index),
        ("totalVFs", f.total_vfs),
        ("numVFs", f.num_vfs),
    ):
        if value is not None:
            sriov[key] = value
    return status


def desired_devices(
    node: str,
    host: HostInventory,
    decisions: list[Decision],
    ids: PciIds,
    conditions: Mapping[str, list[dict[str, Any]]] | None = None,
    *,
    failures: Mapping[str, tuple[str, str]] | None = None,
    groups: Mapping[str, tuple[int, list[str]]] | None = None,
    scrubs: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Desired]:
    """`conditions`: more conditions per address (a PF's VFsConfigured, say); `failures`:
    (reason, message) per address that makes it Unhealthy (the kernel refused to prepare it,
    fatal errors, ...); `groups`: IOMMU groups to keep publishing; `scrubs`: scrub records."""
    by_addr = host.by_address()
    out = {}
    for d in decisions:
        if not d.publish:
            continue
        f = by_addr[d.address]
        name = pcidevice_name(node, f.address)
        status = desired_status(
            f,
            d,
            ids,
            (failures or {}).get(f.address),
            group=(groups or {}).get(f.address),
            scrub=(scrubs or {}).get(f.address),
        )
        status["conditions"] += (conditions or {}).get(f.address, [])
        out[name] = Desired(
            name, device_labels(node, f), {"nodeName": node, "address": f.address}, status
        )
    return out


@dataclass
class Plan:
    apply_spec: list[Desired] = field(default_factory=list)
    apply_status: list[Desired] = field(default_factory=list)
    mark: list[tuple[str, str, str, str]] = field(default_factory=list)
    """(name, health, reason, message) for held devices that are gone or no longer offered"""
    delete: list[tuple[str, str]] = field(default_factory=list)
    """(name, resourceVersion) of devices nobody holds that are gone or no longer offered"""

    @property
    def writes(self) -> int:
        return len(self.apply_spec) + len(self.apply_status) + len(self.mark) + len(self.delete)


def _without_times(conds: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return sorted(
        (x.get("type"), x.get("status"), x.get("reason"), x.get("message")) for x in conds
    )


def _status_matches(want: Mapping[str, Any], have: Mapping[str, Any]) -> bool:
    for k, v in want.items():
        if k == "conditions":
            if _without_times(v) != _without_times(have.get("conditions", [])):
                return False
        elif have.get(k) != v:
            return False
    # Fields we stopped setting (a driver unbound, a physnet removed) must go too.
    optional = {
        "driver",
        "netdev",
        "physicalNetwork",
        "iommuGroup",
        "vendorName",
        "productName",
        "className",
        "iommuGroupPeers",
        "attributes",
        "aerFatal",
        "scrub",
    }
    return all(k in want for k in optional if have.get(k))


def plan(
    desired: Mapping[str, Desired],
    current: Mapping[str, dict[str, Any]],
    present: set[str],
) -> Plan:
    """The writes that make `current` (this node's PciDevices, raw) match `desired`.
    `present` holds the names of devices still on the host (offered or not)."""
    p = Plan()
    for name, want in sorted(desired.items()):
        have = current.get(name)
        if have is None:
            p.apply_spec.append(want)
            p.apply_status.append(want)
            continue
        meta, spec = have.get("metadata", {}), have.get("spec", {})
        labels = meta.get("labels") or {}
        if any(labels.get(k) != v for k, v in want.labels.items()) or any(
            spec.get(k) != v for k, v in want.spec.items()
        ):
            p.apply_spec.append(want)
        if not _status_matches(want.status, have.get("status") or {}):
            p.apply_status.append(want)
    for name, have in sorted(current.items()):
        if name in desired:
            continue
        held = bool((have.get("spec") or {}).get("claimRef"))
        status = have.get("status") or {}
        if not held:
            p.delete.append((name, have["metadata"].get("resourceVersion", "")))
        elif name in present:
            if status.get("health") != "Unhealthy" or not _reason_is(
                status, c.REASON_NOT_IN_DEVICE_SPEC
            ):
                p.mark.append(
                    (
                        name,
                        "Unhealthy",
                        c.REASON_NOT_IN_DEVICE_SPEC,
                        "no longer offered by this node's device spec; it stays published "
                        "while a VM holds it",
                    )
                )
        elif status.get("health") != "Missing":
            p.mark.append(
                (
                    name,
                    "Missing",
                    c.REASON_NOT_FOUND,
                    "gone from the host; it stays published while a VM holds it",
                )
            )
    return p


def _reason_is(status: Mapping[str, Any], reason: str) -> bool:
    return any(
        x.get("type") == COND_HEALTHY and x.get("reason") == reason
        for x in status.get("conditions", [])
    )


def parse_current(raw: dict[str, Any]) -> PciDevice:
    return PciDevice.model_validate(raw)

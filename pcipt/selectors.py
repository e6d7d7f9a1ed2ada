"""Evaluate label selectors and device selectors. Pure: no I/O, no clients.

A device is described to the matcher by `DeviceFacts` (what the API publishes about it), so the
scheduler, the flavor counters and the kubectl plugin all decide membership the same way.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pcipt.api.v1alpha1 import DeviceSelector, LabelSelector, PciDevice, SelectorRequirement
from pcipt.pci import normalize_hex_id

PHYSNET_ATTRIBUTE = "physical_network"


def requirement_matches(req: SelectorRequirement, labels: Mapping[str, str]) -> bool:
    present = req.key in labels
    if req.operator == "Exists":
        return present
    if req.operator == "DoesNotExist":
        return not present
    values = req.values or []
    if req.operator == "In":
        return present and labels[req.key] in values
    return not present or labels[req.key] not in values  # NotIn, as Kubernetes defines it


def label_selector_matches(selector: LabelSelector | None, labels: Mapping[str, str]) -> bool:
    """Kubernetes semantics: every pair and every expression must hold; empty matches all."""
    if selector is None:
        return True
    for key, value in (selector.match_labels or {}).items():
        if labels.get(key) != value:
            return False
    return all(requirement_matches(r, labels) for r in selector.match_expressions or [])


def describe_label_selector(selector: LabelSelector | None) -> str:
    """`a=b,c in (x,y)` — the way kubectl prints selectors."""
    if selector is None or selector.is_empty():
        return "<everything>"
    parts = [f"{k}={v}" for k, v in sorted((selector.match_labels or {}).items())]
    for r in selector.match_expressions or []:
        if r.operator in ("In", "NotIn"):
            parts.append(f"{r.key} {r.operator.lower()} ({','.join(r.values or [])})")
        else:
            parts.append(r.key if r.operator == "Exists" else f"!{r.key}")
    return ",".join(parts)


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """What selectors look at: the published facts of one PciDevice."""

    address: str
    vendor_id: str = ""
    product_id: str = ""
    class_code: str = ""
    driver: str | None = None
    sriov_role: str = "None"
    physical_network: str | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of_object(cls, obj: Mapping[str, Any]) -> DeviceFacts:
        """The same facts read from a PciDevice as the API server returns it (a listing of
        tens of thousands is not worth a model each)."""
        st = obj.get("status") or {}
        return cls(
            address=(obj.get("spec") or {}).get("address", ""),
            vendor_id=st.get("vendorID") or "",
            product_id=st.get("productID") or "",
            class_code=st.get("classCode") or "",
            driver=st.get("driver"),
            sriov_role=(st.get("sriov") or {}).get("role", "None"),
            physical_network=st.get("physicalNetwork"),
            attributes=dict(st.get("attributes") or {}),
        )

    @classmethod
    def of(cls, dev: PciDevice) -> DeviceFacts:
        st = dev.status
        return cls(
            address=dev.spec.address,
            vendor_id=st.vendor_id or "",
            product_id=st.product_id or "",
            class_code=st.class_code or "",
            driver=st.driver,
            sriov_role=st.sriov.role if st.sriov else "None",
            physical_network=st.physical_network,
            attributes=dict(st.attributes),
        )


def device_selector_matches(
    selector: DeviceSelector | None, dev: DeviceFacts, node_labels: Mapping[str, str]
) -> bool:
    """Whether a device qualifies. Set fields AND together; entries of one list OR."""
    if selector is None:
        return True
    s = selector
    if s.vendor_ids is not None and normalize_hex_id(dev.vendor_id) not in {
        normalize_hex_id(v) for v in s.vendor_ids
    }:
        return False
    if s.product_ids is not None and normalize_hex_id(dev.product_id) not in {
        normalize_hex_id(v) for v in s.product_ids
    }:
        return False
    if s.class_codes is not None and not any(
        dev.class_code.lower().startswith(p.lower()) for p in s.class_codes
    ):
        return False
    if s.drivers is not None and dev.driver not in s.drivers:
        return False
    if s.sriov_roles is not None and dev.sriov_role not in s.sriov_roles:
        return False
    if s.physical_networks is not None and physical_network(dev) not in s.physical_networks:
        return False
    if s.addresses is not None and not any(
        fnmatch.fnmatchcase(dev.address, pattern.lower()) for pattern in s.addresses
    ):
        return False
    if s.attributes is not None and not label_selector_matches(s.attributes, dev.attributes):
        return False
    return s.node_selector is None or label_selector_matches(s.node_selector, node_labels)


def physical_network(dev: DeviceFacts) -> str | None:
    """The physical network a port is cabled to: the published field, else the attribute."""
    return dev.physical_network or dev.attributes.get(PHYSNET_ATTRIBUTE)

"""Health causes beyond presence, judged from what sysfs says now and what the API server holds
(the last published status): fatal PCIe errors rising, and an IOMMU group that changed under a
claim. PURE: the caller passes the time and keeps the one piece of memory (when each device's
fatal error count last rose).

- Fatal AER errors: the kernel counts them per device since boot (aer_dev_fatal). A count above
  the one last published means new errors: the device is Unhealthy until `hold` seconds pass
  without another, or until a scrub's reset re-checks it.
- IOMMU group: a claim took the device with the group's other members as they were published.
  If the host now groups it differently (a firmware or ACS change, a hot-plugged peer), the VM's
  isolation is not what was granted: Unhealthy, and the published group stays the claimed one
  until the device is released, when the new one is published.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

from nodeplugin.discovery import HostInventory, PciFunction
from pcipt import constants as c


def aer_rose(f: PciFunction, published: Mapping[str, Any] | None) -> bool:
    """Its fatal AER count is above the one last published."""
    before = (published or {}).get("aerFatal")
    return f.aer_fatal is not None and before is not None and f.aer_fatal > int(before)


def group_changed(f: PciFunction, obj: Mapping[str, Any] | None) -> tuple[int, list[str]] | None:
    """For a claimed device whose IOMMU group (number or members) is no longer the published
    one: the published (group, peers), which stay published while the claim lasts."""
    if obj is None or not (obj.get("spec") or {}).get("claimRef"):
        return None
    st = obj.get("status") or {}
    group = st.get("iommuGroup")
    if group is None:
        return None
    peers = sorted(st.get("iommuGroupPeers") or [])
    if (group, peers) == (f.iommu_group, sorted(f.iommu_group_peers)):
        return None
    return group, peers


def judge(
    host: HostInventory,
    current: Mapping[str, Mapping[str, Any]],
    rose_at: MutableMapping[str, float],
    now: float,
    hold: float,
) -> tuple[dict[str, tuple[str, str]], dict[str, tuple[int, list[str]]]]:
    """(address -> (reason, message) of each device these causes make Unhealthy, address ->
    the (group, peers) to keep publishing). `current`: the published objects by address;
    `rose_at` is updated with new rises and forgets rises that are over."""
    sick: dict[str, tuple[str, str]] = {}
    keep: dict[str, tuple[int, list[str]]] = {}
    for f in host.functions:
        obj = current.get(f.address)
        published = (obj or {}).get("status")
        if aer_rose(f, published):
            rose_at[f.address] = now
        at = rose_at.get(f.address)
        if at is not None and now - at < hold:
            sick[f.address] = (
                c.REASON_AER_FATAL,
                f"the kernel counted fatal PCIe errors (AER): {f.aer_fatal} since boot, the last "
                f"rise {now - at:.0f}s ago; healthy again {hold:.0f}s after the last, or after "
                "a reset by a scrub",
            )
        elif at is not None:
            del rose_at[f.address]
        kept = group_changed(f, obj)
        if kept is not None:
            keep[f.address] = kept
            sick[f.address] = (
                c.REASON_IOMMU_GROUP_CHANGED,
                f"claimed in IOMMU group {kept[0]} with {', '.join(kept[1]) or 'no peers'}; the "
                f"host now puts it in group {f.iommu_group} with "
                f"{', '.join(f.iommu_group_peers) or 'no peers'}: the VM's isolation is not "
                "what was granted (healthy again when released or regrouped as claimed)",
            )
    return sick, keep

"""PciFlavor status counts (TOTAL, FREE, ...) from the inventory. No I/O.

- total: published devices matching the flavor;
- allocatable: of those, healthy, not cordoned, on a live node;
- allocated: claimed by a VM (companions included: they are in use);
- free: what a new VM could get now (allocatable, unclaimed, not promised to a bind in flight,
  and with its whole IOMMU group free) — the same count the scheduler searches with;
- unhealthy: Unhealthy or Missing.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from controller.inventory import Inventory


def compute_flavor_status(inv: Inventory, flavor: str) -> dict[str, Any]:
    per_node: dict[str, dict[str, int]] = defaultdict(
        lambda: {"total": 0, "allocatable": 0, "allocated": 0, "free": 0, "unhealthy": 0}
    )
    for name in inv.members.get(flavor, ()):
        d = inv.devices.get(name)
        if d is None:
            continue
        row = per_node[d.node]
        row["total"] += 1
        if not d.healthy:
            row["unhealthy"] += 1
        elif not d.unschedulable and not d.reserved_after_use and inv.is_alive(d.node):
            row["allocatable"] += 1
        if d.claim is not None:
            row["allocated"] += 1
    for node, row in per_node.items():
        row["free"] = inv.free.get(flavor, {}).get(node, 0) if inv.is_alive(node) else 0
    totals = {
        k: sum(r[k] for r in per_node.values())
        for k in ("total", "allocatable", "allocated", "free", "unhealthy")
    }
    f = inv.flavors.get(flavor)
    return {
        **totals,
        "nodes": [{"nodeName": n, **per_node[n]} for n in sorted(per_node)],
        "observedGeneration": f.metadata.generation if f else None,
    }

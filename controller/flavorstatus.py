"""PciFlavor status counts (TOTAL, FREE, ...) from the inventory. No I/O.

- total: published devices matching the flavor;
- allocatable: of those, healthy, not cordoned, on a live node;
- allocated: claimed by a VM (companions included: they are in use);
- free: what a new VM could get now (allocatable, unclaimed, not promised to a bind in flight,
  and with its whole IOMMU group free) — the same count the scheduler searches with;
- unhealthy: Unhealthy or Missing.

The same counts per node go into `nodes`, at most MAX_NODES of them: every node while there
are no more, else the MAX_NODES with the most free devices. A row per node for every node
made the status grow with the cluster (124 KB at 500 nodes, 1.2 MB at 5000, written every
second while counts move and decoded by every watcher, and past 6000 nodes over etcd's
limit); `nodeCount` says how many nodes there are, `kubectl pcipt inventory` lists them all.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from typing import Any, Final

from controller.inventory import Inventory
from pcipt.api.v1alpha1.pciflavor import MAX_STATUS_NODES


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
    f = inv.flavors.get(flavor)
    return summarize(
        [{"nodeName": n, **per_node[n]} for n in sorted(per_node)],
        f.metadata.generation if f else None,
    )


COLUMNS = ("total", "allocatable", "allocated", "free", "unhealthy")
MAX_NODES: Final = MAX_STATUS_NODES


def summarize(rows: list[dict[str, Any]], generation: int | None) -> dict[str, Any]:
    """The status from every node's row (sorted by node): totals, and the rows kept."""
    kept = rows
    if len(rows) > MAX_NODES:
        top = heapq.nsmallest(MAX_NODES, rows, key=lambda r: (-r["free"], r["nodeName"]))
        kept = sorted(top, key=lambda r: r["nodeName"])
    return {
        **{k: sum(r[k] for r in rows) for k in COLUMNS},
        "nodeCount": len(rows),
        "nodes": kept,
        "observedGeneration": generation,
    }


class FlavorCounts:
    """compute_flavor_status kept per node: a node's row is counted again only when the node
    changed (its version, or whether it is alive), so the status of a flavor over thousands
    of nodes costs the nodes that moved, not every device, each second."""

    def __init__(self, inv: Inventory) -> None:
        self.inv = inv
        self._rows: dict[str, dict[str, tuple[tuple[int, bool], dict[str, int] | None]]] = {}

    def forget(self, flavor: str) -> None:
        self._rows.pop(flavor, None)

    def _row(self, flavor: str, node: str, alive: bool) -> dict[str, int] | None:
        inv = self.inv
        members = inv.members.get(flavor, ())
        row = dict.fromkeys(COLUMNS, 0)
        for d in inv.by_node.get(node, {}).values():
            if d.name not in members:
                continue
            row["total"] += 1
            if not d.healthy:
                row["unhealthy"] += 1
            elif not d.unschedulable and not d.reserved_after_use and alive:
                row["allocatable"] += 1
            if d.claim is not None:
                row["allocated"] += 1
        if not row["total"]:
            return None
        row["free"] = inv.free.get(flavor, {}).get(node, 0) if alive else 0
        return row

    def status(self, flavor: str) -> dict[str, Any]:
        inv = self.inv
        if flavor not in inv.flavors:
            self.forget(flavor)  # its members are gone without any node changing
        cache = self._rows.setdefault(flavor, {})
        versions = inv.node_versions
        for node in list(cache):
            if node not in inv.by_node:
                del cache[node]
        nodes = []
        for node in inv.known_nodes():  # sorted, and kept until the set of nodes changes
            if node not in inv.by_node:
                continue
            alive = inv.is_alive(node)
            key = (versions.get(node, 0), alive)
            hit = cache.get(node)
            if hit is None or hit[0] != key:
                hit = (key, self._row(flavor, node, alive))
                cache[node] = hit
            if hit[1] is not None:
                nodes.append({"nodeName": node, **hit[1]})
        f = inv.flavors.get(flavor)
        return summarize(nodes, f.metadata.generation if f else None)

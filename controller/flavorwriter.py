"""Writes each PciFlavor's status counts (controller.flavorstatus computes them) when they
change: one status patch per flavor per change, none when the object already says it."""

from __future__ import annotations

from typing import Any

from controller.flavorstatus import FlavorCounts
from controller.inventory import Inventory
from pcipt import constants as c
from pcipt.api.v1alpha1 import PciFlavor
from pcipt.kubeclient import KubeClient, NotFound, crd_path


class FlavorStatusWriter:
    def __init__(self, api: KubeClient, inventory: Inventory) -> None:
        self.api = api
        self.inventory = inventory
        self._written: dict[str, dict[str, Any]] = {}
        self._epoch = -1
        self.counts = FlavorCounts(inventory)

    async def write(self) -> None:
        inv = self.inventory
        if inv.epoch == self._epoch and self._written.keys() >= inv.flavors.keys():
            return  # nothing counted has changed since the last pass
        self._epoch = inv.epoch
        for gone in set(self._written) - set(inv.flavors):
            del self._written[gone]
            self.counts.forget(gone)
        for name in list(self.inventory.flavors):
            status = self.counts.status(name)
            if self._written.get(name) == status:
                continue
            current = self.inventory.flavors.get(name)
            if current is not None and name not in self._written and _says(current, status):
                self._written[name] = status
                continue
            try:
                await self.api.patch(
                    crd_path(c.PLURAL_PCIFLAVOR, name, subresource="status"),
                    {"status": status},
                    parse=False,  # its watch event brings it back
                )
            except NotFound:
                continue
            self._written[name] = status


def _says(flavor: PciFlavor, status: dict[str, Any]) -> bool:
    """Whether the flavor object already carries these counts (a restart, another replica)."""
    st = flavor.status
    have = {
        "total": st.total,
        "allocatable": st.allocatable,
        "allocated": st.allocated,
        "free": st.free,
        "unhealthy": st.unhealthy,
        "nodeCount": st.node_count,
        "nodes": [n.to_dict() for n in st.nodes],
        "observedGeneration": st.observed_generation,
    }
    return have == status

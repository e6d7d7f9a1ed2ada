"""Node liveness: a node is alive while its node plugin renews its Lease
(`pcipt-node-<node>` in the controller's namespace; the Lease also carries the node's CPUs and
memory). Placed VMs on a node that stops renewing get a NodeAlive=False condition and an Event;
their devices stay claimed (an evacuation is a decision of its own), and a deleted VM on a dead
node is released without waiting for its domain.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from controller.inventory import Inventory
from controller.statuswriter import VmStatusWriter
from controller.vmstatus import is_deleting
from pcipt import clock
from pcipt import constants as c
from pcipt.api.v1alpha1 import PassthroughVM
from pcipt.compute import ANNOTATION as COMPUTE_ANNOTATION
from pcipt.compute import NodeCompute
from pcipt.conditions import get_condition
from pcipt.events import EventRecorder
from pcipt.informer import Informer
from pcipt.kubeclient import KubeClient

log = logging.getLogger("pcipt.controller.liveness")


class NodeLiveness:
    def __init__(
        self,
        api: KubeClient,
        inventory: Inventory,
        status: VmStatusWriter,
        events: EventRecorder,
        *,
        namespace: str,
        dead_after: float,
        changed: Callable[[], None],
    ) -> None:
        self.inventory = inventory
        self.status = status
        self.events = events
        self.dead_after = dead_after
        self.changed = changed
        """Called when what the scheduler sees of a node changed (renewed, gone, compute)."""
        self.leases = Informer(
            api,
            f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases",
            on_event=self._lease_event,
            name="leases",
        )

    def _lease_event(self, kind: str, lease: dict[str, Any]) -> None:
        name = lease["metadata"]["name"]
        if not name.startswith(c.NODE_LEASE_PREFIX):
            return
        node = name[len(c.NODE_LEASE_PREFIX) :]
        if kind == "DELETED":
            self.inventory.forget_lease(node)
            self.changed()
            return
        annotations = lease["metadata"].get("annotations") or {}
        if annotations.get(c.ANNOTATION_SCRUBS) == "true":
            self.inventory.scrubbing_nodes.add(node)
        else:
            self.inventory.scrubbing_nodes.discard(node)
        uri = annotations.get(c.ANNOTATION_MIGRATION_URI)
        if uri:
            self.inventory.migration_uris[node] = uri
        else:
            self.inventory.migration_uris.pop(node, None)
        self.inventory.set_compute(node, NodeCompute.from_json(annotations.get(COMPUTE_ANNOTATION)))
        renew = (lease.get("spec") or {}).get("renewTime")
        if renew:
            self.inventory.renew_lease(node, clock.parse(renew).timestamp())
            self.changed()

    def tick(self) -> list[tuple[str, bool]]:
        """Re-evaluate liveness by the clock; the nodes whose liveness changed."""
        changed = self.inventory.tick()
        for node, alive in changed:
            log.info("node %s node=%s", "alive" if alive else "not alive", node)
        return changed

    async def mark_vms(self, vms: Iterable[PassthroughVM] | None = None) -> None:
        """Give VMs on a node that stopped renewing its lease a condition saying so (and take
        it back when the node is back)."""
        for vm in list(self.inventory.vms.values()) if vms is None else vms:
            node = vm.status.node_name
            if not node or is_deleting(vm):
                continue
            alive = self.inventory.is_alive(node)
            cond = get_condition(vm.status.conditions, c.COND_NODE_ALIVE)
            if cond is None and alive:
                continue
            if cond is not None and (cond.status == "True") == alive:
                continue
            msg = (
                f"node {node} renews its lease"
                if alive
                else f"node {node} renewed no lease for {self.dead_after:.0f}s"
            )
            reason = c.REASON_NODE_ALIVE if alive else c.REASON_NODE_NOT_ALIVE
            fresh = await self.status.patch(vm, {}, cond=(c.COND_NODE_ALIVE, alive, reason, msg))
            if fresh is not None and not alive:
                self.events.record(vm, "Warning", c.REASON_NODE_NOT_ALIVE, msg)

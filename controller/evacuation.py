"""Evacuation: take the VMs off a node that is known to be down and place them again.

A node is known to be down when it renews no Lease (it is not alive) and either
- its Node carries Kubernetes' non-graceful shutdown taint, `node.kubernetes.io/out-of-service`
  (an admin or a fencing agent says the node is off and will not write to the devices or the
  disks again), or
- its lease has lapsed for at least the seconds its Node label `pcipt.io/evacuate-after-seconds`
  gives: an admin's opt-in, per node group, for hosts whose failure is trusted to be total.
A node that merely stops renewing is never enough: a partitioned host may still run the guest,
which owns the device and the disk.

For each VM placed there (not being deleted) whose `spec.evacuationPolicy` is Restart:
1. its status is rewritten as unplaced (conditionally on the version decided from), with
   status.evacuation recording where from, why and which devices;
2. the devices it held there are released, each conditionally on still being its claim, with a
   release record (scrubbed and quarantined before they are offered again, when the node is
   back);
3. the scheduling queue places it again like any Pending VM.
A crash between 1 and 2 leaves claims the VM no longer lists: the audit releases them. A VM
whose policy is Wait keeps its devices and says what it waits for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from controller.binding import Binder
from controller.inventory import Inventory
from controller.ledger import ComputeLedger
from controller.statuswriter import VmStatusWriter
from controller.vmstatus import evacuated_status, is_deleting, listed_devices
from pcipt import clock
from pcipt import constants as c
from pcipt.api.v1alpha1 import PassthroughVM
from pcipt.conditions import get_condition
from pcipt.events import EventRecorder

log = logging.getLogger("pcipt.controller.evacuation")


def evacuate_after(labels: dict[str, str]) -> float | None:
    """The seconds of lapsed lease after which the node's VMs are evacuated, from its label;
    None when the node is not opted in (or the label is not a positive number)."""
    raw = labels.get(c.LABEL_EVACUATE_AFTER)
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and value > 0 else None


class Evacuator:
    def __init__(
        self,
        inventory: Inventory,
        binder: Binder,
        status: VmStatusWriter,
        events: EventRecorder,
        *,
        compute_ledger: ComputeLedger,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        in_flight: Callable[[], set[str]],
        reconsider: Callable[[PassthroughVM], None],
    ) -> None:
        self.inventory = inventory
        self.binder = binder
        self.status = status
        self.events = events
        self.compute_ledger = compute_ledger
        self.spawn = spawn
        self.in_flight = in_flight
        self.reconsider = reconsider
        self.running: set[str] = set()
        """UIDs of VMs being evacuated now."""

    def down_reason(self, node: str) -> str | None:
        """Why the node is known to be down, or None when it is not (or may not be)."""
        if self.inventory.is_alive(node):
            return None
        taint = self.inventory.out_of_service.get(node)
        renewed = self.inventory.leases.get(node)
        lapsed = self.inventory.clock() - renewed if renewed is not None else None
        since = f"renewed no lease for {lapsed:.0f}s" if lapsed is not None else "has no lease"
        if taint is not None:
            return f"node {node} carries the {taint} taint and {since}"
        after = evacuate_after(self.inventory.node_labels.get(node, {}))
        if after is not None and lapsed is not None and lapsed >= after:
            return (
                f"node {node} {since}, and its node group evacuates after {after:.0f}s "
                f"({c.LABEL_EVACUATE_AFTER})"
            )
        return None

    async def check(self, vms: Iterable[PassthroughVM] | None = None) -> None:
        """Evacuate (or mark waiting) the VMs on every node known to be down."""
        busy = self.in_flight()
        down: dict[str, str | None] = {}
        for vm in list(self.inventory.vms.values()) if vms is None else vms:
            node, uid = vm.status.node_name, vm.metadata.uid or ""
            if not node or is_deleting(vm) or uid in busy or uid in self.running:
                continue
            if node not in down:
                down[node] = self.down_reason(node)
            why = down[node]
            if why is None:
                continue
            if vm.spec.evacuation_policy == "Wait":
                await self._wait(vm, node, why)
                continue
            self.running.add(uid)
            self.spawn(self._evacuate(vm, node, why))

    async def _wait(self, vm: PassthroughVM, node: str, why: str) -> None:
        msg = f"{why}; evacuationPolicy is Wait: keeping its devices until the node is back"
        cond = get_condition(vm.status.conditions, c.COND_EVACUATED)
        if cond is not None and cond.message == msg:
            return
        fresh = await self.status.patch(
            vm, {}, cond=(c.COND_EVACUATED, False, c.REASON_EVACUATION_WAITING, msg)
        )
        if fresh is not None and (cond is None or cond.reason != c.REASON_EVACUATION_WAITING):
            self.events.record(vm, "Warning", c.REASON_EVACUATION_WAITING, msg)

    async def _evacuate(self, vm: PassthroughVM, node: str, why: str) -> None:
        uid = vm.metadata.uid or ""
        try:
            fresh, released = await take_off_node(
                vm,
                node,
                lambda held: evacuated_status(vm, node, why, held, clock.now()),
                c.REASON_EVACUATED,
                inventory=self.inventory,
                binder=self.binder,
                status=self.status,
                compute_ledger=self.compute_ledger,
            )
            if fresh is None:
                return  # the VM changed meanwhile: the next tick decides again
            log.warning(
                "evacuated vm=%s/%s from node=%s released=%d: %s",
                vm.metadata.namespace,
                vm.metadata.name,
                node,
                released,
                why,
            )
            self.events.record(
                vm,
                "Warning",
                c.REASON_EVACUATED,
                f"evacuated from {node}: {why}; released {released} device(s), placing it again",
            )
            self.reconsider(fresh)
        finally:
            self.running.discard(uid)


async def take_off_node(
    vm: PassthroughVM,
    node: str,
    status_of: Callable[[list[str]], dict[str, Any]],
    reason: str,
    *,
    inventory: Inventory,
    binder: Binder,
    status: VmStatusWriter,
    compute_ledger: ComputeLedger,
) -> tuple[PassthroughVM | None, int]:
    """Unplace a VM from `node` (evacuation, migration): its status first, as `status_of(the
    devices it held there)` says, conditionally on the version decided from; then those
    devices released as used (scrubbed and quarantined before reuse) with `reason`, and its
    CPUs and memory there. (None, 0) when the VM changed meanwhile."""
    uid = vm.metadata.uid or ""
    held = sorted(
        {d.name for d in inventory.claimed_by(uid) if d.node == node} | listed_devices(vm)
    )
    st = status_of(held)
    mig = vm.status.migration
    live = mig is not None and mig.live and mig.phase in c.LIVE_PHASES
    if live and "migration" not in st:
        # A live migration under way ends here: what it claimed on its target goes too.
        st["migration"] = {
            "phase": "Failed",
            "networks": None,
            "compute": None,
            "tuning": None,
            "completedAt": clock.timestamp(),
            "message": f"the VM was taken off {node} ({reason}) during the live migration",
        }
    fresh = await status.write(vm, st)
    if fresh is None:
        return None, 0
    released = await binder.release_all(uid, held, reason=reason)
    if vm.status.compute is not None:
        await compute_ledger.release(node, uid)
    if live and mig is not None and mig.to_node and mig.compute is not None:
        await compute_ledger.release(mig.to_node, uid)
    return fresh, released

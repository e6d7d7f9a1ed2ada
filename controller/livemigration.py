"""Live migration: move a running VM to another node without stopping its guest
(`kubectl pcipt migrate VM --live [--to NODE]`, i.e. `"live": true` in the pcipt.io/migrate
annotation).

What can move: a guest's memory and state (libvirt's live migration), macvtap interfaces (the
guest sees a virtio NIC; its backend moves to a VF of the same physical network on the
target), and SR-IOV VFs passed through, by unplug, migrate and replug on a VF of the same
network at the target: the guest keeps its connectivity through a bond with a virtio or
macvtap interface, as Nova and KubeVirt document. The MAC stays (it is derived from the VM's
UID and the request's name, or given). A VM holding any other passthrough device is refused
with the reason: a GPU's or NVMe drive's state cannot move (cold migration can move it).

The steps, each answered in status.migration (phase), each write conditional:
1. Preparing (controller): the VM is placed on the target by the same scheduler, counted in
   full there (its CPUs and memory too, in the target's compute ledger) while it still holds
   everything on its own node; the target's VFs are claimed for it and listed in
   status.migration.networks; the VM is labelled pcipt.io/migration-target=<node> so that
   node's plugin sees it.
2. Ready (target node plugin): its VFs are prepared (MAC, VLAN, vfio-pci); it writes the CPU
   pinning and NUMA binding the domain will have there (status.migration.tuning).
3. Transferring, Transferred (old node plugin): it unplugs the VFs, asks libvirt to move the
   running domain to the target's libvirt (peer to peer, the target's definition persisted,
   the old one undefined), with macvtap sources and pinning rewritten for the target.
4. Completed (controller): the VM is placed on the target (node, networks, compute, label), in
   one conditional write; then its old node's devices are released as used (scrubbed,
   quarantined) and its CPUs and memory there. The target's plugin, finding the domain
   running with fewer devices than the VM has, plugs the VFs in (hot-plug).
Failed at any step (the message says why): the old node plugs its VFs back (the guest never
stopped); the controller drops the target's claims and CPUs, and the VM stays where it was.
A crash between writes leaves claims the VM does not list: the audit releases them.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace
from typing import Any

from controller.binding import Binder, LostRace, vm_path
from controller.inventory import Inventory
from controller.ledger import ComputeLedger
from controller.scheduling import Placement, Refusal, ScoringPolicy, schedule
from controller.statuswriter import VmStatusWriter
from controller.vmstatus import scheduled_status
from pcipt import clock
from pcipt import constants as c
from pcipt.api.v1alpha1 import Migration, PassthroughVM
from pcipt.conditions import is_true, set_condition
from pcipt.events import EventRecorder
from pcipt.kubeclient import Conflict, KubeClient, NotFound

log = logging.getLogger("pcipt.controller.migration")

FRESH: dict[str, Any] = {"completedAt": None, "tuning": None}
"""Fields of the last migration a new live one's record (a merge) clears."""


def live_problem(vm: PassthroughVM, inventory: Inventory) -> str | None:
    """Why the VM cannot be live-migrated as it is; None when it can."""
    st = vm.status
    if not st.node_name:
        return "the VM is not placed on a node: nothing to migrate"
    if not vm.spec.running or not is_true(st.conditions, c.COND_DOMAIN_READY):
        return (
            f"the VM is not running on {st.node_name} (phase {st.phase}): live migration "
            "moves a running guest; use a cold migration"
        )
    held = sorted({d.address for d in st.devices})
    if held:
        return (
            f"the VM has passthrough devices {', '.join(held)} whose state cannot be moved "
            "live (only SR-IOV networks move: macvtap transparently, VFs by unplug and "
            "replug); use a cold migration (kubectl pcipt migrate without --live)"
        )
    if st.detaching:
        return "devices are being detached from the VM: try again when they are gone"
    limited = sorted(
        {
            n.flavor
            for n in vm.spec.networks
            if (f := inventory.flavors.get(n.flavor)) is not None
            and f.spec.limits is not None
            and f.spec.limits.max_per_namespace is not None
        }
    )
    if limited:
        return (
            f"flavor {limited[0]} has a per-namespace limit, which the VM's devices on two "
            "nodes at once would count twice; use a cold migration"
        )
    if st.node_name not in inventory.migration_uris:
        return (
            f"the node plugin on {st.node_name} does not take part in live migration "
            "(its Lease names no migration URI: --migration-uri)"
        )
    return None


def migration_vm(vm: PassthroughVM, to: str | None) -> PassthroughVM:
    """The VM as the scheduler should see it to place it on a target while it runs where it
    is: its own claims are another VM's (its UID differs), its old node is excluded (and every
    node but `to`, when named), only its networks are placed."""
    spec = vm.spec.model_copy(update={"devices": []})
    if spec.placement and spec.placement.same_numa:
        same = [r for r in spec.placement.same_numa if r in {n.name for n in spec.networks}]
        spec.placement = spec.placement.model_copy(update={"same_numa": same or None})
    meta = vm.metadata.model_copy(update={"uid": f"{vm.metadata.uid}-migration"})
    status = vm.status.model_copy(
        update={
            "migration": Migration(
                id="placing", from_node=vm.status.node_name or "", to_node=to, phase="Placing"
            ),
            "node_name": None,
            "networks": [],
            "compute": None,
        }
    )
    return vm.model_copy(update={"metadata": meta, "spec": spec, "status": status})


class LiveMigrator:
    def __init__(
        self,
        api: KubeClient,
        inventory: Inventory,
        binder: Binder,
        status: VmStatusWriter,
        events: EventRecorder,
        *,
        compute_ledger: ComputeLedger,
        scoring: ScoringPolicy,
        cpu_allocation_ratio: float = 1.0,
        prepare_timeout: float = 300.0,
    ) -> None:
        self.api = api
        self.inventory = inventory
        self.binder = binder
        self.status = status
        self.events = events
        self.compute_ledger = compute_ledger
        self.scoring = scoring
        self.ratio = cpu_allocation_ratio
        self.prepare_timeout = prepare_timeout
        """Seconds a migration may wait for the nodes before its domain starts to move."""

    def _place(self, vm: PassthroughVM, to: str | None) -> Placement | Refusal:
        part = migration_vm(vm, to)
        inp = self.inventory.scheduling_input(part, self.scoring, self.ratio)
        return schedule(replace(inp, free=None, refusal_memo=None))

    async def start(self, vm: PassthroughVM, req_id: str, to: str | None) -> str | None:
        """Place the VM on a target and claim its VFs there (phase Preparing); a string saying
        why not when it cannot be."""
        why = live_problem(vm, self.inventory)
        if why is not None:
            return why
        result = self._place(vm, to)
        if isinstance(result, Refusal):
            return f"no node can take the VM while it runs: {result.message}"
        target = result.node
        uri = self.inventory.migration_uris.get(target)
        if not uri:
            return (
                f"the node plugin on {target} does not take part in live migration (its Lease "
                "names no migration URI: --migration-uri)"
            )
        uid = vm.metadata.uid or ""
        bind_id = uuid.uuid4().hex[:16]
        fresh: list[str] = []
        compute_taken = False
        try:
            for a in sorted(result.assignments, key=lambda a: a.device):
                dev = self.inventory.devices.get(a.device)
                if dev is None or dev.claim is not None:
                    raise LostRace(f"device {a.device} is gone or claimed")
                await self.binder.claim(dev, vm, a, bind_id)
                fresh.append(a.device)
            if result.compute is not None:
                await self.compute_ledger.acquire(
                    vm, target, result.compute, bind_id, ratio=self.ratio
                )
                compute_taken = True
            ns, name = vm.metadata.namespace or "", vm.metadata.name
            try:
                got = await self.api.patch(
                    vm_path(ns, name),
                    {
                        "metadata": {
                            "resourceVersion": vm.metadata.resource_version,
                            "labels": {c.LABEL_MIGRATION_TARGET: target},
                        }
                    },
                )
            except (Conflict, NotFound) as e:
                raise LostRace(f"VM changed while placing it on {target} ({e.status})") from e
            labelled = PassthroughVM.model_validate(got)
            placed = scheduled_status(labelled, result, clock.now())
            msg = (
                f"live migration from {vm.status.node_name} to {target}: "
                f"{len(placed['networks'])} VF(s) claimed there; waiting for {target} to "
                "prepare them"
            )
            st = {
                "migration": {
                    **FRESH,
                    "id": req_id,
                    "fromNode": vm.status.node_name,
                    "toNode": target,
                    "live": True,
                    "phase": "Preparing",
                    "networks": placed["networks"],
                    **({"compute": placed["compute"]} if placed.get("compute") else {}),
                    "targetURI": uri,
                    "startedAt": clock.timestamp(),
                    "message": msg,
                },
                "conditions": [
                    x.to_dict()
                    for x in set_condition(
                        labelled.status.conditions,
                        c.COND_READY,
                        True,
                        c.REASON_MIGRATING,
                        msg,
                        generation=labelled.metadata.generation,
                        now=clock.now(),
                    )
                ],
            }
            if await self.status.write(labelled, st) is None:
                raise LostRace("VM status changed while placing it on the target")
        except (LostRace, Conflict) as e:
            for name in fresh:
                await self.binder.release(name, uid, bind_id)
            if compute_taken:
                await self.compute_ledger.release(target, uid, bind_id)
            log.info("live migration of vm=%s/%s lost a race: %s", vm.metadata.namespace,
                     vm.metadata.name, e)  # fmt: skip
            return None  # tried again from the fresh VM
        log.info("live migration vm=%s/%s to=%s", vm.metadata.namespace, vm.metadata.name, target)
        self.events.record(vm, "Normal", c.REASON_MIGRATING, msg)
        return None

    async def check_waiting(self, vm: PassthroughVM) -> None:
        """A migration whose domain has not started to move after `prepare_timeout` seconds (a
        target or old node whose plugin does not answer) is Failed, and so rolled back. Only
        before Transferring: once libvirt may be moving the domain, only the old node's plugin
        says how it ended. Conditional: the old node's Transferring and this cannot both win."""
        mig = vm.status.migration
        if mig is None or mig.started_at is None:
            return
        waited = (clock.now() - mig.started_at).total_seconds()
        if waited < self.prepare_timeout:
            return
        waiting_for = mig.to_node if mig.phase == "Preparing" else mig.from_node
        msg = (
            f"{waiting_for}'s node plugin did not answer within {self.prepare_timeout:.0f}s "
            f"(phase {mig.phase}): the VM stays on {mig.from_node}"
        )
        await self.status.write(
            vm,
            {"migration": {"phase": "Failed", "message": msg, "completedAt": clock.timestamp()}},
        )

    async def complete(self, vm: PassthroughVM) -> None:
        """The domain runs on the target: place the VM there, then let the old node go."""
        mig = vm.status.migration
        assert mig is not None and mig.to_node
        old, target, uid = vm.status.node_name or "", mig.to_node, vm.metadata.uid or ""
        ns, name = vm.metadata.namespace or "", vm.metadata.name
        held = sorted({d.pci_device for d in vm.status.networks})
        try:
            got = await self.api.patch(
                vm_path(ns, name),
                {
                    "metadata": {
                        "resourceVersion": vm.metadata.resource_version,
                        "labels": {c.LABEL_MIGRATION_TARGET: None},
                    }
                },
            )
        except (Conflict, NotFound):
            return
        labelled = PassthroughVM.model_validate(got)
        now = clock.now()
        msg = f"migrated live from {old} to {target}" + (f": {mig.message}" if mig.message else "")
        conds = set_condition(
            labelled.status.conditions,
            c.COND_SCHEDULED,
            True,
            c.REASON_LIVE_MIGRATED,
            f"placed on {target} by a live migration from {old}",
            generation=labelled.metadata.generation,
            now=now,
        )
        st = {
            "nodeName": target,
            "networks": [n.to_dict() for n in mig.networks],
            "compute": mig.compute.to_dict() if mig.compute else None,
            "numaNode": _numa_of(mig.compute) if vm.status.numa_node is not None else None,
            "domain": None,
            "migration": {
                **mig.to_dict(),
                "phase": "Completed",
                "networks": None,
                "compute": None,
                "tuning": None,
                "completedAt": clock.timestamp(now),
                "message": msg,
            },
            "conditions": [x.to_dict() for x in conds],
        }
        if await self.status.write(labelled, st) is None:
            return
        released = await self.binder.release_all(uid, held, reason=c.REASON_MIGRATED)
        if vm.status.compute is not None:
            await self.compute_ledger.release(old, uid)
        log.info("live migration vm=%s/%s done: %s; released %d device(s) on %s", ns, name, msg,
                 released, old)  # fmt: skip
        self.events.record(vm, "Normal", c.REASON_LIVE_MIGRATED, msg)

    async def roll_back(self, vm: PassthroughVM) -> None:
        """A live migration failed: the VM stays on its node; the target's claims and CPUs go
        (the VFs the target prepared are scrubbed there, as released devices are)."""
        mig = vm.status.migration
        assert mig is not None
        uid = vm.metadata.uid or ""
        ns, name = vm.metadata.namespace or "", vm.metadata.name
        if c.LABEL_MIGRATION_TARGET in (vm.metadata.labels or {}):
            try:
                got = await self.api.patch(
                    vm_path(ns, name),
                    {
                        "metadata": {
                            "resourceVersion": vm.metadata.resource_version,
                            "labels": {c.LABEL_MIGRATION_TARGET: None},
                        }
                    },
                )
            except (Conflict, NotFound):
                return
            vm = PassthroughVM.model_validate(got)
        held = sorted({n.pci_device for n in mig.networks})
        st = {
            "migration": {
                **mig.to_dict(),
                "networks": None,
                "compute": None,
                "tuning": None,
                "completedAt": mig.completed_at.strftime("%Y-%m-%dT%H:%M:%SZ")
                if mig.completed_at
                else clock.timestamp(),
            }
        }
        if await self.status.write(vm, st) is None:
            return
        released = await self.binder.release_all(uid, held, reason=c.REASON_MIGRATION_FAILED)
        if mig.to_node and mig.compute is not None:
            await self.compute_ledger.release(mig.to_node, uid)
        log.info("live migration vm=%s/%s failed, rolled back (released %d on %s): %s", ns, name,
                 released, mig.to_node, mig.message)  # fmt: skip
        self.events.record(vm, "Warning", c.REASON_MIGRATION_FAILED, mig.message)


def _numa_of(compute: Any) -> int | None:
    if compute is None or len(compute.numa) != 1:
        return None
    return int(compute.numa[0].node)

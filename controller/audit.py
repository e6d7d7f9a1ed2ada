"""The audit: repairs what an interrupted controller (or a replica that lost a race at the wrong
moment) may have left half done, every `audit_interval` seconds and once at start-up.

Every candidate comes from the inventory and is re-read from the API server before any repair,
so a stale view never repairs what is not broken. Claims are written and released through
binding.Binder; a VM's status through statuswriter.VmStatusWriter.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from controller.binding import Binder, device_path, vm_path
from controller.inventory import Inventory
from controller.ledger import ComputeLedger, Ledger, QuotaLedger, epoch
from controller.statuswriter import VmStatusWriter
from controller.vmstatus import is_deleting, listed_devices
from pcipt import constants as c
from pcipt.api.v1alpha1 import PassthroughVM, PciDevice
from pcipt.events import EventRecorder
from pcipt.kubeclient import KubeClient, NotFound

log = logging.getLogger("pcipt.controller.audit")


class Auditor:
    def __init__(
        self,
        api: KubeClient,
        inventory: Inventory,
        binder: Binder,
        status: VmStatusWriter,
        events: EventRecorder,
        *,
        quota_ledger: QuotaLedger,
        compute_ledger: ComputeLedger,
        grace: float,
        in_flight: Callable[[], set[str]],
        reconsider: Callable[[PassthroughVM], None],
    ) -> None:
        self.api = api
        self.inventory = inventory
        self.binder = binder
        self.status = status
        self.events = events
        self.quota_ledger = quota_ledger
        self.compute_ledger = compute_ledger
        self.grace = grace
        """Seconds a claim or ledger entry may exist unexplained before it is repaired."""
        self.in_flight = in_flight
        """UIDs of VMs this replica is binding now: never repaired under a bind."""
        self.reconsider = reconsider
        """Hands a VM sent back to Pending to the scheduling queue."""

    async def _fresh_vm(self, namespace: str, name: str) -> PassthroughVM | None:
        try:
            got = await self.api.get(vm_path(namespace, name))
        except NotFound:
            return None
        vm = PassthroughVM.model_validate(got)
        self.inventory.upsert_vm(vm)
        return vm

    async def _fresh_device(self, name: str) -> PciDevice | None:
        try:
            got = await self.api.get(device_path(name))
        except NotFound:
            self.inventory.delete_device(name)
            return None
        dev = PciDevice.model_validate(got)
        self.inventory.upsert_device(dev)
        return dev

    async def audit(self) -> dict[str, int]:
        """Repair what an interrupted controller may have left half done:
        - a claim whose VM is gone, or does not list the device, and is older than the grace
          period is released (conditionally on it still being that claim);
        - a VM whose status lists a device not claimed for it re-claims it when free, or goes
          back to Pending when another VM holds it (its other claims are adopted on re-plan).
        Candidates come from the inventory; each is re-read from the API server before any
        repair, so a stale view (a lagging watch, a replica just resumed) never repairs what
        is not broken.
        """
        repaired = {"orphans": 0, "reclaimed": 0, "replanned": 0}
        grace = self.grace
        for d in list(self.inventory.devices.values()):
            claim = d.claim
            if claim is None or claim.uid in self.in_flight() or d.name in self.inventory.reserved:
                continue
            if claim.claimed_at is not None and time.time() - claim.claimed_at < grace:
                continue
            vm = self.inventory.vms.get((claim.namespace, claim.name))
            if self._vm_holds(vm, claim.uid, d.name):
                continue
            # Looks orphaned: confirm against the API server before touching it.
            fresh = await self._fresh_device(d.name)
            ref = fresh.spec.claim_ref if fresh else None
            if ref is None or ref.uid != claim.uid or ref.bind_id != claim.bind_id:
                continue
            vm = await self._fresh_vm(claim.namespace, claim.name)
            if self._vm_holds(vm, claim.uid, d.name) or claim.uid in self.in_flight():
                continue
            gone = vm is None or vm.metadata.uid != claim.uid
            # Released as used: a VM that went without its finalizer, or a crash after a
            # detach was confirmed, may have had it in its guest (a crashed bind's device, that
            # no guest had, is only scrubbed once more than it needs).
            if await self.binder.release(
                d.name, claim.uid, claim.bind_id, used=True, reason="Orphaned"
            ):
                repaired["orphans"] += 1
                why = "its VM is gone" if gone else "its VM does not list it"
                log.info(
                    "released orphaned claim device=%s vm=%s/%s: %s",
                    d.name,
                    claim.namespace,
                    claim.name,
                    why,
                )
                self.events.record(
                    {
                        "kind": c.KIND_PCIDEVICE,
                        "apiVersion": c.API_VERSION,
                        "metadata": {"name": d.name},
                    },
                    "Normal",
                    c.REASON_ORPHAN_RELEASED,
                    f"released claim of {claim.namespace}/{claim.name}: {why}",
                )
        for cached in list(self.inventory.vms.values()):
            uid = cached.metadata.uid or ""
            if not cached.status.node_name or is_deleting(cached) or uid in self.in_flight():
                continue
            suspects = [
                n
                for n in sorted(listed_devices(cached))
                if (x := self.inventory.devices.get(n)) is not None
                and (x.claim is None or x.claim.uid != uid)
            ]
            if not suspects:
                continue
            vm = await self._fresh_vm(cached.metadata.namespace or "", cached.metadata.name)
            if vm is None or vm.metadata.uid != uid or not vm.status.node_name or is_deleting(vm):
                continue
            for name in suspects:
                dev = await self._fresh_device(name)
                if dev is None or name not in listed_devices(vm):
                    continue
                ref = dev.spec.claim_ref
                if ref is not None and ref.uid == uid:
                    continue
                if ref is None:
                    if await self._reclaim(vm, name):
                        repaired["reclaimed"] += 1
                    continue
                repaired["replanned"] += 1
                await self._replan(vm, name, ref.namespace, ref.name)
                break
        repaired["sriov_conflicts"] = await self._split_sriov_families()
        repaired["ledger_entries"] = await self._prune_ledgers()
        if any(repaired.values()):
            log.info("audit repaired %s", repaired)
        return repaired

    async def _prune_ledgers(self) -> int:
        """Drop quota- and compute-ledger entries whose VM is gone, or holds nothing and has
        had no bind in flight here for the claim grace period (a controller died between its
        ledger write and its claims)."""
        return await self._prune(self.quota_ledger) + await self._prune(self.compute_ledger)

    def _still_holds(self, ledger: Ledger, key: str, vm: PassthroughVM) -> bool:
        """A quota entry holds while its VM is placed or has claims; a compute entry while its
        VM is placed on that very node, or a live migration to it holds it."""
        if isinstance(ledger, ComputeLedger):
            mig = vm.status.migration
            return vm.status.node_name == key or (
                mig is not None and mig.to_node == key and mig.compute is not None
            )
        return bool(vm.status.node_name or self.inventory.claims_by_uid.get(vm.metadata.uid or ""))

    async def _prune(self, ledger: Ledger) -> int:
        pruned = 0
        grace = self.grace
        for tenant, entries in (await ledger.ledgers()).items():
            for uid, entry in entries.items():
                if uid in self.in_flight():
                    continue
                ns, _, name = str(entry.get("vm", "")).partition("/")
                at = epoch(entry.get("at"))
                young = at is not None and time.time() - at < grace
                vm = await self._fresh_vm(ns, name) if ns and name else None
                if (
                    vm is not None
                    and vm.metadata.uid == uid
                    and (young or self._still_holds(ledger, tenant, vm))
                ):
                    continue
                if await ledger.release(tenant, uid):
                    pruned += 1
                    log.info(
                        "pruned ledger entry %s%s vm=%s uid=%s",
                        ledger.prefix,
                        tenant,
                        entry.get("vm"),
                        uid,
                    )
        return pruned

    async def _split_sriov_families(self) -> int:
        """A PF and one of its VFs held by different VMs (claims made before the scheduler
        kept them apart, or by a controller that did not): the later claim's VM is sent back
        to scheduling, which will not give it that device again; its old claim is then an
        orphan the next audit releases. Re-read from the API server before acting."""
        by_addr = {(d.node, d.address): d for d in self.inventory.devices.values()}
        moved = 0
        for vf in list(self.inventory.devices.values()):
            pf = by_addr.get((vf.node, vf.phys_fn)) if vf.phys_fn else None
            if pf is None or vf.claim is None or pf.claim is None:
                continue
            if vf.claim.uid == pf.claim.uid or {vf.claim.uid, pf.claim.uid} & self.in_flight():
                continue
            # The later claim loses; on a tie the VF's (its VM is the one whose device the
            # PF's passthrough takes away).
            later, earlier = sorted(
                (vf, pf),
                key=lambda d: (-(d.claim.claimed_at or 0.0) if d.claim else 0.0, d is pf),
            )
            fresh = [await self._fresh_device(d.name) for d in (later, earlier)]
            refs = [f.spec.claim_ref if f else None for f in fresh]
            if any(r is None for r in refs) or refs[0].uid == refs[1].uid:  # type: ignore[union-attr]
                continue
            loser = refs[0]
            assert loser is not None and refs[1] is not None
            vm = await self._fresh_vm(loser.namespace, loser.name)
            if vm is None or vm.metadata.uid != loser.uid or is_deleting(vm):
                continue
            if later.name not in listed_devices(vm):
                continue  # an orphaned claim: the orphan pass releases it
            why = (
                f"device {later.name} and {earlier.name} are a PF and its VF, held by different "
                f"VMs (passing the PF through removes its VFs): {refs[1].namespace}/"
                f"{refs[1].name} claimed first"
            )
            await self._replan(vm, later.name, refs[1].namespace, refs[1].name, why=why)
            moved += 1
        return moved

    @staticmethod
    def _vm_holds(vm: PassthroughVM | None, uid: str, device: str) -> bool:
        """The VM exists under that UID and lists the device (or is being deleted: its
        release is the finalizer's business)."""
        return (
            vm is not None
            and vm.metadata.uid == uid
            and (device in listed_devices(vm) or is_deleting(vm))
        )

    async def _reclaim(self, vm: PassthroughVM, name: str) -> bool:
        if not await self.binder.reclaim(vm, name):
            return False
        log.info("re-claimed device=%s for vm=%s/%s", name, vm.metadata.namespace, vm.metadata.name)
        self.events.record(
            vm, "Normal", c.REASON_RECLAIMED, f"re-claimed {name}, which the VM's status lists"
        )
        return True

    async def _replan(
        self, vm: PassthroughVM, lost: str, other_ns: str, other: str, why: str | None = None
    ) -> None:
        msg = f"{why or f'device {lost} is claimed by {other_ns}/{other}'}; scheduling again"
        status: dict[str, Any] = {
            "phase": "Pending",
            "nodeName": None,
            "devices": [],
            "networks": [],
            "deviceSummary": None,
            "compute": None,
        }
        fresh = await self.status.patch(
            vm, status, cond=(c.COND_DEVICES_BOUND, False, c.REASON_DEVICE_LOST, msg)
        )
        if fresh is not None:
            log.warning(
                "vm=%s/%s lost device=%s to %s/%s; re-planning",
                vm.metadata.namespace,
                vm.metadata.name,
                lost,
                other_ns,
                other,
            )
            self.events.record(vm, "Warning", c.REASON_DEVICE_LOST, msg)
            self.reconsider(fresh)

"""Claim and release PciDevices, and record a bind on the VM, with conditional writes only.

A bind is one attempt, with its own ID:
1. Claims, in a fixed order (by device name). A free device is claimed by writing
   spec.claimRef with the resourceVersion the scheduler saw as a precondition. A device this VM
   already holds from an earlier, interrupted attempt is adopted by rewriting its claim with
   this attempt's ID, under the same precondition. A 409 means someone else won.
2. Its status is written (node, devices, networks, conditions) with the resourceVersion the
   scheduler saw as a precondition: of two controllers binding one VM, only one gets past this.
   The node plugin selects its VMs by status.nodeName, so this write is all it needs. The
   release finalizer was added at creation (crds/pcipt.io_admission.yaml); a VM without it
   gets it first, in one more conditional write.

If any step loses its race, the attempt rolls back the claims it made fresh, each by a JSON
patch that `test`s the claim still carries this attempt's ID: a claim another attempt has since
adopted is never freed under it. Adopted claims are left as they are. Then the caller re-plans.

Releases for good (the VM is gone) test only that the claim is still this VM's (its UID).
The audit's re-claim of a device a placed VM lists but no longer holds is written here too
(`reclaim`): this module is the only one that writes claims.
Correctness never depends on there being one controller: the API server decides every race.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from controller.inventory import Inventory
from controller.scheduling import Assignment, Device, Placement
from controller.vmstatus import scheduled_status
from pcipt import clock
from pcipt import constants as c
from pcipt.api.v1alpha1 import PassthroughVM, PciDevice
from pcipt.kubeclient import ApiError, Conflict, KubeClient, NotFound, crd_path
from pcipt.usage import settled

log = logging.getLogger("pcipt.controller.binding")


class LostRace(Exception):
    """A precondition failed: another writer got there first. Re-plan from fresh state."""


@dataclass
class BindResult:
    vm: PassthroughVM
    claimed: list[str]
    writes: int


def device_path(name: str) -> str:
    return crd_path(c.PLURAL_PCIDEVICE, name)


def vm_path(namespace: str, name: str, status: bool = False) -> str:
    return crd_path(
        c.PLURAL_PASSTHROUGHVM, name, namespace=namespace, subresource="status" if status else None
    )


def one_time_use(dev: Device) -> bool:
    return dev.facts.attributes.get("one_time_use", "").lower() == "true"


def claim_ref(vm: PassthroughVM, a: Assignment, bind_id: str, at: datetime) -> dict[str, Any]:
    ref: dict[str, Any] = {
        "namespace": vm.metadata.namespace,
        "name": vm.metadata.name,
        "uid": vm.metadata.uid,
        "request": a.request,
        "bindID": bind_id,
        "claimedAt": clock.timestamp(at),
    }
    if a.companion:
        ref["companion"] = True
    if a.flavor:
        ref["flavor"] = a.flavor
    return ref


class Binder:
    def __init__(
        self,
        api: KubeClient,
        inventory: Inventory,
        *,
        quarantine: float = 0.0,
        record_usage: Callable[[Device, str], Awaitable[None]] | None = None,
    ) -> None:
        self.api = api
        self.inv = inventory
        self.record_usage = record_usage
        """Writes a claim's interval (device time, controller/usage.py) before its release."""
        self.quarantine = quarantine
        """Seconds a device a VM used is held back after its release."""

    async def claim(self, dev: Device, vm: PassthroughVM, a: Assignment, bind_id: str) -> None:
        """Write claimRef conditioned on the resourceVersion the scheduler saw."""
        body = {
            "metadata": {"resourceVersion": dev.resource_version},
            # A new claim ends the last release's hold (which it was free of, or it would not
            # have been chosen).
            "spec": {"claimRef": claim_ref(vm, a, bind_id, clock.now()), "release": None},
        }
        try:
            got = await self.api.patch(device_path(dev.name), body)
        except (Conflict, NotFound) as e:
            raise LostRace(f"claim of {dev.name} lost ({e.status} {e.reason})") from e
        self.inv.upsert_device(PciDevice.model_validate(got))

    def _release_record(self, dev: Device, uid: str, reason: str) -> dict[str, Any]:
        """spec.release for a device a VM used: scrubbed first where its node's plugin scrubs,
        and quarantined for the configured time."""
        now = clock.now()
        vm = f"{dev.claim.namespace}/{dev.claim.name}" if dev.claim else uid
        record: dict[str, Any] = {
            "id": uuid.uuid4().hex[:16],
            "vm": vm,
            "uid": uid,
            "releasedAt": clock.timestamp(now),
            "reason": reason,
            "scrub": dev.node in self.inv.scrubbing_nodes,
        }
        if self.quarantine > 0:
            record["quarantineUntil"] = clock.timestamp(now + timedelta(seconds=self.quarantine))
        return record

    async def release(
        self,
        name: str,
        uid: str,
        bind_id: str | None = None,
        *,
        used: bool = False,
        reason: str = "Deleted",
    ) -> bool:
        """Clear claimRef if it is still `uid`'s (and, given bind_id, still that attempt's).
        `used`: the VM had the device (it is being deleted or evacuated, not rolled back), so
        the same write records the release (scrub and quarantine before it is offered again)
        and leaves a device marked one-time-use reserved. Returns True when released or
        already gone."""
        patch: list[dict[str, Any]] = [{"op": "test", "path": "/spec/claimRef/uid", "value": uid}]
        if bind_id is not None:
            patch.append({"op": "test", "path": "/spec/claimRef/bindID", "value": bind_id})
        dev = self.inv.devices.get(name)
        if (
            self.record_usage is not None
            and dev is not None
            and dev.claim is not None
            and dev.claim.uid == uid
            and (bind_id is None or dev.claim.bind_id == bind_id)
            and (used or settled(dev.claim.claimed_at))
        ):
            # A bind's rollback of a claim it just made is not device time (and costs no write
            # on the bind path); a claim that lived longer is, whatever ends it.
            await self.record_usage(dev, reason if used else "RolledBack")
        if used and dev is not None and dev.claim is not None and one_time_use(dev):
            reserved = {
                "vm": f"{dev.claim.namespace}/{dev.claim.name}",
                "uid": uid,
                "releasedAt": clock.timestamp(),
            }
            patch.append({"op": "add", "path": "/spec/reserved", "value": reserved})
        if used and dev is not None:
            record = self._release_record(dev, uid, reason)
            patch.append({"op": "add", "path": "/spec/release", "value": record})
        patch.append({"op": "remove", "path": "/spec/claimRef"})
        try:
            got = await self.api.patch(device_path(name), patch, patch_type="json")
        except NotFound:
            self.inv.delete_device(name)
            return True
        except ApiError as e:
            if e.status in (409, 422):  # a failed `test`: the claim is someone else's now
                log.info("release skipped device=%s uid=%s: claim changed hands", name, uid)
                return False
            raise
        self.inv.upsert_device(PciDevice.model_validate(got))
        return True

    async def release_all(self, uid: str, names: list[str], reason: str = "Deleted") -> int:
        """A VM's devices after it used them (deleted, evacuated): released with a release
        record, one-time-use ones left reserved."""
        released = 0
        for name in sorted(set(names)):
            released += await self.release(name, uid, used=True, reason=reason)
        return released

    async def bind(self, vm: PassthroughVM, placement: Placement) -> BindResult:
        """Claim every device of the placement, then write the VM's status."""
        uid = vm.metadata.uid or ""
        ns, name = vm.metadata.namespace or "", vm.metadata.name
        bind_id = uuid.uuid4().hex[:16]
        fresh: list[str] = []
        writes = 0
        by_device = {a.device: a for a in placement.assignments}
        try:
            for dev_name in sorted(by_device):
                dev = self.inv.devices.get(dev_name)
                if dev is None:
                    raise LostRace(f"device {dev_name} disappeared")
                if dev.claim is not None and dev.claim.uid != uid:
                    raise LostRace(
                        f"device {dev_name} was claimed by {dev.claim.namespace}/{dev.claim.name}"
                    )
                was_free = dev.claim is None
                await self.claim(dev, vm, by_device[dev_name], bind_id)
                if was_free:
                    fresh.append(dev_name)
                writes += 1

            rv = vm.metadata.resource_version
            if c.FINALIZER_RELEASE not in vm.metadata.finalizers:
                # Created before the admission policy that adds it (or without it): one write
                # more, and still before the status that places the VM.
                meta_patch = {
                    "metadata": {
                        "resourceVersion": rv,
                        "finalizers": [*vm.metadata.finalizers, c.FINALIZER_RELEASE],
                    }
                }
                try:
                    got = await self.api.patch(vm_path(ns, name), meta_patch)
                except (Conflict, NotFound) as e:
                    raise LostRace(f"VM {ns}/{name} changed while binding ({e.status})") from e
                writes += 1
                rv = got["metadata"]["resourceVersion"]
            body = {
                "metadata": {"resourceVersion": rv},
                "status": scheduled_status(vm, placement, clock.now()),
            }
            try:
                got = await self.api.patch(vm_path(ns, name, status=True), body)
            except (Conflict, NotFound) as e:
                raise LostRace(f"VM {ns}/{name} status changed while binding ({e.status})") from e
            writes += 1
            bound = PassthroughVM.model_validate(got)
            self.inv.upsert_vm(bound)
        except LostRace:
            for dev_name in fresh:
                await self.release(dev_name, uid, bind_id)
            raise
        # Devices this VM held from an interrupted attempt but no longer needs go back now,
        # each only if it still carries the claim we saw.
        for d in self.inv.claimed_by(uid):
            if d.name not in by_device and d.claim is not None:
                await self.release(d.name, uid, d.claim.bind_id)
        return BindResult(bound, fresh, writes)

    async def reclaim(self, vm: PassthroughVM, name: str) -> bool:
        """Claim again, for a VM placed on it, a free device its status lists (a claim lost to
        a crash between two writes); conditional on the device as the inventory last saw it.
        False when that changed meanwhile."""
        d = self.inv.devices[name]
        binding = next((x for x in vm.status.devices if x.pci_device == name), None)
        request = (
            binding.request
            if binding
            else next((n.name for n in vm.status.networks if n.pci_device == name), "unknown")
        )
        ref: dict[str, Any] = {
            "namespace": vm.metadata.namespace,
            "name": vm.metadata.name,
            "uid": vm.metadata.uid,
            "request": request,
            "bindID": "audit",
            "claimedAt": clock.timestamp(),
        }
        if binding is not None and binding.companion:
            ref["companion"] = True
        else:
            flavor = next((r.flavor for r in vm.spec.devices if r.name == request), None) or next(
                (r.flavor for r in vm.spec.networks if r.name == request), None
            )
            if flavor:
                ref["flavor"] = flavor
        body = {
            "metadata": {"resourceVersion": d.resource_version},
            "spec": {"claimRef": ref, "release": None},
        }
        try:
            got = await self.api.patch(device_path(name), body)
        except (Conflict, NotFound):
            return False
        self.inv.upsert_device(PciDevice.model_validate(got))
        return True

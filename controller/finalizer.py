"""Releases on deletion: a deleted VM keeps its devices until its domain is gone (the node
plugin's DomainGone condition) or its node is dead; then its claims are released, its ledger
entries given back, and the release finalizer dropped — each write conditional.

One finalize per VM at a time; news arriving mid-way makes it look again when done. A failure
of the API server leaves the release half done, which is safe (a release tests that the claim
is still this VM's), and it is done again after a back-off.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

from controller.binding import Binder, vm_path
from controller.inventory import Inventory, VmKey, vm_key
from controller.ledger import ComputeLedger, QuotaLedger, limited_counts
from controller.metrics import ControllerMetrics
from controller.statuswriter import VmStatusWriter
from controller.vmstatus import listed_devices
from pcipt import constants as c
from pcipt.api.v1alpha1 import PassthroughVM
from pcipt.backoff import Backoff, Health, is_transient
from pcipt.conditions import is_true
from pcipt.events import EventRecorder
from pcipt.kubeclient import Conflict, KubeClient, NotFound

log = logging.getLogger("pcipt.controller.finalizer")


class Finalizer:
    def __init__(
        self,
        api: KubeClient,
        inventory: Inventory,
        binder: Binder,
        status: VmStatusWriter,
        events: EventRecorder,
        *,
        metrics: ControllerMetrics,
        quota_ledger: QuotaLedger,
        compute_ledger: ComputeLedger,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self.api = api
        self.inventory = inventory
        self.binder = binder
        self.status = status
        self.events = events
        self.metrics = metrics
        self.quota_ledger = quota_ledger
        self.compute_ledger = compute_ledger
        self.spawn = spawn
        self.running: set[str] = set()
        """UIDs of VMs being finalized now."""
        self._again: set[str] = set()
        self._health = Health(log, "releasing deleted VMs' devices")
        self._backoff = Backoff(base=1.0, cap=30.0)

    def request(self, vm: PassthroughVM) -> None:
        """A VM being deleted that carries our finalizer: release it (now, or once the
        finalize under way for it ends)."""
        uid = vm.metadata.uid or ""
        if uid in self.running:
            self._again.add(uid)
        else:
            self.running.add(uid)
            self.spawn(self._finalize(vm_key(vm), uid))

    def _request_latest(self, key: VmKey, uid: str) -> None:
        latest = self.inventory.vms.get(key)
        if latest is not None and latest.metadata.uid == uid:
            self.request(latest)

    async def _finalize(self, key: VmKey, uid: str) -> None:
        """Release a deleted VM's devices once its domain is gone (or its node is dead), then
        drop the finalizer."""
        try:
            await self._release(key, uid)
            self._health.ok()
            self._backoff.reset()
        except Exception as e:
            if not is_transient(e):
                raise
            delay = self._backoff.next()
            self._health.failed(e, delay)
            asyncio.get_running_loop().call_later(delay, self._request_latest, key, uid)
        finally:
            self.running.discard(uid)
            if uid in self._again:
                self._again.discard(uid)
                self._request_latest(key, uid)

    async def _release(self, key: VmKey, uid: str) -> None:
        vm = self.inventory.vms.get(key)
        if vm is None or vm.metadata.uid != uid:
            return
        node = vm.status.node_name
        gone = is_true(vm.status.conditions, c.COND_DOMAIN_GONE)
        if node and not gone and self.inventory.is_alive(node):
            if vm.status.phase != "Terminating":
                msg = f"waiting for node {node} to remove the domain before releasing devices"
                await self.status.patch(
                    vm,
                    {"phase": "Terminating"},
                    cond=(c.COND_READY, False, c.REASON_TERMINATING, msg),
                )
            return  # the node plugin's DomainGone condition brings us back here
        names = sorted({d.name for d in self.inventory.claimed_by(uid)} | listed_devices(vm))
        released = await self.binder.release_all(uid, names)
        if limited_counts(vm, self.inventory, requested(vm)):
            await self.quota_ledger.release(key[0], uid)
        if vm.status.compute is not None and node:
            await self.compute_ledger.release(node, uid)
        self.metrics.releases.inc(by=released)
        finalizers = [f for f in vm.metadata.finalizers if f != c.FINALIZER_RELEASE]
        body = {
            "metadata": {"resourceVersion": vm.metadata.resource_version, "finalizers": finalizers}
        }
        try:
            await self.api.patch(vm_path(*key), body)
        except Conflict:
            got = await self.api.get(vm_path(*key))
            self.inventory.upsert_vm(PassthroughVM.model_validate(got))
            self._again.add(uid)
            return
        except NotFound:
            pass
        why = "its domain is gone" if gone or not node else f"node {node} is not alive"
        log.info("released vm=%s/%s devices=%d (%s)", *key, released, why)
        self.events.record(vm, "Normal", c.REASON_RELEASED, f"released {released} device(s): {why}")


def requested(vm: PassthroughVM) -> Counter[str]:
    """Devices the VM asks for, by flavor."""
    out: Counter[str] = Counter()
    for r in vm.spec.devices:
        out[r.flavor] += r.count
    for n in vm.spec.networks:
        out[n.flavor] += 1
    return out

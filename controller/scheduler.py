"""The scheduling worker: takes ready VMs from the queue, decides (controller.scheduling), and
carries each decision out — a bind in the background (ledgers first, then binding.Binder's
conditional claims) or a refusal written to the VM's status.

While a bind is in flight its devices, quota and CPUs are reserved in the inventory, so the
next decisions do not hand them out again; the bind's end lifts the reservation. A lost race
re-reads what it raced on and looks again; a failure of the API server backs off, per VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from controller.binding import Binder, BindResult, LostRace, device_path, vm_path
from controller.inventory import Inventory, VmKey
from controller.ledger import ComputeLedger, QuotaExceeded, QuotaLedger, limited_counts
from controller.metrics import ControllerMetrics
from controller.queue import PendingVM, SchedulingQueue
from controller.scheduling import Placement, Refusal, ScoringPolicy, schedule
from controller.vmstatus import is_deleting, pending_status
from pcipt import clock
from pcipt import constants as c
from pcipt.api.v1alpha1 import PassthroughVM, PciDevice
from pcipt.backoff import Health, is_transient
from pcipt.events import EventRecorder
from pcipt.kubeclient import ApiError, Conflict, KubeClient, NotFound

log = logging.getLogger("pcipt.controller.scheduler")


@dataclass
class SchedulerSettings:
    scoring: ScoringPolicy = "best-fit"
    cpu_allocation_ratio: float = 1.0
    claim_grace: float = 30.0
    """Seconds a ledger entry of a bind in flight is safe from the audit."""
    bind_concurrency: int = 16


class Scheduler:
    def __init__(
        self,
        api: KubeClient,
        inventory: Inventory,
        queue: SchedulingQueue,
        binder: Binder,
        events: EventRecorder,
        *,
        metrics: ControllerMetrics,
        quota_ledger: QuotaLedger,
        compute_ledger: ComputeLedger,
        settings: SchedulerSettings,
        active: asyncio.Event,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        seen_vm: Callable[[str, dict[str, Any]], None],
    ) -> None:
        self.api = api
        self.inventory = inventory
        self.queue = queue
        self.binder = binder
        self.events = events
        self.metrics = metrics
        self.quota_ledger = quota_ledger
        self.compute_ledger = compute_ledger
        self.settings = settings
        self.active = active
        """Set while this replica leads: only then does it decide."""
        self.spawn = spawn
        self.seen_vm = seen_vm
        """Feeds a VM read after a lost race through the same path as a watch event."""
        self.wake = asyncio.Event()
        self.bind_slots = asyncio.Semaphore(settings.bind_concurrency)
        self.refusal_writes = Health(log, "writing refusals to VMs' status")

    async def run(self) -> None:
        while True:
            due = self.queue.next_due()
            timeout = None if due is None else max(0.0, due - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout)
            await self.active.wait()
            self.wake.clear()
            try:
                await self.run_pass()
            except Exception:
                log.exception("scheduling pass failed")
                self.metrics.error("scheduling")
                await asyncio.sleep(1)
                self.wake.set()

    def _collect_news(self) -> None:
        everything, grown = self.inventory.take_news()
        self.queue.capacity_news(everything, grown)

    async def run_pass(self) -> None:
        """Decide for the ready VMs, oldest first."""
        self._collect_news()
        decisions = 0
        for entry in self.queue.take_batch(time.monotonic()):
            if entry.uid in self.queue.binding or entry.uid not in self.queue.pending:
                continue
            vm = self.inventory.vms.get(entry.key)
            if vm is None or vm.metadata.uid != entry.uid or vm.status.node_name or is_deleting(vm):
                self.queue.forget(entry.uid)
                continue
            self.queue.tried(entry, vm.metadata.generation)
            started = time.perf_counter()
            result = schedule(
                self.inventory.scheduling_input(
                    vm, self.settings.scoring, self.settings.cpu_allocation_ratio
                )
            )
            self.metrics.decision.observe(time.perf_counter() - started)
            decisions += 1
            if isinstance(result, Placement):
                self.queue.bind_started(entry)
                self.inventory.reserve(
                    result.devices(),
                    entry.uid,
                    usage=(entry.key[0], counted(result)),
                    compute=(result.node, result.compute) if result.compute else None,
                )
                self.spawn(self._bind(entry, vm, result))
            else:
                self.queue.refused(
                    entry,
                    {r.flavor for r in vm.spec.devices} | {r.flavor for r in vm.spec.networks},
                )
                self.metrics.refusals.inc(result.reason)
                self.spawn(self._refuse(entry, vm, result))
            if decisions % 16 == 0:
                await asyncio.sleep(0)  # let watch events and binds in flight through
                self._collect_news()

    async def _bind(self, entry: PendingVM, vm: PassthroughVM, placement: Placement) -> None:
        started = time.monotonic()
        retry_at: float | None = None
        limited = limited_counts(vm, self.inventory, counted(placement))
        try:
            async with self.bind_slots:
                # A namespace limit is claimed in the quota ledger before any device.
                ledger_bind = uuid.uuid4().hex[:16]
                await self.quota_ledger.acquire(vm, limited, ledger_bind, self.settings.claim_grace)
                try:
                    # Dedicated CPUs and memory too, on the node's compute ledger.
                    if placement.compute is not None:
                        await self.compute_ledger.acquire(
                            vm,
                            placement.node,
                            placement.compute,
                            ledger_bind,
                            grace=self.settings.claim_grace,
                            ratio=self.settings.cpu_allocation_ratio,
                        )
                    result = await self.binder.bind(vm, placement)
                except BaseException:
                    with contextlib.suppress(Exception):
                        if limited:
                            await self.quota_ledger.release(entry.key[0], entry.uid, ledger_bind)
                        if placement.compute is not None:
                            await self.compute_ledger.release(
                                placement.node, entry.uid, ledger_bind
                            )
                    raise
        except QuotaExceeded as e:
            self.metrics.conflicts.inc()
            log.info("bind refused by the quota ledger vm=%s/%s: %s; re-planning", *entry.key, e)
        except (LostRace, Conflict) as e:
            self.metrics.conflicts.inc()
            log.info("bind lost a race vm=%s/%s: %s; re-planning", *entry.key, e)
            await self._refresh_after_race(entry.key, placement)
        except Exception as e:
            self.metrics.error("bind")
            delay = entry.backoff.next()
            retry_at = time.monotonic() + delay
            said = f"{type(e).__name__}: {e}"
            if not is_transient(e):
                log.exception("bind failed vm=%s/%s; retrying in %.1fs", *entry.key, delay)
            elif said != entry.failure:
                log.warning("bind failed vm=%s/%s: %s; retrying in %.1fs", *entry.key, said, delay)
            entry.failure = said
        else:
            entry.backoff.reset()
            entry.failure = None
            self._bound(entry, vm, placement, result, started)
        finally:
            # A bind that failed will try for the same devices again: freeing them for a
            # moment is no news for the VMs waiting on their flavors.
            self.inventory.unreserve(entry.uid, note_growth=retry_at is None)
            self.queue.bind_ended(entry, retry_at)
            self.wake.set()

    def _bound(
        self,
        entry: PendingVM,
        vm: PassthroughVM,
        placement: Placement,
        result: BindResult,
        started: float,
    ) -> None:
        writes = result.writes
        self.metrics.binds.inc()
        created = vm.metadata.creation_timestamp
        if created is not None:
            latency = (clock.now() - created).total_seconds()
            self.metrics.latency.observe(latency)
        self.queue.forget(entry.uid)
        n = sum(1 for a in placement.assignments if not a.companion)
        log.info(
            "bound vm=%s/%s node=%s devices=%d writes=%d took=%.3fs",
            *entry.key,
            placement.node,
            n,
            writes,
            time.monotonic() - started,
        )
        skipped = ", ".join(r for r, _ in placement.skipped)
        self.events.record(
            result.vm,
            "Normal",
            c.REASON_SCHEDULED,
            f"placed on {placement.node} with {len(placement.assignments)} device(s)"
            + (f"; skipped optional {skipped}" if skipped else ""),
        )

    async def _refresh_after_race(self, key: VmKey, placement: Placement) -> None:
        """After a lost race, read what we raced on, so the next plan starts from the truth
        rather than spinning until the watch catches up (the watch still will, if this fails)."""
        try:
            with contextlib.suppress(NotFound):
                self.seen_vm("MODIFIED", await self.api.get(vm_path(*key)))
            for name in placement.devices():
                try:
                    got = await self.api.get(device_path(name))
                except NotFound:
                    self.inventory.delete_device(name)
                    continue
                self.inventory.upsert_device(PciDevice.model_validate(got))
        except Exception as e:
            if not (isinstance(e, ApiError) or is_transient(e)):
                raise

    async def _refuse(self, entry: PendingVM, vm: PassthroughVM, refusal: Refusal) -> None:
        status = pending_status(vm, refusal, clock.now())
        if status is None:
            return
        body = {"metadata": {"resourceVersion": vm.metadata.resource_version}, "status": status}
        try:
            got = await self.api.patch(vm_path(*entry.key, status=True), body)
        except (Conflict, NotFound):
            self.queue.retry(entry.uid)  # it changed under us: look again with the fresh object
            self.wake.set()
            return
        except Exception as e:
            if not is_transient(e):
                raise
            # The API server is away: the reason is written at the next refusal. The VM waits
            # on its flavors as refused VMs do.
            self.refusal_writes.failed(e)
            return
        self.refusal_writes.ok()
        self.inventory.upsert_vm(PassthroughVM.model_validate(got))
        if entry.refused_message != refusal.message:
            entry.refused_message = refusal.message
            self.events.record(got, "Warning", c.REASON_FAILED_SCHEDULING, refusal.message)


def counted(placement: Placement) -> Counter[str]:
    """Devices a placement gives the VM, by flavor (IOMMU companions not counted)."""
    return Counter(a.flavor for a in placement.assignments if a.flavor)

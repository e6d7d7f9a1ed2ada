"""The controller's coordinator, independent of kopf: it builds the parts, feeds them what the
watches say, runs their loops, and pauses them while another replica leads.

Where things happen:
- a VM's placement: controller.scheduler (the worker) deciding with controller.scheduling,
  queued by controller.queue;
- a claim, a release: controller.binding (the only code that writes claims);
- releases on deletion: controller.finalizer;
- node liveness, from the node plugins' Leases: controller.liveness;
- repairs of half-done states: controller.audit;
- flavor counts: controller.flavorwriter; every device's count for `kubectl pcipt inventory`:
  controller.invsummary.

kopf delivers flavor, namespace and node events (controller/handlers.py); devices and VMs,
which change with every bind, come from the lean informers started here. Tests and benchmarks
drive the same code through the real API server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp

from controller.audit import Auditor
from controller.binding import Binder
from controller.evacuation import Evacuator
from controller.finalizer import Finalizer
from controller.flavorwriter import FlavorStatusWriter
from controller.health import DeviceHealth
from controller.hotplug import Hotplugger
from controller.imagecatalog import ImageCatalogWatch
from controller.inventory import Inventory
from controller.invsummary import InventorySummaryWriter
from controller.leader import LeaderElector
from controller.ledger import ComputeLedger, QuotaLedger
from controller.livemigration import LiveMigrator
from controller.liveness import NodeLiveness
from controller.metrics import ControllerMetrics
from controller.migration import Migrator, migration_problems
from controller.queue import SchedulingQueue
from controller.scheduler import Scheduler, SchedulerSettings
from controller.scheduling import ScoringPolicy, request_problems
from controller.statuswriter import VmStatusWriter
from controller.usage import UsageLedger, UsageMeter
from controller.vmstatus import is_deleting
from pcipt import constants as c
from pcipt import metrics as pm
from pcipt.api.v1alpha1 import PassthroughVM, PciDevice, PciFlavor
from pcipt.backoff import Health, is_transient
from pcipt.events import EventRecorder
from pcipt.images import CATALOG_LABEL
from pcipt.informer import Informer
from pcipt.kubeclient import ApiError, KubeClient, crd_path, retry_transient

log = logging.getLogger("pcipt.controller")

SWEEP_ALL_BELOW = 2000
"""Up to this many VMs the periodic checks look at every VM every tick."""
SWEEP_CHUNK = 500
"""VMs the periodic checks look at before they let other work run."""
SWEEP_EVERY = 10.0
"""Past it, every VM is looked at this often (seconds); in between only what changed."""


@dataclass
class ControllerSettings:
    namespace: str = c.DEFAULT_NAMESPACE
    """Where node Leases and the ledgers live."""
    node_dead_after: float = 40.0
    """Seconds without a Lease renewal after which a node is not alive."""
    claim_grace: float = 30.0
    """Seconds a claim may exist without its VM listing it before the audit releases it."""
    audit_interval: float = 30.0
    """Seconds between audits."""
    scoring: ScoringPolicy = "best-fit"
    bind_concurrency: int = 16
    """Binds in flight at once (each is a few sequential writes)."""
    cpu_allocation_ratio: float = 1.0
    """Shared vCPUs per host CPU."""
    flavor_status_interval: float = 1.0
    """Seconds between flavor count writes (at most)."""
    inventory_summary_interval: float = 5.0
    """Seconds between writes of every device's count for `kubectl pcipt inventory` (at most;
    0: never)."""
    tick_interval: float = 1.0
    """Seconds between liveness checks."""
    leader_lease: str | None = None
    """Name of the Lease replicas elect a leader on; None: no election, always active."""
    identity: str = ""
    """This replica's name in the election: stable per pod."""
    lease_duration: float = 4.0
    """Seconds a leader's Lease lasts without renewal (a standby's longest wait)."""
    renew_period: float = 1.0
    """Seconds between a leader's renewals."""
    release_quarantine: float = 0.0
    """Seconds a device a VM used is held back after its release (on top of its scrub)."""
    live_migration_timeout: float = 300.0
    """Seconds a live migration may wait for its nodes' plugins before the domain moves."""


class Runtime:
    def __init__(self, api: KubeClient, settings: ControllerSettings) -> None:
        self.api = api
        self.settings = settings
        self.inventory = Inventory(node_dead_after=settings.node_dead_after)
        self.queue = SchedulingQueue()
        self.binder = Binder(
            api,
            self.inventory,
            quarantine=settings.release_quarantine,
            record_usage=UsageLedger(api, settings.namespace, self.inventory).record,
        )
        self.quota_ledger = QuotaLedger(api, settings.namespace, self.inventory)
        self.compute_ledger = ComputeLedger(api, settings.namespace, self.inventory)
        self.events = EventRecorder(api, "pcipt-controller")
        self.status = VmStatusWriter(api, self.inventory)
        self.registry = pm.Registry()
        self.metrics = ControllerMetrics(self.registry, self.inventory)
        self.usage = UsageMeter(api, settings.namespace, self.inventory, self.registry)
        self.registry.collectors.append(lambda: self.metrics.pending.set(float(len(self.queue))))
        self.ready = asyncio.Event()
        """Set once the first full LIST is in (health, admission)."""
        self.active = asyncio.Event()
        """Set while this replica acts: always without leader election, else while it leads."""
        self.scheduler = Scheduler(
            api,
            self.inventory,
            self.queue,
            self.binder,
            self.events,
            metrics=self.metrics,
            quota_ledger=self.quota_ledger,
            compute_ledger=self.compute_ledger,
            settings=SchedulerSettings(
                scoring=settings.scoring,
                cpu_allocation_ratio=settings.cpu_allocation_ratio,
                claim_grace=settings.claim_grace,
                bind_concurrency=settings.bind_concurrency,
            ),
            active=self.active,
            spawn=self._spawn,
            seen_vm=self.on_vm,
        )
        self.finalizer = Finalizer(
            api,
            self.inventory,
            self.binder,
            self.status,
            self.events,
            metrics=self.metrics,
            quota_ledger=self.quota_ledger,
            compute_ledger=self.compute_ledger,
            spawn=self._spawn,
        )
        self.liveness = NodeLiveness(
            api,
            self.inventory,
            self.status,
            self.events,
            namespace=settings.namespace,
            dead_after=settings.node_dead_after,
            changed=self.scheduler.wake.set,
        )
        self.images = ImageCatalogWatch(
            api, settings.namespace, self.inventory, changed=self._images_changed
        )
        self.auditor = Auditor(
            api,
            self.inventory,
            self.binder,
            self.status,
            self.events,
            quota_ledger=self.quota_ledger,
            compute_ledger=self.compute_ledger,
            grace=settings.claim_grace,
            in_flight=lambda: self.queue.binding,
            reconsider=self._consider,
        )
        self.evacuator = Evacuator(
            self.inventory,
            self.binder,
            self.status,
            self.events,
            compute_ledger=self.compute_ledger,
            spawn=self._spawn,
            in_flight=lambda: self.queue.binding,
            reconsider=self._consider,
        )
        self.migrator = Migrator(
            self.inventory,
            self.binder,
            self.status,
            self.events,
            compute_ledger=self.compute_ledger,
            spawn=self._spawn,
            in_flight=lambda: self.queue.binding,
            reconsider=self._consider,
            live=LiveMigrator(
                api,
                self.inventory,
                self.binder,
                self.status,
                self.events,
                compute_ledger=self.compute_ledger,
                scoring=settings.scoring,
                cpu_allocation_ratio=settings.cpu_allocation_ratio,
                prepare_timeout=settings.live_migration_timeout,
            ),
        )
        self.hotplug = Hotplugger(
            api,
            self.inventory,
            self.binder,
            self.status,
            self.events,
            scoring=settings.scoring,
            in_flight=lambda: self.queue.binding,
        )
        self.device_health = DeviceHealth(self.inventory, self.status, self.events)
        self.flavor_status = FlavorStatusWriter(api, self.inventory)
        self.inventory_summary = InventorySummaryWriter(api, self.inventory, settings.namespace)
        self.elector = (
            LeaderElector(
                api,
                namespace=settings.namespace,
                name=settings.leader_lease,
                identity=settings.identity,
                on_change=self._set_active,
                lease_duration=settings.lease_duration,
                renew_period=settings.renew_period,
            )
            if settings.leader_lease
            else None
        )
        # Devices and VMs change three times a bind: watched by the lean informer, not kopf
        # (whose per-event machinery cost a fifth of the controller's CPU in a fill).
        self.device_watch = Informer(
            api,
            crd_path(c.PLURAL_PCIDEVICE),
            on_event=self.on_device,
            name="PciDevices",
            keep=False,
        )
        self.vm_watch = Informer(
            api,
            crd_path(c.PLURAL_PASSTHROUGHVM),
            on_event=self.on_vm,
            name="PassthroughVMs",
            keep=False,
        )
        self._devices_rv = ""
        self._vms_rv = ""
        self._leases_rv = ""
        self._images_rv = ""
        self._usage_rv = ""
        self._tick_health = Health(log, "node liveness and flavor counts")
        self._audit_health = Health(log, "the audit")
        self._summary_health = Health(log, "the inventory counts")
        self._tasks: list[asyncio.Task[None]] = []
        self._last_sweep = 0.0
        self._background: set[asyncio.Task[Any]] = set()
        """Binds, refusals and finalizes in flight: awaited on stop."""

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await self.sync()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self.scheduler.run(), name="schedule"),
            loop.create_task(self._tick_loop(), name="tick"),
            loop.create_task(self._audit_loop(), name="audit"),
            loop.create_task(self.liveness.leases.run(resume_from=self._leases_rv), name="leases"),
            loop.create_task(
                self.images.configmaps.run(resume_from=self._images_rv), name="image-catalog"
            ),
            loop.create_task(self.usage.watch.run(resume_from=self._usage_rv), name="usage"),
            loop.create_task(self.device_watch.run(resume_from=self._devices_rv), name="devices"),
            loop.create_task(self.vm_watch.run(resume_from=self._vms_rv), name="vms"),
        ]
        if self.elector is not None:
            self._tasks.append(loop.create_task(self.elector.run(), name="leader-election"))
        else:
            self.active.set()
        self.ready.set()
        self.scheduler.wake.set()
        log.info("controller started %s", self.inventory.snapshot_counts())

    def _images_changed(self) -> None:
        """What images support changed: VMs waiting on it are tried again."""
        self.queue.retry_all()
        self.scheduler.wake.set()

    async def _set_active(self, active: bool) -> None:
        """Pause while another replica leads; on resuming, catch up with a full LIST first."""
        if not active:
            self.active.clear()
            return
        await self.sync()
        self.active.set()
        self.queue.retry_all()
        for vm in list(self.inventory.vms.values()):
            if is_deleting(vm):
                self._consider(vm)
        self.scheduler.wake.set()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        if self.elector is not None:
            await self.elector.release()  # binds in flight are done: a standby may start
        await self.events.drain()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_task_error)

    async def sync(self) -> None:
        """Seed the inventory with a full LIST of everything, so that the first decisions see
        every existing claim (the watches then keep it current). Again on resuming leadership:
        the device and VM informers then report only what changed meanwhile."""
        flavors, namespaces, nodes = await asyncio.gather(
            retry_transient(self.api.list, crd_path(c.PLURAL_PCIFLAVOR)),
            retry_transient(self.api.list, "/api/v1/namespaces"),
            retry_transient(self.api.list, "/api/v1/nodes"),
        )
        for ns in namespaces["items"]:
            self.on_namespace("ADDED", ns)
        for node in nodes["items"]:
            self.on_node("ADDED", node)
        for f in flavors["items"]:
            self.on_flavor("ADDED", f)
        self._devices_rv = await retry_transient(self.device_watch.relist)
        self._leases_rv = await retry_transient(self.liveness.leases.relist)
        self._images_rv = await retry_transient(self.images.configmaps.relist)
        self._usage_rv = await retry_transient(self.usage.watch.relist)
        self._vms_rv = await retry_transient(self.vm_watch.relist)

    # --- events from the watch -----------------------------------------------------------

    def on_device(self, event_type: str | None, body: dict[str, Any]) -> None:
        if event_type == "DELETED":
            self.inventory.delete_device(body["metadata"]["name"])
        elif self.inventory.holds_device(body):
            return  # the answer to our own write, applied when it came back
        else:
            try:
                dev = PciDevice.model_validate(body)
            except ValueError as e:
                log.warning(
                    "ignored invalid PciDevice %s: %s", body.get("metadata", {}).get("name"), e
                )
                return
            self.inventory.upsert_device(dev)
        self.scheduler.wake.set()

    def on_flavor(self, event_type: str | None, body: dict[str, Any]) -> None:
        if event_type == "DELETED":
            self.inventory.delete_flavor(body["metadata"]["name"])
        elif self.inventory.same_flavor(body):
            return  # its status only (the counts this controller writes): nothing to parse
        else:
            self.inventory.upsert_flavor(PciFlavor.model_validate(body))
        self.scheduler.wake.set()

    def on_namespace(self, event_type: str | None, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        self.inventory.set_namespace(
            meta["name"], None if event_type == "DELETED" else meta.get("labels") or {}
        )
        self.scheduler.wake.set()

    def on_node(self, event_type: str | None, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        self.inventory.set_node_labels(
            meta["name"], None if event_type == "DELETED" else meta.get("labels") or {}
        )
        taints = [] if event_type == "DELETED" else (body.get("spec") or {}).get("taints") or []
        oos = next((t for t in taints if t.get("key") == c.TAINT_OUT_OF_SERVICE), None)
        self.inventory.set_out_of_service(
            meta["name"],
            None
            if oos is None
            else f"{oos['key']}={oos.get('value', '')}:{oos.get('effect', '')}".replace("=:", ":"),
        )
        self.scheduler.wake.set()

    def on_vm(self, event_type: str | None, body: dict[str, Any]) -> None:
        if event_type == "DELETED":
            key = (body["metadata"].get("namespace", ""), body["metadata"]["name"])
            self.inventory.delete_vm(key)
            self.queue.forget(body["metadata"].get("uid", ""))
            return
        held = self.inventory.held_vm(body)
        if held is not None:
            self._consider(held)  # the answer to our own write: nothing new to parse
            return
        try:
            vm = PassthroughVM.model_validate(body)
        except ValueError as e:
            log.warning(
                "ignored invalid PassthroughVM %s: %s", body.get("metadata", {}).get("name"), e
            )
            return
        if not self.inventory.upsert_vm(vm):
            return  # older than what we hold
        self._consider(vm)

    def _consider(self, vm: PassthroughVM) -> None:
        """Route a VM to the part that acts on it: the finalizer when it is being deleted,
        else the scheduling queue (which drops it once placed)."""
        if not is_deleting(vm):
            if self.queue.offer(vm):
                self.scheduler.wake.set()
            return
        self.queue.forget(vm.metadata.uid or "")
        if c.FINALIZER_RELEASE in vm.metadata.finalizers and self.active.is_set():
            self.finalizer.request(vm)  # (a paused replica looks again when it resumes)

    # --- periodic work -------------------------------------------------------------------

    def _tick_vms(self) -> list[PassthroughVM]:
        """The VMs the periodic checks look at: every VM, while there are few; past
        SWEEP_ALL_BELOW, those that changed or whose node did since the last tick, and every VM
        once per SWEEP_EVERY seconds (what only time changes, such as a timeout, and what a
        check passed over while busy with it)."""
        touched = self.inventory.take_touched()
        now = time.monotonic()
        if len(self.inventory.vms) <= SWEEP_ALL_BELOW or now - self._last_sweep >= SWEEP_EVERY:
            self._last_sweep = now
            return list(self.inventory.vms.values())
        return touched

    async def _tick_loop(self) -> None:
        last_flavors = last_summary = 0.0
        while True:
            await asyncio.sleep(self.settings.tick_interval)
            if not self.active.is_set():
                continue
            try:
                if self.liveness.tick() or self.inventory.grown:
                    self.scheduler.wake.set()
                vms = self._tick_vms()
                for i in range(0, len(vms), SWEEP_CHUNK):
                    part = vms[i : i + SWEEP_CHUNK]
                    await self.liveness.mark_vms(part)
                    await self.evacuator.check(part)
                    await self.migrator.check(part)
                    await self.hotplug.check(part)
                    await self.device_health.mark_vms(part)
                    await asyncio.sleep(0)  # binds go on between parts of a long sweep
                if time.monotonic() - last_flavors >= self.settings.flavor_status_interval:
                    last_flavors = time.monotonic()
                    await self.flavor_status.write()
                # Deleted VMs waiting on a node that has since died can now be released.
                for vm in vms:
                    node = vm.status.node_name
                    if is_deleting(vm) and node and not self.inventory.is_alive(node):
                        self._consider(vm)
            except Exception as e:
                self.metrics.error("tick")
                if not is_transient(e):
                    log.exception("tick failed")
                else:
                    self._tick_health.failed(e)
                continue
            self._tick_health.ok()
            interval = self.settings.inventory_summary_interval
            if interval > 0 and time.monotonic() - last_summary >= interval:
                last_summary = time.monotonic()
                await self._write_inventory_summary()

    async def _write_inventory_summary(self) -> None:
        """Apart from the tick's work: a view for readers, whose failure must not hold up
        liveness, evacuation or releases."""
        try:
            await self.inventory_summary.write()
        except Exception as e:  # logged once per change, like the API server being away
            self.metrics.error("inventory-summary")
            self._summary_health.failed(e)
            return
        self._summary_health.ok()

    async def _audit_loop(self) -> None:
        first = True
        while True:
            if not first:
                await asyncio.sleep(self.settings.audit_interval)
            first = False
            await self.active.wait()  # the first pass is the start-up audit
            try:
                repaired = await self.auditor.audit()
            except Exception as e:
                self.metrics.error("audit")
                if not is_transient(e):
                    log.exception("audit failed")
                else:
                    self._audit_health.failed(e, self.settings.audit_interval)
                continue
            self._audit_health.ok()
            for kind, n in repaired.items():
                if n:
                    self.metrics.repairs.inc(kind, by=n)

    # --- admission -----------------------------------------------------------------------

    def admission_problems(self, body: dict[str, Any]) -> list[str]:
        """Cross-object checks of a VM for the validating webhook; [] when fine."""
        vm = PassthroughVM.model_validate(body)
        ns_labels = self.inventory.namespaces.get(vm.metadata.namespace or "", {})
        return migration_problems(vm) + request_problems(
            vm, self.inventory.flavors, ns_labels, self.inventory.images
        )

    async def confirmed_admission_problems(self, body: dict[str, Any]) -> list[str]:
        """admission_problems, but a refusal only when the API server's own flavors and
        namespace confirm it. The inventory can be behind: on a standby replica, or for a
        flavor created a moment ago. Found problems are rare, so the re-read is cheap; when it
        fails, the VM is let through (the controller checks again and says why in a condition)."""
        if not self.admission_problems(body):
            return []
        vm = PassthroughVM.model_validate(body)
        try:
            flavors, ns, catalogs = await asyncio.gather(
                self.api.list(crd_path(c.PLURAL_PCIFLAVOR)),
                self.api.get(f"/api/v1/namespaces/{vm.metadata.namespace}"),
                self.api.list(
                    f"/api/v1/namespaces/{self.settings.namespace}/configmaps",
                    label_selector=f"{CATALOG_LABEL}=true",
                ),
            )
        except (ApiError, TimeoutError, aiohttp.ClientError, OSError) as e:
            log.warning("admission re-check failed, VM let through: %s", e)
            return []
        fresh = {f["metadata"]["name"]: PciFlavor.model_validate(f) for f in flavors["items"]}
        labels = ns["metadata"].get("labels") or {}
        images = self.images.parse_all(catalogs["items"])
        return migration_problems(vm) + request_problems(vm, fresh, labels, images)


def _log_task_error(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task failed: %r", task.exception(), exc_info=task.exception())

"""The controller's moving parts, independent of kopf: the inventory fed by watch events, the
scheduling queue and its worker, binds in flight, releases on deletion, node liveness, flavor
counts and the audit that repairs half-done states after a crash.

kopf delivers events (controller/handlers.py) and runs this; tests and benchmarks drive the
same code through the real API server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp

from controller.binding import Binder, LostRace, device_path, vm_path
from controller.events import EventRecorder
from controller.flavorstatus import compute_flavor_status
from controller.inventory import Inventory, VmKey, vm_key
from controller.metrics import ControllerMetrics
from controller.peering import PeeringGate
from controller.quota import (
    ComputeLedger,
    Ledger,
    QuotaExceeded,
    QuotaLedger,
    epoch,
    limited_counts,
)
from controller.scheduling import Placement, Refusal, ScoringPolicy, request_problems, schedule
from controller.vmstatus import condition_status, pending_status
from pcipt import constants as c
from pcipt import metrics as pm
from pcipt.api.v1alpha1 import PassthroughVM, PciDevice, PciFlavor
from pcipt.compute import ANNOTATION as COMPUTE_ANNOTATION
from pcipt.compute import NodeCompute
from pcipt.conditions import get_condition, is_true
from pcipt.kubeclient import ApiError, Conflict, KubeClient, NotFound, crd_path, retry_transient

log = logging.getLogger("pcipt.controller")


@dataclass
class ControllerSettings:
    namespace: str = c.DEFAULT_NAMESPACE
    """Where node Leases live and cluster-scoped objects' Events go."""
    node_dead_after: float = 40.0
    """Seconds without a Lease renewal after which a node is not alive."""
    claim_grace: float = 30.0
    """Seconds a claim may exist without its VM listing it before the audit releases it."""
    audit_interval: float = 30.0
    scoring: ScoringPolicy = "best-fit"
    bind_concurrency: int = 16
    """Binds in flight at once (each is a few sequential writes)."""
    cpu_allocation_ratio: float = 1.0
    """Shared vCPUs per host CPU."""
    flavor_status_interval: float = 1.0
    tick_interval: float = 1.0
    peering: str | None = None
    """kopf peering name; None for standalone (always active)."""
    identity: str = ""
    """This replica's kopf peering identity."""
    priority: int = 0
    """This replica's kopf peering priority."""


@dataclass
class PendingVM:
    key: VmKey
    uid: str
    created: str
    generation: int | None = None
    """The spec generation last tried; a new one is tried again at once."""
    refused_message: str | None = None


@dataclass
class Stats:
    binds: int = 0
    conflicts: int = 0
    refusals: int = 0
    releases: int = 0
    orphans_released: int = 0
    reclaimed: int = 0
    bind_writes: int = 0
    scheduled_latency: list[float] = field(default_factory=list)


def _now() -> datetime:
    return datetime.now(UTC)


def _is_deleting(vm: PassthroughVM) -> bool:
    return vm.metadata.deletion_timestamp is not None


def _listed_devices(vm: PassthroughVM) -> set[str]:
    return {d.pci_device for d in vm.status.devices} | {n.pci_device for n in vm.status.networks}


class Runtime:
    def __init__(self, api: KubeClient, settings: ControllerSettings) -> None:
        self.api = api
        self.settings = settings
        self.inv = Inventory(node_dead_after=settings.node_dead_after)
        self.binder = Binder(api, self.inv)
        self.quota = QuotaLedger(api, settings.namespace, self.inv)
        self.compute_ledger = ComputeLedger(api, settings.namespace, self.inv)
        self.events = EventRecorder(api, settings.namespace)
        self.pending: dict[str, PendingVM] = {}
        """Every VM not placed yet, by UID."""
        self.to_try: set[str] = set()
        """Pending VMs to try in the next pass."""
        self.waiting: dict[str, set[str]] = {}
        """Refused VMs by the flavors they wait on: tried again when capacity of one grows."""
        self.inflight: set[str] = set()
        self.finalizing: set[str] = set()
        self._finalize_again: set[str] = set()
        self.wake = asyncio.Event()
        self.bind_slots = asyncio.Semaphore(settings.bind_concurrency)
        self.stats = Stats()
        self.registry = pm.Registry()
        self.metrics = ControllerMetrics(self.registry, self.inv)
        self.registry.collectors.append(lambda: self.metrics.pending.set(float(len(self.pending))))
        self.ready = asyncio.Event()
        self.active = asyncio.Event()
        """Set while this replica acts (always, standalone; with peering, while kopf would)."""
        self._tasks: list[asyncio.Task[None]] = []
        self._side: set[asyncio.Task[Any]] = set()
        self._flavor_written: dict[str, dict[str, Any]] = {}
        self._node_alive_written: dict[str, bool] = {}

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await self.sync()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._schedule_loop(), name="schedule"),
            loop.create_task(self._tick_loop(), name="tick"),
            loop.create_task(self._audit_loop(), name="audit"),
            loop.create_task(self._lease_loop(), name="leases"),
        ]
        if self.settings.peering:
            gate = PeeringGate(
                self.api,
                name=self.settings.peering,
                identity=self.settings.identity,
                priority=self.settings.priority,
                on_change=self._set_active,
            )
            self._tasks.append(loop.create_task(gate.run(), name="peering"))
        else:
            self.active.set()
        self.ready.set()
        self.wake.set()
        log.info("controller started %s", self.inv.snapshot_counts())

    async def _set_active(self, active: bool) -> None:
        """Pause with kopf; on resuming, catch up with a full LIST before acting."""
        if not active:
            self.active.clear()
            return
        await self.sync()
        self.active.set()
        self.to_try.update(self.pending)
        for vm in list(self.inv.vms.values()):
            if _is_deleting(vm):
                self._consider(vm)
        self.wake.set()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._side:
            await asyncio.gather(*list(self._side), return_exceptions=True)
        await self.events.drain()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._side.add(task)
        task.add_done_callback(self._side.discard)
        task.add_done_callback(_log_task_error)

    async def sync(self) -> None:
        """Seed the inventory with a full LIST of everything, so that the first decisions see
        every existing claim (the watch then keeps it current)."""
        lists = await asyncio.gather(
            retry_transient(self.api.list, crd_path(c.PLURAL_PCIFLAVOR)),
            retry_transient(self.api.list, crd_path(c.PLURAL_PCIDEVICE)),
            retry_transient(self.api.list, crd_path(c.PLURAL_PASSTHROUGHVM)),
            retry_transient(self.api.list, "/api/v1/namespaces"),
            retry_transient(self.api.list, "/api/v1/nodes"),
        )
        flavors, devices, vms, namespaces, nodes = lists
        for ns in namespaces["items"]:
            self.inv.set_namespace(ns["metadata"]["name"], ns["metadata"].get("labels") or {})
        for node in nodes["items"]:
            self.inv.set_node_labels(node["metadata"]["name"], node["metadata"].get("labels") or {})
        for f in flavors["items"]:
            self.inv.upsert_flavor(PciFlavor.model_validate(f))
        for d in devices["items"]:
            self.on_device("ADDED", d)
        await self._sync_leases()
        for v in vms["items"]:
            self.on_vm("ADDED", v)

    # --- events from the watch -----------------------------------------------------------

    def on_device(self, event_type: str | None, body: dict[str, Any]) -> None:
        if event_type == "DELETED":
            self.inv.delete_device(body["metadata"]["name"])
        else:
            try:
                dev = PciDevice.model_validate(body)
            except ValueError as e:
                log.warning(
                    "ignored invalid PciDevice %s: %s", body.get("metadata", {}).get("name"), e
                )
                return
            self.inv.upsert_device(dev)
        self.wake.set()

    def on_flavor(self, event_type: str | None, body: dict[str, Any]) -> None:
        if event_type == "DELETED":
            self.inv.delete_flavor(body["metadata"]["name"])
        else:
            self.inv.upsert_flavor(PciFlavor.model_validate(body))
        self.wake.set()

    def on_namespace(self, event_type: str | None, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        self.inv.set_namespace(
            meta["name"], None if event_type == "DELETED" else meta.get("labels") or {}
        )
        self.wake.set()

    def on_node(self, event_type: str | None, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        self.inv.set_node_labels(
            meta["name"], None if event_type == "DELETED" else meta.get("labels") or {}
        )
        self.wake.set()

    def on_vm(self, event_type: str | None, body: dict[str, Any]) -> None:
        if event_type == "DELETED":
            key = (body["metadata"].get("namespace", ""), body["metadata"]["name"])
            self.inv.delete_vm(key)
            self.pending.pop(body["metadata"].get("uid", ""), None)
            return
        try:
            vm = PassthroughVM.model_validate(body)
        except ValueError as e:
            log.warning(
                "ignored invalid PassthroughVM %s: %s", body.get("metadata", {}).get("name"), e
            )
            return
        if not self.inv.upsert_vm(vm):
            return
        self._consider(vm)

    def _consider(self, vm: PassthroughVM) -> None:
        uid = vm.metadata.uid or ""
        if _is_deleting(vm):
            self.pending.pop(uid, None)
            if c.FINALIZER_RELEASE not in vm.metadata.finalizers:
                return
            if not self.active.is_set():
                return  # looked at again when this replica becomes active
            if uid in self.finalizing:
                self._finalize_again.add(uid)  # news arrived mid-way: look again when done
            else:
                self.finalizing.add(uid)
                self._spawn(self._finalize(vm_key(vm), uid))
            return
        if vm.status.node_name:
            self.pending.pop(uid, None)
            return
        entry = self.pending.get(uid)
        if entry is None:
            created = (
                vm.metadata.creation_timestamp.isoformat() if vm.metadata.creation_timestamp else ""
            )
            entry = self.pending[uid] = PendingVM(vm_key(vm), uid, created)
        if entry.generation != vm.metadata.generation:
            self.to_try.add(uid)  # new, or its spec changed: try now (our status writes are not)
            self.wake.set()

    # --- scheduling ----------------------------------------------------------------------

    async def _schedule_loop(self) -> None:
        while True:
            await self.wake.wait()
            await self.active.wait()
            self.wake.clear()
            try:
                await self._schedule_pass()
            except Exception:
                log.exception("scheduling pass failed")
                self.metrics.error("scheduling")
                await asyncio.sleep(1)
                self.wake.set()

    def _collect_ready(self) -> None:
        """Move refused VMs whose wait is over into the ready set."""
        if self.inv.changed:
            self.inv.changed = False
            self.inv.refusal_memo.clear()
            self.inv.grown.clear()
            self.waiting.clear()
            self.to_try.update(self.pending)
            return
        for flavor in self.inv.grown:
            self.to_try.update(self.waiting.pop(flavor, ()))
        self.inv.grown.clear()

    async def _schedule_pass(self) -> None:
        """Try the ready VMs, oldest first. Work is proportional to what changed: a refused VM
        waits, by the flavors it asked for, until capacity of one of them grows (or flavors,
        namespaces or nodes change, or its own spec does)."""
        self._collect_ready()
        decisions = 0
        batch = sorted(
            (self.pending[u] for u in self.to_try if u in self.pending),
            key=lambda e: (e.created, e.key),
        )
        self.to_try.clear()
        for entry in batch:
            if entry.uid in self.inflight or entry.uid not in self.pending:
                continue
            vm = self.inv.vms.get(entry.key)
            if (
                vm is None
                or vm.metadata.uid != entry.uid
                or vm.status.node_name
                or _is_deleting(vm)
            ):
                self.pending.pop(entry.uid, None)
                continue
            entry.generation = vm.metadata.generation
            started = time.perf_counter()
            result = schedule(
                self.inv.scheduling_input(
                    vm, self.settings.scoring, self.settings.cpu_allocation_ratio
                )
            )
            self.metrics.decision.observe(time.perf_counter() - started)
            decisions += 1
            if isinstance(result, Placement):
                self.inflight.add(entry.uid)
                self.inv.reserve(
                    result.devices(),
                    entry.uid,
                    usage=(entry.key[0], _counted(result)),
                    compute=(result.node, result.compute) if result.compute else None,
                )
                self._spawn(self._bind(entry, vm, result))
            else:
                for flavor in {r.flavor for r in vm.spec.devices} | {
                    r.flavor for r in vm.spec.networks
                }:
                    self.waiting.setdefault(flavor, set()).add(entry.uid)
                self.stats.refusals += 1
                self.metrics.refusals.inc(result.reason)
                self._spawn(self._refuse(entry, vm, result))
            if decisions % 16 == 0:
                await asyncio.sleep(0)  # let watch events and binds in flight through
                self._collect_ready()

    async def _bind(self, entry: PendingVM, vm: PassthroughVM, placement: Placement) -> None:
        started = time.monotonic()
        limited = limited_counts(vm, self.inv, _counted(placement))
        try:
            async with self.bind_slots:
                # A namespace limit is claimed in the quota ledger before any device.
                ledger_bind = uuid.uuid4().hex[:16]
                await self.quota.acquire(vm, limited, ledger_bind, self.settings.claim_grace)
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
                    with contextlib.suppress(ApiError):
                        if limited:
                            await self.quota.release(entry.key[0], entry.uid, ledger_bind)
                        if placement.compute is not None:
                            await self.compute_ledger.release(
                                placement.node, entry.uid, ledger_bind
                            )
                    raise
        except QuotaExceeded as e:
            self.stats.conflicts += 1
            self.metrics.conflicts.inc()
            log.info("bind refused by the quota ledger vm=%s/%s: %s; re-planning", *entry.key, e)
        except (LostRace, Conflict) as e:
            self.stats.conflicts += 1
            self.metrics.conflicts.inc()
            log.info("bind lost a race vm=%s/%s: %s; re-planning", *entry.key, e)
            await self._refresh_after_race(entry.key, placement)
        except Exception:
            self.metrics.error("bind")
            log.exception("bind failed vm=%s/%s", *entry.key)
            await asyncio.sleep(1)
        else:
            self.stats.binds += 1
            self.metrics.binds.inc()
            self.stats.bind_writes += result.writes
            created = vm.metadata.creation_timestamp
            if created is not None:
                latency = (_now() - created).total_seconds()
                self.stats.scheduled_latency.append(latency)
                self.metrics.latency.observe(latency)
            self.pending.pop(entry.uid, None)
            n = sum(1 for a in placement.assignments if not a.companion)
            log.info(
                "bound vm=%s/%s node=%s devices=%d writes=%d took=%.3fs",
                *entry.key,
                placement.node,
                n,
                result.writes,
                time.monotonic() - started,
            )
            self.events.record(
                result.vm,
                "Normal",
                c.REASON_SCHEDULED,
                f"placed on {placement.node} with {len(placement.assignments)} device(s)"
                + (
                    f"; skipped optional {', '.join(r for r, _ in placement.skipped)}"
                    if placement.skipped
                    else ""
                ),
            )
        finally:
            self.inv.unreserve(entry.uid)
            self.inflight.discard(entry.uid)
            if entry.uid in self.pending:
                self.to_try.add(entry.uid)
            self.wake.set()

    async def _refresh_after_race(self, key: VmKey, placement: Placement) -> None:
        """After a lost race, read what we raced on, so the next plan starts from the truth
        rather than spinning until the watch catches up."""
        with contextlib.suppress(ApiError):
            got = await self.api.get(vm_path(*key))
            self.on_vm("MODIFIED", got)
        for name in placement.devices():
            try:
                got = await self.api.get(device_path(name))
            except NotFound:
                self.inv.delete_device(name)
                continue
            except ApiError:
                continue
            self.inv.upsert_device(PciDevice.model_validate(got))

    async def _refuse(self, entry: PendingVM, vm: PassthroughVM, refusal: Refusal) -> None:
        status = pending_status(vm, refusal, _now())
        if status is None:
            return
        body = {"metadata": {"resourceVersion": vm.metadata.resource_version}, "status": status}
        try:
            got = await self.api.patch(vm_path(*entry.key, status=True), body)
        except (Conflict, NotFound):
            self.to_try.add(entry.uid)  # it changed under us: look again with the fresh object
            self.wake.set()
            return
        self.inv.upsert_vm(PassthroughVM.model_validate(got))
        if entry.refused_message != refusal.message:
            entry.refused_message = refusal.message
            self.events.record(got, "Warning", c.REASON_FAILED_SCHEDULING, refusal.message)

    # --- deletion ------------------------------------------------------------------------

    async def _finalize(self, key: VmKey, uid: str) -> None:
        """Release a deleted VM's devices once its domain is gone (or its node is dead), then
        drop the finalizer."""
        try:
            vm = self.inv.vms.get(key)
            if vm is None or vm.metadata.uid != uid:
                return
            node = vm.status.node_name
            gone = is_true(vm.status.conditions, c.COND_DOMAIN_GONE)
            if node and not gone and self.inv.is_alive(node):
                if vm.status.phase != "Terminating":
                    msg = f"waiting for node {node} to remove the domain before releasing devices"
                    await self._patch_status(
                        vm, {"phase": "Terminating"}, cond=(c.COND_READY, False, "Terminating", msg)
                    )
                return  # the node plugin's DomainGone condition brings us back here
            names = sorted({d.name for d in self.inv.claimed_by(uid)} | _listed_devices(vm))
            released = await self.binder.release_all(uid, names)
            if limited_counts(vm, self.inv, _requested(vm)):
                await self.quota.release(key[0], uid)
            if vm.status.compute is not None and node:
                await self.compute_ledger.release(node, uid)
            self.stats.releases += released
            self.metrics.releases.inc(by=released)
            finalizers = [f for f in vm.metadata.finalizers if f != c.FINALIZER_RELEASE]
            body = {
                "metadata": {
                    "resourceVersion": vm.metadata.resource_version,
                    "finalizers": finalizers,
                }
            }
            try:
                await self.api.patch(vm_path(*key), body)
            except Conflict:
                got = await self.api.get(vm_path(*key))
                self.inv.upsert_vm(PassthroughVM.model_validate(got))
                self._finalize_again.add(uid)
                return
            except NotFound:
                pass
            why = "its domain is gone" if gone or not node else f"node {node} is not alive"
            log.info("released vm=%s/%s devices=%d (%s)", *key, released, why)
            self.events.record(
                vm, "Normal", c.REASON_RELEASED, f"released {released} device(s): {why}"
            )
        finally:
            self.finalizing.discard(uid)
            if uid in self._finalize_again:
                self._finalize_again.discard(uid)
                latest = self.inv.vms.get(key)
                if latest is not None and latest.metadata.uid == uid:
                    self._consider(latest)

    async def _patch_status(
        self,
        vm: PassthroughVM,
        extra: dict[str, Any],
        *,
        cond: tuple[str, bool, str, str],
    ) -> PassthroughVM | None:
        """Set one condition (type, status, reason, message) plus `extra` status fields,
        conditionally on the VM not having changed; None when it had."""
        type_, status, reason, message = cond
        st = condition_status(vm, type_, status, reason, message, _now(), extra)
        if st is None:
            return vm
        body = {"metadata": {"resourceVersion": vm.metadata.resource_version}, "status": st}
        try:
            got = await self.api.patch(
                vm_path(vm.metadata.namespace or "", vm.metadata.name, status=True), body
            )
        except (Conflict, NotFound):
            return None
        fresh = PassthroughVM.model_validate(got)
        self.inv.upsert_vm(fresh)
        return fresh

    # --- liveness, flavor counts -----------------------------------------------------------

    async def _tick_loop(self) -> None:
        last_flavors = 0.0
        while True:
            await asyncio.sleep(self.settings.tick_interval)
            if not self.active.is_set():
                continue
            try:
                changed = self.inv.tick()
                for node, alive in changed:
                    log.info("node %s node=%s", "alive" if alive else "not alive", node)
                    self.wake.set()
                await self._mark_vms_on_nodes()
                if time.monotonic() - last_flavors >= self.settings.flavor_status_interval:
                    last_flavors = time.monotonic()
                    await self._write_flavor_counts()
                # Deleted VMs waiting on a node that has since died can now be released.
                for vm in list(self.inv.vms.values()):
                    if (
                        _is_deleting(vm)
                        and vm.status.node_name
                        and not self.inv.is_alive(vm.status.node_name)
                    ):
                        self._consider(vm)
            except Exception:
                log.exception("tick failed")
                self.metrics.error("tick")

    async def _mark_vms_on_nodes(self) -> None:
        """Give VMs on a node that stopped renewing its lease a condition saying so."""
        for vm in list(self.inv.vms.values()):
            node = vm.status.node_name
            if not node or _is_deleting(vm):
                continue
            alive = self.inv.is_alive(node)
            cond = get_condition(vm.status.conditions, c.COND_NODE_ALIVE)
            if cond is None and alive:
                continue
            if cond is not None and (cond.status == "True") == alive:
                continue
            msg = (
                f"node {node} renews its lease"
                if alive
                else f"node {node} renewed no lease for {self.settings.node_dead_after:.0f}s"
            )
            reason = "NodeAlive" if alive else c.REASON_NODE_NOT_ALIVE
            fresh = await self._patch_status(vm, {}, cond=(c.COND_NODE_ALIVE, alive, reason, msg))
            if fresh is not None and not alive:
                self.events.record(vm, "Warning", c.REASON_NODE_NOT_ALIVE, msg)

    async def _write_flavor_counts(self) -> None:
        for name in list(self.inv.flavors):
            status = compute_flavor_status(self.inv, name)
            if self._flavor_written.get(name) == status:
                continue
            current = self.inv.flavors.get(name)
            if (
                current is not None
                and _flavor_status_matches(current, status)
                and name not in self._flavor_written
            ):
                self._flavor_written[name] = status
                continue
            try:
                await self.api.patch(
                    crd_path(c.PLURAL_PCIFLAVOR, name, subresource="status"), {"status": status}
                )
            except NotFound:
                continue
            self._flavor_written[name] = status

    # --- leases --------------------------------------------------------------------------

    def _lease_seen(self, lease: dict[str, Any]) -> None:
        name = lease["metadata"]["name"]
        if not name.startswith(c.NODE_LEASE_PREFIX):
            return
        node = name[len(c.NODE_LEASE_PREFIX) :]
        annotations = lease["metadata"].get("annotations") or {}
        self.inv.set_compute(node, NodeCompute.from_json(annotations.get(COMPUTE_ANNOTATION)))
        renew = (lease.get("spec") or {}).get("renewTime")
        if renew:
            ts = datetime.fromisoformat(renew.replace("Z", "+00:00")).timestamp()
            self.inv.renew_lease(node, ts)
            self.wake.set()

    def _lease_gone(self, lease: dict[str, Any]) -> None:
        name = lease["metadata"]["name"]
        if name.startswith(c.NODE_LEASE_PREFIX):
            self.inv.forget_lease(name[len(c.NODE_LEASE_PREFIX) :])
            self.wake.set()

    async def _sync_leases(self) -> str:
        got = await retry_transient(
            self.api.list,
            f"/apis/coordination.k8s.io/v1/namespaces/{self.settings.namespace}/leases",
        )
        for lease in got["items"]:
            self._lease_seen(lease)
        return str(got["metadata"].get("resourceVersion", ""))

    async def _lease_loop(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{self.settings.namespace}/leases"
        rv = ""
        while True:
            try:
                if not rv:
                    rv = await self._sync_leases()
                async for ev in self.api.watch(path, resource_version=rv):
                    obj = ev.get("object", {})
                    if ev.get("type") == "ERROR":
                        rv = ""  # 410 Gone and friends: list again
                        break
                    rv = obj.get("metadata", {}).get("resourceVersion", rv)
                    if ev.get("type") in ("ADDED", "MODIFIED"):
                        self._lease_seen(obj)
                    elif ev.get("type") == "DELETED":
                        self._lease_gone(obj)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("lease watch interrupted: %s", e)
                rv = ""
                await asyncio.sleep(1)

    # --- the audit -----------------------------------------------------------------------

    async def _audit_loop(self) -> None:
        first = True
        while True:
            if not first:
                await asyncio.sleep(self.settings.audit_interval)
            first = False
            await self.active.wait()  # the first pass is the start-up audit
            try:
                await self.audit()
            except Exception:
                log.exception("audit failed")
                self.metrics.error("audit")

    async def _fresh_vm(self, namespace: str, name: str) -> PassthroughVM | None:
        try:
            got = await self.api.get(vm_path(namespace, name))
        except NotFound:
            return None
        vm = PassthroughVM.model_validate(got)
        self.inv.upsert_vm(vm)
        return vm

    async def _fresh_device(self, name: str) -> PciDevice | None:
        try:
            got = await self.api.get(device_path(name))
        except NotFound:
            self.inv.delete_device(name)
            return None
        dev = PciDevice.model_validate(got)
        self.inv.upsert_device(dev)
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
        grace = self.settings.claim_grace
        for d in list(self.inv.devices.values()):
            claim = d.claim
            if claim is None or claim.uid in self.inflight or d.name in self.inv.reserved:
                continue
            if claim.claimed_at is not None and time.time() - claim.claimed_at < grace:
                continue
            vm = self.inv.vms.get((claim.namespace, claim.name))
            if self._vm_holds(vm, claim.uid, d.name):
                continue
            # Looks orphaned: confirm against the API server before touching it.
            fresh = await self._fresh_device(d.name)
            ref = fresh.spec.claim_ref if fresh else None
            if ref is None or ref.uid != claim.uid or ref.bind_id != claim.bind_id:
                continue
            vm = await self._fresh_vm(claim.namespace, claim.name)
            if self._vm_holds(vm, claim.uid, d.name) or claim.uid in self.inflight:
                continue
            if await self.binder.release(d.name, claim.uid, claim.bind_id):
                repaired["orphans"] += 1
                self.stats.orphans_released += 1
                gone = vm is None or vm.metadata.uid != claim.uid
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
        for cached in list(self.inv.vms.values()):
            uid = cached.metadata.uid or ""
            if not cached.status.node_name or _is_deleting(cached) or uid in self.inflight:
                continue
            suspects = [
                n
                for n in sorted(_listed_devices(cached))
                if (x := self.inv.devices.get(n)) is not None
                and (x.claim is None or x.claim.uid != uid)
            ]
            if not suspects:
                continue
            vm = await self._fresh_vm(cached.metadata.namespace or "", cached.metadata.name)
            if vm is None or vm.metadata.uid != uid or not vm.status.node_name or _is_deleting(vm):
                continue
            for name in suspects:
                dev = await self._fresh_device(name)
                if dev is None or name not in _listed_devices(vm):
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
            for kind, n in repaired.items():
                if n:
                    self.metrics.repairs.inc(kind, by=n)
        return repaired

    async def _prune_ledgers(self) -> int:
        """Drop quota- and compute-ledger entries whose VM is gone, or holds nothing and has
        had no bind in flight here for the claim grace period (a controller died between its
        ledger write and its claims)."""
        return await self._prune(self.quota) + await self._prune(self.compute_ledger)

    def _still_holds(self, ledger: Ledger, key: str, vm: PassthroughVM) -> bool:
        """A quota entry holds while its VM is placed or has claims; a compute entry while its
        VM is placed on that very node."""
        if isinstance(ledger, ComputeLedger):
            return vm.status.node_name == key
        return bool(vm.status.node_name or self.inv.claims_by_uid.get(vm.metadata.uid or ""))

    async def _prune(self, ledger: Ledger) -> int:
        pruned = 0
        grace = self.settings.claim_grace
        for tenant, entries in (await ledger.ledgers()).items():
            for uid, entry in entries.items():
                if uid in self.inflight:
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
        by_addr = {(d.node, d.address): d for d in self.inv.devices.values()}
        moved = 0
        for vf in list(self.inv.devices.values()):
            pf = by_addr.get((vf.node, vf.phys_fn)) if vf.phys_fn else None
            if pf is None or vf.claim is None or pf.claim is None:
                continue
            if vf.claim.uid == pf.claim.uid or {vf.claim.uid, pf.claim.uid} & self.inflight:
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
            if vm is None or vm.metadata.uid != loser.uid or _is_deleting(vm):
                continue
            if later.name not in _listed_devices(vm):
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
            and (device in _listed_devices(vm) or _is_deleting(vm))
        )

    async def _reclaim(self, vm: PassthroughVM, name: str) -> bool:
        d = self.inv.devices[name]
        binding = next((b for b in vm.status.devices if b.pci_device == name), None)
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
            "claimedAt": _now().strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        if binding is not None and binding.companion:
            ref["companion"] = True
        else:
            flavor = next((r.flavor for r in vm.spec.devices if r.name == request), None) or next(
                (r.flavor for r in vm.spec.networks if r.name == request), None
            )
            if flavor:
                ref["flavor"] = flavor
        body = {"metadata": {"resourceVersion": d.resource_version}, "spec": {"claimRef": ref}}
        try:
            got = await self.api.patch(device_path(name), body)
        except (Conflict, NotFound):
            return False
        self.inv.upsert_device(PciDevice.model_validate(got))
        self.stats.reclaimed += 1
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
        fresh = await self._patch_status(
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
            self._consider(fresh)

    # --- admission -----------------------------------------------------------------------

    def admission_problems(self, body: dict[str, Any]) -> list[str]:
        """Cross-object checks of a VM for the validating webhook; [] when fine."""
        vm = PassthroughVM.model_validate(body)
        ns_labels = self.inv.namespaces.get(vm.metadata.namespace or "", {})
        return request_problems(vm, self.inv.flavors, ns_labels)

    async def confirmed_admission_problems(self, body: dict[str, Any]) -> list[str]:
        """admission_problems, but a refusal only when the API server's own flavors and
        namespace confirm it. The inventory can be behind: on a standby replica, whose watches
        kopf's peering pauses while it serves the webhook behind the same Service, or for a
        flavor created a moment ago. Found problems are rare, so the re-read is cheap; when it
        fails, the VM is let through (the controller checks again and says why in a condition)."""
        if not self.admission_problems(body):
            return []
        vm = PassthroughVM.model_validate(body)
        try:
            flavors, ns = await asyncio.gather(
                self.api.list(crd_path(c.PLURAL_PCIFLAVOR)),
                self.api.get(f"/api/v1/namespaces/{vm.metadata.namespace}"),
            )
        except (ApiError, TimeoutError, aiohttp.ClientError, OSError) as e:
            log.warning("admission re-check failed, VM let through: %s", e)
            return []
        fresh = {f["metadata"]["name"]: PciFlavor.model_validate(f) for f in flavors["items"]}
        labels = ns["metadata"].get("labels") or {}
        return request_problems(vm, fresh, labels)


def _flavor_status_matches(flavor: PciFlavor, status: dict[str, Any]) -> bool:
    st = flavor.status
    have = {
        "total": st.total,
        "allocatable": st.allocatable,
        "allocated": st.allocated,
        "free": st.free,
        "unhealthy": st.unhealthy,
        "nodes": [n.to_dict() for n in st.nodes],
        "observedGeneration": st.observed_generation,
    }
    return have == status


def _log_task_error(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task failed: %r", task.exception(), exc_info=task.exception())


def _counted(placement: Placement) -> Counter[str]:
    """Devices a placement gives the VM, by flavor (IOMMU companions not counted)."""
    return Counter(a.flavor for a in placement.assignments if a.flavor)


def _requested(vm: PassthroughVM) -> Counter[str]:
    out: Counter[str] = Counter()
    for r in vm.spec.devices:
        out[r.flavor] += r.count
    for n in vm.spec.networks:
        out[n.flavor] += 1
    return out

"""The node plugin's loops: rescan the host and keep this node's PciDevices true, renew the
node Lease, and turn each PassthroughVM scheduled here into a running libvirt domain with its
devices bound to vfio-pci — and back, when it stops or goes.

Decisions are made by the pure modules (discovery, devicespec, publish, domain); this module
reads, calls them, and writes. Nothing it knows is lost when the API server is away: writes
are retried on the next pass, watches list again, device moves are kept in a state file.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from nodeplugin import pciids
from nodeplugin.devicespec import DeviceSpecError, DeviceSpecs, decide, load_specs
from nodeplugin.discovery import HostInventory, discover, read_compute
from nodeplugin.domain.build import BuildError, HostFacts, build_domain, domain_name
from nodeplugin.domain.render import passthrough_addresses, render
from nodeplugin.metrics import NodeMetrics
from nodeplugin.publish import COND_HEALTHY, Plan, desired_devices, plan
from nodeplugin.sriov import CommandRunner, IpRunner, SriovError, configure_vf
from nodeplugin.vfcount import apply_vf_count, compute_vf_counts, vf_condition
from nodeplugin.vfio import FileWriter, PrepareError, Preparer, SysfsWriter
from nodeplugin.virt import DomainInfo, Hypervisor, VirtError
from pcipt import clock
from pcipt import constants as c
from pcipt import metrics as pm
from pcipt.api.v1alpha1 import PassthroughVM, pcidevice_name
from pcipt.backoff import Health
from pcipt.compute import ANNOTATION as COMPUTE_ANNOTATION
from pcipt.compute import NodeCompute
from pcipt.conditions import ready_condition, same_conditions, set_condition
from pcipt.events import EventRecorder
from pcipt.informer import Informer
from pcipt.kubeclient import ApiError, Conflict, KubeClient, NotFound, crd_path

log = logging.getLogger("pcipt.nodeplugin")
T = TypeVar("T")


@dataclass
class AgentSettings:
    node: str
    sysfs_root: Path = Path("/sys")
    config: Path | None = None
    nova_conf: Path | None = None
    libvirt_uri: str = "qemu:///system"
    namespace: str = c.DEFAULT_NAMESPACE
    state_dir: Path = Path("/var/lib/pcipt")
    pci_ids: Path | None = None
    rescan_interval: float = 30.0
    lease_interval: float = 10.0
    lease_duration: int = 40
    resync_interval: float = 5.0
    restore_drivers: bool = True
    domain_type: str = "kvm"
    machine: str | None = "q35"
    console_log_dir: str | None = None
    reserved_cpus: tuple[int, ...] = ()
    """Host CPUs no VM runs on (dedicated VMs' emulator threads do)."""
    reserved_memory_mib: int = 0
    """Memory kept for the host on each NUMA node."""
    stop_grace: float = 30.0
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    """port for /metrics, /healthz and /readyz; 0: off"""


@dataclass
class AgentStats:
    rescans: int = 0
    last_rescan_writes: int = 0
    rescan_writes: list[int] = field(default_factory=list)
    last_discovery_s: float = 0.0
    config_error: str | None = None


def _deleting(vm: PassthroughVM) -> bool:
    return vm.metadata.deletion_timestamp is not None


def _vm_addresses(vm: PassthroughVM) -> set[str]:
    return {d.address for d in vm.status.devices} | {n.address for n in vm.status.networks}


class NodeAgent:
    def __init__(
        self,
        api: KubeClient,
        settings: AgentSettings,
        *,
        writer: SysfsWriter | None = None,
        runner: CommandRunner | None = None,
        hypervisor: Hypervisor | None = None,
    ) -> None:
        self.api = api
        self.s = settings
        root = settings.sysfs_root
        # The host's kernel and `ip` unless the composition root (the CLI, a test) gives others:
        # a simulated host's are in nodeplugin.simulate and sriov.RecordingRunner.
        self.writer = writer or FileWriter()
        self._vf_said: dict[str, tuple[str, str]] = {}
        self.failures: dict[str, tuple[str, str]] = {}
        """address -> (reason, message): what the kernel said when preparing or restoring it
        failed; the device is published Unhealthy until it is cleared (see _retry_failures)."""
        self.unmanaged: set[str] = set()
        """Addresses the device spec marks `managed: false`: never rebound by this plugin."""
        self.compute: NodeCompute | None = None
        self.runner = runner or IpRunner()
        self.preparer = Preparer(
            root,
            self.writer,
            settings.state_dir / f"{settings.node}-vfio.json",
            restore=settings.restore_drivers,
        )
        self.hyper = hypervisor or Hypervisor(settings.libvirt_uri)
        self.ids = pciids.load(settings.pci_ids)
        self.specs = DeviceSpecs()
        self._config_stamp: tuple[float, ...] | None = None
        self.host = HostInventory(())
        self.node_labels: dict[str, str] = {"kubernetes.io/hostname": settings.node}
        self.stats = AgentStats()
        self.registry = pm.Registry()
        self.metrics = NodeMetrics(self.registry)
        self.events = EventRecorder(api, "pcipt-nodeplugin", host=settings.node)
        self.registry.collectors.append(self._collect)
        node_sel = f"{c.LABEL_NODE}={settings.node}"
        self.devices = Informer(
            api,
            crd_path(c.PLURAL_PCIDEVICE),
            label_selector=node_sel,
            on_event=lambda _k, _o: None,
            name="pcidevices",
        )
        self.vms = Informer(
            api,
            crd_path(c.PLURAL_PASSTHROUGHVM),
            label_selector=node_sel,
            on_event=self._vm_event,
            name="passthroughvms",
        )
        self._dirty: set[str] = set()
        self._running: dict[str, asyncio.Task[None]] = {}
        self._rescan_now = asyncio.Event()
        self._rescan_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[Any]] = []
        self._metrics_runner: Any = None

    # --- lifecycle -----------------------------------------------------------------------

    async def _virt(self, op: str, fn: Callable[..., T], *args: Any) -> T:
        """A libvirt call in a worker thread, timed and counted."""
        started = time.monotonic()
        try:
            return await asyncio.to_thread(fn, *args)
        except VirtError:
            self.metrics.libvirt_failures.inc(op)
            raise
        finally:
            self.metrics.libvirt.observe(time.monotonic() - started, op)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self.devices.run(), name="devices"),
            loop.create_task(self.vms.run(), name="vms"),
            loop.create_task(self._lease_loop(), name="lease"),
            loop.create_task(self._rescan_loop(), name="rescan"),
            loop.create_task(self._resync_loop(), name="resync"),
        ]
        if self.s.metrics_port:
            self._metrics_runner = await pm.serve(
                self.registry,
                self.s.metrics_host,
                self.s.metrics_port,
                health=self.devices.synced.is_set,
            )
        log.info(
            "node plugin started node=%s sysfs=%s libvirt=%s",
            self.s.node,
            self.s.sysfs_root,
            self.s.libvirt_uri,
        )

    async def stop(self) -> None:
        for t in [*self._tasks, *self._running.values()]:
            t.cancel()
        await asyncio.gather(*self._tasks, *self._running.values(), return_exceptions=True)
        await self.events.drain()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()

    async def run_forever(self) -> None:
        await self.start()
        try:
            await asyncio.gather(*self._tasks)
        finally:
            await self.stop()

    # --- the node's devices ----------------------------------------------------------------

    def _load_config(self) -> None:
        """Re-read the device specs when their files changed; keep the last good ones on error."""
        paths = [p for p in (self.s.config, self.s.nova_conf) if p is not None]
        stamp = tuple(p.stat().st_mtime if p.exists() else -1.0 for p in paths)
        if stamp == self._config_stamp:
            return
        self._config_stamp = stamp
        try:
            text = self.s.config.read_text() if self.s.config and self.s.config.exists() else None
            nova = (
                self.s.nova_conf.read_text()
                if self.s.nova_conf and self.s.nova_conf.exists()
                else None
            )
            self.specs = load_specs(text, nova_conf=nova)
            self.stats.config_error = None
            log.info(
                "loaded device specs entries=%d nova=%d",
                len(self.specs.entries),
                len(self.specs.nova),
            )
        except (DeviceSpecError, OSError) as e:
            self.stats.config_error = str(e)
            self.metrics.config_errors.inc()
            log.error("device specs refused, keeping the last good ones: %s", e)
            self._event_on_node(
                "Warning", "DeviceSpecInvalid", f"device specs refused, last good ones kept: {e}"
            )

    async def rescan(self) -> Plan:
        """Discover, decide, and write only what differs from what the API server holds. One at
        a time: a VF count is changed through 0, which two rescans at once would interleave."""
        async with self._rescan_lock:
            return await self._rescan()

    async def _rescan(self) -> Plan:
        self._load_config()
        started = time.monotonic()
        self.host = await asyncio.to_thread(discover, self.s.sysfs_root)
        self.compute = await asyncio.to_thread(
            read_compute, self.s.sysfs_root, self.s.reserved_cpus, self.s.reserved_memory_mib
        )
        self.stats.last_discovery_s = time.monotonic() - started
        self.metrics.discovery.observe(self.stats.last_discovery_s)
        await self._refresh_node_labels()
        vf_conditions = await self._ensure_vf_counts()
        try:
            decisions = decide(self.specs, self.host, self.node_labels)
        except DeviceSpecError as e:
            self.stats.config_error = str(e)
            log.error("device specs do not fit this host, offering nothing new: %s", e)
            self._event_on_node("Warning", "DeviceSpecInvalid", str(e))
            decisions = []
        self.unmanaged = {d.address for d in decisions if d.attributes.get("managed") == "false"}
        await self._retry_failures()
        desired = desired_devices(
            self.s.node, self.host, decisions, self.ids, vf_conditions, failures=self.failures
        )
        current = {o["metadata"]["name"]: o for o in self.devices.items.values()}
        present = {
            f"{self.s.node}.{f.address.replace(':', '-').replace('.', '-')}"
            for f in self.host.functions
        }
        p = plan(desired, current, present)
        await self._apply(p)
        self.stats.rescans += 1
        self.metrics.rescan_writes.inc(by=p.writes)
        self.stats.last_rescan_writes = p.writes
        self.stats.rescan_writes.append(p.writes)
        if p.writes:
            log.info("rescanned node=%s devices=%d writes=%d", self.s.node, len(desired), p.writes)
        return p

    async def _apply(self, p: Plan) -> None:
        t = clock.timestamp()
        for d in p.apply_spec:
            body = {
                "apiVersion": c.API_VERSION,
                "kind": c.KIND_PCIDEVICE,
                "metadata": {"name": d.name, "labels": d.labels},
                "spec": d.spec,
            }
            got = await self._ssa(crd_path(c.PLURAL_PCIDEVICE, d.name), body)
            self.devices.apply("MODIFIED", got)
        for d in p.apply_status:
            status = dict(d.status)
            status["conditions"] = [{**x, "lastTransitionTime": t} for x in status["conditions"]]
            body = {
                "apiVersion": c.API_VERSION,
                "kind": c.KIND_PCIDEVICE,
                "metadata": {"name": d.name},
                "status": status,
            }
            got = await self._ssa(crd_path(c.PLURAL_PCIDEVICE, d.name, subresource="status"), body)
            self.devices.apply("MODIFIED", got)
        for name, health, reason, message in p.mark:
            body = {
                "apiVersion": c.API_VERSION,
                "kind": c.KIND_PCIDEVICE,
                "metadata": {"name": name},
                "status": {
                    "health": health,
                    "conditions": [
                        {
                            "type": COND_HEALTHY,
                            "status": "False",
                            "reason": reason,
                            "message": message,
                            "lastTransitionTime": t,
                        }
                    ],
                },
            }
            got = await self._ssa(crd_path(c.PLURAL_PCIDEVICE, name, subresource="status"), body)
            self.devices.apply("MODIFIED", got)
            log.info("marked device=%s health=%s reason=%s", name, health, reason)
        for name, rv in p.delete:
            try:
                await self.api.delete(
                    crd_path(c.PLURAL_PCIDEVICE, name),
                    body={
                        "apiVersion": "v1",
                        "kind": "DeleteOptions",
                        "preconditions": {"resourceVersion": rv},
                    },
                )
                self.devices.apply("DELETED", {"metadata": {"name": name}})
                log.info("unpublished device=%s", name)
            except (Conflict, NotFound):
                pass  # changed meanwhile (a VM claimed it?): the next rescan decides again

    async def _ssa(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply as the node plugin: it owns spec.nodeName, spec.address, labels
        and status, and never touches what the controller or an admin set."""
        return await self.api.patch(
            path, body, patch_type="apply", field_manager=c.FIELD_MANAGER_NODEPLUGIN, force=True
        )

    async def _refresh_node_labels(self) -> None:
        try:
            node = await self.api.get(f"/api/v1/nodes/{self.s.node}")
            labels = node.get("metadata", {}).get("labels") or {}
        except NotFound:
            labels = {}
        except ApiError:
            return
        self.node_labels = {"kubernetes.io/hostname": self.s.node, **labels}

    async def _ensure_vf_counts(self) -> dict[str, list[dict[str, Any]]]:
        """Give each PF the VF count its `vfs` rule asks for, unless a VF of it is claimed;
        rediscover when a count changed. Returns each ruled PF's VFsConfigured condition."""
        claimed = {
            o["spec"]["address"]: f"{ref.get('namespace')}/{ref.get('name')}"
            for o in self.devices.items.values()
            if (ref := (o.get("spec") or {}).get("claimRef"))
        }
        counts = compute_vf_counts(self.specs, self.host, self.node_labels, claimed)
        conditions: dict[str, list[dict[str, Any]]] = {}
        changed = False
        for v in counts:
            failed = None
            if v.writes:
                try:
                    await asyncio.to_thread(
                        apply_vf_count, self.s.sysfs_root, self.writer, v, self.runner
                    )
                    changed = True
                    log.info(
                        "set pf=%s vfs=%d (was %d) rule=%s", v.pf, v.desired, v.current, v.rule
                    )
                except OSError as e:
                    failed = f"writing {v.desired} to {v.pf}'s sriov_numvfs failed: {e}"
                except SriovError as e:
                    failed = f"preparing {v.pf} for {v.desired} VFs failed: {e}"
            cond = vf_condition(v, failed)
            conditions[v.pf] = [cond]
            said = (cond["reason"], cond["message"])
            if self._vf_said.get(v.pf) != said and (v.writes or v.refused or failed):
                self._vf_said[v.pf] = said
                warn = cond["status"] == "False"
                if warn:
                    log.warning("kept pf=%s vfs=%d: %s", v.pf, v.current, cond["message"])
                self._event_on_node(
                    "Warning" if warn else "Normal",
                    cond["reason"],
                    cond["message"]
                    if warn
                    else f"{v.pf}: {v.current} -> {v.desired} VFs ({v.rule})",
                    device=pcidevice_name(self.s.node, v.pf),
                )
        if changed:
            self.host = await asyncio.to_thread(discover, self.s.sysfs_root)
        return conditions

    def _event_on_node(
        self, type_: str, reason: str, message: str, *, device: str | None = None
    ) -> None:
        """An Event about this Node, or about one of its PciDevices when it is published."""
        involved = {"apiVersion": "v1", "kind": "Node", "name": self.s.node}
        if device is not None and any(
            o["metadata"]["name"] == device for o in self.devices.items.values()
        ):
            involved = {"apiVersion": c.API_VERSION, "kind": c.KIND_PCIDEVICE, "name": device}
        self.events.record(involved, type_, reason, message)

    async def _rescan_loop(self) -> None:
        await self.devices.synced.wait()
        last = 0.0
        while True:
            due = time.monotonic() - last >= self.s.rescan_interval
            if due or self._rescan_now.is_set() or self._config_changed():
                self._rescan_now.clear()
                last = time.monotonic()
                try:
                    await self.rescan()
                except Exception as e:
                    self.metrics.error("rescan")
                    log.warning("rescan failed, retrying soon: %s", e)
                    last = time.monotonic() - self.s.rescan_interval + 2
            await asyncio.sleep(1.0)

    def _config_changed(self) -> bool:
        paths = [p for p in (self.s.config, self.s.nova_conf) if p is not None]
        stamp = tuple(p.stat().st_mtime if p.exists() else -1.0 for p in paths)
        return stamp != self._config_stamp

    async def _lease_loop(self) -> None:
        name = f"{c.NODE_LEASE_PREFIX}{self.s.node}"
        path = f"/apis/coordination.k8s.io/v1/namespaces/{self.s.namespace}/leases"
        health = Health(log, f"renewing Lease {name}")
        while True:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {
                    "name": name,
                    "namespace": self.s.namespace,
                    # The host's CPUs and memory, for the controller to count VMs against.
                    "annotations": (
                        {COMPUTE_ANNOTATION: self.compute.to_json()} if self.compute else {}
                    ),
                },
                "spec": {
                    "holderIdentity": self.s.node,
                    "leaseDurationSeconds": self.s.lease_duration,
                    "renewTime": clock.micro_timestamp(),
                },
            }
            try:
                await self.api.patch(
                    f"{path}/{name}",
                    body,
                    patch_type="apply",
                    field_manager=c.FIELD_MANAGER_NODEPLUGIN,
                    force=True,
                )
            except Exception as e:
                health.failed(e, self.s.lease_interval)
            else:
                health.ok()
            await asyncio.sleep(self.s.lease_interval)

    # --- VMs --------------------------------------------------------------------------------

    def _vm_event(self, kind: str, obj: dict[str, Any]) -> None:
        uid = obj.get("metadata", {}).get("uid", "")
        if uid:
            self.request(uid)

    def request(self, uid: str) -> None:
        """Reconcile a VM soon; never two reconciles of one VM at once."""
        self._dirty.add(uid)
        if uid not in self._running:
            self._running[uid] = asyncio.get_running_loop().create_task(self._reconcile_loop(uid))

    async def _reconcile_loop(self, uid: str) -> None:
        try:
            while uid in self._dirty:
                self._dirty.discard(uid)
                try:
                    await self.reconcile(uid)
                except Exception:
                    self.metrics.error("reconcile")
                    log.exception("reconcile failed vm-uid=%s", uid)
        finally:
            self._running.pop(uid, None)

    def _vm(self, uid: str) -> PassthroughVM | None:
        for obj in self.vms.items.values():
            if obj["metadata"].get("uid") == uid:
                return PassthroughVM.model_validate(obj)
        return None

    async def _resync_loop(self) -> None:
        """Look at every VM and domain now and then: guests that stopped by themselves, domains
        that vanished (a host reboot), domains whose VM is gone."""
        await self.vms.synced.wait()
        await self.devices.synced.wait()
        while True:
            try:
                for obj in list(self.vms.items.values()):
                    self.request(obj["metadata"]["uid"])
                known = {o["metadata"]["uid"] for o in self.vms.items.values()}
                ours = await self._virt("ours", self.hyper.ours)
                states: dict[tuple[str, ...], float] = {}
                for dom in ours:
                    states[(dom.state,)] = states.get((dom.state,), 0.0) + 1
                self.metrics.domains.replace(states)
                for dom in ours:
                    if (
                        dom.vm is not None
                        and dom.vm.uid not in known
                        and dom.uuid not in self._running
                    ):
                        await self._remove_orphan(dom)
            except Exception as e:
                log.warning("resync failed: %s", e)
            await asyncio.sleep(self.s.resync_interval)

    def _collect(self) -> None:
        health: dict[tuple[str, ...], float] = {}
        for obj in self.devices.items.values():
            h = (obj.get("status") or {}).get("health", "Unknown")
            health[(h,)] = health.get((h,), 0.0) + 1
        self.metrics.published.replace(health)

    async def _remove_orphan(self, dom: DomainInfo) -> None:
        log.info("removing domain=%s: its VM is no longer scheduled here", dom.name)
        await self._virt("remove", self.hyper.remove, dom.uuid)
        await self._restore(set(passthrough_addresses(dom.xml)))

    def _claimed_by(self, address: str) -> dict[str, Any] | None:
        name = f"{self.s.node}.{address.replace(':', '-').replace('.', '-')}"
        obj = self.devices.items.get(name)
        return None if obj is None else (obj.get("spec") or {}).get("claimRef")

    def _in_use(self) -> set[str]:
        """Addresses some live VM scheduled to this node lists."""
        in_use = set()
        for obj in self.vms.items.values():
            vm = PassthroughVM.model_validate(obj)
            if not _deleting(vm) and vm.status.node_name == self.s.node:
                in_use |= _vm_addresses(vm)
        return in_use

    async def _restore(self, addresses: set[str]) -> None:
        """Give back devices no VM of this node still lists; one the kernel will not give
        back is marked Unhealthy (the others still go back)."""
        todo = sorted(addresses - self._in_use())
        try:
            await asyncio.to_thread(self.preparer.restore, todo)
        except PrepareError as e:
            self._failed(e, todo)
        self._cleared([a for a in todo if a not in self.preparer.moved])

    def _failed(self, e: PrepareError, addresses: Iterable[str]) -> None:
        """Mark the device at fault (every one asked for, when the fault is the host's)
        Unhealthy with the kernel's words, and say so in an Event on it, once per change."""
        for a in [e.address] if e.address else addresses:
            said = (e.reason, str(e))
            if self.failures.get(a) == said:
                continue
            self.failures[a] = said
            log.warning("device=%s unhealthy reason=%s: %s", a, e.reason, e)
            self._event_on_node("Warning", e.reason, str(e), device=pcidevice_name(self.s.node, a))
        self._rescan_now.set()

    def _cleared(self, addresses: Iterable[str]) -> None:
        gone = [a for a in addresses if self.failures.pop(a, None) is not None]
        for a in gone:
            log.info("device=%s healthy again", a)
        if gone:
            self._rescan_now.set()

    async def _retry_failures(self) -> None:
        """Clear failures whose cause has gone: vfio-pci loaded since; a busy group let go
        (then give the device back, if no VM wants it). A refused bind or unbind stays until
        a VM's retry succeeds or the plugin restarts."""
        for a, (reason, _msg) in list(self.failures.items()):
            if reason == "VfioNotLoaded" and self.preparer.vfio_loaded():
                self._cleared([a])
            elif reason == "DeviceBusy" and not self.preparer.group_holders(a):
                if a in self._in_use():
                    self._cleared([a])
                else:
                    await self._restore({a})

    async def reconcile(self, uid: str) -> None:
        vm = self._vm(uid)
        dom = await self._virt("lookup", self.hyper.lookup, uid)
        if vm is None:
            if dom is not None and dom.vm is not None:
                await self._remove_orphan(dom)
            return
        if _deleting(vm) or vm.status.node_name != self.s.node:
            await self._teardown(vm, dom)
            return
        problem = self._check_claims(vm) or await self._check_in_use(vm)
        if problem is not None:
            reason, message = problem
            await self._report(
                vm,
                dom,
                phase="Starting" if dom is None or not dom.active else vm.status.phase,
                ready=False,
                reason=reason,
                message=message,
            )
            return
        try:
            dom = await self._ensure_domain(vm, dom)
        except (PrepareError, SriovError, BuildError, VirtError) as e:
            if isinstance(e, PrepareError):
                self._failed(e, sorted(_vm_addresses(vm)))
            reason = {
                PrepareError: "PrepareFailed",
                SriovError: "PrepareFailed",
                BuildError: "InvalidSpec",
                VirtError: "StartFailed",
            }[type(e)]
            log.warning("vm=%s/%s failed: %s", vm.metadata.namespace, vm.metadata.name, e)
            await self._report(
                vm,
                await self._virt("lookup", self.hyper.lookup, uid),
                phase="Failed",
                ready=False,
                reason=reason,
                message=str(e),
            )
            return
        if dom.active:
            await self._report(
                vm,
                dom,
                phase="Running",
                ready=True,
                reason="Running",
                message=f"domain {dom.name} is {dom.state}",
            )
        else:
            await self._report(
                vm,
                dom,
                phase="Stopped",
                ready=False,
                reason="Stopped",
                message=f"domain {dom.name} is {dom.state}, as spec.running asks",
            )

    def _check_claims(self, vm: PassthroughVM) -> tuple[str, str] | None:
        """The node's own check before it touches a device: every one the VM's status lists must
        be claimed for exactly this VM."""
        for addr in sorted(_vm_addresses(vm)):
            ref = self._claimed_by(addr)
            if ref is None or ref.get("uid") != vm.metadata.uid:
                holder = f"{ref.get('namespace')}/{ref.get('name')}" if ref else "nobody"
                return (
                    "DeviceNotClaimed",
                    f"device {addr} is claimed by {holder}, not by this VM: not starting",
                )
        return None

    async def _check_in_use(self, vm: PassthroughVM) -> tuple[str, str] | None:
        mine = _vm_addresses(vm)
        for dom in await self._virt("domains", self.hyper.domains):
            if dom.uuid == vm.metadata.uid or not dom.active:
                continue
            shared = mine & set(passthrough_addresses(dom.xml))
            if shared:
                return (
                    "DeviceInUse",
                    f"device {min(shared)} is still attached to domain {dom.name}",
                )
        return None

    async def _prepare(self, vm: PassthroughVM) -> None:
        macvtap = {n.name for n in vm.spec.networks if n.mode == "macvtap"}
        vfio = [d.address for d in vm.status.devices] + [
            n.address for n in vm.status.networks if n.name not in macvtap
        ]
        await asyncio.to_thread(self.preparer.bind_vfio, vfio, frozenset(self.unmanaged))
        self._cleared(vfio)
        by_addr = (
            self.host.by_address()
            or (await asyncio.to_thread(discover, self.s.sysfs_root)).by_address()
        )
        requests = {n.name: n for n in vm.spec.networks}
        for nb in vm.status.networks:
            f, req = by_addr.get(nb.address), requests.get(nb.name)
            if f is None or req is None or f.phys_fn is None or f.vf_index is None:
                continue
            pf = by_addr.get(f.phys_fn)
            if pf is None or not pf.netdev:
                raise SriovError(
                    f"network {nb.name}: the PF of VF {nb.address} has no netdev to configure it on"
                )
            await asyncio.to_thread(
                configure_vf,
                self.runner,
                pf.netdev,
                f.vf_index,
                spoof_check=req.spoof_check,
                trusted=req.trusted,
                mac=nb.mac,
                vlan=req.vlan,
                macvtap=req.mode == "macvtap",
            )

    def _dedicated_elsewhere(self, uid: str) -> frozenset[int]:
        """Host CPUs dedicated to the other VMs of this node: shared vCPUs keep off them."""
        out: set[int] = set()
        for obj in self.vms.items.values():
            other = PassthroughVM.model_validate(obj)
            c = other.status.compute
            if (
                other.metadata.uid != uid
                and other.status.node_name == self.s.node
                and c is not None
                and c.policy == "dedicated"
            ):
                out.update(x for share in c.numa for x in share.cpus or ())
        return frozenset(out)

    async def _ensure_domain(self, vm: PassthroughVM, dom: DomainInfo | None) -> DomainInfo:
        facts = HostFacts(
            self.host.numa_cpus,
            reserved_cpus=self.s.reserved_cpus,
            dedicated_elsewhere=self._dedicated_elsewhere(vm.metadata.uid or ""),
            domain_type=self.s.domain_type,
            machine=self.s.machine,
            console_log_dir=self.s.console_log_dir,
        )
        want = build_domain(vm, facts)
        wanted_addresses = sorted(_vm_addresses(vm))
        stale = dom is not None and (
            passthrough_addresses(dom.xml) != wanted_addresses
            or (dom.vm is not None and dom.vm.generation != want.vm.generation)
        )
        if dom is not None and dom.active and passthrough_addresses(dom.xml) != wanted_addresses:
            # The devices it holds are no longer all this VM's: stop it before anything else.
            log.warning("stopping domain=%s: its devices changed", dom.name)
            await self._virt("stop", self.hyper.stop, dom.uuid, self.s.stop_grace)
            dom = await self._virt("lookup", self.hyper.lookup, dom.uuid)
        if dom is None or (stale and not dom.active):
            await self._prepare(vm)
            dom = await self._virt("define", self.hyper.define, render(want))
            self._keep_xml(dom)
            log.info("defined domain=%s devices=%d", dom.name, len(wanted_addresses))
        if vm.spec.running and not dom.active:
            await self._prepare(vm)
            dom = await self._virt("start", self.hyper.start, dom.uuid)
            log.info("started domain=%s", dom.name)
        elif not vm.spec.running and dom.active:
            dom = await self._virt("stop", self.hyper.stop, dom.uuid, self.s.stop_grace) or dom
            log.info("stopped domain=%s", dom.name)
        return dom

    def _keep_xml(self, dom: DomainInfo) -> None:
        """The defined domain's XML, as libvirt holds it, in <state-dir>/domains/ for people."""
        folder = self.s.state_dir / "domains"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{dom.name}.xml").write_text(dom.xml)

    async def _teardown(self, vm: PassthroughVM, dom: DomainInfo | None) -> None:
        if dom is not None:
            (self.s.state_dir / "domains" / f"{dom.name}.xml").unlink(missing_ok=True)
            await self._virt("remove", self.hyper.remove, dom.uuid)
            log.info("removed domain=%s", dom.name)
        await self._restore(_vm_addresses(vm))
        if _deleting(vm) and vm.status.node_name == self.s.node:
            await self._write_status(vm, self._gone_status)

    def _gone_status(self, vm: PassthroughVM) -> dict[str, Any] | None:
        conds = set_condition(
            vm.status.conditions,
            c.COND_DOMAIN_GONE,
            True,
            "DomainRemoved",
            f"domain {domain_name(vm.metadata.namespace or '', vm.metadata.name)} "
            f"removed from {self.s.node}",
            generation=vm.metadata.generation,
            now=clock.now(),
        )
        if same_conditions(vm.status.conditions, conds):
            return None
        return {"conditions": [x.to_dict() for x in conds], "domain": None}

    async def _report(
        self,
        vm: PassthroughVM,
        dom: DomainInfo | None,
        *,
        phase: str,
        ready: bool,
        reason: str,
        message: str,
    ) -> None:
        def compute(v: PassthroughVM) -> dict[str, Any] | None:
            gen = v.metadata.generation
            conds = set_condition(
                v.status.conditions,
                c.COND_DOMAIN_READY,
                ready,
                reason,
                message,
                generation=gen,
                now=clock.now(),
            )
            ok, r, m = ready_condition(conds, running=v.spec.running)
            conds = set_condition(conds, c.COND_READY, ok, r, m, generation=gen, now=clock.now())
            domain = None
            if dom is not None:
                domain = {
                    "name": dom.name,
                    "uuid": dom.uuid,
                    "state": dom.state,
                    "devices": passthrough_addresses(dom.xml),
                }
            have_dom = v.status.domain.to_dict() if v.status.domain else None
            if (
                v.status.phase == phase
                and same_conditions(v.status.conditions, conds)
                and have_dom == domain
            ):
                return None
            return {
                "phase": phase,
                "domain": domain,
                "conditions": [x.to_dict() for x in conds],
                "observedGeneration": gen,
            }

        await self._write_status(vm, compute)

    async def _write_status(self, vm: PassthroughVM, compute: Any) -> None:
        """Conditional status write; on a conflict, recompute from the fresh object once."""
        for _ in range(3):
            body = compute(vm)
            if body is None:
                return
            path = crd_path(
                c.PLURAL_PASSTHROUGHVM,
                vm.metadata.name,
                namespace=vm.metadata.namespace,
                subresource="status",
            )
            try:
                got = await self.api.patch(
                    path,
                    {"metadata": {"resourceVersion": vm.metadata.resource_version}, "status": body},
                )
                self.vms.apply("MODIFIED", got)
                return
            except Conflict:
                fresh = await self.api.get(
                    crd_path(
                        c.PLURAL_PASSTHROUGHVM, vm.metadata.name, namespace=vm.metadata.namespace
                    )
                )
                vm = PassthroughVM.model_validate(fresh)
            except NotFound:
                return

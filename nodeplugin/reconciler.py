"""The node plugin's second half: turn each PassthroughVM scheduled to this node into a libvirt
domain with its devices bound to vfio-pci, and back when it stops or goes.

One reconcile per VM at a time, on every change of the VM and every `resync_interval` (guests
that stopped by themselves, domains that vanished with a host reboot, domains whose VM is gone).
Before touching a device it checks the device is claimed for this very VM. Device moves are
recorded in a state file before they are made (nodeplugin.vfio), so a crash never strands a
device on vfio-pci. A device the kernel will not move is published Unhealthy with the kernel's
words (through HostState) until its cause goes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from nodeplugin.discovery import discover
from nodeplugin.domain.build import BuildError, HostFacts, build_domain, domain_name
from nodeplugin.domain.model import Domain
from nodeplugin.domain.render import (
    device_xml,
    live_device_xml,
    macvtap_netdevs,
    passthrough_addresses,
    render,
    retarget,
    tuning_of,
)
from nodeplugin.hoststate import HostState
from nodeplugin.metrics import NodeMetrics
from nodeplugin.settings import AgentSettings
from nodeplugin.sriov import CommandRunner, SriovError, configure_vf
from nodeplugin.vfio import PrepareError, Preparer, is_vfio_driver
from nodeplugin.virt import DomainInfo, Hypervisor, VirtError
from pcipt import clock
from pcipt import constants as c
from pcipt.api.v1alpha1 import Migration, NetworkBinding, PassthroughVM, pcidevice_name
from pcipt.backoff import Health, is_transient
from pcipt.conditions import ready_condition, same_conditions, set_condition
from pcipt.informer import Informer
from pcipt.kubeclient import Conflict, KubeClient, NotFound, crd_path

log = logging.getLogger("pcipt.nodeplugin")
T = TypeVar("T")


def _deleting(vm: PassthroughVM) -> bool:
    return vm.metadata.deletion_timestamp is not None


def _migrating_away(vm: PassthroughVM, node: str) -> bool:
    """A cold migration asks this node to stop the VM for good (nodeplugin's half: remove the
    domain and say DomainGone; the controller then releases and re-places)."""
    mig = vm.status.migration
    return mig is not None and mig.phase == "Stopping" and mig.from_node == node


def _live_migration(vm: PassthroughVM) -> Migration | None:
    mig = vm.status.migration
    return mig if mig is not None and mig.live and mig.phase in c.LIVE_PHASES else None


def _arriving(vm: PassthroughVM, node: str) -> bool:
    """A live migration brings the VM to this node (it is still placed on its old one)."""
    mig = _live_migration(vm)
    return (
        mig is not None
        and mig.to_node == node
        and vm.status.node_name != node
        and not _deleting(vm)
    )


def _leaving_live(vm: PassthroughVM, node: str) -> bool:
    """A live migration takes the VM's running domain from this node (once the target is
    ready)."""
    mig = _live_migration(vm)
    return (
        mig is not None
        and mig.from_node == node
        and vm.status.node_name == node
        and mig.phase != "Preparing"
        and not _deleting(vm)
    )


def _wanted_keys(vm: PassthroughVM) -> set[str]:
    """What the VM's domain should pass through: PCI addresses of its devices and hostdev
    networks, `netdev:<name>` of its macvtap networks (as render.device_xml names them)."""
    macvtap = {n.name for n in vm.spec.networks if n.mode == "macvtap"}
    keys = {d.address for d in vm.status.devices}
    for n in vm.status.networks:
        keys.add(f"netdev:{n.netdev}" if n.name in macvtap and n.netdev else n.address)
    return keys


def _live_keys(xml: str) -> set[str]:
    return set(passthrough_addresses(xml)) | {f"netdev:{n}" for n in macvtap_netdevs(xml)}


def _vm_addresses(vm: PassthroughVM) -> set[str]:
    return {d.address for d in vm.status.devices} | {n.address for n in vm.status.networks}


class DomainReconciler:
    def __init__(
        self,
        api: KubeClient,
        settings: AgentSettings,
        state: HostState,
        devices: Informer,
        *,
        metrics: NodeMetrics,
        preparer: Preparer,
        hypervisor: Hypervisor,
        runner: CommandRunner,
    ) -> None:
        self.api = api
        self.settings = settings
        self.state = state
        self.devices = devices
        """This node's PciDevices: the claims checked before a device is touched."""
        self.metrics = metrics
        self.preparer = preparer
        self.hyper = hypervisor
        self.runner = runner
        self.vms = Informer(
            api,
            crd_path(c.PLURAL_PASSTHROUGHVM),
            field_selector=f"{c.FIELD_VM_NODE}={settings.node}",
            on_event=self._vm_event,
            name="passthroughvms",
        )
        self._dirty: set[str] = set()
        self._attach_said: dict[str, tuple[bool, str, str]] = {}
        """VM uid -> the outcome of its last hot-plug (DevicesAttached)."""
        self._no_hotplug: set[str] = set()
        """VMs whose running domain the hypervisor cannot hot-plug: changed at restart."""
        self.arriving = Informer(
            api,
            crd_path(c.PLURAL_PASSTHROUGHVM),
            label_selector=f"{c.LABEL_MIGRATION_TARGET}={settings.node}",
            on_event=self._vm_event,
            name="passthroughvms-arriving",
        )
        """VMs a live migration brings here (still placed on their old node)."""
        self._left: dict[str, set[str]] = {}
        """VM uid -> VFs unplugged from a domain that migrated away: given back once the VM
        is no longer placed here (scrubbed first, where the node scrubs)."""
        self._running: dict[str, asyncio.Task[None]] = {}
        self._health = Health(log, "reconciling VMs with domains")

    async def stop(self) -> None:
        tasks = list(self._running.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

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
                    self._health.ok()
                except Exception as e:
                    self.metrics.error("reconcile")
                    if is_transient(e):
                        self._health.failed(e, self.settings.resync_interval)  # resync retries
                    else:
                        log.exception("reconcile failed vm-uid=%s", uid)
        finally:
            self._running.pop(uid, None)

    def _objects(self) -> list[dict[str, Any]]:
        """Every VM this node looks after: placed here, or arriving by a live migration."""
        placed = list(self.vms.items.values())
        uids = {o["metadata"].get("uid") for o in placed}
        return placed + [
            o for o in self.arriving.items.values() if o["metadata"].get("uid") not in uids
        ]

    def _vm(self, uid: str) -> PassthroughVM | None:
        for obj in self._objects():
            if obj["metadata"].get("uid") == uid:
                return PassthroughVM.model_validate(obj)
        return None

    async def resync_loop(self) -> None:
        """Look at every VM and domain now and then: guests that stopped by themselves, domains
        that vanished (a host reboot), domains whose VM is gone."""
        await self.vms.synced.wait()
        await self.arriving.synced.wait()
        await self.devices.synced.wait()
        while True:
            try:
                objects = self._objects()
                for obj in objects:
                    self.request(obj["metadata"]["uid"])
                known = {o["metadata"]["uid"] for o in objects}
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
                self._health.failed(e, self.settings.resync_interval)
            await asyncio.sleep(self.settings.resync_interval)

    async def _remove_orphan(self, dom: DomainInfo) -> None:
        if await self._still_wanted(dom):
            return
        log.info("removing domain=%s: its VM is no longer scheduled here", dom.name)
        await self._virt("remove", self.hyper.remove, dom.uuid)
        await self._restore(set(passthrough_addresses(dom.xml)))
        if self.settings.scrub:
            self.state.request_rescan()

    async def _still_wanted(self, dom: DomainInfo) -> bool:
        """Asked of the API server before a domain whose VM this node no longer sees is
        destroyed: the VM exists and is placed here, or is arriving here (its move between
        this plugin's two watches, at the end of a live migration, is not a deletion)."""
        ref = dom.vm
        if ref is None:
            return False
        try:
            got = await self.api.get(
                crd_path(c.PLURAL_PASSTHROUGHVM, ref.name, namespace=ref.namespace)
            )
        except NotFound:
            return False
        vm = PassthroughVM.model_validate(got)
        if vm.metadata.uid != ref.uid or _deleting(vm):
            return False
        return vm.status.node_name == self.settings.node or _arriving(vm, self.settings.node)

    def _claimed_by(self, address: str) -> dict[str, Any] | None:
        name = pcidevice_name(self.settings.node, address)
        obj = self.devices.items.get(name)
        return None if obj is None else (obj.get("spec") or {}).get("claimRef")

    def _in_use(self) -> set[str]:
        """Addresses some live VM scheduled to this node lists."""
        in_use = set()
        for obj in self._objects():
            vm = PassthroughVM.model_validate(obj)
            if (
                not _deleting(vm)
                and vm.status.node_name == self.settings.node
                and not _migrating_away(vm, self.settings.node)
            ):
                in_use |= _vm_addresses(vm)
            elif _arriving(vm, self.settings.node) and vm.status.migration is not None:
                in_use |= {n.address for n in vm.status.migration.networks}
        return in_use

    async def _restore(self, addresses: set[str]) -> None:
        """Give back devices no VM of this node still lists; one the kernel will not give
        back is marked Unhealthy (the others still go back)."""
        todo = sorted(addresses - self._in_use())
        if self.settings.scrub:
            # Still claimed, or released for a scrub: the scrub resets it on vfio-pci and then
            # gives it back (scrub_released).
            todo = [a for a in todo if not self._awaits_scrub(a)]
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
            if self.state.failures.get(a) == said:
                continue
            self.state.failures[a] = said
            log.warning("device=%s unhealthy reason=%s: %s", a, e.reason, e)
            self.state.event_on_node(
                "Warning", e.reason, str(e), device=pcidevice_name(self.settings.node, a)
            )
        self.state.request_rescan()

    def _cleared(self, addresses: Iterable[str]) -> None:
        gone = [a for a in addresses if self.state.failures.pop(a, None) is not None]
        for a in gone:
            log.info("device=%s healthy again", a)
        if gone:
            self.state.request_rescan()

    async def retry_failures(self) -> None:
        """Clear failures whose cause has gone: vfio-pci loaded since; a busy group let go
        (then give the device back, if no VM wants it). A refused bind or unbind stays until
        a VM's retry succeeds or the plugin restarts."""
        for a, (reason, _msg) in list(self.state.failures.items()):
            if reason == c.REASON_VFIO_NOT_LOADED and self.preparer.vfio_loaded():
                self._cleared([a])
            elif reason == c.REASON_DEVICE_BUSY and not self.preparer.group_holders(a):
                if a in self._in_use():
                    self._cleared([a])
                else:
                    await self._restore({a})

    # --- scrubbing released devices ----------------------------------------------------------

    def _awaits_scrub(self, address: str) -> bool:
        obj = self.devices.items.get(pcidevice_name(self.settings.node, address))
        return obj is not None and (
            bool((obj.get("spec") or {}).get("claimRef")) or self.scrub_due(obj)
        )

    def scrub_due(self, obj: dict[str, Any]) -> bool:
        """The device was released with a scrub asked for, and no scrub has answered that
        release yet (or the last attempt failed: it is tried again)."""
        if not self.settings.scrub:
            return False
        spec = obj.get("spec") or {}
        rel = spec.get("release")
        if not rel or not rel.get("scrub") or spec.get("claimRef"):
            return False
        done = self.state.scrubs.get(spec.get("address", "")) or (obj.get("status") or {}).get(
            "scrub"
        )
        return not (done and done.get("releaseID") == rel.get("id") and done["phase"] == "Done")

    async def scrub_released(self) -> None:
        """Scrub each released device that asks for it and that no domain holds any more:
        reset it where it was passed through, give it back to its own driver, and record the
        outcome for the publisher to write (status.scrub)."""
        due = [o for o in list(self.devices.items.values()) if self.scrub_due(o)]
        left = [a for a in self.preparer.moved if not self._awaits_scrub(a)]
        if not due and not left:
            return
        attached: set[str] = set()
        for dom in await self._virt("domains", self.hyper.domains):
            attached |= set(passthrough_addresses(dom.xml))
        busy = attached | self._in_use()
        if left:
            # Kept on vfio-pci for a scrub that was not asked for after all (released without
            # one): given back now.
            await self._restore({a for a in left if a not in busy})
        for obj in due:
            address, release = obj["spec"]["address"], obj["spec"]["release"]
            if address in busy:
                continue  # its domain is still going: the next rescan scrubs it
            record = await asyncio.to_thread(self._scrub, address, release["id"])
            self.state.scrubs[address] = record
            name = obj["metadata"]["name"]
            if record["phase"] == "Done":
                self.state.aer_rose.pop(address, None)  # re-checked by the reset
                self._cleared([address])
                log.info("scrubbed device=%s: %s", address, record["message"])
                self.state.event_on_node(
                    "Normal", c.REASON_SCRUBBED, record["message"], device=name
                )
            else:
                log.warning("scrub failed device=%s: %s", address, record["message"])
                self.state.event_on_node(
                    "Warning", c.REASON_SCRUB_FAILED, record["message"], device=name
                )

    def _scrub(self, address: str, release_id: str) -> dict[str, Any]:
        """Reset (when the guest had the function itself, i.e. it is on vfio-pci) and give it
        back to the driver it had before pcipt moved it. A device the guest never had directly
        (a macvtap VF stays on its host driver) is not reset."""
        steps: list[str] = []
        method: str | None = None
        record: dict[str, Any] = {"releaseID": release_id}
        try:
            on_vfio = is_vfio_driver(self.preparer.driver(address))
            if on_vfio:
                method = self.preparer.reset(address)
                steps.append(
                    f"reset ({method})" if method != "none" else "not reset: it has no reset method"
                )
            else:
                method = "none"
                steps.append(
                    "not reset: the guest never had the function itself (it stayed on "
                    f"{self.preparer.driver(address) or 'no driver'})"
                )
            if address in self.preparer.moved:
                self.preparer.restore([address])
                steps.append(f"returned to {self.preparer.driver(address) or 'no driver'}")
        except PrepareError as e:
            failure = {
                "phase": "Failed",
                "message": "; ".join([*steps, str(e)])[:1024],
                "completedAt": clock.timestamp(),
            }
            return {**record, **failure, **({"reset": method} if method else {})}
        driver = self.preparer.driver(address)
        return {
            **record,
            "phase": "Done",
            "reset": method,
            **({"driver": driver} if driver else {}),
            "completedAt": clock.timestamp(),
            "message": "; ".join(steps)[:1024],
        }

    async def reconcile(self, uid: str) -> None:
        vm = self._vm(uid)
        dom = await self._virt("lookup", self.hyper.lookup, uid)
        if vm is None:
            if dom is not None and dom.vm is not None:
                await self._remove_orphan(dom)
            if uid in self._left:
                await self._restore(self._left.pop(uid))
            return
        if _arriving(vm, self.settings.node):
            await self._arrive(vm)
            return
        if uid in self._left and vm.status.node_name != self.settings.node:
            await self._restore(self._left.pop(uid))
        if _leaving_live(vm, self.settings.node):
            await self._leave(vm, dom)
            return
        if (
            _deleting(vm)
            or vm.status.node_name != self.settings.node
            or _migrating_away(vm, self.settings.node)
        ):
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
                PrepareError: c.REASON_PREPARE_FAILED,
                SriovError: c.REASON_PREPARE_FAILED,
                BuildError: c.REASON_INVALID_SPEC,
                VirtError: c.REASON_START_FAILED,
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
                reason=c.REASON_RUNNING,
                message=f"domain {dom.name} is {dom.state}",
            )
        else:
            await self._report(
                vm,
                dom,
                phase="Stopped",
                ready=False,
                reason=c.REASON_STOPPED,
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
                    c.REASON_DEVICE_NOT_CLAIMED,
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
                    c.REASON_DEVICE_IN_USE,
                    f"device {min(shared)} is still attached to domain {dom.name}",
                )
        return None

    async def _prepare(
        self, vm: PassthroughVM, networks: list[NetworkBinding] | None = None
    ) -> None:
        """Bind the VM's devices to vfio-pci and set up its VFs (MAC, VLAN, spoof check,
        trust); `networks`: only these VFs (a live migration's, on its target)."""
        macvtap = {n.name for n in vm.spec.networks if n.mode == "macvtap"}
        if networks is None:
            devices, networks = [d.address for d in vm.status.devices], vm.status.networks
        else:
            devices = []
        vfio = devices + [n.address for n in networks if n.name not in macvtap]
        await asyncio.to_thread(self.preparer.bind_vfio, vfio, frozenset(self.state.unmanaged))
        self._cleared(vfio)
        by_addr = (
            self.state.host.by_address()
            or (await asyncio.to_thread(discover, self.settings.sysfs_root)).by_address()
        )
        requests = {n.name: n for n in vm.spec.networks}
        for nb in networks:
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
                min_tx_rate=nb.min_tx_rate,
                max_tx_rate=nb.max_tx_rate,
                link_state=nb.link_state,
            )

    def _dedicated_elsewhere(self, uid: str) -> frozenset[int]:
        """Host CPUs dedicated to the other VMs of this node: shared vCPUs keep off them."""
        out: set[int] = set()
        for obj in self._objects():
            other = PassthroughVM.model_validate(obj)
            here = other.status.compute if other.status.node_name == self.settings.node else None
            if _arriving(other, self.settings.node) and other.status.migration is not None:
                here = other.status.migration.compute
            if other.metadata.uid != uid and here is not None and here.policy == "dedicated":
                out.update(x for share in here.numa for x in share.cpus or ())
        return frozenset(out)

    def _facts(self, vm: PassthroughVM) -> HostFacts:
        return HostFacts(
            self.state.host.numa_cpus,
            reserved_cpus=self.settings.reserved_cpus,
            dedicated_elsewhere=self._dedicated_elsewhere(vm.metadata.uid or ""),
            domain_type=self.settings.domain_type,
            machine=self.settings.machine,
            console_log_dir=self.settings.console_log_dir,
        )

    async def _ensure_domain(self, vm: PassthroughVM, dom: DomainInfo | None) -> DomainInfo:
        want = build_domain(vm, self._facts(vm))
        wanted = _wanted_keys(vm)
        if dom is not None and dom.active and _live_keys(dom.xml) != wanted:
            # Requests added or removed while it runs: attached and detached live.
            dom = await self._hotplug(vm, dom, want, wanted)
        stale = dom is not None and (
            _live_keys(dom.xml) != wanted
            or (dom.vm is not None and dom.vm.generation != want.vm.generation)
        )
        if dom is None or (stale and not dom.active):
            await self._prepare(vm)
            dom = await self._virt("define", self.hyper.define, render(want))
            self._keep_xml(dom)
            self._no_hotplug.discard(vm.metadata.uid or "")
            log.info("defined domain=%s devices=%d", dom.name, len(wanted))
        if vm.spec.running and not dom.active:
            await self._prepare(vm)
            dom = await self._virt("start", self.hyper.start, dom.uuid)
            log.info("started domain=%s", dom.name)
        elif not vm.spec.running and dom.active:
            dom = (
                await self._virt("stop", self.hyper.stop, dom.uuid, self.settings.stop_grace) or dom
            )
            log.info("stopped domain=%s", dom.name)
        return dom

    async def _hotplug(
        self, vm: PassthroughVM, dom: DomainInfo, want: Domain, wanted: set[str]
    ) -> DomainInfo:
        """Detach what the VM no longer has and attach what it gained, live and in the
        definition; what happened is said in DevicesAttached (see _report)."""
        uid = vm.metadata.uid or ""
        live = _live_keys(dom.xml)
        removed, added = sorted(live - wanted), sorted(wanted - live)
        if uid in self._no_hotplug:
            return dom  # the hypervisor cannot: applied when the VM restarts
        try:
            for key in removed:
                xml = live_device_xml(dom.xml, key)
                if xml is not None:
                    dom = await self._virt(
                        "detach",
                        self.hyper.detach,
                        dom.uuid,
                        xml,
                        lambda x, k=key: k not in _live_keys(x),
                    )
                    log.info("detached device=%s from domain=%s", key, dom.name)
            await self._restore({k for k in removed if not k.startswith("netdev:")})
            if added:
                await self._prepare(vm)
                for key in added:
                    xml = device_xml(want, key)
                    if xml is not None:
                        dom = await self._virt("attach", self.hyper.attach, dom.uuid, xml)
                        log.info("attached device=%s to domain=%s", key, dom.name)
            self._attach_said[uid] = (
                True,
                c.REASON_ATTACHED,
                "hot-plugged live: "
                + "; ".join(
                    x
                    for x in (
                        f"attached {', '.join(added)}" if added else "",
                        f"detached {', '.join(removed)}" if removed else "",
                    )
                    if x
                ),
            )
        except (PrepareError, SriovError) as e:
            if isinstance(e, PrepareError):
                self._failed(e, added)
            self._attach_said[uid] = (False, c.REASON_HOTPLUG_FAILED, f"preparing failed: {e}")
        except VirtError as e:
            if e.unsupported:
                self._no_hotplug.add(uid)
                self._attach_said[uid] = (
                    False,
                    c.REASON_HOTPLUG_UNSUPPORTED,
                    f"libvirt at {self.settings.libvirt_uri} cannot hot-plug ({e}): the domain "
                    "keeps its devices; the change applies when the VM restarts "
                    "(spec.running false, then true)",
                )
            else:
                self._attach_said[uid] = (
                    False,
                    c.REASON_HOTPLUG_FAILED,
                    f"libvirt said: {e}; tried again at the next resync",
                )
            log.warning("hot-plug of domain=%s: %s", dom.name, e)
        return await self._virt("lookup", self.hyper.lookup, dom.uuid) or dom

    # --- live migration -----------------------------------------------------------------------

    async def _migration_phase(
        self, vm: PassthroughVM, was: str, phase: str, message: str, **fields: Any
    ) -> PassthroughVM | None:
        """Move this VM's live migration from phase `was` to `phase` (conditional: only if it
        is still in `was`, same ID, as the API server holds it); the VM as written, or None.
        `vm` may be older than that: the write is decided on the fresh object."""
        mig = vm.status.migration
        assert mig is not None

        def body(v: PassthroughVM) -> dict[str, Any] | None:
            m = v.status.migration
            if m is None or m.id != mig.id or m.phase != was:
                return None
            return {
                "migration": {
                    "phase": phase,
                    "message": message,
                    **fields,
                    **({"completedAt": clock.timestamp()} if phase == "Failed" else {}),
                }
            }

        fresh = PassthroughVM.model_validate(
            await self.api.get(
                crd_path(c.PLURAL_PASSTHROUGHVM, vm.metadata.name, namespace=vm.metadata.namespace)
            )
        )
        if fresh.metadata.uid != vm.metadata.uid:
            return None
        wrote = await self._write_status(fresh, body)
        if wrote is not None:
            log.info(
                "live migration vm=%s/%s %s -> %s: %s",
                vm.metadata.namespace,
                vm.metadata.name,
                was,
                phase,
                message,
            )
        return wrote

    async def _arrive(self, vm: PassthroughVM) -> None:
        """The target's half before the domain comes: prepare the VFs claimed here and say how
        the domain will be pinned here (Preparing -> Ready). Later phases: the domain may be
        arriving or running here already; it is left alone until the VM is placed here."""
        mig = vm.status.migration
        node = self.settings.node
        if mig is None or mig.phase != "Preparing":
            return
        for nb in mig.networks:
            ref = self._claimed_by(nb.address)
            if ref is None or ref.get("uid") != vm.metadata.uid:
                return  # the claim has not reached this node's watch yet: the next event does
        here = vm.model_copy(
            update={
                "status": vm.status.model_copy(
                    update={
                        "node_name": node,
                        "networks": mig.networks,
                        "compute": mig.compute,
                        "devices": [],
                    }
                )
            }
        )
        try:
            await self._prepare(here, mig.networks)
            tuning = tuning_of(render(build_domain(here, self._facts(here))))
        except (PrepareError, SriovError, BuildError) as e:
            if isinstance(e, PrepareError):
                self._failed(e, [n.address for n in mig.networks])
            await self._migration_phase(
                vm, "Preparing", "Failed", f"{node} could not prepare the VM's VFs: {e}"
            )
            return
        await self._migration_phase(
            vm,
            "Preparing",
            "Ready",
            f"{node} prepared {len(mig.networks)} VF(s); waiting for {mig.from_node} to move "
            "the domain",
            tuning=tuning,
        )

    async def _leave(self, vm: PassthroughVM, dom: DomainInfo | None) -> None:
        """The old node's half: unplug the VFs passed through, have libvirt move the running
        domain to the target (macvtap interfaces and pinning rewritten for it), say
        Transferred; on a failure plug the VFs back and say Failed with libvirt's words."""
        mig = vm.status.migration
        assert mig is not None and mig.to_node
        uid = vm.metadata.uid or ""
        if mig.phase == "Transferred":
            return  # the controller places it on the target
        if mig.phase == "Transferring" and dom is None:
            # Moved by an earlier attempt whose answer was lost (libvirt undefines the source
            # only once the target runs it).
            await self._migration_phase(
                vm, "Transferring", "Transferred", f"the domain left {self.settings.node}"
            )
            return
        if dom is None or not dom.active:
            await self._migration_phase(
                vm,
                mig.phase,
                "Failed",
                f"the domain is not running on {self.settings.node}: nothing to move live",
            )
            return
        if not mig.target_uri:
            await self._migration_phase(vm, mig.phase, "Failed", "no target libvirt URI")
            return
        if mig.phase == "Ready" and not await self._migration_phase(
            vm, "Ready", "Transferring", f"unplugging VFs and moving the domain to {mig.to_node}"
        ):
            return
        macvtap = {n.name for n in vm.spec.networks if n.mode == "macvtap"}
        unplug = sorted(
            n.address
            for n in vm.status.networks
            if n.name not in macvtap and n.address in _live_keys(dom.xml)
        )
        targets = {n.name: n.netdev for n in mig.networks}
        netdevs = {
            n.netdev: t
            for n in vm.status.networks
            if n.name in macvtap and n.netdev and (t := targets.get(n.name))
        }
        unplugged: list[str] = []
        try:
            for key in unplug:
                xml = live_device_xml(dom.xml, key)
                if xml is None:
                    continue
                dom = await self._virt(
                    "detach",
                    self.hyper.detach,
                    dom.uuid,
                    xml,
                    lambda x, k=key: k not in _live_keys(x),
                )
                unplugged.append(key)
                log.info("unplugged device=%s from domain=%s to migrate it", key, dom.name)
            took = await self._virt(
                "migrate",
                self.hyper.migrate,
                dom.uuid,
                mig.target_uri,
                lambda x: retarget(x, netdevs, mig.tuning),
            )
        except VirtError as e:
            replugged = await self._replug(vm, dom, unplugged)
            why = (
                f"libvirt at {self.settings.libvirt_uri} cannot migrate live ({e})"
                if e.unsupported
                else f"libvirt said: {e}"
            )
            await self._migration_phase(
                vm,
                "Transferring",
                "Failed",
                f"{why}; the VM keeps running on {self.settings.node}"
                + (f" with its VFs plugged back ({replugged})" if unplugged else ""),
            )
            return
        self._left[uid] = set(unplugged)
        await self._migration_phase(
            vm,
            "Transferring",
            "Transferred",
            f"the domain runs on {mig.to_node}: moved live in {took:.1f}s"
            + (f" after unplugging {', '.join(unplugged)}" if unplugged else ""),
        )

    async def _replug(self, vm: PassthroughVM, dom: DomainInfo, keys: list[str]) -> str:
        """Put back VFs unplugged for a migration that failed; says how that went."""
        if not keys:
            return ""
        want = build_domain(vm, self._facts(vm))
        try:
            for key in keys:
                xml = device_xml(want, key)
                if xml is not None:
                    await self._virt("attach", self.hyper.attach, dom.uuid, xml)
            return ", ".join(keys)
        except VirtError as e:
            # The resync's hot-plug tries again (the VM's status still lists them).
            return f"not yet: {e}"

    def _keep_xml(self, dom: DomainInfo) -> None:
        """The defined domain's XML, as libvirt holds it, in <state-dir>/domains/ for people."""
        folder = self.settings.state_dir / "domains"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{dom.name}.xml").write_text(dom.xml)

    async def _teardown(self, vm: PassthroughVM, dom: DomainInfo | None) -> None:
        held = _vm_addresses(vm)
        if dom is not None:
            # An evacuated VM's status lists nothing any more; its domain still says what it had.
            held |= set(passthrough_addresses(dom.xml))
            (self.settings.state_dir / "domains" / f"{dom.name}.xml").unlink(missing_ok=True)
            await self._virt("remove", self.hyper.remove, dom.uuid)
            log.info("removed domain=%s", dom.name)
        await self._restore(held)
        if held and self.settings.scrub:
            self.state.request_rescan()  # a release waiting for these can be scrubbed now
        if vm.status.node_name == self.settings.node and (
            _deleting(vm) or _migrating_away(vm, self.settings.node)
        ):
            await self._write_status(vm, self._gone_status)

    def _gone_status(self, vm: PassthroughVM) -> dict[str, Any] | None:
        conds = set_condition(
            vm.status.conditions,
            c.COND_DOMAIN_GONE,
            True,
            c.REASON_DOMAIN_REMOVED,
            f"domain {domain_name(vm.metadata.namespace or '', vm.metadata.name)} "
            f"removed from {self.settings.node}",
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
            attached = self._attached(v, dom)
            if attached is not None:
                conds = set_condition(
                    conds, c.COND_DEVICES_ATTACHED, *attached, generation=gen, now=clock.now()
                )
            ok, r, m = ready_condition(conds, running=v.spec.running)
            conds = set_condition(conds, c.COND_READY, ok, r, m, generation=gen, now=clock.now())
            domain = None
            if dom is not None:
                domain = {
                    "name": dom.name,
                    "uuid": dom.uuid,
                    "state": dom.state,
                    "devices": self._domain_devices(dom.xml),
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

    def _domain_devices(self, xml: str) -> list[str]:
        """PCI addresses the domain has: passed through, or behind its macvtap interfaces."""
        by_netdev = self.state.host.by_netdev()
        behind = {f.address for n in macvtap_netdevs(xml) if (f := by_netdev.get(n)) is not None}
        return sorted(set(passthrough_addresses(xml)) | behind)

    def _attached(self, vm: PassthroughVM, dom: DomainInfo | None) -> tuple[bool, str, str] | None:
        """DevicesAttached, once a hot-plug was tried or while the domain's devices differ
        from the bound ones; None otherwise (most VMs never carry it)."""
        uid = vm.metadata.uid or ""
        said = self._attach_said.get(uid)
        if dom is None:
            return None
        if _live_keys(dom.xml) == _wanted_keys(vm):
            if said is None:
                return None
            return (
                True,
                said[1] if said[0] else c.REASON_ATTACHED,
                (said[2] if said[0] else "the domain has exactly the VM's bound devices"),
            )
        if said is not None and not said[0]:
            return said
        return False, c.REASON_DETACHING, "the domain's devices are being changed to the bound ones"

    async def _write_status(self, vm: PassthroughVM, compute: Any) -> PassthroughVM | None:
        """Conditional status write; on a conflict, recompute from the fresh object once.
        Returns the VM as written; None when nothing was (nothing to write, or it is gone)."""
        for _ in range(3):
            body = compute(vm)
            if body is None:
                return None
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
                # Into the cache of the watch it belongs to (one VM may move between them).
                labels = got.get("metadata", {}).get("labels") or {}
                if (got.get("status") or {}).get("nodeName") == self.settings.node:
                    self.vms.apply("MODIFIED", got)
                elif labels.get(c.LABEL_MIGRATION_TARGET) == self.settings.node:
                    self.arriving.apply("MODIFIED", got)
                return PassthroughVM.model_validate(got)
            except Conflict:
                fresh = await self.api.get(
                    crd_path(
                        c.PLURAL_PASSTHROUGHVM, vm.metadata.name, namespace=vm.metadata.namespace
                    )
                )
                vm = PassthroughVM.model_validate(fresh)
            except NotFound:
                return None
        return None

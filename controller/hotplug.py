"""Changes to a placed VM's requests: hot-plug, hot-unplug, and what needs a restart.

For a VM placed on a node (not being deleted or migrated), its spec's device and network
requests are compared with what is bound (status.devices, status.networks, status.skipped):
- a request added to the spec is placed on the VM's own node, by the same scheduler with the
  VM's other devices counted as taken, and bound with conditional claims; the node plugin then
  attaches it live. A refusal says why in DevicesBound=False (HotplugRefused); the VM keeps
  running with what it has. Devices of a flavor with a per-namespace limit are not hot-plugged
  (their ledger is written only by a full placement): migrate the VM to apply it.
- a request removed from the spec moves its devices to status.detaching; the node plugin
  detaches them; each is released (scrubbed, quarantined) only once the domain the node
  reports no longer has it, so a device is never freed while a guest may still use it.
- a changed request (flavor, count, pinned address, a network's VLAN or MAC) cannot be
  applied live: RestartRequired=True names each field, until the spec and what is bound agree
  again (`kubectl pcipt migrate` re-places the VM with its whole spec).
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from controller.binding import Binder, LostRace, vm_path
from controller.inventory import Inventory
from controller.scheduling import Placement, Refusal, ScoringPolicy, schedule
from controller.statuswriter import VmStatusWriter
from controller.vmstatus import (
    condition_status,
    is_deleting,
    is_placed,
    migration_under_way,
    scheduled_status,
)
from pcipt import clock
from pcipt import constants as c
from pcipt.api.v1alpha1 import PassthroughVM
from pcipt.conditions import get_condition
from pcipt.events import EventRecorder
from pcipt.kubeclient import Conflict, KubeClient, NotFound
from pcipt.quantity import quantity_bytes

log = logging.getLogger("pcipt.controller.hotplug")


@dataclass
class Delta:
    """How a placed VM's spec differs from what is bound to it."""

    added: list[str] = field(default_factory=list)
    """Requests in the spec with nothing bound (and not skipped)."""
    removed: list[str] = field(default_factory=list)
    """Requests bound but no longer in the spec."""
    changed: list[str] = field(default_factory=list)
    """Fields of bound requests that changed, as `spec.devices[gpu].count: 2 -> 1`."""


def delta(vm: PassthroughVM, claim_flavor: Callable[[str], str | None]) -> Delta:
    """`claim_flavor(device name)`: the flavor its claim was made for (None: unknown)."""
    st = vm.status
    bound_devices: Counter[str] = Counter(d.request for d in st.devices if not d.companion)
    device_names = {d.request for d in st.devices}
    network_names = {n.name for n in st.networks}
    skipped = {s.request for s in st.skipped}
    detaching = {d.request for d in st.detaching}
    out = Delta()
    for r in vm.spec.devices:
        if r.name in detaching:
            continue  # re-added while its old devices go: added once they are gone
        if r.name not in device_names and (r.name not in skipped or r.attach_when_free):
            out.added.append(r.name)
            continue
        if r.name in skipped:
            continue
        # The way it was bound: its own flavor and count, or one of its alternatives.
        chosen = {d.alternative for d in st.devices if d.request == r.name and not d.companion}
        options = r.options()
        index = next(iter(chosen)) or 0 if len(chosen) == 1 else 0
        way = options[index] if index < len(options) else options[0]
        field_name = f"spec.devices[{r.name}]" + (f".alternatives[{index - 1}]" if index else "")
        flavors = {
            f for d in st.devices if d.request == r.name and (f := claim_flavor(d.pci_device))
        }
        if flavors and flavors != {way.flavor}:
            out.changed.append(f"{field_name}.flavor: {', '.join(sorted(flavors))} -> {way.flavor}")
        if bound_devices[r.name] != way.count:
            out.changed.append(f"{field_name}.count: {bound_devices[r.name]} -> {way.count}")
        addresses = {d.address for d in st.devices if d.request == r.name and not d.companion}
        if r.address is not None and addresses != {r.address}:
            out.changed.append(
                f"spec.devices[{r.name}].address: {', '.join(sorted(addresses))} -> {r.address}"
            )
    for n in vm.spec.networks:
        if n.name in detaching:
            continue
        binding = next((b for b in st.networks if b.name == n.name), None)
        if binding is None:
            if n.name not in skipped:
                out.added.append(n.name)
            continue
        flavor = claim_flavor(binding.pci_device)
        if flavor is not None and flavor != n.flavor:
            out.changed.append(f"spec.networks[{n.name}].flavor: {flavor} -> {n.flavor}")
        if binding.vlan != n.vlan:
            out.changed.append(f"spec.networks[{n.name}].vlan: {binding.vlan} -> {n.vlan}")
        if n.mac is not None and binding.mac != n.mac:
            out.changed.append(f"spec.networks[{n.name}].mac: {binding.mac} -> {n.mac}")
        for key, asked, bound in (
            ("maxTxRate", n.max_tx_rate, binding.max_tx_rate),
            ("minTxRate", n.min_tx_rate, binding.min_tx_rate),
        ):
            if asked is not None and (asked or None) != bound:
                out.changed.append(f"spec.networks[{n.name}].{key}: {bound} -> {asked}")
        state = None if n.link_state in (None, "auto") else n.link_state
        if state != binding.link_state:
            out.changed.append(
                f"spec.networks[{n.name}].linkState: {binding.link_state} -> {n.link_state}"
            )
    wanted = set(vm.spec.request_names())
    out.removed = sorted((device_names | network_names) - wanted)
    out.changed += _compute_changes(vm)
    return out


def _compute_changes(vm: PassthroughVM) -> list[str]:
    """Edits of the CPUs and memory counted for the VM on its node: the domain keeps what was
    counted until the VM is placed again."""
    counted = vm.status.compute
    if counted is None:
        return []
    spec, out = vm.spec, []
    if counted.vcpus and spec.cpu.cores != counted.vcpus:
        out.append(f"spec.cpu.cores: {counted.vcpus} -> {spec.cpu.cores}")
    if spec.cpu.policy != counted.policy:
        out.append(f"spec.cpu.policy: {counted.policy} -> {spec.cpu.policy}")
    memory_mib = -(-quantity_bytes(spec.memory) // (1024 * 1024))
    if counted.memory_mib and memory_mib != counted.memory_mib:
        out.append(f"spec.memory: {counted.memory_mib}Mi -> {spec.memory}")
    page = quantity_bytes(spec.hugepages.page_size) // 1024 if spec.hugepages else None
    if page != counted.page_size_kib:
        was = f"{counted.page_size_kib}Ki pages" if counted.page_size_kib else "none"
        now = f"{spec.hugepages.page_size} pages" if spec.hugepages else "none"
        out.append(f"spec.hugepages: {was} -> {now}")
    return out


def delta_vm(vm: PassthroughVM, names: list[str]) -> PassthroughVM:
    """The VM as the scheduler should see it to place only `names` on its own node: its other
    devices are another VM's (its UID differs), its CPUs and memory are counted already."""
    spec = vm.spec.model_copy(
        update={
            "devices": [r for r in vm.spec.devices if r.name in names],
            "networks": [n for n in vm.spec.networks if n.name in names],
            "placement": None,
            "node_selector": {"kubernetes.io/hostname": vm.status.node_name or ""},
        }
    )
    if vm.spec.placement and vm.spec.placement.same_numa:
        same = [r for r in vm.spec.placement.same_numa if r in names]
        if len(same) > 1:
            spec.placement = vm.spec.placement.model_copy(update={"same_numa": same})
    meta = vm.metadata.model_copy(update={"uid": f"{vm.metadata.uid}-hotplug"})
    status = vm.status.model_copy(update={"migration": None})
    return vm.model_copy(update={"metadata": meta, "spec": spec, "status": status})


class Hotplugger:
    def __init__(
        self,
        api: KubeClient,
        inventory: Inventory,
        binder: Binder,
        status: VmStatusWriter,
        events: EventRecorder,
        *,
        scoring: ScoringPolicy,
        in_flight: Callable[[], set[str]],
    ) -> None:
        self.api = api
        self.inventory = inventory
        self.binder = binder
        self.status = status
        self.events = events
        self.scoring = scoring
        self.in_flight = in_flight
        self._quiet: dict[str, tuple[str | None, int]] = {}
        """VM uid -> (resourceVersion, node version) when it last needed nothing."""
        self._refused: dict[str, tuple[int, str]] = {}
        """VM uid -> (node version, message) of its last refusal: not tried again until the
        node changes."""

    def _claim_flavor(self, name: str) -> str | None:
        d = self.inventory.devices.get(name)
        return d.claim.flavor if d is not None and d.claim is not None else None

    async def check(self, vms: Iterable[PassthroughVM] | None = None) -> None:
        busy = self.in_flight()
        if len(self._quiet) > 2 * len(self.inventory.vms) + 64:
            known = {vm.metadata.uid for vm in self.inventory.vms.values()}
            self._quiet = {u: k for u, k in self._quiet.items() if u in known}
        for vm in list(self.inventory.vms.values()) if vms is None else vms:
            node, uid = vm.status.node_name, vm.metadata.uid or ""
            if (
                not node
                or not is_placed(vm)
                or is_deleting(vm)
                or uid in busy
                or migration_under_way(vm)
            ):
                continue
            # Looked at again only when it changed, or (for a request waiting to be attached
            # when free) when its node's devices did.
            waits = any(r.attach_when_free for r in vm.spec.devices)
            key = (
                vm.metadata.resource_version,
                self.inventory.node_versions.get(node, 0) if waits else 0,
            )
            if self._quiet.get(uid) == key:
                continue
            d = delta(vm, self._claim_flavor)
            restart = get_condition(vm.status.conditions, c.COND_RESTART_REQUIRED)
            if not (d.added or d.removed or d.changed or vm.status.detaching) and (
                restart is None or restart.status != "True"
            ):
                self._quiet[uid] = key
                continue
            self._quiet.pop(uid, None)
            current = await self._restart_required(vm, d.changed)
            if current is None:
                continue
            if d.removed:
                await self._detach(current, d.removed)
            elif current.status.detaching:
                await self._release_detached(current)
            elif d.added:
                await self._attach(current, d.added)

    async def _restart_required(
        self, vm: PassthroughVM, changed: list[str]
    ) -> PassthroughVM | None:
        cond = get_condition(vm.status.conditions, c.COND_RESTART_REQUIRED)
        if changed:
            msg = (
                "; ".join(changed) + ": not applied to the VM as placed (a bound request, or "
                "the CPUs and memory counted for it); `kubectl pcipt migrate` places it again "
                "with its whole spec"
            )
            if cond is not None and cond.status == "True" and cond.message == msg:
                return vm
            got = await self.status.patch(
                vm, {}, cond=(c.COND_RESTART_REQUIRED, True, c.REASON_SPEC_CHANGED, msg)
            )
            if got is not None:
                self.events.record(vm, "Warning", c.REASON_SPEC_CHANGED, msg)
            return got
        if cond is not None and cond.status == "True":
            return await self.status.patch(
                vm,
                {},
                cond=(
                    c.COND_RESTART_REQUIRED,
                    False,
                    c.REASON_SPEC_APPLIED,
                    "the spec's requests are what is bound",
                ),
            )
        return vm

    async def _detach(self, vm: PassthroughVM, removed: list[str]) -> None:
        st = vm.status
        going = [
            {"request": d.request, "pciDevice": d.pci_device, "address": d.address}
            for d in st.devices
            if d.request in removed
        ] + [
            {"request": n.name, "pciDevice": n.pci_device, "address": n.address}
            for n in st.networks
            if n.name in removed
        ]
        body = {
            "devices": [d.to_dict() for d in st.devices if d.request not in removed],
            "networks": [n.to_dict() for n in st.networks if n.name not in removed],
            "detaching": [d.to_dict() for d in st.detaching] + going,
            "deviceSummary": _summary(
                vm,
                [d for d in st.devices if d.request not in removed],
                [n for n in st.networks if n.name not in removed],
            ),
        }
        msg = f"detaching {', '.join(x['address'] for x in going)} ({', '.join(removed)} removed)"
        if await self.status.write(vm, body) is not None:
            log.info("hot-unplug vm=%s/%s %s", vm.metadata.namespace, vm.metadata.name, msg)
            self.events.record(vm, "Normal", c.REASON_DETACHING, msg)

    async def _release_detached(self, vm: PassthroughVM) -> None:
        """Release what the node reports gone from the domain."""
        dom = vm.status.domain
        if dom is None or dom.name is None:
            return
        gone = [d for d in vm.status.detaching if d.address not in dom.devices]
        if not gone:
            return
        keep = [d.to_dict() for d in vm.status.detaching if d not in gone]
        if await self.status.write(vm, {"detaching": keep}) is None:
            return
        uid = vm.metadata.uid or ""
        released = await self.binder.release_all(uid, [d.pci_device for d in gone], "Detached")
        msg = f"released {released} device(s) the domain no longer has: " + ", ".join(
            d.address for d in gone
        )
        log.info("hot-unplug vm=%s/%s %s", vm.metadata.namespace, vm.metadata.name, msg)
        self.events.record(vm, "Normal", c.REASON_RELEASED, msg)

    async def _attach(self, vm: PassthroughVM, added: list[str]) -> None:
        uid = vm.metadata.uid or ""
        node = vm.status.node_name or ""
        version = self.inventory.node_versions.get(node, 0)
        if self._refused.get(uid, (None, ""))[0] == version:
            return
        requested = {r.name: r.flavor for r in vm.spec.devices} | {
            n.name: n.flavor for n in vm.spec.networks
        }
        limited = [
            flavor
            for name, flavor in requested.items()
            if name in added
            and (f := self.inventory.flavors.get(flavor)) is not None
            and f.spec.limits is not None
            and f.spec.limits.max_per_namespace is not None
        ]
        result: Placement | Refusal | None = None
        if limited:
            why = (
                f"flavor {limited[0]} has a per-namespace limit: its devices are not "
                "hot-plugged; `kubectl pcipt migrate` places the VM again with them"
            )
        else:
            result = self._place(vm, added)
            why = result.message if isinstance(result, Refusal) else ""
        if isinstance(result, Placement) and not any(
            a.request in added and not a.companion for a in result.assignments
        ):
            # Only optional requests, none placed: they wait, like a refusal.
            why = "; ".join(f"{r}: {w}" for r, w in result.skipped) or "nothing free"
            result = None
        if not isinstance(result, Placement):
            self._refused[uid] = (version, why)
            await self._refuse(vm, added, why)
            return
        self._refused.pop(uid, None)
        try:
            await self._bind(vm, result, added)
        except LostRace as e:
            log.info(
                "hot-plug vm=%s/%s lost a race: %s", vm.metadata.namespace, vm.metadata.name, e
            )

    def _place(self, vm: PassthroughVM, added: list[str]) -> Placement | Refusal:
        node = vm.status.node_name or ""
        part = delta_vm(vm, added)
        inp = self.inventory.scheduling_input(part, self.scoring)
        facts = dict(inp.nodes)
        if node in facts:
            facts[node] = replace(facts[node], compute=None)  # CPUs and memory: counted already
        devices = list(self.inventory.by_node.get(node, {}).values())
        pinned = vm.status.numa_node
        flavors = self.inventory.flavors
        if pinned is not None and any(
            (
                r.numa_policy
                or (flavors[r.flavor].spec.numa_policy if r.flavor in flavors else "none")
            )
            == "required"
            for r in part.spec.devices
        ):
            # Locality is to the NUMA node the VM's vCPUs and memory are bound to.
            devices = [d for d in devices if d.numa == pinned]
        inp = replace(
            inp,
            nodes={node: facts[node]} if node in facts else {},
            by_node={node: devices},
            free=None,
            refusal_memo=None,
        )
        return schedule(inp)

    async def _bind(self, vm: PassthroughVM, placement: Placement, added: list[str]) -> None:
        uid = vm.metadata.uid or ""
        bind_id = uuid.uuid4().hex[:16]
        fresh: list[str] = []
        by_device = {a.device: a for a in placement.assignments}
        try:
            for name in sorted(by_device):
                dev = self.inventory.devices.get(name)
                if dev is None or dev.claim is not None:
                    raise LostRace(f"device {name} is gone or claimed")
                await self.binder.claim(dev, vm, by_device[name], bind_id)
                fresh.append(name)
            # The new bindings, as a full bind writes them, appended to the VM's.
            full = scheduled_status(vm, placement, clock.now())
            devices = [d.to_dict() for d in vm.status.devices] + full["devices"]
            networks = [n.to_dict() for n in vm.status.networks] + full["networks"]
            skipped = [s.to_dict() for s in vm.status.skipped if s.request not in added]
            skipped += [s for s in full["skipped"] if s["request"] in added]
            summary = _summary(vm, devices, networks)
            msg = "hot-plugged " + ", ".join(
                f"{a.request}={a.address}" for a in placement.assignments if not a.companion
            )
            # The bindings and the condition saying so in one write: nobody reads one without
            # the other.
            st = condition_status(
                vm,
                c.COND_DEVICES_BOUND,
                True,
                c.REASON_HOTPLUGGED,
                f"{msg}; {summary} bound",
                clock.now(),
                {
                    "devices": devices,
                    "networks": networks,
                    "skipped": skipped,
                    "deviceSummary": summary,
                },
            )
            body: dict[str, Any] = {
                "metadata": {"resourceVersion": vm.metadata.resource_version},
                "status": st,
            }
            try:
                got = await self.api.patch(
                    vm_path(vm.metadata.namespace or "", vm.metadata.name, status=True), body
                )
            except (Conflict, NotFound) as e:
                raise LostRace(f"VM changed while hot-plugging ({e.status})") from e
            self.inventory.upsert_vm(PassthroughVM.model_validate(got))
            log.info("hot-plug vm=%s/%s %s", vm.metadata.namespace, vm.metadata.name, msg)
            self.events.record(vm, "Normal", c.REASON_HOTPLUGGED, msg)
        except LostRace:
            for name in fresh:
                await self.binder.release(name, uid, bind_id)
            raise

    async def _refuse(self, vm: PassthroughVM, added: list[str], why: str) -> None:
        optional = {r.name for r in vm.spec.devices if r.optional}
        if set(added) <= optional:
            return  # optional requests wait quietly, like at placement
        msg = (
            f"cannot hot-plug {', '.join(added)} on {vm.status.node_name}: {why}; the VM keeps "
            "running with its other devices"
        )
        cond = get_condition(vm.status.conditions, c.COND_DEVICES_BOUND)
        if cond is not None and cond.message == msg:
            return
        got = await self.status.patch(
            vm, {}, cond=(c.COND_DEVICES_BOUND, False, c.REASON_HOTPLUG_REFUSED, msg)
        )
        if got is not None:
            self.events.record(vm, "Warning", c.REASON_HOTPLUG_REFUSED, msg)


def _summary(vm: PassthroughVM, devices: list[Any], networks: list[Any]) -> str:
    def companion(d: Any) -> bool:
        return bool(d.get("companion")) if isinstance(d, dict) else bool(d.companion)

    requested = sum(d.count for d in vm.spec.devices) + len(vm.spec.networks)
    bound = sum(1 for d in devices if not companion(d)) + len(networks)
    return f"{bound}/{requested}"

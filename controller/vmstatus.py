"""What the controller writes into a PassthroughVM's status, computed from a scheduling result.
Pure: the caller passes the time and writes the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from controller.scheduling import Placement, Refusal
from pcipt import constants as c
from pcipt.api.v1alpha1 import (
    DeviceBinding,
    NetworkBinding,
    NodeRefusal,
    PassthroughVM,
    SchedulingStatus,
    SkippedRequest,
)
from pcipt.conditions import is_true, ready_condition, same_conditions, set_condition
from pcipt.pci import generated_mac

MAX_NODES_IN_STATUS = 20


def device_summary(vm: PassthroughVM, placement: Placement) -> str:
    requested = sum(d.count for d in vm.spec.devices) + len(vm.spec.networks)
    bound = sum(1 for a in placement.assignments if not a.companion)
    return f"{bound}/{requested}"


def scheduled_status(vm: PassthroughVM, placement: Placement, now: datetime) -> dict[str, Any]:
    """Status after a successful bind: node, devices, networks, Scheduled and DevicesBound."""
    uid = vm.metadata.uid or ""
    macs = {n.name: n.mac or generated_mac(uid, n.name) for n in vm.spec.networks}
    vlans = {n.name: n.vlan for n in vm.spec.networks}
    requests = {n.name: n for n in vm.spec.networks}
    devices = [
        DeviceBinding(
            request=a.request,
            pci_device=a.device,
            address=a.address,
            numa_node=a.numa,
            companion=a.companion,
            alternative=a.alternative,
            since=now,
        )
        for a in placement.assignments
        if not a.network or a.companion
    ]
    networks = [
        NetworkBinding(
            name=a.request,
            pci_device=a.device,
            address=a.address,
            numa_node=a.numa,
            mac=macs.get(a.request),
            netdev=a.netdev,
            vlan=vlans.get(a.request),
            min_tx_rate=(r.min_tx_rate or None) if (r := requests.get(a.request)) else None,
            max_tx_rate=a.max_tx_rate,
            link_state=r.link_state if r and r.link_state not in (None, "auto") else None,
            since=now,
        )
        for a in placement.assignments
        if a.network and not a.companion
    ]
    gen = vm.metadata.generation
    what = ", ".join(f"{a.request}={a.address}" for a in placement.assignments if not a.companion)
    conds = set_condition(
        vm.status.conditions,
        c.COND_SCHEDULED,
        True,
        "Scheduled",
        f"placed on {placement.node}" + (f": {what}" if what else ""),
        generation=gen,
        now=now,
    )
    n = len(placement.assignments)
    conds = set_condition(
        conds,
        c.COND_DEVICES_BOUND,
        True,
        "Bound",
        f"{n} device(s) claimed for this VM" if n else "no devices to bind",
        generation=gen,
        now=now,
    )
    conds = _with_ready(conds, vm, gen, now)
    extra: dict[str, Any] = {}
    mig = vm.status.migration
    if mig is not None and mig.phase == "Placing":
        extra["migration"] = {
            **mig.to_dict(),
            "phase": "Completed",
            "completedAt": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "message": f"migrated from {mig.from_node} to {placement.node}",
        }
    return {
        **extra,
        "phase": "Scheduled",
        "nodeName": placement.node,
        "devices": [d.to_dict() for d in devices],
        "networks": [x.to_dict() for x in networks],
        "skipped": [
            SkippedRequest(request=r, reason=why).to_dict() for r, why in placement.skipped
        ],
        "deviceSummary": device_summary(vm, placement),
        "numaNode": placement.numa_node if vm.spec.cpu.pinning == "auto" else None,
        "compute": placement.compute.to_dict() if placement.compute is not None else None,
        "scheduling": None,
        "conditions": [x.to_dict() for x in conds],
        "observedGeneration": gen,
    }


def pending_status(vm: PassthroughVM, refusal: Refusal, now: datetime) -> dict[str, Any] | None:
    """Status for a VM that cannot be placed, or None when it already says exactly this."""
    gen = vm.metadata.generation
    conds = set_condition(
        vm.status.conditions,
        c.COND_SCHEDULED,
        False,
        refusal.reason,
        refusal.message,
        generation=gen,
        now=now,
    )
    conds = _with_ready(conds, vm, gen, now)
    nodes = [NodeRefusal(node_name=r.node, reasons=[*r.reasons, *r.details]) for r in refusal.nodes]
    sched = SchedulingStatus(
        message=refusal.message,
        nodes=nodes[:MAX_NODES_IN_STATUS],
        truncated=len(nodes) > MAX_NODES_IN_STATUS,
        last_attempt_time=now,
    )
    current = vm.status.scheduling
    if (
        vm.status.phase == "Pending"
        and same_conditions(vm.status.conditions, conds)
        and current is not None
        and current.message == sched.message
        and _same_reasons(current.nodes, refusal.nodes[:MAX_NODES_IN_STATUS])
    ):
        # The details (how many devices are claimed, being bound, ...) move with every bind
        # elsewhere; rewriting every waiting VM for them would be a write storm that also
        # races the binds. They are refreshed whenever a reason changes.
        return None
    return {
        "phase": "Pending",
        "scheduling": sched.to_dict(),
        "conditions": [x.to_dict() for x in conds],
        "observedGeneration": gen,
    }


NODE_CONDITIONS = (
    c.COND_DOMAIN_READY,
    c.COND_DOMAIN_GONE,
    c.COND_NODE_ALIVE,
    c.COND_DEVICES_HEALTHY,
)
"""Conditions about the node a VM was on and the devices it had there."""


def unplaced_status(vm: PassthroughVM, reason: str, msg: str, now: datetime) -> dict[str, Any]:
    """Status of a VM taken off its node to be placed again: nothing of the old node stays
    (devices, CPUs, domain, the conditions about them); Scheduled and DevicesBound say why."""
    gen = vm.metadata.generation
    conds = [x for x in vm.status.conditions if x.type not in NODE_CONDITIONS]
    conds = set_condition(conds, c.COND_SCHEDULED, False, reason, msg, generation=gen, now=now)
    conds = set_condition(conds, c.COND_DEVICES_BOUND, False, reason, msg, generation=gen, now=now)
    conds = _with_ready(conds, vm, gen, now)
    return {
        "phase": "Pending",
        "nodeName": None,
        "devices": [],
        "networks": [],
        "skipped": [],
        "detaching": [],
        "deviceSummary": None,
        "numaNode": None,
        "compute": None,
        "domain": None,
        "conditions": [x.to_dict() for x in conds],
        "observedGeneration": gen,
    }


def evacuated_status(
    vm: PassthroughVM, node: str, why: str, devices: Sequence[str], now: datetime
) -> dict[str, Any]:
    """Status of a VM taken off a node that is down, to be placed again, with status.evacuation
    keeping the record."""
    msg = f"evacuated from {node}: {why}; released {len(devices)} device(s), placing it again"
    return {
        **unplaced_status(vm, c.REASON_EVACUATED, msg, now),
        "evacuation": {
            "fromNode": node,
            "time": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "reason": why,
            "devices": sorted(devices),
        },
    }


def _same_reasons(current: Sequence[NodeRefusal], refused: Sequence[Any]) -> bool:
    if [n.node_name for n in current] != [r.node for r in refused]:
        return False
    return all(
        cur.reasons[: len(r.reasons)] == list(r.reasons)
        for cur, r in zip(current, refused, strict=True)
    )


def _with_ready(conds: list[Any], vm: PassthroughVM, gen: int | None, now: datetime) -> list[Any]:
    ok, reason, message = ready_condition(conds, running=vm.spec.running)
    return set_condition(conds, c.COND_READY, ok, reason, message, generation=gen, now=now)


def condition_status(  # noqa: PLR0917 - one condition's fields, in their usual order
    vm: PassthroughVM,
    type_: str,
    status: bool,
    reason: str,
    message: str,
    now: datetime,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Status setting one condition (and Ready), or None when nothing would change."""
    gen = vm.metadata.generation
    conds = set_condition(
        vm.status.conditions, type_, status, reason, message, generation=gen, now=now
    )
    if type_ != c.COND_READY:
        conds = _with_ready(conds, vm, gen, now)
    if same_conditions(vm.status.conditions, conds) and not extra:
        return None
    return {"conditions": [x.to_dict() for x in conds], **(extra or {})}


def listed_devices(vm: PassthroughVM) -> set[str]:
    """The PciDevices a VM's status says it has (those being detached, and those claimed on a
    live migration's target, included)."""
    mig = vm.status.migration
    return (
        {d.pci_device for d in vm.status.devices}
        | {n.pci_device for n in vm.status.networks}
        | {d.pci_device for d in vm.status.detaching}
        | ({n.pci_device for n in mig.networks} if mig is not None else set())
    )


def migration_under_way(vm: PassthroughVM) -> bool:
    """A cold or live migration is running: nothing else changes the VM's placement."""
    mig = vm.status.migration
    return mig is not None and mig.phase in ("Stopping", "Placing", *c.LIVE_PHASES)


def is_placed(vm: PassthroughVM) -> bool:
    """Bound to a node by this controller (not only a nodeName someone wrote)."""
    return bool(vm.status.node_name) and is_true(vm.status.conditions, c.COND_SCHEDULED)


def is_deleting(vm: PassthroughVM) -> bool:
    return vm.metadata.deletion_timestamp is not None

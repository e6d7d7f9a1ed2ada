"""The controller's metrics (names in pcipt.metrics; documented in docs/metrics.md)."""

from __future__ import annotations

from collections import Counter as Tally

from controller.inventory import Inventory
from pcipt import metrics as m
from pcipt.release import HELD_QUARANTINE


class ControllerMetrics:
    def __init__(self, registry: m.Registry, inventory: Inventory) -> None:
        self.inv = inventory
        self.devices = registry.gauge(
            m.DEVICES, "Devices by node, flavor and state.", ("node", "flavor", "state")
        )
        self.allocations = registry.gauge(
            m.ALLOCATIONS, "Devices held by VMs, by namespace and flavor.", ("namespace", "flavor")
        )
        self.latency = registry.histogram(
            m.SCHEDULING_LATENCY, "Seconds from VM creation to Scheduled."
        )
        self.decision = registry.histogram(
            m.SCHEDULING_DECISION,
            "Seconds one scheduling decision took.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
        )
        self.binds = registry.counter(m.BINDS, "VMs bound.")
        self.conflicts = registry.counter(
            m.BIND_CONFLICTS, "Binds that lost a race and were planned again."
        )
        self.refusals = registry.counter(
            m.REFUSALS, "Refused scheduling attempts, by reason.", ("reason",)
        )
        self.releases = registry.counter(m.RELEASES, "Devices released.")
        self.repairs = registry.counter(
            m.AUDIT_REPAIRS, "Repairs made by the audit, by kind.", ("kind",)
        )
        self.errors = registry.counter(
            m.RECONCILE_ERRORS,
            "Errors in the loops, by component and stage.",
            ("component", "stage"),
        )
        self.pending = registry.gauge(m.PENDING, "VMs waiting to be placed.")
        self.nodes = registry.gauge(m.NODES_ALIVE, "Nodes known to pcipt, by liveness.", ("alive",))
        registry.collectors.append(self.collect)

    def error(self, stage: str) -> None:
        self.errors.inc("controller", stage)

    def collect(self) -> None:
        """Gauges computed from the inventory at scrape time."""
        inv = self.inv
        devices: Tally[tuple[str, str, str]] = Tally()
        for flavor, names in inv.members.items():
            for name in names:
                d = inv.devices.get(name)
                if d is None:
                    continue
                if d.claim is not None:
                    state = "allocated"
                elif not d.healthy:
                    state = "unhealthy"
                elif d.unschedulable:
                    state = "cordoned"
                elif d.reserved_after_use:
                    state = "reserved"
                elif d.held_back is not None:
                    state = "quarantined" if d.held_back == HELD_QUARANTINE else "scrubbing"
                elif not inv.is_alive(d.node):
                    state = "node-not-alive"
                else:
                    state = "free"
                devices[(d.node, flavor, state)] += 1
        self.devices.replace({k: float(v) for k, v in devices.items()})
        self.allocations.replace({k: float(v) for k, v in inv.usage.items() if v})
        nodes = inv.known_nodes()
        alive = sum(1 for n in nodes if inv.is_alive(n))
        self.nodes.replace({("true",): float(alive), ("false",): float(len(nodes) - alive)})

"""Device time for charging, the controller's half (pcipt/usage.py says what is kept where):
the usage ledger written before each release, the watch that keeps every replica's copy of
all ledgers current, and the counters computed from them and the open claims."""

from __future__ import annotations

import logging
import time
from typing import Any

from controller.inventory import Inventory
from controller.ledger import ATTEMPTS, Ledger
from controller.scheduling import Device
from pcipt import clock
from pcipt import metrics as m
from pcipt.informer import Informer
from pcipt.kubeclient import Conflict, KubeClient
from pcipt.usage import (
    LEDGER_LABEL,
    LEDGER_PREFIX,
    Interval,
    by_namespace_and_flavor,
    entry_key,
    fold,
    parse_ledger,
    settled,
    totals,
)

log = logging.getLogger("pcipt.controller.usage")

KEEP_ENTRIES = 2000
"""Closed intervals a ledger keeps one by one; older ones are folded into its totals."""


class UsageLedger(Ledger):
    """Per tenant namespace: one entry per claim that ended (pcipt/usage.py)."""

    prefix = LEDGER_PREFIX
    label = LEDGER_LABEL
    required = None

    async def record(self, dev: Device, reason: str) -> None:
        """Write the interval of the device's claim, ending now, before it is released. Same
        key for the same claim, so a retried release rewrites its own entry. A ledger that
        cannot be written is logged and the release goes on: a device is never held back for
        billing."""
        claim = dev.claim
        if claim is None or claim.companion or not claim.flavor or claim.claimed_at is None:
            return
        flavor = self.inv.flavors.get(claim.flavor)
        entry = {
            "vm": f"{claim.namespace}/{claim.name}",
            "uid": claim.uid,
            "device": dev.name,
            "flavor": claim.flavor,
            "priceClass": (flavor.spec.price_class if flavor else None) or "",
            "from": claim.claimed_at,
            "to": clock.now().timestamp(),
            "reason": reason,
        }
        key = entry_key(dev.name, claim.claimed_at)
        for _ in range(ATTEMPTS):
            try:
                entries, rv = await self._read(claim.namespace)
                entries[key] = entry
                await self._write(claim.namespace, fold(entries, KEEP_ENTRIES), rv)
                return
            except Conflict:
                continue
            except Exception as e:  # the release must not wait for billing
                log.warning("usage of device=%s not recorded: %s", dev.name, e)
                return
        log.warning("usage of device=%s not recorded: ledger kept changing", dev.name)


class UsageMeter:
    """Every usage ledger, watched; the device-seconds counters computed from them and the
    open claims at each scrape."""

    def __init__(
        self, api: KubeClient, namespace: str, inventory: Inventory, registry: m.Registry
    ) -> None:
        self.inventory = inventory
        self.ledgers: dict[str, tuple[list[Interval], dict[Any, float]]] = {}
        self.watch = Informer(
            api,
            f"/api/v1/namespaces/{namespace}/configmaps",
            label_selector=f"{LEDGER_LABEL}=true",
            on_event=self._event,
            name="usage-ledgers",
        )
        self.per_flavor = registry.state_counter(
            m.DEVICE_SECONDS,
            "Seconds devices were claimed for VMs, by namespace, flavor and price class.",
            ("namespace", "flavor", "price_class"),
        )
        self.per_vm = registry.state_counter(
            m.VM_DEVICE_SECONDS,
            "Seconds devices were claimed for each VM, by flavor and price class.",
            ("namespace", "vm", "flavor", "price_class"),
        )
        registry.collectors.append(self.collect)

    def _event(self, kind: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if not name.startswith(LEDGER_PREFIX):
            return
        ns = name[len(LEDGER_PREFIX) :]
        if kind == "DELETED":
            self.ledgers.pop(ns, None)
            return
        intervals, rolled, _ = parse_ledger(ns, obj.get("data"))
        self.ledgers[ns] = (intervals, rolled)

    def open_intervals(self, now: float) -> list[Interval]:
        out = []
        for d in self.inventory.devices.values():
            c = d.claim
            if c is None or c.companion or not c.flavor or not settled(c.claimed_at, now):
                continue
            assert c.claimed_at is not None
            f = self.inventory.flavors.get(c.flavor)
            out.append(
                Interval(
                    c.namespace,
                    c.name,
                    c.flavor,
                    (f.spec.price_class if f else None) or "",
                    c.claimed_at,
                    None,
                )
            )
        return out

    def current(self, now: float | None = None) -> dict[Any, float]:
        """Device-seconds per (namespace, vm, flavor, price class) until now."""
        now = time.time() if now is None else now
        closed = [i for intervals, _ in self.ledgers.values() for i in intervals]
        rolled: dict[Any, float] = {}
        for _, r in self.ledgers.values():
            rolled.update(r)
        # A claim being released has its interval in the ledger already: counted once.
        recorded = {(i.namespace, i.vm, i.flavor, int(i.start)) for i in closed}
        open_ = [
            i
            for i in self.open_intervals(now)
            if (i.namespace, i.vm, i.flavor, int(i.start)) not in recorded
        ]
        return totals([*closed, *open_], rolled, now=now)

    def collect(self) -> None:
        per_vm = self.current()
        self.per_vm.replace({k: round(v, 3) for k, v in per_vm.items()})
        self.per_flavor.replace(
            {k: round(v, 3) for k, v in by_namespace_and_flavor(per_vm).items()}
        )

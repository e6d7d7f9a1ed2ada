"""Ledgers: what binds in flight and bound VMs hold, written where every controller replica
sees it, so that limits hold with binds in flight and with several controllers at once. Two
ledgers share one base (Ledger: a ConfigMap per tenant, entries per VM UID, conditional
writes, bind-ID ownership): namespace quotas (QuotaLedger) and each node's CPUs and memory
(ComputeLedger).

Namespace quotas:

A flavor's `limits.maxPerNamespace` is checked by the scheduler against the namespace's usage:
devices claimed, devices promised to binds in flight in this process, and the namespace's
ledger. The ledger is what makes it hold across processes: one ConfigMap per tenant namespace
in the operator's namespace (`pcipt-quota.<namespace>`; tenants cannot write it), whose data
has one entry per VM holding or binding quota-limited devices:

    data:
      <vm uid>: '{"vm": "ns/name", "flavors": {"a100": 2}, "at": "2026-12-02T03:00:00Z"}'

Before a bind claims any device of a limited flavor it adds its entry with a write
conditioned on the ConfigMap's resourceVersion, after checking the limit against every other
entry (and every VM's claims, for VMs bound before the ledger existed). Two controllers that
both read room for one more device cannot both write: the second's write fails, it re-reads,
and finds no room. The entry goes when the VM's devices are released, when its bind fails,
and (by the audit) when its VM is gone.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from controller.computefit import NodeUse, conflict
from controller.inventory import Inventory
from pcipt import clock
from pcipt.api.v1alpha1 import ComputeStatus, PassthroughVM
from pcipt.kubeclient import Conflict, KubeClient, NotFound

log = logging.getLogger("pcipt.controller")

LEDGER_PREFIX = "pcipt-quota."
LEDGER_LABEL = "pcipt.io/quota-ledger"
ATTEMPTS = 10


class QuotaExceeded(Exception):
    """The namespace has no room left for the VM's devices of a limited flavor."""


def ledger_name(namespace: str) -> str:
    return f"{LEDGER_PREFIX}{namespace}"


def limited_counts(vm: PassthroughVM, inv: Inventory, counted: Mapping[str, int]) -> dict[str, int]:
    """Of the devices a placement counts per flavor, those of flavors with maxPerNamespace."""
    out = {}
    for flavor, n in counted.items():
        f = inv.flavors.get(flavor)
        if f is not None and f.spec.limits is not None and f.spec.limits.max_per_namespace:
            out[flavor] = n
    return out


class Ledger:
    """Entries per key (a tenant namespace, a node) in one ConfigMap each, in the operator's
    namespace, every write conditioned on the ConfigMap's resourceVersion. Subclasses say
    what an entry holds and keep the inventory's copy."""

    prefix = LEDGER_PREFIX
    label = LEDGER_LABEL
    required: str | None = "flavors"
    """The field (a map) every well-formed entry has; None: any JSON object is one."""

    def __init__(self, api: KubeClient, namespace: str, inventory: Inventory) -> None:
        self.api = api
        self.namespace = namespace
        self.inv = inventory

    def _path(self, key: str | None = None) -> str:
        base = f"/api/v1/namespaces/{self.namespace}/configmaps"
        return base if key is None else f"{base}/{self.prefix}{key}"

    def _parse(self, data: Mapping[str, str] | None) -> dict[str, dict[str, Any]]:
        out = {}
        for uid, text in (data or {}).items():
            try:
                entry = json.loads(text)
            except ValueError:
                continue
            if isinstance(entry, dict) and (
                self.required is None or isinstance(entry.get(self.required), dict)
            ):
                out[uid] = entry
        return out

    def _seen(self, key: str, entries: Mapping[str, dict[str, Any]]) -> None:
        """Keep the inventory's copy of a ledger just read or written."""

    async def _read(self, key: str) -> tuple[dict[str, dict[str, Any]], str | None]:
        """The ledger's entries and resourceVersion; None when it does not exist yet."""
        try:
            got = await self.api.get(self._path(key))
        except NotFound:
            self._seen(key, {})
            return {}, None
        entries = self._parse(got.get("data"))
        self._seen(key, entries)
        return entries, got["metadata"]["resourceVersion"]

    async def _write(self, key: str, entries: Mapping[str, dict[str, Any]], rv: str | None) -> None:
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": f"{self.prefix}{key}",
                "namespace": self.namespace,
                "labels": {self.label: "true"},
            },
            "data": {u: json.dumps(e, sort_keys=True) for u, e in sorted(entries.items())},
        }
        if rv is None:
            await self.api.create(self._path(), body)  # Conflict when another writer made it
        else:
            body["metadata"]["resourceVersion"] = rv
            await self.api.replace(self._path(key), body)
        self._seen(key, entries)

    async def _own_entry_busy(
        self, entries: Mapping[str, dict[str, Any]], uid: str, bind_id: str, grace: float, what: str
    ) -> None:
        """A recent entry of the same VM by another bind: another controller is binding it."""
        mine = entries.get(uid)
        if mine is not None and mine.get("bind") not in (None, bind_id):
            at = epoch(mine.get("at"))
            if at is None or time.time() - at < grace:
                raise Conflict(409, "Conflict", f"{what} is being bound by another controller")

    async def release(self, key: str, uid: str, bind_id: str | None = None) -> bool:
        """Drop the VM's entry (given bind_id, only while it is still that bind's: a failed
        bind never drops the entry of the bind that won); True when it had one."""
        for _ in range(ATTEMPTS):
            entries, rv = await self._read(key)
            if uid not in entries or rv is None:
                return False
            if bind_id is not None and entries[uid].get("bind") != bind_id:
                return False
            del entries[uid]
            try:
                await self._write(key, entries, rv)
                return True
            except (Conflict, NotFound):
                continue
        return False

    async def ledgers(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Every ledger of this kind: key -> entries."""
        got = await self.api.list(self._path(), label_selector=f"{self.label}=true")
        out = {}
        for item in got.get("items", []):
            name = item["metadata"]["name"]
            if name.startswith(self.prefix):
                key = name[len(self.prefix) :]
                out[key] = self._parse(item.get("data"))
                self._seen(key, out[key])
        return out


class QuotaLedger(Ledger):
    """Per tenant namespace: each VM's devices of flavors with maxPerNamespace."""

    def _seen(self, key: str, entries: Mapping[str, dict[str, Any]]) -> None:
        self.inv.set_ledger(key, {u: Counter(e["flavors"]) for u, e in entries.items()})

    async def acquire(
        self, vm: PassthroughVM, counts: Mapping[str, int], bind_id: str, grace: float = 30.0
    ) -> None:
        """Record the VM's devices of limited flavors under this bind's ID, or raise
        QuotaExceeded when other VMs' entries or claims leave no room. Conditional on the
        ledger's resourceVersion. A recent entry of the same VM by another bind means another
        controller is binding it: Conflict, as the VM write would be."""
        if not counts:
            return
        tenant, uid = vm.metadata.namespace or "", vm.metadata.uid or ""
        for _ in range(ATTEMPTS):
            entries, rv = await self._read(tenant)
            await self._own_entry_busy(
                entries, uid, bind_id, grace, f"VM {tenant}/{vm.metadata.name}"
            )
            held = self.inv.namespace_usage(tenant, exclude_uid=uid, in_flight=False)
            for flavor, n in sorted(counts.items()):
                f = self.inv.flavors.get(flavor)
                limit = f.spec.limits.max_per_namespace if f and f.spec.limits else None
                if limit is not None and held.get(flavor, 0) + n > limit:
                    raise QuotaExceeded(
                        f"namespace {tenant} holds {held.get(flavor, 0)} {flavor} and the VM "
                        f"needs {n} more; flavor {flavor} allows {limit} per namespace"
                    )
            entries[uid] = {
                "vm": f"{tenant}/{vm.metadata.name}",
                "bind": bind_id,
                "flavors": dict(counts),
                "at": clock.timestamp(),
            }
            try:
                await self._write(tenant, entries, rv)
                return
            except Conflict:
                continue  # another bind wrote first: read again, check again
        raise Conflict(409, "Conflict", f"quota ledger of {tenant} kept changing")


def epoch(text: object) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return clock.parse(text).timestamp()
    except ValueError:
        return None


class ComputeLedger(Ledger):
    """Per node: each VM's CPUs and memory there. Dedicated CPUs are given to one VM only, and
    memory and hugepages are never overcommitted, whichever controller binds."""

    prefix = "pcipt-compute."
    label = "pcipt.io/compute-ledger"
    required = "compute"

    def _seen(self, key: str, entries: Mapping[str, dict[str, Any]]) -> None:
        self.inv.set_compute_ledger(
            key, {u: ComputeStatus.model_validate(e["compute"]) for u, e in entries.items()}
        )

    async def acquire(
        self,
        vm: PassthroughVM,
        node: str,
        compute: ComputeStatus,
        bind_id: str,
        *,
        grace: float = 30.0,
        ratio: float = 1.0,
    ) -> None:
        """Write the VM's take down, or raise Conflict when another VM's entry (or a VM placed
        there) took those CPUs or that memory first. Conditional on the resourceVersion."""
        uid = vm.metadata.uid or ""
        topo = self.inv.compute.get(node)
        if topo is None:
            return
        for _ in range(ATTEMPTS):
            entries, rv = await self._read(node)
            await self._own_entry_busy(
                entries, uid, bind_id, grace, f"VM {vm.metadata.namespace}/{vm.metadata.name}"
            )
            use = NodeUse.of(self.inv.compute_taken(node, exclude_uid=uid))
            problem = conflict(topo, use, compute, ratio)
            if problem is not None:
                raise Conflict(409, "Conflict", f"node {node}: {problem}")
            entries[uid] = {
                "vm": f"{vm.metadata.namespace}/{vm.metadata.name}",
                "bind": bind_id,
                "compute": compute.to_dict(),
                "at": clock.timestamp(),
            }
            try:
                await self._write(node, entries, rv)
                return
            except Conflict:
                continue
        raise Conflict(409, "Conflict", f"compute ledger of {node} kept changing")

"""Namespace quotas that hold with binds in flight and with several controllers at once.

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
from datetime import UTC, datetime
from typing import Any

from controller.inventory import Inventory
from pcipt.api.v1alpha1 import PassthroughVM
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


def _parse(data: Mapping[str, str] | None) -> dict[str, dict[str, Any]]:
    out = {}
    for uid, text in (data or {}).items():
        try:
            entry = json.loads(text)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("flavors"), dict):
            out[uid] = entry
    return out


class QuotaLedger:
    def __init__(self, api: KubeClient, namespace: str, inventory: Inventory) -> None:
        self.api = api
        self.namespace = namespace
        self.inv = inventory

    def _path(self, tenant: str | None = None) -> str:
        base = f"/api/v1/namespaces/{self.namespace}/configmaps"
        return base if tenant is None else f"{base}/{ledger_name(tenant)}"

    async def _read(self, tenant: str) -> tuple[dict[str, dict[str, Any]], str | None]:
        """The ledger's entries and resourceVersion; None when it does not exist yet."""
        try:
            got = await self.api.get(self._path(tenant))
        except NotFound:
            self.inv.set_ledger(tenant, {})
            return {}, None
        entries = _parse(got.get("data"))
        self.inv.set_ledger(tenant, {u: Counter(e["flavors"]) for u, e in entries.items()})
        return entries, got["metadata"]["resourceVersion"]

    async def _write(
        self, tenant: str, entries: Mapping[str, dict[str, Any]], rv: str | None
    ) -> None:
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": ledger_name(tenant),
                "namespace": self.namespace,
                "labels": {LEDGER_LABEL: "true"},
            },
            "data": {u: json.dumps(e, sort_keys=True) for u, e in sorted(entries.items())},
        }
        if rv is None:
            await self.api.create(self._path(), body)  # Conflict when another writer made it
        else:
            body["metadata"]["resourceVersion"] = rv
            await self.api.replace(self._path(tenant), body)
        self.inv.set_ledger(tenant, {u: Counter(e["flavors"]) for u, e in entries.items()})

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
            mine = entries.get(uid)
            if mine is not None and mine.get("bind") not in (None, bind_id):
                at = epoch(mine.get("at"))
                if at is None or time.time() - at < grace:
                    raise Conflict(
                        409,
                        "Conflict",
                        f"VM {tenant}/{vm.metadata.name} is being bound by another controller",
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
                "at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
            try:
                await self._write(tenant, entries, rv)
                return
            except Conflict:
                continue  # another bind wrote first: read again, check again
        raise Conflict(409, "Conflict", f"quota ledger of {tenant} kept changing")

    async def release(self, tenant: str, uid: str, bind_id: str | None = None) -> bool:
        """Drop the VM's entry (given bind_id, only while it is still that bind's: a failed
        bind never drops the entry of the bind that won); True when it had one."""
        for _ in range(ATTEMPTS):
            entries, rv = await self._read(tenant)
            if uid not in entries or rv is None:
                return False
            if bind_id is not None and entries[uid].get("bind") != bind_id:
                return False
            del entries[uid]
            try:
                await self._write(tenant, entries, rv)
                return True
            except (Conflict, NotFound):
                continue
        return False

    async def ledgers(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Every ledger: tenant namespace -> entries."""
        got = await self.api.list(self._path(), label_selector=f"{LEDGER_LABEL}=true")
        out = {}
        for item in got.get("items", []):
            name = item["metadata"]["name"]
            if name.startswith(LEDGER_PREFIX):
                tenant = name[len(LEDGER_PREFIX) :]
                out[tenant] = _parse(item.get("data"))
                self.inv.set_ledger(
                    tenant, {u: Counter(e["flavors"]) for u, e in out[tenant].items()}
                )
        return out


def epoch(text: object) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None

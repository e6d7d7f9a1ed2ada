"""Cold migration: stop a VM on its node, release its devices there once its domain is gone,
and place and start it elsewhere (`kubectl pcipt migrate VM [--to NODE]`). Live migration
(`--live`) is controller/livemigration.py's; this module takes both kinds of request.

The request is the VM's `pcipt.io/migrate` annotation, `{"id": "...", "to": "node-b",
"live": false}` ("to" and "live" optional), so it travels through GitOps and RBAC like any
edit of the VM; status.migration answers it by ID:
1. Stopping: the controller records the request (phase Migrating); the node plugin of the old
   node removes the domain and reports DomainGone, as for a deletion.
2. Placing: only then are the devices released (with a release record: scrubbed and
   quarantined before reuse) and the VM unplaced, conditionally on the version decided from.
   The scheduler places it like a Pending VM, never on the old node, and only on the target
   when one is named.
3. Completed: written with the new placement, in the same write.
A request that cannot be taken (the VM is not placed, the target is its node or unknown) is
Failed with the reason. A crash between 2's writes leaves claims the VM does not list: the audit
releases them. The old node never sees its devices released while its domain may run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from controller.binding import Binder
from controller.evacuation import take_off_node
from controller.inventory import Inventory
from controller.ledger import ComputeLedger
from controller.livemigration import LiveMigrator
from controller.statuswriter import VmStatusWriter
from controller.vmstatus import is_deleting, unplaced_status
from pcipt import clock
from pcipt import constants as c
from pcipt.api.v1alpha1 import PassthroughVM
from pcipt.conditions import is_true, set_condition
from pcipt.events import EventRecorder

log = logging.getLogger("pcipt.controller.migration")


@dataclass(frozen=True)
class MigrationRequest:
    id: str
    to: str | None
    live: bool = False


def request_of(vm: PassthroughVM) -> MigrationRequest | str | None:
    """The VM's migration request; a string saying what is wrong with a malformed one."""
    raw = (vm.metadata.annotations or {}).get(c.ANNOTATION_MIGRATE)
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return f"the {c.ANNOTATION_MIGRATE} annotation is not JSON: {raw[:80]!r}"
    if not isinstance(data, dict) or not isinstance(data.get("id"), str) or not data["id"]:
        return f'the {c.ANNOTATION_MIGRATE} annotation needs {{"id": "...", "to": NODE}}'
    to = data.get("to")
    if to is not None and (not isinstance(to, str) or not to):
        return f"the {c.ANNOTATION_MIGRATE} annotation's 'to' must be a node name"
    live = data.get("live", False)
    if not isinstance(live, bool):
        return f"the {c.ANNOTATION_MIGRATE} annotation's 'live' must be true or false"
    return MigrationRequest(data["id"][:64], to, live)


def migration_problems(vm: PassthroughVM) -> list[str]:
    """For admission: a malformed migration request, named by its field."""
    req = request_of(vm)
    if isinstance(req, str):
        return [f"metadata.annotations[{c.ANNOTATION_MIGRATE}]: {req}"]
    return []


def _stamp() -> str:
    return clock.timestamp()


FRESH: dict[str, Any] = {
    "toNode": None,
    "live": None,
    "networks": None,
    "compute": None,
    "targetURI": None,
    "tuning": None,
    "completedAt": None,
}
"""Fields of the last migration a new request's record (a merge into status.migration) clears."""


class Migrator:
    def __init__(
        self,
        inventory: Inventory,
        binder: Binder,
        status: VmStatusWriter,
        events: EventRecorder,
        *,
        compute_ledger: ComputeLedger,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        in_flight: Callable[[], set[str]],
        reconsider: Callable[[PassthroughVM], None],
        live: LiveMigrator | None = None,
    ) -> None:
        self.inventory = inventory
        self.binder = binder
        self.status = status
        self.events = events
        self.compute_ledger = compute_ledger
        self.spawn = spawn
        self.in_flight = in_flight
        self.reconsider = reconsider
        self.live = live
        self.running: set[str] = set()

    async def check(self, vms: Iterable[PassthroughVM] | None = None) -> None:
        busy = self.in_flight()
        for vm in list(self.inventory.vms.values()) if vms is None else vms:
            uid = vm.metadata.uid or ""
            if is_deleting(vm) or uid in busy or uid in self.running:
                continue
            req = request_of(vm)
            mig = vm.status.migration
            under_way = mig is not None and mig.phase in ("Stopping", "Placing", *c.LIVE_PHASES)
            if mig is not None and mig.live and self.live is not None:
                if mig.phase == "Transferred" and vm.status.node_name == mig.from_node:
                    await self.live.complete(vm)
                    continue
                if mig.phase == "Failed" and (mig.networks or mig.compute):
                    await self.live.roll_back(vm)
                    continue
                if mig.phase in ("Preparing", "Ready"):
                    await self.live.check_waiting(vm)
            if (
                req is not None
                and not under_way
                and (
                    (isinstance(req, str) and (mig is None or mig.message != req))
                    or (isinstance(req, MigrationRequest) and (mig is None or mig.id != req.id))
                )
            ):
                await self._take(vm, req)
            elif (
                mig is not None
                and mig.phase == "Stopping"
                and vm.status.node_name == mig.from_node
                and is_true(vm.status.conditions, c.COND_DOMAIN_GONE)
            ):
                self.running.add(uid)
                self.spawn(self._move(vm))

    async def _fail(self, vm: PassthroughVM, req_id: str, why: str, live: bool = False) -> None:
        st = {
            "migration": {
                **FRESH,
                **({"live": True} if live else {}),
                "id": req_id,
                "fromNode": vm.status.node_name or "",
                "phase": "Failed",
                "startedAt": _stamp(),
                "completedAt": _stamp(),
                "message": why,
            }
        }
        if await self.status.write(vm, st) is not None:
            self.events.record(vm, "Warning", c.REASON_MIGRATION_FAILED, why)

    async def _take(self, vm: PassthroughVM, req: MigrationRequest | str) -> None:
        if isinstance(req, str):
            await self._fail(vm, "invalid", req)
            return
        node = vm.status.node_name
        if not node:
            await self._fail(vm, req.id, "the VM is not placed on a node: nothing to migrate")
            return
        if req.to == node:
            await self._fail(vm, req.id, f"the VM is on {node} already")
            return
        if req.to is not None and req.to not in self.inventory.known_nodes():
            await self._fail(
                vm, req.id, f"no node {req.to} is known (it publishes no devices and no Lease)"
            )
            return
        if req.live:
            why = (
                await self.live.start(vm, req.id, req.to)
                if self.live is not None
                else "this controller does not do live migration"
            )
            if why is not None:
                await self._fail(vm, req.id, f"cannot migrate live: {why}", live=True)
            return
        where = req.to or "another node"
        msg = f"migrating from {node} to {where}: waiting for the domain to stop on {node}"
        gen = vm.metadata.generation
        conds = set_condition(
            vm.status.conditions,
            c.COND_READY,
            False,
            c.REASON_MIGRATING,
            msg,
            generation=gen,
            now=clock.now(),
        )
        st = {
            "phase": "Migrating",
            "migration": {
                **FRESH,
                "id": req.id,
                "fromNode": node,
                **({"toNode": req.to} if req.to else {}),
                "phase": "Stopping",
                "startedAt": _stamp(),
                "message": msg,
            },
            "conditions": [x.to_dict() for x in conds],
        }
        if await self.status.write(vm, st) is not None:
            log.info(
                "migration vm=%s/%s from=%s to=%s",
                vm.metadata.namespace,
                vm.metadata.name,
                node,
                where,
            )
            self.events.record(vm, "Normal", c.REASON_MIGRATING, msg)

    async def _move(self, vm: PassthroughVM) -> None:
        uid = vm.metadata.uid or ""
        mig = vm.status.migration
        node = vm.status.node_name or ""
        try:
            assert mig is not None
            where = mig.to_node or "another node"

            def placing(held: list[str]) -> dict[str, Any]:
                msg = (
                    f"migrating from {node} to {where}: the domain is gone from {node}, "
                    f"released {len(held)} device(s), placing it again"
                )
                st = unplaced_status(vm, c.REASON_MIGRATING, msg, clock.now())
                st["migration"] = {**mig.to_dict(), "phase": "Placing", "message": msg}
                return st

            fresh, released = await take_off_node(
                vm,
                node,
                placing,
                c.REASON_MIGRATED,
                inventory=self.inventory,
                binder=self.binder,
                status=self.status,
                compute_ledger=self.compute_ledger,
            )
            if fresh is None or fresh.status.migration is None:
                return
            msg = fresh.status.migration.message
            self.events.record(vm, "Normal", c.REASON_MIGRATING, msg)
            log.info(
                "migration vm=%s/%s left=%s released=%d",
                vm.metadata.namespace,
                vm.metadata.name,
                node,
                released,
            )
            self.reconsider(fresh)
        finally:
            self.running.discard(uid)

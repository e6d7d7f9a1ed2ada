"""Publishes every device's count by node, flavor and state (pcipt.invsummary says where and
why) for `kubectl pcipt inventory` on large clusters.

Counted from the inventory the scheduler decides with, a node at a time and again only for the
nodes that changed (their version, or whether they are alive), written when the counts moved
and at most every few seconds, the index alone renewed while they stay the same. Only the
replica that acts writes; the counts are a view, never a claim, so a second writer in a
leadership handover costs nothing but a rewrite.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any, Final

from controller.inventory import Inventory
from pcipt import clock
from pcipt.invsummary import (
    INDEX,
    KEY,
    LABEL,
    NO_FLAVOR,
    Rows,
    device_state,
    encode,
    index_data,
    part_name,
)
from pcipt.kubeclient import Conflict, KubeClient, NotFound

HEARTBEAT: Final = 15.0
"""Seconds between renewals of the index while the counts stay the same (readers give up on
counts not renewed for a few of these)."""

NodeRows = dict[str, Counter[str]]


class InventorySummaryWriter:
    def __init__(self, api: KubeClient, inventory: Inventory, namespace: str) -> None:
        self.api = api
        self.inv = inventory
        self.namespace = namespace
        self._nodes: dict[str, tuple[tuple[int, bool], NodeRows]] = {}
        self._flavors: dict[str, int | None] | None = None
        self._epoch = -1
        self._written: tuple[Rows, dict[str, bool], dict[str, int | None] | None] | None = None
        self._stamp = ""
        self._parts: int | None = None
        """Parts on the server that may hold rows (None: not known yet, after a start)."""
        self._checked = 0.0

    def flavors(self) -> dict[str, int | None]:
        return {n: f.metadata.generation for n, f in sorted(self.inv.flavors.items())}

    def count(self) -> tuple[Rows, dict[str, bool]]:
        """Every device's state by (node, flavor), and whether each node is alive."""
        inv = self.inv
        flavors = self.flavors()
        if flavors != self._flavors:
            self._nodes.clear()  # what each device is a member of may have changed
            self._flavors = flavors
        for node in set(self._nodes) - set(inv.by_node):
            del self._nodes[node]
        rows: Rows = {}
        alive: dict[str, bool] = {}
        for node in inv.by_node:
            up = inv.is_alive(node)
            key = (inv.node_versions.get(node, 0), up)
            hit = self._nodes.get(node)
            if hit is None or hit[0] != key:
                hit = (key, self._node_rows(node, up))
                self._nodes[node] = hit
            alive[node] = up
            for flavor, row in hit[1].items():
                rows[(node, flavor)] = row
        return rows, alive

    def _node_rows(self, node: str, alive: bool) -> NodeRows:
        inv = self.inv
        members = [(name, inv.members.get(name, set())) for name in inv.flavors]
        out: NodeRows = {}
        for d in inv.by_node.get(node, {}).values():
            state = device_state(
                d.claim is not None,
                d.health,
                d.unschedulable,
                d.reserved_after_use,
                d.held_back,
                alive,
            )
            for flavor in [f for f, m in members if d.name in m] or [NO_FLAVOR]:
                row = out.setdefault(flavor, Counter())
                row["total"] += 1
                row[state] += 1
        return out

    async def write(self) -> None:
        """Write the counts if they moved; renew the index if it is due."""
        inv = self.inv
        now = time.monotonic()
        if self._parts is None:
            await self._learn_parts()
        flavors = self.flavors()
        moved = False
        if inv.epoch != self._epoch or flavors != self._flavors:
            epoch = inv.epoch
            rows, alive = self.count()
            written = (rows, alive, self._flavors)
            moved = written != self._written
            if moved:
                await self._write_counts(rows, alive)
                self._written = written
            self._epoch = epoch  # only once written: a failed write is tried again
        if not moved and now - self._checked >= HEARTBEAT:
            index = index_data(self._stamp, self._parts or 0, flavors, clock.now())
            await self._put(INDEX, index)
        if moved or now - self._checked >= HEARTBEAT:
            self._checked = now

    async def _write_counts(self, rows: Rows, alive: dict[str, bool]) -> None:
        flavors = self._flavors or {}
        stamp, parts = encode(rows, alive, flavors, clock.now())
        for i, data in enumerate(parts):
            await self._put(part_name(i), data)
        # The index last: a reader sees the new stamp only once every part carries it.
        await self._put(INDEX, index_data(stamp, len(parts), flavors, clock.now()))
        # Parts a larger counting needed: emptied, not deleted (the controller may only create
        # and update ConfigMaps); readers never look past the index's count.
        for i in range(len(parts), self._parts or 0):
            await self._put(part_name(i), {KEY: json.dumps({"stamp": "", "nodes": {}})})
        self._parts = len(parts)
        self._stamp = stamp

    async def _learn_parts(self) -> None:
        """After a start: how many parts an earlier writer left (the first write empties those
        it does not need)."""
        got = await self.api.list(self._path(), label_selector=f"{LABEL}=true")
        names = {(o.get("metadata") or {}).get("name", "") for o in got.get("items") or []}
        n = 0
        while part_name(n) in names:
            n += 1
        self._parts = n

    def _path(self, name: str | None = None) -> str:
        base = f"/api/v1/namespaces/{self.namespace}/configmaps"
        return base if name is None else f"{base}/{name}"

    async def _put(self, name: str, data: dict[str, str]) -> None:
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": self.namespace, "labels": {LABEL: "true"}},
            "data": data,
        }
        # Unconditional: a view, last writer wins; the answers are not read.
        try:
            await self.api.request("PUT", self._path(name), body=body, parse=False)
        except NotFound:
            try:
                await self.api.request("POST", self._path(), body=body, parse=False)
            except Conflict:
                await self.api.request("PUT", self._path(name), body=body, parse=False)

"""The inventory's incremental counts against a recount from scratch.

The scheduler's index refuses nodes from the inventory's per-node free counts alone, and quotas
read its per-namespace usage: if an event is applied wrongly, VMs stay Pending or quotas leak,
and only a full cluster test could notice. A state machine feeds random device, flavor, node,
lease, VM-claim and reservation events and, after each, compares every count with an inventory
built from the final state in one go, and checks that every free count that grew on a live
node was announced to the scheduler (take_news).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from controller.flavorstatus import FlavorCounts, compute_flavor_status
from controller.inventory import Inventory
from controller.invsummary import InventorySummaryWriter
from pcipt.api.v1alpha1 import PciDevice, PciFlavor, pcidevice_name
from pcipt.cli import kubectl_pcipt

NODES = ("n1", "n2")
ADDRESSES = ("0000:3b:00.0", "0000:3b:00.1", "0000:5e:00.0", "0000:af:00.0")
VENDORS = ("10de", "8086")
FLAVORS = {
    "gpu": {"vendorIDs": ["10de"]},
    "intel": {"vendorIDs": ["8086"]},
    "rack-a": {"nodeSelector": {"matchLabels": {"rack": "a"}}},
}
UIDS = ("vm-1", "vm-2")


def _device(node: str, address: str, rv: int, **kw: Any) -> PciDevice:
    spec: dict[str, Any] = {"nodeName": node, "address": address}
    if kw.get("claim"):
        uid = kw["claim"]
        spec["claimRef"] = {
            "namespace": f"ns-{uid}",
            "name": uid,
            "uid": uid,
            "request": "r",
            "flavor": kw.get("claim_flavor", "gpu"),
        }
    if kw.get("cordoned"):
        spec["unschedulable"] = True
    group = kw.get("group")
    return PciDevice.model_validate(
        {
            "apiVersion": "pcipt.io/v1alpha1",
            "kind": "PciDevice",
            "metadata": {"name": pcidevice_name(node, address), "resourceVersion": str(rv)},
            "spec": spec,
            "status": {
                "vendorID": kw.get("vendor", "10de"),
                "productID": "1234",
                "classCode": "030200",
                "driver": "vfio-pci",
                "numaNode": 0,
                "iommuGroup": group,
                "iommuGroupPeers": [a for a in kw.get("peers", ()) if a != address],
                "health": "Healthy" if kw.get("healthy", True) else "Unhealthy",
            },
        }
    )


def _flavor(name: str) -> PciFlavor:
    return PciFlavor.model_validate(
        {
            "apiVersion": "pcipt.io/v1alpha1",
            "kind": "PciFlavor",
            "metadata": {"name": name, "generation": 1},
            "spec": {"deviceType": "gpu", "selector": FLAVORS[name]},
        }
    )


class InventoryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.inv = Inventory(node_dead_after=40.0, clock=lambda: self.now)
        self.counts = FlavorCounts(self.inv)
        self.summary = InventorySummaryWriter(None, self.inv, "ops")  # type: ignore[arg-type]
        self.rv = 0
        # The truth, as the API server would hold it.
        self.devices: dict[str, PciDevice] = {}
        self.flavors: set[str] = set()
        self.labels: dict[str, dict[str, str]] = {}
        self.leases: dict[str, float] = {}
        self.reservations: dict[str, list[str]] = {}
        self.announced_free: dict[tuple[str, str], int] = {}
        self.inv.take_news()

    @initialize()
    def a_live_cluster_with_flavors(self) -> None:
        """Start where most events happen: every flavor defined, every node renewing."""
        for name in sorted(FLAVORS):
            self.upsert_flavor(name)
        for node in NODES:
            self.renew_lease(node)
        self.scheduler_looks()

    def _next_rv(self) -> int:
        self.rv += 1
        return self.rv

    # --- events ---------------------------------------------------------------------------

    @rule(
        node=st.sampled_from(NODES),
        address=st.sampled_from(ADDRESSES),
        vendor=st.sampled_from(VENDORS),
        claim=st.sampled_from((None, *UIDS)),
        claim_flavor=st.sampled_from(("gpu", "intel")),
        healthy=st.booleans(),
        cordoned=st.booleans(),
        grouped=st.booleans(),
    )
    def upsert_device(self, node: str, address: str, **kw: Any) -> None:
        if kw.pop("grouped"):
            kw["group"], kw["peers"] = 7, ("0000:3b:00.0", "0000:3b:00.1")
        dev = _device(node, address, self._next_rv(), **kw)
        self.devices[dev.metadata.name] = dev
        assert self.inv.upsert_device(dev)
        if kw.get("claim") in self.reservations:  # the bind's own claim ends its promise
            self.reservations[kw["claim"]] = [
                n for n in self.reservations[kw["claim"]] if n != dev.metadata.name
            ]

    @rule(node=st.sampled_from(NODES), address=st.sampled_from(ADDRESSES))
    def stale_device_event(self, node: str, address: str) -> None:
        """A watch event older than what we hold (an answer to our own write came first)."""
        name = pcidevice_name(node, address)
        if name in self.devices:
            assert not self.inv.upsert_device(_device(node, address, 0, vendor="8086"))

    @rule(node=st.sampled_from(NODES), address=st.sampled_from(ADDRESSES))
    def delete_device(self, node: str, address: str) -> None:
        name = pcidevice_name(node, address)
        self.devices.pop(name, None)
        self.inv.delete_device(name)
        for uid, names in self.reservations.items():
            self.reservations[uid] = [n for n in names if n != name]

    @rule(name=st.sampled_from(sorted(FLAVORS)))
    def upsert_flavor(self, name: str) -> None:
        self.flavors.add(name)
        self.inv.upsert_flavor(_flavor(name))

    @rule(name=st.sampled_from(sorted(FLAVORS)))
    def delete_flavor(self, name: str) -> None:
        self.flavors.discard(name)
        self.inv.delete_flavor(name)

    @rule(node=st.sampled_from(NODES), rack=st.sampled_from((None, "a", "b")))
    def label_node(self, node: str, rack: str | None) -> None:
        labels = {} if rack is None else {"rack": rack}
        self.labels[node] = labels
        self.inv.set_node_labels(node, labels)

    @rule(node=st.sampled_from(NODES))
    def renew_lease(self, node: str) -> None:
        self.leases[node] = self.now
        self.inv.renew_lease(node, self.now)

    @rule(node=st.sampled_from(NODES))
    def forget_lease(self, node: str) -> None:
        self.leases.pop(node, None)
        self.inv.forget_lease(node)

    @rule(seconds=st.sampled_from((1.0, 30.0, 60.0)))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self.inv.tick()

    @rule(uid=st.sampled_from(UIDS), picks=st.sets(st.sampled_from(ADDRESSES), max_size=2))
    def reserve(self, uid: str, picks: set[str]) -> None:
        if uid in self.reservations:
            return
        names = [pcidevice_name("n1", a) for a in sorted(picks)]
        self.inv.reserve(names, uid, usage=(f"ns-{uid}", Counter({"gpu": len(names)})))
        # Only what exists, is unclaimed and not promised already can be promised.
        taken = {n for names in self.reservations.values() for n in names}
        self.reservations[uid] = [
            n
            for n in names
            if n in self.devices and self.devices[n].spec.claim_ref is None and n not in taken
        ]

    @rule(uid=st.sampled_from(UIDS), failed=st.booleans())
    def unreserve(self, uid: str, failed: bool) -> None:
        if self.reservations.pop(uid, None) is None:
            return
        self.inv.unreserve(uid, note_growth=not failed)
        if failed:
            # Freed for a retry of the same bind: no news. Count it as announced so the growth
            # check below does not ask for it.
            self._mark_announced()

    @rule()
    def scheduler_looks(self) -> None:
        everything, grown = self.inv.take_news()
        for flavor, counts in self.inv.free.items():
            for node, now in counts.items():
                before = self.announced_free.get((flavor, node), 0)
                if now > before and self.inv.is_alive(node):
                    assert everything or flavor in grown, (
                        f"free {flavor} on {node} grew {before} -> {now} unannounced"
                    )
        self._mark_announced()

    def _mark_announced(self) -> None:
        self.announced_free = {
            (f, n): c for f, counts in self.inv.free.items() for n, c in counts.items()
        }

    # --- the recount ----------------------------------------------------------------------

    def _recount(self) -> Inventory:
        fresh = Inventory(node_dead_after=40.0, clock=lambda: self.now)
        for node, labels in self.labels.items():
            fresh.set_node_labels(node, labels)
        for name in sorted(self.flavors):
            fresh.upsert_flavor(_flavor(name))
        for dev in self.devices.values():
            fresh.upsert_device(dev)
        for node, at in self.leases.items():
            fresh.renew_lease(node, at)
        for uid, names in self.reservations.items():
            fresh.reserve(names, uid, usage=(f"ns-{uid}", Counter({"gpu": len(names)})))
        return fresh

    @invariant()
    def flavor_status_kept_per_node_equals_a_full_count(self) -> None:
        for f in FLAVORS:
            assert self.counts.status(f) == compute_flavor_status(self.inv, f), f

    @invariant()
    def the_published_counts_kept_per_node_equal_what_the_plugin_counts(self) -> None:
        """What `kubectl pcipt inventory` reads from the controller on a large cluster is what
        it counts from every device on a small one."""
        rows, alive = self.summary.count()
        ctx = kubectl_pcipt._Counting(
            flavors=[_flavor(n) for n in sorted(self.flavors)],
            alive={n: self.now - at <= 40.0 for n, at in self.leases.items()},
            labels=self.labels,
        )
        counted = kubectl_pcipt._count([d.to_dict() for d in self.devices.values()], ctx)
        assert rows == dict(counted)
        assert alive == {n: ctx.alive.get(n, False) for n, _ in counted}

    @invariant()
    def the_inverted_free_counts_mirror_the_free_counts(self) -> None:
        inv = self.inv
        mirrored = {
            (f, node): n
            for f, buckets in inv.free_nodes.items()
            for n, nodes in buckets.items()
            for node in nodes
        }
        assert mirrored == {(f, node): n for f, by in inv.free.items() for node, n in by.items()}
        assert all(nodes for buckets in inv.free_nodes.values() for nodes in buckets.values())

    @invariant()
    def counts_equal_a_recount(self) -> None:
        fresh = self._recount()
        inv = self.inv

        def nonzero(free: dict[str, dict[str, int]]) -> dict[tuple[str, str], int]:
            return {(f, n): c for f, counts in free.items() for n, c in counts.items() if c}

        assert nonzero(inv.free) == nonzero(fresh.free)
        assert {f: m for f, m in inv.members.items() if m} == {
            f: m for f, m in fresh.members.items() if m
        }
        assert +inv.usage == +fresh.usage
        assert {u: s for u, s in inv.claims_by_uid.items() if s} == dict(fresh.claims_by_uid)
        assert {ns: v for ns, v in inv.held.items() if v} == {
            ns: v for ns, v in fresh.held.items() if v
        }

        # A promise on a device someone else has since claimed is moot (it is not free either
        # way) and lasts until its bind ends; the promises that count must match.
        def promised(i: Inventory) -> dict[str, str]:
            return {n: u for n, u in i.reserved.items() if i.devices[n].claim is None}

        assert promised(inv) == promised(fresh)
        for node in NODES:
            assert inv.is_alive(node) == fresh.is_alive(node)
        # Every device is indexed on its node, once.
        assert {n: set(d) for n, d in inv.by_node.items() if d} == {
            n: set(d) for n, d in fresh.by_node.items() if d
        }


TestInventory = InventoryMachine.TestCase
TestInventory.settings = settings(max_examples=500, stateful_step_count=30, deadline=None)


def _vm(name: str, node: str | None, rv: int) -> Any:
    from pcipt.api.v1alpha1 import PassthroughVM

    return PassthroughVM.model_validate(
        {
            "apiVersion": "pcipt.io/v1alpha1",
            "kind": "PassthroughVM",
            "metadata": {"name": name, "namespace": "t", "uid": name, "resourceVersion": str(rv)},
            "spec": {"memory": "1Gi"},
            "status": {"nodeName": node} if node else {},
        }
    )


def test_take_touched_names_changed_vms_and_the_vms_of_changed_nodes_once() -> None:
    """What the periodic checks look at past a few thousand VMs: a VM that changed, every VM
    on a node whose devices or liveness changed, and nothing twice."""
    now = [0.0]
    inv = Inventory(node_dead_after=40.0, clock=lambda: now[0])
    inv.renew_lease("n1", 0.0)
    inv.renew_lease("n2", 0.0)
    for i, node in enumerate(("n1", "n1", "n2")):
        inv.upsert_vm(_vm(f"vm{i}", node, 1))
    inv.upsert_vm(_vm("pending", None, 1))
    assert {v.metadata.name for v in inv.take_touched()} == {"vm0", "vm1", "vm2", "pending"}
    assert inv.take_touched() == []
    inv.upsert_device(_device("n2", ADDRESSES[0], 5))
    assert [v.metadata.name for v in inv.take_touched()] == ["vm2"]
    inv.upsert_vm(_vm("vm0", "n1", 2))
    assert {v.metadata.name for v in inv.take_touched()} == {"vm0", "vm1"}  # n1 changed too
    now[0] = 41.0
    inv.renew_lease("n2", 41.0)
    inv.tick()  # n1 dies
    assert {v.metadata.name for v in inv.take_touched()} == {"vm0", "vm1"}


def test_a_flavor_status_lists_at_most_the_nodes_with_most_free_and_counts_them_all() -> None:
    """Past MAX_NODES nodes, status.nodes keeps the ones with the most free devices (sorted by
    name), while the totals and nodeCount still cover every node: the status no longer grows
    with the cluster."""
    from controller.flavorstatus import MAX_NODES

    now = 1000.0
    inv = Inventory(node_dead_after=40.0, clock=lambda: now)
    inv.upsert_flavor(_flavor("gpu"))
    n_nodes = MAX_NODES + 8
    rv = 0
    for i in range(n_nodes):
        node = f"node-{i:03d}"
        inv.renew_lease(node, now)
        # node i has (i % 4) of its 4 devices claimed: free 4, 3, 2, 1, 4, 3, ...
        for j, address in enumerate(ADDRESSES):
            rv += 1
            claim = "vm-1" if j < i % 4 else None
            inv.upsert_device(_device(node, address, rv, claim=claim))
    status = FlavorCounts(inv).status("gpu")
    assert status == compute_flavor_status(inv, "gpu")
    assert status["nodeCount"] == n_nodes
    assert status["total"] == 4 * n_nodes
    assert status["free"] == sum(4 - i % 4 for i in range(n_nodes))
    rows = status["nodes"]
    assert len(rows) == MAX_NODES
    assert [r["nodeName"] for r in rows] == sorted(r["nodeName"] for r in rows)
    kept_free = sorted((r["free"] for r in rows), reverse=True)
    every_free = sorted((4 - i % 4 for i in range(n_nodes)), reverse=True)
    assert kept_free == every_free[:MAX_NODES]
    # Ties at the cut go to the first names: of the ten nodes with one free, the first two.
    ones = [f"node-{i:03d}" for i in range(n_nodes) if i % 4 == 3]
    dropped = {f"node-{i:03d}" for i in range(n_nodes)} - {r["nodeName"] for r in rows}
    assert dropped == set(ones[2:])

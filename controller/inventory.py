"""The controller's in-memory view of the cluster, kept current from watch events: devices
indexed by node and flavor with per-node free counts, flavors, VMs, namespace and node labels,
node leases, and the devices promised to binds in flight.

No I/O: handlers feed it objects, the scheduling loop reads snapshots from it. Correctness of
allocation never depends on it being fresh (claims are conditional writes); freshness only
saves conflicts.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from controller.scheduling import (
    Device,
    Eligibility,
    NodeFacts,
    NodeRefusal,
    SchedulingInput,
    ScoringPolicy,
    free_counts,
    node_eligibility,
)
from pcipt.api.v1alpha1 import ComputeStatus, PassthroughVM, PciDevice, PciFlavor
from pcipt.compute import NodeCompute
from pcipt.images import ImageCatalog
from pcipt.release import HELD_QUARANTINE
from pcipt.selectors import device_selector_matches

VmKey = tuple[str, str]


def rv_int(rv: str | None) -> int:
    """resourceVersions are opaque; etcd's are increasing integers, which lets us drop a stale
    watch event that arrives after a fresher object from one of our own writes."""
    try:
        return int(rv or 0)
    except ValueError:
        return 0


def vm_key(vm: PassthroughVM) -> VmKey:
    return (vm.metadata.namespace or "", vm.metadata.name)


class _NodeDevices(Mapping[str, Sequence[Device]]):
    """by_node view for SchedulingInput without copying the index."""

    def __init__(self, index: dict[str, dict[str, Device]]) -> None:
        self._index = index

    def __getitem__(self, node: str) -> Sequence[Device]:
        return list(self._index[node].values())

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


class _NodeCompute(Mapping[str, Sequence[ComputeStatus]]):
    """compute_taken view for SchedulingInput: computed for the nodes the search visits."""

    def __init__(self, inv: Inventory, exclude_uid: str) -> None:
        self._inv = inv
        self._uid = exclude_uid

    def __getitem__(self, node: str) -> Sequence[ComputeStatus]:
        return self._inv.compute_taken(node, self._uid)

    def __iter__(self) -> Iterator[str]:
        return iter(self._inv.compute)

    def __len__(self) -> int:
        return len(self._inv.compute)


@dataclass
class Inventory:
    node_dead_after: float = 40.0
    clock: Callable[[], float] = time.time

    devices: dict[str, Device] = field(default_factory=dict)
    by_node: dict[str, dict[str, Device]] = field(default_factory=lambda: defaultdict(dict))
    flavors: dict[str, PciFlavor] = field(default_factory=dict)
    members: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    free: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))
    free_nodes: dict[str, dict[int, SortedBucket]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    """flavor -> free count -> the nodes with it: `free` inverted, so a decision starts from
    the nodes with the count it prefers instead of looking at every node."""
    vms: dict[VmKey, PassthroughVM] = field(default_factory=dict)
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)
    node_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    leases: dict[str, float] = field(default_factory=dict)
    claims_by_uid: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    usage: Counter[tuple[str, str]] = field(default_factory=Counter)
    reserved: dict[str, str] = field(default_factory=dict)
    """device name -> uid of the VM whose bind is in flight"""
    held: dict[str, dict[str, Counter[str]]] = field(default_factory=lambda: defaultdict(dict))
    """namespace -> VM uid -> devices it has claimed, by flavor (companions not counted)"""
    in_flight: dict[str, tuple[str, Counter[str]]] = field(default_factory=dict)
    """VM uid -> (namespace, devices by flavor) of a bind in flight in this process"""
    node_versions: dict[str, int] = field(default_factory=dict)
    touched_vms: set[VmKey] = field(default_factory=set)
    touched_nodes: set[str] = field(default_factory=set)
    """What changed since the periodic checks last looked (take_touched)."""
    epoch: int = 0
    nodes_epoch: int = 0
    """Bumped when the set of nodes or any node's facts change (FactsView, eligibility)."""
    _known: tuple[int, list[str]] = (-1, [])
    _eligible: dict[tuple[tuple[str, str], ...], tuple[int, Eligibility]] = field(
        default_factory=dict
    )
    """Bumped with every node's version and every liveness change: counts computed from the
    inventory at one epoch are the same until the next."""
    """node -> a number bumped by every change its scheduling answer may depend on"""
    refusal_memo: dict[tuple[object, ...], NodeRefusal] = field(default_factory=dict)
    """Refused nodes' reasons by (node, its version, the VM's requests); emptied whenever
    something every node depends on changes (flavors, namespaces, node facts)."""
    compute: dict[str, NodeCompute] = field(default_factory=dict)
    """node -> its CPUs and memory, from its Lease"""
    vms_on: dict[str, dict[str, VmKey]] = field(default_factory=lambda: defaultdict(dict))
    """node -> VM uid -> key, for every VM placed there"""
    in_flight_compute: dict[str, tuple[str, ComputeStatus]] = field(default_factory=dict)
    """VM uid -> (node, CPUs and memory) of a bind in flight in this process"""
    compute_ledgers: dict[str, dict[str, ComputeStatus]] = field(default_factory=dict)
    """node -> VM uid -> its take, as the node's compute ledger last read said"""

    ledgers: dict[str, dict[str, Counter[str]]] = field(default_factory=dict)
    """namespace -> VM uid -> devices by flavor, as the quota ledger last read said"""
    grown: set[str] = field(default_factory=set)
    """flavors whose free capacity may have grown since the scheduler last looked: VMs waiting
    on them are tried again"""
    changed: bool = False
    """something every VM-level decision depends on changed (flavors, namespaces, nodes)"""
    out_of_service: dict[str, str] = field(default_factory=dict)
    """node -> its out-of-service taint, as key=value:effect"""
    scrubbing_nodes: set[str] = field(default_factory=set)
    images: ImageCatalog | None = None
    """The admins' image catalog, merged from its ConfigMaps (controller/imagecatalog.py)."""
    migration_uris: dict[str, str] = field(default_factory=dict)
    """Node -> the libvirt URI its plugin receives live migrations at (its Lease says)."""
    """nodes whose plugin scrubs released devices (their Lease says so)"""
    quarantined: dict[str, float] = field(default_factory=dict)
    """device name -> when its quarantine after release ends, for those held back by one"""
    _alive: dict[str, bool] = field(default_factory=dict)
    _facts: dict[str, NodeFacts] = field(default_factory=dict)

    # --- devices --------------------------------------------------------------------------

    def upsert_device(self, dev: PciDevice) -> bool:
        """Apply a device from a watch event or a write response; False if it was stale."""
        name = dev.metadata.name
        old = self.devices.get(name)
        if old is not None and rv_int(dev.metadata.resource_version) < rv_int(old.resource_version):
            return False
        new = Device.from_model(dev, self.clock())
        if new.held_back == HELD_QUARANTINE and new.quarantine_until is not None:
            self.quarantined[name] = new.quarantine_until
        else:
            self.quarantined.pop(name, None)
        if old is not None and old.node != new.node:
            self.by_node[old.node].pop(name, None)
            self._refresh_node(old.node)
        self._account_claim(old, -1)
        self.devices[name] = new
        if new.node not in self.by_node:
            self.nodes_epoch += 1
        self.by_node[new.node][name] = new
        self._account_claim(new, +1)
        if new.claim is not None and self.reserved.get(name) == new.claim.uid:
            del self.reserved[name]
        self._refresh_membership(new)
        self._refresh_node(new.node)
        return True

    def delete_device(self, name: str) -> None:
        old = self.devices.pop(name, None)
        if old is None:
            return
        self._account_claim(old, -1)
        self.by_node[old.node].pop(name, None)
        for members in self.members.values():
            members.discard(name)
        self.reserved.pop(name, None)
        self.quarantined.pop(name, None)
        self._refresh_node(old.node)

    def _account_claim(self, d: Device | None, sign: int) -> None:
        if d is None or d.claim is None:
            return
        if sign > 0:
            self.claims_by_uid[d.claim.uid].add(d.name)
        else:
            held = self.claims_by_uid.get(d.claim.uid)
            if held is not None:
                held.discard(d.name)
                if not held:
                    del self.claims_by_uid[d.claim.uid]
        if d.claim.flavor and not d.claim.companion:
            self.usage[(d.claim.namespace, d.claim.flavor)] += sign
            by_uid = self.held[d.claim.namespace]
            counts = by_uid.setdefault(d.claim.uid, Counter())
            counts[d.claim.flavor] += sign
            if counts[d.claim.flavor] <= 0:
                del counts[d.claim.flavor]
            if not counts:
                del by_uid[d.claim.uid]

    def _labels(self, node: str) -> dict[str, str]:
        return self.facts(node).effective_labels()

    def _refresh_membership(self, d: Device) -> None:
        labels = self._labels(d.node)
        for fname, f in self.flavors.items():
            if device_selector_matches(f.spec.selector, d.facts, labels):
                self.members[fname].add(d.name)
            else:
                self.members[fname].discard(d.name)

    def _bump(self, node: str) -> None:
        self.node_versions[node] = self.node_versions.get(node, 0) + 1
        self.epoch += 1
        self.touched_nodes.add(node)

    def take_touched(self) -> list[PassthroughVM]:
        """The VMs that changed, or whose node did, since the last call."""
        keys = set(self.touched_vms)
        for node in self.touched_nodes:
            keys.update(self.vms_on.get(node, {}).values())
        self.touched_vms.clear()
        self.touched_nodes.clear()
        return [vm for k in keys if (vm := self.vms.get(k)) is not None]

    def _refresh_node(self, node: str, note_growth: bool = True) -> None:
        """Recompute a node's free counts; note every flavor whose count grew (unless told
        not to: a bind that failed will try the same devices again)."""
        self._bump(node)
        devs = self.by_node.get(node, {})
        if not devs:
            if self.by_node.pop(node, None) is not None:
                self.nodes_epoch += 1
            for fname, counts in self.free.items():
                if (gone := counts.pop(node, None)) is not None:
                    self._file(fname, node, gone, None)
            return
        reserved = {n for n in devs if n in self.reserved}
        counts = free_counts(devs.values(), self.flavors, self._labels(node), reserved)
        for fname, n in counts.items():
            before = self.free[fname].get(node)
            self.free[fname][node] = n
            if before != n:
                self._file(fname, node, before, n)
            if n > (before or 0) and note_growth and self.is_alive(node):
                self.grown.add(fname)

    def _file(self, flavor: str, node: str, before: int | None, now: int | None) -> None:
        """Keep free_nodes (count -> nodes) in step with free (node -> count)."""
        buckets = self.free_nodes[flavor]
        if before is not None and (b := buckets.get(before)) is not None:
            b.discard(node)
            if not b:
                del buckets[before]
        if now is not None:
            buckets.setdefault(now, SortedBucket()).add(node)

    # --- reservations for binds in flight ------------------------------------------------

    def reserve(
        self,
        names: Sequence[str],
        uid: str,
        usage: tuple[str, Mapping[str, int]] | None = None,
        compute: tuple[str, ComputeStatus] | None = None,
    ) -> None:
        """Promise devices to a bind in flight (never one promised to another bind, nor a
        claimed one); `usage` (namespace, devices by flavor) counts toward the namespace's
        quota until the bind ends, so the next decision sees it."""
        if usage is not None:
            self.in_flight[uid] = (usage[0], Counter(usage[1]))
        if compute is not None:
            self.in_flight_compute[uid] = compute
        nodes = set()
        for n in names:
            d = self.devices.get(n)
            if d is not None and d.claim is None and self.reserved.setdefault(n, uid) == uid:
                nodes.add(d.node)
        for node in nodes:
            self._refresh_node(node)

    def unreserve(self, uid: str, note_growth: bool = True) -> None:
        """End a bind's promise. After a failed bind (note_growth False) the devices are free
        again but the same VM retries for them: waiting VMs are not woken for them."""
        self.in_flight.pop(uid, None)
        self.in_flight_compute.pop(uid, None)
        names = [n for n, u in self.reserved.items() if u == uid]
        nodes = {self.devices[n].node for n in names if n in self.devices}
        for n in names:
            del self.reserved[n]
        for node in nodes:
            self._refresh_node(node, note_growth)

    # --- flavors, VMs, namespaces, nodes, leases -----------------------------------------

    def upsert_flavor(self, flavor: PciFlavor) -> None:
        """A flavor's spec or metadata changed (the runtime drops status-only events first,
        see same_flavor): re-index every device."""
        self.flavors[flavor.metadata.name] = flavor
        self._reindex_all()

    def same_flavor(self, body: dict[str, Any]) -> bool:
        """Whether a flavor's object differs from the one held only in its status (its
        counts, rewritten as they move: thousands of rows on a big cluster)."""
        meta = body.get("metadata") or {}
        held = self.flavors.get(meta.get("name", ""))
        return (
            held is not None
            and held.metadata.generation is not None
            and held.metadata.generation == meta.get("generation")
            and held.metadata.labels == (meta.get("labels") or {})
            and held.metadata.annotations == (meta.get("annotations") or {})
            and held.metadata.deletion_timestamp is None
            and not meta.get("deletionTimestamp")
        )

    def holds_device(self, body: dict[str, Any]) -> bool:
        """Whether the inventory already has this very version of a device (a watch event
        answering our own write, applied from the write's response)."""
        meta = body.get("metadata") or {}
        d = self.devices.get(meta.get("name", ""))
        return d is not None and d.resource_version == meta.get("resourceVersion")

    def held_vm(self, body: dict[str, Any]) -> PassthroughVM | None:
        """The VM as held when it is this very version of it, else None."""
        meta = body.get("metadata") or {}
        vm = self.vms.get((meta.get("namespace", ""), meta.get("name", "")))
        if vm is not None and vm.metadata.resource_version == meta.get("resourceVersion"):
            return vm
        return None

    def delete_flavor(self, name: str) -> None:
        self.flavors.pop(name, None)
        self.members.pop(name, None)
        self.free.pop(name, None)
        self.free_nodes.pop(name, None)
        self.changed = True
        self.epoch += 1

    def _reindex_all(self) -> None:
        self.members.clear()
        for d in self.devices.values():
            self._refresh_membership(d)
        for node in list(self.by_node):
            self._refresh_node(node)
        for fname in self.flavors:
            self.grown.add(fname)
        self.changed = True

    def upsert_vm(self, vm: PassthroughVM) -> bool:
        key = vm_key(vm)
        old = self.vms.get(key)
        if (
            old is not None
            and old.metadata.uid == vm.metadata.uid
            and rv_int(vm.metadata.resource_version) < rv_int(old.metadata.resource_version)
        ):
            return False
        self._place(old, None)
        self.vms[key] = vm
        self._place(vm, key)
        self.touched_vms.add(key)
        if old is not None and _gave_back_compute(old, vm):
            self.changed = True  # what a waiting VM needs may be free now: try them all
        return True

    def delete_vm(self, key: VmKey) -> None:
        old = self.vms.pop(key, None)
        self._place(old, None)
        if old is not None and old.status.compute is not None and old.status.node_name:
            self.changed = True

    def _place(self, vm: PassthroughVM | None, key: VmKey | None) -> None:
        """Index the VM by the node it is placed on (key None: take it out)."""
        if vm is None or not vm.status.node_name:
            return
        on = self.vms_on[vm.status.node_name]
        self._bump(vm.status.node_name)
        if key is None:
            on.pop(vm.metadata.uid or "", None)
        else:
            on[vm.metadata.uid or ""] = key

    def set_compute(self, node: str, compute: NodeCompute | None) -> None:
        if compute is None:
            if self.compute.pop(node, None) is not None:
                self._forget_facts(node)
            return
        if self.compute.get(node) != compute:
            self.compute[node] = compute
            self._forget_facts(node)
            self._bump(node)
            self.changed = True

    def compute_taken(self, node: str, exclude_uid: str = "") -> list[ComputeStatus]:
        """What the VMs placed on a node, and binds in flight to it, have taken of its CPUs
        and memory."""
        out = []
        for uid, key in self.vms_on.get(node, {}).items():
            vm = self.vms.get(key)
            if uid != exclude_uid and vm is not None and vm.status.compute is not None:
                out.append(vm.status.compute)
        seen = set(self.vms_on.get(node, {}))
        for uid, (n, c) in self.in_flight_compute.items():
            if n == node and uid != exclude_uid and uid not in seen:
                out.append(c)
                seen.add(uid)
        for uid, c in self.compute_ledgers.get(node, {}).items():
            if uid != exclude_uid and uid not in seen:
                out.append(c)  # another controller's bind in flight (or a VM not seen yet)
        return out

    def set_compute_ledger(self, node: str, entries: Mapping[str, ComputeStatus]) -> None:
        if self.compute_ledgers.get(node) != entries:
            self.compute_ledgers[node] = dict(entries)
            self._bump(node)

    def set_namespace(self, name: str, labels: Mapping[str, str] | None) -> None:
        if labels is None:
            self.namespaces.pop(name, None)
        else:
            self.namespaces[name] = dict(labels)
        self.changed = True
        for fname in self.flavors:  # access may have opened up
            self.grown.add(fname)

    def set_node_labels(self, node: str, labels: Mapping[str, str] | None) -> None:
        if labels is None:
            self.node_labels.pop(node, None)
        else:
            self.node_labels[node] = dict(labels)
        self._forget_facts(node)
        for d in self.by_node.get(node, {}).values():
            self._refresh_membership(d)
        self._refresh_node(node)
        self.changed = True

    def set_out_of_service(self, node: str, taint: str | None) -> None:
        """The node's out-of-service taint (None: it has none)."""
        if self.out_of_service.get(node) == taint:
            return
        if taint is None:
            self.out_of_service.pop(node, None)
        else:
            self.out_of_service[node] = taint
        self._forget_facts(node)
        self._bump(node)
        self.changed = True
        if taint is None:
            for fname, counts in self.free.items():
                if counts.get(node):
                    self.grown.add(fname)

    def renew_lease(self, node: str, renewed_at: float) -> None:
        """A node's Lease renewed: that node alone is looked at again (thousands of nodes renew
        every few seconds; the tick looks at all of them once a second)."""
        if node not in self.leases:
            self.nodes_epoch += 1
        self.leases[node] = max(renewed_at, self.leases.get(node, 0.0))
        self._check_alive(node)

    def forget_lease(self, node: str) -> None:
        """The node's Lease was deleted: it is not alive, and not known unless it has devices."""
        if self.leases.pop(node, None) is not None:
            self.nodes_epoch += 1
        self._check_alive(node)

    def is_alive(self, node: str) -> bool:
        renewed = self.leases.get(node)
        return renewed is not None and self.clock() - renewed <= self.node_dead_after

    def tick(self) -> list[tuple[str, bool]]:
        """Re-evaluate node liveness and end quarantines that are over; return the nodes whose
        liveness changed."""
        now = self.clock()
        for name, until in list(self.quarantined.items()):
            d = self.devices.get(name)
            if d is None or until > now:
                continue
            del self.quarantined[name]
            d = replace(d, held_back=None)
            self.devices[name] = d
            self.by_node[d.node][name] = d
            self._refresh_node(d.node)
        changed = [
            (node, alive)
            for node in set(self.leases) | set(self.by_node)
            if (alive := self._check_alive(node)) is not None
        ]
        return changed

    def _check_alive(self, node: str) -> bool | None:
        """Note whether the node is alive now; its new state when that changed, else None."""
        alive = self.is_alive(node)
        if self._alive.get(node) == alive:
            return None
        self._alive[node] = alive
        self._forget_facts(node)
        self.touched_nodes.add(node)
        if alive:
            for fname, counts in self.free.items():
                if counts.get(node):
                    self.grown.add(fname)
        self.changed = True
        self.epoch += 1
        return alive

    def _forget_facts(self, node: str) -> None:
        self._facts.pop(node, None)
        self.nodes_epoch += 1

    def facts(self, node: str) -> NodeFacts:
        f = self._facts.get(node)
        if f is None:
            f = NodeFacts(
                node,
                dict(self.node_labels.get(node, {})),
                self.is_alive(node),
                self.compute.get(node),
                node in self.out_of_service,
            )
            self._facts[node] = f
        return f

    def known_nodes(self) -> list[str]:
        """Nodes with devices or a Lease, sorted (kept until the set changes)."""
        if self._known[0] != self.nodes_epoch:
            self._known = (self.nodes_epoch, sorted(set(self.by_node) | set(self.leases)))
        return self._known[1]

    def eligibility(self, selector: Mapping[str, str]) -> Eligibility:
        """Which nodes a VM with this nodeSelector may use, as the scheduler decides it, kept
        until a node's facts (liveness, labels, taint, compute) or the set of nodes change:
        a decision then costs nothing per node that the free counts rule out."""
        key = tuple(sorted(selector.items()))
        hit = self._eligible.get(key)
        if hit is not None and hit[0] == self.nodes_epoch:
            return hit[1]
        got = node_eligibility(FactsView(self), self.known_nodes(), selector)
        if len(self._eligible) > 256:
            self._eligible.clear()
        self._eligible[key] = (self.nodes_epoch, got)
        return got

    def take_news(self) -> tuple[bool, set[str]]:
        """What changed since the scheduler last asked: (everything, the flavors whose free
        capacity grew). Asking clears both; when everything changed, the refusal memo too."""
        everything, grown = self.changed, set(self.grown)
        self.changed = False
        self.grown.clear()
        if everything:
            self.refusal_memo.clear()
        return everything, grown

    def _memo(self) -> dict[tuple[object, ...], NodeRefusal]:
        """The refusal memo, emptied whenever `changed` is taken (take_news)."""
        if self.changed or len(self.refusal_memo) > 20000:
            self.refusal_memo.clear()
        return self.refusal_memo

    # --- quotas ---------------------------------------------------------------------------

    def set_ledger(self, namespace: str, entries: Mapping[str, Counter[str]]) -> None:
        self.ledgers[namespace] = dict(entries)

    def namespace_usage(
        self, namespace: str, *, exclude_uid: str = "", in_flight: bool = True
    ) -> Counter[str]:
        """Devices the namespace's VMs hold, by flavor: per VM the most of what it has
        claimed, what its ledger entry says, and (with `in_flight`) what a bind of it in
        flight in this process takes; `exclude_uid`'s own left out."""
        uids = set(self.held.get(namespace, ())) | set(self.ledgers.get(namespace, ()))
        if in_flight:
            uids |= {u for u, (ns, _) in self.in_flight.items() if ns == namespace}
        uids.discard(exclude_uid)
        out: Counter[str] = Counter()
        empty: Counter[str] = Counter()
        for uid in uids:
            sources = [
                self.held.get(namespace, {}).get(uid, empty),
                self.ledgers.get(namespace, {}).get(uid, empty),
            ]
            if in_flight and uid in self.in_flight:
                sources.append(self.in_flight[uid][1])
            for flavor in set().union(*sources):
                out[flavor] += max(s.get(flavor, 0) for s in sources)
        return out

    # --- scheduling snapshots --------------------------------------------------------------

    def scheduling_input(
        self, vm: PassthroughVM, policy: ScoringPolicy, cpu_allocation_ratio: float = 1.0
    ) -> SchedulingInput:
        uid = vm.metadata.uid or ""
        ns = vm.metadata.namespace or ""
        own = self.claims_by_uid.get(uid, set())
        # Only flavors with a namespace limit need the namespace's usage; a limited namespace
        # holds few VMs, so counting them per decision stays cheap.
        limited = {
            f
            for f in {o.flavor for r in vm.spec.devices for o in r.options()}
            | {r.flavor for r in vm.spec.networks}
            if (fl := self.flavors.get(f)) is not None
            and fl.spec.limits is not None
            and fl.spec.limits.max_per_namespace is not None
        }
        held = self.namespace_usage(ns, exclude_uid=uid) if limited else Counter()
        usage = {f: held.get(f, 0) for f in limited}
        return SchedulingInput(
            vm=vm,
            flavors=self.flavors,
            nodes=FactsView(self),
            eligibility=self.eligibility,
            namespace_labels=self.namespaces.get(ns, {}),
            namespace_usage=usage,
            reserved=frozenset(n for n, u in self.reserved.items() if u != uid),
            policy=policy,
            by_node=_NodeDevices(self.by_node),
            compute_taken=_NodeCompute(self, uid),
            cpu_allocation_ratio=cpu_allocation_ratio,
            node_versions=self.node_versions,
            refusal_memo=self._memo(),
            images=self.images,
            # The free counts describe a VM holding nothing; one that holds claims already
            # (an interrupted bind) gets the full search, which counts its own devices as free.
            free=self.free if not own else None,
            free_nodes=self.free_nodes if not own else None,
        )

    def claimed_by(self, uid: str) -> list[Device]:
        return sorted(
            (self.devices[n] for n in self.claims_by_uid.get(uid, ()) if n in self.devices),
            key=lambda d: d.name,
        )

    def snapshot_counts(self) -> dict[str, Any]:
        """For logs and the kubectl plugin: devices, claims, reservations."""
        return {
            "devices": len(self.devices),
            "claimed": sum(len(v) for v in self.claims_by_uid.values()),
            "reserved": len(self.reserved),
            "flavors": len(self.flavors),
            "vms": len(self.vms),
            "nodes": len(self.known_nodes()),
        }


def _gave_back_compute(old: PassthroughVM, new: PassthroughVM) -> bool:
    """The VM held CPUs and memory on a node and holds other ones (or none) now."""
    if old.status.compute is None or not old.status.node_name:
        return False
    return (
        old.metadata.uid != new.metadata.uid
        or new.status.node_name != old.status.node_name
        or new.status.compute != old.status.compute
    )


class FactsView(Mapping[str, NodeFacts]):
    """The known nodes' facts, computed when asked (a decision asks for few of thousands)."""

    def __init__(self, inv: Inventory) -> None:
        self.inv = inv
        self.names = inv.known_nodes()

    def __getitem__(self, node: str) -> NodeFacts:
        if node not in self.inv.by_node and node not in self.inv.leases:
            raise KeyError(node)
        return self.inv.facts(node)

    def __contains__(self, node: object) -> bool:
        return node in self.inv.by_node or node in self.inv.leases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class SortedBucket:
    """Nodes with one free count: a set that iterates in name order, sorted again only after
    it changed (a node moves between buckets once per bind; a decision reads the first few)."""

    __slots__ = ("_nodes", "_sorted")

    def __init__(self) -> None:
        self._nodes: set[str] = set()
        self._sorted: list[str] | None = None

    def add(self, node: str) -> None:
        self._nodes.add(node)
        self._sorted = None

    def discard(self, node: str) -> None:
        self._nodes.discard(node)
        self._sorted = None

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node: object) -> bool:
        return node in self._nodes

    def __iter__(self) -> Iterator[str]:
        if self._sorted is None:
            self._sorted = sorted(self._nodes)
        return iter(self._sorted)

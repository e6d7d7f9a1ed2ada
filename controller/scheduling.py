"""The scheduler: a VM's requests + flavors + an inventory snapshot + node facts -> a placement
(a node and the exact PciDevice for every request and network) or a refusal with reasons.

PURE and deterministic: no I/O, no kopf, no client, no clock. The controller feeds it a
snapshot and acts on the answer; `pcipt-controller plan` feeds it manifests from files.

Policy, in the order it is applied:
1. VM-level checks that need no node: the flavor exists and suits the request (a network needs
   a nic flavor), the namespace may use it, per-VM and per-namespace limits, and what a network
   asks of its VF (trust, spoof check off, VLAN) is allowed by the flavor.
2. Per node: alive, matches the VM's nodeSelector, then devices are assigned request by request
   (see `_place_on_node`). A device qualifies when it matches the flavor's selector and the
   request's extra selector and pin, is Healthy, not cordoned, not claimed by another VM, and
   its whole IOMMU group can come along (every other endpoint in the group is published,
   healthy, not cordoned and not claimed by another VM). The group's other members are claimed
   for the VM too, as companions.
3. Among feasible nodes the best score wins, ties broken by node name:
   best-fit (default): fewest optional requests skipped, then most devices the VM already
   holds (claims of an interrupted bind are reused), then fewest NUMA-preferred requests that
   could not be kept on one NUMA node, then fewest free devices of the requested flavors left
   stranded on the node; spread: the same, but most free devices left.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence, Set
from dataclasses import dataclass, field, replace
from typing import Literal

from controller.computefit import Demand, NodeUse, fit
from pcipt import constants as c
from pcipt.api.v1alpha1 import (
    ComputeStatus,
    DeviceRequest,
    DeviceSelector,
    NetworkRequest,
    PassthroughVM,
    PciDevice,
    PciFlavor,
    parse_vlan_range,
)
from pcipt.compute import NodeCompute
from pcipt.images import ImageCatalog, image_problem
from pcipt.release import HELD_QUARANTINE, HELD_SCRUB_FAILED, HELD_SCRUBBING, held_back
from pcipt.selectors import (
    DeviceFacts,
    describe_label_selector,
    device_selector_matches,
    label_selector_matches,
    physical_network,
)

ScoringPolicy = Literal["best-fit", "spread"]
MAX_NODES_IN_STATUS = 20
HOSTNAME_LABEL = "kubernetes.io/hostname"

# --- inputs ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claim:
    uid: str
    namespace: str
    name: str
    request: str
    flavor: str | None = None
    companion: bool = False
    bind_id: str | None = None
    claimed_at: float | None = None
    """epoch seconds; the audit gives claims a grace period from here"""


@dataclass(frozen=True, slots=True)
class Device:
    """A published PciDevice as the scheduler sees it."""

    name: str
    node: str
    facts: DeviceFacts
    numa: int = -1
    iommu_group: int | None = None
    peers: tuple[str, ...] = ()
    netdev: str | None = None
    healthy: bool = True
    unschedulable: bool = False
    claim: Claim | None = None
    resource_version: str = ""
    phys_fn: str | None = None
    """For a VF: its PF's address."""
    reserved_after_use: bool = False
    """A one-time-use device a VM has had, not yet freed by an admin."""
    health: str = "Healthy"
    """Healthy, Unhealthy or Missing, as the node plugin publishes it."""
    health_reason: str = ""
    """The reason of its Healthy condition, when it is not healthy."""
    held_back: str | None = None
    """Why a released device is not offered yet: being scrubbed, its scrub failed, or in
    quarantine (see spec.release); None when it may be."""
    quarantine_until: float | None = None
    """When a quarantine after release ends (epoch seconds)."""
    pcie_root: str | None = None
    """The PCI root complex it sits under (status.pcieRoot); None when not published."""

    @property
    def address(self) -> str:
        return self.facts.address

    @classmethod
    def from_model(cls, dev: PciDevice, now: float | None = None) -> Device:
        """`now`: the time a quarantine is judged at (default: the clock)."""
        st, spec = dev.status, dev.spec
        claim = None
        if spec.claim_ref is not None:
            cr = spec.claim_ref
            claim = Claim(
                cr.uid,
                cr.namespace,
                cr.name,
                cr.request,
                cr.flavor,
                cr.companion,
                cr.bind_id,
                cr.claimed_at.timestamp() if cr.claimed_at else None,
            )
        return cls(
            name=dev.metadata.name,
            node=spec.node_name,
            facts=DeviceFacts.of(dev),
            numa=st.numa_node,
            iommu_group=st.iommu_group,
            peers=tuple(sorted(st.iommu_group_peers)),
            netdev=st.netdev,
            healthy=st.health == "Healthy",
            unschedulable=spec.unschedulable,
            claim=claim,
            resource_version=dev.metadata.resource_version or "",
            phys_fn=st.sriov.phys_fn if st.sriov else None,
            reserved_after_use=spec.reserved is not None,
            health=st.health,
            health_reason=_health_reason(dev),
            held_back=held_back(dev, time.time() if now is None else now),
            quarantine_until=(
                spec.release.quarantine_until.timestamp()
                if spec.release is not None and spec.release.quarantine_until is not None
                else None
            ),
            pcie_root=st.pcie_root,
        )


def _health_reason(dev: PciDevice) -> str:
    if dev.status.health == "Healthy":
        return ""
    cond = next((x for x in dev.status.conditions if x.type == "Healthy"), None)
    return f"{cond.reason}: {cond.message}" if cond is not None else dev.status.health


@dataclass(frozen=True, slots=True)
class NodeFacts:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    alive: bool = True
    compute: NodeCompute | None = None
    """The host's CPUs and memory as its node plugin publishes them; None: not counted."""
    out_of_service: bool = False
    """The Node carries the node.kubernetes.io/out-of-service taint: nothing is placed there."""

    def effective_labels(self) -> dict[str, str]:
        """Node labels plus the hostname label, which every node has even without a Node object."""
        return {HOSTNAME_LABEL: self.name, **self.labels}


@dataclass(frozen=True)
class SchedulingInput:
    vm: PassthroughVM
    flavors: Mapping[str, PciFlavor]
    devices: Sequence[Device] = ()
    """Candidate devices: those of the requested flavors, plus any device an IOMMU group peer
    lookup may need. Devices on other nodes or of other flavors may be included; they are
    filtered out. Ignored when `by_node` is given."""
    nodes: Mapping[str, NodeFacts] = field(default_factory=dict)
    """Known nodes. A node that has devices but no entry is alive with only its hostname label."""
    namespace_labels: Mapping[str, str] = field(default_factory=dict)
    namespace_usage: Mapping[str, int] = field(default_factory=dict)
    """Devices of each flavor the VM's namespace holds already, this VM's own claims excluded."""
    reserved: frozenset[str] | Set[str] = frozenset()
    """Devices promised to other VMs whose claims are in flight: treated as claimed."""
    policy: ScoringPolicy = "best-fit"
    by_node: Mapping[str, Sequence[Device]] | None = None
    """Indexed form of `devices` (the controller keeps it): every device, by node."""
    compute_taken: Mapping[str, Sequence[ComputeStatus]] = field(default_factory=dict)
    """node -> what the VMs on it (and binds in flight to it) have taken of its CPUs and
    memory, this VM's own left out."""
    cpu_allocation_ratio: float = 1.0
    """Shared vCPUs per host CPU (Nova's cpu_allocation_ratio)."""
    node_versions: Mapping[str, int] | None = None
    """A number per node that changes whenever anything the node's answer depends on does
    (its devices, claims, promises, placed VMs, compute topology); with `refusal_memo`, a
    refused node's reasons are reused while its number stays."""
    refusal_memo: MutableMapping[tuple[object, ...], NodeRefusal] | None = None
    free: Mapping[str, Mapping[str, int]] | None = None
    """flavor -> node -> `free_counts` of the node, as an index keeps them current. With it the
    search visits nodes in order of the best score they could reach and stops when no node
    left can beat the best found, so a decision costs what the candidates cost, not the
    cluster. Only valid when the VM holds no device yet (it is ignored otherwise)."""
    images: ImageCatalog | None = None
    """What the admins' image catalog says images support (pcipt.images); None: no catalog."""
    free_nodes: Mapping[str, Mapping[int, Iterable[str]]] | None = None
    """`free` inverted (flavor -> count -> nodes, each iterating in name order), kept with it:
    a one-flavor decision then visits the nodes with the count it prefers first, without
    looking at the others."""
    eligibility: Callable[[Mapping[str, str]], Eligibility] | None = None
    """nodeSelector -> `node_eligibility` over every known node, as an index keeps it (the
    controller's, until a node's facts change). None: computed from `nodes` per decision."""


Eligibility = tuple[list[str], list[str], dict[str, "NodeRefusal"], frozenset[str]]
"""(every node name sorted, the eligible ones, why each other one is not, the eligible ones
as a set)."""


def node_eligibility(
    nodes: Mapping[str, NodeFacts], names: Sequence[str], selector: Mapping[str, str]
) -> Eligibility:
    """Which nodes a VM may use whatever their devices: alive, in service, matching its
    nodeSelector. (A cold migration's exclusions are the VM's own: see schedule.)"""
    refusals: dict[str, NodeRefusal] = {}
    eligible: list[str] = []
    for name in names:
        facts = nodes.get(name) or NodeFacts(name)
        if not facts.alive:
            refusals[name] = NodeRefusal(name, ("not alive",))
        elif facts.out_of_service:
            refusals[name] = NodeRefusal(name, ("out of service",))
        elif selector and any(facts.effective_labels().get(k) != v for k, v in selector.items()):
            refusals[name] = NodeRefusal(name, ("didn't match the VM's nodeSelector",))
        else:
            eligible.append(name)
    return list(names), eligible, refusals, frozenset(eligible)


def free_counts(
    node_devices: Iterable[Device],
    flavors: Mapping[str, PciFlavor],
    node_labels: Mapping[str, str],
    reserved: frozenset[str] | Set[str] = frozenset(),
) -> dict[str, int]:
    """Per flavor, the devices on one node a VM holding nothing there could be given: matching,
    healthy, not cordoned, unclaimed, not reserved, and with their whole IOMMU group free."""
    devs = list(node_devices)
    view = _NodeView("", dict(node_labels), {d.address: d for d in devs}, "", reserved)
    usable = [d for d in devs if view.usable(d) and not view.blocked_by_group(d)]
    return {
        name: sum(
            1 for d in usable if device_selector_matches(f.spec.selector, d.facts, node_labels)
        )
        for name, f in flavors.items()
    }


# --- outputs --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Assignment:
    request: str
    device: str
    address: str
    numa: int
    companion: bool = False
    network: bool = False
    flavor: str | None = None
    netdev: str | None = None
    max_tx_rate: int | None = None
    """For a network: the VF's rate limit, Mbps (the request's, else its flavor's maximum)."""
    alternative: int | None = None
    """For a device request with alternatives: which one it was placed by (1..7)."""


@dataclass(frozen=True)
class Placement:
    node: str
    assignments: tuple[Assignment, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    score: tuple[int, ...] = ()
    numa_node: int | None = None
    """The NUMA node to pin the VM to: the one node every locality-asking request ended on
    (or, for a VM bound to one NUMA node for its CPUs and memory, that node)."""
    compute: ComputeStatus | None = None
    """The CPUs and memory counted for the VM; None when the node publishes no topology."""

    def devices(self) -> list[str]:
        return [a.device for a in self.assignments]


@dataclass(frozen=True)
class NodeRefusal:
    node: str
    reasons: tuple[str, ...]
    details: tuple[str, ...] = ()


@dataclass(frozen=True)
class Refusal:
    message: str
    reason: str
    """CamelCase reason for the condition: FlavorNotFound, NotPermitted, LimitExceeded,
    NetworkNotAllowed, Unschedulable."""
    nodes: tuple[NodeRefusal, ...] = ()
    total_nodes: int = 0


Result = Placement | Refusal

# --- requests -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Req:
    name: str
    flavor: str
    count: int
    optional: bool
    numa_policy: str
    selector: DeviceSelector | None
    address: str | None
    network: NetworkRequest | None
    alt: int | None = None
    """Which of the request's alternatives this is (1..7); None: its own flavor and count."""

    @property
    def label(self) -> str:
        return f"{self.name} ({self.flavor})"


def _requests(vm: PassthroughVM, flavors: Mapping[str, PciFlavor]) -> list[_Req]:
    out = []
    for d in vm.spec.devices:
        f = flavors.get(d.flavor)
        policy = d.numa_policy or (f.spec.numa_policy if f else "none")
        out.append(_Req(d.name, d.flavor, d.count, d.optional, policy, d.selector, d.address, None))
    for n in vm.spec.networks:
        f = flavors.get(n.flavor)
        policy = f.spec.numa_policy if f else "none"
        out.append(_Req(n.name, n.flavor, 1, False, policy, None, None, n))
    return out


def _network_not_allowed(net: NetworkRequest, flavor: PciFlavor) -> str | None:
    nw = flavor.spec.networking
    allow_trusted = nw.allow_trusted if nw else False
    allow_spoof_off = nw.allow_spoof_check_off if nw else False
    if net.trusted and not allow_trusted:
        return (
            f"network {net.name} asks for a trusted VF, which flavor {flavor.metadata.name} "
            "does not allow"
        )
    if not net.spoof_check and not allow_spoof_off:
        return (
            f"network {net.name} turns spoof checking off, which flavor "
            f"{flavor.metadata.name} does not allow"
        )
    name = flavor.metadata.name
    if net.min_tx_rate and not (nw and nw.allow_min_tx_rate):
        return (
            f"network {net.name} reserves minTxRate {net.min_tx_rate} Mbps, which flavor {name} "
            "does not allow (networking.allowMinTxRate)"
        )
    cap = nw.max_tx_rate if nw else None
    if cap is not None and net.max_tx_rate is not None and not 0 < net.max_tx_rate <= cap:
        asked = f"maxTxRate {net.max_tx_rate} Mbps" if net.max_tx_rate else "no rate limit"
        return (
            f"network {net.name} asks for {asked}; flavor {name} allows at most {cap} Mbps "
            "(networking.maxTxRate)"
        )
    if net.link_state in ("enable", "disable") and not (nw and nw.allow_link_state):
        return (
            f"network {net.name} sets linkState {net.link_state}, which flavor {name} does not "
            "allow (networking.allowLinkState)"
        )
    if net.vlan is not None and nw is not None and nw.vlan_ranges:
        ranges = [parse_vlan_range(r) for r in nw.vlan_ranges]
        if not any(lo <= net.vlan <= hi for lo, hi in ranges):
            return (
                f"network {net.name} asks for VLAN {net.vlan}, outside flavor "
                f"{flavor.metadata.name}'s VLANs {', '.join(nw.vlan_ranges)}"
            )
    return None


def _request_problem(r: _Req, inp: SchedulingInput) -> tuple[str, str] | None:
    """Why a request cannot be met on any node, as (reason, message), or None."""
    flavor = inp.flavors.get(r.flavor)
    if flavor is None:
        return c.REASON_FLAVOR_NOT_FOUND, f"request {r.name}: flavor {r.flavor} does not exist"
    if r.network is not None and flavor.spec.device_type != "nic":
        return c.REASON_FLAVOR_NOT_FOUND, (
            f"network {r.name}: flavor {r.flavor} is a {flavor.spec.device_type} flavor; "
            "networks need a flavor of deviceType nic"
        )
    access = flavor.spec.access
    if access and not label_selector_matches(access.namespace_selector, inp.namespace_labels):
        return c.REASON_NOT_PERMITTED, (
            f"request {r.name}: namespace {inp.vm.metadata.namespace} may not use flavor "
            f"{r.flavor} (it is limited to namespaces matching "
            f"{describe_label_selector(access.namespace_selector)})"
        )
    if r.network is not None and (why := _network_not_allowed(r.network, flavor)):
        return c.REASON_NETWORK_NOT_ALLOWED, why
    if (why := image_problem(inp.vm, r.name, flavor, inp.images)) is not None:
        return c.REASON_IMAGE_NOT_SUPPORTED, why
    return None


def request_problems(
    vm: PassthroughVM,
    flavors: Mapping[str, PciFlavor],
    namespace_labels: Mapping[str, str],
    images: ImageCatalog | None = None,
) -> list[str]:
    """What admission refuses: requests naming a missing or unsuitable flavor, a flavor the
    namespace may not use, VF settings the flavor forbids, an image that does not support a
    requested device, more devices than one VM may have. Capacity and quotas are not checked
    here: they change, so they are scheduling's business."""
    inp = SchedulingInput(vm=vm, flavors=flavors, namespace_labels=namespace_labels, images=images)
    alts = _with_alternatives(vm)
    reqs = [r for r in _requests(vm, flavors) if r.name not in alts]
    problems = [p[1] for r in reqs if (p := _request_problem(r, inp)) is not None]
    for d in vm.spec.devices:
        if d.name in alts:
            problems += _alternatives_problems(d, inp)
    per_flavor: Counter[str] = Counter()
    for r in reqs:
        if not r.optional and r.flavor in flavors:
            per_flavor[r.flavor] += r.count
    for name, count in sorted(per_flavor.items()):
        limits = flavors[name].spec.limits
        if limits is not None and limits.max_per_vm is not None and count > limits.max_per_vm:
            problems.append(
                f"the VM asks for {count} {name}; flavor {name} allows {limits.max_per_vm} per VM"
            )
    return problems


def _alternatives_problems(d: DeviceRequest, inp: SchedulingInput) -> list[str]:
    """Admission of a request with alternatives: every flavor it names must exist (a typo is
    named by its field), and at least one way must be usable by the VM; a way its namespace may
    not use is only passed over."""
    problems: list[str] = []
    found: list[tuple[str, str] | None] = []
    for i, o in enumerate(d.options()):
        if o.flavor not in inp.flavors:
            where = f"spec.devices[{d.name}]" + (f".alternatives[{i - 1}]" if i else "")
            problems.append(f"{where}.flavor: flavor {o.flavor} does not exist")
            continue
        f = inp.flavors[o.flavor]
        policy = o.numa_policy or f.spec.numa_policy
        q = _Req(d.name, o.flavor, o.count, d.optional, policy, o.selector, None, None, i or None)
        found.append(_request_problem(q, inp))
    usable = [x for x in found if x is None]
    if not problems and not usable and found and not d.optional:
        first = found[0]
        assert first is not None
        problems.append(first[1])
    return problems


def check_vm(inp: SchedulingInput) -> tuple[Refusal | None, dict[str, str]]:
    """VM-level checks. Returns a refusal (when a mandatory request fails one) and the optional
    requests that must be skipped whatever the node, with why."""
    skipped: dict[str, str] = {}
    alts = _with_alternatives(inp.vm)
    reqs = [r for r in _requests(inp.vm, inp.flavors) if r.name not in alts]
    for r in reqs:
        if (problem := _request_problem(r, inp)) is None:
            continue
        reason, message = problem
        if not r.optional:
            return Refusal(message=message, reason=reason), skipped
        skipped[r.name] = message

    ns = inp.vm.metadata.namespace
    for flavor_name in sorted({r.flavor for r in reqs if r.name not in skipped}):
        limits = inp.flavors[flavor_name].spec.limits
        if limits is None:
            continue
        of_flavor = [r for r in reqs if r.flavor == flavor_name and r.name not in skipped]
        mandatory = sum(r.count for r in of_flavor if not r.optional)
        caps: list[tuple[int, str]] = []
        if limits.max_per_vm is not None:
            if mandatory > limits.max_per_vm:
                return Refusal(
                    f"the VM asks for {mandatory} {flavor_name}; flavor {flavor_name} allows "
                    f"{limits.max_per_vm} per VM",
                    c.REASON_LIMIT_EXCEEDED,
                ), skipped
            caps.append(
                (
                    limits.max_per_vm - mandatory,
                    f"flavor {flavor_name} allows {limits.max_per_vm} per VM",
                )
            )
        if limits.max_per_namespace is not None:
            held = inp.namespace_usage.get(flavor_name, 0)
            if held + mandatory > limits.max_per_namespace:
                return Refusal(
                    f"namespace {ns} holds {held} {flavor_name} and the VM needs {mandatory} more; "
                    f"flavor {flavor_name} allows {limits.max_per_namespace} per namespace",
                    c.REASON_LIMIT_EXCEEDED,
                ), skipped
            caps.append(
                (
                    limits.max_per_namespace - held - mandatory,
                    f"namespace {ns} is at its {flavor_name} limit ({limits.max_per_namespace})",
                )
            )
        # Optional requests take what room the limits leave, in order; the rest are skipped.
        room = min((c for c, _ in caps), default=None)
        for r in of_flavor:
            if not r.optional or room is None:
                continue
            if r.count > room:
                skipped[r.name] = min(caps)[1]
            else:
                room -= r.count
    return None, skipped


# --- per-node placement ---------------------------------------------------------------------

SEARCH_BUDGET = 20_000
"""Choices one node's search may try before it settles for the best placement found so far.
Interchangeable devices are tried once per kind, so real inventories stay far below it."""


@dataclass
class _NodeView:
    node: str
    labels: dict[str, str]
    by_address: dict[str, Device]
    own_uid: str
    reserved: frozenset[str] | Set[str]
    vfs_of: dict[str, list[Device]] = field(init=False)
    """PF address -> its published VFs on this node."""
    _groups: dict[str, list[Device] | None] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.vfs_of = defaultdict(list)
        for d in self.by_address.values():
            if d.phys_fn is not None:
                self.vfs_of[d.phys_fn].append(d)

    def usable(self, d: Device) -> bool:
        """Free for this VM: healthy, not cordoned, not reserved after a one-time use, not
        claimed or promised to another VM."""
        if not d.healthy or d.unschedulable:
            return False
        if d.claim is not None:
            return d.claim.uid == self.own_uid
        if d.reserved_after_use or d.held_back is not None:
            return False
        return d.name not in self.reserved

    def held_by_other(self, d: Device) -> bool:
        if d.claim is not None:
            return d.claim.uid != self.own_uid
        return d.name in self.reserved

    def family(self, d: Device) -> list[Device]:
        """The published functions that cannot go to another VM than d's: its PF (for a VF)
        and its VFs (for a PF). Passing a PF through removes its VFs."""
        out = list(self.vfs_of.get(d.address, ()))
        if d.phys_fn is not None and (pf := self.by_address.get(d.phys_fn)) is not None:
            out.append(pf)
        return out

    def family_held(self, d: Device) -> Device | None:
        """A PF or VF of d's held by another VM, if any."""
        return next((m for m in self.family(d) if self.held_by_other(m)), None)

    def group(self, d: Device) -> list[Device] | None:
        """The device and its IOMMU group peers, or None when the group cannot come along
        (a peer missing or not usable, or a member's PF or VF held by another VM)."""
        if d.name in self._groups:
            return self._groups[d.name]
        got = self._group(d)
        self._groups[d.name] = got
        return got

    def _group(self, d: Device) -> list[Device] | None:
        members = [d]
        for peer in d.peers:
            p = self.by_address.get(peer)
            if p is None or not self.usable(p):
                return None
            members.append(p)
        if any(self.family_held(m) is not None for m in members):
            return None
        return members

    def blocked_by_group(self, d: Device) -> bool:
        return self.group(d) is None


def _migration_excludes(vm: PassthroughVM, node: str) -> str | None:
    """A VM being placed again by a cold migration leaves its old node, for the target."""
    mig = vm.status.migration
    if mig is None or mig.phase != "Placing":
        return None
    if node == mig.from_node:
        return "the VM is migrating away from it"
    if mig.to_node and node != mig.to_node:
        return "not the migration's target"
    return None


def _why_not(view: _NodeView, d: Device) -> str:
    if not d.healthy:
        return "unhealthy"
    if d.unschedulable:
        return "cordoned"
    if d.claim is None and d.reserved_after_use:
        return "reserved after one-time use"
    if d.claim is None and d.held_back is not None:
        return d.held_back
    if d.claim is not None and d.claim.uid != view.own_uid:
        return "claimed by other VMs"
    if d.claim is None and d.name in view.reserved:
        return "being bound to other VMs"
    if (held := view.family_held(d)) is not None:
        return (
            "whose VF is held by another VM"
            if d.phys_fn is None
            else (
                "whose PF is held by another VM"
                if held.address == d.phys_fn
                else "whose PF's other functions are held by another VM"
            )
        )
    return "blocked by their IOMMU group"


@dataclass
class _NodeResult:
    placement: Placement | None
    reasons: list[str]
    details: list[str]


def _matches_request(r: _Req, flavor: PciFlavor, d: Device, labels: Mapping[str, str]) -> bool:
    if not device_selector_matches(flavor.spec.selector, d.facts, labels):
        return False
    return _mismatch(r, d, labels) is None


def _mismatch(r: _Req, d: Device, labels: Mapping[str, str]) -> str | None:
    """Why a device of the request's flavor does not suit the request itself, or None."""
    if r.selector is not None and not device_selector_matches(r.selector, d.facts, labels):
        return "not matching the request's selector"
    if r.address is not None and d.address != r.address:
        return "at other addresses"
    if r.network is not None:
        if r.network.physical_network and physical_network(d.facts) != r.network.physical_network:
            return "on other physical networks"
        if r.network.mode == "macvtap" and not d.netdev:
            return "without a netdev (macvtap needs one)"
        if r.network.trusted and d.facts.attributes.get("trusted", "").lower() != "true":
            return "not marked trusted by the admin"
    return None


Pick = list[tuple[Device, bool]]
"""Devices taken for a request, each with whether it counts toward it (False: a companion)."""


@dataclass(frozen=True)
class _Unit:
    """What taking one device means: it and its IOMMU group, all or nothing."""

    members: tuple[Device, ...]
    names: frozenset[str]
    kin: frozenset[str]
    """Names of the members' PFs and VFs outside the unit: taken by no one else in this VM."""


@dataclass
class _Best:
    score: tuple[int, int, int]
    """(optional requests skipped, -devices the VM holds already, NUMA-preferred misses)"""
    picks: dict[str, Pick]
    skipped: list[tuple[str, str]]
    compute: ComputeStatus | None = None


LeafCheck = Callable[[Mapping[str, Pick]], "ComputeStatus | str | None"]
"""Given a complete device placement: the CPUs and memory it gets, why none fit (a refusal
reason), or None when they are not counted."""


class _Search:
    """Every way to give each request its devices, most promising first, with interchangeable
    devices tried once per kind: a depth-first search that backtracks over NUMA nodes and
    device choices, so a fit is found whenever one exists (within SEARCH_BUDGET choices).

    Requests are placed most constrained first (mandatory before optional; sameNUMA, then
    pinned addresses, then NUMA required, preferred, none). A sameNUMA group shares one NUMA
    node; a required request keeps its devices on one; a preferred one tries each node first
    and counts a miss when it spreads. Among complete placements the best is the one with the
    fewest optional requests skipped, then the most devices the VM already holds, then the
    fewest NUMA misses; the search stops early once nothing better is possible."""

    def __init__(
        self,
        view: _NodeView,
        order: list[_Req],
        cands: Mapping[str, list[Device]],
        same_numa: Set[str],
        *,
        check: LeafCheck | None = None,
        same_root: Set[str] = frozenset(),
    ) -> None:
        self.view = view
        self.same_root = same_root
        """Requests whose devices must all be under one PCIe root complex."""
        self.check = check
        self.compute_problem: str | None = None
        """Why CPUs or memory did not fit the first device placement they were tried on."""
        self.order = order
        self.same_numa = same_numa
        self.cand_names = {r.name: {d.name for d in cands[r.name]} for r in order}
        self.cands = cands
        self.units = {r.name: self._units_for(r) for r in order}
        own_upper = {
            m.name
            for units in self.units.values()
            for u in units
            for m in u.members
            if m.claim is not None
        }
        self.own_upper = len(own_upper)
        self.steps = 0
        self.picks: dict[str, Pick] = {}
        self.skipped: list[tuple[str, str]] = []
        self.best: _Best | None = None
        self.done = False

    def _preference(self, d: Device) -> tuple[int, int, str]:
        own = 0 if d.claim is not None and d.claim.uid == self.view.own_uid else 1
        return (own, len(d.peers), d.address)

    def _units_for(self, r: _Req) -> list[_Unit]:
        seen: set[frozenset[str]] = set()
        units = []
        for d in sorted(self.cands[r.name], key=self._preference):
            members = self.view.group(d)
            if members is None:
                continue
            names = frozenset(m.name for m in members)
            if names in seen:
                continue
            seen.add(names)
            kin = frozenset(k.name for m in members for k in self.view.family(m)) - names
            units.append(_Unit(tuple(members), names, kin))
        return units

    # -- choices -------------------------------------------------------------------------

    def _kind(self, u: _Unit, counted: int) -> tuple[object, ...]:
        """Units of one kind are interchangeable for every request: one device, no IOMMU
        peers, on the same NUMA node, wanted by the same requests, held or not alike, and
        of the same PF (or of none)."""
        if len(u.members) > 1 or (u.kin and u.members[0].phys_fn is None):
            return ("unique", u.names)
        d = u.members[0]
        return (
            d.numa,
            d.pcie_root if self.same_root else None,
            counted,
            d.claim is not None,
            tuple(d.name in self.cand_names[r.name] for r in self.order),
            u.kin,
        )

    def choices(
        self, r: _Req, numa: int | None, taken: frozenset[str], root: str | None = None
    ) -> Iterator[list[_Unit]]:
        """Sets of units that give r its count (on NUMA node `numa`, under PCIe root `root`,
        when given), best first: the first one is what a greedy pick would take."""
        eligible = self.cand_names[r.name]
        kinds: dict[tuple[object, ...], list[tuple[_Unit, int]]] = {}
        for u in self.units[r.name]:
            if u.names & taken or u.kin & taken:
                continue
            if numa is not None and u.members[0].numa != numa:
                continue
            if root is not None and u.members[0].pcie_root != root:
                continue
            n = sum(
                1
                for m in u.members
                if m.name in eligible
                and (numa is None or m.numa == numa)
                and (root is None or m.pcie_root == root)
            )
            if n:
                kinds.setdefault(self._kind(u, n), []).append((u, n))
        groups = list(kinds.values())

        def gen(
            i: int, need: int, chosen: list[_Unit], names: frozenset[str]
        ) -> Iterator[list[_Unit]]:
            if need <= 0:
                yield chosen
                return
            if i == len(groups):
                return
            group = groups[i]
            each = group[0][1]
            most = min(len(group), -(-need // each))
            for x in range(most, -1, -1):
                picked = [u for u, _ in group[:x]]
                if x and any(u.kin & names for u in picked):
                    continue
                got = names.union(*(u.names for u in picked)) if picked else names
                yield from gen(i + 1, need - x * each, chosen + picked, got)

        yield from gen(0, r.count, [], frozenset())

    # -- the search ----------------------------------------------------------------------

    def numa_options(
        self, r: _Req, taken: frozenset[str], group_numa: int | None
    ) -> list[int | None]:
        if r.name in self.same_numa:
            if group_numa is not None:
                return [group_numa]
            group = [q for q in self.order if q.name in self.same_numa]
            room = Counter(
                d.numa
                for q in group
                for d in self.cands[q.name]
                if d.numa >= 0 and d.name not in taken
            )
            by_room: list[int] = sorted(room, key=lambda n: (room[n], n))
            return [*by_room]
        if r.numa_policy == "none":
            return [None]
        room = Counter(d.numa for d in self.cands[r.name] if d.numa >= 0 and d.name not in taken)
        fits = [n for n in sorted(room, key=lambda n: (room[n], n)) if room[n] >= r.count]
        local: list[int | None] = list(fits)
        return [*local, None] if r.numa_policy == "preferred" else local

    def root_options(
        self, r: _Req, taken: frozenset[str], group_root: str | None
    ) -> list[str | None]:
        """PCIe roots to try for r: the one its samePCIeRoot group is on already; else each
        root its group's candidates are under, least room first (best fit)."""
        if r.name not in self.same_root:
            return [None]
        if group_root is not None:
            return [group_root]
        room: Counter[str] = Counter(
            [
                d.pcie_root
                for q in self.order
                if q.name in self.same_root
                for d in self.cands[q.name]
                if d.pcie_root is not None and d.name not in taken
            ]
        )
        ordered = sorted(room, key=lambda x: (room[x], x))
        return [*ordered]

    def run(self) -> _Best | None:
        self._dfs(0, frozenset(), None, 0, 0)
        return self.best

    def _dfs(
        self,
        i: int,
        taken: frozenset[str],
        group_numa: int | None,
        own: int,
        misses: int,
        *,
        group_root: str | None = None,
    ) -> None:
        """Place order[i:], given what is taken; the picks and skips so far are in
        self.picks and self.skipped."""
        picks, skipped = self.picks, self.skipped
        if self.done:
            return
        if self.best is not None and len(skipped) > self.best.score[0]:
            return
        if i == len(self.order):
            score = (len(skipped), -own, misses)
            if self.best is None or score < self.best.score:
                compute = self.check(picks) if self.check is not None else None
                if isinstance(compute, str):
                    self.compute_problem = self.compute_problem or compute
                    return  # the devices fit, the CPUs or memory do not: search on
                self.best = _Best(score, dict(picks), list(skipped), compute)
                if score == (0, -self.own_upper, 0):
                    self.done = True
            return
        r = self.order[i]
        for numa in self.numa_options(r, taken, group_numa):
            for root in self.root_options(r, taken, group_root):
                for units in self.choices(r, numa, taken, root):
                    self.steps += 1
                    if self.steps > SEARCH_BUDGET:
                        self.done = True
                        return
                    pick = self._pick(r, units, numa, root)
                    counted = {d.numa for d, counts in pick if counts}
                    miss = int(
                        r.numa_policy == "preferred"
                        and r.name not in self.same_numa
                        and (len(counted) != 1 or min(counted) < 0)
                    )
                    picks[r.name] = pick
                    self._dfs(
                        i + 1,
                        taken.union(*(u.names for u in units)),
                        numa if r.name in self.same_numa else group_numa,
                        own + sum(1 for d, _ in pick if d.claim is not None),
                        misses + miss,
                        group_root=root if r.name in self.same_root else group_root,
                    )
                    del picks[r.name]
                    if self.done:
                        return
        if r.optional:
            skipped.append((r.name, self.skip_reason(r, taken, group_numa, group_root)))
            self._dfs(i + 1, taken, group_numa, own, misses, group_root=group_root)
            skipped.pop()

    def _pick(self, r: _Req, units: list[_Unit], numa: int | None, root: str | None = None) -> Pick:
        eligible = self.cand_names[r.name]
        out: Pick = []
        counted = 0
        for u in units:
            for m in u.members:
                counts = (
                    counted < r.count
                    and m.name in eligible
                    and (numa is None or m.numa == numa)
                    and (root is None or m.pcie_root == root)
                )
                counted += counts
                out.append((m, counts))
        return out

    def skip_reason(
        self, r: _Req, taken: frozenset[str], group_numa: int | None, group_root: str | None = None
    ) -> str:
        if r.name in self.same_numa and group_numa is not None:
            return f"no free {r.flavor} left on NUMA node {group_numa} with the rest of sameNUMA"
        if r.name in self.same_root and group_root is not None:
            return (
                f"no free {r.flavor} left under PCIe root {group_root} with the rest of "
                "samePCIeRoot"
            )
        free = [d for d in self.cands[r.name] if d.name not in taken]
        if len(free) >= r.count and r.numa_policy == "required":
            return _numa_text(r, free)
        if len(free) >= r.count:
            return f"cannot take whole IOMMU groups for {r.count} {r.flavor}"
        return _shortage_text(r, len(free), r.count)


def _numa_text(r: _Req, free: Sequence[Device]) -> str:
    """Why a NUMA-required request does not fit on one NUMA node."""
    room = Counter(d.numa for d in free if d.numa >= 0)
    unknown = sum(1 for d in free if d.numa < 0)
    most = max(room.values(), default=0)
    text = f"cannot place {r.name} on a single NUMA node (at most {most} free {r.flavor} on one"
    if unknown:
        text += f"; {unknown} report no NUMA node"
    return text + ")"


def _prio(
    r: _Req, same_numa: Set[str], same_root: Set[str] = frozenset()
) -> tuple[int, int, int, int, int, str]:
    policy_rank = {"required": 0, "preferred": 1, "none": 2}[r.numa_policy]
    return (
        1 if r.optional else 0,
        0 if r.name in same_numa else 1,
        0 if r.name in same_root else 1,
        0 if r.address else 1,
        policy_rank,
        r.name,
    )


def _place_on_node(
    inp: SchedulingInput,
    node: NodeFacts,
    node_devices: list[Device],
    reqs: list[_Req],
    skipped_vm: Mapping[str, str],
    *,
    demand: Demand | None = None,
) -> _NodeResult:
    """`demand`: the VM's CPUs and memory, read once per decision by the caller."""
    labels = node.effective_labels()
    view = _NodeView(
        node.name,
        labels,
        {d.address: d for d in node_devices},
        inp.vm.metadata.uid or "",
        inp.reserved,
    )
    # Candidates per request: qualifying and usable devices, with counts of why others are not.
    cands: dict[str, list[Device]] = {}
    free_by_flavor: dict[str, int] = {}
    excluded: dict[str, Counter[str]] = {}
    for r in reqs:
        flavor = inp.flavors[r.flavor]
        of_flavor = [
            d
            for d in node_devices
            if device_selector_matches(flavor.spec.selector, d.facts, labels)
        ]
        ok, why = [], Counter[str]()
        for d in of_flavor:
            if (mismatch := _mismatch(r, d, labels)) is not None:
                why[mismatch] += 1
            elif not view.usable(d) or view.blocked_by_group(d):
                why[_why_not(view, d)] += 1
            else:
                ok.append(d)
        cands[r.name] = ok
        free_by_flavor[r.flavor] = sum(
            1 for d in of_flavor if view.usable(d) and not view.blocked_by_group(d)
        )
        excluded[r.name] = why

    placement = inp.vm.spec.placement
    same_numa = set(placement.same_numa or []) if placement else set()
    same_root = set(placement.same_pcie_root or []) if placement else set()
    active = sorted(
        (r for r in reqs if r.name not in skipped_vm),
        key=lambda r: _prio(r, same_numa, same_root),
    )
    mandatory = [r for r in active if not r.optional]

    def details(r: _Req) -> str:
        return ", ".join(f"{n} {why}" for why, n in sorted(excluded[r.name].items()))

    # Too few candidates for a mandatory request: refused without searching.
    short = [r for r in mandatory if len(cands[r.name]) < r.count]
    if short:
        return _NodeResult(
            None,
            list(
                dict.fromkeys(
                    _shortage_text(r, len(cands[r.name]), r.count, excluded[r.name]) for r in short
                )
            ),
            [f"{r.label}: {details(r)}" for r in short if excluded[r.name]],
        )

    check: LeafCheck | None = None
    if node.compute is not None:
        topo = node.compute
        want = demand or Demand.of(inp.vm)
        use = NodeUse.of(inp.compute_taken.get(node.name, ()))
        fitted: dict[int | None, ComputeStatus | str] = {}

        def check(picks: Mapping[str, Pick]) -> ComputeStatus | str | None:
            pin = _pin(reqs, same_numa, picks)
            if pin not in fitted:
                fitted[pin] = fit(want, topo, use, pin, inp.cpu_allocation_ratio)
            return fitted[pin]

    search = _Search(view, active, cands, same_numa, check=check, same_root=same_root)
    found = search.run()
    if found is None and search.compute_problem is not None:
        return _NodeResult(None, [search.compute_problem], [])
    if found is None:
        reasons = _why_no_fit(view, mandatory, cands, same_numa, same_root)
        notes = [f"{r.label}: {details(r)}" for r in mandatory if excluded[r.name]]
        return _NodeResult(None, reasons, notes)

    assignments: list[Assignment] = []
    for r in reqs:
        for d, counts in found.picks.get(r.name, []):
            assignments.append(
                Assignment(
                    request=r.name,
                    device=d.name,
                    address=d.address,
                    numa=d.numa,
                    companion=not counts,
                    network=r.network is not None,
                    flavor=r.flavor if counts else None,
                    netdev=d.netdev,
                    max_tx_rate=_max_tx_rate(r, inp.flavors) if counts else None,
                    alternative=r.alt,
                )
            )
    used_by_flavor = Counter(a.flavor for a in assignments if a.flavor)
    left = sum(free_by_flavor[f] - used_by_flavor.get(f, 0) for f in free_by_flavor)
    all_skipped = tuple(sorted({**dict(found.skipped), **dict(skipped_vm)}.items()))
    stranded = left if inp.policy == "best-fit" else -left
    # Devices this VM already holds (a bind interrupted by a crash) are reused before anything
    # else counts, so a re-plan converges on the claims already made instead of churning.
    _, minus_own, misses = found.score
    score = (len(all_skipped), minus_own, misses, stranded)
    pin = _pin(reqs, same_numa, found.picks)
    if pin is None and found.compute is not None and len(found.compute.numa) == 1:
        pin = found.compute.numa[0].node
    return _NodeResult(
        Placement(node.name, tuple(assignments), all_skipped, score, pin, found.compute), [], []
    )


def _max_tx_rate(r: _Req, flavors: Mapping[str, PciFlavor]) -> int | None:
    """A network's VF rate limit: what it asks (0: none), else its flavor's maximum."""
    if r.network is None:
        return None
    if r.network.max_tx_rate is not None:
        return r.network.max_tx_rate or None
    f = flavors.get(r.flavor)
    nw = f.spec.networking if f is not None else None
    return nw.max_tx_rate if nw is not None else None


def _pin(reqs: Iterable[_Req], same_numa: Set[str], picks: Mapping[str, Pick]) -> int | None:
    """The one NUMA node every locality-asking request's devices are on, if there is one."""
    local = {
        d.numa
        for r in reqs
        if r.numa_policy in ("required", "preferred") or r.name in same_numa
        for d, counts in picks.get(r.name, [])
        if counts
    }
    return next(iter(local)) if len(local) == 1 and min(local) >= 0 else None


def _why_no_fit(
    view: _NodeView,
    mandatory: list[_Req],
    cands: Mapping[str, list[Device]],
    same_numa: Set[str],
    same_root: Set[str] = frozenset(),
) -> list[str]:
    """Why the mandatory requests have no placement on a node, when each has enough candidate
    devices: the first request (or sameNUMA, samePCIeRoot group) that cannot be placed even
    alone, or else that they cannot be placed together."""
    group = [r for r in mandatory if r.name in same_numa]
    if group and _Search(view, group, cands, same_numa).run() is None:
        return [f"cannot place {', '.join(r.name for r in group)} on one NUMA node"]
    group = [r for r in mandatory if r.name in same_root]
    if group and _Search(view, group, cands, set(), same_root=same_root).run() is None:
        return [f"cannot place {', '.join(r.name for r in group)} under one PCIe root"]
    reasons = []
    for r in mandatory:
        if r.name in same_numa or _Search(view, [r], cands, same_numa).run() is not None:
            continue
        if r.numa_policy == "required":
            reasons.append(_numa_text(r, cands[r.name]))
        else:
            reasons.append(f"cannot take whole IOMMU groups for {r.count} {r.flavor}")
    if reasons:
        return reasons
    return [
        f"cannot fit {', '.join(r.name for r in mandatory)} together "
        "(they compete for the same devices)"
    ]


# --- the whole decision ---------------------------------------------------------------------


def _with_alternatives(vm: PassthroughVM) -> set[str]:
    return {d.name for d in vm.spec.devices if d.alternatives}


MAX_COMBINATIONS = 64
"""Ways to combine the alternatives of several requests that one decision tries, in order."""


def _combinations(
    inp: SchedulingInput, reqs: list[_Req], skipped: dict[str, str], passed_over: list[str]
) -> tuple[list[tuple[tuple[int, ...], list[_Req]]], Refusal | None]:
    """The VM's requests with each request's alternatives in turn, most preferred first (a
    request's own flavor and count, then its alternatives in order; an earlier request's
    preference counts first), each with its rank. Alternatives whose flavor is missing or
    not permitted are left out; combinations beyond a flavor's limits too. A mandatory
    request with no alternative left refuses the VM; an optional one is skipped (`skipped`
    gains it)."""
    by_name = {d.name: d for d in inp.vm.spec.devices}
    options: list[list[_Req]] = []
    for r in reqs:
        d = by_name.get(r.name) if r.network is None else None
        if d is None or not d.alternatives or r.name in skipped:
            options.append([r])
            continue
        usable: list[_Req] = []
        first_problem: tuple[str, str] | None = None
        for i, alt in enumerate(d.options()):
            f = inp.flavors.get(alt.flavor)
            policy = alt.numa_policy or (f.spec.numa_policy if f else "none")
            q = _Req(
                r.name,
                alt.flavor,
                alt.count,
                r.optional,
                policy,
                alt.selector,
                None,
                None,
                i or None,
            )
            if (problem := _request_problem(q, inp)) is not None:
                first_problem = first_problem or problem
                continue
            usable.append(q)
        if usable:
            options.append(usable)
        elif r.optional:
            skipped[r.name] = first_problem[1] if first_problem else "no alternative fits"
            options.append([r])
        else:
            assert first_problem is not None
            return [], Refusal(message=first_problem[1], reason=first_problem[0])
    out: list[tuple[tuple[int, ...], list[_Req]]] = []
    over: str | None = None
    for combo in itertools.product(*options):
        if len(out) >= MAX_COMBINATIONS:
            break
        if (why := _over_limits(inp, combo, skipped)) is not None:
            over = over or why
            for q in combo:
                if q.alt and (text := f"passed over {_alt_label(q)}: {why}") not in passed_over:
                    passed_over.append(text)
            continue
        rank = tuple(q.alt or 0 for q, r in zip(combo, reqs, strict=True) if r.name in by_name
                     and by_name[r.name].alternatives)  # fmt: skip
        out.append((rank, list(combo)))
    if not out:
        return [], Refusal(message=over or "no alternative fits", reason=c.REASON_LIMIT_EXCEEDED)
    return out, None


def _alt_label(q: _Req) -> str:
    return f"alternative {q.alt} ({q.count} {q.flavor}) of {q.name}"


def _over_limits(
    inp: SchedulingInput, combo: Sequence[_Req], skipped: Mapping[str, str]
) -> str | None:
    """Why a combination of alternatives exceeds a flavor's per-VM or per-namespace limit."""
    mandatory: Counter[str] = Counter()
    for q in combo:
        if not q.optional and q.name not in skipped:
            mandatory[q.flavor] += q.count
    for name, n in sorted(mandatory.items()):
        limits = inp.flavors[name].spec.limits
        if limits is None:
            continue
        if limits.max_per_vm is not None and n > limits.max_per_vm:
            return f"the VM asks for {n} {name}; flavor {name} allows {limits.max_per_vm} per VM"
        held = inp.namespace_usage.get(name, 0)
        if limits.max_per_namespace is not None and held + n > limits.max_per_namespace:
            return (
                f"namespace {inp.vm.metadata.namespace} holds {held} {name} and the VM needs "
                f"{n} more; flavor {name} allows {limits.max_per_namespace} per namespace"
            )
    return None


def schedule(inp: SchedulingInput) -> Result:
    """Place the VM, or say why not. Deterministic for the same input."""
    refusal, skipped_vm = check_vm(inp)
    if refusal is not None:
        return refusal
    reqs = _requests(inp.vm, inp.flavors)
    combos: list[tuple[tuple[int, ...], list[_Req]]] = [((), reqs)]
    passed_over: list[str] = []
    """Why alternatives were left out whatever the node (said in each node's refusal)."""
    if _with_alternatives(inp.vm):
        combos, refusal = _combinations(inp, reqs, skipped_vm, passed_over)
        if refusal is not None:
            return refusal

    by_node: Mapping[str, Sequence[Device]]
    if inp.by_node is not None:
        by_node = inp.by_node
    else:
        grouped: dict[str, list[Device]] = defaultdict(list)
        for d in inp.devices:
            grouped[d.node].append(d)
        by_node = grouped
    selector = inp.vm.spec.node_selector or {}
    if inp.eligibility is not None:
        node_names, eligible, kept, eligible_set = inp.eligibility(selector)
    else:
        names = sorted(set(inp.nodes) | set(by_node))
        node_names, eligible, kept, eligible_set = node_eligibility(inp.nodes, names, selector)
    refusals = dict(kept)
    mig = inp.vm.status.migration
    if mig is not None and mig.phase == "Placing":
        # A cold migration's own exclusions, in the order the nodes were judged.
        keep = []
        for name in eligible:
            if (why := _migration_excludes(inp.vm, name)) is not None:
                refusals[name] = NodeRefusal(name, (why,))
            else:
                keep.append(name)
        eligible, eligible_set = keep, frozenset(keep)

    demand = Demand.of(inp.vm)

    def evaluate(name: str) -> Placement | None:
        """The first combination of alternatives that fits on the node (the only one, for a
        VM without alternatives), its rank leading the score."""
        facts = inp.nodes.get(name) or NodeFacts(name)
        reasons: list[str] = []
        details: list[str] = []
        for rank, combo in combos:
            res = _place_on_node(
                inp, facts, list(by_node.get(name, ())), combo, skipped_vm, demand=demand
            )
            if res.placement is not None:
                if not rank:
                    return res.placement
                return replace(res.placement, score=(*rank, *res.placement.score))
            reasons += [x for x in res.reasons if x not in reasons]
            details += [x for x in res.details if x not in details]
        refusals[name] = NodeRefusal(name, tuple(reasons + passed_over), tuple(details))
        return None

    best: Placement | None = None
    if inp.free is not None and len(combos) == 1 and not combos[0][0]:
        best = _indexed_search(
            inp,
            reqs,
            skipped_vm=skipped_vm,
            eligible=eligible,
            eligible_set=eligible_set,
            evaluate=evaluate,
            refusals=refusals,
        )
    else:
        for name in eligible:
            got = evaluate(name)
            if got is not None and (best is None or (got.score, name) < (best.score, best.node)):
                best = got
    if best is not None:
        return best
    ordered = tuple(refusals[n] for n in node_names if n in refusals)
    return Refusal(
        message=summarize(ordered, len(node_names)),
        reason=c.REASON_UNSCHEDULABLE,
        nodes=ordered,
        total_nodes=len(node_names),
    )


def _bucketed(
    by_bound: Mapping[int, list[int]],
    buckets: Mapping[int, Iterable[str]],
    eligible: Set[str],
) -> Iterator[tuple[int, str]]:
    """(bound, node) in ascending order from the inverted free counts (each bucket iterates
    its nodes in name order): the buckets of one bound merged, read only as far as the search
    gets, so a decision costs the nodes it visits, not the size of the bucket."""
    for bound in sorted(by_bound):
        runs = [buckets.get(k, ()) for k in by_bound[bound]]
        merged = runs[0] if len(runs) == 1 else heapq.merge(*runs)
        for name in merged:
            if name in eligible:
                yield bound, name


def _indexed_search(
    inp: SchedulingInput,
    reqs: list[_Req],
    *,
    skipped_vm: Mapping[str, str],
    eligible: list[str],
    eligible_set: Set[str] | None = None,
    evaluate: Callable[[str], Placement | None],
    refusals: dict[str, NodeRefusal],
) -> Placement | None:
    """Visit nodes by the best score the free counts allow; stop when none left can do better.

    A node's score is (skipped, -own, numa penalty, stranded), and for a VM that holds nothing
    yet, stranded is exactly the node's free count of the requested flavors minus what the VM
    takes: so sum(free) - wanted is a lower bound that the first three terms can only raise.
    Nodes whose free counts cannot cover the mandatory requests are skipped, and examined only
    when no node fits, to say why.
    """
    assert inp.free is not None
    free = inp.free
    active = [r for r in reqs if r.name not in skipped_vm]
    flavors = sorted({r.flavor for r in active})
    mandatory: Counter[str] = Counter()
    wanted: Counter[str] = Counter()
    for r in active:
        wanted[r.flavor] += r.count
        if not r.optional:
            mandatory[r.flavor] += r.count
    sign = 1 if inp.policy == "best-fit" else -1
    bounds: list[tuple[int, str]] = []
    short: list[str] = []
    lazy: Iterator[tuple[int, str]] | None = None
    short_of: Callable[[], list[str]] | None = None
    if (
        len(flavors) == 1
        and inp.free_nodes is not None
        and eligible_set is not None
        and mandatory[flavors[0]] > 0  # a node without the flavor has no bucket
    ):
        # The common case, one flavor, with the inverted index: nodes come bucket by bucket
        # in the order of their bound; a bucket is read only if the search gets to it.
        (f,) = flavors
        by = free.get(f, {})
        need, want = mandatory[f], wanted[f]
        buckets = inp.free_nodes.get(f, {})
        by_bound: dict[int, list[int]] = defaultdict(list)
        for k in buckets:
            if k >= need:
                by_bound[sign * (k - want if k > want else 0)].append(k)
        lazy = _bucketed(by_bound, buckets, eligible_set)
        short_of = lambda: [n for n in eligible if by.get(n, 0) < need]  # noqa: E731
    elif len(flavors) == 1:
        # One flavor without the index: the same bounds without a dict per node.
        (f,) = flavors
        by = free.get(f, {})
        need, want = mandatory[f], wanted[f]
        for name in eligible:
            n = by.get(name, 0)
            if n < need:
                short.append(name)
            else:
                bounds.append((sign * (n - want if n > want else 0), name))
    else:
        for name in eligible:
            counts = {f: free.get(f, {}).get(name, 0) for f in flavors}
            if any(not r.optional and counts[r.flavor] < mandatory[r.flavor] for r in active):
                short.append(name)
                continue
            left = sum(max(0, counts[f] - wanted[f]) for f in flavors)
            bounds.append((sign * left, name))
    # Visited in order, usually only the first few: a heap, not a sort of every node.
    heapq.heapify(bounds)
    if lazy is None:
        lazy = (heapq.heappop(bounds) for _ in range(len(bounds)))
    best: Placement | None = None
    for bound, name in lazy:
        if (
            best is not None
            and best.score[:3] == (0, 0, 0)
            and (best.score[3], best.node) <= (bound, name)
        ):
            break
        got = evaluate(name)
        if got is not None and (best is None or (got.score, name) < (best.score, best.node)):
            best = got
    if best is None and short_of is not None:
        short = short_of()
    if best is None:
        # A refusal: the nodes the counts ruled out are looked at device by device after all,
        # so each says why (claimed, reserved, blocked by its IOMMU group, ...), not only how
        # many are free. Only refusals pay for this; a placement never does, and a node whose
        # state has not changed since it refused the same requests answers from the memo.
        memo, versions = inp.refusal_memo, inp.node_versions
        shape = _request_shape(inp, reqs, skipped_vm) if memo is not None else None
        for name in short:
            key = (name, versions.get(name), shape) if memo is not None and versions else None
            if key is not None and memo is not None and key in memo:
                refusals[name] = memo[key]
                continue
            evaluate(name)
            if key is not None and memo is not None and name in refusals:
                memo[key] = refusals[name]
    return best


def _request_shape(
    inp: SchedulingInput, reqs: list[_Req], skipped_vm: Mapping[str, str]
) -> tuple[object, ...]:
    """Everything of the VM a node's refusal depends on (not its name or namespace)."""
    spec = inp.vm.spec
    return (
        tuple(
            (
                r.name,
                r.flavor,
                r.count,
                r.optional,
                r.numa_policy,
                r.selector.model_dump_json() if r.selector else None,
                r.address,
                r.network.model_dump_json() if r.network else None,
            )
            for r in reqs
        ),
        tuple(sorted(skipped_vm)),
        spec.placement.model_dump_json() if spec.placement else None,
        spec.cpu.model_dump_json(),
        spec.memory,
        spec.hugepages.model_dump_json() if spec.hugepages else None,
        inp.cpu_allocation_ratio,
    )


def _shortage_text(r: _Req, have: int, need: int, excluded: Mapping[str, int] | None = None) -> str:
    """`have no free a100 (need 2): claimed by other VMs, blocked by their IOMMU group`: the
    count, then why the node's other devices of the flavor are not free, most common first
    (the per-node details carry the numbers)."""
    if r.address:
        text = f"have no free {r.flavor} at {r.address}"
    else:
        what = r.flavor
        if r.network is not None and r.network.physical_network:
            what = f"{r.flavor} VF on {r.network.physical_network}"
        if have == 0:
            text = f"have no free {what} (need {need})"
        else:
            text = f"have only {have} free {what} (need {need})"
    if excluded:
        # Categories only, in a fixed order, so the text changes when the cause does, not
        # with every count (each change is a status write and an Event); a device promised to
        # a bind in flight reads as claimed, which it is a moment later.
        seen = {"claimed by other VMs" if w == "being bound to other VMs" else w for w in excluded}
        seen -= IMPLIED_BY_SHORTAGE
        why = [w for w in EXCLUSION_ORDER if w in seen] + sorted(seen - set(EXCLUSION_ORDER))
        if why:
            text += ": " + ", ".join(why)
    return text


REFUSAL_FORMS: dict[str, str] = {
    "have no free <flavor> (need N): <why>": r"have no free .+ \(need \d+\)(: .+)?",
    "have only K free <flavor> (need N): <why>": r"have only \d+ free .+ \(need \d+\)(: .+)?",
    "have no free <flavor> at <address>": r"have no free \S+ at [0-9a-f:.]+(: .+)?",
    "cannot place <request> on a single NUMA node (at most K free <flavor> on one)": (
        r"cannot place \S+ on a single NUMA node \(at most \d+ free \S+ on one"
        r"(; \d+ report no NUMA node)?\)"
    ),
    "cannot place <requests> on one NUMA node": r"cannot place .+ on one NUMA node",
    "cannot place <requests> under one PCIe root": r"cannot place .+ under one PCIe root",
    "passed over alternative K (N <flavor>) of <request>: <why>": (
        r"passed over alternative \d+ \(\d+ \S+\) of \S+: .+"
    ),
    "cannot take whole IOMMU groups for N <flavor>": r"cannot take whole IOMMU groups for \d+ \S+",
    "cannot fit <requests> together (they compete for the same devices)": (
        r"cannot fit .+ together \(they compete for the same devices\)"
    ),
    "have only K MiB free memory for M MiB": r"have only \d+ MiB free memory for \d+ MiB",
    "have only K free CPUs for N vCPUs": r"have only \d+ free CPUs for \d+ vCPUs",
    "have only K free CPUs on NUMA node X for N dedicated vCPUs": (
        r"have only \d+ free CPUs on NUMA node \d+ for \d+ dedicated vCPUs"
    ),
    "have room for only K shared vCPUs on NUMA node X (need N)": (
        r"have room for only \d+ shared vCPUs on NUMA node \d+ \(need \d+\)"
    ),
    "have only K MiB free memory on NUMA node X (need M MiB)": (
        r"have only \d+ MiB free memory on NUMA node \d+ \(need \d+ MiB\)"
    ),
    "have only K free <size> hugepages on NUMA node X (need P)": (
        r"have only \d+ free \S+ hugepages on NUMA node \d+ \(need \d+\)"
    ),
    "not alive": r"not alive",
    "out of service": r"out of service",
    "the VM is migrating away from it": r"the VM is migrating away from it",
    "not the migration's target": r"not the migration's target",
    "didn't match the VM's nodeSelector": r"didn't match the VM's nodeSelector",
}
"""Every form a node's refusal reason takes (as the tenant guide lists them) -> its pattern.
tests/unit/test_refusal_docs.py holds the guide, these forms and the code to each other."""

EXCLUSION_ORDER = (
    "claimed by other VMs",
    "reserved after one-time use",
    HELD_SCRUBBING,
    HELD_SCRUB_FAILED,
    HELD_QUARANTINE,
    "whose PF is held by another VM",
    "whose VF is held by another VM",
    "whose PF's other functions are held by another VM",
    "blocked by their IOMMU group",
    "unhealthy",
    "cordoned",
    "not marked trusted by the admin",
    "without a netdev (macvtap needs one)",
    "not matching the request's selector",
)
"""Why a node's devices of a flavor are not free, in the order a refusal names them."""
IMPLIED_BY_SHORTAGE = frozenset({"at other addresses", "on other physical networks"})
"""Said already by the shortage text (`at 0000:3b:00.0`, `VF on physnet2`)."""


def summarize(refusals: Iterable[NodeRefusal], total: int) -> str:
    """kube-scheduler style: '0/5 nodes are available: 3 node(s) have ...; 2 node(s) not alive.'"""
    counts: Counter[str] = Counter()
    for r in refusals:
        for reason in dict.fromkeys(r.reasons):
            counts[reason] += 1
    if total == 0:
        return "0/0 nodes are available: no node publishes devices of the requested flavors."
    parts = [
        f"{n} node(s) {reason}" for reason, n in sorted(counts.items(), key=lambda x: (-x[1], x[0]))
    ]
    return f"0/{total} nodes are available: {'; '.join(parts)}."

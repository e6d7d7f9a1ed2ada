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

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Literal

from pcipt.api.v1alpha1 import (
    DeviceSelector,
    NetworkRequest,
    PassthroughVM,
    PciDevice,
    PciFlavor,
    parse_vlan_range,
)
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
    reserved_after_use: bool = False
    """A one-time-use device a VM has had, not yet freed by an admin."""

    @property
    def address(self) -> str:
        return self.facts.address

    @classmethod
    def from_model(cls, dev: PciDevice) -> Device:
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
            reserved_after_use=spec.reserved is not None,
        )


@dataclass(frozen=True, slots=True)
class NodeFacts:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    alive: bool = True

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
    free: Mapping[str, Mapping[str, int]] | None = None
    """flavor -> node -> `free_counts` of the node, as an index keeps them current. With it the
    search visits nodes in order of the best score they could reach and stops when no node
    left can beat the best found, so a decision costs what the candidates cost, not the
    cluster. Only valid when the VM holds no device yet (it is ignored otherwise)."""


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


@dataclass(frozen=True)
class Placement:
    node: str
    assignments: tuple[Assignment, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    score: tuple[int, ...] = ()
    numa_node: int | None = None
    """The NUMA node to pin the VM to: the one node every locality-asking request ended on."""

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
        return "FlavorNotFound", f"request {r.name}: flavor {r.flavor} does not exist"
    if r.network is not None and flavor.spec.device_type != "nic":
        return "FlavorNotFound", (
            f"network {r.name}: flavor {r.flavor} is a {flavor.spec.device_type} flavor; "
            "networks need a flavor of deviceType nic"
        )
    access = flavor.spec.access
    if access and not label_selector_matches(access.namespace_selector, inp.namespace_labels):
        return "NotPermitted", (
            f"request {r.name}: namespace {inp.vm.metadata.namespace} may not use flavor "
            f"{r.flavor} (it is limited to namespaces matching "
            f"{describe_label_selector(access.namespace_selector)})"
        )
    if r.network is not None and (why := _network_not_allowed(r.network, flavor)):
        return "NetworkNotAllowed", why
    return None


def request_problems(
    vm: PassthroughVM, flavors: Mapping[str, PciFlavor], namespace_labels: Mapping[str, str]
) -> list[str]:
    """What admission refuses: requests naming a missing or unsuitable flavor, a flavor the
    namespace may not use, VF settings the flavor forbids, more devices than one VM may have.
    Capacity and quotas are not checked here: they change, so they are scheduling's business."""
    inp = SchedulingInput(vm=vm, flavors=flavors, namespace_labels=namespace_labels)
    reqs = _requests(vm, flavors)
    problems = [p[1] for r in reqs if (p := _request_problem(r, inp)) is not None]
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


def check_vm(inp: SchedulingInput) -> tuple[Refusal | None, dict[str, str]]:
    """VM-level checks. Returns a refusal (when a mandatory request fails one) and the optional
    requests that must be skipped whatever the node, with why."""
    skipped: dict[str, str] = {}
    reqs = _requests(inp.vm, inp.flavors)
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
                    "LimitExceeded",
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
                    "LimitExceeded",
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


@dataclass
class _NodeView:
    node: str
    labels: dict[str, str]
    by_address: dict[str, Device]
    own_uid: str
    reserved: frozenset[str] | Set[str]

    def usable(self, d: Device) -> bool:
        """Free for this VM: healthy, not cordoned, not claimed or reserved for another VM."""
        if not d.healthy or d.unschedulable:
            return False
        if d.reserved_after_use and d.claim is None:
            return False
        if d.claim is not None:
            return d.claim.uid == self.own_uid
        return d.name not in self.reserved

    def group(self, d: Device) -> list[Device] | None:
        """The device and its IOMMU group peers, or None when the group cannot come along."""
        members = [d]
        for peer in d.peers:
            p = self.by_address.get(peer)
            if p is None or not self.usable(p):
                return None
            members.append(p)
        return members

    def blocked_by_group(self, d: Device) -> bool:
        return self.group(d) is None


def _why_not(view: _NodeView, d: Device) -> str:
    if not d.healthy:
        return "unhealthy"
    if d.unschedulable:
        return "cordoned"
    if d.reserved_after_use and d.claim is None:
        return "reserved after one-time use"
    if d.claim is not None and d.claim.uid != view.own_uid:
        return "claimed by other VMs"
    if d.claim is None and d.name in view.reserved:
        return "being bound to other VMs"
    return "blocked by their IOMMU group"


@dataclass
class _NodeResult:
    placement: Placement | None
    reasons: list[str]
    details: list[str]


def _matches_request(r: _Req, flavor: PciFlavor, d: Device, labels: Mapping[str, str]) -> bool:
    if not device_selector_matches(flavor.spec.selector, d.facts, labels):
        return False
    return _matches_extra(r, d, labels)


def _matches_extra(r: _Req, d: Device, labels: Mapping[str, str]) -> bool:
    if r.selector is not None and not device_selector_matches(r.selector, d.facts, labels):
        return False
    if r.address is not None and d.address != r.address:
        return False
    if r.network is not None:
        if r.network.physical_network and physical_network(d.facts) != r.network.physical_network:
            return False
        if r.network.mode == "macvtap" and not d.netdev:
            return False
    return True


def _pick(
    view: _NodeView,
    r: _Req,
    cands: list[Device],
    taken: set[str],
    numa: int | None,
) -> list[tuple[Device, bool]] | None:
    """Choose devices (whole IOMMU groups) for r among cands, on NUMA node `numa` if given.
    Returns every device taken with whether it counts toward r (False: an IOMMU companion),
    or None if r cannot be satisfied."""

    def order(d: Device) -> tuple[int, int, str]:
        own = 0 if d.claim is not None and d.claim.uid == view.own_uid else 1
        return (own, len(d.peers), d.address)

    eligible = {d.name for d in cands if numa is None or d.numa == numa}
    chosen: list[tuple[Device, bool]] = []
    counted = 0
    local_taken = set(taken)
    for d in sorted(cands, key=order):
        if counted >= r.count:
            break
        if d.name in local_taken or d.name not in eligible:
            continue
        members = view.group(d)
        if members is None or any(m.name in local_taken for m in members):
            continue
        for m in members:
            local_taken.add(m.name)
            counts = m.name in eligible and counted < r.count
            counted += counts
            chosen.append((m, counts))
    return chosen if counted >= r.count else None


def _place_on_node(
    inp: SchedulingInput,
    node: NodeFacts,
    node_devices: list[Device],
    reqs: list[_Req],
    skipped_vm: Mapping[str, str],
) -> _NodeResult:
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
    details: dict[str, str] = {}
    for r in reqs:
        flavor = inp.flavors[r.flavor]
        of_flavor = [
            d
            for d in node_devices
            if device_selector_matches(flavor.spec.selector, d.facts, labels)
        ]
        ok, excluded = [], Counter[str]()
        for d in of_flavor:
            if not _matches_extra(r, d, labels):
                excluded["not matching the request"] += 1
            elif not view.usable(d) or view.blocked_by_group(d):
                excluded[_why_not(view, d)] += 1
            else:
                ok.append(d)
        cands[r.name] = ok
        free_by_flavor[r.flavor] = sum(
            1 for d in of_flavor if view.usable(d) and not view.blocked_by_group(d)
        )
        if excluded:
            details[r.name] = ", ".join(f"{n} {why}" for why, n in sorted(excluded.items()))

    same_numa = set(inp.vm.spec.placement.same_numa or []) if inp.vm.spec.placement else set()
    active = [r for r in reqs if r.name not in skipped_vm]
    group = [r for r in active if r.name in same_numa]
    rest = [r for r in active if r.name not in same_numa]

    def prio(r: _Req) -> tuple[int, int, int, str]:
        policy_rank = {"required": 0, "preferred": 1, "none": 2}[r.numa_policy]
        return (1 if r.optional else 0, 0 if r.address else 1, policy_rank, r.name)

    taken: set[str] = set()
    picked: dict[str, list[tuple[Device, bool]]] = {}
    reasons: list[str] = []
    notes: list[str] = []
    skipped: list[tuple[str, str]] = []
    penalty = 0

    def fail(r: _Req, reason: str) -> None:
        if r.optional:
            skipped.append((r.name, reason))
        else:
            reasons.append(reason)
            if r.name in details:
                notes.append(f"{r.label}: {details[r.name]}")

    def shortage(r: _Req) -> str:
        return _shortage_text(r, sum(1 for d in cands[r.name] if d.name not in taken), r.count)

    # 1. sameNUMA group: every request of it inside one NUMA node.
    if group:
        numas = sorted({d.numa for r in group for d in cands[r.name] if d.numa >= 0})
        best: tuple[int, int, dict[str, list[tuple[Device, bool]]]] | None = None
        mandatory = [r for r in sorted(group, key=prio) if not r.optional]
        for n in numas:
            trial_taken = set(taken)
            trial: dict[str, list[tuple[Device, bool]]] = {}
            fits = True
            for r in mandatory:
                got = _pick(view, r, cands[r.name], trial_taken, n)
                if got is None:
                    fits = False
                    break
                trial[r.name] = got
                trial_taken.update(d.name for d, _ in got)
            if fits:
                leftover = sum(
                    1
                    for r in group
                    for d in cands[r.name]
                    if d.numa == n and d.name not in trial_taken
                )
                if best is None or (leftover, n) < (best[0], best[1]):
                    best = (leftover, n, trial)
        if best is None:
            for r in mandatory:
                if len(cands[r.name]) < r.count:
                    fail(r, shortage(r))
                    break
            else:
                names = ", ".join(r.name for r in group)
                reasons.append(f"cannot place {names} on one NUMA node")
        else:
            _, n, trial = best
            picked.update(trial)
            for got in trial.values():
                taken.update(d.name for d, _ in got)
            for r in sorted(group, key=prio):
                if r.optional:
                    got = _pick(view, r, cands[r.name], taken, n)
                    if got is None:
                        fail(
                            r, f"no free {r.flavor} left on NUMA node {n} with the rest of sameNUMA"
                        )
                    else:
                        picked[r.name] = got
                        taken.update(d.name for d, _ in got)

    # 2. The other requests, most constrained first, mandatory before optional.
    for r in sorted(rest, key=prio):
        c = [d for d in cands[r.name] if d.name not in taken]
        if len(c) < r.count:
            fail(r, shortage(r))
            continue
        got = None
        if r.numa_policy in ("required", "preferred"):
            caps = Counter(d.numa for d in c if d.name not in taken and d.numa >= 0)
            for n in sorted(caps, key=lambda n: (caps[n], n)):
                if caps[n] >= r.count:
                    got = _pick(view, r, c, taken, n)
                    if got is not None:
                        break
            if got is None and r.numa_policy == "required":
                most = max(caps.values(), default=0)
                fail(
                    r,
                    f"cannot place {r.name} on a single NUMA node "
                    f"(at most {most} free {r.flavor} on one)",
                )
                continue
            if got is None:
                penalty += 1
        if got is None:
            got = _pick(view, r, c, taken, None)
        if got is None:
            fail(r, f"cannot take whole IOMMU groups for {r.count} {r.flavor}")
            continue
        picked[r.name] = got
        taken.update(d.name for d, _ in got)

    if reasons:
        return _NodeResult(None, reasons, notes)

    assignments: list[Assignment] = []
    for r in reqs:
        for d, counts in picked.get(r.name, []):
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
                )
            )
    used_by_flavor = Counter(a.flavor for a in assignments if a.flavor)
    left = sum(free_by_flavor[f] - used_by_flavor.get(f, 0) for f in free_by_flavor)
    all_skipped = tuple(sorted({**dict(skipped), **{k: v for k, v in skipped_vm.items()}}.items()))
    stranded = left if inp.policy == "best-fit" else -left
    # Devices this VM already holds (a bind interrupted by a crash) are reused before anything
    # else counts, so a re-plan converges on the claims already made instead of churning.
    own = sum(1 for got in picked.values() for d, _ in got if d.claim is not None)
    score = (len(all_skipped), -own, penalty, stranded)
    local = {
        d.numa
        for r in reqs
        if r.numa_policy in ("required", "preferred") or r.name in same_numa
        for d, counts in picked.get(r.name, [])
        if counts
    }
    pin = next(iter(local)) if len(local) == 1 and min(local) >= 0 else None
    return _NodeResult(Placement(node.name, tuple(assignments), all_skipped, score, pin), [], [])


# --- the whole decision ---------------------------------------------------------------------


def schedule(inp: SchedulingInput) -> Result:
    """Place the VM, or say why not. Deterministic for the same input."""
    refusal, skipped_vm = check_vm(inp)
    if refusal is not None:
        return refusal
    reqs = _requests(inp.vm, inp.flavors)

    by_node: Mapping[str, Sequence[Device]]
    if inp.by_node is not None:
        by_node = inp.by_node
    else:
        grouped: dict[str, list[Device]] = defaultdict(list)
        for d in inp.devices:
            grouped[d.node].append(d)
        by_node = grouped
    node_names = sorted(set(inp.nodes) | set(by_node))
    selector = inp.vm.spec.node_selector or {}

    refusals: dict[str, NodeRefusal] = {}
    eligible: list[str] = []
    for name in node_names:
        facts = inp.nodes.get(name) or NodeFacts(name)
        if not facts.alive:
            refusals[name] = NodeRefusal(name, ("not alive",))
        elif any(facts.effective_labels().get(k) != v for k, v in selector.items()):
            refusals[name] = NodeRefusal(name, ("didn't match the VM's nodeSelector",))
        else:
            eligible.append(name)

    def evaluate(name: str) -> Placement | None:
        facts = inp.nodes.get(name) or NodeFacts(name)
        res = _place_on_node(inp, facts, list(by_node.get(name, ())), reqs, skipped_vm)
        if res.placement is None:
            refusals[name] = NodeRefusal(name, tuple(res.reasons), tuple(res.details))
        return res.placement

    best: Placement | None = None
    if inp.free is not None:
        best = _indexed_search(
            inp,
            reqs,
            skipped_vm=skipped_vm,
            eligible=eligible,
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
        reason="Unschedulable",
        nodes=ordered,
        total_nodes=len(node_names),
    )


def _indexed_search(
    inp: SchedulingInput,
    reqs: list[_Req],
    *,
    skipped_vm: Mapping[str, str],
    eligible: list[str],
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
    for name in eligible:
        counts = {f: free.get(f, {}).get(name, 0) for f in flavors}
        if any(not r.optional and counts[r.flavor] < mandatory[r.flavor] for r in active):
            short.append(name)
            continue
        left = sum(max(0, counts[f] - wanted[f]) for f in flavors)
        bounds.append((sign * left, name))
    bounds.sort()
    best: Placement | None = None
    for bound, name in bounds:
        if (
            best is not None
            and best.score[:3] == (0, 0, 0)
            and (best.score[3], best.node) <= (bound, name)
        ):
            break
        got = evaluate(name)
        if got is not None and (best is None or (got.score, name) < (best.score, best.node)):
            best = got
    if best is None:
        # A refusal: the nodes the counts ruled out are looked at device by device after all,
        # so each says why (claimed, reserved, blocked by its IOMMU group, ...), not only how
        # many are free. Only refusals pay for this; a placement never does.
        for name in short:
            evaluate(name)
    return best


def _shortage_text(r: _Req, have: int, need: int) -> str:
    if r.address:
        return f"have no free {r.flavor} at {r.address}"
    what = r.flavor
    if r.network is not None and r.network.physical_network:
        what = f"{r.flavor} VF on {r.network.physical_network}"
    if have == 0:
        return f"have no free {what} (need {need})"
    return f"have only {have} free {what} (need {need})"


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

"""Host CPUs and memory for a VM on one node: what it asks for, what the node has left, and
which NUMA node(s) and CPUs it gets — or why not.

PURE, like scheduling.py, which calls it for every complete device placement it considers.

Counting follows Nova's NUMATopologyFilter and the kube-scheduler's resources fit:
- a `shared` VM that is not bound to a NUMA node floats over the host: its vCPUs count
  against the host's shared CPUs (those not dedicated to a VM) times the CPU allocation ratio,
  its memory against the host's memory;
- a VM bound to a NUMA node (its devices asked for locality and `cpu.pinning` is auto, or it
  is `dedicated`, or it uses hugepages) counts there: `dedicated` takes whole host CPUs of its
  own (one per vCPU, thread siblings together first), `shared` counts against that node's
  shared CPUs times the ratio; memory (or hugepages of its size) against that node's;
- a VM too big for one NUMA node spans up to `cpu.numaNodes` of them, vCPUs and memory split
  evenly, each part counted on its node.
Memory is never overcommitted.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from pcipt.api.v1alpha1 import ComputeStatus, NumaShare, PassthroughVM
from pcipt.compute import PAGE_NAMES, NodeCompute, NumaCompute
from pcipt.cpulist import format_cpulist
from pcipt.quantity import quantity_bytes

MIB = 1024 * 1024


@dataclass(frozen=True)
class Demand:
    vcpus: int
    memory_mib: int
    policy: str = "shared"
    page_kib: int | None = None
    numa_nodes: int = 1
    pinning: str = "auto"

    @classmethod
    def of(cls, vm: PassthroughVM) -> Demand:
        spec = vm.spec
        page = spec.hugepages
        return cls(
            vcpus=spec.cpu.cores,
            memory_mib=-(-quantity_bytes(spec.memory) // MIB),
            policy=spec.cpu.policy,
            page_kib=quantity_bytes(page.page_size) // 1024 if page is not None else None,
            numa_nodes=spec.cpu.numa_nodes,
            pinning=spec.cpu.pinning,
        )


@dataclass
class NumaUse:
    dedicated: set[int] = field(default_factory=set)
    shared_vcpus: int = 0
    memory_mib: int = 0
    pages: Counter[int] = field(default_factory=Counter)


_NO_USE = NumaUse()
"""What an untouched NUMA node has taken (read only)."""


@dataclass
class NodeUse:
    """What the VMs on a node (and binds in flight to it) have taken."""

    numa: dict[int, NumaUse] = field(default_factory=dict)
    floating_vcpus: int = 0
    floating_memory_mib: int = 0

    def on(self, n: int) -> NumaUse:
        return self.numa.setdefault(n, NumaUse())

    def add(self, c: ComputeStatus) -> None:
        if not c.numa:
            self.floating_vcpus += c.vcpus if c.policy == "shared" else 0
            self.floating_memory_mib += c.memory_mib
            return
        for share in c.numa:
            u = self.on(share.node)
            if c.policy == "dedicated" and share.cpus:
                u.dedicated.update(share.cpus)
            else:
                u.shared_vcpus += len(share.vcpus)
            if c.page_size_kib:
                u.pages[c.page_size_kib] += share.memory_mib * 1024 // c.page_size_kib
            else:
                u.memory_mib += share.memory_mib

    @classmethod
    def of(cls, taken: Iterable[ComputeStatus]) -> NodeUse:
        use = cls()
        for c in taken:
            use.add(c)
        return use


def _split(total: int, k: int) -> list[int]:
    return [total // k + (1 if i < total % k else 0) for i in range(k)]


def _pick_cpus(numa: NumaCompute, taken: set[int], want: int) -> list[int] | None:
    """`want` free host CPUs, whole cores first (a vCPU's siblings stay with the VM, no other
    VM's thread beside it), then single threads of cores already partly used."""
    cores = numa.cores or tuple((c,) for c in numa.cpus)
    whole = [core for core in cores if not set(core) & taken]
    partial = [tuple(c for c in core if c not in taken) for core in cores if set(core) & taken]
    out: list[int] = []
    for core in sorted(whole, key=lambda c: (-len(c), c)) + sorted(p for p in partial if p):
        if len(out) >= want:
            break
        # An odd vCPU count takes one thread of its last core; the sibling stays free.
        out.extend(core[: want - len(out)])
    return out if len(out) >= want else None


def _fits_on(
    d: Demand,
    n: int,
    numa: NumaCompute,
    use: NodeUse,
    *,
    vcpus: int,
    memory_mib: int,
    ratio: float,
) -> tuple[list[int] | None, str | None]:
    """(dedicated CPUs or None, problem or None) for one NUMA node's share."""
    u = use.numa.get(n) or _NO_USE
    shared_pool = len([c for c in numa.cpus if c not in u.dedicated])
    cpus = None
    if d.policy == "dedicated":
        cpus = _pick_cpus(numa, u.dedicated, vcpus)
        free = shared_pool
        if cpus is None:
            return None, (
                f"have only {free} free CPUs on NUMA node {n} for {vcpus} dedicated vCPUs"
            )
        if (shared_pool - vcpus) * ratio < u.shared_vcpus:
            return None, (
                f"have only {free} free CPUs on NUMA node {n} for {vcpus} dedicated vCPUs"
            )
    else:
        room = int(shared_pool * ratio) - u.shared_vcpus
        if room < vcpus:
            return None, (
                f"have room for only {max(room, 0)} shared vCPUs on NUMA node {n} (need {vcpus})"
            )
    problem = _memory_problem(d, n, numa, u, memory_mib)
    if problem:
        return None, problem
    return cpus, None


def _memory_problem(
    d: Demand, n: int, numa: NumaCompute, u: NumaUse, memory_mib: int
) -> str | None:
    if d.page_kib:
        need = memory_mib * 1024 // d.page_kib
        left = numa.hugepages.get(d.page_kib, 0) - u.pages[d.page_kib]
        if left < need:
            size = PAGE_NAMES.get(d.page_kib, f"{d.page_kib}KiB")
            return f"have only {max(left, 0)} free {size} hugepages on NUMA node {n} (need {need})"
        return None
    left = numa.memory_mib - u.memory_mib
    if left < memory_mib:
        return f"have only {max(left, 0)} MiB free memory on NUMA node {n} (need {memory_mib} MiB)"
    return None


def fit(
    d: Demand,
    topo: NodeCompute,
    use: NodeUse,
    pin: int | None,
    ratio: float = 1.0,
) -> ComputeStatus | str:
    """Where the VM's vCPUs and memory go on this node, or why they do not fit."""
    total_mem = sum(c.memory_mib for c in topo.numa.values())
    used_mem = use.floating_memory_mib + sum(u.memory_mib for u in use.numa.values())
    if not d.page_kib and total_mem - used_mem < d.memory_mib:
        return f"have only {max(total_mem - used_mem, 0)} MiB free memory for {d.memory_mib} MiB"
    bound = (
        d.policy == "dedicated"
        or d.page_kib is not None
        or (pin is not None and d.pinning == "auto")
    )
    base = {"policy": d.policy, "vcpus": d.vcpus, "memoryMiB": d.memory_mib}
    if d.page_kib:
        base["pageSizeKiB"] = d.page_kib
    if not bound:
        pool = sum(
            len(n.cpus) - len(use.numa[i].dedicated & set(n.cpus)) if i in use.numa else len(n.cpus)
            for i, n in topo.numa.items()
        )
        taken = use.floating_vcpus + sum(u.shared_vcpus for u in use.numa.values())
        room = int(pool * ratio) - taken
        if room < d.vcpus:
            return f"have only {max(room, 0)} free CPUs for {d.vcpus} vCPUs"
        return ComputeStatus.model_validate(base)
    nodes = sorted(topo.numa)
    first_problem: str | None = None
    for k in range(1, min(d.numa_nodes, len(nodes)) + 1):
        if d.vcpus < k:
            break
        vcpu_parts = _split(d.vcpus, k)
        unit = d.page_kib // 1024 if d.page_kib and d.page_kib >= 1024 else 1
        if d.memory_mib % unit:
            break
        mem_parts = [p * unit for p in _split(d.memory_mib // unit, k)]
        combos = [c for c in itertools.combinations(nodes, k) if pin is None or pin in c]
        # Best fit: the NUMA node(s) with the least free memory that still fit go first, so
        # big holes stay whole for big VMs.
        combos.sort(key=lambda c: (sum(_free_mem(topo, use, n) for n in c), c))
        for combo in combos:
            shares = []
            problem = None
            start = 0
            for n, vc, mem in zip(combo, vcpu_parts, mem_parts, strict=True):
                cpus, problem = _fits_on(
                    d, n, topo.numa[n], use, vcpus=vc, memory_mib=mem, ratio=ratio
                )
                if problem:
                    break
                shares.append(
                    NumaShare.model_validate(
                        {
                            "node": n,
                            "vcpus": list(range(start, start + vc)),
                            "cpus": cpus,
                            "memoryMiB": mem,
                        }
                    )
                )
                start += vc
            if problem is None:
                numa = [s.model_dump(by_alias=True) for s in shares]
                return ComputeStatus.model_validate({**base, "numa": numa})
            first_problem = first_problem or problem
    # Only a VM whose memory is not a whole number of its hugepages gets here, and admission
    # refuses those.
    return (
        first_problem
        or f"have only 0 MiB free memory on NUMA node {nodes[0]} (need {d.memory_mib} MiB)"
    )


def _free_mem(topo: NodeCompute, use: NodeUse, n: int) -> int:
    u = use.numa.get(n)
    return topo.numa[n].memory_mib - (u.memory_mib if u is not None else 0)


def conflict(topo: NodeCompute, use: NodeUse, c: ComputeStatus, ratio: float = 1.0) -> str | None:
    """Why a VM's counted CPUs and memory no longer fit beside what others took (another
    controller's bind got there first), or None. Used when the take is written down."""
    if not c.numa:
        d = Demand(c.vcpus, c.memory_mib, c.policy, c.page_size_kib, 1, "none")
        got = fit(d, topo, use, None, ratio)
        return got if isinstance(got, str) else None
    for share in c.numa:
        numa = topo.numa.get(share.node)
        if numa is None:
            return f"NUMA node {share.node} is not on the node"
        d = Demand(len(share.vcpus), share.memory_mib, c.policy, c.page_size_kib)
        u = use.numa.get(share.node) or _NO_USE
        if c.policy == "dedicated":
            mine = set(share.cpus or ())
            if mine & u.dedicated or not mine <= set(numa.cpus):
                return f"host CPUs {format_cpulist(sorted(mine & u.dedicated))} are taken"
            problem = _memory_problem(d, share.node, numa, u, share.memory_mib)
            if problem:
                return problem
            if (len([x for x in numa.cpus if x not in u.dedicated]) - len(mine)) * ratio < (
                u.shared_vcpus
            ):
                return f"the shared vCPUs on NUMA node {share.node} need those CPUs"
        else:
            _, problem = _fits_on(
                d,
                share.node,
                numa,
                use,
                vcpus=len(share.vcpus),
                memory_mib=share.memory_mib,
                ratio=ratio,
            )
            if problem:
                return problem
    return None

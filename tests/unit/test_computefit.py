"""Host CPUs and memory: what a VM takes, as Nova's NUMATopologyFilter and the kube-scheduler
count it, and the topology the node plugin reads from sysfs."""

from __future__ import annotations

from pathlib import Path

from controller.computefit import Demand, NodeUse, fit
from controller.scheduling import NodeFacts, Placement, Refusal, schedule
from nodeplugin.discovery import read_compute
from pcipt.api.v1alpha1 import ComputeStatus
from pcipt.compute import NodeCompute, NumaCompute
from tests.unit.hosts import build_lab
from tests.unit.schedfix import dev, inp, vm

A = "node-a"


def host(cpus_per_node: int = 8, memory_mib: int = 16384, smt: bool = True) -> NodeCompute:
    """Two NUMA nodes; CPU c and c + 16 are one core's threads when smt."""
    numa = {}
    for n in (0, 1):
        first = n * cpus_per_node // (2 if smt else 1)
        if smt:
            half = cpus_per_node // 2
            cpus = tuple(range(first, first + half)) + tuple(range(first + 16, first + 16 + half))
            cores = tuple((c, c + 16) for c in range(first, first + half))
        else:
            cpus = tuple(range(first, first + cpus_per_node))
            cores = tuple((c,) for c in cpus)
        numa[n] = NumaCompute(cpus, cores, memory_mib, {1048576: 4, 2048: 512})
    return NodeCompute(numa)


def test_the_issue_case_is_refused_with_the_resource_named() -> None:
    # A 64-vCPU, 256 GiB VM on 16-CPU, 64 GiB NUMA nodes.
    topo = NodeCompute(
        {n: NumaCompute(tuple(range(n * 16, n * 16 + 16)), (), 65536) for n in (0, 1)}
    )
    got = fit(Demand(64, 262144), topo, NodeUse(), pin=None)
    assert got == "have only 131072 MiB free memory for 262144 MiB"
    got = fit(Demand(64, 65536), topo, NodeUse(), pin=0)
    assert got == "have room for only 16 shared vCPUs on NUMA node 0 (need 64)"
    got = fit(Demand(64, 65536), topo, NodeUse(), pin=None)
    assert got == "have only 32 free CPUs for 64 vCPUs"


def test_dedicated_takes_whole_cores_and_two_vms_never_share_a_cpu() -> None:
    topo = host()
    first = fit(Demand(4, 1024, "dedicated"), topo, NodeUse(), pin=None)
    assert isinstance(first, ComputeStatus)
    (share,) = first.numa
    assert share.cpus == [0, 16, 1, 17]  # two whole cores: siblings together
    second = fit(Demand(4, 1024, "dedicated"), topo, NodeUse.of([first]), pin=None)
    assert isinstance(second, ComputeStatus)
    assert set(second.numa[0].cpus or ()) & set(share.cpus) == set()
    # NUMA node 0 has 8 CPUs: a third 4-vCPU VM goes to node 1.
    third = fit(Demand(4, 1024, "dedicated"), topo, NodeUse.of([first, second]), pin=None)
    assert isinstance(third, ComputeStatus) and third.numa[0].node == 1
    # Pinned to node 0 by its devices, it does not fit.
    assert fit(Demand(4, 1024, "dedicated"), topo, NodeUse.of([first, second]), pin=0) == (
        "have only 0 free CPUs on NUMA node 0 for 4 dedicated vCPUs"
    )


def test_dedicated_cpus_leave_the_shared_pool() -> None:
    topo = host()
    shared = fit(Demand(6, 1024), topo, NodeUse(), pin=0)
    assert isinstance(shared, ComputeStatus)
    # 6 shared vCPUs on node 0's 8 CPUs: a dedicated VM may take 2, not 4.
    assert isinstance(
        fit(Demand(2, 1024, "dedicated"), topo, NodeUse.of([shared]), pin=0), ComputeStatus
    )
    assert isinstance(fit(Demand(4, 1024, "dedicated"), topo, NodeUse.of([shared]), pin=0), str)


def test_hugepages_are_counted_per_numa_node_and_size() -> None:
    topo = host()
    d = Demand(2, 4096, page_kib=1048576)
    a = fit(d, topo, NodeUse(), pin=0)
    assert isinstance(a, ComputeStatus) and a.page_size_kib == 1048576
    assert fit(d, topo, NodeUse.of([a]), pin=0) == (
        "have only 0 free 1Gi hugepages on NUMA node 0 (need 4)"
    )
    b = fit(d, topo, NodeUse.of([a]), pin=None)
    assert isinstance(b, ComputeStatus) and b.numa[0].node == 1


def test_a_vm_too_big_for_one_numa_node_spans_when_allowed() -> None:
    topo = host()
    d = Demand(12, 24576, "dedicated", numa_nodes=2)
    got = fit(d, topo, NodeUse(), pin=None)
    assert isinstance(got, ComputeStatus)
    assert [(s.node, s.vcpus, s.memory_mib) for s in got.numa] == [
        (0, list(range(6)), 12288),
        (1, list(range(6, 12)), 12288),
    ]
    assert isinstance(fit(Demand(12, 24576, "dedicated"), topo, NodeUse(), pin=None), str)
    # Bound to node 0 by its devices, it may still span when allowed: node 0 is one part.
    pinned = fit(d, topo, NodeUse(), pin=0)
    assert isinstance(pinned, ComputeStatus) and {s.node for s in pinned.numa} == {0, 1}


def test_floating_shared_vms_count_host_wide() -> None:
    topo = host()
    a = fit(Demand(10, 8192, pinning="none"), topo, NodeUse(), pin=0)
    assert isinstance(a, ComputeStatus) and a.numa == []
    assert fit(Demand(8, 1024, pinning="none"), topo, NodeUse.of([a]), pin=None) == (
        "have only 6 free CPUs for 8 vCPUs"
    )


def test_the_scheduler_counts_cpus_with_devices_and_names_the_shortage() -> None:
    topo = host()
    devices = [dev(A, "0000:3b:00.0", numa=0), dev(A, "0000:3c:00.0", numa=1)]
    nodes = [NodeFacts(A, compute=topo)]
    want = vm([{"name": "gpu", "flavor": "a100", "numaPolicy": "required"}])
    want.spec.cpu.cores = 8
    want.spec.cpu.policy = "dedicated"
    base = inp(want, devices, nodes=nodes)
    got = schedule(base)
    assert isinstance(got, Placement) and got.compute is not None
    # Node 0's CPUs are taken: the search takes the GPU on node 1 instead.
    taken = fit(Demand(8, 1024, "dedicated"), topo, NodeUse(), pin=0)
    assert isinstance(taken, ComputeStatus)
    from dataclasses import replace

    got = schedule(replace(base, compute_taken={A: [taken]}))
    assert isinstance(got, Placement)
    assert got.assignments[0].address == "0000:3c:00.0" and got.numa_node == 1
    assert got.compute is not None and got.compute.numa[0].node == 1
    both = fit(Demand(8, 1024, "dedicated"), topo, NodeUse.of([taken]), pin=1)
    assert isinstance(both, ComputeStatus)
    refused = schedule(replace(base, compute_taken={A: [taken, both]}))
    assert isinstance(refused, Refusal)
    assert "free CPUs on NUMA node" in refused.nodes[0].reasons[0]


def test_topology_is_read_from_sysfs(tmp_path: Path) -> None:
    build_lab(tmp_path / "sys")
    topo = read_compute(tmp_path / "sys", reserved_cpus=(0, 16), reserved_memory_mib=1024)
    assert topo is not None and sorted(topo.numa) == [0, 1]
    n0 = topo.numa[0]
    assert 0 not in n0.cpus and 16 not in n0.cpus and len(n0.cpus) == 14
    assert (1, 17) in n0.cores and (0, 16) not in n0.cores
    assert n0.hugepages == {1048576: 4}
    assert n0.memory_mib == 65536 - 4 * 1024 - 1024
    assert topo.numa[1].hugepages == {2048: 1024}
    assert NodeCompute.from_json(topo.to_json()) == topo
    assert NodeCompute.from_json("{not json") is None

#!/usr/bin/env python3
"""The scheduler's decision time on a big inventory, in-process (no API server): 500 nodes x
10 GPUs (5 per NUMA node), about a third of them claimed, each node publishing a compute
topology (2 NUMA nodes x 32 CPUs in 16 two-thread cores, 256 GiB each).

Figures (median and p99 of --runs decisions each, in ms):
- one_gpu: a 1-GPU VM, with the controller's free-count index, and without it;
- packing: three NUMA-required requests of 1, 2 and 2 GPUs (needs the search to backtrack
  on nodes with 2 + 3 free);
- dedicated: 2 GPUs NUMA-required, 16 dedicated vCPUs and 64 GiB on hugepages;
- refusal: a 1-GPU VM on a full cluster, every node examined to say why; then the same again
  from the refusal memo (what a waiting VM costs when it is retried and nothing changed).

    .venv/bin/python bench/schedule.py [--nodes 500] [--runs 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from controller.scheduling import (
    Claim,
    Device,
    NodeFacts,
    Placement,
    Refusal,
    SchedulingInput,
    free_counts,
    schedule,
)
from pcipt.api.v1alpha1 import PassthroughVM, PciFlavor, pcidevice_name
from pcipt.compute import NodeCompute, NumaCompute
from pcipt.selectors import DeviceFacts

FLAVOR = PciFlavor.model_validate(
    {
        "metadata": {"name": "a100"},
        "spec": {"deviceType": "gpu", "selector": {"vendorIDs": ["10de"]}},
    }
)
OTHER = Claim("other", "x", "x", "gpu", "a100")


def topology() -> NodeCompute:
    numa = {}
    for n in (0, 1):
        first = n * 16
        cpus = tuple(range(first, first + 16)) + tuple(range(first + 32, first + 48))
        cores = tuple((c, c + 32) for c in range(first, first + 16))
        numa[n] = NumaCompute(cpus, cores, 262144, {1048576: 128})
    return NodeCompute(numa)


def inventory(nodes: int, full: bool) -> tuple[list[Device], dict[str, NodeFacts]]:
    devices = []
    for n in range(nodes):
        node = f"node-{n:03d}"
        for i in range(10):
            address = f"0000:{0x10 + i:02x}:00.0"
            held = full or (n * 10 + i) % 3 == 0
            devices.append(
                Device(
                    name=pcidevice_name(node, address),
                    node=node,
                    facts=DeviceFacts(address=address, vendor_id="10de", product_id="20b0"),
                    numa=i // 5,
                    iommu_group=n * 10 + i,
                    claim=OTHER if held else None,
                    resource_version="1",
                )
            )
    topo = topology()
    return devices, {
        f"node-{n:03d}": NodeFacts(f"node-{n:03d}", compute=topo) for n in range(nodes)
    }


def vm(spec: dict[str, Any]) -> PassthroughVM:
    return PassthroughVM.model_validate(
        {"metadata": {"name": "vm", "namespace": "t", "uid": "vm-uid"}, "spec": spec}
    )


def indexed(inp: SchedulingInput) -> SchedulingInput:
    by_node: dict[str, list[Device]] = {}
    for d in inp.devices:
        by_node.setdefault(d.node, []).append(d)
    free: dict[str, dict[str, int]] = {"a100": {}}
    for node, devs in by_node.items():
        free["a100"][node] = free_counts(devs, inp.flavors, {}, frozenset())["a100"]
    return replace(inp, devices=(), by_node=by_node, free=free)


def timed(fn: Callable[[], object], runs: int) -> dict[str, float]:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return {
        "p50_ms": round(statistics.median(samples), 3),
        "p99_ms": round(samples[min(len(samples) - 1, int(len(samples) * 0.99))], 3),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=500)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    devices, nodes = inventory(args.nodes, full=False)
    base = SchedulingInput(
        vm=vm({"memory": "8Gi"}), flavors={"a100": FLAVOR}, devices=devices, nodes=nodes
    )
    fast = indexed(base)
    out: dict[str, Any] = {"nodes": args.nodes, "devices": len(devices)}

    one = vm({"memory": "8Gi", "devices": [{"name": "gpu", "flavor": "a100"}]})
    assert isinstance(schedule(replace(fast, vm=one)), Placement)
    out["one_gpu_indexed"] = timed(lambda: schedule(replace(fast, vm=one)), args.runs)
    out["one_gpu_every_node"] = timed(
        lambda: schedule(replace(base, vm=one)), max(5, args.runs // 10)
    )

    packing = vm(
        {
            "memory": "8Gi",
            "devices": [
                {"name": "a", "flavor": "a100", "count": 1, "numaPolicy": "required"},
                {"name": "b", "flavor": "a100", "count": 2, "numaPolicy": "required"},
                {"name": "c", "flavor": "a100", "count": 2, "numaPolicy": "required"},
            ],
        }
    )
    got = schedule(replace(fast, vm=packing))
    out["packing_placed"] = isinstance(got, Placement)
    out["packing"] = timed(lambda: schedule(replace(fast, vm=packing)), args.runs)

    dedicated = vm(
        {
            "cpu": {"cores": 16, "policy": "dedicated"},
            "memory": "64Gi",
            "hugepages": {"pageSize": "1Gi"},
            "devices": [{"name": "g", "flavor": "a100", "count": 2, "numaPolicy": "required"}],
        }
    )
    got = schedule(replace(fast, vm=dedicated))
    assert isinstance(got, Placement) and got.compute is not None
    out["dedicated"] = timed(lambda: schedule(replace(fast, vm=dedicated)), args.runs)

    full_devices, _ = inventory(args.nodes, full=True)
    full = indexed(replace(base, devices=full_devices, vm=one))
    assert isinstance(schedule(full), Refusal)
    out["refusal_every_node"] = timed(lambda: schedule(full), max(5, args.runs // 10))
    memo: dict[tuple[object, ...], Any] = {}
    versions = {name: 1 for name in nodes}
    memoised = replace(full, refusal_memo=memo, node_versions=versions)
    schedule(memoised)
    out["refusal_from_memo"] = timed(lambda: schedule(memoised), args.runs)

    for key, value in out.items():
        print(f"{key}: {value}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

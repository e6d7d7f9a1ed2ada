"""A host's compute resources, as the node plugin publishes them and the controller counts
them: CPUs per NUMA node with their thread siblings, memory and hugepages per NUMA node, and
the CPUs and memory kept for the host. PURE.

The node plugin writes it to its Lease (annotation `pcipt.io/compute`), which the controller
watches already for liveness:

    {"numa": {"0": {"cpus": "0-15,32-47", "cores": "0,32;1,33;...", "memoryMiB": 257000,
                    "hugepages": {"2048": 0, "1048576": 64}}, ...},
     "reservedCpus": "0-1,32-33", "reservedMemoryMiB": {"0": 4096}}

`cpus` and `memoryMiB` are what VMs may use: the reserved CPUs and memory are already taken out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from pcipt.api.v1alpha1 import ComputeStatus
from pcipt.cpulist import format_cpulist, parse_cpulist

ANNOTATION = "pcipt.io/compute"
PAGE_NAMES = {2048: "2Mi", 1048576: "1Gi"}


@dataclass(frozen=True)
class NumaCompute:
    cpus: tuple[int, ...]
    """CPUs VMs may use (the host's reserved ones left out)."""
    cores: tuple[tuple[int, ...], ...] = ()
    """Thread-sibling groups among `cpus`: the hardware threads of one core."""
    memory_mib: int = 0
    """Memory VMs may use, MiB (the host's reserved memory left out)."""
    hugepages: Mapping[int, int] = field(default_factory=dict)
    """Page size KiB -> pages configured on this node."""


@dataclass(frozen=True)
class NodeCompute:
    numa: Mapping[int, NumaCompute]
    reserved_cpus: tuple[int, ...] = ()
    reserved_memory_mib: Mapping[int, int] = field(default_factory=dict)

    def to_json(self) -> str:
        doc = {
            "numa": {
                str(n): {
                    "cpus": format_cpulist(list(c.cpus)),
                    "cores": ";".join(",".join(str(x) for x in core) for core in c.cores),
                    "memoryMiB": c.memory_mib,
                    "hugepages": {str(k): v for k, v in sorted(c.hugepages.items())},
                }
                for n, c in sorted(self.numa.items())
            },
            "reservedCpus": format_cpulist(list(self.reserved_cpus)),
            "reservedMemoryMiB": {str(k): v for k, v in sorted(self.reserved_memory_mib.items())},
        }
        return json.dumps(doc, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> NodeCompute | None:
        """None when absent or unreadable (the node is then not counted, as before)."""
        if not text:
            return None
        try:
            doc = json.loads(text)
            numa = {}
            for n, c in doc["numa"].items():
                cores = tuple(
                    tuple(int(x) for x in group.split(","))
                    for group in str(c.get("cores", "")).split(";")
                    if group
                )
                numa[int(n)] = NumaCompute(
                    cpus=parse_cpulist(str(c.get("cpus", ""))),
                    cores=cores,
                    memory_mib=int(c.get("memoryMiB", 0)),
                    hugepages={int(k): int(v) for k, v in (c.get("hugepages") or {}).items()},
                )
            return cls(
                numa=numa,
                reserved_cpus=parse_cpulist(str(doc.get("reservedCpus", ""))),
                reserved_memory_mib={
                    int(k): int(v) for k, v in (doc.get("reservedMemoryMiB") or {}).items()
                },
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


def describe(c: ComputeStatus | None) -> str:
    """`4 dedicated vCPUs on host CPUs 2-5 (NUMA 0), 8192 MiB on NUMA 0` for plan and explain."""
    if c is None:
        return "CPUs and memory not counted (the node publishes no compute topology)"
    if not c.numa:
        return f"{c.vcpus} shared vCPUs and {c.memory_mib} MiB, floating over the host"
    parts = []
    for s in c.numa:
        cpus = f" on host CPUs {format_cpulist(s.cpus)}" if s.cpus else ""
        parts.append(f"NUMA {s.node}: {len(s.vcpus)} {c.policy} vCPUs{cpus}, {s.memory_mib} MiB")
    page = f" in {PAGE_NAMES.get(c.page_size_kib, '?')} hugepages" if c.page_size_kib else ""
    return "; ".join(parts) + page

"""How many VFs each SR-IOV PF should have, and the sysfs writes that get it there.

`compute_vf_counts` is PURE: the device spec's `vfs` rules + what discovery found + which VFs
are claimed -> per PF, the writes to its sriov_numvfs, or a refusal in words. The kernel changes
a PF's count only through 0 (a nonzero-to-nonzero write is EBUSY), and that removes every VF of
the PF: so a change is refused while any of its VFs is claimed, whether it grows or shrinks,
never applied. `apply_vf_count` does the writes, through the same writer as vfio binding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from nodeplugin.devicespec import DeviceSpecs, matches
from nodeplugin.discovery import HostInventory
from nodeplugin.vfio import SysfsWriter

COND_VFS = "VFsConfigured"
REASON_CHANGED = "VFCountChanged"
REASON_REFUSED = "VFCountRefused"
REASON_FAILED = "VFCountFailed"


@dataclass(frozen=True)
class VfCount:
    pf: str
    rule: str
    current: int
    desired: int
    writes: tuple[int, ...] = ()
    """What to write to sriov_numvfs, in order; empty when refused."""
    refused: str | None = None
    """Why the count is not changed, in words an admin can act on."""


def compute_vf_counts(
    specs: DeviceSpecs,
    host: HostInventory,
    node_labels: Mapping[str, str],
    claimed: Mapping[str, str],
) -> list[VfCount]:
    """Every PF a rule matches: its writes when its VF count differs from what the rule asks,
    or why the count is kept (writes and refused both empty: already as asked).

    `claimed` maps a device address to who holds it ("namespace/vm")."""
    rules = specs.for_node(node_labels).vfs
    out: list[VfCount] = []
    for f in host.functions:
        if f.sriov_role != "PF":
            continue
        picked = next(((i, r) for i, r in enumerate(rules) if matches(r.match, f, host)), None)
        if picked is None:
            continue
        index, rule = picked
        name = rule.name or f"vfs[{index}]"
        current, desired, total = f.num_vfs or 0, rule.count, f.total_vfs or 0
        if current == desired:
            out.append(VfCount(f.address, name, current, desired))
            continue
        if desired > total:
            out.append(
                VfCount(
                    f.address,
                    name,
                    current,
                    desired,
                    refused=f"{name} asks for {desired} VFs; {f.address} supports at most {total}",
                )
            )
            continue
        held = [(vf, claimed[vf]) for vf in f.virtfns if vf in claimed]
        if held:
            vf, who = held[0]
            more = f" and {len(held) - 1} more" if len(held) > 1 else ""
            out.append(
                VfCount(
                    f.address,
                    name,
                    current,
                    desired,
                    refused=(
                        f"{name} asks {f.address} for {desired} VFs, but VF {vf} is claimed by "
                        f"{who}{more}: the kernel changes the count only through 0, which would "
                        "remove it. Kept at "
                        f"{current} until the claim is released"
                    ),
                )
            )
            continue
        writes = (desired,) if current == 0 else (0, desired) if desired else (0,)
        out.append(VfCount(f.address, name, current, desired, writes=writes))
    return out


def vf_condition(v: VfCount, failed: str | None = None) -> dict[str, str]:
    """The PF's VFsConfigured condition (without its time)."""
    if v.refused or failed:
        reason = REASON_REFUSED if v.refused else REASON_FAILED
        return {
            "type": COND_VFS,
            "status": "False",
            "reason": reason,
            "message": v.refused or failed or "",
        }
    return {
        "type": COND_VFS,
        "status": "True",
        "reason": REASON_CHANGED if v.writes else "VFCountAsAsked",
        "message": f"{v.desired} VFs, as {v.rule} asks",
    }


def apply_vf_count(root: Path, writer: SysfsWriter, change: VfCount) -> None:
    """Write the change's counts to the PF's sriov_numvfs (raises OSError as the kernel does)."""
    path = root / "bus" / "pci" / "devices" / change.pf / "sriov_numvfs"
    for n in change.writes:
        writer.write(path, str(n))

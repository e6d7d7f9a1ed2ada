"""How many VFs each SR-IOV PF should have, and the sysfs writes that get it there.

`compute_vf_counts` is PURE: the device spec's `vfs` rules + what discovery found + which VFs
are claimed -> per PF, the writes to its sriov_numvfs, or a refusal in words. The kernel changes
a PF's count only through 0 (a nonzero-to-nonzero write is EBUSY), and that removes every VF of
the PF: so a change is refused while any of its VFs is claimed, whether it grows or shrinks,
never applied. `apply_vf_count` does the writes, through the same writer as vfio binding,
with a device's own steps around them where it needs some: an NVMe controller's VFs are
secondary controllers that stay offline, with no queues, until the PF gives them flexible
resources (NVMe's Virtualization Management, through nvme-cli) — see nvme_vf_steps.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from nodeplugin.devicespec import DeviceSpecs, matches
from nodeplugin.discovery import HostInventory
from nodeplugin.sriov import CommandRunner, SriovError
from nodeplugin.vfio import SysfsWriter
from pcipt import constants as c

log = logging.getLogger("pcipt.nodeplugin.vfcount")

COND_VFS = c.REASON_VFS_CONFIGURED
REASON_CHANGED = "VFCountChanged"
REASON_REFUSED = c.REASON_VF_COUNT_REFUSED
REASON_FAILED = c.REASON_VF_COUNT_FAILED


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
        held = [(vf, claimed[vf]) for vf in f.virtfns if vf in claimed]
        refused = _refusal(name, f.address, current, desired, total=total, held=held)
        writes = () if refused else _writes(current, desired)
        out.append(VfCount(f.address, name, current, desired, writes=writes, refused=refused))
    return out


def _refusal(
    rule: str, pf: str, current: int, desired: int, *, total: int, held: list[tuple[str, str]]
) -> str | None:
    """Why the count cannot change now, or None (also when nothing is to change)."""
    if current == desired:
        return None
    if desired > total:
        return f"{rule} asks for {desired} VFs; {pf} supports at most {total}"
    if held:
        vf, who = held[0]
        more = f" and {len(held) - 1} more" if len(held) > 1 else ""
        return (
            f"{rule} asks {pf} for {desired} VFs, but VF {vf} is claimed by {who}{more}: the "
            f"kernel changes the count only through 0, which would remove it. Kept at {current} "
            "until the claim is released"
        )
    return None


def _writes(current: int, desired: int) -> tuple[int, ...]:
    """What to write to sriov_numvfs, in order: a count changes only through 0."""
    if current == desired:
        return ()
    return (desired,) if current == 0 else (0, desired) if desired else (0,)


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


def nvme_controller(root: Path, pf: str) -> str | None:
    """/dev/nvmeN of an NVMe PF bound to the nvme driver; None for anything else."""
    folder = root / "bus" / "pci" / "devices" / pf / "nvme"
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    return f"/dev/{names[0]}" if names else None


def _secondaries(runner: CommandRunner, dev: str) -> list[dict[str, int]]:
    out = runner.output(["nvme", "list-secondary", dev, "-o", "json"])
    try:
        return list(json.loads(out).get("secondary-controllers", []))
    except ValueError as e:
        raise SriovError(f"nvme list-secondary {dev}: unreadable answer: {out[:200]!r}") from e


def nvme_vf_steps(runner: CommandRunner, dev: str, count: int) -> list[int]:
    """Before `count` VFs are enabled: take the secondary controllers offline, hand the
    primary's flexible queues and interrupts back to the pool (a controller reset makes that
    take effect), and split the pool over the first `count` secondaries, each as much as the
    controller allows one to have. Returns their IDs, to bring online once the VFs exist."""
    mgmt = ["nvme", "virt-mgmt", dev]
    secondaries = _secondaries(runner, dev)
    if count:
        try:
            caps = json.loads(runner.output(["nvme", "primary-ctrl-caps", dev, "-o", "json"]))
            primary, vq_total, vi_total = caps["cntlid"], caps["vqfrt"], caps["vifrt"]
            vq_max, vi_max = caps["vqfrsm"], caps["vifrsm"]
            held_by_primary = caps.get("vqrfap", 0) or caps.get("virfap", 0)
        except (ValueError, KeyError) as e:
            raise SriovError(f"nvme primary-ctrl-caps {dev}: unreadable answer ({e})") from e
        vq, vi = min(vq_max, vq_total // count), min(vi_max, vi_total // count)
        if vq < 2 or vi < 1 or len(secondaries) < count:
            raise SriovError(
                f"{dev} has {len(secondaries)} secondary controllers, {vq_total} flexible "
                f"queues and {vi_total} interrupts: too few for {count} VFs (each needs a "
                "controller, 2 queues and 1 interrupt)"
            )
    for sc in secondaries:
        if sc.get("secondary-controller-state"):
            runner.run([*mgmt, "-c", str(sc["secondary-controller-identifier"]), "-a", "7"])
    if not count:
        return []
    if held_by_primary:
        for rt in ("0", "1"):  # 0: queues, 1: interrupts
            runner.run([*mgmt, "-c", str(primary), "-r", rt, "-a", "1", "-n", "0"])
        runner.run(["nvme", "reset", dev])
    chosen = sorted(secondaries, key=lambda sc: sc.get("virtual-function-number", 0))[:count]
    for sc in chosen:
        scid = str(sc["secondary-controller-identifier"])
        runner.run([*mgmt, "-c", scid, "-r", "0", "-a", "8", "-n", str(vq)])
        runner.run([*mgmt, "-c", scid, "-r", "1", "-a", "8", "-n", str(vi)])
    return [int(sc["secondary-controller-identifier"]) for sc in chosen]


def apply_vf_count(
    root: Path, writer: SysfsWriter, change: VfCount, runner: CommandRunner | None = None
) -> None:
    """Write the change's counts to the PF's sriov_numvfs (raises OSError as the kernel does),
    with an NVMe controller's own steps around them when `runner` can run nvme-cli (raises
    SriovError with its words)."""
    path = root / "bus" / "pci" / "devices" / change.pf / "sriov_numvfs"
    dev = nvme_controller(root, change.pf) if runner is not None else None
    online: list[int] = []
    if dev is not None and runner is not None and change.writes:
        online = nvme_vf_steps(runner, dev, change.desired)
    for n in change.writes:
        writer.write(path, str(n))
    if dev is not None and runner is not None:
        for scid in online:
            runner.run(["nvme", "virt-mgmt", dev, "-c", str(scid), "-a", "9"])
        if online:
            log.info("nvme pf=%s: %d secondary controllers online", change.pf, len(online))

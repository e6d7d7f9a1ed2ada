"""The node plugin's health judgement beyond presence (fatal AER errors rising, an IOMMU group
changed under a claim) and the reset a scrub does, against a fake sysfs tree answered by the
simulated kernel."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from nodeplugin.discovery import HostInventory, aer_total, discover
from nodeplugin.health import judge
from nodeplugin.simulate import SIM_STATE, SimulatedKernel, aer_counters
from nodeplugin.vfio import PrepareError, Preparer, RecordingWriter
from pcipt import constants as c
from tests.unit.hosts import build_lab

GPU = "0000:3b:00.0"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    build_lab(tmp_path / "sys")
    return tmp_path / "sys"


def published(aer: int | None = 0, claimed: bool = False, **status: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"address": GPU}
    if claimed:
        spec["claimRef"] = {"namespace": "t", "name": "vm", "uid": "u", "request": "gpu"}
    st = dict(status)
    if aer is not None:
        st["aerFatal"] = aer
    return {"spec": spec, "status": st}


def test_discovery_reads_the_kernels_fatal_error_total_and_reset_methods(root: Path) -> None:
    (root / "bus/pci/devices" / GPU / "aer_dev_fatal").write_text(aer_counters(3))
    f = discover(root).by_address()[GPU]
    assert f.aer_fatal == 3 and f.reset_methods == ("flr",)
    assert aer_total(root / "nowhere") is None


def test_rising_fatal_errors_make_a_device_unhealthy_for_the_hold_down_then_healthy(
    root: Path,
) -> None:
    host = discover(root)
    f = host.by_address()[GPU]
    rose: dict[str, float] = {}
    sick, _ = judge(host, {GPU: published(aer=0)}, rose, now=1000.0, hold=300)
    assert GPU not in sick
    worse = HostInventory((replace(f, aer_fatal=2),))
    sick, _ = judge(worse, {GPU: published(aer=0)}, rose, now=1000.0, hold=300)
    assert sick[GPU][0] == c.REASON_AER_FATAL and "2 since boot" in sick[GPU][1]
    # Published since (aerFatal 2): no new rise, still held down.
    sick, _ = judge(worse, {GPU: published(aer=2)}, rose, now=1200.0, hold=300)
    assert sick[GPU][0] == c.REASON_AER_FATAL
    sick, _ = judge(worse, {GPU: published(aer=2)}, rose, now=1301.0, hold=300)
    assert GPU not in sick and GPU not in rose
    # The first count a plugin sees is its baseline, not a rise (errors from before boot).
    sick, _ = judge(worse, {GPU: published(aer=None)}, {}, now=0.0, hold=300)
    assert GPU not in sick


def test_a_changed_iommu_group_under_a_claim_is_unhealthy_and_keeps_the_claimed_group(
    root: Path,
) -> None:
    host = discover(root)
    f = host.by_address()[GPU]
    claimed_as = published(claimed=True, iommuGroup=f.iommu_group, iommuGroupPeers=["0000:3b:00.1"])
    moved = HostInventory((replace(f, iommu_group=99, iommu_group_peers=()),))
    sick, keep = judge(moved, {GPU: claimed_as}, {}, now=0.0, hold=300)
    assert sick[GPU][0] == c.REASON_IOMMU_GROUP_CHANGED and "group 99" in sick[GPU][1]
    assert keep[GPU] == (f.iommu_group, ["0000:3b:00.1"])
    # Unclaimed: the new grouping is simply published.
    free = published(iommuGroup=f.iommu_group, iommuGroupPeers=["0000:3b:00.1"])
    assert judge(moved, {GPU: free}, {}, now=0.0, hold=300) == ({}, {})


def test_a_reset_is_written_to_sysfs_and_a_refusal_is_the_kernels(
    root: Path, tmp_path: Path
) -> None:
    w = RecordingWriter(SimulatedKernel(root), root=root)
    p = Preparer(root, w, tmp_path / "state.json")
    assert p.reset(GPU) == "flr"
    assert w.writes[-1] == (f"bus/pci/devices/{GPU}/reset", "1")
    assert json.loads((root / SIM_STATE).read_text())["resets"][GPU] == 1
    state = json.loads((root / SIM_STATE).read_text())
    state["resetFails"] = {GPU: True}
    (root / SIM_STATE).write_text(json.dumps(state))
    p2 = Preparer(root, RecordingWriter(SimulatedKernel(root), root=root), tmp_path / "s2.json")
    with pytest.raises(PrepareError, match=r"resetting .* failed: the kernel said"):
        p2.reset(GPU)
    # A function without reset support is not reset.
    (root / "bus/pci/devices" / GPU / "reset").unlink()
    (root / "bus/pci/devices" / GPU / "reset_method").unlink()
    assert p.reset(GPU) == "none"

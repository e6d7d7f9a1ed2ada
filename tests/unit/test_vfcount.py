"""VF counts: the device spec's `vfs` rules, the pure plan, and the simulated kernel's
sriov_numvfs, which answers as Linux's sriov_numvfs_store does (checked against the real
kernel in the hardware lab)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeplugin.devicespec import DeviceSpecError, load_specs
from nodeplugin.discovery import discover
from nodeplugin.simulate import SimulatedKernel, build_host
from nodeplugin.sriov import RecordingRunner, SriovError
from nodeplugin.vfcount import apply_vf_count, compute_vf_counts, vf_condition
from tests.unit.hosts import lab_host

PF = "0000:5e:00.0"  # ens1f0: 64 VFs possible, 4 made
LABELS = {"kubernetes.io/hostname": "node-a"}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    build_host(tmp_path / "sys", lab_host())
    return tmp_path / "sys"


def plan(root: Path, config: str, claimed: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return {
        v.pf: v
        for v in compute_vf_counts(load_specs(config), discover(root), LABELS, claimed or {})
    }


def numvfs(root: Path, pf: str = PF) -> int:
    return int((root / "bus/pci/devices" / pf / "sriov_numvfs").read_text())


def test_a_count_change_goes_through_zero_and_the_kernel_makes_the_vfs(root: Path) -> None:
    v = plan(root, "vfs: [{name: port0, match: {netdev: ens1f0}, count: 8}]")[PF]
    assert (v.current, v.desired, v.writes, v.refused) == (4, 8, (0, 8), None)
    apply_vf_count(root, SimulatedKernel(root), v)
    host = discover(root)
    pf = host.by_address()[PF]
    assert pf.num_vfs == 8 and len(pf.virtfns) == 8
    vfs = [f for f in host.functions if f.phys_fn == PF]
    assert sorted(f.vf_index for f in vfs) == list(range(8))
    assert len({f.iommu_group for f in vfs}) == 8  # each VF its own group
    assert vf_condition(v)["reason"] == "VFCountChanged"
    # Now as asked: nothing to write.
    again = plan(root, "vfs: [{name: port0, match: {netdev: ens1f0}, count: 8}]")[PF]
    assert again.writes == () and again.refused is None
    assert vf_condition(again) == {
        "type": "VFsConfigured",
        "status": "True",
        "reason": "VFCountAsAsked",
        "message": "8 VFs, as port0 asks",
    }


def test_from_zero_one_write_and_to_zero_one_write(root: Path) -> None:
    v = plan(root, "vfs: [{match: {address: '0000:5e:00.0'}, count: 0}]")[PF]
    assert v.writes == (0,) and v.rule == "vfs[0]"
    apply_vf_count(root, SimulatedKernel(root), v)
    assert numvfs(root) == 0 and not list((root / "bus/pci/devices" / PF).glob("virtfn*"))
    assert not [f for f in discover(root).functions if f.phys_fn == PF]
    up = plan(root, "vfs: [{match: {address: '0000:5e:00.0'}, count: 2}]")[PF]
    assert up.writes == (2,)


@pytest.mark.parametrize("count", [2, 6])
def test_any_change_is_refused_while_a_vf_is_claimed(root: Path, count: int) -> None:
    """Growing too: the kernel's only way from 4 to 6 is through 0, which removes every VF."""
    vf = next(f.address for f in discover(root).functions if f.phys_fn == PF and f.vf_index == 3)
    v = plan(root, f"vfs: [{{match: {{netdev: ens1f0}}, count: {count}}}]", {vf: "t/vm1"})[PF]
    assert v.writes == () and v.refused is not None
    assert f"VF {vf} is claimed by t/vm1" in v.refused
    assert "only through 0" in v.refused and "Kept at 4" in v.refused
    cond = vf_condition(v)
    assert (cond["status"], cond["reason"]) == ("False", "VFCountRefused")


def test_more_than_the_pf_supports_is_refused_naming_both(root: Path) -> None:
    v = plan(root, "vfs: [{name: big, match: {netdev: ens1f0}, count: 65}]")[PF]
    assert v.refused == f"big asks for 65 VFs; {PF} supports at most 64"


def test_only_pfs_count_and_the_first_rule_decides(root: Path) -> None:
    got = plan(
        root,
        "vfs:\n"
        "  - {name: first, match: {vendorID: '8086', productID: '1592'}, count: 4}\n"
        "  - {name: second, match: {netdev: ens1f0}, count: 9}\n",
    )
    assert {v.rule for v in got.values()} == {"first"}
    assert all(discover(root).by_address()[a].sriov_role == "PF" for a in got)


def test_rules_in_node_groups_apply_to_their_nodes_only(root: Path) -> None:
    config = (
        "nodeGroups:\n"
        "  - name: b\n"
        "    nodeSelector: {matchLabels: {kubernetes.io/hostname: node-b}}\n"
        "    vfs: [{match: {netdev: ens1f0}, count: 8}]\n"
    )
    assert plan(root, config) == {}
    specs = load_specs(config)
    on_b = compute_vf_counts(specs, discover(root), {"kubernetes.io/hostname": "node-b"}, {})
    assert [v.desired for v in on_b] == [8]


def test_a_bad_rule_is_refused_naming_the_field() -> None:
    with pytest.raises(DeviceSpecError, match=r"vfs\[0\]\.count"):
        load_specs("vfs: [{match: {netdev: ens1f0}, count: -1}]")
    with pytest.raises(DeviceSpecError, match=r"vfs\[0\]\.match"):
        load_specs("vfs: [{count: 2}]")


def test_the_simulated_kernel_answers_as_sriov_numvfs_store(root: Path) -> None:
    kernel = SimulatedKernel(root)
    path = root / "bus/pci/devices" / PF / "sriov_numvfs"
    with pytest.raises(OSError) as busy:
        kernel.write(path, "6")  # 4 -> 6 without 0 first
    assert busy.value.errno == 16 and numvfs(root) == 4
    with pytest.raises(OSError) as too_many:
        kernel.write(path, "65")
    assert too_many.value.errno == 34
    kernel.write(path, "4")  # the same count: nothing happens
    assert numvfs(root) == 4
    SimulatedKernel(root).tree.unbind(PF)
    with pytest.raises(OSError) as no_driver:
        SimulatedKernel(root).write(path, "0")
    assert no_driver.value.errno == 2


NVME_CAPS = (
    '{"cntlid": 0, "vqfrt": 4, "vqrfap": 2, "vqfrsm": 2, "vifrt": 2, "virfap": 1, "vifrsm": 1}'
)
NVME_SECONDARIES = """{"num": 2, "secondary-controllers": [
  {"secondary-controller-identifier": 2, "secondary-controller-state": 1,
   "virtual-function-number": 2},
  {"secondary-controller-identifier": 1, "secondary-controller-state": 0,
   "virtual-function-number": 1}]}"""


class Shared:
    """One ordered log of sysfs writes and commands, to check the order across both."""

    def __init__(self) -> None:
        self.log: list[str] = []


def nvme_rig(root: Path) -> tuple[Shared, SimulatedKernel, RecordingRunner]:
    (root / "bus/pci/devices" / PF / "nvme" / "nvme3").mkdir(parents=True)
    shared = Shared()

    class Kernel(SimulatedKernel):
        def write(self, path: Path, value: str) -> None:
            shared.log.append(f"write {path.name}={value}")
            super().write(path, value)

    class Runner(RecordingRunner):
        def run(self, argv: list[str]) -> None:
            shared.log.append(" ".join(argv))
            super().run(argv)

    runner = Runner(
        answers={
            "nvme primary-ctrl-caps /dev/nvme3": NVME_CAPS,
            "nvme list-secondary /dev/nvme3": NVME_SECONDARIES,
        }
    )
    return shared, Kernel(root), runner


def test_an_nvme_pf_gives_its_vfs_flexible_resources_and_brings_them_online(root: Path) -> None:
    shared, kernel, runner = nvme_rig(root)
    v = plan(root, "vfs: [{match: {address: '0000:5e:00.0'}, count: 2}]")[PF]
    apply_vf_count(root, kernel, v, runner)
    m = "nvme virt-mgmt /dev/nvme3"
    assert shared.log == [
        f"{m} -c 2 -a 7",  # an online secondary goes offline before anything changes
        f"{m} -c 0 -r 0 -a 1 -n 0",  # the primary's flexible queues back to the pool...
        f"{m} -c 0 -r 1 -a 1 -n 0",  # ... and interrupts,
        "nvme reset /dev/nvme3",  # which a reset makes take effect
        f"{m} -c 1 -r 0 -a 8 -n 2",  # 4 queues and 2 interrupts over 2 VFs, in VF order
        f"{m} -c 1 -r 1 -a 8 -n 1",
        f"{m} -c 2 -r 0 -a 8 -n 2",
        f"{m} -c 2 -r 1 -a 8 -n 1",
        "write sriov_numvfs=0",
        "write sriov_numvfs=2",
        f"{m} -c 1 -a 9",  # online once the VFs exist
        f"{m} -c 2 -a 9",
    ]
    assert numvfs(root) == 2


def test_nvme_vfs_going_to_zero_only_go_offline(root: Path) -> None:
    shared, kernel, runner = nvme_rig(root)
    v = plan(root, "vfs: [{match: {address: '0000:5e:00.0'}, count: 0}]")[PF]
    apply_vf_count(root, kernel, v, runner)
    assert shared.log == ["nvme virt-mgmt /dev/nvme3 -c 2 -a 7", "write sriov_numvfs=0"]


def test_too_few_flexible_resources_is_refused_before_any_vf_changes(root: Path) -> None:
    _shared, kernel, runner = nvme_rig(root)
    v = plan(root, "vfs: [{match: {address: '0000:5e:00.0'}, count: 3}]")[PF]
    with pytest.raises(SriovError, match="too few for 3 VFs"):
        apply_vf_count(root, kernel, v, runner)
    assert numvfs(root) == 4  # untouched


def test_a_pf_that_is_not_nvme_runs_no_nvme_command(root: Path) -> None:
    runner = RecordingRunner()
    v = plan(root, "vfs: [{match: {netdev: ens1f0}, count: 2}]")[PF]
    apply_vf_count(root, SimulatedKernel(root), v, runner)
    assert runner.commands == [] and numvfs(root) == 2

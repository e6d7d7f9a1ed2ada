"""Binding to vfio-pci and back, against a fake sysfs tree answered by a simulated kernel:
the exact writes, in order, and what the tree looks like after."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nodeplugin.simulate import SimulatedKernel
from nodeplugin.sriov import RecordingRunner, SriovError, configure_vf, vf_commands
from nodeplugin.vfio import PrepareError, Preparer, RecordingWriter
from tests.unit.hosts import build_lab

GPU, AUDIO, NODRV = "0000:3b:00.0", "0000:3b:00.1", "0000:b0:00.0"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    build_lab(tmp_path / "sys")
    return tmp_path / "sys"


def preparer(root: Path, state: Path) -> tuple[Preparer, RecordingWriter]:
    w = RecordingWriter(SimulatedKernel(root), root=root)
    return Preparer(root, w, state), w


def driver(root: Path, address: str) -> str | None:
    link = root / "bus/pci/devices" / address / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def test_bind_writes_override_unbind_bind_in_that_order(root: Path, tmp_path: Path) -> None:
    p, w = preparer(root, tmp_path / "state.json")
    assert p.bind_vfio([GPU, AUDIO]) == [GPU, AUDIO]
    # vfio-pci's own bind file, not drivers_probe: the kernel then reports a refused probe.
    assert w.writes == [
        (f"bus/pci/devices/{GPU}/driver_override", "vfio-pci"),
        ("bus/pci/drivers/nvidia/unbind", GPU),
        ("bus/pci/drivers/vfio-pci/bind", GPU),
        (f"bus/pci/devices/{AUDIO}/driver_override", "vfio-pci"),
        ("bus/pci/drivers/snd_hda_intel/unbind", AUDIO),
        ("bus/pci/drivers/vfio-pci/bind", AUDIO),
    ]
    assert driver(root, GPU) == driver(root, AUDIO) == "vfio-pci"
    assert (root / "bus/pci/drivers/vfio-pci" / GPU).is_symlink()


def test_a_device_without_driver_skips_the_unbind(root: Path, tmp_path: Path) -> None:
    p, w = preparer(root, tmp_path / "state.json")
    p.bind_vfio([NODRV])
    assert [path for path, _ in w.writes] == [
        f"bus/pci/devices/{NODRV}/driver_override",
        "bus/pci/drivers/vfio-pci/bind",
    ]


def test_binding_is_idempotent(root: Path, tmp_path: Path) -> None:
    p, w = preparer(root, tmp_path / "state.json")
    p.bind_vfio([GPU])
    w.writes.clear()
    assert p.bind_vfio([GPU]) == [] and w.writes == []


def test_restore_gives_the_device_back_to_its_own_driver(root: Path, tmp_path: Path) -> None:
    p, w = preparer(root, tmp_path / "state.json")
    p.bind_vfio([GPU])
    w.writes.clear()
    assert p.restore([GPU]) == [GPU]
    assert w.writes == [
        ("bus/pci/drivers/vfio-pci/unbind", GPU),
        (f"bus/pci/devices/{GPU}/driver_override", "\n"),
        ("bus/pci/drivers_probe", GPU),
    ]
    assert driver(root, GPU) == "nvidia"
    assert (root / "bus/pci/devices" / GPU / "driver_override").read_text() == "(null)\n"


def test_devices_it_did_not_move_are_never_restored(root: Path, tmp_path: Path) -> None:
    kernel = SimulatedKernel(root)
    kernel.write(root / "bus/pci/devices" / AUDIO / "driver_override", "vfio-pci")
    kernel.write(root / "bus/pci/drivers/snd_hda_intel/unbind", AUDIO)
    kernel.write(root / "bus/pci/drivers_probe", AUDIO)  # an admin pre-bound it
    p, w = preparer(root, tmp_path / "state.json")
    assert p.bind_vfio([AUDIO]) == [] and p.restore([AUDIO, GPU]) == [] and w.writes == []
    assert driver(root, AUDIO) == "vfio-pci"


def test_what_it_moved_survives_a_restart(root: Path, tmp_path: Path) -> None:
    p, _ = preparer(root, tmp_path / "state.json")
    p.bind_vfio([GPU])
    again, _ = preparer(root, tmp_path / "state.json")
    assert again.moved == {GPU: "nvidia"} and again.restore([GPU]) == [GPU]
    assert driver(root, GPU) == "nvidia"


def test_restoring_can_be_switched_off(root: Path, tmp_path: Path) -> None:
    p = Preparer(root, SimulatedKernel(root), tmp_path / "s.json", restore=False)
    p.bind_vfio([GPU])
    assert p.restore([GPU]) == [] and driver(root, GPU) == "vfio-pci"


def test_no_vfio_driver_is_a_clear_error(root: Path, tmp_path: Path) -> None:
    (root / "bus/pci/drivers/vfio-pci").rename(root / "gone")
    with pytest.raises(
        PrepareError, match="vfio-pci driver is not loaded on this host: modprobe vfio-pci"
    ) as e:
        preparer(root, tmp_path / "s.json")[0].bind_vfio([GPU])
    assert e.value.reason == "VfioNotLoaded" and e.value.address is None
    assert driver(root, GPU) == "nvidia"


def override(root: Path, address: str) -> str:
    return (root / "bus/pci/devices" / address / "driver_override").read_text().strip()


def test_a_refused_bind_says_what_the_kernel_said_and_leaves_nothing_half_bound(
    root: Path, tmp_path: Path
) -> None:
    class Refusing(SimulatedKernel):
        def write(self, path: Path, value: str) -> None:
            if path.name == "bind" and value == AUDIO:
                raise OSError(22, "Invalid argument")
            super().write(path, value)

    p = Preparer(root, Refusing(root), tmp_path / "s.json")
    with pytest.raises(PrepareError) as e:
        p.bind_vfio([GPU, AUDIO])
    assert e.value.address == AUDIO and e.value.reason == "BindRefused"
    assert "binding it to vfio-pci failed: the kernel said Invalid argument (EINVAL)" in str(
        e.value
    )
    # All or nothing: the GPU this call had already moved is back too, and nothing is pending.
    assert driver(root, AUDIO) == "snd_hda_intel" and override(root, AUDIO) == "(null)"
    assert driver(root, GPU) == "nvidia" and override(root, GPU) == "(null)"
    assert p.moved == {} and Preparer(root, SimulatedKernel(root), tmp_path / "s.json").moved == {}


def test_vfio_pci_refuses_a_bridge_as_linux_does(root: Path, tmp_path: Path) -> None:
    kernel = SimulatedKernel(root)
    kernel.tree.add_function(
        "0000:00:1c.0", "8086", "a110", "060400", driver="pcieport", iommu_group=7
    )
    kernel.native["0000:00:1c.0"] = "pcieport"
    p = Preparer(root, kernel, tmp_path / "s.json")
    with pytest.raises(PrepareError, match="the kernel said Invalid argument") as e:
        p.bind_vfio(["0000:00:1c.0"])
    assert e.value.reason == "BindRefused"
    assert driver(root, "0000:00:1c.0") == "pcieport" and override(root, "0000:00:1c.0") == "(null)"


def test_a_driver_without_an_unbind_file_is_refused_before_anything_moves(
    root: Path, tmp_path: Path
) -> None:
    (root / "bus/pci/drivers/nvidia/unbind").unlink()
    p, _w = preparer(root, tmp_path / "s.json")
    with pytest.raises(PrepareError, match=r"driver nvidia does not let 0000:3b:00\.0 go") as e:
        p.bind_vfio([GPU])
    assert e.value.reason == "UnbindRefused"
    assert driver(root, GPU) == "nvidia" and override(root, GPU) == "(null)" and p.moved == {}


def test_a_group_held_open_is_busy_and_never_unbound(root: Path, tmp_path: Path) -> None:
    p, w = preparer(root, tmp_path / "s.json")
    p.bind_vfio([GPU])
    group = os.path.basename(os.readlink(root / "bus/pci/devices" / GPU / "iommu_group"))
    proc = tmp_path / "proc"
    (proc / "4242" / "fd").mkdir(parents=True)
    (proc / "4242" / "comm").write_text("qemu-system-x86\n")
    (proc / "4242" / "fd" / "17").symlink_to(f"/dev/vfio/{group}")
    p.proc_root = proc
    w.writes.clear()
    with pytest.raises(PrepareError, match=r"held open by qemu-system-x86 \(pid 4242\)") as e:
        p.restore([GPU])
    assert e.value.reason == "DeviceBusy" and w.writes == [] and driver(root, GPU) == "vfio-pci"
    assert p.moved == {GPU: "nvidia"}  # still ours to give back
    (proc / "4242" / "fd" / "17").unlink()
    assert p.restore([GPU]) == [GPU] and driver(root, GPU) == "nvidia"


def test_restore_goes_on_past_a_failure_then_reports_it(root: Path, tmp_path: Path) -> None:
    class NoProbe(SimulatedKernel):
        def write(self, path: Path, value: str) -> None:
            if path.name == "drivers_probe" and value == GPU:
                raise OSError(19, "No such device")
            super().write(path, value)

    p = Preparer(root, NoProbe(root), tmp_path / "s.json")
    p.bind_vfio([GPU, AUDIO])
    with pytest.raises(PrepareError, match=r"restoring 0000:3b:00\.0 to nvidia failed") as e:
        p.restore([GPU, AUDIO])
    assert e.value.reason == "RestoreFailed" and driver(root, AUDIO) == "snd_hda_intel"
    assert p.moved == {GPU: "nvidia"}


def test_vf_settings_are_ip_link_commands_on_the_pf_which_is_brought_up_first() -> None:
    assert vf_commands("ens1f0", 3, spoof_check=True, trusted=False) == [
        ["ip", "link", "set", "dev", "ens1f0", "up"],
        ["ip", "link", "set", "dev", "ens1f0", "vf", "3", "spoofchk", "on", "trust", "off"],
    ]
    assert vf_commands(
        "ens1f0",
        1,
        spoof_check=False,
        trusted=True,
        mac="52:54:00:00:00:01",
        vlan=120,
        macvtap=True,
    ) == [
        ["ip", "link", "set", "dev", "ens1f0", "up"],
        ["ip", "link", "set", "dev", "ens1f0", "vf", "1", "spoofchk", "off", "trust", "on"],
        ["ip", "link", "set", "dev", "ens1f0", "vf", "1", "vlan", "120"],
        ["ip", "link", "set", "dev", "ens1f0", "vf", "1", "mac", "52:54:00:00:00:01"],
    ]
    # Rates and link state, in both modes, only when asked for.
    assert vf_commands(
        "ens1f0", 2, spoof_check=True, trusted=False, max_tx_rate=500, link_state="disable"
    )[2:] == [
        ["ip", "link", "set", "dev", "ens1f0", "vf", "2", "min_tx_rate", "0", "max_tx_rate", "500"],
        ["ip", "link", "set", "dev", "ens1f0", "vf", "2", "state", "disable"],
    ]
    r = RecordingRunner()
    configure_vf(r, "ens2f0", 0, spoof_check=True, trusted=False)
    assert r.commands == [
        ["ip", "link", "set", "dev", "ens2f0", "up"],
        ["ip", "link", "set", "dev", "ens2f0", "vf", "0", "spoofchk", "on", "trust", "off"],
    ]


def test_managed_false_is_never_rebound(root: Path, tmp_path: Path) -> None:
    p, w = preparer(root, tmp_path / "state.json")
    with pytest.raises(PrepareError) as err:
        p.bind_vfio([AUDIO, GPU], unmanaged={GPU})
    assert err.value.reason == "NotBoundToVfio" and err.value.address == GPU
    assert "is on nvidia" in str(err.value) and "managed: false" in str(err.value)
    assert w.writes == [] and driver(root, AUDIO) == "snd_hda_intel"  # nothing moved first
    # Bound by the admin (here a vendor's variant driver): used as it is, never touched.
    from nodeplugin.simulate import SysfsTree

    tree = SysfsTree(root)
    tree.unbind(GPU)
    tree.bind(GPU, "nvgrace_gpu_vfio_pci")
    assert p.bind_vfio([GPU, AUDIO], unmanaged={GPU}) == [AUDIO]
    assert driver(root, GPU) == "nvgrace_gpu_vfio_pci" and GPU not in p.moved
    p.restore([GPU, AUDIO])
    assert driver(root, GPU) == "nvgrace_gpu_vfio_pci" and driver(root, AUDIO) == "snd_hda_intel"


def test_a_rate_refused_while_the_ports_link_comes_up_is_tried_again() -> None:
    class Settling(RecordingRunner):
        def __init__(self, refusals: int) -> None:
            super().__init__()
            self.refusals = refusals

        def run(self, argv: list[str]) -> None:
            super().run(argv)
            if "max_tx_rate" in argv and self.refusals > 0:
                self.refusals -= 1
                raise SriovError("RTNETLINK answers: Invalid argument")

    slept: list[float] = []
    r = Settling(refusals=2)
    configure_vf(r, "eth0", 0, spoof_check=True, trusted=False, max_tx_rate=100, sleep=slept.append)
    assert sum("max_tx_rate" in c for c in r.commands) == 3 and slept == [0.5, 0.5]
    # A driver that never takes it: refused with its words after the link had time to settle.
    never = Settling(refusals=10**6)
    with pytest.raises(SriovError, match="Invalid argument"):
        configure_vf(never, "eth0", 0, spoof_check=True, trusted=False, max_tx_rate=100,
                     sleep=slept.append)  # fmt: skip

"""Binding to vfio-pci and back, against a fake sysfs tree answered by a simulated kernel:
the exact writes, in order, and what the tree looks like after."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nodeplugin.simulate import SimulatedKernel
from nodeplugin.sriov import RecordingRunner, configure_vf, vf_commands
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


def test_bind_writes_override_unbind_probe_in_that_order(root: Path, tmp_path: Path) -> None:
    p, w = preparer(root, tmp_path / "state.json")
    assert p.bind_vfio([GPU, AUDIO]) == [GPU, AUDIO]
    assert w.writes == [
        (f"bus/pci/devices/{GPU}/driver_override", "vfio-pci"),
        ("bus/pci/drivers/nvidia/unbind", GPU),
        ("bus/pci/drivers_probe", GPU),
        (f"bus/pci/devices/{AUDIO}/driver_override", "vfio-pci"),
        ("bus/pci/drivers/snd_hda_intel/unbind", AUDIO),
        ("bus/pci/drivers_probe", AUDIO),
    ]
    assert driver(root, GPU) == driver(root, AUDIO) == "vfio-pci"
    assert (root / "bus/pci/drivers/vfio-pci" / GPU).is_symlink()


def test_a_device_without_driver_skips_the_unbind(root: Path, tmp_path: Path) -> None:
    p, w = preparer(root, tmp_path / "state.json")
    p.bind_vfio([NODRV])
    assert [path for path, _ in w.writes] == [
        f"bus/pci/devices/{NODRV}/driver_override",
        "bus/pci/drivers_probe",
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
    ):
        preparer(root, tmp_path / "s.json")[0].bind_vfio([GPU])


def test_a_refused_bind_is_a_clear_error(root: Path, tmp_path: Path) -> None:
    class Refusing(SimulatedKernel):
        def write(self, path: Path, value: str) -> None:
            if path.name == "drivers_probe":
                raise OSError(22, "Invalid argument")
            super().write(path, value)

    p = Preparer(root, Refusing(root), tmp_path / "s.json")
    with pytest.raises(PrepareError, match=f"binding {GPU} to vfio-pci failed"):
        p.bind_vfio([GPU])


def test_vf_settings_are_ip_link_commands_on_the_pf() -> None:
    assert vf_commands("ens1f0", 3, spoof_check=True, trusted=False) == [
        ["ip", "link", "set", "dev", "ens1f0", "vf", "3", "spoofchk", "on", "trust", "off"]
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
        ["ip", "link", "set", "dev", "ens1f0", "vf", "1", "spoofchk", "off", "trust", "on"],
        ["ip", "link", "set", "dev", "ens1f0", "vf", "1", "vlan", "120"],
        ["ip", "link", "set", "dev", "ens1f0", "vf", "1", "mac", "52:54:00:00:00:01"],
    ]
    r = RecordingRunner()
    configure_vf(r, "ens2f0", 0, spoof_check=True, trusted=False)
    assert r.commands == [
        ["ip", "link", "set", "dev", "ens2f0", "vf", "0", "spoofchk", "on", "trust", "off"]
    ]

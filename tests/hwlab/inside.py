"""Runs inside a lab host (tests/hwlab/run.py boots it): what pcipt sees on the real kernel's
/sys, written as JSON next to what the kernel's own tools say, for the outside to compare.

    python tests/hwlab/inside.py discovery|vfio OUT_DIR
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

from nodeplugin.discovery import discover  # noqa: E402
from nodeplugin.vfio import FileWriter, PrepareError, Preparer  # noqa: E402

SYS = Path("/sys")


def discovery(out: Path) -> None:
    host = discover(SYS)
    (out / "discovery.json").write_text(
        json.dumps(
            {
                "functions": [dataclasses.asdict(f) for f in host.functions],
                "numa_cpus": {str(k): list(v) for k, v in host.numa_cpus.items()},
            },
            indent=2,
        )
    )
    lspci = subprocess.run(["lspci", "-Dnnvk"], capture_output=True, text=True, check=True)
    (out / "lspci.txt").write_text(lspci.stdout)
    # The kernel's other view of SR-IOV and netdevs: /sys/class/net, not the device folders.
    links = {}
    for net in sorted((SYS / "class" / "net").iterdir()):
        dev = net / "device"
        if not dev.exists():
            continue
        entry = {"address": dev.resolve().name, "vfs": {}}
        for vf in sorted(dev.glob("virtfn*")):
            entry["vfs"][vf.name.removeprefix("virtfn")] = vf.resolve().name
        links[net.name] = entry
    (out / "netdevs.json").write_text(json.dumps(links, indent=2))
    # The publish step: every function offered by a catch-all device spec, as PciDevices.
    spec = out / "all.yaml"
    spec.write_text("devices:\n  - name: everything\n    match: {}\n")
    published = subprocess.run(
        [sys.executable, "-m", "nodeplugin", "discover", "--node-name", "lab",
         "--config", str(spec), "-o", "json"],
        capture_output=True, text=True, cwd=REPO, check=False,
    )  # fmt: skip
    (out / "published.json").write_text(published.stdout)
    (out / "published.err").write_text(published.stderr)


def vfio(out: Path) -> None:
    """The node plugin's Preparer on the real kernel: refuse without vfio-pci loaded; bind a
    plain function and an igb VF to vfio-pci; give each back to its own driver."""
    host = discover(SYS)
    plain = next(f.address for f in host.functions if f.product_id == "10d3" and f.numa_node != 1)
    vf = next(f.address for f in host.functions if f.sriov_role == "VF")
    targets = [plain, vf]
    record: dict[str, object] = {"targets": targets}
    before = {a: _driver(a) for a in targets}
    record["before"] = before
    prep = Preparer(SYS, FileWriter(), Path("/tmp/pcipt-vfio-state.json"))
    try:
        prep.bind_vfio(targets)
        record["without_module"] = "bound"
    except PrepareError as e:
        record["without_module"] = str(e)
    subprocess.run(["modprobe", "vfio-pci"], check=True)
    started = time.monotonic()
    record["moved"] = prep.bind_vfio(targets)
    record["bind_seconds"] = time.monotonic() - started
    record["bound"] = {a: _driver(a) for a in targets}
    groups = {a: (SYS / "bus/pci/devices" / a / "iommu_group").resolve().name for a in targets}
    record["groups"] = groups
    record["dev_vfio"] = sorted(p.name for p in Path("/dev/vfio").iterdir())
    record["state_file"] = json.loads(Path("/tmp/pcipt-vfio-state.json").read_text())
    record["restored"] = prep.restore(targets)
    record["after"] = {a: _driver(a) for a in targets}
    record["override_after"] = {
        a: (SYS / "bus/pci/devices" / a / "driver_override").read_text().strip() for a in targets
    }
    (out / "vfio.json").write_text(json.dumps(record, indent=2))


def vfcount(out: Path) -> None:
    """The node plugin's VF counts on the real kernel: what the simulated kernel assumes
    (EBUSY nonzero to nonzero, ERANGE above the total), made through 0, refused while claimed."""
    from nodeplugin.devicespec import load_specs
    from nodeplugin.vfcount import apply_vf_count, compute_vf_counts

    labels = {"kubernetes.io/hostname": "lab"}
    writer = FileWriter()
    pf = next(f.address for f in discover(SYS).functions if f.product_id == "10c9")
    numvfs = SYS / "bus/pci/devices" / pf / "sriov_numvfs"
    record: dict[str, object] = {
        "pf": pf,
        "total": int((numvfs.parent / "sriov_totalvfs").read_text()),
    }

    def plan(count: int, claimed: dict[str, str] | None = None) -> object:
        specs = load_specs(f"vfs: [{{name: igb, match: {{address: '{pf}'}}, count: {count}}}]")
        (v,) = compute_vf_counts(specs, discover(SYS), labels, claimed or {})
        return v

    def errno_of(value: str) -> int | None:
        try:
            writer.write(numvfs, value)
        except OSError as e:
            return e.errno
        return None

    v = plan(2)
    record["first"] = {"writes": list(v.writes)}
    apply_vf_count(SYS, writer, v)
    record["after_first"] = int(numvfs.read_text())
    record["ebusy_2_to_3"] = errno_of("3")
    record["erange"] = errno_of(str(int(record["total"]) + 1))  # type: ignore[call-overload]
    vf = next(f.address for f in discover(SYS).functions if f.phys_fn == pf)
    refused = plan(3, {vf: "t/vm1"})
    record["refused"] = refused.refused
    v = plan(3)
    record["second"] = {"writes": list(v.writes)}
    apply_vf_count(SYS, writer, v)
    time.sleep(1)
    host = discover(SYS)
    record["after_second"] = int(numvfs.read_text())
    record["vfs"] = sorted(
        (f.vf_index, f.address, f.iommu_group) for f in host.functions if f.phys_fn == pf
    )
    # NVMe: the node plugin's own steps (flexible resources, online) around sriov_numvfs.
    from nodeplugin.sriov import IpRunner

    nvme = next(f.address for f in host.functions if f.class_code.startswith("010802"))
    specs = load_specs(f"vfs: [{{name: nvme, match: {{address: '{nvme}'}}, count: 2}}]")
    (v,) = compute_vf_counts(specs, host, labels, {})
    record["nvme_writes"] = list(v.writes)
    started = time.monotonic()
    apply_vf_count(SYS, writer, v, IpRunner())
    record["nvme_seconds"] = time.monotonic() - started
    time.sleep(1)
    record["nvme_numvfs"] = int((SYS / "bus/pci/devices" / nvme / "sriov_numvfs").read_text())
    record["nvme_vfs"] = sorted(
        (f.vf_index, f.address, f.iommu_group) for f in discover(SYS).functions
        if f.phys_fn == nvme
    )  # fmt: skip
    dev = "/dev/" + sorted(p.name for p in (SYS / "bus/pci/devices" / nvme / "nvme").iterdir())[0]
    record["nvme_secondaries"] = json.loads(
        subprocess.run(
            ["nvme", "list-secondary", dev, "-o", "json"], capture_output=True, text=True,
            check=True,
        ).stdout
    )["secondary-controllers"]  # fmt: skip
    (out / "vfcount.json").write_text(json.dumps(record, indent=2))


def sriov(out: Path) -> None:
    """VF settings the node plugin makes with `ip link` (configure_vf, as in macvtap mode, where
    it sets MAC and VLAN itself), read back from the PF's `ip -d link show`."""
    from nodeplugin.devicespec import load_specs
    from nodeplugin.sriov import IpRunner, configure_vf
    from nodeplugin.vfcount import apply_vf_count, compute_vf_counts

    pf = next(f for f in discover(SYS).functions if f.product_id == "10c9")
    specs = load_specs(f"vfs: [{{match: {{address: '{pf.address}'}}, count: 2}}]")
    for v in compute_vf_counts(specs, discover(SYS), {}, {}):
        apply_vf_count(SYS, FileWriter(), v)
    netdev = pf.netdevs[0]
    subprocess.run(["ip", "link", "set", "dev", netdev, "up"], check=True)
    runner = IpRunner()
    configure_vf(runner, netdev, 0, spoof_check=True, trusted=False, macvtap=True)
    configure_vf(
        runner, netdev, 1, spoof_check=False, trusted=True, mac="52:54:00:aa:bb:01", vlan=100,
        macvtap=True,
    )  # fmt: skip
    shown = subprocess.run(
        ["ip", "-d", "link", "show", "dev", netdev], capture_output=True, text=True, check=True
    )
    (out / "sriov.txt").write_text(shown.stdout)


def vfiofail(out: Path) -> None:
    """The Preparer's failure paths on the real kernel: vfio-pci refusing a device (a PCIe
    root port: a bridge), and a device whose VFIO group a process holds open (busy)."""
    subprocess.run(["modprobe", "vfio-pci"], check=True)
    host = discover(SYS)
    record: dict[str, object] = {}
    prep = Preparer(SYS, FileWriter(), Path("/tmp/pcipt-vfiofail.json"))
    port = next(f.address for f in host.functions if f.class_code.startswith("0604") and f.driver)
    record["port"] = port
    record["port_driver_before"] = _driver(port)
    record["port_has_unbind"] = (SYS / "bus/pci/drivers" / str(_driver(port)) / "unbind").exists()
    try:
        prep.bind_vfio([port])
        record["port_error"] = None
    except PrepareError as e:
        record["port_error"] = {"reason": e.reason, "address": e.address, "message": str(e)}
    record["port_driver_after"] = _driver(port)
    record["port_override_after"] = (
        (SYS / "bus/pci/devices" / port / "driver_override").read_text().strip()
    )
    record["moved_after_refusal"] = dict(prep.moved)
    plain = next(f.address for f in host.functions if f.product_id == "10d3" and f.numa_node != 1)
    prep.bind_vfio([plain])
    group = (SYS / "bus/pci/devices" / plain / "iommu_group").resolve().name
    holder = subprocess.Popen(["sh", "-c", f"exec 3</dev/vfio/{group}; exec sleep 600"])
    time.sleep(1)
    record["holders"] = prep.group_holders(plain)
    started = time.monotonic()
    try:
        prep.restore([plain])
        record["busy_error"] = None
    except PrepareError as e:
        record["busy_error"] = {"reason": e.reason, "address": e.address, "message": str(e)}
    record["busy_seconds"] = time.monotonic() - started
    record["driver_while_held"] = _driver(plain)
    holder.kill()
    holder.wait()
    record["restored_after"] = prep.restore([plain])
    record["driver_after"] = _driver(plain)
    (out / "vfiofail.json").write_text(json.dumps(record, indent=2))


def _driver(address: str) -> str | None:
    link = SYS / "bus/pci/devices" / address / "driver"
    return link.resolve().name if link.exists() else None


if __name__ == "__main__":
    scenarios = {
        "discovery": discovery,
        "vfio": vfio,
        "vfcount": vfcount,
        "sriov": sriov,
        "vfiofail": vfiofail,
    }
    scenarios[sys.argv[1]](Path(sys.argv[2]))

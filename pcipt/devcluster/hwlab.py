"""The hardware lab: a real Linux kernel under QEMU (TCG, q35, an emulated Intel IOMMU) with
PCIe devices pcipt must handle for real — NVMe and igb with SR-IOV, e1000e as a plain function,
one behind a pxb-pcie on a second NUMA node — where scenarios run the project's own code on
the kernel's own /sys.

A lab host boots Debian's kernel from a tiny initramfs (busybox and the 9p and overlay modules)
and takes this machine's root read-only over 9p with a tmpfs on top, so the project's venv runs
inside unchanged; a second, writable 9p share brings results back. Networking is QEMU's
user mode with restrict=on: a lab host reaches nothing. Nothing here touches this machine's
devices. Needs what hack/install-hwlab-deps.sh installs.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

Log = Callable[[str], None]
MGMT_ADDRESS = "10.0.2.100"
"""Where a lab host reaches what LabHost.forwards pipes to (the outer API server, say)."""
MGMT_MAC = "52:54:00:00:00:fe"
MGMT_GUEST_IP = "10.0.2.15/24"
REPO = Path(__file__).resolve().parent.parent.parent
# The modules the initramfs loads to reach the root over 9p (their dependencies come along).
INITRAMFS_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")

INIT = r"""#!/bin/busybox sh
# The lab host's init: reach the machine's root over 9p, put a tmpfs over it, run the scenario.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order); do insmod /modules/$m.ko || echo "initramfs: insmod $m failed"; done
mkdir -p /ro /rw /new
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 root /ro
mount -t tmpfs -o size=512m tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/ro,upperdir=/rw/upper,workdir=/rw/work /new
mkdir -p /new/lab
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 results /new/lab
for d in proc sys dev; do mount --move /$d /new/$d; done
exec switch_root /new /bin/sh /lab/run.sh
"""

RUN = r"""#!/bin/sh
# Runs inside the lab host after switch_root: the scenario, then power off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
# /tmp stays the machine's (under the overlay): the project may be checked out there.
mount -t tmpfs tmpfs /run
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts  # QEMU's pty consoles, in nested guests
# No udev here: load each device's driver by its modalias, as udev would.
for a in /sys/bus/pci/devices/*/modalias; do modprobe -q "$(cat "$a")" 2>/dev/null; done
cd /lab
sh /lab/scenario.sh > /lab/scenario.log 2>&1
echo $? > /lab/exit
sync
echo o > /proc/sysrq-trigger
sleep 30  # the power-off takes a moment; init must not exit before it
"""


@dataclass
class LabHost:
    """One lab host: its devices are QEMU -device arguments on a q35 with two NUMA nodes."""

    name: str = "lab"
    memory_mib: int = 2048
    cpus: int = 2
    devices: list[str] = field(default_factory=list)
    timeout: float = 600.0
    forwards: dict[int, list[str]] = field(default_factory=dict)
    """Guest port on MGMT_ADDRESS -> the command (on this machine) each connection is piped
    to: QEMU's guestfwd, the only way out of a lab host (say, to the outer API server). A
    virtio-net NIC with MAC MGMT_MAC carries them; the scenario gives it MGMT_GUEST_IP."""

    def qemu_args(self, kernel: Path, initrd: Path, results: Path) -> list[str]:
        half = self.memory_mib // 2
        return [
            "qemu-system-x86_64",
            "-accel", "tcg,thread=multi",
            "-machine", "q35,kernel-irqchip=split",
            "-cpu", "max",
            "-smp", str(self.cpus),
            "-m", str(self.memory_mib),
            "-object", f"memory-backend-ram,id=m0,size={half}M",
            "-object", f"memory-backend-ram,id=m1,size={self.memory_mib - half}M",
            "-numa", "node,nodeid=0,memdev=m0,cpus=0",
            "-numa", f"node,nodeid=1,memdev=m1,cpus=1-{self.cpus - 1}",
            "-device", "intel-iommu,intremap=on,caching-mode=on",
            "-kernel", str(kernel),
            "-initrd", str(initrd),
            "-append", "console=ttyS0 intel_iommu=on panic=-1 quiet loglevel=3",
            "-display", "none", "-no-reboot", "-serial", "stdio", "-monitor", "none",
            "-virtfs",
            "local,path=/,mount_tag=root,security_model=none,readonly=on,multidevs=remap",
            "-virtfs", f"local,path={results},mount_tag=results,security_model=none",
            "-netdev", "user,id=n0,restrict=on",
            *(a for d in self.devices for a in ("-device", d)),
            *self._mgmt_args(),
        ]  # fmt: skip

    def _mgmt_args(self) -> list[str]:
        if not self.forwards:
            return []
        fwds = "".join(
            f",guestfwd=tcp:{MGMT_ADDRESS}:{port}-cmd:{' '.join(cmd)}"
            for port, cmd in sorted(self.forwards.items())
        )
        return [
            "-netdev", f"user,id=mgmt,restrict=on{fwds}",
            "-device", f"virtio-net-pci,bus=pcie.0,netdev=mgmt,mac={MGMT_MAC}",
        ]  # fmt: skip


def default_devices() -> list[str]:
    """NVMe with SR-IOV, igb (SR-IOV NIC), e1000e, and an e1000e behind a pxb-pcie on NUMA
    node 1; each on its own root port, so each its own IOMMU group."""
    return [
        "pcie-root-port,id=rp1,chassis=1,slot=1",
        "pcie-root-port,id=rp2,chassis=2,slot=2",
        "pcie-root-port,id=rp3,chassis=3,slot=3",
        "nvme-subsys,id=subsys0,nqn=pcipt-lab",
        "nvme,id=nvme0,bus=rp1,serial=pcipt0001,subsys=subsys0,sriov_max_vfs=2,"
        "sriov_vq_flexible=4,sriov_vi_flexible=2,msix_qsize=8",
        "igb,bus=rp2,netdev=n0,mac=52:54:00:12:34:56",
        "e1000e,bus=rp3",
        "pxb-pcie,id=pxb1,bus_nr=128,numa_node=1,bus=pcie.0",
        "pcie-root-port,id=rp9,bus=pxb1,chassis=9,slot=9",
        "e1000e,bus=rp9",
    ]


class HwLabError(RuntimeError):
    """The lab host could not be built or booted; the message carries the console's tail."""


def kernel() -> tuple[Path, str]:
    """Debian's kernel and its release, newest first."""
    found = sorted(Path("/boot").glob("vmlinuz-*"))
    if not found:
        raise HwLabError("no kernel in /boot: run hack/install-hwlab-deps.sh")
    vmlinuz = found[-1]
    return vmlinuz, vmlinuz.name.removeprefix("vmlinuz-")


def _module_files(release: str, modules: Sequence[str]) -> list[Path]:
    """The module files to load for `modules`, dependencies first (as modprobe would)."""
    files = []
    for m in modules:
        out = subprocess.run(
            ["modprobe", "-S", release, "--show-depends", m],
            capture_output=True, text=True, check=False,
        ).stdout  # fmt: skip
        files += [Path(line.split()[1]) for line in out.splitlines() if line.startswith("insmod ")]
    return files


def build_initramfs(dest: Path, release: str) -> Path:
    """busybox, the modules to reach 9p, and the init above, as a newc cpio archive."""
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        raise HwLabError("busybox-static is missing: run hack/install-hwlab-deps.sh")
    with tempfile.TemporaryDirectory(prefix="pcipt-initramfs-") as tmp:
        root = Path(tmp)
        for d in ("bin", "proc", "sys", "dev", "modules"):
            (root / d).mkdir()
        shutil.copy2(busybox, root / "bin" / "busybox")
        order: list[str] = []
        for path in _module_files(release, INITRAMFS_MODULES):
            name = path.name.split(".ko")[0]
            if name in order:
                continue
            target = root / "modules" / f"{name}.ko"
            if path.name.endswith(".xz") or path.name.endswith(".zst"):
                tool = "xz" if path.name.endswith(".xz") else "zstd"
                unpacked = subprocess.run([tool, "-dc", str(path)], capture_output=True, check=True)
                target.write_bytes(unpacked.stdout)
            else:
                shutil.copy2(path, target)
            order.append(name)
        (root / "modules.order").write_text("\n".join(order) + "\n")
        (root / "init").write_text(INIT)
        (root / "init").chmod(0o755)
        return _cpio(root, dest)


GUEST_INIT = r"""#!/bin/busybox sh
# A nested guest's init: say which PCI functions it sees, on its serial console, and again
# whenever that changes (a device hot-plugged or unplugged).
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
boot=$(cat /proc/sys/kernel/random/boot_id)
last=""
while :; do
  now=$(/usr/bin/lspci -nn)
  if [ "$now" != "$last" ]; then
    # Which boot of which guest says it, and how long it has run: a guest that moved live
    # says the same boot ID with a longer uptime.
    echo "PCIPT-GUEST-ALIVE boot=$boot up=$(cut -d' ' -f1 /proc/uptime)"
    echo PCIPT-GUEST-LSPCI-BEGIN
    echo "$now"
    echo PCIPT-GUEST-LSPCI-END
    last=$now
  fi
  sleep 2
done
"""


def _cpio(root: Path, dest: Path) -> Path:
    files = subprocess.run(
        ["find", "."], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    archive = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet"],
        cwd=root,
        input=files.encode(),
        capture_output=True,
        check=True,
    ).stdout
    dest.write_bytes(archive)
    return dest


def build_guest_initramfs(dest: Path) -> Path:
    """The nested guest's whole root: busybox, this machine's lspci with its libraries and
    pci.ids, and GUEST_INIT."""
    with tempfile.TemporaryDirectory(prefix="pcipt-guest-") as tmp:
        root = Path(tmp)
        for d in ("bin", "proc", "sys", "dev", "usr/bin", "usr/share/misc"):
            (root / d).mkdir(parents=True)
        shutil.copy2("/bin/busybox", root / "bin" / "busybox")
        lspci = shutil.which("lspci") or "/usr/bin/lspci"
        shutil.copy2(lspci, root / "usr" / "bin" / "lspci")
        ldd = subprocess.run(["ldd", lspci], capture_output=True, text=True, check=True).stdout
        for lib in {w for w in ldd.split() if w.startswith("/")}:
            target = root / lib.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(lib, target)  # follows the symlink: the file under the soname
        ids = Path("/usr/share/misc/pci.ids")
        if ids.exists():
            shutil.copy2(ids, root / "usr" / "share" / "misc" / "pci.ids")
        (root / "init").write_text(GUEST_INIT)
        (root / "init").chmod(0o755)
        return _cpio(root, dest)


@dataclass
class Boot:
    exit_code: int | None
    seconds: float
    log: str
    console: str
    results: Path


@dataclass
class Running:
    """A lab host being booted or running its scenario (start); finish waits for it."""

    host: LabHost
    proc: subprocess.Popen[bytes]
    results: Path
    started: float
    console_file: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def finish(self) -> Boot:
        try:
            self.proc.wait(timeout=max(1.0, self.host.timeout - (time.monotonic() - self.started)))
            timed_out = False
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            timed_out = True
        seconds = time.monotonic() - self.started
        console = self.console_file.read_text(errors="replace")
        if timed_out:
            console += f"\n(timed out after {self.host.timeout:.0f}s)"
        exit_file = self.results / "exit"
        code = int(exit_file.read_text().strip()) if exit_file.exists() else None
        log_file = self.results / "scenario.log"
        out = log_file.read_text(errors="replace") if log_file.exists() else ""
        return Boot(code, seconds, out, console, self.results)


def start(
    host: LabHost, scenario: str, results: Path, *, log: Log = print, files: Sequence[Path] = ()
) -> Running:
    """Boot `host` to run the shell `scenario` inside (in /lab, which is `results` here);
    returns at once. The host powers off when the scenario ends."""
    vmlinuz, release = kernel()
    results.mkdir(parents=True, exist_ok=True)
    initrd = build_initramfs(results / "initramfs.cpio", release)
    (results / "run.sh").write_text(RUN)
    (results / "scenario.sh").write_text(scenario)
    for f in files:
        shutil.copy2(f, results / f.name)
    for stale in ("exit", "scenario.log"):
        (results / stale).unlink(missing_ok=True)
    log(f"hwlab: booting {host.name} ({len(host.devices)} devices)")
    console_file = results / "console.txt"
    with open(console_file, "wb") as console:
        proc = subprocess.Popen(
            host.qemu_args(vmlinuz, initrd, results),
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
        )
    return Running(host, proc, results, time.monotonic(), console_file)


def boot(
    host: LabHost, scenario: str, results: Path, *, log: Log = print, files: Sequence[Path] = ()
) -> Boot:
    """Boot `host`, run the shell `scenario` inside (in /lab, which is `results` here), and
    return its exit code and output once the host has powered off."""
    return start(host, scenario, results, log=log, files=files).finish()

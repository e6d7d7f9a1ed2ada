"""Bind devices to vfio-pci before a VM starts, and give them back to their own driver after.

The sysfs sequence is the kernel's: write `vfio-pci` to the device's driver_override, unbind it
from its current driver, then ask the kernel to probe it (drivers_probe), which binds it to the
override. To restore: unbind from vfio-pci, clear driver_override, probe again — the kernel
binds the device's own driver.

Only devices this plugin moved are ever moved back: which devices it moved, and from which
driver, is kept in a state file, so a restarted plugin never "restores" a device an admin
bound to vfio-pci on purpose. The writes go through a writer object: the real one writes
files; simulated hosts answer like a kernel.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Iterable, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pcipt import constants as c

log = logging.getLogger("pcipt.nodeplugin.vfio")
VFIO = "vfio-pci"


def is_vfio_driver(name: str | None) -> bool:
    """vfio-pci, or a vendor's variant of it (mlx5_vfio_pci, nvgrace_gpu_vfio_pci, ...): a
    device on one is ready for a VM as it is."""
    return name is not None and (name == VFIO or name.endswith(("_vfio_pci", "-vfio-pci")))


class SysfsWriter(Protocol):
    def write(self, path: Path, value: str) -> None: ...


class FileWriter:
    """Writes to sysfs files, as root on a real host."""

    def write(self, path: Path, value: str) -> None:
        with open(path, "w") as fh:
            fh.write(value)


@dataclass
class RecordingWriter:
    """Delegates, and records every write in order (tests check the exact sequence)."""

    inner: SysfsWriter
    writes: list[tuple[str, str]] = field(default_factory=list)
    root: Path | None = None

    def write(self, path: Path, value: str) -> None:
        shown = str(path.relative_to(self.root)) if self.root else str(path)
        self.writes.append((shown, value))
        self.inner.write(path, value)


class PrepareError(RuntimeError):
    """A device could not be bound to vfio-pci (or back). `reason` is a CamelCase word for
    conditions and Events; `address` the device at fault (None: every device asked for)."""

    def __init__(
        self, message: str, *, address: str | None = None, reason: str = c.REASON_PREPARE_FAILED
    ) -> None:
        super().__init__(message)
        self.address = address
        self.reason = reason


def _kernel_said(e: OSError) -> str:
    """The kernel's answer to a sysfs write, as `strerror (ERRNO)`."""
    name = errno.errorcode.get(e.errno or 0, str(e.errno))
    return f"{e.strerror or e} ({name})"


class Preparer:
    def __init__(
        self,
        root: Path,
        writer: SysfsWriter,
        state_file: Path,
        *,
        restore: bool = True,
        proc_root: Path = Path("/proc"),
    ) -> None:
        self.root = root
        self.writer = writer
        self.state_file = state_file
        self.restore_drivers = restore
        self.proc_root = proc_root
        self.moved: dict[str, str | None] = self._load()
        """address -> the driver it had before we bound it to vfio-pci (None: none)"""

    def _load(self) -> dict[str, str | None]:
        try:
            data = json.loads(self.state_file.read_text())
            return {str(k): v for k, v in data.get("moved", {}).items()}
        except (OSError, ValueError):
            return {}

    def _save(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"moved": self.moved}, indent=1, sort_keys=True))
        os.replace(tmp, self.state_file)

    def _dev(self, address: str) -> Path:
        return self.root / "bus" / "pci" / "devices" / address

    def _drivers(self) -> Path:
        return self.root / "bus" / "pci" / "drivers"

    def driver(self, address: str) -> str | None:
        link = self._dev(address) / "driver"
        try:
            return os.path.basename(os.readlink(link))
        except OSError:
            return None

    def vfio_loaded(self) -> bool:
        return (self._drivers() / VFIO).is_dir()

    def group_holders(self, address: str) -> list[str]:
        """Processes holding the device's /dev/vfio/<group> open, as 'comm (pid N)': while
        one does, vfio-pci's unbind would block until it lets go. Sees the processes of this
        PID namespace (the host's, with hostPID)."""
        try:
            group = os.path.basename(os.readlink(self._dev(address) / "iommu_group"))
        except OSError:
            return []
        want = f"/dev/vfio/{group}"
        found = []
        for proc in self.proc_root.glob("[0-9]*"):
            try:
                fds = list((proc / "fd").iterdir())
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(fd) == want:
                        comm = (proc / "comm").read_text().strip()
                        found.append(f"{comm} (pid {proc.name})")
                        break
                except OSError:
                    continue
        return sorted(found)

    def reset(self, address: str) -> str:
        """Reset the function through sysfs (the kernel tries its reset methods in order: a
        function-level reset first where the device has one). Returns the method the kernel
        lists first, or "none" when the device cannot be reset."""
        dev = self._dev(address)
        try:
            methods = (dev / "reset_method").read_text().split()
        except OSError:
            methods = ["reset"] if (dev / "reset").exists() else []
        if not methods or not (dev / "reset").exists():
            return "none"
        try:
            self.writer.write(dev / "reset", "1")
        except OSError as e:
            raise PrepareError(
                f"resetting {address} failed: the kernel said {_kernel_said(e)}",
                address=address,
                reason=c.REASON_SCRUB_FAILED,
            ) from e
        return methods[0]

    def bind_vfio(self, addresses: Iterable[str], unmanaged: Set[str] = frozenset()) -> list[str]:
        """Bind each device to vfio-pci; returns those that moved. Idempotent. All or nothing:
        when one fails, those this call moved go back to their drivers, and the failing one
        is left as it was found (no driver_override, its own driver). A device `unmanaged`
        (the device spec's `managed: false`) is never rebound: the admin binds it, and one
        found on another driver fails the call before anything moves."""
        addresses = list(addresses)
        for address in addresses:
            current = self.driver(address)
            if address in unmanaged and not is_vfio_driver(current):
                raise PrepareError(
                    f"{address} is on {current or 'no driver'}, and its device spec says "
                    "managed: false (the admin binds it to vfio-pci or a variant; pcipt does "
                    "not rebind it)",
                    address=address,
                    reason=c.REASON_NOT_BOUND_TO_VFIO,
                )
        if not self.vfio_loaded():
            raise PrepareError(
                "the vfio-pci driver is not loaded on this host: modprobe vfio-pci",
                reason=c.REASON_VFIO_NOT_LOADED,
            )
        moved: list[str] = []
        for address in addresses:
            current = self.driver(address)
            if is_vfio_driver(current):
                continue
            if not self._dev(address).exists():
                self._give_back(moved)
                raise PrepareError(
                    f"{address} is not on this host", address=address, reason=c.REASON_DEVICE_GONE
                )
            try:
                self._to_vfio(address, current)
            except PrepareError:
                self._give_back(moved)
                raise
            moved.append(address)
            log.info("bound device=%s driver=%s (was %s)", address, VFIO, current or "none")
        return moved

    def _to_vfio(self, address: str, current: str | None) -> None:
        # Recorded first: a plugin that dies half-way gives the device back after a restart.
        self.moved.setdefault(address, current)
        self._save()
        step = "setting driver_override"
        try:
            self.writer.write(self._dev(address) / "driver_override", VFIO)
            if current is not None:
                unbind = self._drivers() / current / "unbind"
                if not unbind.exists():
                    raise PrepareError(
                        f"driver {current} does not let {address} go: it has no unbind file "
                        "(the driver suppresses manual unbinding)",
                        address=address,
                        reason=c.REASON_UNBIND_REFUSED,
                    )
                step = f"unbinding it from {current}"
                self.writer.write(unbind, address)
            step = "binding it to vfio-pci"
            self.writer.write(self._drivers() / VFIO / "bind", address)
        except OSError as e:
            self._undo(address, current)
            reason = (
                c.REASON_UNBIND_REFUSED if step.startswith("unbinding") else c.REASON_BIND_REFUSED
            )
            raise PrepareError(
                f"{address}: {step} failed: the kernel said {_kernel_said(e)}",
                address=address,
                reason=reason,
            ) from e
        except PrepareError:
            self._undo(address, current)
            raise
        if self.driver(address) != VFIO:
            now = self.driver(address)
            self._undo(address, current)
            raise PrepareError(
                f"{address} did not bind to vfio-pci (driver then {now or 'none'})",
                address=address,
                reason=c.REASON_BIND_REFUSED,
            )

    def _undo(self, address: str, original: str | None) -> None:
        """Put a device a failed bind touched back as it was; forget it once it is."""

        def attempt(path: Path, value: str) -> None:
            try:
                self.writer.write(path, value)
            except OSError as e:
                log.warning("undoing device=%s: %s failed: %s", address, path.name, e)

        if self.driver(address) == VFIO:
            attempt(self._drivers() / VFIO / "unbind", address)
        attempt(self._dev(address) / "driver_override", "\n")
        if original is not None and self.driver(address) is None:
            attempt(self.root / "bus" / "pci" / "drivers_probe", address)
        if self.driver(address) == original:
            self.moved.pop(address, None)
            self._save()
        else:
            log.error(
                "device=%s left on %s, not %s: restore retries it",
                address,
                self.driver(address) or "no driver",
                original or "no driver",
            )

    def _give_back(self, addresses: list[str]) -> None:
        for address in addresses:
            try:
                self.restore([address])
            except PrepareError as e:
                log.error("giving back device=%s after a failed bind: %s", address, e)

    def restore(self, addresses: Iterable[str]) -> list[str]:
        """Give devices this plugin moved back to their own driver; others are left alone.
        Goes on past a device that fails, then raises the first failure."""
        if not self.restore_drivers:
            return []
        restored: list[str] = []
        first: PrepareError | None = None
        for address in addresses:
            if address not in self.moved:
                continue  # not ours to restore: bound to vfio-pci by someone else, or never moved
            try:
                self._restore_one(address)
            except PrepareError as e:
                first = first or e
                continue
            restored.append(address)
            log.info("restored device=%s driver=%s", address, self.driver(address) or "none")
        if first is not None:
            raise first
        return restored

    def _restore_one(self, address: str) -> None:
        original = self.moved[address]
        if self.driver(address) == VFIO:
            holders = self.group_holders(address)
            if holders:
                raise PrepareError(
                    f"{address} is busy: its VFIO group is held open by {', '.join(holders)}; "
                    "not unbinding (it would block until they let go)",
                    address=address,
                    reason=c.REASON_DEVICE_BUSY,
                )
        try:
            if self.driver(address) == VFIO:
                self.writer.write(self._drivers() / VFIO / "unbind", address)
            self.writer.write(self._dev(address) / "driver_override", "\n")
            if original is not None and self.driver(address) is None:
                self.writer.write(self.root / "bus" / "pci" / "drivers_probe", address)
        except OSError as e:
            raise PrepareError(
                f"restoring {address} to {original or 'no driver'} failed: the kernel said "
                f"{_kernel_said(e)}",
                address=address,
                reason=c.REASON_RESTORE_FAILED,
            ) from e
        if original is not None and self.driver(address) != original:
            raise PrepareError(
                f"{address} did not go back to {original} (driver now "
                f"{self.driver(address) or 'none'})",
                address=address,
                reason=c.REASON_RESTORE_FAILED,
            )
        del self.moved[address]
        self._save()

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

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

log = logging.getLogger("pcipt.nodeplugin.vfio")
VFIO = "vfio-pci"


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
    """A device could not be bound to vfio-pci (or back)."""


class Preparer:
    def __init__(
        self, root: Path, writer: SysfsWriter, state_file: Path, *, restore: bool = True
    ) -> None:
        self.root = root
        self.writer = writer
        self.state_file = state_file
        self.restore_drivers = restore
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

    def driver(self, address: str) -> str | None:
        link = self._dev(address) / "driver"
        try:
            return os.path.basename(os.readlink(link))
        except OSError:
            return None

    def bind_vfio(self, addresses: Iterable[str]) -> list[str]:
        """Bind each device to vfio-pci; returns those that moved. Idempotent."""
        if not (self.root / "bus" / "pci" / "drivers" / VFIO).is_dir():
            raise PrepareError("the vfio-pci driver is not loaded on this host: modprobe vfio-pci")
        moved = []
        for address in addresses:
            current = self.driver(address)
            if current == VFIO:
                continue
            if not self._dev(address).exists():
                raise PrepareError(f"{address} is not on this host")
            try:
                self.writer.write(self._dev(address) / "driver_override", VFIO)
                if current is not None:
                    self.writer.write(
                        self.root / "bus" / "pci" / "drivers" / current / "unbind", address
                    )
                self.writer.write(self.root / "bus" / "pci" / "drivers_probe", address)
            except OSError as e:
                raise PrepareError(f"binding {address} to vfio-pci failed: {e}") from e
            if self.driver(address) != VFIO:
                raise PrepareError(
                    f"{address} did not bind to vfio-pci (driver now {self.driver(address)})"
                )
            self.moved.setdefault(address, current)
            self._save()
            moved.append(address)
            log.info("bound device=%s driver=%s (was %s)", address, VFIO, current or "none")
        return moved

    def restore(self, addresses: Iterable[str]) -> list[str]:
        """Give devices this plugin moved back to their own driver; others are left alone."""
        if not self.restore_drivers:
            return []
        restored = []
        for address in addresses:
            if address not in self.moved:
                continue  # not ours to restore: bound to vfio-pci by someone else, or never moved
            original = self.moved[address]
            try:
                if self.driver(address) == VFIO:
                    self.writer.write(
                        self.root / "bus" / "pci" / "drivers" / VFIO / "unbind", address
                    )
                self.writer.write(self._dev(address) / "driver_override", "\n")
                if original is not None:
                    self.writer.write(self.root / "bus" / "pci" / "drivers_probe", address)
            except OSError as e:
                raise PrepareError(
                    f"restoring {address} to {original or 'no driver'} failed: {e}"
                ) from e
            del self.moved[address]
            self._save()
            restored.append(address)
            log.info("restored device=%s driver=%s", address, self.driver(address) or "none")
        return restored

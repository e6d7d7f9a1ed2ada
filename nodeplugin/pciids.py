"""Names of PCI vendors, devices and classes from the pci.ids database (Debian's `pci.ids`
package, /usr/share/misc/pci.ids, or hwdata's /usr/share/hwdata/pci.ids). Pure parsing.

When the host has no database, discovery still works: names are just absent.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PATHS = (Path("/usr/share/misc/pci.ids"), Path("/usr/share/hwdata/pci.ids"))


@dataclass
class PciIds:
    vendors: dict[str, str] = field(default_factory=dict)
    devices: dict[tuple[str, str], str] = field(default_factory=dict)
    classes: dict[str, str] = field(default_factory=dict)
    """'03' -> Display controller, '0302' -> 3D controller"""

    def vendor(self, vendor_id: str) -> str | None:
        return self.vendors.get(vendor_id.lower())

    def device(self, vendor_id: str, product_id: str) -> str | None:
        return self.devices.get((vendor_id.lower(), product_id.lower()))

    def class_name(self, class_code: str) -> str | None:
        code = class_code.lower()
        return self.classes.get(code[:4]) or self.classes.get(code[:2])


def parse(text: str) -> PciIds:
    ids = PciIds()
    vendor: str | None = None
    klass: str | None = None
    for raw in text.splitlines():
        if not raw or raw.startswith("#"):
            continue
        if raw.startswith("C "):
            code, _, name = raw[2:].partition("  ")
            klass, vendor = code.strip().lower(), None
            ids.classes[klass] = name.strip()
        elif raw.startswith("\t\t"):
            continue  # subsystems and programming interfaces: not needed
        elif raw.startswith("\t"):
            code, _, name = raw[1:].partition("  ")
            code = code.strip().lower()
            if vendor is not None:
                ids.devices[(vendor, code)] = name.strip()
            elif klass is not None:
                ids.classes[klass + code] = name.strip()
        else:
            code, _, name = raw.partition("  ")
            vendor, klass = code.strip().lower(), None
            ids.vendors[vendor] = name.strip()
    return ids


@functools.lru_cache(maxsize=4)
def load(path: Path | None = None) -> PciIds:
    """The database at `path`, or the first default that exists; empty when none does."""
    candidates = [path] if path is not None else list(DEFAULT_PATHS)
    for p in candidates:
        try:
            return parse(p.read_text(errors="replace"))
        except OSError:
            continue
    return PciIds()

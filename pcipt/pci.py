"""PCI addresses (domain:bus:device.function) and PCI IDs: parsing, canonical form, ordering.

Pure: no I/O. The API models, the scheduler and the node plugin all use these, so one
definition decides what a valid address is.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Final

# Canonical kernel form: lower-case hex, 4-digit domain, device 00-1f, function 0-7.
ADDRESS_PATTERN: Final = r"^[0-9a-f]{4}:[0-9a-f]{2}:[01][0-9a-f]\.[0-7]$"
ADDRESS_HINT: Final = "domain:bus:device.function in lower-case hex, e.g. 0000:3b:00.0"
_ADDRESS_RE: Final = re.compile(
    r"^(?:([0-9a-fA-F]{1,4}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])$"
)

HEX_ID_PATTERN: Final = r"^[0-9a-fA-F]{4}$"
CLASS_PREFIX_PATTERN: Final = r"^[0-9a-fA-F]{2}([0-9a-fA-F]{2}([0-9a-fA-F]{2})?)?$"


class PciAddressError(ValueError):
    """A string that is not a PCI address."""


@dataclass(frozen=True, order=True, slots=True)
class PciAddress:
    """One PCI function's address. Orders as the kernel lists devices."""

    domain: int
    bus: int
    device: int
    function: int

    @classmethod
    def parse(cls, text: str) -> PciAddress:
        """Parse `0000:3b:00.0` (or lspci's short `3b:00.0`, domain 0) in any letter case."""
        m = _ADDRESS_RE.match(text.strip())
        if m is None:
            raise PciAddressError(f"{text!r} is not a PCI address: use {ADDRESS_HINT}")
        domain = int(m.group(1) or "0", 16)
        bus, device, function = int(m.group(2), 16), int(m.group(3), 16), int(m.group(4))
        if device > 0x1F:
            raise PciAddressError(f"{text!r} is not a PCI address: device must be 00-1f")
        return cls(domain, bus, device, function)

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.device:02x}.{self.function:x}"

    @property
    def slot(self) -> str:
        """The address without its function: functions of one slot share it."""
        return f"{self.domain:04x}:{self.bus:02x}:{self.device:02x}"

    def dashed(self) -> str:
        """The address with ':' and '.' as '-', for object names."""
        return str(self).replace(":", "-").replace(".", "-")


def canonical_address(text: str) -> str:
    """Return the canonical kernel spelling of an address, raising PciAddressError if invalid."""
    return str(PciAddress.parse(text))


def is_canonical_address(text: str) -> bool:
    return re.match(ADDRESS_PATTERN, text) is not None


def generated_mac(uid: str, name: str) -> str:
    """A stable, locally administered unicast MAC for a VM's network, from its UID and the
    network's name (52:54:00 is the prefix QEMU uses for guests)."""
    digest = hashlib.sha256(f"{uid}/{name}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def normalize_hex_id(text: str) -> str:
    """`0x10DE`, `10DE` and `10de` all become `10de`."""
    t = text.strip().lower()
    return t[2:] if t.startswith("0x") else t

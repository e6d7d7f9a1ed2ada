"""What the device publisher learns about the host and the domain reconciler acts on, and what
the reconciler learns back (devices the kernel would not move): the one state the node plugin's
two halves share. No I/O."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nodeplugin.discovery import HostInventory
from pcipt.compute import NodeCompute


def _nothing(*_args: Any, **_kwargs: Any) -> None:
    return None


@dataclass
class HostState:
    host: HostInventory = field(default_factory=lambda: HostInventory(()))
    """The host's PCI functions as the last rescan found them."""
    compute: NodeCompute | None = None
    """The host's CPUs and memory, published on the node Lease."""
    unmanaged: set[str] = field(default_factory=set)
    """Addresses the device spec marks `managed: false`: never rebound by this plugin."""
    failures: dict[str, tuple[str, str]] = field(default_factory=dict)
    """address -> (reason, message): what the kernel said when preparing or restoring it
    failed; the device is published Unhealthy until it is cleared."""
    aer_rose: dict[str, float] = field(default_factory=dict)
    """address -> when its fatal AER count last rose (epoch seconds), while that makes it
    Unhealthy (nodeplugin.health)."""
    scrubs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """address -> the record of its last scrub (status.scrub), until it is published."""
    request_rescan: Callable[[], None] = _nothing
    """Ask the publisher for a rescan soon (a device's health changed)."""
    event_on_node: Callable[..., None] = _nothing
    """Post an Event about this node, or one of its published PciDevices (device=NAME)."""

"""The node plugin's settings, as the CLI (nodeplugin/cli.py) fills them from flags and their
PCIPT_<NAME> twins. Units are in the names' docs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pcipt import constants as c


@dataclass
class AgentSettings:
    node: str
    """This node's name: PciDevices are `<node>.<address>`, the Lease `pcipt-node-<node>`."""
    sysfs_root: Path = Path("/sys")
    """The host's sysfs (a fake tree for simulated hosts)."""
    config: Path | None = None
    """The device-spec file (YAML or JSON); re-read when it changes."""
    nova_conf: Path | None = None
    """A nova.conf whose [pci] device_spec entries are read too."""
    libvirt_uri: str = "qemu:///system"
    """Where domains are defined and run (test:///default for tests)."""
    migration_uri: str | None = None
    """The libvirt URI other nodes' libvirt reaches this node's at, to migrate running domains
    here (qemu+tls://<node address>/system, say); None: this node takes no live migrations
    (and starts none)."""
    namespace: str = c.DEFAULT_NAMESPACE
    """Where the node Lease lives."""
    state_dir: Path = Path("/var/lib/pcipt")
    """Device moves (which driver each device had) and the domains' XML; must survive restarts."""
    pci_ids: Path | None = None
    """The pci.ids database for names (default: the system's)."""
    rescan_interval: float = 30.0
    """Seconds between rescans of the host (a spec change or a health change rescans at once)."""
    lease_interval: float = 10.0
    """Seconds between renewals of the node Lease."""
    lease_duration: int = 40
    """Seconds the node Lease says it lasts."""
    resync_interval: float = 5.0
    """Seconds between looks at every VM and domain (guests that stopped by themselves)."""
    restore_drivers: bool = True
    """Give a device back to the driver it had when its VM goes (else leave it on vfio-pci)."""
    scrub: bool = True
    """Scrub released devices (reset, own driver back) before they are offered again; the node
    Lease says so, and the controller then waits for each scrub."""
    aer_hold_down: float = 300.0
    """Seconds a device stays Unhealthy after its fatal AER count last rose (a scrub's reset
    ends it sooner)."""
    domain_type: str = "kvm"
    """libvirt domain type: kvm, or qemu (TCG) where there is no KVM."""
    machine: str | None = "q35"
    """QEMU machine type; None: libvirt's default."""
    console_log_dir: str | None = None
    """Where each guest's serial console is logged; None: not logged."""
    reserved_cpus: tuple[int, ...] = ()
    """Host CPUs no VM runs on (dedicated VMs' emulator threads do)."""
    reserved_memory_mib: int = 0
    """MiB of memory kept for the host on each NUMA node."""
    stop_grace: float = 30.0
    """Seconds a guest gets to shut down before it is destroyed."""
    metrics_host: str = "127.0.0.1"
    """Address for /metrics, /healthz and /readyz."""
    metrics_port: int = 0
    """Port for /metrics, /healthz and /readyz; 0: off."""

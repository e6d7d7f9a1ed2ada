"""The node plugin's hands on libvirt: define, start, stop, destroy and undefine domains, and
list the ones pcipt owns. The only module that imports libvirt.

Calls block (libvirt-python is synchronous); the agent runs them in a worker thread.
Errors surface as VirtError carrying libvirt's own message, which ends up in the VM's status.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import libvirt

from nodeplugin.domain.model import VmRef
from nodeplugin.domain.render import vm_ref_of

log = logging.getLogger("pcipt.nodeplugin.virt")

STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "no state",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}

# libvirt prints every error to stderr by default; we report them ourselves.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


class VirtError(RuntimeError):
    """libvirt refused; str() is libvirt's message. `unsupported`: the driver cannot do it at
    all (the test driver has no hot-plug, say)."""

    def __init__(self, message: str, *, unsupported: bool = False) -> None:
        super().__init__(message)
        self.unsupported = unsupported


def _virt_error(e: libvirt.libvirtError) -> VirtError:
    return VirtError(str(e), unsupported=e.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT)


@dataclass(frozen=True)
class DomainInfo:
    name: str
    uuid: str
    state: str
    active: bool
    xml: str
    vm: VmRef | None
    """The PassthroughVM it belongs to; None for domains pcipt did not create."""


class Hypervisor:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._conn: libvirt.virConnect | None = None
        self._lock = threading.Lock()

    def _c(self) -> libvirt.virConnect:
        with self._lock:
            if self._conn is None or not self._conn.isAlive():
                try:
                    self._conn = libvirt.open(self.uri)
                except libvirt.libvirtError as e:
                    raise VirtError(f"cannot connect to libvirt at {self.uri}: {e}") from e
            return self._conn

    def _info(self, dom: libvirt.virDomain) -> DomainInfo:
        state, _ = dom.state()
        xml = dom.XMLDesc(0)
        return DomainInfo(
            dom.name(),
            dom.UUIDString(),
            STATES.get(state, str(state)),
            bool(dom.isActive()),
            xml,
            vm_ref_of(xml),
        )

    def domains(self) -> list[DomainInfo]:
        try:
            return [self._info(d) for d in self._c().listAllDomains(0)]
        except libvirt.libvirtError as e:
            raise VirtError(str(e)) from e

    def ours(self) -> list[DomainInfo]:
        return [d for d in self.domains() if d.vm is not None]

    def lookup(self, uuid: str) -> DomainInfo | None:
        try:
            return self._info(self._c().lookupByUUIDString(uuid))
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise VirtError(str(e)) from e

    def define(self, xml: str) -> DomainInfo:
        try:
            return self._info(self._c().defineXML(xml))
        except libvirt.libvirtError as e:
            raise VirtError(str(e)) from e

    def start(self, uuid: str) -> DomainInfo:
        try:
            dom = self._c().lookupByUUIDString(uuid)
            if not dom.isActive():
                dom.create()
            return self._info(dom)
        except libvirt.libvirtError as e:
            raise VirtError(str(e)) from e

    def stop(self, uuid: str, grace: float = 30.0) -> DomainInfo | None:
        """ACPI shutdown, then destroy if the guest has not stopped within `grace` seconds."""
        try:
            dom = self._c().lookupByUUIDString(uuid)
            if dom.isActive():
                # Some guests (and drivers) refuse a clean shutdown: destroyed below then.
                with contextlib.suppress(libvirt.libvirtError):
                    dom.shutdown()
                deadline = time.monotonic() + grace
                while dom.isActive() and time.monotonic() < deadline:
                    time.sleep(0.2)
                if dom.isActive():
                    dom.destroy()
            return self._info(dom)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise VirtError(str(e)) from e

    def attach(self, uuid: str, xml: str) -> DomainInfo:
        """Attach a device to the running guest and to its definition (live and config)."""
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG
        try:
            dom = self._c().lookupByUUIDString(uuid)
            dom.attachDeviceFlags(
                xml, flags if dom.isActive() else libvirt.VIR_DOMAIN_AFFECT_CONFIG
            )
            return self._info(dom)
        except libvirt.libvirtError as e:
            raise _virt_error(e) from e

    def detach(
        self, uuid: str, xml: str, gone: Callable[[str], bool], wait: float = 10.0
    ) -> DomainInfo:
        """Ask the guest to release a device and drop it from the definition; returns once
        `gone(domain XML)` says the live domain no longer has it. A guest that has not let go
        within `wait` seconds raises (the caller asks again later)."""
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG
        try:
            dom = self._c().lookupByUUIDString(uuid)
            dom.detachDeviceFlags(
                xml, flags if dom.isActive() else libvirt.VIR_DOMAIN_AFFECT_CONFIG
            )
            deadline = time.monotonic() + wait
            while not gone(dom.XMLDesc(0)):
                if time.monotonic() > deadline:
                    raise VirtError(f"the guest has not released the device after {wait:.0f}s")
                time.sleep(0.2)
            return self._info(dom)
        except libvirt.libvirtError as e:
            raise _virt_error(e) from e

    def migrate(self, uuid: str, dest_uri: str, edit: Callable[[str], str]) -> float:
        """Move the running domain to the libvirt at `dest_uri`, live, peer to peer (this
        host's libvirt talks to the target's), its definition persisted there and removed
        here; `edit(migratable XML)` gives the XML the target runs (only host-side parts may
        differ). Returns the seconds it took; raises VirtError with libvirt's words (the
        domain then still runs here)."""
        flags = (
            libvirt.VIR_MIGRATE_LIVE
            | libvirt.VIR_MIGRATE_PEER2PEER
            | libvirt.VIR_MIGRATE_PERSIST_DEST
            | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
            | libvirt.VIR_MIGRATE_AUTO_CONVERGE
        )
        try:
            dom = self._c().lookupByUUIDString(uuid)
            xml = edit(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE))
            params = {
                libvirt.VIR_MIGRATE_PARAM_DEST_XML: xml,
                libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: xml,
            }
            host = urlsplit(dest_uri).hostname
            if host:
                # The guest's memory goes to the address the target's libvirt is reached at,
                # not to whatever the target's hostname resolves to there.
                params[libvirt.VIR_MIGRATE_PARAM_URI] = f"tcp://{host}"
            started = time.monotonic()
            dom.migrateToURI3(dest_uri, params, flags)
            return time.monotonic() - started
        except libvirt.libvirtError as e:
            raise _virt_error(e) from e

    def remove(self, uuid: str) -> None:
        """Destroy (if running) and undefine; a domain already gone is fine."""
        try:
            dom = self._c().lookupByUUIDString(uuid)
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise VirtError(str(e)) from e

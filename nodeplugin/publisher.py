"""The node plugin's first half: keep this node's PciDevices true to the host.

Every `rescan_interval` (and whenever the device specs change or a device's health does): read
the device specs, discover the host in sysfs, give each PF the VF count its rule asks for
(never disturbing a claimed VF), decide what to offer, and write only what differs from what the
API server holds, by server-side apply as the node plugin's field manager. It also renews the
node's Lease, which carries the host's CPUs and memory. Decisions are made by the pure modules
(devicespec, discovery, vfcount, publish); this module reads, calls them, and writes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from nodeplugin import pciids
from nodeplugin.devicespec import DeviceSpecError, DeviceSpecs, decide, load_specs
from nodeplugin.discovery import discover, read_compute
from nodeplugin.health import judge
from nodeplugin.hoststate import HostState
from nodeplugin.metrics import NodeMetrics
from nodeplugin.publish import COND_HEALTHY, Plan, desired_devices, plan
from nodeplugin.settings import AgentSettings
from nodeplugin.sriov import CommandRunner, SriovError
from nodeplugin.vfcount import apply_vf_count, compute_vf_counts, vf_condition
from nodeplugin.vfio import SysfsWriter
from pcipt import clock
from pcipt import constants as c
from pcipt.api.v1alpha1 import pcidevice_name
from pcipt.backoff import Backoff, Health, is_transient
from pcipt.compute import ANNOTATION as COMPUTE_ANNOTATION
from pcipt.compute import NodeCompute
from pcipt.events import EventRecorder
from pcipt.informer import Informer
from pcipt.kubeclient import ApiError, Conflict, KubeClient, NotFound, crd_path

log = logging.getLogger("pcipt.nodeplugin")


@dataclass
class PublisherStats:
    rescans: int = 0
    last_rescan_writes: int = 0
    rescan_writes: list[int] = field(default_factory=list)
    last_discovery_s: float = 0.0
    config_error: str | None = None


async def _nothing() -> None:
    return None


class DevicePublisher:
    def __init__(
        self,
        api: KubeClient,
        settings: AgentSettings,
        state: HostState,
        devices: Informer,
        events: EventRecorder,
        *,
        metrics: NodeMetrics,
        writer: SysfsWriter,
        runner: CommandRunner,
    ) -> None:
        self.api = api
        self.settings = settings
        self.state = state
        self.devices = devices
        """This node's PciDevices as the API server holds them."""
        self.events = events
        self.metrics = metrics
        self.writer = writer
        self.runner = runner
        self.ids = pciids.load(settings.pci_ids)
        self.specs = DeviceSpecs()
        self.node_labels: dict[str, str] = {"kubernetes.io/hostname": settings.node}
        self.stats = PublisherStats()
        self.before_publish: Callable[[], Awaitable[None]] = _nothing
        """Called before each publish: the reconciler clears failures whose cause has gone."""
        self._config_stamp: tuple[float, ...] | None = None
        self._vf_said: dict[str, tuple[str, str]] = {}
        self._sick_said: dict[str, str] = {}
        self._rescan_now = asyncio.Event()
        self._rescan_lock = asyncio.Lock()
        self._lease_compute: NodeCompute | None = None
        """The CPUs and memory the Lease last carried."""
        state.request_rescan = self._rescan_now.set
        state.event_on_node = self._event_on_node

    async def rescan(self) -> Plan:
        """Discover, decide, and write only what differs from what the API server holds. One at
        a time: a VF count is changed through 0, which two rescans at once would interleave."""
        async with self._rescan_lock:
            return await self._rescan()

    async def _rescan(self) -> Plan:
        self._load_config()
        started = time.monotonic()
        self.state.host = await asyncio.to_thread(discover, self.settings.sysfs_root)
        self.state.compute = await asyncio.to_thread(
            read_compute,
            self.settings.sysfs_root,
            self.settings.reserved_cpus,
            self.settings.reserved_memory_mib,
        )
        self.stats.last_discovery_s = time.monotonic() - started
        self.metrics.discovery.observe(self.stats.last_discovery_s)
        await self._refresh_node_labels()
        vf_conditions = await self._ensure_vf_counts()
        try:
            decisions = decide(self.specs, self.state.host, self.node_labels)
        except DeviceSpecError as e:
            self.stats.config_error = str(e)
            log.error("device specs do not fit this host, offering nothing new: %s", e)
            self._event_on_node("Warning", c.REASON_DEVICE_SPEC_INVALID, str(e))
            decisions = []
        self.state.unmanaged = {
            d.address for d in decisions if d.attributes.get("managed") == "false"
        }
        await self.before_publish()
        current = {o["metadata"]["name"]: o for o in self.devices.items.values()}
        failures, groups, scrubs = self._health(current)
        desired = desired_devices(
            self.settings.node,
            self.state.host,
            decisions,
            self.ids,
            vf_conditions,
            failures=failures,
            groups=groups,
            scrubs=scrubs,
        )
        present = {pcidevice_name(self.settings.node, f.address) for f in self.state.host.functions}
        p = plan(desired, current, present)
        if self.state.compute != self._lease_compute:
            # The host's CPUs and memory reach the controller before its devices do, so no VM
            # is placed here uncounted in the moment between the two (the Lease would carry
            # them only at its next renewal).
            await self.renew_lease()
        await self._apply(p)
        self.stats.rescans += 1
        self.metrics.rescan_writes.inc(by=p.writes)
        self.stats.last_rescan_writes = p.writes
        self.stats.rescan_writes.append(p.writes)
        if p.writes:
            log.info(
                "rescanned node=%s devices=%d writes=%d", self.settings.node, len(desired), p.writes
            )
        return p

    def _health(
        self, current: dict[str, dict[str, Any]]
    ) -> tuple[
        dict[str, tuple[str, str]], dict[str, tuple[int, list[str]]], dict[str, dict[str, Any]]
    ]:
        """What makes each device Unhealthy (the kernel's refusals, rising fatal errors, a
        changed IOMMU group under a claim, a failed scrub), the IOMMU groups to keep
        publishing, and the scrub records to publish; a new cause is said in an Event."""
        by_addr = {o["spec"]["address"]: o for o in current.values() if o.get("spec")}
        sick, groups = judge(
            self.state.host, by_addr, self.state.aer_rose, time.time(), self.settings.aer_hold_down
        )
        scrubs: dict[str, dict[str, Any]] = {}
        for address, obj in by_addr.items():
            record = self.state.scrubs.get(address) or (obj.get("status") or {}).get("scrub")
            if not record:
                continue
            scrubs[address] = record
            release = (obj.get("spec") or {}).get("release") or {}
            if record.get("phase") == "Failed" and record.get("releaseID") == release.get("id"):
                sick[address] = (c.REASON_SCRUB_FAILED, record.get("message", "scrub failed"))
        for address, (reason, message) in sick.items():
            if self._sick_said.get(address) != reason and reason != c.REASON_SCRUB_FAILED:
                log.warning("device=%s unhealthy reason=%s: %s", address, reason, message)
                self._event_on_node(
                    "Warning", reason, message, device=pcidevice_name(self.settings.node, address)
                )
        self._sick_said = {a: r for a, (r, _m) in sick.items()}
        return {**sick, **self.state.failures}, groups, scrubs

    def _load_config(self) -> None:
        """Re-read the device specs when their files changed; keep the last good ones on error."""
        paths = [p for p in (self.settings.config, self.settings.nova_conf) if p is not None]
        stamp = tuple(p.stat().st_mtime if p.exists() else -1.0 for p in paths)
        if stamp == self._config_stamp:
            return
        self._config_stamp = stamp
        try:
            text = (
                self.settings.config.read_text()
                if self.settings.config and self.settings.config.exists()
                else None
            )
            nova = (
                self.settings.nova_conf.read_text()
                if self.settings.nova_conf and self.settings.nova_conf.exists()
                else None
            )
            self.specs = load_specs(text, nova_conf=nova)
            self.stats.config_error = None
            log.info(
                "loaded device specs entries=%d nova=%d",
                len(self.specs.entries),
                len(self.specs.nova),
            )
        except (DeviceSpecError, OSError) as e:
            self.stats.config_error = str(e)
            self.metrics.config_errors.inc()
            log.error("device specs refused, keeping the last good ones: %s", e)
            self._event_on_node(
                "Warning",
                c.REASON_DEVICE_SPEC_INVALID,
                f"device specs refused, last good ones kept: {e}",
            )

    async def _apply(self, p: Plan) -> None:
        t = clock.timestamp()
        for d in p.apply_spec:
            body = {
                "apiVersion": c.API_VERSION,
                "kind": c.KIND_PCIDEVICE,
                "metadata": {"name": d.name, "labels": d.labels},
                "spec": d.spec,
            }
            got = await self._ssa(crd_path(c.PLURAL_PCIDEVICE, d.name), body)
            self.devices.apply("MODIFIED", got)
        for d in p.apply_status:
            status = dict(d.status)
            status["conditions"] = [{**x, "lastTransitionTime": t} for x in status["conditions"]]
            body = {
                "apiVersion": c.API_VERSION,
                "kind": c.KIND_PCIDEVICE,
                "metadata": {"name": d.name},
                "status": status,
            }
            got = await self._ssa(crd_path(c.PLURAL_PCIDEVICE, d.name, subresource="status"), body)
            self.devices.apply("MODIFIED", got)
        for name, health, reason, message in p.mark:
            body = {
                "apiVersion": c.API_VERSION,
                "kind": c.KIND_PCIDEVICE,
                "metadata": {"name": name},
                "status": {
                    "health": health,
                    "conditions": [
                        {
                            "type": COND_HEALTHY,
                            "status": "False",
                            "reason": reason,
                            "message": message,
                            "lastTransitionTime": t,
                        }
                    ],
                },
            }
            got = await self._ssa(crd_path(c.PLURAL_PCIDEVICE, name, subresource="status"), body)
            self.devices.apply("MODIFIED", got)
            log.info("marked device=%s health=%s reason=%s", name, health, reason)
        for name, rv in p.delete:
            try:
                await self.api.delete(
                    crd_path(c.PLURAL_PCIDEVICE, name),
                    body={
                        "apiVersion": "v1",
                        "kind": "DeleteOptions",
                        "preconditions": {"resourceVersion": rv},
                    },
                )
                self.devices.apply("DELETED", {"metadata": {"name": name}})
                log.info("unpublished device=%s", name)
            except (Conflict, NotFound):
                pass  # changed meanwhile (a VM claimed it?): the next rescan decides again

    async def _ssa(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply as the node plugin: it owns spec.nodeName, spec.address, labels
        and status, and never touches what the controller or an admin set."""
        return await self.api.patch(
            path, body, patch_type="apply", field_manager=c.FIELD_MANAGER_NODEPLUGIN, force=True
        )

    async def _refresh_node_labels(self) -> None:
        try:
            node = await self.api.get(f"/api/v1/nodes/{self.settings.node}")
            labels = node.get("metadata", {}).get("labels") or {}
        except NotFound:
            labels = {}
        except ApiError:
            return
        self.node_labels = {"kubernetes.io/hostname": self.settings.node, **labels}

    async def _ensure_vf_counts(self) -> dict[str, list[dict[str, Any]]]:
        """Give each PF the VF count its `vfs` rule asks for, unless a VF of it is claimed;
        rediscover when a count changed. Returns each ruled PF's VFsConfigured condition."""
        claimed = {
            o["spec"]["address"]: f"{ref.get('namespace')}/{ref.get('name')}"
            for o in self.devices.items.values()
            if (ref := (o.get("spec") or {}).get("claimRef"))
        }
        counts = compute_vf_counts(self.specs, self.state.host, self.node_labels, claimed)
        conditions: dict[str, list[dict[str, Any]]] = {}
        changed = False
        for v in counts:
            failed = None
            if v.writes:
                try:
                    await asyncio.to_thread(
                        apply_vf_count, self.settings.sysfs_root, self.writer, v, self.runner
                    )
                    changed = True
                    log.info(
                        "set pf=%s vfs=%d (was %d) rule=%s", v.pf, v.desired, v.current, v.rule
                    )
                except OSError as e:
                    failed = f"writing {v.desired} to {v.pf}'s sriov_numvfs failed: {e}"
                except SriovError as e:
                    failed = f"preparing {v.pf} for {v.desired} VFs failed: {e}"
            cond = vf_condition(v, failed)
            conditions[v.pf] = [cond]
            said = (cond["reason"], cond["message"])
            if self._vf_said.get(v.pf) != said and (v.writes or v.refused or failed):
                self._vf_said[v.pf] = said
                warn = cond["status"] == "False"
                if warn:
                    log.warning("kept pf=%s vfs=%d: %s", v.pf, v.current, cond["message"])
                self._event_on_node(
                    "Warning" if warn else "Normal",
                    cond["reason"],
                    cond["message"]
                    if warn
                    else f"{v.pf}: {v.current} -> {v.desired} VFs ({v.rule})",
                    device=pcidevice_name(self.settings.node, v.pf),
                )
        if changed:
            self.state.host = await asyncio.to_thread(discover, self.settings.sysfs_root)
        return conditions

    def _event_on_node(
        self, type_: str, reason: str, message: str, *, device: str | None = None
    ) -> None:
        """An Event about this Node, or about one of its PciDevices when it is published."""
        involved = {"apiVersion": "v1", "kind": "Node", "name": self.settings.node}
        if device is not None and any(
            o["metadata"]["name"] == device for o in self.devices.items.values()
        ):
            involved = {"apiVersion": c.API_VERSION, "kind": c.KIND_PCIDEVICE, "name": device}
        self.events.record(involved, type_, reason, message)

    async def rescan_loop(self) -> None:
        await self.devices.synced.wait()
        health = Health(log, "rescanning and publishing")
        backoff = Backoff(base=2.0, cap=self.settings.rescan_interval)
        last, wait = 0.0, self.settings.rescan_interval
        while True:
            due = time.monotonic() - last >= wait
            if due or self._rescan_now.is_set() or self._config_changed():
                self._rescan_now.clear()
                last = time.monotonic()
                try:
                    await self.rescan()
                except Exception as e:
                    self.metrics.error("rescan")
                    wait = backoff.next()
                    if is_transient(e):
                        health.failed(e, wait)
                    else:
                        log.exception("rescan failed; retrying in %.1fs", wait)
                else:
                    health.ok()
                    backoff.reset()
                    wait = self.settings.rescan_interval
            await asyncio.sleep(1.0)

    def _config_changed(self) -> bool:
        paths = [p for p in (self.settings.config, self.settings.nova_conf) if p is not None]
        stamp = tuple(p.stat().st_mtime if p.exists() else -1.0 for p in paths)
        return stamp != self._config_stamp

    async def renew_lease(self) -> None:
        """Write the node Lease once: alive now, with the host's CPUs and memory."""
        name = f"{c.NODE_LEASE_PREFIX}{self.settings.node}"
        path = f"/apis/coordination.k8s.io/v1/namespaces/{self.settings.namespace}/leases"
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": name,
                "namespace": self.settings.namespace,
                # The host's CPUs and memory, for the controller to count VMs against.
                "annotations": {
                    **(
                        {COMPUTE_ANNOTATION: self.state.compute.to_json()}
                        if self.state.compute
                        else {}
                    ),
                    # The controller holds released devices back until this plugin scrubs them.
                    c.ANNOTATION_SCRUBS: "true" if self.settings.scrub else "false",
                    # Where this node's libvirt takes live migrations (none: it takes part in
                    # none, and the controller refuses live migrations from and to it).
                    **(
                        {c.ANNOTATION_MIGRATION_URI: self.settings.migration_uri}
                        if self.settings.migration_uri
                        else {}
                    ),
                },
            },
            "spec": {
                "holderIdentity": self.settings.node,
                "leaseDurationSeconds": self.settings.lease_duration,
                "renewTime": clock.micro_timestamp(),
            },
        }
        await self.api.patch(
            f"{path}/{name}",
            body,
            patch_type="apply",
            field_manager=c.FIELD_MANAGER_NODEPLUGIN,
            force=True,
        )
        self._lease_compute = self.state.compute

    async def lease_loop(self) -> None:
        health = Health(log, f"renewing Lease {c.NODE_LEASE_PREFIX}{self.settings.node}")
        while True:
            try:
                await self.renew_lease()
            except Exception as e:
                health.failed(e, self.settings.lease_interval)
            else:
                health.ok()
            await asyncio.sleep(self.settings.lease_interval)

    def collect(self) -> None:
        health: dict[tuple[str, ...], float] = {}
        for obj in self.devices.items.values():
            h = (obj.get("status") or {}).get("health", "Unknown")
            health[(h,)] = health.get((h,), 0.0) + 1
        self.metrics.published.replace(health)

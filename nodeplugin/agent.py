"""The node plugin: the device publisher (nodeplugin/publisher.py) and the domain reconciler
(nodeplugin/reconciler.py), built from what the composition root (the CLI, a test) gives, and
run together. The host backends default to the real ones (the kernel's sysfs, `ip`, libvirt at
the configured URI); a simulated host's are passed in by whoever wants one.

Nothing it knows is lost when the API server is away: writes are retried on the next pass,
watches list again, device moves are kept in a state file.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from nodeplugin.hoststate import HostState
from nodeplugin.metrics import NodeMetrics
from nodeplugin.publisher import DevicePublisher, PublisherStats
from nodeplugin.reconciler import DomainReconciler
from nodeplugin.settings import AgentSettings
from nodeplugin.sriov import CommandRunner, IpRunner
from nodeplugin.vfio import FileWriter, Preparer, SysfsWriter
from nodeplugin.virt import Hypervisor
from pcipt import constants as c
from pcipt import metrics as pm
from pcipt.events import EventRecorder
from pcipt.informer import Informer
from pcipt.kubeclient import KubeClient, crd_path

__all__ = ["AgentSettings", "NodeAgent"]

log = logging.getLogger("pcipt.nodeplugin")


class NodeAgent:
    def __init__(
        self,
        api: KubeClient,
        settings: AgentSettings,
        *,
        writer: SysfsWriter | None = None,
        runner: CommandRunner | None = None,
        hypervisor: Hypervisor | None = None,
    ) -> None:
        self.api = api
        self.settings = settings
        self.writer = writer or FileWriter()
        self.runner = runner or IpRunner()
        self.registry = pm.Registry()
        self.metrics = NodeMetrics(self.registry)
        self.events = EventRecorder(api, "pcipt-nodeplugin", host=settings.node)
        self.state = HostState()
        self.devices = Informer(
            api,
            crd_path(c.PLURAL_PCIDEVICE),
            label_selector=f"{c.LABEL_NODE}={settings.node}",
            name="pcidevices",
            on_event=self._device_event,
        )
        self.preparer = Preparer(
            settings.sysfs_root,
            self.writer,
            settings.state_dir / f"{settings.node}-vfio.json",
            restore=settings.restore_drivers,
        )
        self.publisher = DevicePublisher(
            api,
            settings,
            self.state,
            self.devices,
            self.events,
            metrics=self.metrics,
            writer=self.writer,
            runner=self.runner,
        )
        self.reconciler = DomainReconciler(
            api,
            settings,
            self.state,
            self.devices,
            metrics=self.metrics,
            preparer=self.preparer,
            hypervisor=hypervisor or Hypervisor(settings.libvirt_uri),
            runner=self.runner,
        )
        self.publisher.before_publish = self._before_publish
        self.registry.collectors.append(self.publisher.collect)
        self._tasks: list[asyncio.Task[Any]] = []
        self._metrics_runner: Any = None

    def _device_event(self, kind: str, obj: dict[str, Any]) -> None:
        """A release to scrub: rescan now rather than at the next interval."""
        if kind != "DELETED" and self.reconciler.scrub_due(obj):
            self.state.request_rescan()

    async def _before_publish(self) -> None:
        await self.reconciler.retry_failures()
        await self.reconciler.scrub_released()

    # What tests and benchmarks look at.
    @property
    def stats(self) -> PublisherStats:
        return self.publisher.stats

    @property
    def failures(self) -> dict[str, tuple[str, str]]:
        return self.state.failures

    async def rescan(self) -> Any:
        return await self.publisher.rescan()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self.devices.run(), name="devices"),
            loop.create_task(self.reconciler.vms.run(), name="vms"),
            loop.create_task(self.reconciler.arriving.run(), name="vms-arriving"),
            loop.create_task(self.publisher.lease_loop(), name="lease"),
            loop.create_task(self.publisher.rescan_loop(), name="rescan"),
            loop.create_task(self.reconciler.resync_loop(), name="resync"),
        ]
        if self.settings.metrics_port:
            self._metrics_runner = await pm.serve(
                self.registry,
                self.settings.metrics_host,
                self.settings.metrics_port,
                health=self.devices.synced.is_set,
            )
        log.info(
            "node plugin started node=%s sysfs=%s libvirt=%s",
            self.settings.node,
            self.settings.sysfs_root,
            self.settings.libvirt_uri,
        )

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.reconciler.stop()
        await self.events.drain()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()

    async def run_forever(self) -> None:
        await self.start()
        try:
            await asyncio.gather(*self._tasks)
        finally:
            await self.stop()

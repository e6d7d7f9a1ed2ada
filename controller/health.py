"""Device health as the VMs using the devices see it: a placed VM one of whose devices the node
plugin publishes Unhealthy or Missing gets DevicesHealthy=False naming each device and its
reason (Ready follows), and a Warning Event; when they are all healthy again the condition
says so and a Normal Event tells. VMs that never had a sick device carry no such condition.

The device itself is judged by the node plugin (failed vfio bind, vanished, rising fatal AER
counters, a changed IOMMU group, a failed scrub); this only relays it to the tenant.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from controller.inventory import Inventory
from controller.statuswriter import VmStatusWriter
from controller.vmstatus import is_deleting, listed_devices
from pcipt import constants as c
from pcipt.api.v1alpha1 import PassthroughVM
from pcipt.conditions import get_condition
from pcipt.events import EventRecorder

log = logging.getLogger("pcipt.controller.health")


class DeviceHealth:
    def __init__(self, inventory: Inventory, status: VmStatusWriter, events: EventRecorder) -> None:
        self.inventory = inventory
        self.status = status
        self.events = events

    def sick(self, vm: PassthroughVM) -> list[str]:
        """'<device> is <health>: <reason>' for each device the VM lists that is not healthy."""
        out = []
        for name in sorted(listed_devices(vm)):
            d = self.inventory.devices.get(name)
            if d is not None and d.health != "Healthy":
                out.append(
                    f"{name} is {d.health}" + (f" ({d.health_reason})" if d.health_reason else "")
                )
        return out

    async def mark_vms(self, vms: Iterable[PassthroughVM] | None = None) -> None:
        for vm in list(self.inventory.vms.values()) if vms is None else vms:
            if not vm.status.node_name or is_deleting(vm):
                continue
            sick = self.sick(vm)
            cond = get_condition(vm.status.conditions, c.COND_DEVICES_HEALTHY)
            if not sick and (cond is None or cond.status == "True"):
                continue
            if sick:
                msg = "; ".join(sick)
                if cond is not None and cond.status == "False" and cond.message == msg:
                    continue
                fresh = await self.status.patch(
                    vm, {}, cond=(c.COND_DEVICES_HEALTHY, False, c.REASON_DEVICE_UNHEALTHY, msg)
                )
                if fresh is not None:
                    log.warning(
                        "vm=%s/%s has unhealthy devices: %s",
                        vm.metadata.namespace,
                        vm.metadata.name,
                        msg,
                    )
                    self.events.record(vm, "Warning", c.REASON_DEVICE_UNHEALTHY, msg)
                continue
            msg = "every device of the VM is healthy again"
            fresh = await self.status.patch(
                vm, {}, cond=(c.COND_DEVICES_HEALTHY, True, c.REASON_DEVICES_HEALTHY, msg)
            )
            if fresh is not None:
                self.events.record(vm, "Normal", c.REASON_DEVICES_HEALTHY, msg)

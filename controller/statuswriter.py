"""Conditional writes of a PassthroughVM's status by the controller's parts (the finalizer, node
liveness, the audit): one condition plus a few fields, only when something changes, only on the
version of the VM the caller decided from. Scheduled status is binding.py's."""

from __future__ import annotations

from typing import Any

from controller.inventory import Inventory
from controller.vmstatus import condition_status
from pcipt import clock
from pcipt import constants as c
from pcipt.api.v1alpha1 import PassthroughVM
from pcipt.kubeclient import Conflict, KubeClient, NotFound, crd_path


class VmStatusWriter:
    def __init__(self, api: KubeClient, inventory: Inventory) -> None:
        self.api = api
        self.inventory = inventory

    async def patch(
        self,
        vm: PassthroughVM,
        extra: dict[str, Any],
        *,
        cond: tuple[str, bool, str, str],
    ) -> PassthroughVM | None:
        """Set one condition (type, status, reason, message) plus `extra` status fields,
        conditionally on the VM not having changed; None when it had."""
        type_, status, reason, message = cond
        st = condition_status(vm, type_, status, reason, message, clock.now(), extra)
        if st is None:
            return vm
        return await self.write(vm, st)

    async def write(self, vm: PassthroughVM, st: dict[str, Any]) -> PassthroughVM | None:
        """Merge `st` into the status, conditionally on the VM not having changed since `vm`;
        None when it had."""
        body = {"metadata": {"resourceVersion": vm.metadata.resource_version}, "status": st}
        try:
            path = crd_path(
                c.PLURAL_PASSTHROUGHVM,
                vm.metadata.name,
                namespace=vm.metadata.namespace or "",
                subresource="status",
            )
            got = await self.api.patch(path, body)
        except (Conflict, NotFound):
            return None
        fresh = PassthroughVM.model_validate(got)
        self.inventory.upsert_vm(fresh)
        return fresh

"""Live migration's pure parts: reading the request, what makes a VM movable live, and the VM
the scheduler places on the target."""

from __future__ import annotations

import json
from typing import Any

from controller.inventory import Inventory
from controller.livemigration import live_problem, migration_vm
from controller.migration import MigrationRequest, request_of
from pcipt import constants as c
from pcipt.api.v1alpha1 import PassthroughVM


def vm(
    status: dict[str, Any], *, annotations: dict[str, str] | None = None, **spec: Any
) -> PassthroughVM:
    return PassthroughVM.model_validate(
        {
            "metadata": {
                "name": "r",
                "namespace": "t",
                "uid": "u1",
                "annotations": annotations or {},
            },
            "spec": {"memory": "1Gi", **spec},
            "status": status,
        }
    )


RUNNING = {
    "nodeName": "a",
    "phase": "Running",
    "conditions": [
        {"type": c.COND_DOMAIN_READY, "status": "True", "reason": "Running", "message": "",
         "lastTransitionTime": "2026-01-01T00:00:00Z"},
    ],
    "networks": [{"name": "net", "pciDevice": "a.0000-5e-02-1", "address": "0000:5e:02.1",
                  "netdev": "ens1f0v1", "mac": "52:54:00:00:00:01"}],
}  # fmt: skip
NETS = [{"name": "net", "flavor": "vf", "mode": "macvtap"}]


def inventory(*nodes: str) -> Inventory:
    inv = Inventory()
    inv.migration_uris = {n: f"qemu+tls://{n}/system" for n in nodes}
    return inv


def test_the_annotation_says_live_and_anything_but_a_boolean_is_refused() -> None:
    def req(value: dict[str, Any]) -> Any:
        return request_of(vm({}, annotations={c.ANNOTATION_MIGRATE: json.dumps(value)}))

    assert req({"id": "m1", "to": "b", "live": True}) == MigrationRequest("m1", "b", True)
    assert req({"id": "m1"}) == MigrationRequest("m1", None, False)
    assert "'live' must be true or false" in req({"id": "m1", "live": "yes"})


def test_only_a_running_vm_whose_passthrough_devices_are_networks_moves_live() -> None:
    inv = inventory("a", "b")
    assert live_problem(vm(RUNNING, networks=NETS), inv) is None
    gpu = {**RUNNING, "devices": [{"request": "gpu", "pciDevice": "a.0000-3b-00-0",
                                   "address": "0000:3b:00.0"}]}  # fmt: skip
    why = live_problem(vm(gpu, networks=NETS), inv)
    assert why is not None and "0000:3b:00.0" in why and "cold migration" in why
    stopped = live_problem(vm(RUNNING, networks=NETS, running=False), inv)
    assert stopped is not None and "not running" in stopped
    assert "nothing to migrate" in (live_problem(vm({}, networks=NETS), inv) or "")
    silent = live_problem(vm(RUNNING, networks=NETS), inventory("b"))
    assert silent is not None and "node plugin on a" in silent and "--migration-uri" in silent


def test_the_target_placement_counts_the_vm_as_new_and_keeps_off_its_node() -> None:
    v = vm(RUNNING, networks=NETS, devices=[{"name": "spare", "flavor": "x", "optional": True}])
    part = migration_vm(v, "b")
    assert part.metadata.uid == "u1-migration"  # its claims on a are another VM's
    assert part.spec.devices == [] and [n.name for n in part.spec.networks] == ["net"]
    assert part.status.node_name is None and part.status.networks == []
    mig = part.status.migration
    assert (
        mig is not None and mig.phase == "Placing" and mig.from_node == "a" and mig.to_node == "b"
    )

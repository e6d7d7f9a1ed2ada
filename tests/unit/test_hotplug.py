"""How a placed VM's spec differs from what is bound to it (controller.hotplug.delta), and the
partial VM the scheduler places hot-added requests for."""

from __future__ import annotations

from typing import Any

from controller.hotplug import Delta, delta, delta_vm
from pcipt.api.v1alpha1 import PassthroughVM


def placed(spec: dict[str, Any], status: dict[str, Any]) -> PassthroughVM:
    return PassthroughVM.model_validate(
        {
            "metadata": {"name": "vm", "namespace": "t", "uid": "u1"},
            "spec": {"memory": "1Gi", **spec},
            "status": {"phase": "Running", "nodeName": "node-a", **status},
        }
    )


GPU = {"request": "gpu", "pciDevice": "a.3b", "address": "0000:3b:00.0"}
AUDIO = {"request": "gpu", "pciDevice": "a.3b1", "address": "0000:3b:00.1", "companion": True}
NET = {"name": "net", "pciDevice": "a.5e", "address": "0000:5e:02.0", "vlan": 100}


def flavor_of(name: str) -> str | None:
    return {"a.3b": "a100", "a.5e": "vf"}.get(name)


def test_nothing_differs_when_the_spec_is_what_is_bound() -> None:
    vm = placed(
        {
            "devices": [{"name": "gpu", "flavor": "a100"}],
            "networks": [{"name": "net", "flavor": "vf", "vlan": 100}],
        },
        {"devices": [GPU, AUDIO], "networks": [NET]},
    )
    d = delta(vm, flavor_of)
    assert (d.added, d.removed, d.changed) == ([], [], [])


def test_added_removed_and_changed_requests_are_told_apart() -> None:
    vm = placed(
        {
            "devices": [
                {"name": "gpu", "flavor": "h100", "count": 2},
                {"name": "nvme", "flavor": "nvme"},
            ],
            "networks": [],
        },
        {"devices": [GPU, AUDIO], "networks": [NET]},
    )
    d = delta(vm, flavor_of)
    assert d.added == ["nvme"]
    assert d.removed == ["net"]
    assert d.changed == [
        "spec.devices[gpu].flavor: a100 -> h100",
        "spec.devices[gpu].count: 1 -> 2",
    ]


def test_a_network_vlan_change_is_not_live_and_a_skipped_optional_request_waits() -> None:
    vm = placed(
        {
            "devices": [{"name": "spare", "flavor": "a100", "optional": True}],
            "networks": [{"name": "net", "flavor": "vf", "vlan": 200}],
        },
        {"networks": [NET], "skipped": [{"request": "spare", "reason": "none free"}]},
    )
    d = delta(vm, flavor_of)
    assert d.added == [] and d.changed == ["spec.networks[net].vlan: 100 -> 200"]
    vm.spec.devices[0].attach_when_free = True
    assert delta(vm, flavor_of).added == ["spare"]


def test_a_request_whose_devices_are_still_detaching_is_not_added_again_yet() -> None:
    vm = placed(
        {"devices": [{"name": "gpu", "flavor": "a100"}]},
        {"detaching": [{"request": "gpu", "pciDevice": "a.3b", "address": "0000:3b:00.0"}]},
    )
    assert delta(vm, flavor_of).added == []


def test_the_partial_vm_asks_only_for_the_added_requests_on_the_vms_node() -> None:
    vm = placed(
        {
            "devices": [{"name": "gpu", "flavor": "a100"}, {"name": "nvme", "flavor": "nvme"}],
            "placement": {"sameNUMA": ["gpu", "nvme"]},
        },
        {"devices": [GPU]},
    )
    part = delta_vm(vm, ["nvme"])
    assert [r.name for r in part.spec.devices] == ["nvme"]
    assert part.spec.node_selector == {"kubernetes.io/hostname": "node-a"}
    assert part.spec.placement is None  # one request left: no cross-request rule
    assert part.metadata.uid != vm.metadata.uid  # its own devices count as another VM's


def test_edits_of_the_counted_cpus_and_memory_are_named_too() -> None:
    vm = placed(
        {"cpu": {"cores": 4, "policy": "dedicated"}, "memory": "2Gi"},
        {"compute": {"policy": "shared", "vcpus": 2, "memoryMiB": 1024}},
    )
    assert delta(vm, flavor_of).changed == [
        "spec.cpu.cores: 2 -> 4",
        "spec.cpu.policy: shared -> dedicated",
        "spec.memory: 1024Mi -> 2Gi",
    ]
    same = placed({"cpu": {"cores": 2}}, {"compute": {"vcpus": 2, "memoryMiB": 1024}})
    assert delta(same, flavor_of).changed == []


def test_a_vfs_rate_or_link_state_edit_is_not_live() -> None:
    v = placed(
        {"networks": [{"name": "net", "flavor": "vf", "maxTxRate": 200, "linkState": "enable"}]},
        {"networks": [{"name": "net", "pciDevice": "n.0000-5e-02-1", "address": "0000:5e:02.1",
                       "maxTxRate": 100}]},
    )  # fmt: skip
    d = delta(v, flavor_of)
    assert d.changed == [
        "spec.networks[net].maxTxRate: 100 -> 200",
        "spec.networks[net].linkState: None -> enable",
    ]


def test_a_request_bound_by_one_of_its_alternatives_is_what_is_bound() -> None:
    spec = {"devices": [{"name": "gpu", "flavor": "h100",
                         "alternatives": [{"flavor": "a100", "count": 2}]}]}  # fmt: skip
    two = [{**GPU, "alternative": 1}, {**GPU, "pciDevice": "a.3c", "address": "0000:3c:00.0",
                                      "alternative": 1}]  # fmt: skip
    d = delta(placed(spec, {"devices": two}), lambda n: "a100")
    assert d == Delta()
    # The alternative edited to one device: that field is named.
    spec["devices"][0]["alternatives"][0]["count"] = 1
    d = delta(placed(spec, {"devices": two}), lambda n: "a100")
    assert d.changed == ["spec.devices[gpu].alternatives[0].count: 2 -> 1"]

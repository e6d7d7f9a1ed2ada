"""Life after placement, the controller's half, against the real kube-apiserver: evacuation from
a node known to be down, released devices held back for their scrub and quarantine, and device
health reaching the VMs that use it. Devices and Leases are written the way node plugins write
them (tests/integration/test_nodeplugin.py and tests/e2e run the real node plugin)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from pcipt import constants as c
from pcipt.api.v1alpha1 import PassthroughVM
from pcipt.cli import kubectl_pcipt
from tests.integration.conftest import KubeCluster
from tests.integration.ctlfix import (
    ControllerProcess,
    LeaseKeeper,
    World,
    check_invariants,
    consistently,
    iso_now,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("operator_namespace")


@pytest.fixture
def nodes(kube: KubeCluster) -> Iterator[Callable[..., str]]:
    """Node objects (no kubelet behind them: only their labels and taints matter here)."""
    core = client.CoreV1Api(kube.api)
    made: list[str] = []

    def make(name: str, labels: dict[str, str] | None = None) -> str:
        core.create_node(
            client.V1Node(metadata=client.V1ObjectMeta(name=name, labels=labels or {}))
        )
        made.append(name)
        return name

    yield make
    for n in made:
        try:
            core.delete_node(n)
        except client.ApiException as e:
            if e.status != 404:
                raise


def start_controller(kube: KubeCluster, tmp_path: Path, *extra: str) -> ControllerProcess:
    return ControllerProcess(kube.kubeconfig, tmp_path, *extra).start()


@pytest.fixture
def controller(kube: KubeCluster, tmp_path: Path) -> Iterator[ControllerProcess]:
    ctl = start_controller(kube, tmp_path)
    yield ctl
    ctl.stop()


def taint_out_of_service(kube: KubeCluster, node: str) -> None:
    client.CoreV1Api(kube.api).patch_node(
        node,
        {
            "spec": {
                "taints": [
                    {"key": c.TAINT_OUT_OF_SERVICE, "value": "nodeshutdown", "effect": "NoExecute"}
                ]
            }
        },
    )


def cond(vm: PassthroughVM, type_: str) -> Any:
    return next((x for x in vm.status.conditions if x.type == type_), None)


def events_for(kube: KubeCluster, namespace: str, name: str) -> list[tuple[str, str]]:
    got = client.CoreV1Api(kube.api).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name}"
    )
    return [(e.reason, e.message) for e in got.items]


def refused_on(vm: PassthroughVM, node: str) -> str:
    """The VM's refusal reasons on one node (other tests' dead nodes are listed too)."""
    assert vm.status.scheduling is not None
    return " ".join(next(n for n in vm.status.scheduling.nodes if n.node_name == node).reasons)


def placed_on(world: World, name: str, node: str) -> Callable[[], Any]:
    def check() -> Any:
        vm = world.get_vm(name)
        return vm if vm.status.node_name == node and vm.status.phase == "Scheduled" else None

    return check


# --- evacuation ------------------------------------------------------------------------------


@pytest.mark.usefixtures("controller")
def test_a_dead_node_is_not_evacuated_until_it_is_declared_out_of_service(
    kube: KubeCluster,
    world: World,
    leases: Callable[..., LeaseKeeper],
    nodes: Callable[..., str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    a, b = nodes(world.node("a")), nodes(world.node("b"))
    keeper_a = leases(a)
    leases(b)
    d_a = world.device("a", "0000:3b:00.0")
    gpu = world.flavor("a100")
    world.vm("vm1", [{"name": "gpu", "flavor": gpu}])
    wait_for(placed_on(world, "vm1", a), what="vm1 on a")
    uid = world.get_vm("vm1").metadata.uid
    d_b = world.device("b", "0000:3b:00.0")
    keeper_a.stop(delete=False)  # node a goes silent: down, or only cut off?
    wait_for(
        lambda: (x := cond(world.get_vm("vm1"), c.COND_NODE_ALIVE)) and x.status == "False",
        timeout=15,
        what="NodeAlive=False",
    )
    # Silent is not known down: a partitioned host may still run the guest.
    consistently(
        lambda: (
            world.get_vm("vm1").status.node_name == a
            and world.get_device(d_a).spec.claim_ref is not None
        ),
        3.0,
        what="vm1 stays on the silent node with its device",
    )
    taint_out_of_service(kube, a)
    vm = wait_for(placed_on(world, "vm1", b), timeout=20, what="vm1 placed again on b")
    assert vm.metadata.uid == uid
    assert vm.status.evacuation is not None and vm.status.evacuation.from_node == a
    assert vm.status.evacuation.devices == [d_a]
    assert c.TAINT_OUT_OF_SERVICE in vm.status.evacuation.reason
    assert vm.status.devices[0].pci_device == d_b
    assert vm.status.node_name == b
    assert cond(vm, c.COND_NODE_ALIVE) is None  # about node a: gone with it
    old = world.get_device(d_a)
    assert old.spec.claim_ref is None
    assert old.spec.release is not None and old.spec.release.reason == c.REASON_EVACUATED
    assert old.spec.release.uid == uid
    reasons = [r for r, _ in events_for(kube, world.namespace, "vm1")]
    assert c.REASON_EVACUATED in reasons
    # kubectl pcipt explain tells the story.
    assert (
        kubectl_pcipt.main(
            ["--kubeconfig", str(kube.kubeconfig), "explain", "vm1", "-n", world.namespace]
        )
        == 0
    )
    told = capsys.readouterr().out
    assert f"evacuated from {a} at " in told and c.TAINT_OUT_OF_SERVICE in told, told
    assert f"released {d_a}" in told, told
    # The tainted node takes nothing new, even once it renews again.
    leases(a)
    world.vm("vm2", [{"name": "gpu", "flavor": gpu}])
    vm2 = wait_for(lambda: (v := world.get_vm("vm2")).status.scheduling and v, what="refusal")
    assert "out of service" in vm2.status.scheduling.message
    check_invariants(world)


def test_a_vm_whose_policy_is_wait_keeps_its_devices_on_a_node_declared_down(
    kube: KubeCluster,
    world: World,
    leases: Callable[..., LeaseKeeper],
    nodes: Callable[..., str],
    controller: ControllerProcess,
) -> None:
    a = nodes(world.node("a"))
    keeper_a = leases(a)
    leases(world.node("b"))
    d_a = world.device("a", "0000:3b:00.0")
    gpu = world.flavor("a100")
    world.vm("stay", [{"name": "gpu", "flavor": gpu}], evacuationPolicy="Wait")
    wait_for(placed_on(world, "stay", a), what="placed on a")
    world.device("b", "0000:3b:00.0")
    keeper_a.stop(delete=False)
    taint_out_of_service(kube, a)
    vm = wait_for(
        lambda: (v := world.get_vm("stay")) and cond(v, c.COND_EVACUATED) and v,
        timeout=20,
        what="the Evacuated condition",
    )
    ev = cond(vm, c.COND_EVACUATED)
    assert ev.status == "False" and ev.reason == c.REASON_EVACUATION_WAITING
    assert "evacuationPolicy is Wait" in ev.message
    consistently(
        lambda: (
            world.get_vm("stay").status.node_name == a
            and world.get_device(d_a).spec.claim_ref is not None
        ),
        2.0,
        what="it keeps node a and its device",
    )
    check_invariants(world)


def test_a_node_group_that_opted_in_is_evacuated_after_its_lease_timeout(
    kube: KubeCluster,
    world: World,
    leases: Callable[..., LeaseKeeper],
    nodes: Callable[..., str],
    controller: ControllerProcess,
) -> None:
    # The controller under test calls a node dead after 6 s; this group evacuates after 9 s.
    a = nodes(world.node("a"), {c.LABEL_EVACUATE_AFTER: "9"})
    keeper_a = leases(a)
    b = world.node("b")
    leases(b)
    world.device("a", "0000:3b:00.0")
    gpu = world.flavor("a100")
    world.vm("vm1", [{"name": "gpu", "flavor": gpu}])
    wait_for(placed_on(world, "vm1", a), what="vm1 on a")
    world.device("b", "0000:3b:00.0")
    keeper_a.stop(delete=False)
    wait_for(placed_on(world, "vm1", b), timeout=30, what="vm1 evacuated to b")
    evac = world.get_vm("vm1").status.evacuation
    assert evac is not None and "evacuates after 9s" in evac.reason
    check_invariants(world)


# --- scrub and quarantine -----------------------------------------------------------------------


def test_a_released_device_waits_for_its_scrub_and_the_claim_ends_the_release(
    kube: KubeCluster,
    world: World,
    controller: ControllerProcess,
) -> None:
    a = world.node("a")
    keeper = LeaseKeeper(kube.api, [a])
    keeper.annotations = {c.ANNOTATION_SCRUBS: "true"}  # this node's plugin scrubs
    keeper.start()
    try:
        d0 = world.device("a", "0000:3b:00.0")
        gpu = world.flavor("a100")
        world.vm("first", [{"name": "gpu", "flavor": gpu}])
        wait_for(lambda: world.get_vm("first").status.phase == "Scheduled", what="first placed")
        world.delete_vm("first")
        wait_for(lambda: not world.vms(), what="first gone")
        rel = world.get_device(d0).spec.release
        assert rel is not None and rel.scrub and rel.reason == "Deleted"
        world.vm("second", [{"name": "gpu", "flavor": gpu}])
        vm = wait_for(lambda: (v := world.get_vm("second")).status.scheduling and v, what="wait")
        assert "being scrubbed after release" in refused_on(vm, a)
        # An answer to another release does not free it.
        scrub = {"phase": "Done", "reset": "flr", "completedAt": iso_now()[:19] + "Z"}
        world.custom.patch_cluster_custom_object_status(
            c.GROUP,
            c.VERSION,
            c.PLURAL_PCIDEVICE,
            d0,
            {"status": {"scrub": {**scrub, "releaseID": "another"}}},
        )
        consistently(
            lambda: world.get_vm("second").status.phase == "Pending", 2.0, what="still held"
        )
        world.custom.patch_cluster_custom_object_status(
            c.GROUP,
            c.VERSION,
            c.PLURAL_PCIDEVICE,
            d0,
            {"status": {"scrub": {**scrub, "releaseID": rel.id}}},
        )
        wait_for(lambda: world.get_vm("second").status.phase == "Scheduled", what="second placed")
        dev = world.get_device(d0)
        assert dev.spec.release is None and dev.spec.claim_ref is not None
        check_invariants(world)
    finally:
        keeper.stop()


def test_a_quarantine_holds_a_released_device_back_for_its_time(
    kube: KubeCluster,
    world: World,
    leases: Callable[..., LeaseKeeper],
    tmp_path: Path,
) -> None:
    ctl = start_controller(kube, tmp_path, "--release-quarantine", "6")
    try:
        leases(world.node("a"))
        d0 = world.device("a", "0000:3b:00.0")
        gpu = world.flavor("a100")
        world.vm("first", [{"name": "gpu", "flavor": gpu}])
        wait_for(lambda: world.get_vm("first").status.phase == "Scheduled", what="first placed")
        world.delete_vm("first")
        wait_for(lambda: not world.vms(), what="first gone")
        rel = world.get_device(d0).spec.release
        assert rel is not None and not rel.scrub and rel.quarantine_until is not None
        world.vm("second", [{"name": "gpu", "flavor": gpu}])
        vm = wait_for(lambda: (v := world.get_vm("second")).status.scheduling and v, what="wait")
        assert "in quarantine after release" in refused_on(vm, world.node("a"))
        placed = wait_for(
            lambda: (v := world.get_vm("second")).status.phase == "Scheduled" and v,
            timeout=20,
            what="second placed once the quarantine is over",
        )
        assert placed.status.conditions  # placed by the clock alone: nothing else changed
        check_invariants(world)
    finally:
        ctl.stop()


# --- health ----------------------------------------------------------------------------------


def test_a_vm_hears_when_its_device_turns_unhealthy_and_when_it_recovers(
    kube: KubeCluster,
    world: World,
    leases: Callable[..., LeaseKeeper],
    controller: ControllerProcess,
) -> None:
    leases(world.node("a"))
    d0 = world.device("a", "0000:3b:00.0")
    gpu = world.flavor("a100")
    world.vm("vm1", [{"name": "gpu", "flavor": gpu}])
    wait_for(lambda: world.get_vm("vm1").status.phase == "Scheduled", what="placed")

    def health(state: str, reason: str, message: str) -> None:
        world.custom.patch_cluster_custom_object_status(
            c.GROUP,
            c.VERSION,
            c.PLURAL_PCIDEVICE,
            d0,
            {
                "status": {
                    "health": state,
                    "conditions": [
                        {
                            "type": "Healthy",
                            "status": "True" if state == "Healthy" else "False",
                            "reason": reason,
                            "message": message,
                            "lastTransitionTime": iso_now()[:19] + "Z",
                        }
                    ],
                }
            },
        )

    health("Unhealthy", c.REASON_AER_FATAL, "the kernel counted fatal PCIe errors")
    vm = wait_for(
        lambda: (v := world.get_vm("vm1")) and cond(v, c.COND_DEVICES_HEALTHY) and v,
        what="DevicesHealthy",
    )
    x = cond(vm, c.COND_DEVICES_HEALTHY)
    assert x.status == "False" and d0 in x.message and c.REASON_AER_FATAL in x.message
    ready = cond(vm, c.COND_READY)
    assert ready.status == "False" and ready.reason == c.REASON_DEVICE_UNHEALTHY
    assert (c.REASON_DEVICE_UNHEALTHY, x.message) in events_for(kube, world.namespace, "vm1")
    # The VM keeps its device (the admin or tenant decides), and hears of recovery.
    assert world.get_device(d0).spec.claim_ref is not None
    health("Healthy", c.REASON_PRESENT, "found on the host")
    wait_for(
        lambda: cond(world.get_vm("vm1"), c.COND_DEVICES_HEALTHY).status == "True",
        what="DevicesHealthy=True again",
    )
    reasons = [r for r, _ in events_for(kube, world.namespace, "vm1")]
    assert c.REASON_DEVICES_HEALTHY in reasons
    check_invariants(world)


# --- cold migration -----------------------------------------------------------------------------


def test_a_cold_migration_waits_for_the_old_domain_then_moves_the_vm(
    kube: KubeCluster,
    world: World,
    leases: Callable[..., LeaseKeeper],
    controller: ControllerProcess,
) -> None:
    a, b, x = world.node("a"), world.node("b"), world.node("x")
    leases(a, b, x)
    d_a = world.device("a", "0000:3b:00.0")
    gpu = world.flavor("a100")
    world.vm("vm1", [{"name": "gpu", "flavor": gpu}])
    wait_for(placed_on(world, "vm1", a), what="vm1 on a")
    uid = world.get_vm("vm1").metadata.uid
    d_b = world.device("b", "0000:3b:00.0")
    world.device("x", "0000:3b:00.0")
    # What `kubectl pcipt migrate vm1 --to <b>` writes, through the plugin itself.
    assert (
        kubectl_pcipt.main(
            [
                "--kubeconfig",
                str(kube.kubeconfig),
                "migrate",
                "vm1",
                "-n",
                world.namespace,
                "--to",
                b,
            ]
        )
        == 0
    )
    vm = wait_for(
        lambda: (v := world.get_vm("vm1")).status.migration and v, what="the migration taken"
    )
    assert vm.status.phase == "Migrating" and vm.status.migration.phase == "Stopping"
    assert vm.status.migration.from_node == a and vm.status.migration.to_node == b
    # The old domain may still run: nothing is released.
    consistently(
        lambda: (
            world.get_device(d_a).spec.claim_ref is not None
            and world.get_vm("vm1").status.node_name == a
        ),
        2.0,
        what="the device stays claimed while the old domain may run",
    )
    world.domain_gone("vm1")  # what node a's plugin reports once it removed the domain
    vm = wait_for(placed_on(world, "vm1", b), timeout=20, what="vm1 on b (the target, not x)")
    assert vm.metadata.uid == uid and vm.status.devices[0].pci_device == d_b
    assert vm.status.migration.phase == "Completed" and vm.status.migration.completed_at
    assert cond(vm, c.COND_DOMAIN_GONE) is None  # about the old node: a later delete waits anew
    old = world.get_device(d_a)
    assert old.spec.claim_ref is None and old.spec.release is not None
    assert old.spec.release.reason == c.REASON_MIGRATED
    reasons = [r for r, _ in events_for(kube, world.namespace, "vm1")]
    assert c.REASON_MIGRATING in reasons
    check_invariants(world)


def test_a_migration_that_cannot_be_taken_is_failed_with_the_reason(
    world: World,
    leases: Callable[..., LeaseKeeper],
    controller: ControllerProcess,
) -> None:
    a = world.node("a")
    leases(a)
    world.device("a", "0000:3b:00.0")
    gpu = world.flavor("a100")
    world.vm("vm1", [{"name": "gpu", "flavor": gpu}])
    wait_for(placed_on(world, "vm1", a), what="vm1 on a")

    def ask(value: str) -> Any:
        world.custom.patch_namespaced_custom_object(
            c.GROUP, c.VERSION, world.namespace, c.PLURAL_PASSTHROUGHVM, "vm1",
            {"metadata": {"annotations": {c.ANNOTATION_MIGRATE: value}}},
        )  # fmt: skip
        return wait_for(
            lambda: (
                (m := world.get_vm("vm1").status.migration)
                and m.phase == "Failed"
                and m.message != (last.message if last else None)
                and m
            ),
            what=f"the refusal of {value}",
        )

    last = None
    last = ask(json.dumps({"id": "m1", "to": a}))
    assert f"on {a} already" in last.message
    last = ask(json.dumps({"id": "m2", "to": "nowhere"}))
    assert "no node nowhere is known" in last.message
    last = ask("not json")
    assert "is not JSON" in last.message
    vm = world.get_vm("vm1")
    assert vm.status.node_name == a and vm.status.phase == "Scheduled"
    check_invariants(world)


def vf(world: World, node: str, netdev: str) -> str:
    return world.device(
        node,
        "0000:5e:02.1",
        vendor="8086",
        product="1889",
        cls="020000",
        phys_fn="0000:5e:00.0",
        physnet="physnet1",
        netdev=netdev,
    )


def set_status(world: World, name: str, status: dict[str, Any]) -> None:
    world.custom.patch_namespaced_custom_object_status(
        c.GROUP, c.VERSION, world.namespace, c.PLURAL_PASSTHROUGHVM, name, {"status": status}
    )


def running(world: World, name: str) -> None:
    """What a node plugin reports once the VM's domain runs."""
    vm = world.get_vm(name)
    conds = [x.to_dict() for x in vm.status.conditions if x.type != c.COND_DOMAIN_READY]
    conds.append(
        {
            "type": c.COND_DOMAIN_READY,
            "status": "True",
            "reason": "Running",
            "message": "test",
            "lastTransitionTime": iso_now()[:19] + "Z",
        }
    )
    set_status(world, name, {"phase": "Running", "conditions": conds})


def migrate_live(kube: KubeCluster, world: World, name: str, to: str | None = None) -> None:
    argv = ["--kubeconfig", str(kube.kubeconfig), "migrate", name, "-n", world.namespace, "--live"]
    assert kubectl_pcipt.main(argv + (["--to", to] if to else [])) == 0


def migration_in(world: World, name: str, *phases: str) -> Callable[[], Any]:
    def check() -> Any:
        m = world.get_vm(name).status.migration
        return m if m is not None and m.phase in phases else None

    return check


def test_a_live_migration_holds_both_nodes_until_the_domain_runs_on_the_target(
    kube: KubeCluster,
    world: World,
    leases: Callable[..., LeaseKeeper],
    controller: ControllerProcess,
) -> None:
    a, b = world.node("a"), world.node("b")
    keeper = leases(a, b)
    keeper.annotations[c.ANNOTATION_MIGRATION_URI] = "qemu+tls://somewhere/system"
    keeper.renew(a)
    keeper.renew(b)
    old = vf(world, "a", "ens1f0v1")
    nic = world.flavor("vf", "nic", selector={"vendorIDs": ["8086"], "sriovRoles": ["VF"]})
    world.vm("vm1", networks=[{"name": "net", "flavor": nic, "physicalNetwork": "physnet1"}])
    wait_for(placed_on(world, "vm1", a), what="vm1 on a")
    uid, mac = world.get_vm("vm1").metadata.uid, world.get_vm("vm1").status.networks[0].mac
    new = vf(world, "b", "ens2f0v1")
    running(world, "vm1")
    migrate_live(kube, world, "vm1")
    mig = wait_for(migration_in(world, "vm1", "Preparing"), what="the target claimed")
    vm = world.get_vm("vm1")
    # The VM runs on a with a's VF; b's VF is claimed for it and listed in the migration.
    assert mig.live and mig.from_node == a and mig.to_node == b
    assert mig.target_uri == "qemu+tls://somewhere/system"
    assert [n.pci_device for n in mig.networks] == [new] and mig.networks[0].mac == mac
    assert vm.status.node_name == a and vm.status.networks[0].pci_device == old
    assert vm.metadata.labels[c.LABEL_MIGRATION_TARGET] == b
    assert world.get_device(new).spec.claim_ref.uid == uid
    assert world.get_device(old).spec.claim_ref.uid == uid
    check_invariants(world)
    # The nodes' plugins answer in turn: the target is ready, the old node moves the domain.
    set_status(world, "vm1", {"migration": {"phase": "Ready", "tuning": "<tuning/>"}})
    set_status(world, "vm1", {"migration": {"phase": "Transferring"}})
    consistently(
        lambda: world.get_device(old).spec.claim_ref is not None,
        1.5,
        what="a's VF stays claimed while the domain may still run on a",
    )
    set_status(world, "vm1", {"migration": {"phase": "Transferred", "message": "moved"}})
    vm = wait_for(
        lambda: (v := world.get_vm("vm1")).status.node_name == b and v, what="vm1 placed on b"
    )
    assert vm.metadata.uid == uid and vm.status.migration.phase == "Completed"
    assert [n.pci_device for n in vm.status.networks] == [new]
    assert vm.status.networks[0].mac == mac  # the guest's NIC keeps its MAC
    assert not vm.status.migration.networks and vm.status.migration.completed_at
    assert vm.status.node_name == b
    assert c.LABEL_MIGRATION_TARGET not in vm.metadata.labels
    gone = wait_for(
        lambda: (d := world.get_device(old)).spec.claim_ref is None and d,
        what="a's VF released",
    )
    assert gone.spec.release is not None and gone.spec.release.reason == c.REASON_MIGRATED
    wait_for(
        lambda: c.REASON_LIVE_MIGRATED in [r for r, _ in events_for(kube, world.namespace, "vm1")],
        what="the LiveMigrated Event",
    )
    check_invariants(world)


def test_a_live_migration_refused_or_failed_leaves_the_vm_where_it_was(
    kube: KubeCluster,
    world: World,
    leases: Callable[..., LeaseKeeper],
    controller: ControllerProcess,
) -> None:
    a, b = world.node("a"), world.node("b")
    at_a = leases(a)
    at_a.annotations[c.ANNOTATION_MIGRATION_URI] = "qemu+tls://a/system"
    at_a.renew(a)
    at_b = leases(b)
    old = vf(world, "a", "ens1f0v1")
    world.device("a", "0000:3b:00.0")
    nic = world.flavor("vf", "nic", selector={"vendorIDs": ["8086"], "sriovRoles": ["VF"]})
    gpu = world.flavor("a100")
    net = [{"name": "net", "flavor": nic, "physicalNetwork": "physnet1"}]
    world.vm("vm1", networks=net)
    world.vm("gpu1", [{"name": "gpu", "flavor": gpu}])
    wait_for(placed_on(world, "vm1", a), what="vm1 on a")
    wait_for(placed_on(world, "gpu1", a), what="gpu1 on a")
    new = vf(world, "b", "ens2f0v1")
    world.device("b", "0000:3b:00.0")

    running(world, "gpu1")
    migrate_live(kube, world, "gpu1")
    m = wait_for(migration_in(world, "gpu1", "Failed"), what="gpu1 refused")
    assert "passthrough devices 0000:3b:00.0" in m.message and "cold migration" in m.message

    migrate_live(kube, world, "vm1")  # not running yet
    m = wait_for(migration_in(world, "vm1", "Failed"), what="vm1 refused: not running")
    assert "not running" in m.message
    running(world, "vm1")
    migrate_live(kube, world, "vm1", to=b)  # b's plugin names no migration URI
    m = wait_for(
        lambda: (x := migration_in(world, "vm1", "Failed")()) and "does not take part" in
        x.message and x,
        what="vm1 refused: b takes no live migration",
    )  # fmt: skip
    assert b in m.message and world.get_device(new).spec.claim_ref is None

    at_b.annotations[c.ANNOTATION_MIGRATION_URI] = "qemu+tls://b/system"
    at_b.renew(b)

    def asked() -> Any:
        # Asked again until the controller has seen b's Lease say it.
        if (m := world.get_vm("vm1").status.migration) and m.phase == "Failed":
            migrate_live(kube, world, "vm1", to=b)
        return migration_in(world, "vm1", "Preparing")()

    wait_for(asked, timeout=20, interval=0.5, what="b claimed for vm1")
    assert world.get_device(new).spec.claim_ref is not None
    # The old node's libvirt could not move it (what its plugin writes after plugging back).
    set_status(world, "vm1", {"migration": {"phase": "Failed", "message": "libvirt said: no"}})
    wait_for(lambda: world.get_device(new).spec.claim_ref is None, what="b's VF given back")
    vm = wait_for(
        lambda: (
            (v := world.get_vm("vm1")).status.migration
            and not v.status.migration.networks
            and c.LABEL_MIGRATION_TARGET not in v.metadata.labels
            and v
        ),
        what="the migration rolled back",
    )
    assert vm.status.node_name == a and vm.status.networks[0].pci_device == old
    assert world.get_device(old).spec.claim_ref.uid == vm.metadata.uid
    assert world.get_device(new).spec.release.reason == c.REASON_MIGRATION_FAILED
    wait_for(
        lambda: (
            c.REASON_MIGRATION_FAILED in [r for r, _ in events_for(kube, world.namespace, "vm1")]
        ),
        what="the MigrationFailed Event",
    )
    check_invariants(world)


def test_a_live_migration_whose_target_never_answers_is_failed_and_rolled_back(
    kube: KubeCluster, world: World, leases: Callable[..., LeaseKeeper], tmp_path: Path
) -> None:
    ctl = start_controller(kube, tmp_path, "--live-migration-timeout", "2")
    try:
        a, b = world.node("a"), world.node("b")
        keeper = leases(a, b)
        keeper.annotations[c.ANNOTATION_MIGRATION_URI] = "qemu+tls://somewhere/system"
        keeper.renew(a)
        keeper.renew(b)
        vf(world, "a", "ens1f0v1")
        nic = world.flavor("vf", "nic", selector={"vendorIDs": ["8086"], "sriovRoles": ["VF"]})
        world.vm("vm1", networks=[{"name": "net", "flavor": nic, "physicalNetwork": "physnet1"}])
        wait_for(placed_on(world, "vm1", a), what="vm1 on a")
        new = vf(world, "b", "ens2f0v1")
        running(world, "vm1")
        migrate_live(kube, world, "vm1")
        wait_for(migration_in(world, "vm1", "Preparing"), what="b claimed")
        # b's plugin never says Ready.
        m = wait_for(migration_in(world, "vm1", "Failed"), timeout=20, what="given up")
        assert f"{b}'s node plugin did not answer within 2s" in m.message
        wait_for(lambda: world.get_device(new).spec.claim_ref is None, what="b's VF given back")
        vm = wait_for(
            lambda: (
                (v := world.get_vm("vm1")).status.migration
                and not v.status.migration.networks
                and v
            ),
            what="rolled back",
        )
        assert vm.status.node_name == a
        check_invariants(world)
    finally:
        ctl.stop()


# --- hot-plug ----------------------------------------------------------------------------------


def set_requests(world: World, name: str, devices: list[dict[str, Any]]) -> None:
    world.custom.patch_namespaced_custom_object(
        c.GROUP, c.VERSION, world.namespace, c.PLURAL_PASSTHROUGHVM, name,
        {"spec": {"devices": devices}},
    )  # fmt: skip


def report_domain(world: World, name: str, addresses: list[str]) -> None:
    """What the node plugin writes after a (de)attach: the devices libvirt says it has."""
    world.custom.patch_namespaced_custom_object_status(
        c.GROUP, c.VERSION, world.namespace, c.PLURAL_PASSTHROUGHVM, name,
        {"status": {"domain": {"name": f"{world.namespace}_{name}", "state": "running",
                               "devices": addresses}}},
    )  # fmt: skip


def test_requests_added_and_removed_on_a_running_vm_are_bound_and_released_in_place(
    kube: KubeCluster,
    world: World,
    leases: Callable[..., LeaseKeeper],
    controller: ControllerProcess,
) -> None:
    a, b = world.node("a"), world.node("b")
    leases(a, b)
    world.device("a", "0000:3b:00.0")
    world.device("a", "0000:3c:00.0")
    world.device("b", "0000:3b:00.0")
    world.device("b", "0000:3c:00.0")
    gpu = world.flavor("a100")
    one = [{"name": "gpu", "flavor": gpu}]
    world.vm("vm1", one, nodeSelector={"kubernetes.io/hostname": a})
    wait_for(placed_on(world, "vm1", a), what="vm1 on a")
    first = world.get_vm("vm1").status.devices[0]
    report_domain(world, "vm1", [first.address])

    # Added: placed on the VM's own node, next to what it has.
    set_requests(world, "vm1", [*one, {"name": "gpu2", "flavor": gpu}])
    vm = wait_for(
        lambda: (v := world.get_vm("vm1")) and len(v.status.devices) == 2 and v,
        what="gpu2 hot-plugged",
    )
    assert vm.status.node_name == a and vm.status.device_summary == "2/2"
    second = next(d for d in vm.status.devices if d.request == "gpu2")
    assert second.pci_device.startswith(a) and second.pci_device != first.pci_device
    ref = world.get_device(second.pci_device).spec.claim_ref
    assert ref is not None and ref.uid == vm.metadata.uid and ref.request == "gpu2"
    bound = cond(vm, c.COND_DEVICES_BOUND)
    assert bound.status == "True" and bound.reason == c.REASON_HOTPLUGGED
    assert c.REASON_HOTPLUGGED in [r for r, _ in events_for(kube, world.namespace, "vm1")]
    report_domain(world, "vm1", [first.address, second.address])

    # Nothing left on the node: refused, and the VM runs on with what it has.
    set_requests(
        world, "vm1", [*one, {"name": "gpu2", "flavor": gpu}, {"name": "gpu3", "flavor": gpu}]
    )
    vm = wait_for(
        lambda: (
            (v := world.get_vm("vm1"))
            and (x := cond(v, c.COND_DEVICES_BOUND))
            and x.reason == c.REASON_HOTPLUG_REFUSED
            and v
        ),
        what="the refusal",
    )
    msg = cond(vm, c.COND_DEVICES_BOUND).message
    assert "cannot hot-plug gpu3" in msg and "have no free" in msg, msg
    assert vm.status.node_name == a and len(vm.status.devices) == 2

    # Removed: detached first; released only once the domain no longer has it.
    set_requests(world, "vm1", one)
    vm = wait_for(lambda: (v := world.get_vm("vm1")) and v.status.detaching and v, what="detaching")
    assert [d.pci_device for d in vm.status.detaching] == [second.pci_device]
    assert [d.request for d in vm.status.devices] == ["gpu"]
    consistently(
        lambda: world.get_device(second.pci_device).spec.claim_ref is not None,
        2.0,
        what="claimed while the domain may still have it",
    )
    check_invariants(world)
    report_domain(world, "vm1", [first.address])
    wait_for(
        lambda: world.get_device(second.pci_device).spec.claim_ref is None,
        what="released after the detach",
    )
    dev = world.get_device(second.pci_device)
    assert dev.spec.release is not None and dev.spec.release.reason == "Detached"
    wait_for(lambda: not world.get_vm("vm1").status.detaching, what="detaching emptied")
    check_invariants(world)


def test_a_changed_request_is_restart_required_and_an_optional_one_waits_for_a_device(
    world: World,
    leases: Callable[..., LeaseKeeper],
    controller: ControllerProcess,
) -> None:
    a = world.node("a")
    leases(a)
    world.device("a", "0000:3b:00.0")
    gpu = world.flavor("a100")
    one = [{"name": "gpu", "flavor": gpu}]
    later = {"name": "spare", "flavor": gpu, "optional": True, "attachWhenFree": True}
    world.vm("vm1", [*one, later])
    vm = wait_for(placed_on(world, "vm1", a), what="vm1 on a")
    assert [s.request for s in vm.status.skipped] == ["spare"]
    # A count change cannot be applied live: said, named.
    set_requests(world, "vm1", [{**one[0], "count": 2}, later])
    vm = wait_for(
        lambda: (
            (v := world.get_vm("vm1"))
            and (x := cond(v, c.COND_RESTART_REQUIRED))
            and x.status == "True"
            and v
        ),
        what="RestartRequired",
    )
    assert "spec.devices[gpu].count: 1 -> 2" in cond(vm, c.COND_RESTART_REQUIRED).message
    set_requests(world, "vm1", [*one, later])
    wait_for(
        lambda: cond(world.get_vm("vm1"), c.COND_RESTART_REQUIRED).status == "False",
        what="RestartRequired cleared",
    )
    # A device frees up (here: appears) on its node: the optional request gets it.
    spare = world.device("a", "0000:3c:00.0")
    vm = wait_for(
        lambda: (v := world.get_vm("vm1")) and len(v.status.devices) == 2 and v,
        what="the optional request attached",
    )
    assert not vm.status.skipped
    assert next(d for d in vm.status.devices if d.request == "spare").pci_device == spare
    check_invariants(world)


def test_the_webhook_refuses_a_malformed_migration_request_naming_the_annotation(
    kube: KubeCluster, world: World, leases: Callable[..., LeaseKeeper], tmp_path: Path
) -> None:
    ctl = start_controller(kube, tmp_path, "--webhook", "dev")
    admission = client.AdmissionregistrationV1Api(kube.api)
    try:
        leases(world.node("a"))
        world.device("a", "0000:3b:00.0")
        gpu = world.flavor("a100")
        world.vm("vm1", [{"name": "gpu", "flavor": gpu}])
        wait_for(
            lambda: any(
                w.metadata.name == f"validate.{c.GROUP}"
                for w in admission.list_validating_webhook_configuration().items
            ),
            what="webhook configuration",
        )

        def refusal() -> str:
            try:
                world.custom.patch_namespaced_custom_object(
                    c.GROUP, c.VERSION, world.namespace, c.PLURAL_PASSTHROUGHVM, "vm1",
                    {"metadata": {"annotations": {c.ANNOTATION_MIGRATE: "{not json"}}},
                )  # fmt: skip
            except client.ApiException as e:
                return str(e.body)
            return ""

        msg = wait_for(refusal, what="the webhook's refusal")
        assert f"metadata.annotations[{c.ANNOTATION_MIGRATE}]" in msg and "is not JSON" in msg
    finally:
        ctl.stop()
        for w in admission.list_validating_webhook_configuration().items:
            if w.metadata.name == f"validate.{c.GROUP}":
                admission.delete_validating_webhook_configuration(w.metadata.name)

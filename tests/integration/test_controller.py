"""The controller against the real kube-apiserver: PciDevices are published by the tests the way
a node plugin publishes them, node Leases are renewed the way node plugins renew them, and
the controller runs as its own process (`pcipt-controller run`)."""

from __future__ import annotations

import contextlib
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubernetes import client

from pcipt import constants as c
from tests.integration.conftest import KubeCluster
from tests.integration.ctlfix import (
    OPERATOR_NS,
    ControllerProcess,
    LeaseKeeper,
    World,
    check_invariants,
    consistently,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("operator_namespace")


@pytest.fixture
def controller(kube: KubeCluster, tmp_path: Path) -> Iterator[ControllerProcess]:
    ctl = ControllerProcess(kube.kubeconfig, tmp_path).start()
    yield ctl
    ctl.stop()


def phase(world: World, name: str, want: str) -> Callable[[], bool]:
    return lambda: world.get_vm(name).status.phase == want


# --- bind and release --------------------------------------------------------------------


def test_bind_and_release(
    world: World, leases: Callable[..., LeaseKeeper], controller: ControllerProcess
) -> None:
    a = world.node("a")
    leases(a)
    d0 = world.device("a", "0000:3b:00.0")
    world.device("a", "0000:3c:00.0")
    gpu = world.flavor("a100")
    world.vm("vm1", [{"name": "gpu", "flavor": gpu}])
    wait_for(phase(world, "vm1", "Scheduled"), what="vm1 Scheduled")
    vm = world.get_vm("vm1")
    assert vm.status.node_name == a
    # Placed by its status alone (node plugins select on status.nodeName); the finalizer came
    # with its creation (crds/pcipt.io_admission.yaml).
    assert "pcipt.io/node" not in vm.metadata.labels
    assert c.FINALIZER_RELEASE in vm.metadata.finalizers
    (bound,) = vm.status.devices
    assert bound.request == "gpu" and bound.pci_device == d0 and bound.address == "0000:3b:00.0"
    ref = world.get_device(d0).spec.claim_ref
    assert (
        ref is not None
        and ref.uid == vm.metadata.uid
        and ref.request == "gpu"
        and ref.flavor == gpu
    )
    conds = {x.type: x for x in vm.status.conditions}
    assert conds[c.COND_SCHEDULED].status == "True" and conds[c.COND_DEVICES_BOUND].status == "True"
    assert conds[c.COND_SCHEDULED].observed_generation == vm.metadata.generation
    assert vm.status.device_summary == "1/1"

    # Deleting waits for the node to remove the domain: the device stays claimed meanwhile.
    world.delete_vm("vm1", domain_gone=False)
    wait_for(phase(world, "vm1", "Terminating"), what="vm1 Terminating")
    consistently(
        lambda: world.get_device(d0).spec.claim_ref is not None,
        1.0,
        what="the device stays claimed until the domain is gone",
    )
    world.domain_gone("vm1")
    wait_for(lambda: world.get_device(d0).spec.claim_ref is None, what="device released")
    wait_for(lambda: not world.vms(), what="vm1 gone (finalizer removed)")
    check_invariants(world)


WRITES = re.compile(r"^apiserver_request_total\{([^}]*)\} ([0-9.e+]+)$", re.M)


def write_counts(kube: KubeCluster) -> dict[str, int]:
    """apiserver_request_total by verb/resource/subresource, writes only: what every writer
    cost the API server, whoever it was."""
    out: dict[str, int] = {}
    for labels, value in WRITES.findall(
        kube.kubectl("get", "--raw", "/metrics", check=True).stdout
    ):
        kv = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if kv.get("verb") in ("POST", "PATCH", "PUT", "DELETE", "APPLY"):
            key = "/".join(x for x in (kv["verb"], kv.get("resource"), kv.get("subresource")) if x)
            out[key] = out.get(key, 0) + int(float(value))
    return out


def test_a_single_device_bind_costs_two_writes_and_an_event(
    kube: KubeCluster,
    world: World,
    leases: Callable[..., LeaseKeeper],
    controller: ControllerProcess,
) -> None:
    """The claim and the VM's status; the finalizer came with the VM's creation (the admission
    policy in crds/), and the node plugin selects its VMs by status.nodeName, not a label."""
    a = world.node("a")
    leases(a)
    world.device("a", "0000:3b:00.0")
    gpu = world.flavor("a100")
    time.sleep(1.5)  # the flavor's status, written behind
    resources = ("passthroughvms", "pcidevices", "events")
    before = write_counts(kube)
    world.vm("vm1", [{"name": "gpu", "flavor": gpu}])
    wait_for(phase(world, "vm1", "Scheduled"), what="vm1 Scheduled")
    time.sleep(1.0)  # the Event is posted behind the bind
    after = write_counts(kube)
    spent = {
        k: after[k] - before.get(k, 0)
        for k in after
        if after[k] != before.get(k, 0) and k.split("/")[1] in resources
    }
    assert spent == {
        "POST/passthroughvms": 1,  # the test's create
        "PATCH/pcidevices": 1,  # the claim
        "PATCH/passthroughvms/status": 1,  # node, devices, conditions
        "POST/events": 1,  # Scheduled
    }, spent
    assert c.FINALIZER_RELEASE in world.get_vm("vm1").metadata.finalizers


def test_a_vm_created_without_the_finalizer_gets_it_before_it_is_placed(
    kube: KubeCluster, world: World, leases: Callable[..., LeaseKeeper], tmp_path: Path
) -> None:
    """A VM from before the admission policy (or a cluster without it): the bind adds the
    release finalizer in a conditional write of its own before the status that places it."""
    a = world.node("a")
    leases(a)
    world.device("a", "0000:3b:00.0")
    gpu = world.flavor("a100")
    world.vm("old", [{"name": "gpu", "flavor": gpu}])
    kube.kubectl(
        "patch", "ptvm", "old", "-n", world.namespace, "--type=json",
        "-p", '[{"op": "remove", "path": "/metadata/finalizers"}]', check=True,
    )  # fmt: skip
    assert not world.get_vm("old").metadata.finalizers
    ctl = ControllerProcess(kube.kubeconfig, tmp_path).start()
    try:
        wait_for(phase(world, "old", "Scheduled"), what="old Scheduled")
        vm = world.get_vm("old")
        assert vm.metadata.finalizers == [c.FINALIZER_RELEASE] and vm.status.node_name == a
    finally:
        ctl.stop()


def test_a_one_time_use_device_stays_reserved_after_its_vm_until_an_admin_frees_it(
    world: World, leases: Callable[..., LeaseKeeper], controller: ControllerProcess
) -> None:
    a = world.node("a")
    leases(a)
    d0 = world.device("a", "0000:3b:00.0", attributes={"one_time_use": "true"})
    gpu = world.flavor("a100")
    world.vm("vm1", [{"name": "gpu", "flavor": gpu}])
    wait_for(phase(world, "vm1", "Scheduled"), what="vm1 Scheduled")
    uid = world.get_vm("vm1").metadata.uid
    world.delete_vm("vm1")
    wait_for(lambda: not world.vms(), what="vm1 gone")
    dev = world.get_device(d0)
    assert dev.spec.claim_ref is None and dev.spec.reserved is not None
    assert dev.spec.reserved.vm == f"{world.namespace}/vm1" and dev.spec.reserved.uid == uid
    assert dev.spec.reserved.released_at is not None
    # Reserved: the next VM waits, and says why.
    world.vm("vm2", [{"name": "gpu", "flavor": gpu}])
    vm2 = wait_for(lambda: (v := world.get_vm("vm2")).status.scheduling and v, what="refusal")
    (refused,) = [n for n in vm2.status.scheduling.nodes if n.node_name == a]
    assert any("1 reserved after one-time use" in r for r in refused.reasons), refused
    assert vm2.status.phase == "Pending"
    # The admin, having wiped it, frees it (what `kubectl pcipt uncordon` writes).
    world.custom.patch_cluster_custom_object(
        c.GROUP,
        c.VERSION,
        c.PLURAL_PCIDEVICE,
        d0,
        {"spec": {"unschedulable": False, "reserved": None}},
    )
    wait_for(phase(world, "vm2", "Scheduled"), what="vm2 Scheduled once the device is freed")
    check_invariants(world)


def test_refusal_reasons_text(
    world: World,
    kube: KubeCluster,
    leases: Callable[..., LeaseKeeper],
    controller: ControllerProcess,
) -> None:
    leases(world.node("a"), world.node("b"), world.node("c"))
    world.device("a", "0000:3b:00.0")
    world.device("b", "0000:3b:00.0")
    world.device("c", "0000:3b:00.0", numa=0)
    world.device("c", "0000:af:00.0", numa=1)
    world.device("dead", "0000:3b:00.0")  # no lease: not alive
    gpu = world.flavor("a100")
    world.vm("big", [{"name": "gpus", "flavor": gpu, "count": 2, "numaPolicy": "required"}])
    vm = wait_for(lambda: (v := world.get_vm("big")).status.scheduling and v, what="a refusal")
    # The flavor is unique to this test, so only this test's nodes have its devices; nodes
    # of other tests count as nodes without any.
    msg = vm.status.scheduling.message
    assert "2 node(s) have only 1 free a100-" in msg and "(need 2)" in msg
    assert "1 node(s) cannot place gpus on a single NUMA node (at most 1 free" in msg
    assert re.search(r"\d+ node\(s\) not alive", msg)
    assert msg.startswith("0/")
    per_node = {n.node_name: n.reasons for n in vm.status.scheduling.nodes}
    assert per_node[world.node("dead")] == ["not alive"]
    cond = next(x for x in vm.status.conditions if x.type == c.COND_SCHEDULED)
    assert cond.status == "False" and cond.reason == "Unschedulable" and cond.message == msg
    ready = next(x for x in vm.status.conditions if x.type == c.COND_READY)
    assert ready.status == "False" and ready.message == msg
    assert vm.status.phase == "Pending"
    # One FailedScheduling event for the transition, not one per retry.
    wait_for(
        lambda: [
            e
            for e in client.CoreV1Api(kube.api).list_namespaced_event(world.namespace).items
            if e.reason == c.REASON_FAILED_SCHEDULING
        ],
        what="a FailedScheduling event",
    )

    # The message counts every node of the shared cluster, so another test's node going quiet
    # is a new transition with its own event; a retry with the same message never is.
    def distinct() -> bool:
        messages = [
            e.message
            for e in client.CoreV1Api(kube.api).list_namespaced_event(world.namespace).items
            if e.reason == c.REASON_FAILED_SCHEDULING
        ]
        return msg in messages and len(messages) == len(set(messages))

    consistently(distinct, 2.0, what="one FailedScheduling Event per distinct reason")
    out = kube.kubectl("get", "ptvm", "big", "-n", world.namespace, "-o", "wide").stdout
    assert "Pending" in out and "cannot place gpus on a single NUMA node" in out


def test_numa_required_vs_preferred(
    world: World, leases: Callable[..., LeaseKeeper], controller: ControllerProcess
) -> None:
    leases(world.node("a"))
    world.device("a", "0000:3b:00.0", numa=0)
    world.device("a", "0000:af:00.0", numa=1)
    gpu = world.flavor("a100")
    world.vm("strict", [{"name": "g", "flavor": gpu, "count": 2, "numaPolicy": "required"}])
    # Refused while both devices are free (once "loose" holds them, the reason is "no free").
    strict = wait_for(lambda: (v := world.get_vm("strict")).status.scheduling and v, what="refusal")
    assert "cannot place g on a single NUMA node" in strict.status.scheduling.message
    world.vm("loose", [{"name": "g", "flavor": gpu, "count": 2, "numaPolicy": "preferred"}])
    wait_for(phase(world, "loose", "Scheduled"), what="preferred VM placed across NUMA nodes")
    assert {d.numa_node for d in world.get_vm("loose").status.devices} == {0, 1}
    assert not world.get_vm("strict").status.node_name
    check_invariants(world)


def test_iommu_companions_are_claimed_and_released_together(
    world: World, leases: Callable[..., LeaseKeeper], controller: ControllerProcess
) -> None:
    leases(world.node("a"))
    gpu_dev = world.device("a", "0000:3b:00.0", group=12, peers=["0000:3b:00.1"])
    audio = world.device(
        "a", "0000:3b:00.1", product="1aef", cls="040300", group=12, peers=["0000:3b:00.0"]
    )
    gpu = world.flavor("a100")
    world.vm("vm", [{"name": "gpu", "flavor": gpu}])
    wait_for(phase(world, "vm", "Scheduled"), what="placed")
    vm = world.get_vm("vm")
    by_dev = {d.pci_device: d for d in vm.status.devices}
    assert set(by_dev) == {gpu_dev, audio}
    assert by_dev[audio].companion and not by_dev[gpu_dev].companion
    ref = world.get_device(audio).spec.claim_ref
    assert ref is not None and ref.companion and ref.uid == vm.metadata.uid and ref.flavor is None
    world.delete_vm("vm")
    wait_for(lambda: all(d.spec.claim_ref is None for d in world.devices()), what="both released")


def test_optional_request_skipped_then_absent(
    world: World, leases: Callable[..., LeaseKeeper], controller: ControllerProcess
) -> None:
    leases(world.node("a"))
    world.device("a", "0000:3b:00.0")
    gpu = world.flavor("a100")
    world.vm(
        "vm", [{"name": "gpu", "flavor": gpu}, {"name": "extra", "flavor": gpu, "optional": True}]
    )
    wait_for(phase(world, "vm", "Scheduled"), what="placed without the optional device")
    vm = world.get_vm("vm")
    assert [d.request for d in vm.status.devices] == ["gpu"]
    assert [s.request for s in vm.status.skipped] == ["extra"]
    assert "have no free" in vm.status.skipped[0].reason
    assert vm.status.device_summary == "1/2"
    # A device freeing up later does not change a running VM (hot-plug comes later).
    world.device("a", "0000:3c:00.0")
    consistently(
        lambda: [d.request for d in world.get_vm("vm").status.devices] == ["gpu"],
        2.0,
        what="the running VM keeps its devices",
    )


def test_namespace_permission_and_quota(
    world: World,
    kube: KubeCluster,
    leases: Callable[..., LeaseKeeper],
    controller: ControllerProcess,
) -> None:
    leases(world.node("a"))
    for i in range(4):
        world.device("a", f"0000:3{i}:00.0")
    core = client.CoreV1Api(kube.api)
    gpu = world.flavor(
        "a100",
        access={"namespaceSelector": {"matchLabels": {"gpu": "yes"}}},
        limits={"maxPerNamespace": 2},
    )
    world.vm("early", [{"name": "gpu", "flavor": gpu}])
    vm = wait_for(lambda: (v := world.get_vm("early")).status.conditions and v, what="a condition")
    cond = next(x for x in vm.status.conditions if x.type == c.COND_SCHEDULED)
    assert cond.reason == "NotPermitted" and f"may not use flavor {gpu}" in cond.message

    core.patch_namespace(world.namespace, {"metadata": {"labels": {"gpu": "yes"}}})
    wait_for(phase(world, "early", "Scheduled"), what="placed once the namespace is permitted")
    world.vm("second", [{"name": "gpu", "flavor": gpu}])
    wait_for(phase(world, "second", "Scheduled"), what="second within quota")
    world.vm("third", [{"name": "gpu", "flavor": gpu}])
    vm = wait_for(
        lambda: (v := world.get_vm("third")).status.conditions and v, what="quota refusal"
    )
    cond = next(x for x in vm.status.conditions if x.type == c.COND_SCHEDULED)
    assert (
        cond.reason == "LimitExceeded"
        and "holds 2" in cond.message
        and "allows 2 per namespace" in cond.message
    )
    # Freeing one of the namespace's devices lets the third in.
    world.delete_vm("early")
    wait_for(phase(world, "third", "Scheduled"), what="third placed after a release")
    check_invariants(world)


class ClaimSampler:
    """Counts, as often as it can, the devices claimed for the test's namespace: the highest
    count seen is what a quota must bound at every moment, not only at the end."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.most = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            held = sum(
                1
                for d in self.world.devices()
                if d.spec.claim_ref is not None and d.spec.claim_ref.flavor
            )
            self.most = max(self.most, held)
            self.samples += 1
            time.sleep(0.02)

    def __enter__(self) -> ClaimSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _quota_settled(world: World, bound: int) -> Callable[[], bool]:
    def check() -> bool:
        vms = world.vms()
        if any(v.metadata.deletion_timestamp for v in vms):
            return False  # a deleted VM holds its devices until its finalizer is done
        if sum(1 for v in vms if v.status.node_name) != bound:
            return False
        refused = [
            v
            for v in vms
            if not v.status.node_name
            and any(
                x.type == c.COND_SCHEDULED and x.reason == "LimitExceeded"
                for x in v.status.conditions
            )
        ]
        return len(refused) == len(vms) - bound

    return check


def test_a_burst_never_takes_more_than_the_namespace_quota(
    world: World, leases: Callable[..., LeaseKeeper], controller: ControllerProcess
) -> None:
    leases(world.node("a"))
    for j in range(16):
        world.device("a", f"0000:{j + 16:02x}:00.0", numa=j % 2)
    gpu = world.flavor("a100", limits={"maxPerNamespace": 2})
    with ClaimSampler(world) as sampler:
        _create_burst(world, gpu, 12)
        wait_for(_quota_settled(world, 2), timeout=60, interval=0.2, what="2 bound, 10 refused")
    assert sampler.most == 2 and sampler.samples >= 2, (sampler.most, sampler.samples)
    refused = next(v for v in world.vms() if not v.status.node_name)
    cond = next(x for x in refused.status.conditions if x.type == c.COND_SCHEDULED)
    assert f"holds 2 {gpu}" in cond.message and "allows 2 per namespace" in cond.message
    check_invariants(world)


def test_three_controllers_at_once_never_exceed_the_namespace_quota(
    world: World, kube: KubeCluster, leases: Callable[..., LeaseKeeper], tmp_path: Path
) -> None:
    # The VMs wait before the controllers start, so all three see every one at once and
    # decide together: without the ledger each would bind its own three.
    leases(world.node("a"), world.node("b"))
    for node in ("a", "b"):
        for j in range(12):
            world.device(node, f"0000:{j + 16:02x}:00.0", numa=j % 2)
    gpu = world.flavor("a100", limits={"maxPerNamespace": 3})
    _create_burst(world, gpu, 24)
    grace = ["--claim-grace", "15"]
    ctls = [ControllerProcess(kube.kubeconfig, tmp_path, *grace, name=f"c{i}") for i in range(3)]
    try:
        with ClaimSampler(world) as sampler:
            for ctl in ctls:
                ctl.start(wait=False)
            wait_for(_quota_settled(world, 3), timeout=90, interval=0.3, what="3 bound")
            first = {v.metadata.name for v in world.vms() if v.status.node_name}
            for name in first:
                world.delete_vm(name)
            wait_for(_quota_settled(world, 3), timeout=90, interval=0.3, what="the next 3")
        assert sampler.most <= 3, sampler.most
        assert {v.metadata.name for v in world.vms() if v.status.node_name}.isdisjoint(first)
        # The ledger names exactly the bound VMs.
        ledger = client.CoreV1Api(kube.api).read_namespaced_config_map(
            f"pcipt-quota.{world.namespace}", OPERATOR_NS
        )
        bound = {v.metadata.uid for v in world.vms() if v.status.node_name}
        wait_for(
            lambda: (
                set(
                    client.CoreV1Api(kube.api)
                    .read_namespaced_config_map(f"pcipt-quota.{world.namespace}", OPERATOR_NS)
                    .data
                    or {}
                )
                == bound
            ),
            timeout=30,
            what="the ledger holds the bound VMs only",
        )
        assert ledger.metadata.labels == {"pcipt.io/quota-ledger": "true"}
        check_invariants(world)
    finally:
        for ctl in ctls:
            ctl.stop()


def test_dedicated_cpus_are_counted_recorded_and_never_shared(
    world: World, leases: Callable[..., LeaseKeeper], controller: ControllerProcess
) -> None:
    from pcipt.compute import NodeCompute, NumaCompute

    # One NUMA node of 8 CPUs in 4 cores (c and c + 8 are siblings), 16 GiB.
    topo = NodeCompute(
        {0: NumaCompute(tuple(range(8)), tuple((c, c + 4) for c in range(4)), 16384)}
    )
    a = world.node("a")
    leases(a, compute=topo.to_json())
    world.device("a", "0000:3b:00.0")
    world.device("a", "0000:3c:00.0")
    world.device("a", "0000:3d:00.0")
    gpu = world.flavor("a100", numaPolicy="required")
    spec = {"cpu": {"cores": 4, "policy": "dedicated"}, "memory": "4Gi"}
    world.vm("one", [{"name": "gpu", "flavor": gpu}], **spec)
    world.vm("two", [{"name": "gpu", "flavor": gpu}], **spec)
    for name in ("one", "two"):
        wait_for(phase(world, name, "Scheduled"), what=f"{name} Scheduled")
    cpus = []
    for name in ("one", "two"):
        compute = world.get_vm(name).status.compute
        assert compute is not None and compute.policy == "dedicated" and compute.vcpus == 4
        (share,) = compute.numa
        assert share.node == 0 and share.memory_mib == 4096 and len(share.cpus or []) == 4
        cpus.append(set(share.cpus or []))
    assert not cpus[0] & cpus[1] and cpus[0] | cpus[1] == set(range(8))
    # The third GPU is free, its CPUs are not: refused, naming them.
    world.vm("three", [{"name": "gpu", "flavor": gpu}], **spec)
    vm = wait_for(lambda: (v := world.get_vm("three")).status.scheduling and v, what="refusal")
    assert "have only 0 free CPUs on NUMA node 0 for 4 dedicated vCPUs" in (
        vm.status.scheduling.message
    )
    # One goes: its CPUs come back, and the third is placed on them.
    world.delete_vm("one")
    wait_for(phase(world, "three", "Scheduled"), what="three placed on one's CPUs")
    got = world.get_vm("three").status.compute
    assert got is not None and set(got.numa[0].cpus or []) == cpus[0]
    check_invariants(world)


def test_pinned_address_and_nodeselector(
    world: World, leases: Callable[..., LeaseKeeper], controller: ControllerProcess
) -> None:
    leases(world.node("a"), world.node("b"))
    world.device("a", "0000:3b:00.0")
    pinned = world.device("b", "0000:3c:00.0")
    world.device("b", "0000:3d:00.0")
    gpu = world.flavor("a100")
    world.vm(
        "pin",
        [{"name": "gpu", "flavor": gpu, "address": "0000:3c:00.0"}],
        nodeSelector={"kubernetes.io/hostname": world.node("b")},
    )
    wait_for(phase(world, "pin", "Scheduled"), what="pinned VM placed")
    assert [d.pci_device for d in world.get_vm("pin").status.devices] == [pinned]


def test_same_pcie_root_keeps_the_gpu_and_its_nic_under_one_root_complex(
    world: World, leases: Callable[..., LeaseKeeper], controller: ControllerProcess
) -> None:
    leases(world.node("a"))
    world.device("a", "0000:3b:00.0", root="pci0000:3a")
    gpu_b = world.device("a", "0000:af:00.0", root="pci0000:ae")
    nic_args = {"vendor": "8086", "product": "1889", "cls": "020000", "role": "VF",
                "physnet": "physnet1"}  # fmt: skip
    world.device("a", "0000:5e:02.0", root="pci0000:5d", **nic_args)
    vf_b = world.device("a", "0000:d8:02.0", root="pci0000:ae", **nic_args)
    gpu = world.flavor("a100")
    nic = world.flavor("vf", "nic", selector={"vendorIDs": ["8086"], "sriovRoles": ["VF"]})
    world.vm(
        "rdma",
        [{"name": "gpu", "flavor": gpu}],
        networks=[{"name": "rdma", "flavor": nic, "physicalNetwork": "physnet1"}],
        placement={"samePCIeRoot": ["gpu", "rdma"]},
    )
    wait_for(phase(world, "rdma", "Scheduled"), what="placed")
    vm = world.get_vm("rdma")
    assert [d.pci_device for d in vm.status.devices] == [gpu_b]
    assert [n.pci_device for n in vm.status.networks] == [vf_b]
    # No root holds a second pair: the next one waits, saying why.
    world.vm(
        "rdma2",
        [{"name": "gpu", "flavor": gpu}],
        networks=[{"name": "rdma", "flavor": nic, "physicalNetwork": "physnet1"}],
        placement={"samePCIeRoot": ["gpu", "rdma"]},
    )

    def refusal() -> str:
        sched = world.get_vm("rdma2").status.scheduling
        return sched.message if sched is not None else ""

    wait_for(
        lambda: "cannot place gpu, rdma under one PCIe root" in refusal(),
        what="refused with the reason",
    )
    check_invariants(world)


def test_a_request_takes_its_first_alternative_that_fits_and_says_which(
    world: World, leases: Callable[..., LeaseKeeper], controller: ControllerProcess
) -> None:
    leases(world.node("a"))
    a100s = [world.device("a", f"0000:3{i}:00.0") for i in "bc"]
    h100 = world.flavor("h100", selector={"vendorIDs": ["10de"], "productIDs": ["2330"]})
    a100 = world.flavor("a100")
    request = {"name": "gpu", "flavor": h100, "alternatives": [{"flavor": a100, "count": 2}]}
    world.vm("trainer", [request])
    wait_for(phase(world, "trainer", "Scheduled"), what="placed by its alternative")
    vm = world.get_vm("trainer")
    assert sorted(d.pci_device for d in vm.status.devices) == a100s
    assert {d.alternative for d in vm.status.devices} == {1}
    # Nothing left for a second one: each alternative says why.
    world.vm("second", [request])

    def refusal() -> str:
        sched = world.get_vm("second").status.scheduling
        return sched.message if sched is not None else ""

    msg = wait_for(lambda: "need 2" in refusal() and refusal(), what="refused")
    assert f"have no free {h100} (need 1)" in msg and f"{a100} (need 2)" in msg
    # No RestartRequired for a request bound by its alternative.
    cond = next(
        (x for x in world.get_vm("trainer").status.conditions if x.type == c.COND_RESTART_REQUIRED),
        None,
    )
    assert cond is None or cond.status == "False"
    check_invariants(world)


def test_sriov_network_takes_a_vf_on_its_physnet_and_vlan(
    world: World, leases: Callable[..., LeaseKeeper], controller: ControllerProcess
) -> None:
    leases(world.node("a"))
    world.device(
        "a",
        "0000:5e:02.0",
        vendor="8086",
        product="1889",
        cls="020000",
        role="VF",
        physnet="physnet1",
    )
    vf = world.device(
        "a",
        "0000:5e:02.1",
        vendor="8086",
        product="1889",
        cls="020000",
        role="VF",
        physnet="physnet2",
        netdev="ens1f0v1",
    )
    nic = world.flavor(
        "vf",
        "nic",
        selector={"vendorIDs": ["8086"], "sriovRoles": ["VF"]},
        networking={"vlanRanges": ["100-199"]},
    )
    world.vm(
        "router",
        networks=[
            {
                "name": "uplink",
                "flavor": nic,
                "physicalNetwork": "physnet2",
                "vlan": 120,
                "mac": "52:54:00:6e:10:01",
            }
        ],
    )
    wait_for(phase(world, "router", "Scheduled"), what="VF bound")
    (net,) = world.get_vm("router").status.networks
    assert (
        net.pci_device == vf
        and net.vlan == 120
        and net.mac == "52:54:00:6e:10:01"
        and net.netdev == "ens1f0v1"
    )
    world.vm("wrongvlan", networks=[{"name": "up", "flavor": nic, "vlan": 300}])
    vm = wait_for(lambda: (v := world.get_vm("wrongvlan")).status.conditions and v, what="refusal")
    cond = next(x for x in vm.status.conditions if x.type == c.COND_SCHEDULED)
    assert cond.reason == "NetworkNotAllowed" and "VLAN 300" in cond.message


# --- capacity changes, liveness, audit -------------------------------------------------------


def test_pending_vm_binds_as_soon_as_capacity_appears(
    world: World, leases: Callable[..., LeaseKeeper], controller: ControllerProcess
) -> None:
    leases(world.node("a"))
    cordoned = world.device("a", "0000:3b:00.0", unschedulable=True)
    gpu = world.flavor("a100")
    world.vm("waiting", [{"name": "gpu", "flavor": gpu}])
    wait_for(lambda: world.get_vm("waiting").status.scheduling, what="refusal")
    for change in ("uncordon", "new device"):
        if change == "uncordon":
            world.custom.patch_cluster_custom_object(
                c.GROUP, c.VERSION, c.PLURAL_PCIDEVICE, cordoned, {"spec": {"unschedulable": False}}
            )
        else:
            world.device("a", "0000:3c:00.0")
        # Driven by the watch event, not a timer (the latency is bench/bind.py's requeue figure).
        wait_for(phase(world, "waiting", "Scheduled"), timeout=10, what=f"bind after {change}")
        world.delete_vm("waiting")
        wait_for(lambda: not world.vms(), what="released")
        if change == "uncordon":
            world.custom.patch_cluster_custom_object(
                c.GROUP, c.VERSION, c.PLURAL_PCIDEVICE, cordoned, {"spec": {"unschedulable": True}}
            )
            world.vm("waiting", [{"name": "gpu", "flavor": gpu, "address": "0000:3c:00.0"}])
            wait_for(lambda: world.get_vm("waiting").status.scheduling, what="refusal")


def test_node_not_alive_makes_devices_unschedulable_and_marks_its_vms(
    world: World, leases: Callable[..., LeaseKeeper], controller: ControllerProcess
) -> None:
    a, b = world.node("a"), world.node("b")
    keeper_a = leases(a)
    leases(b)
    world.device("a", "0000:3b:00.0")
    gpu = world.flavor("a100")
    world.vm("on-a", [{"name": "gpu", "flavor": gpu}])
    wait_for(phase(world, "on-a", "Scheduled"), what="placed on a")
    keeper_a.stop(delete=False)  # node a's plugin dies; its Lease just stops being renewed
    vm = wait_for(
        lambda: (
            (v := world.get_vm("on-a"))
            and any(
                x.type == c.COND_NODE_ALIVE and x.status == "False" for x in v.status.conditions
            )
            and v
        ),
        timeout=15,
        what="NodeAlive=False on the VM",
    )
    ready = next(x for x in vm.status.conditions if x.type == c.COND_READY)
    assert ready.status == "False" and ready.reason == c.REASON_NODE_NOT_ALIVE
    world.vm("new", [{"name": "gpu", "flavor": gpu}])
    vm = wait_for(lambda: (v := world.get_vm("new")).status.scheduling and v, what="refusal")
    assert "not alive" in vm.status.scheduling.message
    # A VM on a dead node is released without waiting for a domain report.
    world.delete_vm("on-a", domain_gone=False)
    wait_for(
        lambda: not [v for v in world.vms() if v.metadata.name == "on-a"],
        what="released from dead node",
    )


def test_flavor_counts_stay_current(
    world: World,
    kube: KubeCluster,
    leases: Callable[..., LeaseKeeper],
    controller: ControllerProcess,
) -> None:
    leases(world.node("a"))
    world.device("a", "0000:3b:00.0")
    world.device("a", "0000:3c:00.0")
    world.device("a", "0000:3d:00.0", health="Unhealthy")
    gpu = world.flavor("a100")

    def status() -> dict[str, int]:
        st = world.custom.get_cluster_custom_object(
            c.GROUP, c.VERSION, c.PLURAL_PCIFLAVOR, gpu
        ).get("status", {})
        return {k: st.get(k, 0) for k in ("total", "allocatable", "allocated", "free", "unhealthy")}

    wait_for(
        lambda: (
            status() == {"total": 3, "allocatable": 2, "allocated": 0, "free": 2, "unhealthy": 1}
        ),
        what="counts",
    )
    world.vm("vm", [{"name": "gpu", "flavor": gpu}])
    wait_for(
        lambda: status()["free"] == 1 and status()["allocated"] == 1, what="counts after a bind"
    )
    out = kube.kubectl("get", "pciflavor", gpu).stdout.splitlines()
    assert out[0].split()[:4] == ["NAME", "TYPE", "TOTAL", "FREE"] and out[1].split()[1:4] == [
        "gpu",
        "3",
        "1",
    ]


def test_audit_releases_orphaned_claims_and_reclaims_missing_ones(
    world: World, leases: Callable[..., LeaseKeeper], controller: ControllerProcess
) -> None:
    leases(world.node("a"))
    d0 = world.device("a", "0000:3b:00.0")
    d1 = world.device("a", "0000:3c:00.0")
    gpu = world.flavor("a100")
    # An orphan: a claim for a VM that does not exist, as a crash mid-bind could leave.
    world.custom.patch_cluster_custom_object(
        c.GROUP,
        c.VERSION,
        c.PLURAL_PCIDEVICE,
        d1,
        {
            "spec": {
                "claimRef": {
                    "namespace": world.namespace,
                    "name": "ghost",
                    "uid": "ghost-uid",
                    "request": "gpu",
                    "flavor": gpu,
                    "claimedAt": "2020-01-01T00:00:00Z",
                }
            }
        },
    )
    wait_for(
        lambda: world.get_device(d1).spec.claim_ref is None, timeout=15, what="orphan released"
    )
    # A missing claim: the VM lists a device whose claimRef was lost.
    world.vm("vm", [{"name": "gpu", "flavor": gpu}])
    wait_for(phase(world, "vm", "Scheduled"), what="placed")
    held = world.get_vm("vm").status.devices[0].pci_device
    world.custom.patch_cluster_custom_object(
        c.GROUP, c.VERSION, c.PLURAL_PCIDEVICE, held, {"spec": {"claimRef": None}}
    )
    wait_for(
        lambda: (r := world.get_device(held).spec.claim_ref) is not None and r.name == "vm",
        timeout=15,
        what="claim restored",
    )
    assert d0 in {held, d1}
    check_invariants(world)


def test_pf_and_vf_are_kept_apart_and_the_audit_splits_claims_made_before(
    world: World, leases: Callable[..., LeaseKeeper], controller: ControllerProcess
) -> None:
    leases(world.node("a"))
    pf, vf0 = "0000:5e:00.0", "0000:5e:02.0"
    nic = {"vendor": "8086", "product": "1592", "cls": "020000"}
    pf_dev = world.device("a", pf, role="PF", **nic)
    # The VF as an old node plugin published it, without its PF: the scheduler cannot know.
    vf_dev = world.device("a", vf0, vendor="8086", product="1889", cls="020000", role="VF")
    pf_flavor = world.flavor("pf", "nic", selector={"vendorIDs": ["8086"], "sriovRoles": ["PF"]})
    vf_flavor = world.flavor("vf", "nic", selector={"vendorIDs": ["8086"], "sriovRoles": ["VF"]})
    world.vm("uses-pf", [{"name": "nic", "flavor": pf_flavor}])
    wait_for(phase(world, "uses-pf", "Scheduled"), what="uses-pf Scheduled")
    world.vm("uses-vf", [{"name": "nic", "flavor": vf_flavor}])
    wait_for(phase(world, "uses-vf", "Scheduled"), what="uses-vf Scheduled")
    # Now the VF says whose it is: the audit sends the later VM back to scheduling, which
    # will not give it that VF while another VM holds the PF, and frees the VF.
    world.custom.patch_cluster_custom_object_status(
        c.GROUP,
        c.VERSION,
        c.PLURAL_PCIDEVICE,
        vf_dev,
        {"status": {"sriov": {"role": "VF", "physFn": pf}}},
    )
    vm = wait_for(
        lambda: (v := world.get_vm("uses-vf")).status.phase == "Pending" and v,
        timeout=20,
        what="uses-vf re-planned",
    )
    lost = next(x for x in vm.status.conditions if x.type == c.COND_DEVICES_BOUND)
    assert "a PF and its VF, held by different VMs" in lost.message
    assert f"{world.namespace}/uses-pf claimed first" in lost.message
    refusal = wait_for(lambda: world.get_vm("uses-vf").status.scheduling, what="refusal")
    assert "whose PF is held by another VM" in refusal.message
    wait_for(lambda: world.get_device(vf_dev).spec.claim_ref is None, timeout=20, what="VF freed")
    assert world.get_device(pf_dev).spec.claim_ref is not None
    assert world.get_vm("uses-pf").status.phase == "Scheduled"
    check_invariants(world)


def test_webhook_refuses_unknown_flavor_and_unpermitted_namespace(
    world: World, kube: KubeCluster, leases: Callable[..., LeaseKeeper], tmp_path: Path
) -> None:
    ctl = ControllerProcess(kube.kubeconfig, tmp_path, "--webhook", "dev").start()
    try:
        gpu = world.flavor("a100", access={"namespaceSelector": {"matchLabels": {"gpu": "yes"}}})
        admission = client.AdmissionregistrationV1Api(kube.api)
        wait_for(
            lambda: any(
                w.metadata.name == f"validate.{c.GROUP}"
                for w in admission.list_validating_webhook_configuration().items
            ),
            what="webhook configuration",
        )

        def refused(spec_devices: list[dict[str, str]]) -> str:
            try:
                world.vm("x", spec_devices)
            except client.ApiException as e:
                return str(e.body)
            world.cleanup()
            return ""

        msg = wait_for(
            lambda: refused([{"name": "gpu", "flavor": "no-such-flavor"}]), what="webhook refusal"
        )
        assert "flavor no-such-flavor does not exist" in msg
        msg = refused([{"name": "gpu", "flavor": gpu}])
        assert f"may not use flavor {gpu}" in msg
    finally:
        ctl.stop()
        for w in (
            client.AdmissionregistrationV1Api(kube.api)
            .list_validating_webhook_configuration()
            .items
        ):
            if w.metadata.name == f"validate.{c.GROUP}":
                client.AdmissionregistrationV1Api(kube.api).delete_validating_webhook_configuration(
                    w.metadata.name
                )


@pytest.fixture
def lease(world: World, kube: KubeCluster) -> Iterator[str]:
    """A leader-election Lease name of this test's own."""
    name = f"pcipt-{world.test_id}"
    yield name
    with contextlib.suppress(client.ApiException):
        client.CoordinationV1Api(kube.api).delete_namespaced_lease(name, OPERATOR_NS)


def _elected(lease: str, duration: float = 30, renew: float = 1) -> tuple[str, ...]:
    return (
        "--leader-elect",
        "--leader-elect-lease",
        lease,
        "--leader-elect-lease-duration",
        str(duration),
        "--leader-elect-renew-period",
        str(renew),
    )


def _holder(kube: KubeCluster, lease: str) -> str:
    got = client.CoordinationV1Api(kube.api).read_namespaced_lease(lease, OPERATOR_NS)
    return got.spec.holder_identity or ""


def test_a_standby_replicas_webhook_admits_a_flavor_created_while_it_waits(
    world: World, kube: KubeCluster, tmp_path: Path, lease: str
) -> None:
    """Both replicas serve the webhook behind one Service; only the leader acts. The standby must
    not refuse a VM for a flavor the API server has but its inventory may not (found by the
    chart's real-pod tier)."""
    leader = ControllerProcess(
        kube.kubeconfig, tmp_path, *_elected(lease), "--identity", "one", name="one"
    ).start()
    wait_for(lambda: "leading lease=" in leader.log(), what="the first replica to lead")
    standby = ControllerProcess(
        kube.kubeconfig,
        tmp_path,
        *_elected(lease),
        "--identity",
        "two",
        "--webhook",
        "dev",
        name="two",
    ).start()
    admission = client.AdmissionregistrationV1Api(kube.api)
    try:

        def refusal(name: str, flavor: str) -> str:
            try:
                world.vm(name, [{"name": "gpu", "flavor": flavor}])
            except client.ApiException as e:
                return str(e.body)
            return ""

        # The standby's webhook answers (its inventory synced at start) ...
        msg = wait_for(lambda: refusal("x", "no-such-flavor"), what="the standby's webhook")
        assert "flavor no-such-flavor does not exist" in msg
        assert "leading lease=" not in standby.log()
        # ... and a flavor made now is no reason.
        gpu = world.flavor("a100")
        assert refusal("late", gpu) == ""
        assert world.get_vm("late").metadata.name == "late"
        assert "flavor no-such-flavor does not exist" in refusal("y", "no-such-flavor")
    finally:
        leader.stop()
        standby.stop()
        for w in admission.list_validating_webhook_configuration().items:
            if w.metadata.name == f"validate.{c.GROUP}":
                admission.delete_validating_webhook_configuration(w.metadata.name)


def test_without_webhook_an_unknown_flavor_lands_as_a_condition(
    world: World, leases: Callable[..., LeaseKeeper], controller: ControllerProcess
) -> None:
    world.vm("typo", [{"name": "gpu", "flavor": "a1000"}])
    vm = wait_for(lambda: (v := world.get_vm("typo")).status.conditions and v, what="a condition")
    cond = next(x for x in vm.status.conditions if x.type == c.COND_SCHEDULED)
    assert (
        cond.status == "False"
        and cond.reason == "FlavorNotFound"
        and "flavor a1000 does not exist" in cond.message
    )


# --- races and crashes -----------------------------------------------------------------------


def _race_world(
    world: World, leases: Callable[..., LeaseKeeper], nodes: int = 5, per_node: int = 10
) -> str:
    leases(*(world.node(f"n{i}") for i in range(nodes)))
    for i in range(nodes):
        for j in range(per_node):
            world.device(f"n{i}", f"0000:{j + 16:02x}:00.0", numa=j % 2)
    return world.flavor("a100")


def _create_burst(world: World, flavor: str, count: int, threads: int = 8) -> None:
    names = [f"vm-{i:03d}" for i in range(count)]

    def worker(chunk: list[str]) -> None:
        for n in chunk:
            world.vm(n, [{"name": "gpu", "flavor": flavor}])

    ts = [threading.Thread(target=worker, args=(names[i::threads],)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def _settled(world: World, bound: int) -> Callable[[], dict[str, int] | None]:
    def check() -> dict[str, int] | None:
        vms = world.vms()
        if any(v.metadata.deletion_timestamp for v in vms):
            return None  # a deleted VM still holds its devices until its finalizer is done
        done = sum(1 for v in vms if v.status.node_name)
        pending_with_reason = sum(1 for v in vms if not v.status.node_name and v.status.scheduling)
        if done == bound and done + pending_with_reason == len(vms):
            return {"bound": done, "pending": pending_with_reason}
        return None

    return check


def test_race_200_vms_for_50_devices(
    world: World, leases: Callable[..., LeaseKeeper], controller: ControllerProcess
) -> None:
    gpu = _race_world(world, leases)
    _create_burst(world, gpu, 200)
    counts = wait_for(
        _settled(world, 50), timeout=60, interval=0.5, what="50 bound, 150 pending with reasons"
    )
    assert counts == {"bound": 50, "pending": 150}
    assert check_invariants(world)["claimed"] == 50
    pending = [v for v in world.vms() if not v.status.node_name]
    assert all("have no free" in v.status.scheduling.message for v in pending)

    # Deleting 50 bound VMs lets 50 pending ones bind (how fast: bench/bind.py).
    bound = [v.metadata.name for v in world.vms() if v.status.node_name]
    for name in bound:
        world.delete_vm(name)
    wait_for(_settled(world, 50), timeout=30, interval=0.2, what="the next 50 bound")
    assert {v.metadata.name for v in world.vms()}.isdisjoint(bound)
    assert check_invariants(world)["claimed"] == 50


def test_two_controllers_at_once_never_double_claim(
    world: World, kube: KubeCluster, leases: Callable[..., LeaseKeeper], tmp_path: Path
) -> None:
    # Two active replicas (no leader election) are safe but each may audit the other's binds in flight:
    # a claim grace shorter than one bind under load would let an audit release a claim that
    # the other replica is about to list, to be re-claimed a moment later. The default is 30s;
    # 2s (the fixture's, for fast audits elsewhere) is too short on a loaded 2-core machine.
    grace = ["--claim-grace", "15"]
    first = ControllerProcess(kube.kubeconfig, tmp_path, *grace, name="first").start()
    second = ControllerProcess(kube.kubeconfig, tmp_path, *grace, name="second").start()
    try:
        gpu = _race_world(world, leases)
        _create_burst(world, gpu, 200)
        wait_for(_settled(world, 50), timeout=90, interval=0.5, what="50 bound, 150 pending")
        assert check_invariants(world)["claimed"] == 50
        bound = [v.metadata.name for v in world.vms() if v.status.node_name]
        for name in bound[:25]:
            world.delete_vm(name)
        wait_for(_settled(world, 50), timeout=60, interval=0.5, what="re-bound after deletions")
        assert check_invariants(world)["claimed"] == 50
        lost = first.log().count("lost a race") + second.log().count("lost a race")
        print(f"two controllers: {lost} lost races, both logs consistent")
        assert "bound vm=" in first.log() and "bound vm=" in second.log(), (
            "both controllers should have bound some VMs"
        )
    finally:
        first.stop()
        second.stop()


def test_sigkill_during_a_burst_leaks_nothing(
    world: World, kube: KubeCluster, leases: Callable[..., LeaseKeeper], tmp_path: Path
) -> None:
    ctl = ControllerProcess(kube.kubeconfig, tmp_path).start()
    try:
        gpu = _race_world(world, leases, nodes=4, per_node=10)
        rng = random.Random(7)
        creator = threading.Thread(target=_create_burst, args=(world, gpu, 80, 4))
        creator.start()
        kills = 0
        while creator.is_alive() or kills < 4:
            time.sleep(rng.uniform(0.2, 1.2))
            ctl.kill()
            kills += 1
            ctl.start()
        creator.join()
        wait_for(_settled(world, 40), timeout=60, interval=0.5, what="settled after the kills")
        counts = check_invariants(world)
        assert counts["claimed"] == 40 and counts["bound"] == 40
        assert kills >= 4
    finally:
        ctl.stop()


def test_one_replica_leads_and_a_standby_takes_over_when_it_is_killed(
    world: World,
    kube: KubeCluster,
    leases: Callable[..., LeaseKeeper],
    tmp_path: Path,
    lease: str,
) -> None:
    common = _elected(lease, duration=3, renew=1)
    one = ControllerProcess(kube.kubeconfig, tmp_path, *common, "--identity", "one", name="one")
    one.start()
    wait_for(lambda: "leading lease=" in one.log(), what="the first replica to lead")
    two = ControllerProcess(
        kube.kubeconfig, tmp_path, *common, "--identity", "two", name="two"
    ).start()
    try:
        leases(world.node("a"))
        world.device("a", "0000:3b:00.0")
        world.device("a", "0000:3c:00.0")
        gpu = world.flavor("a100")
        world.vm("first", [{"name": "gpu", "flavor": gpu}])
        wait_for(phase(world, "first", "Scheduled"), what="first bound")
        assert "bound vm=" in one.log() and "bound vm=" not in two.log()
        assert "leading lease=" not in two.log() and _holder(kube, lease) == "one"

        one.kill()  # no goodbye: the standby waits out the Lease (3 s), then leads
        killed = time.monotonic()
        wait_for(lambda: "leading lease=" in two.log(), timeout=15, what="the standby to lead")
        took = time.monotonic() - killed
        assert took < 3 + 5, took
        assert _holder(kube, lease) == "two"
        world.vm("second", [{"name": "gpu", "flavor": gpu}])
        wait_for(phase(world, "second", "Scheduled"), what="second bound by the survivor")
        assert "bound vm=" in two.log()
        check_invariants(world)
    finally:
        one.stop()
        two.stop()


def test_a_killed_leader_restarted_in_its_pod_takes_its_lease_back_at_once(
    world: World, kube: KubeCluster, tmp_path: Path, lease: str
) -> None:
    """The identity is the pod's: a leader the kubelet restarts need not wait out its Lease
    (30 s here), and the standby does not get it meanwhile."""
    common = _elected(lease, duration=30, renew=1)
    one = ControllerProcess(kube.kubeconfig, tmp_path, *common, "--identity", "pod-0", name="a")
    one.start()
    wait_for(lambda: "leading lease=" in one.log(), what="pod-0 to lead")
    two = ControllerProcess(
        kube.kubeconfig, tmp_path, *common, "--identity", "pod-1", name="b"
    ).start()
    try:
        one.kill()
        one.start()  # same identity, a new process
        wait_for(lambda: one.log().count("leading lease=") >= 2, timeout=20, what="pod-0 again")
        assert "leading lease=" not in two.log()
        assert _holder(kube, lease) == "pod-0"
    finally:
        one.stop()
        two.stop()


def test_a_leader_that_stops_cleanly_hands_over_at_once(
    world: World, kube: KubeCluster, tmp_path: Path, lease: str
) -> None:
    """SIGTERM (a rolling update): the leader finishes its binds and gives the Lease up, so the
    standby leads within a look or two instead of the Lease's 30 s."""
    common = _elected(lease, duration=30, renew=1)
    one = ControllerProcess(kube.kubeconfig, tmp_path, *common, "--identity", "one", name="one")
    one.start()
    wait_for(lambda: "leading lease=" in one.log(), what="the first replica to lead")
    two = ControllerProcess(
        kube.kubeconfig, tmp_path, *common, "--identity", "two", name="two"
    ).start()
    try:
        one.stop()
        stopped = time.monotonic()
        assert "gave up lease=" in one.log()
        wait_for(lambda: "leading lease=" in two.log(), timeout=10, what="the standby to lead")
        assert time.monotonic() - stopped < 10
        assert _holder(kube, lease) == "two"
    finally:
        one.stop()
        two.stop()

"""The node plugin's agent against the real kube-apiserver and libvirt's test driver, on a
simulated host. The controller's writes (claims, the VM's scheduled status) are made by the
test the way the controller makes them; tests/e2e runs the real controller with it."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import libvirt
import pytest
from kubernetes import client

from nodeplugin.agent import AgentSettings, NodeAgent
from nodeplugin.domain.build import domain_name
from nodeplugin.domain.render import passthrough_addresses
from nodeplugin.simulate import SIM_STATE, SimulatedKernel, SysfsTree, aer_counters, build_host
from nodeplugin.sriov import RecordingRunner
from pcipt import constants as c
from pcipt.api.v1alpha1 import PassthroughVM, PciDevice, pcidevice_name
from pcipt.devcluster import LocalCluster
from pcipt.devcluster.crds import apply_crds
from pcipt.kubeclient import KubeClient, crd_path, load_credentials
from tests.integration.conftest import KubeCluster
from tests.unit.hosts import lab_host

pytestmark = pytest.mark.usefixtures("operator_namespace")

GPU, AUDIO = "0000:3b:00.0", "0000:3b:00.1"
CONFIG = """
devices:
  - name: gpu
    match: {vendorID: "10de"}
  - name: vfs
    match: {netdev: "ens1f0#0-3"}
    physicalNetwork: physnet2
"""
OPERATOR_NS = "pcipt-system"


class Rig:
    """One simulated host with its agent, and helpers to act as the controller would."""

    def __init__(self, kubeconfig: Path, tmp: Path, namespace: str) -> None:
        self.node = f"np-{uuid.uuid4().hex[:6]}"
        self.root = tmp / "sys"
        build_host(self.root, lab_host())
        self.tree = SysfsTree(self.root)
        self.config = tmp / "config.yaml"
        self.config.write_text(CONFIG)
        self.namespace = namespace
        self.settings = AgentSettings(
            node=self.node,
            sysfs_root=self.root,
            config=self.config,
            libvirt_uri="test:///default",
            namespace=OPERATOR_NS,
            state_dir=tmp / "state",
            rescan_interval=3600,
            lease_interval=0.5,
            resync_interval=0.5,
            domain_type="kvm",
            stop_grace=2,
            scrub=False,  # the scrub tests turn it on; here a VM's end gives devices back
        )
        self.kubeconfig = kubeconfig
        self.api: KubeClient | None = None
        self.agent: NodeAgent | None = None
        self.writer: SimulatedKernel | None = None
        """The kernel the agent writes to (default: a plain simulated one)."""

    async def start(self) -> NodeAgent:
        if self.api is None:
            self.api = KubeClient(load_credentials(str(self.kubeconfig)))
        self.agent = NodeAgent(
            self.api,
            self.settings,
            writer=self.writer or SimulatedKernel(self.settings.sysfs_root),
            runner=RecordingRunner(),
        )
        await self.agent.start()
        await self.agent.devices.synced.wait()
        await self.agent.rescan()
        return self.agent

    async def stop(self) -> None:
        if self.agent is not None:
            await self.agent.stop()
        if self.api is not None:
            await self.api.close()
            self.api = None

    def name(self, address: str) -> str:
        return pcidevice_name(self.node, address)

    async def device(self, address: str) -> dict[str, Any] | None:
        assert self.api is not None
        try:
            return await self.api.get(crd_path(c.PLURAL_PCIDEVICE, self.name(address)))
        except Exception:
            return None

    async def schedule_vm(
        self, name: str, addresses: list[str], *, stolen: frozenset[str] = frozenset(), **spec: Any
    ) -> PassthroughVM:
        """Create a VM and write what the controller writes when it binds one here. Devices in
        `stolen` are listed in its status but claimed by another VM (a broken state)."""
        assert self.api is not None
        body = {
            "apiVersion": c.API_VERSION,
            "kind": "PassthroughVM",
            "metadata": {
                "name": name,
                "finalizers": [c.FINALIZER_RELEASE],
            },
            "spec": {"memory": "1Gi", "devices": [{"name": "gpu", "flavor": "a100"}], **spec},
        }
        vm = await self.api.create(crd_path(c.PLURAL_PASSTHROUGHVM, namespace=self.namespace), body)
        for i, a in enumerate(addresses):
            owner = (
                ("other", "owner", "someone-else")
                if a in stolen
                else (self.namespace, name, vm["metadata"]["uid"])
            )
            await self.api.patch(
                crd_path(c.PLURAL_PCIDEVICE, self.name(a)),
                {
                    "spec": {
                        "claimRef": {
                            "namespace": owner[0],
                            "name": owner[1],
                            "uid": owner[2],
                            "request": "gpu",
                            "companion": i > 0,
                        }
                    }
                },
            )
        status = {
            "phase": "Scheduled",
            "nodeName": self.node,
            "devices": [
                {
                    "request": "gpu",
                    "pciDevice": self.name(a),
                    "address": a,
                    "numaNode": 0,
                    "companion": i > 0,
                }
                for i, a in enumerate(addresses)
            ],
            "conditions": [
                {
                    "type": t,
                    "status": "True",
                    "reason": t,
                    "message": "",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
                for t in (c.COND_SCHEDULED, c.COND_DEVICES_BOUND)
            ],
        }
        got = await self.api.patch(
            crd_path(c.PLURAL_PASSTHROUGHVM, name, namespace=self.namespace, subresource="status"),
            {"status": status},
        )
        return PassthroughVM.model_validate(got)

    async def vm(self, name: str) -> PassthroughVM | None:
        assert self.api is not None
        try:
            return PassthroughVM.model_validate(
                await self.api.get(crd_path(c.PLURAL_PASSTHROUGHVM, name, namespace=self.namespace))
            )
        except Exception:
            return None

    async def patch_vm(self, name: str, patch: dict[str, Any]) -> None:
        assert self.api is not None
        await self.api.patch(
            crd_path(c.PLURAL_PASSTHROUGHVM, name, namespace=self.namespace), patch
        )


async def until(pred: Callable[[], Awaitable[Any]], timeout: float = 15.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await pred()
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}: last={last!r}")


async def consistently(pred: Callable[[], Awaitable[Any]], seconds: float, what: str = "") -> None:
    """pred holds for the whole window (checked every 0.1 s): for what must not happen."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not await pred():
            raise AssertionError(f"no longer true: {what}")
        await asyncio.sleep(0.1)


@pytest.fixture
def rig(kube: KubeCluster, namespace: str, tmp_path: Path) -> Iterator[Rig]:
    yield Rig(kube.kubeconfig, tmp_path, namespace)


def driver(rig: Rig, address: str) -> str | None:
    return rig.tree.driver(address)


def libvirt_domain(name: str) -> libvirt.virDomain | None:
    conn = libvirt.open("test:///default")
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError:
        return None


def run(coro: Awaitable[None]) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


# --- publishing ------------------------------------------------------------------------------


def test_publishes_offered_devices_and_a_quiet_rescan_writes_nothing(rig: Rig) -> None:
    async def scenario() -> None:
        agent = await rig.start()
        try:
            gpu = PciDevice.model_validate(await rig.device(GPU))
            assert gpu.spec.node_name == rig.node and gpu.status.driver == "nvidia"
            assert gpu.status.iommu_group == 7 and gpu.status.iommu_group_peers == [AUDIO]
            assert (
                gpu.metadata.labels[c.LABEL_NODE] == rig.node
                and gpu.metadata.labels[c.LABEL_CLASS] == "030200"
            )
            vf = PciDevice.model_validate(await rig.device("0000:5e:02.1"))
            assert (
                vf.status.physical_network == "physnet2"
                and vf.status.sriov
                and vf.status.sriov.role == "VF"
            )
            assert vf.status.sriov.phys_fn == "0000:5e:00.0" and vf.status.netdev == "ens1f0v1"
            assert await rig.device("0000:af:00.0") is None  # the NVMe drive is not offered
            managers = (
                {m.manager for m in gpu.metadata.model_extra.get("managed_fields", [])}
                if gpu.metadata.model_extra
                else set()
            )
            del managers
            before = {n: o["metadata"]["resourceVersion"] for n, o in agent.devices.items.items()}
            plan = await agent.rescan()
            assert plan.writes == 0
            assert rig.api is not None
            got = await rig.api.list(
                crd_path(c.PLURAL_PCIDEVICE), label_selector=f"{c.LABEL_NODE}={rig.node}"
            )
            assert {
                o["metadata"]["name"]: o["metadata"]["resourceVersion"] for o in got["items"]
            } == before
        finally:
            await rig.stop()

    run(scenario())


def test_uses_its_own_field_manager_and_leaves_claims_alone(rig: Rig, kube: KubeCluster) -> None:
    async def scenario() -> None:
        agent = await rig.start()
        try:
            assert rig.api is not None
            await rig.api.patch(
                crd_path(c.PLURAL_PCIDEVICE, rig.name(GPU)),
                {
                    "spec": {
                        "unschedulable": True,
                        "claimRef": {"namespace": "t", "name": "v", "uid": "u", "request": "gpu"},
                    }
                },
            )
            agent.devices.apply("MODIFIED", await rig.device(GPU) or {})
            (rig.root / "devices/pci0000:00" / GPU / "numa_node").write_text("1\n")
            plan = await agent.rescan()
            assert [d.name for d in plan.apply_status] == [rig.name(GPU)]
            got = await rig.device(GPU)
            assert (
                got is not None
                and got["spec"]["unschedulable"] is True
                and got["spec"]["claimRef"]["uid"] == "u"
            )
            assert got["status"]["numaNode"] == 1
            managers = {m["manager"] for m in got["metadata"]["managedFields"]}
            assert c.FIELD_MANAGER_NODEPLUGIN in managers
        finally:
            await rig.stop()

    run(scenario())


def test_vanished_devices_are_deleted_when_free_and_marked_missing_when_held(rig: Rig) -> None:
    async def scenario() -> None:
        agent = await rig.start()
        try:
            assert rig.api is not None
            await rig.api.patch(
                crd_path(c.PLURAL_PCIDEVICE, rig.name("0000:5e:02.0")),
                {
                    "spec": {
                        "claimRef": {"namespace": "t", "name": "v", "uid": "u", "request": "net"}
                    }
                },
            )
            rig.tree.remove_function("0000:5e:02.0")
            rig.tree.remove_function("0000:5e:02.1")
            await until(lambda: asyncio.sleep(0.2, result=True))
            await agent.rescan()
            held = await rig.device("0000:5e:02.0")
            assert held is not None and held["status"]["health"] == "Missing"
            assert await rig.device("0000:5e:02.1") is None
        finally:
            await rig.stop()

    run(scenario())


def test_a_config_edit_marks_held_devices_and_a_bad_config_keeps_the_last_good(
    rig: Rig, kube: KubeCluster
) -> None:
    async def scenario() -> None:
        agent = await rig.start()
        try:
            assert rig.api is not None
            await rig.api.patch(
                crd_path(c.PLURAL_PCIDEVICE, rig.name(GPU)),
                {
                    "spec": {
                        "claimRef": {"namespace": "t", "name": "v", "uid": "u", "request": "gpu"}
                    }
                },
            )
            await until(
                lambda: asyncio.sleep(
                    0,
                    result=bool(
                        ((agent.devices.items.get(rig.name(GPU)) or {}).get("spec") or {}).get(
                            "claimRef"
                        )
                    ),
                ),
                what="the claim in the plugin's view",
            )
            rig.config.write_text("devices: [{name: vfs, match: {netdev: 'ens1f0#0-3'}}]\n")
            os.utime(rig.config, (time.time() + 5, time.time() + 5))
            await agent.rescan()
            gpu = await rig.device(GPU)
            assert gpu is not None and gpu["status"]["health"] == "Unhealthy"
            assert gpu["status"]["conditions"][0]["reason"] == "NotInDeviceSpec"
            assert await rig.device(AUDIO) is None  # free, no longer offered: unpublished

            rig.config.write_text("devices: [{name: broken, match: {vendorID: 'nothex'}}]\n")
            os.utime(rig.config, (time.time() + 10, time.time() + 10))
            plan = await agent.rescan()
            assert plan.writes == 0 and agent.stats.config_error is not None
            assert "devices[0].match.vendorID (entry 'broken')" in agent.stats.config_error
            assert await rig.device("0000:5e:02.0") is not None  # last good config still published
            events = client.CoreV1Api(kube.api).list_namespaced_event("default").items
            assert any(
                e.reason == "DeviceSpecInvalid" and e.involved_object.name == rig.node
                for e in events
            )
        finally:
            await rig.stop()

    for _ in range(1):
        run(scenario())


def test_renews_its_node_lease(rig: Rig, kube: KubeCluster) -> None:
    async def scenario() -> None:
        await rig.start()
        try:
            coord = client.CoordinationV1Api(kube.api)
            name = f"{c.NODE_LEASE_PREFIX}{rig.node}"
            first = coord.read_namespaced_lease(name, OPERATOR_NS).spec.renew_time
            await until(
                lambda: asyncio.to_thread(
                    lambda: coord.read_namespaced_lease(name, OPERATOR_NS).spec.renew_time > first
                ),
                timeout=10,
                what="a renewal",
            )
        finally:
            await rig.stop()

    run(scenario())


# --- VMs --------------------------------------------------------------------------------------


def test_a_scheduled_vm_runs_with_exactly_its_devices_stops_starts_and_goes(rig: Rig) -> None:
    async def scenario() -> None:
        await rig.start()
        try:
            vm = await rig.schedule_vm("gpu-vm", [GPU, AUDIO])
            name = domain_name(rig.namespace, "gpu-vm")
            running = await until(lambda: _phase(rig, "gpu-vm", "Running"), what="Running")
            assert driver(rig, GPU) == driver(rig, AUDIO) == "vfio-pci"
            dom = libvirt_domain(name)
            assert dom is not None and dom.isActive() and dom.UUIDString() == vm.metadata.uid
            assert passthrough_addresses(dom.XMLDesc()) == [GPU, AUDIO]
            assert (
                running.status.domain.devices == [GPU, AUDIO]
                and running.status.domain.state == "running"
            )
            conds = {x.type: x for x in running.status.conditions}
            assert (
                conds[c.COND_DOMAIN_READY].status == "True" and conds[c.COND_READY].status == "True"
            )

            await rig.patch_vm("gpu-vm", {"spec": {"running": False}})
            stopped = await until(lambda: _phase(rig, "gpu-vm", "Stopped"), what="Stopped")
            assert not dom.isActive() and stopped.status.domain.state == "shut off"
            assert (
                next(x for x in stopped.status.conditions if x.type == c.COND_READY).status
                == "True"
            )
            assert driver(rig, GPU) == "vfio-pci"  # a stopped VM keeps its devices

            await rig.patch_vm("gpu-vm", {"spec": {"running": True}})
            await until(lambda: _phase(rig, "gpu-vm", "Running"), what="Running again")

            assert rig.api is not None
            await rig.api.delete(
                crd_path(c.PLURAL_PASSTHROUGHVM, "gpu-vm", namespace=rig.namespace)
            )
            gone = await until(
                lambda: _condition(rig, "gpu-vm", c.COND_DOMAIN_GONE), what="DomainGone"
            )
            assert gone.status.domain is None
            assert libvirt_domain(name) is None
            assert driver(rig, GPU) == "nvidia" and driver(rig, AUDIO) == "snd_hda_intel"
        finally:
            await rig.stop()

    run(scenario())


def test_a_restart_adopts_the_running_domain_and_a_vanished_domain_comes_back(rig: Rig) -> None:
    async def scenario() -> None:
        await rig.start()
        try:
            await rig.schedule_vm("adopt", [GPU, AUDIO])
            await until(lambda: _phase(rig, "adopt", "Running"), what="Running")
            name = domain_name(rig.namespace, "adopt")
            dom = libvirt_domain(name)
            assert dom is not None
            first_id = dom.ID()
            assert rig.agent is not None
            await rig.agent.stop()
            await rig.start()  # a restarted plugin adopts the domain: it is never restarted
            await consistently(
                lambda: asyncio.sleep(
                    0,
                    result=(d := libvirt_domain(name)) is not None
                    and d.isActive()
                    and d.ID() == first_id,
                ),
                1.5,
                what="the domain runs on, the same one",
            )
            again = libvirt_domain(name)
            assert again is not None

            again.destroy()  # the host rebooted
            again.undefine()
            await until(
                lambda: asyncio.sleep(
                    0, result=(d := libvirt_domain(name)) is not None and d.isActive()
                ),
                what="the domain recreated",
            )
        finally:
            await rig.stop()
            dom = libvirt_domain(domain_name(rig.namespace, "adopt"))
            if dom is not None:
                dom.destroy()
                dom.undefine()

    run(scenario())


def test_a_start_failure_is_failed_with_libvirts_message(rig: Rig) -> None:
    async def scenario() -> None:
        conn = libvirt.open("test:///default")
        foreign = conn.defineXML(  # someone else's domain already has the name
            f"<domain type='test'><name>{domain_name(rig.namespace, 'clash')}</name><memory>1024</memory>"
            "<os><type>hvm</type></os></domain>"
        )
        await rig.start()
        try:
            await rig.schedule_vm("clash", [GPU, AUDIO])
            failed = await until(lambda: _phase(rig, "clash", "Failed"), what="Failed")
            cond = next(x for x in failed.status.conditions if x.type == c.COND_DOMAIN_READY)
            assert cond.reason == "StartFailed" and "already exists" in cond.message
            ready = next(x for x in failed.status.conditions if x.type == c.COND_READY)
            assert ready.status == "False" and "already exists" in ready.message
        finally:
            await rig.stop()
            foreign.undefine()

    run(scenario())


class RefusingKernel(SimulatedKernel):
    """vfio-pci's probe refuses one device (as it refuses a bridge: EINVAL) while `refuse`."""

    refuse = True

    def write(self, path: Path, value: str) -> None:
        vfio_bind = path.name == "bind" and path.parent.name == "vfio-pci"
        if self.refuse and vfio_bind and value.strip() == AUDIO:
            raise OSError(22, "Invalid argument")
        super().write(path, value)


def test_a_bind_the_kernel_refuses_marks_the_device_unhealthy_and_touches_nothing(
    rig: Rig, kube: KubeCluster
) -> None:
    async def scenario() -> None:
        kernel = RefusingKernel(rig.root)
        rig.writer = kernel
        agent = await rig.start()
        try:
            await rig.schedule_vm("refused", [GPU, AUDIO])
            failed = await until(lambda: _phase(rig, "refused", "Failed"), what="Failed")
            cond = next(x for x in failed.status.conditions if x.type == c.COND_DOMAIN_READY)
            assert cond.reason == "PrepareFailed" and "the kernel said Invalid argument" in (
                cond.message
            )
            # Nothing half-bound: both back on their own drivers, no override left behind.
            assert driver(rig, GPU) == "nvidia" and driver(rig, AUDIO) == "snd_hda_intel"
            for a in (GPU, AUDIO):
                override = rig.root / "bus/pci/devices" / a / "driver_override"
                assert override.read_text().strip() == "(null)"
            assert libvirt_domain(domain_name(rig.namespace, "refused")) is None

            async def unhealthy() -> dict[str, Any] | None:
                d = await rig.device(AUDIO)
                return d if d and d["status"].get("health") == "Unhealthy" else None

            audio = await until(unhealthy, what="the refused device Unhealthy")
            healthy = next(x for x in audio["status"]["conditions"] if x["type"] == "Healthy")
            assert healthy["reason"] == "BindRefused"
            assert (
                "binding it to vfio-pci failed: the kernel said Invalid argument (EINVAL)"
                in (healthy["message"])
            )
            gpu = await rig.device(GPU)
            assert gpu is not None and gpu["status"]["health"] == "Healthy"  # not at fault
            events = client.CoreV1Api(kube.api).list_namespaced_event(
                "default", field_selector=f"involvedObject.name={rig.name(AUDIO)}"
            )
            assert [e.reason for e in events.items] == ["BindRefused"]
            # The cause goes away: the VM's next try binds both, and the device is Healthy.
            kernel.refuse = False
            await until(lambda: _phase(rig, "refused", "Running"), what="Running after the fix")
            assert driver(rig, AUDIO) == "vfio-pci"
            assert AUDIO not in agent.failures
            await agent.rescan()
            audio_now = await rig.device(AUDIO)
            assert audio_now is not None and audio_now["status"]["health"] == "Healthy"
        finally:
            await rig.stop()

    run(scenario())


def test_devices_not_claimed_for_the_vm_are_never_touched(rig: Rig) -> None:
    async def scenario() -> None:
        await rig.start()
        try:
            await rig.schedule_vm("thief", [GPU, AUDIO], stolen=frozenset({GPU}))
            vm = await until(
                lambda: _condition_reason(rig, "thief", c.COND_DOMAIN_READY, "DeviceNotClaimed"),
                what="DeviceNotClaimed",
            )
            cond = next(x for x in vm.status.conditions if x.type == c.COND_DOMAIN_READY)
            assert "claimed by other/owner" in cond.message
            assert driver(rig, GPU) == "nvidia" and driver(rig, AUDIO) == "snd_hda_intel"
            assert libvirt_domain(domain_name(rig.namespace, "thief")) is None
        finally:
            await rig.stop()

    run(scenario())


async def _phase(rig: Rig, name: str, phase: str) -> PassthroughVM | None:
    vm = await rig.vm(name)
    return vm if vm is not None and vm.status.phase == phase else None


async def _condition(rig: Rig, name: str, type_: str) -> PassthroughVM | None:
    vm = await rig.vm(name)
    if vm is not None and any(x.type == type_ and x.status == "True" for x in vm.status.conditions):
        return vm
    return None


async def _condition_reason(rig: Rig, name: str, type_: str, reason: str) -> PassthroughVM | None:
    vm = await rig.vm(name)
    if vm is not None and any(x.type == type_ and x.reason == reason for x in vm.status.conditions):
        return vm
    return None


def test_a_migration_stops_the_domain_here_and_says_it_is_gone(rig: Rig) -> None:
    async def scenario() -> None:
        await rig.start()
        assert rig.api is not None
        try:
            await rig.schedule_vm("gpu-vm", [GPU, AUDIO])
            name = domain_name(rig.namespace, "gpu-vm")
            await until(lambda: _phase(rig, "gpu-vm", "Running"), what="Running")
            # What the controller writes when it takes `kubectl pcipt migrate gpu-vm`.
            await rig.api.patch(
                crd_path(
                    c.PLURAL_PASSTHROUGHVM, "gpu-vm", namespace=rig.namespace, subresource="status"
                ),
                {
                    "status": {
                        "phase": "Migrating",
                        "migration": {"id": "m1", "fromNode": rig.node, "phase": "Stopping"},
                    }
                },
            )
            gone = await until(
                lambda: _condition(rig, "gpu-vm", c.COND_DOMAIN_GONE), what="DomainGone"
            )
            assert gone.metadata.deletion_timestamp is None and gone.status.domain is None
            assert libvirt_domain(name) is None
            # No scrub on this host: the devices go back to their drivers with the domain.
            assert driver(rig, GPU) == "nvidia" and driver(rig, AUDIO) == "snd_hda_intel"
        finally:
            await rig.stop()

    run(scenario())


def test_a_device_added_to_a_running_vm_waits_for_a_restart_where_libvirt_cannot_hot_plug(
    rig: Rig,
) -> None:
    async def scenario() -> None:
        await rig.start()
        assert rig.api is not None
        try:
            vm = await rig.schedule_vm("gpu-vm", [GPU, AUDIO])
            name = domain_name(rig.namespace, "gpu-vm")
            await until(lambda: _phase(rig, "gpu-vm", "Running"), what="Running")
            nvme = "0000:af:00.0"
            rig.config.write_text(CONFIG + '  - name: nvme\n    match: {vendorID: "144d"}\n')
            await until(lambda: rig.device(nvme), what="the NVMe drive published")
            # What the controller writes when it hot-plugs a request: a claim, a binding.
            await rig.api.patch(
                crd_path(c.PLURAL_PCIDEVICE, rig.name(nvme)),
                {"spec": {"claimRef": {"namespace": rig.namespace, "name": "gpu-vm",
                                       "uid": vm.metadata.uid, "request": "disk"}}},
            )  # fmt: skip
            current = await rig.vm("gpu-vm")
            assert current is not None
            devices = [d.to_dict() for d in current.status.devices]
            devices.append({"request": "disk", "pciDevice": rig.name(nvme), "address": nvme})
            await rig.api.patch(
                crd_path(
                    c.PLURAL_PASSTHROUGHVM, "gpu-vm", namespace=rig.namespace, subresource="status"
                ),
                {"status": {"devices": devices}},
            )
            got = await until(
                lambda: _condition_reason(
                    rig, "gpu-vm", c.COND_DEVICES_ATTACHED, c.REASON_HOTPLUG_UNSUPPORTED
                ),
                what="DevicesAttached=False (HotplugUnsupported)",
            )
            attached = next(x for x in got.status.conditions if x.type == c.COND_DEVICES_ATTACHED)
            assert attached.status == "False" and "applies when the VM restarts" in attached.message
            dom = libvirt_domain(name)
            assert dom is not None and dom.isActive()
            assert passthrough_addresses(dom.XMLDesc()) == [GPU, AUDIO]  # left running as is
            assert got.status.domain is not None and got.status.domain.devices == [GPU, AUDIO]
            # The restart applies it.
            await rig.patch_vm("gpu-vm", {"spec": {"running": False}})
            await until(lambda: _phase(rig, "gpu-vm", "Stopped"), what="Stopped")
            stopped = await rig.vm("gpu-vm")
            assert stopped is not None
            assert stopped.status.domain is not None and nvme in stopped.status.domain.devices
            await rig.patch_vm("gpu-vm", {"spec": {"running": True}})
            await until(lambda: _phase(rig, "gpu-vm", "Running"), what="Running again")
            got = await until(
                lambda: _condition_reason(
                    rig, "gpu-vm", c.COND_DEVICES_ATTACHED, c.REASON_ATTACHED
                ),
                what="DevicesAttached=True after the restart",
            )
            dom = libvirt_domain(name)
            assert dom is not None and dom.isActive()
            assert passthrough_addresses(dom.XMLDesc()) == [GPU, AUDIO, nvme]
            assert driver(rig, nvme) == "vfio-pci"
        finally:
            await rig.stop()

    run(scenario())


# --- live migration ----------------------------------------------------------------------------

VF1, VF2 = "0000:5e:02.1", "0000:5e:02.2"
NETWORKS = [
    {"name": "data", "flavor": "vf", "physicalNetwork": "physnet2", "vlan": 120},
    {"name": "mgmt", "flavor": "vf", "physicalNetwork": "physnet2", "mode": "macvtap"},
]


async def _claim(rig: Rig, address: str, vm: dict[str, Any], request: str) -> None:
    assert rig.api is not None
    await rig.api.patch(
        crd_path(c.PLURAL_PCIDEVICE, rig.name(address)),
        {"spec": {"claimRef": {"namespace": rig.namespace, "name": vm["metadata"]["name"],
                               "uid": vm["metadata"]["uid"], "request": request}}},
    )  # fmt: skip


def _bindings(rig: Rig) -> list[dict[str, Any]]:
    return [
        {"name": "data", "pciDevice": rig.name(VF1), "address": VF1, "numaNode": 0,
         "mac": "52:54:00:00:00:01", "vlan": 120, "netdev": "ens1f0v1"},
        {"name": "mgmt", "pciDevice": rig.name(VF2), "address": VF2, "numaNode": 0,
         "mac": "52:54:00:00:00:02", "netdev": "ens1f0v2", "minTxRate": 100, "maxTxRate": 300,
         "linkState": "enable"},
    ]  # fmt: skip


def _status_path(rig: Rig, name: str) -> str:
    return crd_path(c.PLURAL_PASSTHROUGHVM, name, namespace=rig.namespace, subresource="status")


async def _migration_phase(rig: Rig, name: str, phase: str) -> Any:
    vm = await rig.vm(name)
    m = vm.status.migration if vm else None
    return m if m is not None and m.phase == phase else None


def test_a_live_migration_target_prepares_its_vfs_and_says_how_it_will_pin_the_domain(
    rig: Rig,
) -> None:
    """The target's half: a VM still placed elsewhere, labelled as migrating here, whose
    migration lists VFs claimed here: the plugin sets the VFs up (VLAN, MAC; vfio-pci for the
    one passed through) and answers Ready with the domain's pinning here, and leaves the VM
    alone otherwise (no domain defined, nothing torn down)."""

    async def scenario() -> None:
        await rig.start()
        assert rig.api is not None
        try:
            body = {
                "apiVersion": c.API_VERSION,
                "kind": "PassthroughVM",
                "metadata": {
                    "name": "net-vm",
                    "labels": {c.LABEL_MIGRATION_TARGET: rig.node},
                },
                "spec": {"memory": "1Gi", "cpu": {"cores": 2}, "networks": NETWORKS},
            }
            vm = await rig.api.create(
                crd_path(c.PLURAL_PASSTHROUGHVM, namespace=rig.namespace), body
            )
            for a, req in ((VF1, "data"), (VF2, "mgmt")):
                await _claim(rig, a, vm, req)
            mig = {"id": "m1", "fromNode": "elsewhere", "toNode": rig.node, "live": True,
                   "phase": "Preparing", "networks": _bindings(rig),
                   "compute": {"policy": "dedicated", "vcpus": 2, "memoryMiB": 1024,
                               "numa": [{"node": 0, "vcpus": [0, 1], "cpus": [2, 3],
                                         "memoryMiB": 1024}]},
                   "targetURI": "qemu+tls://here/system"}  # fmt: skip
            await rig.api.patch(
                _status_path(rig, "net-vm"),
                {"status": {"phase": "Running", "nodeName": "elsewhere", "migration": mig}},
            )
            ready = await until(
                lambda: _migration_phase(rig, "net-vm", "Ready"), what="the target Ready"
            )
            assert '<vcpupin vcpu="0" cpuset="2" />' in ready.tuning
            assert '<memory mode="strict" nodeset="0" />' in ready.tuning
            assert driver(rig, VF1) == "vfio-pci" and driver(rig, VF2) == "iavf"
            runner = rig.agent.runner  # type: ignore[union-attr]
            said = [" ".join(x) for x in runner.commands]
            # The VF passed through gets its MAC and VLAN from libvirt when it is plugged in;
            # the macvtap one's are set on the PF before the domain comes.
            # Rates and link state, as status.networks[] says them (the simulated kernel's
            # record: igb in the lab takes max_tx_rate only).
            for want in (
                "vf 1 spoofchk on",
                "vf 2 vlan 0",
                "vf 2 mac 52:54:00:00:00:02",
                "vf 2 min_tx_rate 100 max_tx_rate 300",
                "vf 2 state enable",
            ):
                assert any(x.startswith(f"ip link set dev ens1f0 {want}") for x in said), said
            # Not placed here yet: no domain, and the VM is not torn down (no DomainGone).
            await asyncio.sleep(1.5)
            assert libvirt_domain(domain_name(rig.namespace, "net-vm")) is None
            vm_now = await rig.vm("net-vm")
            assert vm_now is not None and vm_now.status.migration.phase == "Ready"
            assert all(x.type != c.COND_DOMAIN_GONE for x in vm_now.status.conditions)
        finally:
            await rig.stop()

    run(scenario())


def test_a_live_migration_libvirt_cannot_make_fails_and_the_vm_keeps_running_here(
    rig: Rig,
) -> None:
    """The old node's half, where libvirt cannot migrate (the test driver): Transferring, then
    Failed with libvirt's words; the domain runs on here with its VFs."""

    async def scenario() -> None:
        await rig.start()
        assert rig.api is not None
        try:
            body = {
                "apiVersion": c.API_VERSION,
                "kind": "PassthroughVM",
                "metadata": {
                    "name": "net-vm",
                    "finalizers": [c.FINALIZER_RELEASE],
                },
                "spec": {"memory": "1Gi", "networks": NETWORKS},
            }
            vm = await rig.api.create(
                crd_path(c.PLURAL_PASSTHROUGHVM, namespace=rig.namespace), body
            )
            for a, req in ((VF1, "data"), (VF2, "mgmt")):
                await _claim(rig, a, vm, req)
            await rig.api.patch(
                _status_path(rig, "net-vm"),
                {"status": {"phase": "Scheduled", "nodeName": rig.node,
                            "networks": _bindings(rig)}},
            )  # fmt: skip
            await until(lambda: _phase(rig, "net-vm", "Running"), what="Running")
            name = domain_name(rig.namespace, "net-vm")
            # What the controller and the target write: a migration the target is ready for.
            mig = {"id": "m1", "fromNode": rig.node, "toNode": "there", "live": True,
                   "phase": "Ready", "networks": [], "targetURI": "test:///default",
                   "tuning": "<tuning />"}  # fmt: skip
            await rig.api.patch(_status_path(rig, "net-vm"), {"status": {"migration": mig}})
            failed = await until(
                lambda: _migration_phase(rig, "net-vm", "Failed"), what="the migration Failed"
            )
            assert "cannot migrate live" in failed.message or "libvirt said" in failed.message
            assert f"keeps running on {rig.node}" in failed.message
            dom = libvirt_domain(name)
            assert dom is not None and dom.isActive()
            assert passthrough_addresses(dom.XMLDesc()) == [VF1]
            got = await until(lambda: _phase(rig, "net-vm", "Running"), what="still Running")
            assert got.status.node_name == rig.node and driver(rig, VF1) == "vfio-pci"
        finally:
            await rig.stop()

    run(scenario())


# --- health and scrubbing ---------------------------------------------------------------------


def _health(obj: dict[str, Any] | None) -> tuple[str, str]:
    st = (obj or {}).get("status") or {}
    reason = next((x["reason"] for x in st.get("conditions", []) if x["type"] == "Healthy"), "")
    return st.get("health", ""), reason


def test_fatal_errors_make_a_device_unhealthy_and_a_scrub_resets_and_returns_it(
    rig: Rig, kube: KubeCluster
) -> None:
    rig.settings.scrub = True

    async def scenario() -> None:
        agent = await rig.start()
        assert rig.api is not None
        try:
            lease = await rig.api.get(
                f"/apis/coordination.k8s.io/v1/namespaces/{OPERATOR_NS}/leases/"
                f"{c.NODE_LEASE_PREFIX}{rig.node}"
            )
            assert lease["metadata"]["annotations"][c.ANNOTATION_SCRUBS] == "true"
            vm = await rig.schedule_vm("gpu-vm", [GPU, AUDIO])
            await until(lambda: _phase(rig, "gpu-vm", "Running"), what="Running")
            assert (await rig.device(GPU) or {})["status"]["aerFatal"] == 0
            # The kernel counts two fatal PCIe errors on the GPU.
            (rig.root / "bus/pci/devices" / GPU / "aer_dev_fatal").write_text(aer_counters(2))
            await agent.rescan()
            dev = await rig.device(GPU)
            assert _health(dev) == ("Unhealthy", c.REASON_AER_FATAL)
            assert dev is not None and dev["status"]["aerFatal"] == 2
            await agent.rescan()  # no new rise, still held down
            assert _health(await rig.device(GPU)) == ("Unhealthy", c.REASON_AER_FATAL)

            await rig.api.delete(
                crd_path(c.PLURAL_PASSTHROUGHVM, "gpu-vm", namespace=rig.namespace)
            )
            await until(lambda: _condition(rig, "gpu-vm", c.COND_DOMAIN_GONE), what="DomainGone")
            # Still claimed: it waits on vfio-pci for the release and its scrub.
            assert driver(rig, GPU) == driver(rig, AUDIO) == "vfio-pci"
            for a in (GPU, AUDIO):  # what the controller writes when it releases them
                await rig.api.patch(
                    crd_path(c.PLURAL_PCIDEVICE, rig.name(a)),
                    [
                        {"op": "test", "path": "/spec/claimRef/uid", "value": vm.metadata.uid},
                        {
                            "op": "add",
                            "path": "/spec/release",
                            "value": {
                                "id": f"rel-{a[-1]}",
                                "vm": f"{rig.namespace}/gpu-vm",
                                "uid": vm.metadata.uid,
                                "scrub": True,
                            },
                        },
                        {"op": "remove", "path": "/spec/claimRef"},
                    ],
                    patch_type="json",
                )

            async def scrubbed() -> dict[str, Any] | None:
                dev = await rig.device(GPU)
                sc = ((dev or {}).get("status") or {}).get("scrub") or {}
                return dev if sc.get("releaseID") == "rel-0" else None

            dev = await until(scrubbed, what="the GPU's scrub")
            sc = dev["status"]["scrub"]
            assert sc["phase"] == "Done" and sc["reset"] == "flr" and sc["driver"] == "nvidia"
            assert "reset (flr)" in sc["message"] and "returned to nvidia" in sc["message"]
            assert driver(rig, GPU) == "nvidia"
            resets = json.loads((rig.root / SIM_STATE).read_text())["resets"]
            assert resets[GPU] == 1
            # The reset re-checked it: healthy again before the hold-down ran out.
            assert _health(dev) == ("Healthy", c.REASON_PRESENT)
            await until(
                lambda: _driver_is(rig, AUDIO, "snd_hda_intel"), what="the audio function back"
            )
            await agent.rescan()  # a quiet rescan keeps the record
            assert (await scrubbed()) is not None
        finally:
            await rig.stop()

    run(scenario())


async def _driver_is(rig: Rig, address: str, want: str) -> bool:
    return driver(rig, address) == want


def test_a_failed_reset_leaves_the_device_held_and_unhealthy(rig: Rig) -> None:
    rig.settings.scrub = True

    async def scenario() -> None:
        sim = rig.root / SIM_STATE
        state = json.loads(sim.read_text()) if sim.exists() else {}
        state["resetFails"] = {GPU: True}  # this host's kernel fails every reset of the GPU
        sim.write_text(json.dumps(state))
        agent = await rig.start()
        assert rig.api is not None
        try:
            agent.preparer.bind_vfio([GPU])  # as a VM had it
            await rig.api.patch(
                crd_path(c.PLURAL_PCIDEVICE, rig.name(GPU)),
                {"spec": {"release": {"id": "r9", "vm": "t/x", "uid": "x", "scrub": True}}},
            )

            async def answered() -> dict[str, Any] | None:
                dev = await rig.device(GPU)
                sc = ((dev or {}).get("status") or {}).get("scrub") or {}
                return dev if sc.get("releaseID") == "r9" else None

            dev = await until(answered, what="the scrub's answer")
            assert dev["status"]["scrub"]["phase"] == "Failed"
            assert "the kernel said" in dev["status"]["scrub"]["message"]
            assert _health(dev) == ("Unhealthy", c.REASON_SCRUB_FAILED)
            assert driver(rig, GPU) == "vfio-pci"  # not handed to the host half-done
        finally:
            await rig.stop()

    run(scenario())


# --- the API server going away ----------------------------------------------------------------


def test_survives_the_api_server_going_away_and_catches_up(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "cp")
    cluster.up()
    try:
        from kubernetes import config as k8s_config

        api = k8s_config.new_client_from_config(str(cluster.kubeconfig))
        apply_crds(api)
        client.CoreV1Api(api).create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=OPERATOR_NS))
        )
        client.CoreV1Api(api).create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name="t"))
        )
        rig = Rig(cluster.kubeconfig, tmp_path, "t")

        async def scenario() -> None:
            agent = await rig.start()
            try:
                cluster.stop_apiserver()
                rig.tree.remove_function("0000:5e:02.3")  # changes while the server is away
                with pytest.raises((aiohttp.ClientError, OSError)):
                    await agent.rescan()
                await asyncio.sleep(2)
                await asyncio.to_thread(cluster.start_apiserver)
                await agent.devices.synced.wait()
                await until(lambda: _rescan_ok(agent), timeout=60, what="a rescan after the outage")
                assert await rig.device("0000:5e:02.3") is None
                assert await rig.device("0000:5e:02.2") is not None
            finally:
                await rig.stop()

        run(scenario())
    finally:
        cluster.down()


async def _rescan_ok(agent: NodeAgent) -> bool:
    try:
        await agent.rescan()
        return True
    except Exception:
        return False


def test_vf_counts_follow_the_device_spec_and_a_claimed_vf_keeps_them(
    rig: Rig, kube: KubeCluster
) -> None:
    """The spec asks ens1f0 for 6 VFs (it has 4): the agent makes them and publishes them; with
    one of them claimed, a later count is refused — a condition on the PF and an Event — and
    every VF stays."""
    pf = "0000:5e:00.0"
    offer = (
        "devices:\n"
        "  - {name: vfs, match: {netdev: 'ens1f0#0-63'}}\n"
        "  - {name: pf, match: {address: '0000:5e:00.0'}}\n"
    )

    def configure(count: int, stamp: float) -> None:
        rig.config.write_text(
            offer + f"vfs: [{{name: port0, match: {{netdev: ens1f0}}, count: {count}}}]\n"
        )
        os.utime(rig.config, (time.time() + stamp, time.time() + stamp))

    def vfs_condition(obj: dict[str, Any] | None) -> dict[str, Any]:
        assert obj is not None
        return next(x for x in obj["status"]["conditions"] if x["type"] == "VFsConfigured")

    async def scenario() -> None:
        configure(6, 5)
        agent = await rig.start()
        try:
            assert rig.api is not None
            assert rig.tree.devices.joinpath(pf, "sriov_numvfs").read_text().strip() == "6"
            vf5 = "0000:5e:02.5"
            assert (await rig.device(vf5)) is not None  # a new VF, published
            cond = vfs_condition(await rig.device(pf))
            assert (cond["status"], cond["reason"]) == ("True", "VFCountChanged")

            await rig.api.patch(
                crd_path(c.PLURAL_PCIDEVICE, rig.name(vf5)),
                {
                    "spec": {
                        "claimRef": {"namespace": "t", "name": "vm1", "uid": "u", "request": "n"}
                    }
                },
            )
            await until(
                lambda: _claimed_in_cache(agent, rig.name(vf5)), what="the claim in the cache"
            )
            configure(2, 10)
            await agent.rescan()
            assert rig.tree.devices.joinpath(pf, "sriov_numvfs").read_text().strip() == "6"
            assert (await rig.device(vf5)) is not None
            cond = vfs_condition(await rig.device(pf))
            assert (cond["status"], cond["reason"]) == ("False", "VFCountRefused")
            assert f"VF {vf5} is claimed by t/vm1" in cond["message"]
            core = client.CoreV1Api(kube.api)
            await until(  # the Event is posted behind the rescan
                lambda: asyncio.to_thread(
                    lambda: any(
                        e.reason == "VFCountRefused" and e.involved_object.name == rig.name(pf)
                        for e in core.list_namespaced_event("default").items
                    )
                ),
                what="a VFCountRefused Event",
            )
            assert any(
                e.reason == "VFCountRefused" and e.involved_object.name == rig.name(pf)
                for e in core.list_namespaced_event("default").items
            )
        finally:
            await rig.stop()

    run(scenario())


async def _claimed_in_cache(agent: NodeAgent, name: str) -> bool:
    obj = agent.devices.items.get(name) or {}
    return bool((obj.get("spec") or {}).get("claimRef"))
